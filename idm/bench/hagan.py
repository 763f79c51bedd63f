"""``idm bench hagan``: how close an HA-GAN checkpoint's generated volumes are to the real ones
(:mod:`idm.generative.hagan`), and how well its encoder reconstructs held-out volumes.

``--data`` holds the real (training) volumes, ``--val`` the held-out ones, both as prepared ``(D, H, W)``
``.npy`` on [0, 1] of the checkpoint's shape (``python -m train.hagan_volumes`` writes them). ``-n`` volumes
are generated from latents seeded by ``--seed`` (:func:`idm.training.hagan.evaluate`, the statistics the
trainer writes into the model card):

* intensity mean / std over all voxels, generated against real (training) and held-out volumes;
* the mid-plane histogram distance (:func:`~idm.generative.hagan.mid_slice_histogram_distance`: W1 on
  [0, 1] between pooled axial / coronal / sagittal mid-plane voxels, mean of the three), generated vs real
  and, as the scale of a real difference, held-out vs real;
* the encoder's reconstruction PSNR (``idm encode``: ``G(E(x))``, peak 1 on [0, 1]) on the first training
  volume and on each held-out volume.

Table, JSON (``--json``), figure of mid-planes, real beside generated (``--figure``).
"""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import IDMError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default="hagan-ct", help="HA-GAN checkpoint folder or shipped name (default hagan-ct)")
    parser.add_argument("--data", required=True, metavar="DIR", help="real (training) volumes: (D, H, W) .npy on [0, 1]")
    parser.add_argument("--val", metavar="DIR", help="held-out volumes (.npy folder or file): encoder PSNR")
    parser.add_argument("-n", type=int, default=8, help="generated volumes (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latents (default 0)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--figure", metavar="FILE.png", help="mid-planes of two real and two generated volumes")


def format_table(metrics: dict[str, Any]) -> list[str]:
    """The generated-vs-real table of :func:`idm.training.hagan.evaluate`'s ``metrics``."""
    g, r, h = metrics["generated"], metrics["real"], metrics.get("heldout")
    lines = [f"{'':<44} {'generated':>10} {'real':>10} {'held-out':>10}",
             f"{'intensity mean':<44} {g['mean']:>10.4f} {r['mean']:>10.4f} {h['mean'] if h else float('nan'):>10.4f}",
             f"{'intensity std':<44} {g['std']:>10.4f} {r['std']:>10.4f} {h['std'] if h else float('nan'):>10.4f}",
             f"{'mid-plane histogram distance to real (W1)':<44} {metrics['mid_slice_histogram_distance']:>10.4f} "
             f"{0.0:>10.4f} {metrics.get('val_to_train_histogram_distance', float('nan')):>10.4f}",
             f"encoder reconstruction PSNR, first training volume: {metrics['train_recon_psnr_db']:.2f} dB"]
    lines += [f"encoder reconstruction PSNR, held-out {name}: {value:.2f} dB"
              for name, value in metrics.get("heldout_recon_psnr_db", {}).items()]
    return lines


def run_cli(args: argparse.Namespace) -> int:
    from ..data import load_volumes
    from ..training.hagan import evaluate, load_hagan, sample_volumes
    from .memory import apply_threads, write_json

    if args.n < 1:
        raise IDMError(f"-n must be >= 1, got {args.n}")
    apply_threads(args)
    model = load_hagan(args.checkpoint, device=args.device)
    _, real = load_volumes(args.data)
    val = load_volumes(args.val) if args.val else None
    for what, volumes in (("--data", real), ("--val", val[1] if val else None)):
        if volumes is not None and tuple(volumes.shape[2:]) != model.config.shape:
            raise IDMError(f"{what} volumes are {tuple(volumes.shape[2:])}, the checkpoint generates {model.config.shape}")
    generated = sample_volumes(model, args.n, args.seed)
    metrics = evaluate(model, real, val, samples=args.n, seed=args.seed, generated=generated)
    print(f"HA-GAN {args.checkpoint}: {args.n} generated volumes (seed {args.seed}) against {real.shape[0]} real "
          f"and {val[1].shape[0] if val else 0} held-out volumes {'×'.join(map(str, model.config.shape))} on [0, 1]")
    for line in format_table(metrics):
        print(line)
    if args.json:
        write_json(args.json, {"checkpoint": str(args.checkpoint), "data": str(args.data),
                               "val": str(args.val) if args.val else None, "seed": args.seed, **metrics})
        print(f"results written to {args.json}")
    if args.figure:
        from ..cli.generate import write_midplanes

        rows = [(f"real {i}", real[i, 0]) for i in range(min(2, real.shape[0]))]
        write_midplanes(args.figure, rows + [(f"generated {i}", generated[i, 0]) for i in range(min(2, args.n))])
        print(f"figure written to {args.figure}")
    return 0


__all__ = ["add_arguments", "format_table", "run_cli"]
