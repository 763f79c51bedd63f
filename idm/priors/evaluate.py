"""One-step denoising quality of a prior (a quick, deterministic check for model cards).

Noise level mapping: Gaussian noise of standard deviation ``sigma / 255`` on an image on [0, 1]
becomes ``s = 2 sigma / 255`` on the prior's range [-1, 1], i.e. ``y = x + s z``. The diffusion
state ``x_t = sqrt(abar_t) (x + sqrt((1 - abar_t) / abar_t) z)`` has the same form, so we pick the
timestep ``t`` whose noise-to-signal ratio ``sqrt((1 - abar_t) / abar_t)`` is closest to ``s``,
feed ``x_t = sqrt(abar_t) y`` to the network and report the PSNR (peak 1, images on [0, 1]) of the
clamped one-step estimate x̂₀ against the clean image, averaged over images, next to the PSNR of the
noisy input.
"""

from __future__ import annotations

from typing import Iterable

import piq
import torch

from ..errors import IDMError
from ..physics.canvas import Canvas
from .prior import PriorLike
from .schedule import from_model_range, to_model_range


def _as_batch(image: torch.Tensor, channels: int) -> torch.Tensor:
    x = image if image.ndim == 4 else image.unsqueeze(0)
    if x.ndim != 4 or x.shape[1] != channels:
        raise IDMError(f"denoising evaluation expects images (C={channels}, H, W), got {tuple(image.shape)}")
    return x.float()


@torch.no_grad()
def evaluate_denoising(
    prior: PriorLike, images: Iterable[torch.Tensor], sigmas: Iterable[float] = (15, 25, 50), *, seed: int = 0
) -> dict[str, dict[str, float]]:
    """One-step x̂₀ denoising PSNR of ``prior`` on ``images`` ((C, H, W) or (1, C, H, W), [0, 1]).

    Images of any size are reflect-padded to the U-Net's size multiple and cropped back.
    Returns ``{"sigma15": {"t": t, "psnr": dB, "input_psnr": dB, "images": n}, ...}``.
    """
    sigmas = [float(s) for s in sigmas]
    images = [_as_batch(im, prior.channels) for im in images]
    if not images:
        raise IDMError("denoising evaluation needs at least one image")
    device, m = prior.device, prior.size_multiple
    was_training = prior.module.training
    prior.module.eval()
    results: dict[str, dict[str, float]] = {}
    try:
        for sigma in sigmas:
            s = 2.0 * sigma / 255.0
            t = prior.schedule.timestep_for_noise(s)
            gen = torch.Generator().manual_seed(seed)
            out_psnr, in_psnr = [], []
            for x in images:
                noisy = to_model_range(x) + s * torch.randn(x.shape, generator=gen)
                canvas = Canvas.to_multiple(x.shape[-2:], m)
                abar = float(prior.schedule.alphas_cumprod[t])
                x_t = (abar**0.5 * canvas.pad(noisy, mode="reflect")).to(device)
                t_batch = torch.full((1,), t, device=device, dtype=torch.long)
                x0 = canvas.crop(prior.schedule.predict_x0(x_t, t_batch, prior(x_t, t_batch)).cpu())
                out_psnr.append(float(piq.psnr(from_model_range(x0).clamp(0, 1), x.clamp(0, 1))))
                in_psnr.append(float(piq.psnr(from_model_range(noisy).clamp(0, 1), x.clamp(0, 1))))
            results[f"sigma{sigma:g}"] = {
                "t": t,
                "psnr": sum(out_psnr) / len(out_psnr),
                "input_psnr": sum(in_psnr) / len(in_psnr),
                "images": len(images),
            }
    finally:
        prior.module.train(was_training)
    return results
