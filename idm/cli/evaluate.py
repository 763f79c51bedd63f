"""``idm eval``: PSNR/SSIM/seconds of a method on an image folder, as a table and JSON."""

from __future__ import annotations

import argparse

from ..bench.methods import parse_value
from ..data import ImageFolder
from ..errors import IDMError
from ..evaluation import blockcs_factory, evaluate
from ..registry import METHODS
from .common import add_measurement_args, add_method_args, checked_ratio, method_checkpoint, write_json


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("eval", help="evaluate a method on a folder of images")
    parser.add_argument("--data", required=True, help="folder of images (png, jpg, tif, bmp)")
    parser.add_argument("--limit", type=int, help="only the first N images (sorted by name)")
    parser.add_argument("--json", help="write the results as JSON to this file")
    add_method_args(parser)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="option of the method's factory, e.g. iterations=20 (repeatable; VALUE is read as "
                             "an int, a float, true/false or else a string)")
    add_measurement_args(parser, ratio_required=True)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    ratio = checked_ratio(args)
    checkpoint = method_checkpoint(args, METHODS.get(args.method))
    options = method_options(args.option)
    folder = ImageFolder(args.data, limit=args.limit)
    result = evaluate(
        args.method,
        (folder[i] for i in range(len(folder))),
        blockcs_factory(ratio, seed=args.seed, block_size=args.block_size, matrix_seed=args.matrix_seed,
                        noise_sigma=args.noise),
        ratio=ratio,
        checkpoint=checkpoint,
        device=args.device,
        seed=args.seed,
        progress=True,
        total=len(folder),
        options=options,
    )
    settings = "".join(f", {key}={value!r}" for key, value in options.items())
    print(f"method {args.method}{settings}, ratio {ratio:g}, {len(folder)} images from {args.data}")
    print(result.table())
    if args.json:
        write_json(args.json, result.to_json())
    return 0


def method_options(items: list[str]) -> dict:
    """``["KEY=VALUE", ...]`` → ``{KEY: parsed VALUE}`` (see :func:`idm.bench.methods.parse_value`)."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise IDMError(f"malformed --option {item!r} (expected KEY=VALUE)")
        options[key.strip()] = parse_value(value)
    return options
