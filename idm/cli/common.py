"""Argument groups and helpers shared by the ``idm`` subcommands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import IDMError, check_ratio
from ..io.atomic import atomic_write
from ..registry import METHODS, MethodInfo

#: defaults of ``--block-size`` and ``--matrix-seed`` (those of :class:`idm.physics.BlockCS` and training)
DEFAULT_BLOCK_SIZE = 32
DEFAULT_MATRIX_SEED = 0


def add_measurement_args(parser: argparse.ArgumentParser, *, ratio_required: bool = False) -> None:
    group = parser.add_argument_group("measurement (scrambled block compressed sensing)")
    group.add_argument("--ratio", type=float, required=ratio_required, help="sampling ratio in (0, 1]")
    group.add_argument("--block-size", type=int, help=f"block size B (default {DEFAULT_BLOCK_SIZE})")
    group.add_argument("--matrix-seed", type=int,
                       help=f"seed of the sampling matrix Φ (default {DEFAULT_MATRIX_SEED}; a learned method's "
                            "checkpoint must have been trained with the same)")
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
    """The checked ``--ratio`` of simulated measurements; fills in the defaults of ``--block-size``
    and ``--matrix-seed`` (left None by the parser so that :func:`check_file_settings` can tell
    whether they were given)."""
    if args.ratio is None:
        raise IDMError("--ratio is required to simulate measurements")
    if args.block_size is None:
        args.block_size = DEFAULT_BLOCK_SIZE
    if args.matrix_seed is None:
        args.matrix_seed = DEFAULT_MATRIX_SEED
    if args.block_size < 1:
        raise IDMError(f"block size must be >= 1, got {args.block_size}")
    return check_ratio(args.ratio)


def check_file_settings(args: argparse.Namespace, path: str | Path, config: dict) -> None:
    """:class:`IDMError` if ``--ratio``, ``--block-size`` or ``--matrix-seed`` was given and differs
    from the operator ``config`` stored in the measurement file ``path`` (the file decides; a
    contradicting option would otherwise be ignored silently)."""
    for option, key in (("--ratio", "ratio"), ("--block-size", "block_size"), ("--matrix-seed", "matrix_seed")):
        given = getattr(args, key)
        if given is None:
            continue
        stored = config.get(key)
        same = stored is not None and (abs(float(given) - float(stored)) <= 1e-6 if key == "ratio" else given == stored)
        if not same:
            raise IDMError(f"{option} {given} contradicts the measurement file {path}, which was measured with "
                           f"{key.replace('_', ' ')} {stored}; drop {option} (the file decides)")


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
