"""``idm generate``: whole volumes from an HA-GAN checkpoint (:mod:`idm.generative.hagan`) as NIfTI, with
mid-plane figures."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import IDMError


def add_parser(subparsers: argparse._SubParsersAction, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("generate", help=help_text, description=__doc__)
    parser.add_argument("--checkpoint", default="hagan-ct", help="HA-GAN checkpoint folder or shipped name (default hagan-ct)")
    parser.add_argument("-n", type=int, default=4, help="number of volumes (default 4)")
    parser.add_argument("-o", "--output", required=True, help="output folder (sample_000.nii.gz, sample_000.png, ...)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latents (default 0)")
    parser.add_argument("--chunk", type=int, help="feature slices per chunk of the high-resolution generator along z "
                        "(default: the training sub-volume's depth); the result does not depend on it")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.set_defaults(func=run)
    return parser


def volume_for_file(volume: torch.Tensor, modality: str) -> np.ndarray:
    """A ``(D, H, W)`` volume on [0, 1] as written to NIfTI: CT in HU (:func:`idm.io.medical.hu_unwindow`),
    anything else on [0, 1]."""
    from ..io.medical import hu_unwindow

    x = volume.detach().float().cpu()
    return (hu_unwindow(x) if modality.upper() == "CT" else x).numpy().astype(np.float32)


def write_volume(path: Path, volume: torch.Tensor, config: object) -> None:
    """NIfTI of a ``(D, H, W)`` volume on [0, 1] with the checkpoint's spacing (:func:`volume_for_file`)."""
    from ..io.medical import write_nifti

    spacing = list(getattr(config, "spacing"))
    write_nifti(path, volume_for_file(volume, getattr(config, "modality")), np.diag([*spacing, 1.0]))


def write_midplanes(path: Path, rows: Sequence[tuple[str, torch.Tensor]]) -> None:
    """PNG: one row per ``(title, (D, H, W) volume on [0, 1])``, its axial, coronal and sagittal mid-planes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..generative.hagan import mid_slices
    from ..io.atomic import save_figure

    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)), squeeze=False)
    for (title, volume), row in zip(rows, axes):
        for ax, plane, name in zip(row, mid_slices(volume.detach().float().cpu()), ("axial", "coronal", "sagittal")):
            ax.imshow(plane.flip(0).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{title}: {name}", fontsize=9)
            ax.axis("off")
    save_figure(fig, path, dpi=90)


def run(args: argparse.Namespace) -> int:
    from ..training.hagan import load_hagan

    if args.n < 1:
        raise IDMError(f"-n must be >= 1, got {args.n}")
    if args.chunk is not None and args.chunk < 1:
        raise IDMError(f"--chunk must be >= 1, got {args.chunk}")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise IDMError(f"output {out} exists and is not a folder")
    model = load_hagan(args.checkpoint, device=args.device)
    config = model.config
    out.mkdir(parents=True, exist_ok=True)
    z = model.sample_latent(args.n, torch.Generator().manual_seed(args.seed)).to(args.device)
    rows = []
    for i in range(args.n):
        volume = model.generate(z[i:i + 1], chunk=args.chunk)[0, 0].cpu()
        write_volume(out / f"sample_{i:03d}.nii.gz", volume, config)
        write_midplanes(out / f"sample_{i:03d}.png", [(f"sample {i}", volume)])
        rows.append((f"sample {i}", volume))
    write_midplanes(out / "samples.png", rows)
    shape = "×".join(map(str, config.shape))
    print(f"{args.n} volume(s) {shape} at {config.spacing[0]:g} mm ({config.modality}"
          f"{', HU' if config.modality.upper() == 'CT' else ', [0, 1]'}) and mid-plane figures written to {out}")
    return 0
