"""``idm bench speed``: seconds per image and U-Net evaluations of each reconstruction method.

One ``size × size`` sample image (the first built-in sample, :func:`idm.data.sample_images`) is
measured by ``--operator`` (default scrambled block CS at ``--ratio`` 0.1; ``mri`` / ``ct`` with their
own options, e.g. ``--operator mri --acceleration 4 --size 320``) and reconstructed by every method:
one warm-up call,
during which the U-Net evaluations are counted, then ``--repeat`` timed calls (device
synchronised); the median is reported::

    {"rows": [{"method": str, "seconds": float, "unet_evals": int}]}

U-Net evaluations are forward calls of a diffusion U-Net (:class:`idm.priors.unet.UNet`, or the
converted :class:`idm.invertible.ReversibleUNet` inside IDM), counted by a forward hook that exists
only during the warm-up call (:func:`count_unet_calls`); classic methods make none. The printed
table also gives each method's time as a multiple of ``idm``'s when ``idm`` was run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..cli.common import add_measurement_args, operator_factory_from_args, operator_kind, write_json
from ..data import sample_images
from ..errors import IDMError
from ..invertible import ReversibleUNet
from ..physics.base import LinearOperator
from ..priors.unet import UNet
from ..registry import Reconstruct
from .accounting import synchronize
from .methods import add_method_arguments, build_method, choose_methods

#: block-CS ratio when ``--ratio`` is not given
DEFAULT_RATIO = 0.1
#: module types whose forward calls count as one U-Net evaluation
UNET_TYPES: tuple[type[nn.Module], ...] = (UNet, ReversibleUNet)


@dataclass
class CallCounter:
    """Number of forward calls seen by :func:`count_unet_calls`."""

    calls: int = 0


@contextmanager
def count_unet_calls(types: tuple[type[nn.Module], ...] = UNET_TYPES) -> Iterator[CallCounter]:
    """Count forward calls of modules of ``types`` made inside the ``with`` block.

    Uses PyTorch's module forward hook (:func:`torch.nn.modules.module.register_module_forward_hook`),
    registered on entry and removed on exit, so it sees networks built anywhere (inside a method's
    closure too) without touching them. Nested U-Net calls would each count; ours do not nest.
    """
    counter = CallCounter()

    def hook(module: nn.Module, inputs: object, output: object) -> None:
        if isinstance(module, types):
            counter.calls += 1

    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        yield counter
    finally:
        handle.remove()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, default=256, metavar="PX", help="side of the test image (default 256)")
    parser.add_argument("--repeat", type=int, default=3, metavar="N",
                        help="timed calls per method after the warm-up; the median is reported (default 3)")
    add_method_arguments(parser)
    add_measurement_args(parser, seed=False)
    parser.add_argument("--json", metavar="FILE", help="write the rows as JSON")


def time_method(reconstruct: Reconstruct, y: torch.Tensor, op: LinearOperator, *, device: str, repeat: int) -> dict:
    """``{"seconds": median of repeat timed calls, "unet_evals": U-Net calls of one call}`` (after a counted warm-up)."""
    device_obj = torch.device(device)
    with torch.no_grad():
        with count_unet_calls() as counter:
            reconstruct(y, op)
        times = []
        for _ in range(repeat):
            synchronize(device_obj)
            start = time.perf_counter()
            reconstruct(y, op)
            synchronize(device_obj)
            times.append(time.perf_counter() - start)
    return {"seconds": float(statistics.median(times)), "unet_evals": int(counter.calls)}


def table(rows: list[dict]) -> str:
    reference = next((row["seconds"] for row in rows if row["method"] == "idm"), None)
    width = max([len("method"), *(len(row["method"]) for row in rows)])
    header = f"{'method':<{width}}  {'s/image':>9}  {'U-Net evals':>11}"
    lines = [header + (f"  {'× idm':>8}" if reference else "")]
    for row in rows:
        line = f"{row['method']:<{width}}  {row['seconds']:9.3f}  {row['unet_evals']:11d}"
        if reference:
            line += f"  {row['seconds'] / reference:8.2f}"
        lines.append(line)
    return "\n".join(lines)


def run_cli(args: argparse.Namespace) -> int:
    if args.size < 1 or args.repeat < 1:
        raise IDMError("--size and --repeat must be positive")
    if operator_kind(args) == "blockcs" and args.ratio is None:
        args.ratio = DEFAULT_RATIO
    kind, factory = operator_factory_from_args(args)
    methods = choose_methods(args)
    name, image = next(iter(sample_images(args.size).items()))
    op = factory(tuple(image.shape[1:]), 0)
    ratio = op.config().get("ratio")
    y = op.measure(image.unsqueeze(0).to(args.device), generator=torch.Generator().manual_seed(args.seed))
    rows = []
    for choice in methods:
        reconstruct = build_method(choice, device=args.device, seed=args.seed, ratio=ratio)
        if reconstruct is None:
            continue
        rows.append({"method": choice.name, **time_method(reconstruct, y, op, device=args.device, repeat=args.repeat)})
        del reconstruct
    if not rows:
        raise IDMError("no method could be timed (all were skipped)")
    print(f"{name}, {args.size}×{args.size}, {describe_operator(op)}, median of {args.repeat} on {args.device}, "
          f"{torch.get_num_threads()} thread(s)")
    print(table(rows))
    if args.json:
        write_json(args.json, {"rows": rows})
        print(f"results written to {args.json}")
    return 0


def describe_operator(op: LinearOperator) -> str:
    """One line naming the measurement, e.g. ``blockcs ratio=0.1`` or ``ct views=23``."""
    config = op.config()
    keys = ("ratio", "block_size", "acceleration", "mask_type", "views", "angle_range", "factor")
    return " ".join([op.kind, *(f"{k}={config[k]}" for k in keys if config.get(k) is not None)])
