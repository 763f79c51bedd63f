"""What a fine-tuning run learns to invert: the operator kind and the range of its settings.

``idm finetune --operator blockcs|mri|ct`` trains one network for

* ``blockcs``: scrambled block CS at ``--ratio`` or every ratio in ``--ratio-range`` (Φ fixed by
  ``--block-size`` / ``--matrix-seed``, the pixel permutation redrawn every step);
* ``mri``: single-coil Cartesian MRI (:class:`~idm.physics.MRI`) at every acceleration in
  ``--acceleration LOW[,HIGH]`` with ``--mask`` masks (fastMRI centre fraction ``0.32 / R``), the
  mask redrawn every step; images are complex (magnitude training images have zero phase);
* ``ct``: 2D parallel-beam CT (:class:`~idm.physics.ParallelBeamCT`) with every view count in
  ``--views LOW[,HIGH]`` over 180°, or with ``--wedge LOW,HIGH`` on half of the steps over a
  limited-angle wedge ``[0°, w)``, ``w`` uniform in the range (detectors: the operator's default for
  the patch size).

Each step draws its setting from the range, seeded by the step (so ``--resume`` replays it):
uniformly, or with ``--level-sampling log`` log-uniformly (p(r) ∝ 1/r, which gives low ratios /
accelerations / view counts a larger share of the steps; ratio 0.05–0.6: 44 % of the steps below
0.15 against 18 %);
validation runs at ``--val-levels`` (default: the ends and the middle of the range).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch

from ..errors import IDMError, check_ratio
from ..evaluation import OperatorFactory, operator_factory
from ..physics import MRI, BlockCS, ParallelBeamCT
from ..physics._args import count_for_ratio
from ..physics.base import LinearOperator

#: operator kinds ``idm finetune`` trains for
TASK_KINDS = ("blockcs", "mri", "ct")
#: what the range of each kind holds (``--ratio-range``, ``--acceleration``, ``--views``)
LEVEL_NAMES = {"blockcs": "ratio", "mri": "acceleration", "ct": "views"}


def step_seed(seed: int, step: int) -> int:
    """Seed of training step ``step``'s operator (block-CS permutation, MRI mask) and, with
    ``seed + 7919``, of its setting; the same on all processes (evaluation uses seeds 0, 1, …)."""
    return (int(seed) * 1_000_003 + int(step)) % (2**63 - 1) + 10_000


def level_range(args: argparse.Namespace) -> tuple[float, float]:
    """``(low, high)`` of the run's setting (equal ends: one setting)."""
    if args.operator == "blockcs":
        return tuple(args.ratio_range) if args.ratio_range is not None else (args.ratio, args.ratio)
    return tuple(args.acceleration if args.operator == "mri" else args.views)


def step_level(args: argparse.Namespace, step: int) -> float:
    """The setting (ratio / acceleration / view count) of training step ``step``: uniform in the
    range, or log-uniform with ``args.level_sampling == "log"``, seeded by the step (view counts
    rounded to an integer)."""
    low, high = level_range(args)
    if low == high:
        return low
    u = float(torch.rand((), generator=torch.Generator().manual_seed(step_seed(args.seed + 7919, step))))
    if getattr(args, "level_sampling", "uniform") == "log":
        value = low * (high / low) ** u
    else:
        value = low + (high - low) * u
    return float(round(value)) if args.operator == "ct" else value


def check_task_args(args: argparse.Namespace) -> None:
    """Validate the measurement options of ``args`` in place (one-line :class:`IDMError`)."""
    kind = args.operator
    own = {"blockcs": ("ratio", "ratio_range"), "mri": ("acceleration", "mask"), "ct": ("views", "wedge")}
    for other, names in own.items():
        given = [f"--{n.replace('_', '-')}" for n in names if other != kind and getattr(args, n, None) is not None]
        if given:
            raise IDMError(f"{', '.join(given)} do(es) not apply to --operator {kind}")
    if kind == "blockcs":
        if (args.ratio is None) == (args.ratio_range is None):
            raise IDMError("--operator blockcs needs exactly one of --ratio and --ratio-range")
        if args.ratio_range is not None:
            low, high = (check_ratio(r) for r in args.ratio_range)
            if not low < high:
                raise IDMError(f"--ratio-range needs LOW < HIGH, got {low:g} {high:g}")
            args.ratio_range = [low, high]
        else:
            args.ratio = check_ratio(args.ratio)
        if args.patch % args.block_size:
            raise IDMError(f"--patch {args.patch} must be a multiple of --block-size {args.block_size}")
    elif kind == "mri":
        if args.acceleration is None:
            raise IDMError("--operator mri needs --acceleration A or LOW,HIGH (e.g. 4,8)")
        low, high = _pair(args.acceleration)
        if not (math.isfinite(low) and 1 <= low <= high):
            raise IDMError(f"--acceleration needs 1 <= LOW <= HIGH, got {low:g} {high:g}")
        args.acceleration = [low, high]
        args.mask = args.mask or "random"
    elif kind == "ct":
        if args.views is None:
            raise IDMError("--operator ct needs --views N or LOW,HIGH (e.g. 18,60)")
        low, high = _pair(args.views)
        if not (low == int(low) and high == int(high) and 2 <= low <= high):
            raise IDMError(f"--views needs whole numbers 2 <= LOW <= HIGH, got {low:g} {high:g}")
        args.views = [int(low), int(high)]
        if args.wedge is not None:
            low, high = _pair(args.wedge)
            if not 0 < low <= high < 180:
                raise IDMError(f"--wedge needs 0 < LOW <= HIGH < 180 degrees, got {low:g} {high:g}")
            args.wedge = [low, high]
    else:
        raise IDMError(f"unknown --operator {kind!r}; use one of {', '.join(TASK_KINDS)}")
    if args.val_levels is None:
        low, high = level_range(args)
        if kind == "blockcs":
            args.val_levels = [0.1, 0.3, 0.5] if args.ratio_range is not None else [low]
        else:
            middle = round((low + high) / 2) if kind == "ct" else (low + high) / 2
            args.val_levels = sorted({low, middle, high})
    args.val_levels = [float(v) for v in args.val_levels]


