"""Turning the prior's U-Net into the IDM network's noise estimator.

* **No timestep.** :func:`idm.invertible.convert_unet` freezes the time embedding to that of one
  constant timestep (a buffer; the time-embedding MLP is not part of the network). IDM uses the
  prior timestep whose ᾱ is closest to the ᾱ of the middle sampling step at initialisation
  (:func:`constant_timestep`); per-step parameters live in the injectors.
* **Pixel unshuffle** (``u = 2``, :func:`adapt_unet`): the U-Net sees ``pixel_unshuffle(x, u)``
  with ``C·u²`` channels at half resolution and its output is pixel-shuffled back. The input conv
  gets weights ``W'[:, c·u² + k] = W[:, c] / u²`` (it sees the mean of the ``u²`` sub-images, a 2×
  box-downsampled image) and the output conv ``W'[c·u² + k] = W[c]``, ``b'[c·u² + k] = b[c]``
  (every sub-pixel gets the prior's estimate: a nearest-upsampled ε). ``u = 1`` keeps the prior's
  convs as they are.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import nn

from ..priors.schedule import NoiseSchedule
from ..priors.unet import UNet


@torch.no_grad()
def adapt_unet(prior_unet: UNet, unshuffle: int) -> UNet:
    """A copy of ``prior_unet`` with in/out convs for ``unshuffle`` (the prior is not modified)."""
    unet = copy.deepcopy(prior_unet)
    u2 = unshuffle**2
    if u2 == 1:
        return unet
    cfg = unet.config
    unet.config = replace(cfg, in_channels=cfg.in_channels * u2, out_channels=cfg.out_channels * u2)
    old_in, old_out = unet.input_conv, unet.out[-1]
    new_in = nn.Conv2d(old_in.in_channels * u2, old_in.out_channels, 3, padding=1)
    new_in.weight.copy_(old_in.weight.repeat_interleave(u2, dim=1) / u2)
    new_in.bias.copy_(old_in.bias)
    new_out = nn.Conv2d(old_out.in_channels, old_out.out_channels * u2, 3, padding=1)
    new_out.weight.copy_(old_out.weight.repeat_interleave(u2, dim=0))
    new_out.bias.copy_(old_out.bias.repeat_interleave(u2, dim=0))
    unet.input_conv = new_in.to(old_in.weight)
    unet.out[-1] = new_out.to(old_out.weight)
    return unet


def initial_abar(steps: int, schedule_init: str, alpha_init: float, schedule: NoiseSchedule) -> torch.Tensor:
    """ᾱ_1…ᾱ_T (T,) float64 at initialisation (decreasing: step T is the noisiest).

    ``"paper"``: ᾱ_t = alpha_init^t. ``"prior"``: the prior's ᾱ at its DDIM-respaced timesteps
    ``schedule.respaced(T)`` (ascending, so ᾱ_1 belongs to the smallest timestep).
    """
    if schedule_init == "paper":
        return torch.full((steps,), float(alpha_init), dtype=torch.float64).cumprod(0)
    timesteps = schedule.respaced(steps)
    if len(timesteps) != steps:
        raise ValueError(f"the prior's schedule cannot be respaced to {steps} distinct steps")
    return schedule.alphas_cumprod[timesteps].clone()


def alpha_from_abar(abar: torch.Tensor) -> torch.Tensor:
    """α (T,) with ``cumprod(α) = abar``."""
    previous = torch.cat([abar.new_ones(1), abar[:-1]])
    return abar / previous


def constant_timestep(schedule: NoiseSchedule, abar: torch.Tensor) -> int:
    """The prior timestep whose ᾱ is closest to the middle step's ᾱ (``abar`` (T,) ascending in t)."""
    middle = float(abar[len(abar) // 2])
    return int((schedule.alphas_cumprod - middle).abs().argmin())
