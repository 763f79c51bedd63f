"""``idm bench quality``: PSNR / SSIM / seconds of the reconstruction methods on a folder of images.

Every method sees the same images and the same measurements: scrambled block CS from
:func:`idm.evaluation.blockcs_factory` (permutation seed ``seed + index`` per image, same noise
generator), scored by :func:`idm.evaluation.evaluate` (Y channel, PSNR peak 255, scikit-image
SSIM). Rows are means over the images per method × ratio::

    {"rows": [{"method": str, "ratio": float, "psnr": float, "ssim": float, "seconds": float}]}

``--figure`` shows the same centre crop of the first image for every method, one row per ratio.
Methods and their checkpoints/options are chosen as in :mod:`idm.bench.methods`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..cli.common import write_json
from ..data import ImageFolder
from ..errors import IDMError, check_ratio
from ..evaluation import Evaluation, blockcs_factory, evaluate
from ..io.atomic import atomic_write
from .methods import MethodChoice, add_method_arguments, build_method, choose_methods, skippable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="DIR", help="folder of test images (e.g. BSD68)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.3, 0.5], metavar="R",
                        help="sampling ratios (default 0.1 0.3 0.5)")
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N images (sorted by name)")
    parser.add_argument("--noise", type=float, default=0.0, metavar="SIGMA",
                        help="std of Gaussian measurement noise on the [0, 1] scale (default 0)")
    parser.add_argument("--block-size", type=int, default=32, help="block size B of block CS (default 32)")
    parser.add_argument("--matrix-seed", type=int, default=0,
                        help="seed of the sampling matrix Φ (default 0; learned methods' checkpoints must match)")
    add_method_arguments(parser)
    parser.add_argument("--per-image", action="store_true", help="also print every image's scores")
    parser.add_argument("--json", metavar="FILE", help="write the mean rows as JSON")
    parser.add_argument("--figure", metavar="FILE.png", help="write a crop of the first image from every method")
    parser.add_argument("--crop", type=int, default=96, metavar="PX", help="side of the figure's centre crop (default 96)")


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
    fig.tight_layout()
    with atomic_write(path) as handle:
        fig.savefig(handle, format="png", dpi=100)
    plt.close(fig)


def run_cli(args: argparse.Namespace) -> int:
    ratios = [check_ratio(r) for r in args.ratios]
    if args.block_size < 1 or args.crop < 1:
        raise IDMError("--block-size and --crop must be positive")
    methods = choose_methods(args)
    images = list(ImageFolder(args.data, limit=args.limit))
    results = run_quality(images, ratios, methods, device=args.device, seed=args.seed, noise=args.noise,
                          block_size=args.block_size, matrix_seed=args.matrix_seed)
    if not results:
        raise IDMError("no method could be evaluated (all were skipped)")
    if args.per_image:
        for r in results:
            print(f"\n{r.method} at ratio {r.ratio:g}\n{r.table()}")
        print()
    print(table(results))
    if args.json:
        write_json(args.json, {"rows": rows(results)})
        print(f"results written to {args.json}")
    if args.figure:
        write_figure(args.figure, images[0], results, crop=args.crop)
        print(f"figure written to {args.figure}")
    return 0
