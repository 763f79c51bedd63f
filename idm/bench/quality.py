"""``idm bench quality``: PSNR / SSIM / seconds of the reconstruction methods on a folder of images.

Every method sees the same images and the same measurements: scrambled block CS from
:func:`idm.evaluation.blockcs_factory` (permutation seed ``seed + index`` per image, same noise
generator), scored by :func:`idm.evaluation.evaluate` (Y channel, PSNR peak 255, scikit-image
SSIM). Rows are means over the images per method × ratio::

    {"rows": [{"method": str, "ratio": float, "psnr": float, "ssim": float, "seconds": float}]}

``--figure`` shows the same centre crop of the first image for every method, one row per ratio.
Methods and their checkpoints/options are chosen as in :mod:`idm.bench.methods`.

``--operator mri``: single-coil 1D Cartesian MRI at each of ``--accelerations`` (random masks seeded
``seed + index``; ground truths as ``idm eval --operator mri``: magnitude images or complex ``.npy``),
scored on magnitudes by the fastMRI convention; default methods :data:`~idm.bench.methods.MRI_METHODS`
(``pinv`` is the zero-filled image). Methods that give an uncertainty (``diffuserecon``, ``mcddpm``,
``idm``) are run through ``with_uncertainty`` (their seconds include it), and their rows gain the mean
per-image Spearman correlation of std and |error| (:func:`idm.evaluation.uncertainty_maps`, as
``idm bench uncertainty``)::

    {"operator": "mri", "rows": [{"method", "acceleration", "psnr", "ssim", "seconds", "spearman"}]}

Its ``--figure`` shows, per acceleration, the first image's reconstruction, |error| and std per method.

``--operator ct3d`` / ``mri3d``: one volume measured slice by slice, scored on its axial, coronal and
sagittal planes with seconds and peak memory per method (:mod:`idm.bench.volume`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from ..cli.common import write_json
from ..data import ImageFolder
from ..errors import IDMError, check_ratio
from ..evaluation import Evaluation, blockcs_factory, evaluate, operator_factory, uncertainty_maps
from ..io.atomic import save_figure
from ..metrics import spearman
from ..physics.base import LinearOperator
from ..registry import Reconstruct, gives_uncertainty
from .methods import MRI_METHODS, MethodChoice, add_method_arguments, build_method, choose_methods, skippable


#: defaults of the options of image benchmarks (``--operator blockcs`` / ``mri``); volumes reject others
IMAGE_DEFAULTS = {"crop": None, "limit": None, "per_image": False, "ratios": [0.1, 0.3, 0.5],
                  "accelerations": [4.0, 8.0], "block_size": 32, "matrix_seed": 0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="DIR",
                        help="folder of test images (e.g. BSD68); ct3d / mri3d: one NIfTI volume")
    parser.add_argument("--operator", choices=("blockcs", "mri", "ct3d", "mri3d"), default="blockcs",
                        help="blockcs (default): scrambled block CS at --ratios; ct3d / mri3d: a volume measured slice "
                             "by slice, scored per plane (idm.bench.volume); mri: single-coil 1D Cartesian MRI at "
                             "--accelerations (ground truths: images or .npy)")
    parser.add_argument("--ratios", type=float, nargs="+", default=IMAGE_DEFAULTS["ratios"], metavar="R",
                        help="blockcs: sampling ratios (default 0.1 0.3 0.5)")
    parser.add_argument("--accelerations", type=float, nargs="+", default=IMAGE_DEFAULTS["accelerations"],
                        metavar="A",
                        help="mri: accelerations (default 4 8)")
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N images (sorted by name)")
    volume = parser.add_argument_group("volumes (--operator ct3d / mri3d)")
    volume.add_argument("--slices", metavar="START:STOP", help="only these axial slices of the volume (default all)")
    volume.add_argument("--views", type=int, nargs="+", metavar="N",
                        help="ct3d: evenly spaced views, one case per number (default 23)")
    volume.add_argument("--bin", type=int, metavar="K",
                        help="ct3d on raw projections (FILE.h5): average K adjacent detector cells (default 1)")
    volume.add_argument("--angles", metavar="LOW,HIGH", help="ct3d: angular range in degrees (default 0,180)")
    volume.add_argument("--mask", choices=("poisson", "random", "equispaced"),
                        help="mri3d: the 2D mask of every axial slice (default poisson: undersampled along both "
                             "phase-encode axes, readout along z)")
    volume.add_argument("--no-slice-wise", action="store_true",
                        help="do not add mbir's slice-wise run (lam=0, rho=1e-9: the 2D prior without z coupling)")
    parser.add_argument("--noise", type=float, default=0.0, metavar="SIGMA",
                        help="std of Gaussian measurement noise on the [0, 1] scale (default 0)")
    parser.add_argument("--block-size", type=int, default=IMAGE_DEFAULTS["block_size"],
                        help="block size B of block CS (default 32)")
    parser.add_argument("--matrix-seed", type=int, default=IMAGE_DEFAULTS["matrix_seed"],
                        help="seed of the sampling matrix Φ (default 0; learned methods' checkpoints must match)")
    add_method_arguments(parser)
    parser.add_argument("--per-image", action="store_true", help="also print every image's scores")
    parser.add_argument("--json", metavar="FILE", help="write the mean rows as JSON")
    parser.add_argument("--figure", metavar="FILE.png", help="write a crop of the first image from every method")
    parser.add_argument("--crop", type=int, metavar="PX",
                        help="side of the figure's centre crop (default 96 for blockcs, the whole image for mri)")


def run_quality(
    images: list[tuple[str, torch.Tensor]],
    ratios: list[float],
    methods: list[MethodChoice],
    *,
    device: str = "cpu",
    seed: int = 0,
    noise: float = 0.0,
    block_size: int = 32,
    matrix_seed: int = 0,
) -> list[Evaluation]:
    """Evaluate every method at every ratio on ``images`` (``(name, (1, H, W) in [0, 1])``).

    Default methods whose checkpoint is unavailable, or was trained for another operator (block size,
    matrix seed), are skipped with a note (see :func:`idm.bench.methods.build_method`).
    Only the first image's output is kept (``Evaluation.outputs``), for the figure.
    """
    results: list[Evaluation] = []
    for ratio in ratios:
        factory = blockcs_factory(ratio, seed=seed, block_size=block_size, noise_sigma=noise, matrix_seed=matrix_seed)
        for choice in methods:
            # a trial build finds default methods whose checkpoint is missing (evaluate builds again)
            reconstruct = build_method(choice, device=device, seed=seed, ratio=ratio)
            if reconstruct is None:
                continue
            try:
                result = evaluate(choice.name, images, factory, ratio=ratio, device=device, seed=seed,
                                  keep_outputs=True, progress=True, total=len(images), reconstruct=reconstruct)
            except IDMError as error:  # e.g. a default method's checkpoint trained for another block size
                if not skippable(choice):
                    raise
                print(f"note: skipping {choice.name} at ratio {ratio:g}: {error}")
                continue
            first = images[0][0]
            result.outputs = {first: result.outputs[first]}
            results.append(result)
    return results


def rows(results: list[Evaluation]) -> list[dict]:
    """The JSON rows: mean PSNR, SSIM and seconds per method × ratio."""
    return [
        {"method": r.method, "ratio": float(r.ratio), "psnr": float(r.mean["psnr"]), "ssim": float(r.mean["ssim"]),
         "seconds": float(r.mean["seconds"])}
        for r in results
    ]


def table(results: list[Evaluation]) -> str:
    width = max([len("method"), *(len(r.method) for r in results)])
    lines = [f"{'ratio':>5}  {'method':<{width}}  {'PSNR':>7}  {'SSIM':>6}  {'s/image':>8}"]
    for row in rows(results):
        lines.append(f"{row['ratio']:5.2f}  {row['method']:<{width}}  {row['psnr']:7.2f}  {row['ssim']:6.4f}  "
                     f"{row['seconds']:8.3f}")
    return "\n".join(lines)


def centre_crop(image: torch.Tensor, side: int) -> torch.Tensor:
    """Centre ``side × side`` crop of ``(..., H, W)`` (the whole extent along a shorter axis)."""
    h, w = image.shape[-2:]
    top, left = max(0, (h - side) // 2), max(0, (w - side) // 2)
    return image[..., top : top + side, left : left + side]


def write_figure(path: str | Path, truth: tuple[str, torch.Tensor], results: list[Evaluation], crop: int = 96) -> None:
    """Rows: ratios; columns: ground truth, then each method — the same centre crop of ``truth``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        raise IDMError("no method was evaluated, nothing to draw")
    name, image = truth
    ratios = list(dict.fromkeys(r.ratio for r in results))
    methods = list(dict.fromkeys(r.method for r in results))
    cols = 1 + len(methods)
    fig, axes = plt.subplots(len(ratios), cols, figsize=(2.2 * cols, 2.4 * len(ratios)), squeeze=False)
    for row, ratio in enumerate(ratios):
        by_method = {r.method: r for r in results if r.ratio == ratio}
        panels: list[tuple[str, torch.Tensor | None, str]] = [("ground truth", image[0], f"ratio {ratio:g}")]
        for method in methods:
            r = by_method.get(method)
            if r is None:
                panels.append((method, None, "skipped"))
                continue
            score = next(s for s in r.images if s.name == name)
            panels.append((method, r.outputs[name][0], f"{score.psnr:.2f} dB / {score.ssim:.3f}"))
        for col, (title, panel, caption) in enumerate(panels):
            ax = axes[row][col]
            if panel is not None:
                ax.imshow(centre_crop(panel, crop).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=9)
            ax.set_xlabel(caption, fontsize=8)
    h, w = centre_crop(image, crop).shape[-2:]
    fig.suptitle(f"{name}: centre crop {h}×{w}, scrambled block CS", fontsize=10)
    save_figure(fig, path, dpi=100)


