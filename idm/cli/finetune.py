"""``idm finetune``: fine-tune the IDM network end to end (same options as ``python -m train.finetune``)."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from train.common import add_script_subcommand

    return add_script_subcommand(
        subparsers, "finetune", "train.finetune",
        help_text="fine-tune the IDM network for block CS at one ratio, from a prior or another IDM checkpoint",
    )