def _pair(values: list[float]) -> tuple[float, float]:
    if len(values) == 1:
        return float(values[0]), float(values[0])
    if len(values) != 2:
        raise IDMError(f"expected A or LOW,HIGH, got {','.join(map(str, values))}")
    return float(values[0]), float(values[1])


def run_label(args: argparse.Namespace) -> str:
    """The default run name: ``csNN`` / ``csLL-HH``, ``mri4x`` / ``mri4-8x``, ``ct23v`` / ``ct18-60v``."""
    low, high = level_range(args)
    if args.operator == "blockcs":
        return f"cs{round(low * 100)}" + (f"-{round(high * 100)}" if high != low else "")
    unit = "x" if args.operator == "mri" else "v"
    return f"{args.operator}{low:g}" + (f"-{high:g}" if high != low else "") + unit


def step_wedge(args: argparse.Namespace, step: int) -> float:
    """The angular range (degrees) of CT training step ``step``: 180, or with ``--wedge`` on every
    other step (by a seeded draw) a width uniform in the wedge range."""
    if getattr(args, "wedge", None) is None:
        return 180.0
    u = torch.rand(2, generator=torch.Generator().manual_seed(step_seed(args.seed + 104729, step)))
    low, high = args.wedge
    return 180.0 if float(u[0]) < 0.5 else low + (high - low) * float(u[1])


def validation_factory(args: argparse.Namespace, level: float) -> OperatorFactory:
    """Per-image operators of the validation at ``level`` (image ``i`` gets seed ``i``, like ``idm eval``)."""
    if args.operator == "blockcs":
        return operator_factory("blockcs", ratio=level, block_size=args.block_size, matrix_seed=args.matrix_seed)
    if args.operator == "mri":
        return operator_factory("mri", acceleration=level, mask_type=args.mask)
    return operator_factory("ct", views=int(level))


class StepOperators:
    """The operator of each training step for ``(B, C, patch, patch)`` batches (cached per setting:
    block-CS Φ and its pseudo-inverse are computed once per row count)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._cache: dict[Any, LinearOperator] = {}

    def __call__(self, step: int) -> LinearOperator:
        args, level = self.args, step_level(self.args, step)
        size, seed = (args.patch, args.patch), step_seed(args.seed, step)
        if args.operator == "blockcs":
            rows = count_for_ratio(level, args.block_size**2)  # the operator's own rule: ceil(ratio·B²)
            if rows not in self._cache:
                self._cache[rows] = BlockCS(size, rows / args.block_size**2, block_size=args.block_size,
                                                  matrix_seed=args.matrix_seed)
            return self._cache[rows].redraw(seed)
        if args.operator == "mri":
            return MRI(size, acceleration=level, mask_type=args.mask, seed=seed)
        wedge = step_wedge(args, step)
        if wedge < 180.0:  # drawn from a continuum, never seen twice: not kept (each holds its sparse matrices)
            return ParallelBeamCT(size, views=int(level), angle_range=(0.0, wedge))
        if level not in self._cache:
            self._cache[level] = ParallelBeamCT(size, views=int(level))
        return self._cache[level]


def describe(args: argparse.Namespace) -> str:
    """The measurement in words, for model cards."""
    low, high = level_range(args)
    if args.operator == "blockcs":
        what = f"ratio {low:g}" if low == high else f"every ratio in [{low:g}, {high:g}] (one network, ratio drawn per step)"
        return f"scrambled block CS, {what}, block {args.block_size}, Φ seed {args.matrix_seed}"
    if args.operator == "mri":
        what = f"{low:g}×" if low == high else f"every acceleration in [{low:g}×, {high:g}×] (drawn per step)"
        return (f"single-coil Cartesian MRI, {args.mask} 1D masks at {what}, centre fraction 0.32 / R (fastMRI), "
                "mask redrawn every step; complex images, zero phase in training")
    what = f"{low:g} views" if low == high else f"every view count in [{low:g}, {high:g}] (drawn per step)"
    wedge = "" if args.wedge is None else (f"; on half of the steps a limited-angle wedge [0°, w) with w in "
                                           f"[{args.wedge[0]:g}°, {args.wedge[1]:g}°)")
    return f"2D parallel-beam CT over 180°, {what}{wedge}"


def checkpoint_fields(args: argparse.Namespace) -> dict[str, Any]:
    """``IDMNet.save`` keyword arguments recording what the network was trained to invert."""
    low, high = level_range(args)
    if args.operator == "blockcs":
        band = {"ratio_range": [low, high], "ratio": None} if high != low else {"ratio": low}
        return {"operator": "blockcs", "block_size": args.block_size, **band}
    trained = ({"acceleration_range": [low, high], "mask_type": args.mask} if args.operator == "mri"
               else {"views_range": [int(low), int(high)], "angle_range": [0.0, 180.0],
                     **({"wedge_range": list(args.wedge)} if args.wedge is not None else {})})
    return {"operator": args.operator, "block_size": None, "ratio": None, "extra": {"trained_operator": trained}}
