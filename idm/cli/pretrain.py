"""``idm pretrain``: pre-train the diffusion prior (same options as ``python -m train.pretrain_prior``)."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from train.common import add_script_subcommand

    return add_script_subcommand(subparsers, "pretrain", "train.pretrain_prior",
                                 help_text="pre-train the diffusion prior on image patches (or --evaluate a prior)")
