"""``idm demo``, the main job: reconstruct the built-in sample images at 10/30/50% with every
fast method, print a PSNR/SSIM/seconds table and write side-by-side figures.

``idm demo --medical [--data-root DIR] [--cases ...]``: the same on real knee MRI, CT and raw 8-coil
brain k-space from the project's shared data folder (:mod:`idm.cli.demo_medical`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data import sample_images
from ..errors import IDMError, check_ratio
from ..evaluation import Evaluation, blockcs_factory, evaluate
from ..bench.methods import MethodChoice, build_method
from ..io.atomic import save_figure
from ..registry import METHODS
from .common import write_json

#: methods the demo runs by default, those registered in this installation
DEMO_METHODS = ("pinv", "tv", "pnp", "unrolled", "idm")


def add_parser(subparsers: argparse._SubParsersAction, help_text: str) -> argparse.ArgumentParser:
    from .demo_medical import CASES, DEFAULT_DATA_ROOT

    parser = subparsers.add_parser(
        "demo", help=help_text,
        description="Reconstruct the built-in sample images with block CS at several ratios (default), or with "
                    "--medical real knee MRI, CT and raw 8-coil brain k-space from --data-root; print a "
                    "PSNR/SSIM/seconds table, write results.json and figures.")
    parser.add_argument("-o", "--output", help="output folder (default ./idm-demo, with --medical ./idm-demo-medical)")
    parser.add_argument("--methods", nargs="+",
                        help=f"methods to compare (default: {' '.join(DEMO_METHODS)}; --medical: each case's own)")
    parser.add_argument("--ratios", type=float, nargs="+", help="block CS sampling ratios (default 0.1 0.3 0.5)")
    parser.add_argument("--size", type=int, help="side of the sample images (default 256)")
    parser.add_argument("--limit", type=int, help="only the first N sample images")
    medical = parser.add_argument_group("medical demo")
    medical.add_argument("--medical", action="store_true",
                         help="the medical demo: knee MRI at 4x/8x, CT sparse-view / limited-angle, raw 8-coil brain")
    medical.add_argument("--data-root", metavar="DIR",
                         help=f"--medical: folder holding the mri/ and ct/ sample data (default {DEFAULT_DATA_ROOT})")
    medical.add_argument("--cases", nargs="+", choices=list(CASES), metavar="CASE",
                         help=f"--medical: the cases to run (default all: {' '.join(CASES)})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    natural, medical = ("ratios", "size", "limit"), ("data_root", "cases")
    for dest in natural if args.medical else medical:
        if getattr(args, dest) is not None:
            flag = "--" + dest.replace("_", "-")
            raise IDMError(f"{flag} does not apply to idm demo --medical" if args.medical else f"{flag} needs --medical")
    if args.medical:
        from .demo_medical import run_medical

        return run_medical(args)
    ratios = [check_ratio(r) for r in args.ratios or (0.1, 0.3, 0.5)]
    names = args.methods or [m for m in DEMO_METHODS if m in METHODS.names()]
    methods = [MethodChoice(METHODS.get(name).name, explicit=bool(args.methods)) for name in names]
    images = sample_images(256 if args.size is None else args.size)
    if args.limit:
        images = dict(list(images.items())[: args.limit])
    out = Path(args.output or "idm-demo")
    out.mkdir(parents=True, exist_ok=True)
    results: list[Evaluation] = []
    for ratio in ratios:
        for choice in methods:
            # a default method whose shipped checkpoint is missing is skipped with a note
            reconstruct = build_method(choice, device=args.device, seed=args.seed, ratio=ratio)
            if reconstruct is None:
                continue
            results.append(
                evaluate(choice.name, images.items(), blockcs_factory(ratio, seed=args.seed), ratio=ratio,
                         device=args.device, seed=args.seed, keep_outputs=True, progress=True, total=len(images),
                         reconstruct=reconstruct)
            )
        figure = out / f"demo-ratio{round(ratio * 100):02d}.png"
        write_figure(figure, images, [r for r in results if r.ratio == ratio])
    print(summary_table(results))
    write_json(out / "results.json", {"runs": [r.to_json() for r in results]})
    print(f"figures and results.json written to {out}/")
    return 0


def summary_table(results: list[Evaluation]) -> str:
    lines = [f"{'ratio':>5}  {'method':<8}  {'PSNR':>7}  {'SSIM':>6}  {'s/image':>8}"]
    for r in results:
        m = r.mean
        lines.append(f"{r.ratio:5.2f}  {r.method:<8}  {m['psnr']:7.2f}  {m['ssim']:6.4f}  {m['seconds']:8.3f}")
    return "\n".join(lines)


def write_figure(path: Path, images: dict, results: list[Evaluation]) -> None:
    """Rows: images; columns: ground truth, then each method with its PSNR/SSIM."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 1 + len(results)
    fig, axes = plt.subplots(len(images), cols, figsize=(2.4 * cols, 2.5 * len(images)), squeeze=False)
    for row, (name, truth) in enumerate(images.items()):
        panels = [("ground truth", truth[0], "")]
        for r in results:
            score = next(s for s in r.images if s.name == name)
            panels.append((r.method, r.outputs[name][0], f"{score.psnr:.2f} dB / {score.ssim:.3f}"))
        for col, (title, image, caption) in enumerate(panels):
            ax = axes[row][col]
            ax.imshow(image.numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=9)
            ax.set_xlabel(caption if caption else name, fontsize=8)
    fig.suptitle(f"block CS, ratio {results[0].ratio:g}", fontsize=10)
    save_figure(fig, path, dpi=100)
