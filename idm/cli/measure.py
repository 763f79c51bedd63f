"""``idm measure``: compress images into a measurement file that alone suffices to decode them."""

from __future__ import annotations

import argparse

import torch

from ..data import load_image
from ..errors import IDMError
from ..io.measurement import save_measurement
from ..physics import BlockCS
from .common import add_measurement_args, checked_ratio


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("measure", help="measure images with scrambled block CS into a file")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="images of one size (gray or RGB → Y)")
    add_measurement_args(parser, ratio_required=True)
    parser.add_argument("-o", "--output", required=True, help="measurement file to write (.safetensors)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    ratio = checked_ratio(args)
    images = [load_image(path) for path in args.images]
    sizes = {tuple(x.shape[1:]) for x in images}
    if len(sizes) > 1:
        raise IDMError(f"images differ in size ({', '.join(f'{h}x{w}' for h, w in sorted(sizes))}); measure each size into its own file")
    x = torch.stack(images)
    op = BlockCS(tuple(x.shape[2:]), ratio, block_size=args.block_size, seed=args.seed, matrix_seed=args.matrix_seed,
                 noise_sigma=args.noise)
    y = op.measure(x, generator=torch.Generator().manual_seed(args.seed))
    save_measurement(args.output, y, op, names=list(args.images))
    print(f"{len(images)} image(s) of {x.shape[2]}x{x.shape[3]} → {tuple(y.shape)} measurements "
          f"(ratio {ratio:g}) written to {args.output}")
    return 0
