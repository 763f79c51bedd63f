"""Argument groups and helpers shared by the ``idm`` subcommands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import IDMError, check_ratio
from ..io.atomic import atomic_write
from ..registry import METHODS, MethodInfo


def add_measurement_args(parser: argparse.ArgumentParser, *, ratio_required: bool = False) -> None:
    group = parser.add_argument_group("measurement (scrambled block compressed sensing)")
    group.add_argument("--ratio", type=float, required=ratio_required, help="sampling ratio in (0, 1]")
    group.add_argument("--block-size", type=int, default=32, help="block size B (default 32)")
    group.add_argument("--seed", type=int, default=0, help="seed of the pixel permutation and noise (default 0)")
    group.add_argument("--noise", type=float, default=0.0, metavar="SIGMA",
                       help="std of additive Gaussian measurement noise, on the [0, 1] image scale")


def add_method_args(parser: argparse.ArgumentParser, default: str | None = "tv") -> None:
    parser.add_argument("--method", default=default, help=f"reconstruction method (default {default}); see --list-methods")
    parser.add_argument("--checkpoint", help="checkpoint folder or shipped name, for learned methods")
    parser.add_argument("--prior", metavar="PATH",
                        help="diffusion prior of the zero-shot methods (ddnm, ddnm+, dps): a prior checkpoint "
                             "folder or name, a local diffusers UNet2DModel folder, or hf:ORG/NAME[/SUBFOLDER]")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")


def method_checkpoint(args: argparse.Namespace, method: MethodInfo) -> str | None:
    """The ``checkpoint`` to build ``method`` with, from ``--checkpoint`` or ``--prior`` (at most one;
    ``--prior`` only for methods whose checkpoint is a diffusion prior)."""
    if args.prior is None:
        return args.checkpoint
    if args.checkpoint is not None:
        raise IDMError("give either --prior or --checkpoint, not both")
    if method.checkpoint_kind != "prior":
        users = ", ".join(name for name in METHODS.names() if METHODS.get(name).checkpoint_kind == "prior")
        takes = "no checkpoint" if method.checkpoint_kind is None else "--checkpoint"
        raise IDMError(f"--prior is for the methods built on a diffusion prior ({users}); method {method.name!r} takes {takes}")
    return args.prior


def checked_ratio(args: argparse.Namespace) -> float:
    if args.ratio is None:
        raise IDMError("--ratio is required to simulate measurements")
    if args.block_size < 1:
        raise IDMError(f"block size must be >= 1, got {args.block_size}")
    return check_ratio(args.ratio)


def write_json(path: str | Path, payload: dict) -> None:
    with atomic_write(path, mode="w") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")


def output_paths(output: str, names: list[str]) -> list[Path]:
    """One PNG path per image: ``output`` itself for one image, else ``output/<name>.png``."""
    out = Path(output)
    if len(names) == 1 and out.suffix:
        return [out]
    if out.suffix:
        raise IDMError(f"{len(names)} images to write: give an output folder, not the file {out}")
    return [out / f"{Path(name).stem}.png" for name in names]
