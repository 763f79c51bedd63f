"""Calibrate a multi-ratio IDM checkpoint's noise schedule per sampling ratio, on training images.

    python -m train.calibrate_schedule --checkpoint checkpoints/idm-multi \\
        --data ../shared/data/natural/Train400 --limit 16 --ratios 0.05,0.1,0.2,0.3,0.4,0.5,0.6 \\
        --factors 0.05,0.1,0.25,0.5,1,2 [--passes N] [--out DIR]

One learned schedule ᾱ serves every ratio of a multi-ratio network, and it suits the low ratios it
is most often wrong at: at high ratios the start (``tv``) is already good and the schedule's noise
levels σ_t are too large for it. For each ``--ratios`` value this grid-searches the factor f that
multiplies every σ_t² = (1 − ᾱ_t)/ᾱ_t (``IDMConfig.sigma_scale``), by the mean PSNR over the first
``--limit`` images of ``--data`` (training images: the reported Set12 / BSD68 are not used), each
measured as ``idm eval`` does (block CS of the checkpoint's block size / matrix seed, permutation seed
= image index). The checkpoint (``--out``, default: in place) gets the pairs in its config and a
"Schedule calibration" section in its card with the whole grid and this command; the weights are not
changed. ``--passes`` sets the number of sampler passes (``IDMConfig.passes``) calibrated for and stored. Files are replaced atomically.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from idm.errors import IDMError, check_ratio
from idm.training.common import run_script


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.calibrate_schedule", description=__doc__.split("\n\n")[2])
    parser.add_argument("--checkpoint", required=True, help="a multi-ratio IDM checkpoint folder")
    parser.add_argument("--data", required=True, help="folder of training images")
    parser.add_argument("--limit", type=int, default=16, help="first N images (default 16)")
    parser.add_argument("--ratios", default="0.05,0.1,0.2,0.3,0.4,0.5,0.6", help="anchor ratios")
    parser.add_argument("--factors", default="0.05,0.1,0.25,0.5,1,2", help="σ² factors tried at each ratio")
    parser.add_argument("--passes", type=int, help="sampler passes to calibrate for and store in the checkpoint "
                        "(IDMConfig.passes; default: the checkpoint's)")
    parser.add_argument("--out", help="write the calibrated checkpoint here (default: in place)")
    parser.add_argument("--threads", type=int, help="torch threads")
    return parser


def _numbers(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise IDMError(f"--{what}: expected comma-separated numbers, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise IDMError(f"--{what}: every value must be > 0, got {text!r}")
    return values


def calibrate(args: argparse.Namespace) -> int:
    from idm.data import ImageFolder
    from idm.evaluation import blockcs_factory, evaluate
    from idm.io.atomic import atomic_directory
    from idm.io.checkpoint import read_checkpoint_config, resolve_checkpoint
    from idm.network import load_idm

    ratios = [check_ratio(r) for r in _numbers(args.ratios, "ratios")]
    factors = _numbers(args.factors, "factors")
    source = resolve_checkpoint(args.checkpoint)
    config = read_checkpoint_config(source)
    if config.get("architecture") != "idm" or config.get("ratio_range") is None:
        raise IDMError(f"{source} is not a multi-ratio IDM checkpoint (no ratio_range)")
    folder = ImageFolder(args.data, limit=args.limit)
    images = [folder[i] for i in range(len(folder))]
    net, _ = load_idm(source)
    base = replace(net.config, sigma_scale=None, **({} if args.passes is None else {"passes": args.passes}))
    grid: dict[float, dict[float, float]] = {}
    for ratio in ratios:
        make = blockcs_factory(ratio, block_size=config["block_size"], matrix_seed=config.get("matrix_seed", 0))
        grid[ratio] = {}
        for factor in factors:
            net.config = replace(base, sigma_scale=((ratio, factor),))
            result = evaluate("idm", images, make, ratio=ratio, reconstruct=lambda y, op: net(y, op))
            grid[ratio][factor] = result.mean["psnr"]
            print(f"ratio {ratio:g}  σ² × {factor:g}: {grid[ratio][factor]:.3f} dB", flush=True)
    best = [(r, max(grid[r], key=grid[r].get)) for r in ratios]
    config["idm"]["sigma_scale"] = [list(pair) for pair in best]
    config["idm"]["passes"] = base.passes
    command = shlex.join(["python", "-m", "train.calibrate_schedule", *sys.argv[1:]])
    lines = ["", "## Schedule calibration", "",
             f"The learned ᾱ is used with σ_t² scaled by a factor per sampling ratio (`sigma_scale`, log-linear "
             f"between the anchors) and {base.passes} sampler pass{'es' if base.passes > 1 else ''} "
             f"(`passes`), chosen by mean PSNR on the first {len(images)} images of `{args.data}` "
             "(training images); weights unchanged. PSNR (dB) per factor:", "",
             "| ratio | " + " | ".join(f"× {f:g}" for f in factors) + " | chosen |",
             "|---|" + "---|" * (len(factors) + 1)]
    for ratio, chosen in best:
        cells = [f"{grid[ratio][f]:.2f}" for f in factors]
        lines.append(f"| {ratio:g} | " + " | ".join(cells) + f" | × {chosen:g} |")
    lines += ["", "```", command, "```", ""]
    card = (source / "README.md").read_text(encoding="utf-8").split("\n## Schedule calibration")[0].rstrip() + "\n"
    target = Path(args.out) if args.out else source
    with atomic_directory(target) as temp:
        for file in source.iterdir():  # the weights (and any figure) as they are
            if file.is_file() and file.name not in ("config.json", "README.md"):
                (temp / file.name).write_bytes(file.read_bytes())
        (temp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (temp / "README.md").write_text(card + "\n".join(lines), encoding="utf-8")
    print(f"calibrated sigma_scale {best} written to {target}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_script(build_parser(), calibrate, argv)


if __name__ == "__main__":
    sys.exit(main())
