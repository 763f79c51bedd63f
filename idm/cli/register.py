"""``idm register MOVING FIXED -o WARPED``: deformable registration with DiffuseMorph
(:mod:`idm.medical.registration`), and the continuous deformation between the two images.

MOVING, FIXED: 2-D images of one size (image files, ``.npy`` or 2-D NIfTI on [0, 1]; the shipped
``ddm-brain`` was trained on T1 brain slices at 2 mm, 128², scaled by their 99.5th percentile). WARPED:
MOVING ∘ φ (``.png``, ``.npy`` or ``.nii[.gz]``). ``--field``: the displacement ``(2, H, W)`` in pixels
(channel 0 rows, 1 columns; ``.npy`` or NIfTI). ``--frames N``: MOVING warped by φ_γ for N values of γ
from 0 (identity) to 1 (the full warp), as ``<WARPED>_frames/frame_KK.png``, an animated
``<WARPED>_frames.gif`` and a strip ``<WARPED>_frames.png``.

A 3-D checkpoint (``--checkpoint ddm-brain3d``, trained on 4 mm brain volumes) registers volumes: MOVING,
FIXED are ``(D, H, W)`` ``.npy`` or 3-D NIfTI on [0, 1]; WARPED and ``--field`` ``(3, D, H, W)`` are
``.npy`` / NIfTI; the frames show the middle plane (``D // 2``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..errors import IDMError


def add_parser(subparsers: argparse._SubParsersAction, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("register", help=help_text, description=__doc__.splitlines()[0])
    parser.add_argument("moving", metavar="MOVING", help="the image to deform (.png, .npy, 2-D .nii[.gz])")
    parser.add_argument("fixed", metavar="FIXED", help="the image to match (same size)")
    parser.add_argument("-o", "--output", required=True, help="the warped moving image (.png, .npy, .nii[.gz])")
    parser.add_argument("--field", help="also write the displacement (2, H, W), pixels (.npy, .nii[.gz])")
    parser.add_argument("--frames", type=int, default=0,
                        help="write N >= 2 frames of the continuous deformation (γ from 0 to 1), a GIF and a strip")
    parser.add_argument("--checkpoint", default="ddm-brain",
                        help="registration network: shipped name or folder (default ddm-brain)")
    parser.add_argument("--passes", type=int, default=None,
                        help="network passes, each on the image warped so far, fields composed (default 2; 1 = the "
                        "paper's single pass)")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    parser.set_defaults(func=run)
    return parser


def write_frames(output: Path, frames: list) -> list[Path]:
    """``frames`` (each ``(1, H, W)`` on [0, 1]) as PNGs in ``<output>_frames/``, an animated GIF and a strip."""
    import numpy as np
    from PIL import Image

    from ..data import save_image
    from ..io.atomic import atomic_directory, atomic_path

    stem = output.with_suffix("") if not output.name.lower().endswith(".nii.gz") else output.with_name(output.name[:-7])
    folder = stem.with_name(stem.name + "_frames")
    with atomic_directory(folder) as temp:
        for k, frame in enumerate(frames):
            save_image(temp / f"frame_{k:02d}.png", frame.clamp(0, 1))
    pixels = [(frame.clamp(0, 1)[0].numpy() * 255).round().astype(np.uint8) for frame in frames]
    gif, strip = folder.with_suffix(".gif"), folder.with_suffix(".png")
    images = [Image.fromarray(p) for p in pixels]
    with atomic_path(gif) as temp:
        images[0].save(temp, format="GIF", save_all=True, append_images=[*images[1:], *images[-2:0:-1]],
                       duration=120, loop=0)
    with atomic_path(strip) as temp:
        Image.fromarray(np.concatenate(pixels, axis=1)).save(temp, format="PNG")
    return [folder, gif, strip]


def run(args: argparse.Namespace) -> int:
    from ..data import load_volume
    from ..medical.registration import PASSES, display_plane, folding_fraction, ncc, register
    from ..training.registration import load_registration
    from .common import check_output_path, is_raw_output, read_slice, write_result

    output = check_output_path(args.output)
    field_path = check_output_path(args.field) if args.field else None
    if field_path is not None and not is_raw_output(field_path):
        raise IDMError(f"--field must be .npy or .nii[.gz] (raw displacements), got {field_path}")
    passes = PASSES if args.passes is None else args.passes
    if passes < 1:
        raise IDMError(f"--passes must be >= 1, got {passes}")
    if args.frames != 0 and args.frames < 2:
        raise IDMError(f"--frames must be at least 2 (γ = 0 and 1), got {args.frames}")
    model = load_registration(args.checkpoint, device=args.device)
    if model.config.ndim == 3:
        if not is_raw_output(output):
            raise IDMError(f"a 3-D registration writes volumes: -o must be .npy or .nii[.gz], got {output}")
        moving, fixed = load_volume(args.moving, "moving volume"), load_volume(args.fixed, "fixed volume")
    else:
        moving, fixed = read_slice(args.moving, "moving image"), read_slice(args.fixed, "fixed image")
    if moving.shape != fixed.shape:
        raise IDMError(f"the moving image is {tuple(moving.shape[1:])} but the fixed image {tuple(fixed.shape[1:])}")
    gammas = [k / (args.frames - 1) for k in range(args.frames)] if args.frames else [1.0]
    start = time.perf_counter()
    warped, fields = register(model, moving[None].to(args.device), fixed[None].to(args.device), gammas, passes)
    seconds = time.perf_counter() - start
    final, field = warped[-1][0].cpu(), fields[-1][0].cpu()
    write_result(output, final)
    if field_path is not None:
        write_result(field_path, field)
    written = [output, *([field_path] if field_path else [])]
    if args.frames:
        planes = [display_plane(w).cpu() for w in warped]
        written += write_frames(output, planes)
    mask = (moving > 0.05) | (fixed > 0.05)
    before, after = float(ncc(moving[None], fixed[None], mask[None])), float(ncc(final[None], fixed[None], mask[None]))
    print(f"register: {tuple(moving.shape[1:])} in {seconds:.2f} s ({passes} pass{'es' if passes > 1 else ''}), NCC {before:.4f} → {after:.4f}, "
          f"folding {100 * float(folding_fraction(field[None], mask)):.3f} % → {', '.join(map(str, written))}")
    return 0