def run_cli(args: argparse.Namespace) -> int:
    if args.crop is not None and args.crop < 1:
        raise IDMError("--crop must be positive")
    if args.operator in ("ct3d", "mri3d"):
        from .volume import run_volume_cli

        return run_volume_cli(args)
    given = [flag for flag, value in (("--slices", args.slices), ("--views", args.views), ("--angles", args.angles),
                                      ("--mask", args.mask), ("--bin", args.bin),
                                      ("--no-slice-wise", args.no_slice_wise)) if value]
    if given:
        raise IDMError(f"{', '.join(given)} apply to --operator ct3d / mri3d, not {args.operator}")
    if args.operator == "mri":
        return run_mri_cli(args)
    args.crop = 96 if args.crop is None else args.crop
    ratios = [check_ratio(r) for r in args.ratios]
    if args.block_size < 1:
        raise IDMError("--block-size must be positive")
    methods = choose_methods(args)
    images = list(ImageFolder(args.data, limit=args.limit))
    results = run_quality(images, ratios, methods, device=args.device, seed=args.seed, noise=args.noise,
                          block_size=args.block_size, matrix_seed=args.matrix_seed)
    return report(args, [(f"{r.method} at ratio {r.ratio:g}", r) for r in results], lambda: table(results),
                  lambda: {"rows": rows(results)}, lambda path: write_figure(path, images[0], results, crop=args.crop))


