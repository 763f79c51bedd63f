"""``idm bench anomaly``: classifier-guided anomaly detection against its unguided baseline.

``--data`` holds ``scans/*.npy`` (4, H, W) and ``masks/*.npy`` (H, W, 1 = tumour) of the same names (the
``test`` split of ``python -m train.anomaly_scans``). Every scan is encoded to ``--level`` and decoded
with each guidance scale of ``--scales`` (0 is the baseline: the plain reconstruction error, same
encode / decode; :func:`idm.medical.anomaly.anomaly_map`); the map is scored against the mask: Dice of
its Otsu threshold and pixel AUROC (over the whole slice), with the seconds per slice::

    {"data", "prior", "classifier", "level", "steps",
     "rows": [{"scale", "dice", "auroc", "seconds", "images": [{"name", "dice", "auroc", "seconds"}]}]}

``--figure``: per scan the flair contrast, the mask, and each scale's map and segmentation.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import IDMError
from ..io.atomic import save_figure


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli.anomaly import ANOMALY_DEFAULTS

    parser.add_argument("--data", required=True, metavar="DIR", help="folder with scans/ and masks/")
    parser.add_argument("--prior", default="ddpm-brats4",
                        help="the four-contrast diffusion prior (checkpoint name or folder; default ddpm-brats4)")
    parser.add_argument("--classifier", default="classifier-brats4",
                        help="the noise-aware classifier (checkpoint name or folder; default classifier-brats4)")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, ANOMALY_DEFAULTS["scale"]],
                        help=f"guidance scales, 0 = the unguided baseline (default 0 {ANOMALY_DEFAULTS['scale']:g})")
    parser.add_argument("--level", type=int, default=ANOMALY_DEFAULTS["level"], help="encoding timestep L")
    parser.add_argument("--steps", type=int, default=ANOMALY_DEFAULTS["steps"], help="DDIM steps each way")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--figure", metavar="FILE.png", help="maps and segmentations per scan")


def run_cli(args: argparse.Namespace) -> int:
    from ..data.images import load_array, read_npy
    from ..medical.anomaly import anomaly_map, check_scan, check_settings, dice, otsu_mask, pixel_auroc
    from ..priors.prior import load_prior
    from ..training.classifier import load_classifier

    scans_dir, masks_dir = Path(args.data) / "scans", Path(args.data) / "masks"
    paths = sorted(p for p in scans_dir.glob("*.npy") if (masks_dir / p.name).is_file()) if scans_dir.is_dir() else []
    if not paths:
        raise IDMError(f"no scans with masks in {args.data} (expected scans/*.npy and masks/*.npy)")
    for scale in args.scales:
        check_settings(args.level, args.steps, scale)
    prior = load_prior(args.prior, device=args.device)
    classifier = load_classifier(args.classifier, device=args.device)
    cases = [(p.stem, check_scan(load_array(p), f"scan {p}"), torch.from_numpy(read_npy(masks_dir / p.name) > 0))
             for p in paths]
    rows, maps = [], {}
    for scale in args.scales:
        images = []
        for name, scan, mask in cases:
            start = time.perf_counter()
            with torch.no_grad():
                amap = anomaly_map(prior, classifier, scan[None].to(args.device), prior.schedule, level=args.level,
                                   steps=args.steps, scale=scale, size_multiple=prior.size_multiple)[0][0].cpu()
            seconds = time.perf_counter() - start
            segmentation = otsu_mask(amap)
            images.append({"name": name, "dice": dice(segmentation, mask), "auroc": pixel_auroc(amap, mask),
                           "seconds": seconds})
            maps[(scale, name)] = (amap, segmentation)
            print(f"  s={scale:g}: {name}: Dice {images[-1]['dice']:.3f}, AUROC {images[-1]['auroc']:.3f}, "
                  f"{seconds:.1f} s", flush=True)
        rows.append({"scale": scale, **{k: float(np.mean([i[k] for i in images])) for k in ("dice", "auroc", "seconds")},
                     "images": images})
    print(f"{'scale':>8}  {'Dice':>6}  {'AUROC':>6}  {'s/slice':>7}")
    for r in rows:
        print(f"{r['scale']:8g}  {r['dice']:6.3f}  {r['auroc']:6.3f}  {r['seconds']:7.1f}")
    if args.json:
        from ..cli.common import write_json

        write_json(args.json, {"data": str(args.data), "prior": str(args.prior), "classifier": str(args.classifier),
                               "level": args.level, "steps": args.steps, "rows": rows})
    if args.figure:
        write_figure(args.figure, cases, maps, args.scales)
    return 0


def write_figure(path: str | Path, cases: list, maps: dict[tuple[float, str], Any], scales: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 2 + 2 * len(scales)
    fig, axes = plt.subplots(len(cases), cols, figsize=(1.9 * cols, 2.0 * len(cases)), squeeze=False)
    for i, (name, scan, mask) in enumerate(cases):
        panels = [("flair", scan[3]), ("tumour", mask.float())]
        for scale in scales:
            amap, segmentation = maps[(scale, name)]
            panels += [(f"map s={scale:g}", amap / amap.max().clamp_min(1e-12)), (f"Otsu s={scale:g}", segmentation.float())]
        for j, (title, image) in enumerate(panels):
            ax = axes[i][j]
            ax.imshow(image.numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=8)
        axes[i][0].set_ylabel(name, fontsize=8)
    save_figure(fig, path, dpi=80)
