"""``idm bench registration``: learned registration (DiffuseMorph, the VoxelMorph-style baseline) against
classical diffeomorphic demons on held-out pairs: NCC, endpoint error, folding, seconds, and the
continuous deformation of DiffuseMorph.

``--data`` holds ``<name>_moving.npy`` / ``_fixed.npy`` (and ``_field.npy``, the true displacement of a
synthetic pair; ``python -m train.registration_slices`` writes them). Per method and pair: NCC of the
warped moving image with the fixed one over the brain (either image > 0.05), the endpoint error against
the true field (synthetic pairs), the share of brain pixels where ``det(I + ∇u) ≤ 0`` (folding) and
the seconds; for 2-D pairs a 256² pair (the first pair upsampled) is timed too. Volumes (3-D pairs, ``python -m
train.registration_volumes``, 3-D checkpoints) run the same way; the figure shows their middle plane. For each
learned checkpoint with a
code (DiffuseMorph), NCC at γ = 0, 0.1, …, 1 on every pair and whether it rises monotonically (also for the
training loss's local NCC₉ over the whole image, :func:`~idm.medical.registration.local_ncc`). Table,
JSON (``--json``), figure (``--figure``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import IDMError

GAMMAS = [k / 10 for k in range(11)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="DIR", help="held-out pairs (<name>_moving/_fixed[/_field].npy)")
    parser.add_argument("--checkpoints", nargs="*", default=["ddm-brain", "vm-brain"],
                        help="learned registration checkpoints (names or folders; default ddm-brain vm-brain)")
    parser.add_argument("--passes", type=int, nargs="+", default=None, metavar="P",
                        help="network passes per learned checkpoint, one row each (default 1 and 2: the paper's single "
                        "pass and idm register's default cascade)")
    parser.add_argument("--no-demons", action="store_true", help="leave out the classical baseline (SimpleITK demons)")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats on the 256² pair, median (default 3)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--figure", metavar="FILE.png", help="moving, fixed and each method's warp for some pairs")


def _learned(source: str, passes: list[int]) -> list[tuple[str, Callable, Any]]:
    """One method per pass count of the checkpoint ``source``: (name, field function, (model, passes))."""
    from ..medical.registration import register
    from ..training.registration import load_registration

    model = load_registration(source)

    def method(p: int) -> tuple[str, Callable, Any]:
        name = f"{model.config.architecture} ({source})" + (f" x{p}" if p > 1 else "")
        return name, lambda moving, fixed: register(model, moving, fixed, passes=p)[1][0], (model, p)
    return [method(p) for p in passes]


def _rising(curves: list[list[float]]) -> int:
    """How many of ``curves`` never fall."""
    return sum(all(b >= a for a, b in zip(c, c[1:])) for c in curves)


def run_cli(args: argparse.Namespace) -> int:
    from ..medical.registration import (PASSES, demons, endpoint_error, folding_fraction, local_ncc, ncc, register,
                                        warp)
    from ..training.registration import read_pairs

    if args.repeats < 1:
        raise IDMError(f"--repeats must be >= 1, got {args.repeats}")
    passes = sorted({1, PASSES}) if args.passes is None else args.passes
    if min(passes) < 1:
        raise IDMError(f"--passes must be >= 1, got {min(passes)}")
    pairs = read_pairs(args.data)
    methods: list[tuple[str, Callable, Any]] = [m for source in args.checkpoints for m in _learned(source, passes)]
    if not args.no_demons:
        methods.append(("demons", lambda m, f: demons(m, f), None))
    if not methods:
        raise IDMError("nothing to compare: give --checkpoints or leave the demons baseline in")
    rows, warped_all, continuous = [], {}, {}
    identity = {"method": "identity (no registration)", "images": []}
    for pair in pairs:
        mask = (pair["moving"] > 0.05) | (pair["fixed"] > 0.05)
        entry = {"name": pair["name"], "ncc": float(ncc(pair["moving"], pair["fixed"], mask))}
        if "field" in pair:
            entry["epe"] = float(endpoint_error(torch.zeros_like(pair["field"]), pair["field"], mask))
        identity["images"].append(entry)
    rows.append(_summary(identity))
    big = ({key: torch.nn.functional.interpolate(pairs[0][key], size=(256, 256), mode="bilinear", align_corners=True)
            for key in ("moving", "fixed")} if pairs[0]["moving"].ndim == 4 else None)
    for name, method, learned in methods:
        images, warped_all[name] = [], []
        for pair in pairs:
            mask = (pair["moving"] > 0.05) | (pair["fixed"] > 0.05)
            start = time.perf_counter()
            field = method(pair["moving"], pair["fixed"])
            seconds = time.perf_counter() - start
            warped = warp(pair["moving"], field)
            entry = {"name": pair["name"], "ncc": float(ncc(warped, pair["fixed"], mask)),
                     "folding_percent": 100 * float(folding_fraction(field, mask)), "seconds": seconds}
            if "field" in pair:
                entry["epe"] = float(endpoint_error(field, pair["field"], mask))
            images.append(entry)
            warped_all[name].append(warped)
        row = _summary({"method": name, "images": images})
        if big is not None:
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                method(big["moving"], big["fixed"])
                times.append(time.perf_counter() - start)
            row["seconds_256"] = float(np.median(times))
        if learned is not None and learned[0].diffusion is not None:
            model, p = learned
            curves, local = [], []
            for pair in pairs:
                mask = (pair["moving"] > 0.05) | (pair["fixed"] > 0.05)
                warps = register(model, pair["moving"], pair["fixed"], GAMMAS, passes=p)[0]
                curves.append([float(ncc(w, pair["fixed"], mask)) for w in warps])
                local.append([float(local_ncc(w, pair["fixed"])[0]) for w in warps])
            row["gamma"] = {"gammas": GAMMAS, "ncc": curves, "monotone_pairs": _rising(curves),
                            "local_ncc": local, "monotone_pairs_local": _rising(local), "pairs": len(curves)}
            continuous[name] = register(model, pairs[0]["moving"], pairs[0]["fixed"], GAMMAS[::2], passes=p)[0]
        rows.append(row)
    print(table(rows))
    for row in rows:
        if "gamma" in row:
            g = row["gamma"]
            print(f"{row['method']}: NCC rises monotonically with γ on {g['monotone_pairs']} of {g['pairs']} pairs "
                  f"(the loss's local NCC₉: {g['monotone_pairs_local']})")
    if args.json:
        from ..cli.common import write_json

        write_json(args.json, {"data": str(args.data), "pairs": len(pairs), "rows": rows})
    if args.figure:
        write_figure(args.figure, pairs, warped_all, continuous)
    return 0


def _summary(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with the means of its per-image scores (EPE over the synthetic pairs only)."""
    images = row["images"]
    for key in ("ncc", "epe", "folding_percent", "seconds"):
        values = [image[key] for image in images if key in image]
        if values:
            row[key] = float(np.mean(values))
    kinds = {"inter": [i["ncc"] for i in images if "epe" not in i], "synthetic": [i["ncc"] for i in images if "epe" in i]}
    for kind, values in kinds.items():
        if values:
            row[f"ncc_{kind}"] = float(np.mean(values))
    return row