def report(args: argparse.Namespace, evaluations: list[tuple[str, Evaluation]], text: Callable[[], str],
           payload: Callable[[], dict], draw: Callable[[str], None]) -> int:
    """Print the per-image tables (``--per-image``) and the summary ``text``, write ``--json`` and ``--figure``."""
    if not evaluations:
        raise IDMError("no method could be evaluated (all were skipped)")
    if args.per_image:
        for title, evaluation in evaluations:
            print(f"\n{title}\n{evaluation.table()}")
        print()
    print(text())
    if args.json:
        write_json(args.json, payload())
        print(f"results written to {args.json}")
    if args.figure:
        draw(args.figure)
        print(f"figure written to {args.figure}")
    return 0

# --- MRI: reconstruction, error and std side by side -----------------------------------------------
@dataclass
class MRIQuality:
    """One method at one acceleration: its :class:`Evaluation` (outputs: every image's scored
    magnitude), the per-image std on the same scale (methods with an uncertainty) and Spearman's ρ."""

    evaluation: Evaluation
    acceleration: float
    stds: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    spearman: dict[str, float | None] = field(default_factory=dict)

    @property
    def mean_spearman(self) -> float | None:
        values = [v for v in self.spearman.values() if v is not None]
        return sum(values) / len(values) if values else None


