"""``idm finetune``: fine-tune the IDM network end to end (:mod:`idm.training.finetune`; same
options as ``python -m train.finetune``)."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction, help_text: str) -> argparse.ArgumentParser:
    from ..training.common import add_script_subcommand

    return add_script_subcommand(
        subparsers, "finetune", "idm.training.finetune",
        help_text=help_text,
    )
