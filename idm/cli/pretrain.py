"""``idm pretrain``: pre-train the diffusion prior (same options as ``python -m train.pretrain_prior``)."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from train.pretrain_prior import __doc__ as doc, add_arguments

    parser = subparsers.add_parser(
        "pretrain",
        help="pre-train the diffusion prior on image patches (or --evaluate a prior)",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from train.pretrain_prior import run as run_pretraining

    return run_pretraining(args)
