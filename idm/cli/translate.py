"""``idm translate SOURCE -o OUT``: zero-shot cross-modality translation of a 2-D image by a target-modality
diffusion prior guided by local mutual information (:mod:`idm.medical.translate`).

SOURCE: an image file (gray, [0, 1]), a 2-D ``.npy`` array on [0, 1] or a 2-D NIfTI slice on [0, 1]
(e.g. a BraTS ``*_t1_*.nii.gz``). OUT: ``.png`` (8 bits), ``.npy`` or ``.nii[.gz]`` (raw values).
``--truth`` (the real target-modality image of the same slice) adds PSNR, SSIM and MI to the report.
"""

from __future__ import annotations

import argparse
import time

from ..errors import IDMError


def add_parser(subparsers: argparse._SubParsersAction, help_text: str) -> argparse.ArgumentParser:
    from ..medical.translate import TRANSLATE_DEFAULTS, TRANSLATE_INITS

    parser = subparsers.add_parser("translate", help=help_text, description=__doc__.splitlines()[0])
    parser.add_argument("source", metavar="SOURCE", help="the source-modality image (.png, .npy, 2-D .nii[.gz])")
    parser.add_argument("-o", "--output", required=True, help="output file (.png, .npy, .nii, .nii.gz)")
    parser.add_argument("--prior", default="prior-t2",
                        help="target-modality diffusion prior: shipped name or folder (default prior-t2, brain T2 slices)")
    parser.add_argument("--steps", type=int, default=TRANSLATE_DEFAULTS["steps"],
                        help=f"sampling steps (default {TRANSLATE_DEFAULTS['steps']})")
    parser.add_argument("--start", type=float, default=TRANSLATE_DEFAULTS["start"],
                        help=f"first timestep as a fraction of T; 1 = from pure noise (default {TRANSLATE_DEFAULTS['start']:g})")
    parser.add_argument("--scale", type=float, default=TRANSLATE_DEFAULTS["scale"],
                        help=f"LMI guidance step per sampling step on [0, 1]; 0 = SDEdit (default {TRANSLATE_DEFAULTS['scale']:g})")
    parser.add_argument("--eta", type=float, default=TRANSLATE_DEFAULTS["eta"],
                        help=f"DDIM eta: 0 deterministic, 1 DDPM-like (default {TRANSLATE_DEFAULTS['eta']:g})")
    parser.add_argument("--init", choices=TRANSLATE_INITS, default=TRANSLATE_DEFAULTS["init"],
                        help="start from the source itself or from its contrast map: the re-ordering of its tissue "
                             f"classes the prior finds most likely (default {TRANSLATE_DEFAULTS['init']})")
    parser.add_argument("--reference", metavar="DIR",
                        help="target-modality images whose histogram the contrast map takes (default: the prior's own samples)")
    parser.add_argument("--truth", help="the real target-modality image: report PSNR / SSIM / MI against it")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..medical.translate import reference_values, translate
    from ..metrics import nmi_skimage, psnr, ssim_skimage
    from .common import check_output_path, read_slice, write_result

    output = check_output_path(args.output)
    source = read_slice(args.source, "source")
    truth = read_slice(args.truth, "truth") if args.truth else None
    if truth is not None and truth.shape != source.shape:
        raise IDMError(f"truth {args.truth} is {tuple(truth.shape[1:])}, the source {tuple(source.shape[1:])}")
    start = time.perf_counter()
    reference = reference_values(args.reference) if args.reference else None
    result = translate(source[None], args.prior, seed=args.seed, device=args.device, progress=not args.no_progress,
                       reference=reference, steps=args.steps, start=args.start, scale=args.scale, eta=args.eta,
                       init=args.init)[0]
    seconds = time.perf_counter() - start
    write_result(output, result)
    report = f"translate: {tuple(source.shape[1:])} in {seconds:.1f} s → {output}"
    if truth is not None:
        pair = result[None], truth[None]
        report += (f" (PSNR {float(psnr(*pair)[0]):.2f} dB, SSIM {float(ssim_skimage(*pair)[0]):.4f}, "
                   f"MI {float(nmi_skimage(*pair)[0]):.4f})")
    print(report)
    return 0
