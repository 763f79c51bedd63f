"""``idm bench uncertainty``: does a method's per-pixel uncertainty point at its errors?

Each image of ``--data`` is measured by ``--operator`` (with its options; MRI masks seeded per image
as ``idm eval``) and reconstructed by a method that gives an uncertainty (``diffuserecon``:
:meth:`~idm.zeroshot.method.ZeroShotReconstructor.with_uncertainty`; also ``mcddpm``, ``idm``). Scores, on the scale of
:mod:`idm.evaluation` (MRI: magnitudes over the truth's maximum; else [0, 1] images): PSNR / SSIM,
and per image Spearman's rank correlation between the std and the absolute error ``|x̂ − x|``
(of the magnitudes for MRI) over all pixels; pooled over every image, the calibration curve — pixels
in ``--bins`` equal-count bins of std, each bin's mean std against its RMSE (calibrated: equal)::

    {"method", "operator", "options", "images": [{"name", "psnr", "ssim", "spearman", "seconds"}],
     "mean": {...}, "spearman_pooled": float, "calibration": [{"std", "rmse", "pixels"}]}

``--figure``: the calibration curve beside the first image's reconstruction, error and std maps.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch

from ..cli.common import (add_measurement_args, add_method_args, method_checkpoint, method_options,
                          operator_options, write_json)
from ..errors import IDMError
from ..evaluation import image_scores, operator_factory, uncertainty_maps
from ..io.atomic import save_figure
from ..metrics import calibration_curve, spearman
from ..registry import METHODS, require_uncertainty


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="DIR", help="folder of test images (MRI / CT: also .npy)")
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N images (sorted by name)")
    parser.add_argument("--bins", type=int, default=10, help="equal-count std bins of the calibration curve (default 10)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--figure", metavar="FILE.png", help="calibration curve and the first image's maps")
    add_method_args(parser, default="diffuserecon")
    add_measurement_args(parser)


def run_cli(args: argparse.Namespace) -> int:
    from ..cli.evaluate import truth_folder

    if args.bins < 1:
        raise IDMError(f"--bins must be >= 1, got {args.bins}")
    kind, settings = operator_options(args)
    factory = operator_factory(kind, seed=args.seed, noise_sigma=args.noise, **settings)
    method = METHODS.get(args.method)
    options = method_options(args.option)
    reconstruct = method.build(checkpoint=method_checkpoint(args, method), device=args.device, seed=args.seed,
                               ratio=settings.get("ratio"), **options)
    require_uncertainty(args.method, reconstruct)
    folder = truth_folder(args.data, args.limit, kind)
    generator = torch.Generator().manual_seed(args.seed)
    images, stds, errors, first = [], [], [], None
    for index in range(len(folder)):
        name, image = folder[index]
        x = image.unsqueeze(0).to(args.device)
        op = factory(tuple(image.shape[1:]), index)
        y = op.measure(x, generator=generator)
        start = time.perf_counter()
        with torch.no_grad():
            posterior = reconstruct.with_uncertainty(y, op)
        seconds = time.perf_counter() - start
        estimate, std = op.crop(posterior.x).cpu(), op.crop(posterior.std).cpu()
        truth = x.cpu()
        value, ssim_value, magnitude = image_scores(estimate, truth, op)
        std, error = uncertainty_maps(estimate, std, truth, estimate.is_complex() or truth.is_complex() or kind == "mri")
        images.append({"name": name, "psnr": float(value[0]), "ssim": float(ssim_value[0]),
                       "spearman": _defined(spearman(std, error)), "seconds": seconds})
        stds.append(std.flatten())
        errors.append(error.flatten())
        if first is None:
            first = (name, truth.abs() / truth.abs().amax() if truth.is_complex() else truth, magnitude, error, std)
        print(f"{name}: PSNR {images[-1]['psnr']:.2f} dB, Spearman(std, |error|) {_text(images[-1]['spearman'])}, "
              f"{seconds:.1f} s", flush=True)
    if not images:
        raise IDMError(f"no images in {args.data}")
    std_all, error_all = torch.cat(stds), torch.cat(errors)
    mean = {key: sum(r[key] for r in images) / len(images) for key in ("psnr", "ssim", "seconds")}
    correlations = [r["spearman"] for r in images if r["spearman"] is not None]
    mean["spearman"] = sum(correlations) / len(correlations) if correlations else None
    result: dict[str, Any] = {
        "method": args.method, "operator": {"kind": kind, **settings}, "options": options, "images": images,
        "mean": mean, "spearman_pooled": _defined(spearman(std_all, error_all)),
        "calibration": calibration_curve(std_all, error_all, args.bins),
    }
    print(f"mean: PSNR {mean['psnr']:.2f} dB, SSIM {mean['ssim']:.4f}, Spearman {_text(mean['spearman'])} "
          f"(pooled {_text(result['spearman_pooled'])}), {mean['seconds']:.1f} s per image")
    print("calibration (std bin → RMSE): " + ", ".join(f"{row['std']:.4f}→{row['rmse']:.4f}" for row in result["calibration"]))
    if args.json:
        write_json(args.json, result)
    if args.figure:
        write_figure(Path(args.figure), result, first)
    return 0


def _defined(value: float) -> float | None:
    """None for NaN (a constant std — e.g. one sample — has no rank correlation; JSON has no NaN)."""
    return None if math.isnan(value) else value


def _text(value: float | None) -> str:
    return "undefined (constant std)" if value is None else f"{value:.3f}"


def write_figure(path: Path, result: dict, first: tuple) -> None:
    """Calibration curve (mean std against RMSE per bin, the diagonal for reference) and the first
    image's truth, reconstruction, |error| and std (the maps share one colour scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name, truth, estimate, error, std = first
    fig, axes = plt.subplots(1, 5, figsize=(20, 4))
    curve = result["calibration"]
    top = max(max(r["std"] for r in curve), max(r["rmse"] for r in curve)) * 1.05
    axes[0].plot([r["std"] for r in curve], [r["rmse"] for r in curve], "o-", label=result["method"])
    axes[0].plot([0, top], [0, top], "k--", lw=1, label="calibrated")
    axes[0].set(xlabel="predicted std (bin mean)", ylabel="RMSE of the error", xlim=(0, top), ylim=(0, top),
                title=f"calibration, Spearman {_text(result['spearman_pooled'])}")
    axes[0].legend()
    scale = float(max(error.max(), std.max()))
    for ax, image, title, style in ((axes[1], truth, f"{name}: truth", {"cmap": "gray", "vmin": 0, "vmax": 1}),
                                    (axes[2], estimate, "reconstruction", {"cmap": "gray", "vmin": 0, "vmax": 1}),
                                    (axes[3], error, "|error|", {"cmap": "inferno", "vmin": 0, "vmax": scale}),
                                    (axes[4], std, "std", {"cmap": "inferno", "vmin": 0, "vmax": scale})):
        ax.imshow(image[0, 0].numpy(), **style)
        ax.set_title(title)
        ax.axis("off")
    save_figure(fig, path, dpi=64)
