"""``idm anomaly SCAN -o MAP [--prior PRIOR --classifier CLS]``: where a brain scan differs from its
"healthy" reconstruction (:mod:`idm.medical.anomaly`: DDIM encoding to ``--level``, classifier-guided
decoding with ``--scale``, the map Σ_c |x − x̂|).

SCAN: a folder holding the four contrast NIfTIs of one slice (BraTS names ``*_t1_*``, ``*_t1ce_*``,
``*_t2_*``, ``*_flair_*``) or a ``(4, H, W)`` ``.npy``. MAP: ``.npy`` / ``.nii[.gz]`` (raw values) or an
image (divided by its maximum). ``--segmentation FILE`` also writes the Otsu-thresholded map;
``--truth LABELS`` (a label map, non-zero = tumour) reports Dice and pixel AUROC.
"""

from __future__ import annotations

import argparse
import time

import torch

from ..errors import IDMError

#: defaults of the encoding level, DDIM steps and guidance scale
ANOMALY_DEFAULTS = {"level": 500, "steps": 25, "scale": 100.0}


def add_parser(subparsers: argparse._SubParsersAction, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("anomaly", help=help_text, description=__doc__.splitlines()[0])
    parser.add_argument("scan", metavar="SCAN", help="a folder of the four contrast NIfTIs, or a (4, H, W) .npy")
    parser.add_argument("-o", "--output", required=True, help="anomaly map (.npy, .nii[.gz] or an image)")
    parser.add_argument("--prior", default="ddpm-brats4",
                        help="the four-contrast diffusion prior (checkpoint name or folder; default ddpm-brats4)")
    parser.add_argument("--classifier", default="classifier-brats4",
                        help="the noise-aware classifier (checkpoint name or folder; default classifier-brats4)")
    parser.add_argument("--level", type=int, default=ANOMALY_DEFAULTS["level"],
                        help=f"encoding timestep L (default {ANOMALY_DEFAULTS['level']})")
    parser.add_argument("--steps", type=int, default=ANOMALY_DEFAULTS["steps"],
                        help=f"DDIM steps each way (default {ANOMALY_DEFAULTS['steps']})")
    parser.add_argument("--scale", type=float, default=ANOMALY_DEFAULTS["scale"],
                        help=f"classifier guidance scale s; 0 = plain reconstruction (default {ANOMALY_DEFAULTS['scale']:g})")
    parser.add_argument("--segmentation", help="also write the Otsu-thresholded map here (.npy, .nii[.gz], .png)")
    parser.add_argument("--truth", help="tumour label map (NIfTI / .npy, non-zero = tumour): report Dice and AUROC")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..medical.anomaly import anomaly_map, check_settings, dice, otsu_mask, pixel_auroc, read_mask, read_scan
    from ..priors.prior import load_prior
    from ..training.classifier import load_classifier
    from .common import check_output_path, is_raw_output, write_result

    output = check_output_path(args.output)
    segmentation_path = check_output_path(args.segmentation) if args.segmentation else None
    check_settings(args.level, args.steps, args.scale)
    scan = read_scan(args.scan)
    truth = read_mask(args.truth) if args.truth else None
    if truth is not None and tuple(truth.shape) != tuple(scan.shape[1:]):
        raise IDMError(f"--truth {args.truth} is {tuple(truth.shape)}, the scan {tuple(scan.shape[1:])}")
    prior = load_prior(args.prior, device=args.device)
    if prior.channels != scan.shape[0]:
        raise IDMError(f"the prior {args.prior} has {prior.channels} channel(s); a scan has {scan.shape[0]} contrasts")
    classifier = load_classifier(args.classifier, device=args.device)
    start = time.perf_counter()
    with torch.no_grad():
        amap, _ = anomaly_map(prior, classifier, scan[None].to(args.device), prior.schedule, level=args.level,
                              steps=args.steps, scale=args.scale, size_multiple=prior.size_multiple,
                              progress=not args.no_progress)
    seconds = time.perf_counter() - start
    amap = amap[0].cpu()
    segmentation = otsu_mask(amap)
    write_result(output, amap[None] if amap.max() <= 0 or is_raw_output(output) else (amap / amap.max())[None])
    if segmentation_path is not None:
        write_result(segmentation_path, segmentation.float()[None])
    report = f"anomaly: {tuple(scan.shape[1:])} in {seconds:.1f} s → {args.output}"
    if truth is not None:
        report += f" (Dice {dice(segmentation, truth):.3f}, pixel AUROC {pixel_auroc(amap, truth):.3f})"
    print(report)
    return 0
