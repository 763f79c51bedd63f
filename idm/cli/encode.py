"""``idm encode``: a volume → its HA-GAN latent (``E^G(E^H tiles)``) → the volume generated from it, with the
reconstruction PSNR (:mod:`idm.generative.hagan`)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ..errors import IDMError


def add_parser(subparsers: argparse._SubParsersAction, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("encode", help=help_text, description=__doc__)
    parser.add_argument("volume", help="a volume: NIfTI / DICOM / ... with its spacing (resampled to the checkpoint's "
                        "spacing, normalised and centre-cropped / padded), or a prepared (D, H, W) .npy on [0, 1] "
                        "of the checkpoint's shape")
    parser.add_argument("--checkpoint", default="hagan-ct", help="HA-GAN checkpoint folder or shipped name (default hagan-ct)")
    parser.add_argument("-o", "--output",
                        help="output folder: latent.npy, input.nii.gz, reconstruction.nii.gz, encode.png "
                        "(default: none, only the PSNR is printed)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.set_defaults(func=run)
    return parser


def prepared_input(path: str | Path, config: object) -> torch.Tensor:
    """The volume at ``path`` as the checkpoint sees it: ``(D, H, W)`` on [0, 1] of its shape."""
    from ..generative.hagan import prepare_volume
    from ..io.medical import read_volume

    modality = getattr(config, "modality")
    image = read_volume(path, modality="CT" if modality.upper() == "CT" else None)
    data = image.data
    if data.is_complex() or data.ndim != 3:
        raise IDMError(f"{path} is not a real 3-D volume: shape {tuple(data.shape)}")
    if not bool(torch.isfinite(data).all()):
        raise IDMError(f"{path} holds NaN or infinite values")
    shape = tuple(getattr(config, "shape"))
    if tuple(data.shape) == shape and float(data.min()) >= 0 and float(data.max()) <= 1:
        return data.float()
    if image.spacing is None:
        raise IDMError(f"{path} stores no voxel spacing and is not a prepared {shape} volume on [0, 1]; "
                       "give a NIfTI / DICOM volume or a prepared .npy")
    return prepare_volume(data, image.spacing, getattr(config, "spacing"), shape, modality)


def run(args: argparse.Namespace) -> int:
    from ..generative.hagan import psnr
    from ..io.atomic import atomic_write
    from ..training.hagan import load_hagan
    from .generate import write_midplanes, write_volume

    out = None if args.output is None else Path(args.output)
    if out is not None and out.exists() and not out.is_dir():
        raise IDMError(f"output {out} exists and is not a folder")
    model = load_hagan(args.checkpoint, device=args.device)
    volume = prepared_input(args.volume, model.config)
    z, recon = model.reconstruct(volume[None, None].to(args.device))
    recon = recon[0, 0].cpu()
    value = psnr(recon, volume)
    if out is None:
        print(f"latent ({z.shape[1]}): mean {float(z.mean()):.3f}, std {float(z.std()):.3f}; reconstruction PSNR "
              f"{value:.2f} dB on [0, 1] (nothing written; -o DIR writes the latent, volumes and a figure)")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "latent.npy") as handle:
        np.save(handle, z.cpu().numpy().astype(np.float32))
    write_volume(out / "input.nii.gz", volume, model.config)
    write_volume(out / "reconstruction.nii.gz", recon, model.config)
    write_midplanes(out / "encode.png", [("input", volume), (f"reconstruction ({value:.2f} dB)", recon)])
    print(f"latent ({z.shape[1]}) and reconstruction written to {out}; PSNR {value:.2f} dB on [0, 1]")
    return 0