def table(rows: list[dict[str, Any]]) -> str:
    def cell(row: dict[str, Any], key: str, fmt: str) -> str:
        return format(row[key], fmt) if key in row else "–"

    lines = ["| method | NCC (all) | NCC inter-subject | NCC synthetic | EPE px (synthetic) | folding % | s / pair | s / pair 256² |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['method']} | {cell(row, 'ncc', '.4f')} | {cell(row, 'ncc_inter', '.4f')} | "
                     f"{cell(row, 'ncc_synthetic', '.4f')} | {cell(row, 'epe', '.3f')} | "
                     f"{cell(row, 'folding_percent', '.3f')} | {cell(row, 'seconds', '.3f')} | {cell(row, 'seconds_256', '.3f')} |")
    return "\n".join(lines)


def write_figure(path: str | Path, pairs: list[dict[str, Any]], warped: dict[str, list[torch.Tensor]],
                 continuous: dict[str, list[torch.Tensor]]) -> None:
    """Rows: up to 4 pairs (moving, fixed, each method's warp) and, per DiffuseMorph checkpoint, the
    first pair's continuous deformation (γ = 0, 0.2, …, 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io.atomic import atomic_path
    from ..medical.registration import display_plane

    shown = list(range(0, len(pairs), max(1, len(pairs) // 4)))[:4]
    columns = max(2 + len(warped), max((len(v) for v in continuous.values()), default=0))
    rows = len(shown) + len(continuous)
    fig, axes = plt.subplots(rows, columns, figsize=(2.0 * columns, 2.1 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")

    def plane(x: torch.Tensor) -> np.ndarray:  # an image, or a volume's middle plane
        return display_plane(x)[0].numpy()

    for r, index in enumerate(shown):
        pair = pairs[index]
        images = [("moving", pair["moving"]), ("fixed", pair["fixed"])] + [(name, w[index]) for name, w in warped.items()]
        for c, (title, image) in enumerate(images):
            axes[r, c].imshow(plane(image), cmap="gray", vmin=0, vmax=1)
            axes[r, c].set_title(f"{pair['name'] if c == 0 else ''}\n{title}", fontsize=7)
    for r, (name, frames) in enumerate(continuous.items(), start=len(shown)):
        for c, frame in enumerate(frames):
            axes[r, c].imshow(plane(frame), cmap="gray", vmin=0, vmax=1)
            axes[r, c].set_title(f"{name} γ = {GAMMAS[::2][c]:.1f}", fontsize=7)
    fig.tight_layout()
    with atomic_path(Path(path)) as temp:
        fig.savefig(temp, dpi=110, format="png")
    plt.close(fig)