class _KeepStd:
    """``reconstruct(y, op)`` through ``method.with_uncertainty``, keeping each image's (estimate, std)
    (cropped, CPU)."""

    def __init__(self, method: Reconstruct) -> None:
        self.method, self.kept = method, []

    def __call__(self, y: torch.Tensor, op: LinearOperator) -> torch.Tensor:
        posterior = self.method.with_uncertainty(y, op)
        self.kept.append((op.crop(posterior.x).cpu(), op.crop(posterior.std).cpu()))
        return posterior.x


def run_mri_quality(images: list[tuple[str, torch.Tensor]], accelerations: list[float], methods: list[MethodChoice], *,
                    device: str = "cpu", seed: int = 0, noise: float = 0.0) -> list[MRIQuality]:
    """Evaluate every method at every acceleration on MRI ground truths ``(name, (1, H, W))`` (real
    magnitudes or complex); methods with ``with_uncertainty`` also give their std (module docstring)."""
    results: list[MRIQuality] = []
    for acceleration in accelerations:
        factory = operator_factory("mri", seed=seed, noise_sigma=noise, acceleration=acceleration)
        for choice in methods:
            reconstruct = build_method(choice, device=device, seed=seed, ratio=None)
            if reconstruct is None:
                continue
            keeper = _KeepStd(reconstruct) if gives_uncertainty(reconstruct) else None
            try:
                evaluation = evaluate(choice.name, images, factory, ratio=None, device=device, seed=seed,
                                      keep_outputs=True, progress=True, total=len(images),
                                      reconstruct=keeper or reconstruct)
            except IDMError as error:
                if not skippable(choice):
                    raise
                print(f"note: skipping {choice.name} at {acceleration:g}x: {error}")
                continue
            result = MRIQuality(evaluation, acceleration)
            if keeper is not None:
                for (name, truth), (estimate, std) in zip(images, keeper.kept):
                    std, error = uncertainty_maps(estimate[0], std[0], truth, magnitude=True)
                    result.stds[name] = std
                    value = spearman(std, error)
                    result.spearman[name] = None if math.isnan(value) else value
            results.append(result)
    return results


def mri_rows(results: list[MRIQuality]) -> list[dict]:
    """The JSON rows: mean PSNR, SSIM, seconds (and Spearman) per method × acceleration."""
    return [
        {"method": r.evaluation.method, "acceleration": r.acceleration, "psnr": float(r.evaluation.mean["psnr"]),
         "ssim": float(r.evaluation.mean["ssim"]), "seconds": float(r.evaluation.mean["seconds"]),
         "spearman": r.mean_spearman}
        for r in results
    ]


def mri_table(results: list[MRIQuality]) -> str:
    width = max([len("method"), *(len(r.evaluation.method) for r in results)])
    lines = [f"{'accel':>5}  {'method':<{width}}  {'PSNR':>7}  {'SSIM':>6}  {'s/image':>8}  {'Spearman':>8}"]
    for row in mri_rows(results):
        rho = "" if row["spearman"] is None else f"{row['spearman']:8.3f}"
        lines.append(f"{row['acceleration']:4g}x  {row['method']:<{width}}  {row['psnr']:7.2f}  {row['ssim']:6.4f}  "
                     f"{row['seconds']:8.2f}  {rho:>8}")
    return "\n".join(lines)


