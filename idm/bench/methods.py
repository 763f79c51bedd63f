"""Choosing and building the methods compared by ``idm bench quality`` and ``idm bench speed``.

Command-line arguments shared by both benchmarks (:func:`add_method_arguments`):

* ``--methods``: default, the registered ones among :data:`DEFAULT_METHODS`;
* ``--prior DIR``: the prior checkpoint of the zero-shot methods (``ddnm``, ``ddnm+``, ``dps``);
* ``--checkpoint METHOD=DIR`` (repeatable): a checkpoint for one method;
* ``--option METHOD.KEY=VALUE`` (repeatable): a factory option, e.g. ``ddnm.steps=20``
  (VALUE is read as an int, a float, ``true``/``false`` or else a string).

A method that needs a checkpoint and cannot be built (e.g. its shipped checkpoint is missing) is
skipped with a printed note when it came from the default list; named explicitly (in ``--methods``,
or given a checkpoint) it is an error.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Any

from ..errors import IDMError
from ..registry import METHODS, Reconstruct

#: methods compared by default (those registered in this installation)
DEFAULT_METHODS: tuple[str, ...] = ("pinv", "tv", "unrolled", "ddnm", "dps", "idm")
#: methods compared by default on MRI (``idm bench quality --operator mri``; pinv = zero-filled)
MRI_METHODS: tuple[str, ...] = ("pinv", "tv", "ddnm", "diffuserecon", "mcddpm", "idm")


@dataclass(frozen=True)
class MethodChoice:
    """A method to run: its registry ``name``, ``checkpoint`` (None: the method's default),
    factory ``options`` and whether the user asked for it ``explicit``-ly."""

    name: str
    checkpoint: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    explicit: bool = False


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", nargs="+", metavar="METHOD",
                        help=f"methods to compare (default: the registered ones among {' '.join(DEFAULT_METHODS)})")
    parser.add_argument("--prior", metavar="DIR",
                        help="prior of the methods that take one (ddnm, ddnm+, dps): a prior checkpoint, a local diffusers "
                             "folder or hf:ID; default: theirs")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="METHOD=DIR",
                        help="checkpoint of one method, e.g. idm=checkpoints/idm-multi (repeatable)")
    parser.add_argument("--option", action="append", default=[], metavar="METHOD.KEY=VALUE",
                        help="option of one method's factory, e.g. ddnm.steps=20 (repeatable)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of operators, noise and samplers (default 0)")


def parse_value(text: str) -> Any:
    """``"20"`` → 20, ``"0.5"`` → 0.5, ``"true"``/``"false"`` → bool, anything else stays a string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _split(text: str, separator: str, what: str) -> tuple[str, str]:
    head, sep, tail = text.partition(separator)
    if not sep or not head or not tail:
        raise IDMError(f"malformed {what} {text!r}")
    return head, tail


def choose_methods(args: argparse.Namespace, defaults: tuple[str, ...] = DEFAULT_METHODS) -> list[MethodChoice]:
    """The methods selected by the arguments of :func:`add_method_arguments`, in order (without
    ``--methods``: the registered ones among ``defaults``)."""
    explicit = list(dict.fromkeys(args.methods or []))
    names = explicit or [name for name in defaults if name in METHODS.names()]
    for name in names:
        METHODS.get(name)  # unknown method → IDMError listing the available ones
    checkpoints: dict[str, str] = {}
    if args.prior is not None:
        checkpoints.update({name: args.prior for name in names if METHODS.get(name).checkpoint_kind == "prior"})
    for item in args.checkpoint:
        name, path = _split(item, "=", "--checkpoint (expected METHOD=DIR)")
        if name not in names:
            raise IDMError(f"--checkpoint {item}: method {name!r} is not among the compared ones ({', '.join(names)})")
        checkpoints[name] = path
    options: dict[str, dict[str, Any]] = {name: {} for name in names}
    for item in args.option:
        target, value = _split(item, "=", "--option (expected METHOD.KEY=VALUE)")
        name, key = target.rsplit(".", 1) if "." in target else ("", target)
        if name not in names or not key:
            raise IDMError(f"--option {item}: expected METHOD.KEY=VALUE with METHOD among {', '.join(names)}")
        options[name][key] = parse_value(value)
    return [
        MethodChoice(name, checkpoints.get(name), options[name], explicit=name in explicit or name in checkpoints)
        for name in names
    ]


def skippable(choice: MethodChoice) -> bool:
    """Whether a failure to build ``choice`` skips it (a default method needing a checkpoint, no options)."""
    return not choice.explicit and not choice.options and METHODS.get(choice.name).needs_checkpoint


def build_method(choice: MethodChoice, *, device: str, seed: int, ratio: float | None,
                 progress: bool = False) -> Reconstruct | None:
    """Build ``choice`` (``reconstruct(y, op)``; ``progress``: its own progress bar), or None — with a
    note on stdout — when its checkpoint is unavailable and it was not asked for explicitly (see the
    module docstring)."""
    try:
        return METHODS.get(choice.name).build(
            checkpoint=choice.checkpoint, device=device, seed=seed, ratio=ratio, progress=progress, **choice.options
        )
    except IDMError as error:
        if not skippable(choice):
            raise
        where = "" if ratio is None else f" at ratio {ratio:g}"
        print(f"note: skipping {choice.name}{where}: {error}", file=sys.stdout)
        return None
