"""``idm sample``: draw images from a diffusion prior checkpoint and write them as one PNG grid."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from ..errors import IDMError


def add_parser(subparsers: argparse._SubParsersAction, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("sample", help=help_text)
    parser.add_argument("--checkpoint", default="prior-gray",
                        help="prior checkpoint folder or shipped name (default prior-gray), "
                             "a diffusers UNet2DModel folder or hf:ORG/NAME")
    parser.add_argument("--n", type=int, default=16, help="number of samples (default 16)")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    parser.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim", help="sampler (default ddim)")
    parser.add_argument("--eta", type=float, help="DDIM/DDPM noise scale (default: 0 for ddim, 1 for ddpm)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("-o", "--output", required=True, help="PNG file to write")
    parser.set_defaults(func=run)
    return parser


def write_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, padding: int = 2) -> Path:
    """Write gray images ``(B, 1, H, W)`` in [0, 1] as one grid image (atomic; ``nrow`` default ≈ √B)."""
    from torchvision.utils import make_grid

    from ..data import save_image

    if images.ndim != 4 or images.shape[1] != 1:
        raise IDMError(f"grid expects gray images (B, 1, H, W), got {tuple(images.shape)}")
    nrow = nrow or math.ceil(math.sqrt(images.shape[0]))
    grid = make_grid(images.detach().float().cpu().clamp(0, 1), nrow=nrow, padding=padding, pad_value=1.0)
    return save_image(path, grid[:1])


def run(args: argparse.Namespace) -> int:
    from ..priors import load_prior

    if args.n < 1:
        raise IDMError(f"--n must be >= 1, got {args.n}")
    if args.size < 1:
        raise IDMError(f"--size must be >= 1, got {args.size}")
    if Path(args.output).suffix.lower() != ".png":
        raise IDMError(f"output must be a .png file, got {args.output}")
    prior = load_prior(args.checkpoint, device=args.device)
    images = prior.sample(args.n, args.size, steps=args.steps, sampler=args.sampler, eta=args.eta,
                          seed=args.seed, progress=not args.no_progress)
    write_grid(images, args.output)
    print(f"{args.n} sample(s) of {args.size}x{args.size} ({args.sampler}, {args.steps} steps) written to {args.output}")
    return 0
