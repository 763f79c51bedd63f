"""``idm pretrain``: pre-train the diffusion prior (:mod:`idm.training.pretrain`; same options
as ``python -m train.pretrain_prior``)."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction, help_text: str) -> argparse.ArgumentParser:
    from ..training.common import add_script_subcommand

    return add_script_subcommand(subparsers, "pretrain", "idm.training.pretrain", help_text=help_text)
