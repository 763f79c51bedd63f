"""The ``idm`` command.

Each subcommand lives in its own module of this package that defines
``add_parser(subparsers) -> argparse.ArgumentParser`` and ``run(args) -> int``.
User errors (:class:`idm.errors.IDMError`, missing files) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import IDMError

#: subcommand name → module defining ``add_parser``
SUBCOMMANDS: dict[str, str] = {
    "demo": "idm.cli.demo",
    "measure": "idm.cli.measure",
    "reconstruct": "idm.cli.reconstruct",
    "eval": "idm.cli.evaluate",
    "pretrain": "idm.cli.pretrain",
    "finetune": "idm.cli.finetune",
    "sample": "idm.cli.sample",
    "bench": "idm.cli.bench",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="idm", description=__doc__.splitlines()[0] if __doc__ else None)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in SUBCOMMANDS.values():
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except IDMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"error: file not found: {exc.filename or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
