"""``idm reconstruct``: decode a measurement file, or simulate measuring an image and decode it."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..data import load_image, save_image
from ..errors import IDMError
from ..io.measurement import build_operator, load_measurement
from ..metrics import psnr, ssim_skimage
from ..physics import BlockCS
from ..registry import METHODS
from .common import (add_measurement_args, add_method_args, check_file_settings, checked_ratio, method_checkpoint,
                     output_paths)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "reconstruct", help="reconstruct from a measurement file (or from an image, simulating --ratio)"
    )
    parser.add_argument("input", nargs="?", help="measurement file from `idm measure`, or an image with --ratio")
    parser.add_argument("-o", "--output", help="output PNG (or folder, for several images)")
    add_method_args(parser)
    add_measurement_args(parser)
    parser.add_argument("--list-methods", action="store_true", help="list the available methods and exit")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.list_methods:
        for name in METHODS.names():
            print(f"{name:10s} {METHODS.get(name).description}")
        return 0
    if not args.input or not args.output:
        raise IDMError("give an input (measurement file or image) and -o OUTPUT")
    method = METHODS.get(args.method)  # fail on an unknown method before any work
    checkpoint = method_checkpoint(args, method)
    truth = None
    if Path(args.input).suffix.lower() == ".safetensors":
        meas = load_measurement(args.input)
        check_file_settings(args, args.input, meas.operator_config)
        op = build_operator(meas)
        y, names = meas.y, meas.names or [Path(args.input).stem]
    else:
        ratio = checked_ratio(args)
        truth = load_image(args.input).unsqueeze(0)
        op = BlockCS(tuple(truth.shape[2:]), ratio, block_size=args.block_size, seed=args.seed,
                     matrix_seed=args.matrix_seed, noise_sigma=args.noise)
        y = op.measure(truth, generator=torch.Generator().manual_seed(args.seed))
        names = [args.input]
    paths = output_paths(args.output, names)
    ratio = op.config().get("ratio")
    reconstruct = method.build(checkpoint=checkpoint, device=args.device, seed=args.seed, ratio=ratio)
    start = time.perf_counter()
    with torch.no_grad():
        x = op.crop(reconstruct(y.to(args.device), op)).clamp(0, 1).cpu()
    seconds = time.perf_counter() - start
    for image, path in zip(x, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(path, image)
    report = f"{args.method}: {len(paths)} image(s) in {seconds:.2f} s → {paths[0] if len(paths) == 1 else Path(args.output)}"
    if truth is not None:
        report += f" (PSNR {float(psnr(x, truth)[0]):.2f} dB, SSIM {float(ssim_skimage(x, truth)[0]):.4f})"
    print(report)
    return 0