def write_mri_figure(path: str | Path, truth: tuple[str, torch.Tensor], results: list[MRIQuality],
                     crop: int | None = None) -> None:
    """Per acceleration three rows — reconstruction, |error|, std (blank without one) — and one column per
    method after the ground truth; the error and std maps of an acceleration share one colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        raise IDMError("no method was evaluated, nothing to draw")
    name, image = truth
    reference = (image.abs() / image.abs().amax())[0]
    side = max(reference.shape) if crop is None else crop
    accelerations = list(dict.fromkeys(r.acceleration for r in results))
    methods = list(dict.fromkeys(r.evaluation.method for r in results))
    cols, rows = 1 + len(methods), 3 * len(accelerations)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.3 * rows), squeeze=False)
    for block, acceleration in enumerate(accelerations):
        here = {r.evaluation.method: r for r in results if r.acceleration == acceleration}
        errors = {m: (r.evaluation.outputs[name][0] - reference).abs() for m, r in here.items()}
        scale = max(float(torch.quantile(e.flatten(), 0.995)) for e in errors.values()) or 1.0
        for kind in range(3):
            ax = axes[3 * block + kind][0]
            if kind == 0:
                ax.imshow(centre_crop(reference, side).numpy(), cmap="gray", vmin=0, vmax=1)
                ax.set_title("ground truth" if block == 0 else "", fontsize=9)
            ax.set_ylabel(f"{acceleration:g}x: " + ("reconstruction", "|error|", "std")[kind], fontsize=8)
            ax.set_xticks([]), ax.set_yticks([])
            if kind:
                ax.set_frame_on(False)  # keeps the row label
        for col, method in enumerate(methods, start=1):
            r = here.get(method)
            panels = [None, None, None] if r is None else [
                (r.evaluation.outputs[name][0], "gray", 1.0), (errors[method], "inferno", scale),
                (r.stds[name][0], "inferno", scale) if name in r.stds else None]
            for kind, panel in enumerate(panels):
                ax = axes[3 * block + kind][col]
                ax.set_xticks([]), ax.set_yticks([])
                if panel is None:
                    ax.axis("off")
                    continue
                data, cmap, top = panel
                ax.imshow(centre_crop(data, side).numpy(), cmap=cmap, vmin=0, vmax=top)
                if kind == 0:
                    score = next(s for s in r.evaluation.images if s.name == name)
                    ax.set_title(method if block == 0 else "", fontsize=9)
                    ax.set_xlabel(f"{score.psnr:.2f} dB / {score.ssim:.3f}", fontsize=8)
                elif kind == 2 and r.spearman.get(name) is not None:
                    ax.set_xlabel(f"Spearman {r.spearman[name]:.2f}", fontsize=8)
    fig.suptitle(f"{name}: single-coil MRI, magnitudes over the truth's maximum (error / std share a scale "
                 "per acceleration)", fontsize=9)
    save_figure(fig, path, dpi=80)


def run_mri_cli(args: argparse.Namespace) -> int:
    from ..cli.evaluate import truth_folder

    for acceleration in args.accelerations:
        if not (math.isfinite(acceleration) and acceleration >= 1):
            raise IDMError(f"--accelerations must be numbers >= 1, got {acceleration:g}")
    methods = choose_methods(args, MRI_METHODS)
    folder = truth_folder(args.data, args.limit, "mri")
    images = [folder[i] for i in range(len(folder))]
    if not images:
        raise IDMError(f"no images in {args.data}")
    results = run_mri_quality(images, list(args.accelerations), methods, device=args.device, seed=args.seed,
                              noise=args.noise)
    return report(args, [(f"{r.evaluation.method} at {r.acceleration:g}x", r.evaluation) for r in results],
                  lambda: mri_table(results), lambda: {"operator": "mri", "rows": mri_rows(results)},
                  lambda path: write_mri_figure(path, images[0], results, crop=args.crop))
