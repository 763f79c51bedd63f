"""``idm measure``: compress images into a measurement file that alone suffices to decode them.

``--operator`` picks the forward operator (default blockcs; inpainting, superres, mri, ct) with its
own options (see ``idm measure --help``). MRI measurements are complex k-space ``(B, Ncoil, H, W)``,
stored as complex64 in the safetensors file (safetensors holds complex dtypes natively); explicit
masks and coil sensitivities are stored with them. CT measurements are sinograms ``(B, 1, views,
detectors)``.
"""

from __future__ import annotations

import argparse

import torch

from ..errors import IDMError
from ..io.measurement import save_measurement
from .common import add_measurement_args, load_truth, operator_factory_from_args


def add_parser(subparsers: argparse._SubParsersAction, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("measure", help=help_text)
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="images of one size (gray or RGB → Y; for mri / ct also a 2-D .npy, complex for mri)")
    add_measurement_args(parser)
    parser.add_argument("-o", "--output", required=True, help="measurement file to write (.safetensors)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    kind, factory = operator_factory_from_args(args)
    images = [load_truth(path, kind) for path in args.images]
    sizes = {tuple(x.shape[1:]) for x in images}
    if len(sizes) > 1:
        raise IDMError(f"images differ in size ({', '.join(f'{h}x{w}' for h, w in sorted(sizes))}); measure each size into its own file")
    if len({x.dtype for x in images}) > 1:
        images = [x.to(torch.complex64) for x in images]
    x = torch.stack(images)
    op = factory(tuple(x.shape[2:]), 0)
    y = op.measure(x, generator=torch.Generator().manual_seed(args.seed))
    save_measurement(args.output, y, op, names=list(args.images))
    ratio = op.config().get("ratio")
    setting = f"ratio {ratio:g}" if kind == "blockcs" else describe_operator(op)
    print(f"{len(images)} image(s) of {x.shape[2]}x{x.shape[3]} → {tuple(y.shape)} measurements "
          f"({setting}) written to {args.output}")
    return 0


def describe_operator(op) -> str:
    """A short description of a non-block-CS operator for the report line."""
    config = op.config()
    kind = config["kind"]
    if kind == "mri":
        mask = op.mask
        sampled = f"{float(mask.float().mean()):.3f} of k-space"
        return f"mri, {op.coils} coil(s), {sampled}"
    if kind == "ct":
        return f"ct, {op.n_views} views over {op.angle_range[0]:g}–{op.angle_range[1]:g}°, {op.detectors} detectors"
    settings = ", ".join(f"{key} {value}" for key, value in config.items() if key not in ("kind", "image_size"))
    return f"{kind}, {settings}"
