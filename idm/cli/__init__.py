"""The ``idm`` command.

Each subcommand lives in its own module of this package that defines
``add_parser(subparsers, help_text) -> argparse.ArgumentParser`` and ``run(args) -> int``.
User errors (:class:`idm.errors.IDMError`, missing files) print one line and exit with status 2.

Only the module of the subcommand being run is imported: ``idm --help`` lists the subcommands from
:data:`SUBCOMMANDS` without importing torch, and no subcommand imports matplotlib, accelerate or
:mod:`idm.training` before it runs (``idm finetune`` / ``idm pretrain`` excepted: their options are
the training code's).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import IDMError
from ..runtime import keep_freed_memory

#: subcommand name → (module defining ``add_parser``, the one-line help ``idm --help`` shows; the
#: one source of that text, handed to the module's ``add_parser``)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("idm.cli.demo", "reconstruct the built-in sample images (the main job; --medical: knee MRI, CT, raw brain k-space)"),
    "measure": ("idm.cli.measure", "measure images (block CS, inpainting, superres, MRI, CT) into a file"),
    "reconstruct": ("idm.cli.reconstruct", "reconstruct from a measurement file, raw k-space / sinogram, or an image (simulating the operator)"),
    "eval": ("idm.cli.evaluate", "evaluate a method on a folder of images"),
    "pretrain": ("idm.cli.pretrain", "pre-train the diffusion prior on image patches (or --evaluate a prior)"),
    "finetune": ("idm.cli.finetune",
                 "fine-tune the IDM network for block CS at one ratio or a ratio range, from a prior or a checkpoint"),
    "translate": ("idm.cli.translate", "translate a 2-D image into another modality (T1 → T2) with an LMI-guided diffusion prior"),
    "anomaly": ("idm.cli.anomaly", "map where a brain scan departs from its classifier-guided healthy reconstruction"),
    "register": ("idm.cli.register", "register a moving 2-D image to a fixed one (DiffuseMorph), with the continuous deformation"),
    "sample": ("idm.cli.sample", "draw samples from a diffusion prior into a PNG grid"),
    "generate": ("idm.cli.generate", "generate whole 3-D volumes from an HA-GAN checkpoint (NIfTI + mid-plane figures)"),
    "encode": ("idm.cli.encode", "encode a volume into its HA-GAN latent and reconstruct it (PSNR)"),
    "bench": ("idm.cli.bench", "run a benchmark (memory, ...)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``idm`` parser with every subcommand; only ``command`` (a key of :data:`SUBCOMMANDS`, or
    None: none) gets its options, by importing its module. The others are placeholders that carry
    their help text, enough for ``idm --help`` and for the list of choices in usage errors."""
    parser = argparse.ArgumentParser(prog="idm", description=__doc__.splitlines()[0] if __doc__ else None)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        if name == command:
            importlib.import_module(module_name).add_parser(subparsers, help_text)
        else:
            subparsers.add_parser(name, help=help_text)
    return parser


def _command(argv: list[str]) -> str | None:
    """The subcommand named by ``argv`` (the first argument that is not an option; ``idm`` itself
    has no options but ``-h``), if it is one."""
    first = next((arg for arg in argv if not arg.startswith("-")), None)
    return first if first in SUBCOMMANDS else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command(argv))
    args = parser.parse_args(argv)
    keep_freed_memory()
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
