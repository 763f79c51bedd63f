"""Turning the prior's U-Net into the IDM network's noise estimator.

* **No timestep.** :func:`idm.invertible.convert_unet` freezes the time embedding to that of one
  constant timestep (a buffer; the time-embedding MLP is not part of the network). IDM uses the
  prior timestep whose ᾱ is closest to the ᾱ of the middle sampling step at initialisation
  (:func:`constant_timestep`); per-step parameters live in the injectors.
* **Pixel unshuffle** (``u = 2``, :func:`adapt_unet`, :func:`adapt_diffusers_unet`): the U-Net sees
  ``pixel_unshuffle(x, u)`` with ``C·u²`` channels at half resolution and its output is
  pixel-shuffled back. A model with exactly ``C·u²`` channels (Stable Diffusion's 4 latent channels
  for a gray image) keeps its convs; otherwise the input conv gets weights ``W'[:, c·u² + k] = W[:, c] / u²``
  (it sees the mean of the ``u²`` sub-images, a 2× box-downsampled image) and the output conv
  ``W'[c·u² + k] = W[c]``, ``b'[c·u² + k] = b[c]`` (every sub-pixel gets the prior's estimate: a
  nearest-upsampled ε), see :func:`adapt_in_conv` / :func:`adapt_out_conv` (which also map a gray
  image onto an RGB model and drop learned-variance outputs). ``u = 1`` with ``C = M`` keeps the
  prior's convs as they are.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import torch
from torch import nn

from ..errors import IDMError
from ..priors.schedule import NoiseSchedule
from ..priors.unet import UNet


@torch.no_grad()
def adapt_in_conv(conv: nn.Conv2d, image_channels: int, unshuffle: int) -> nn.Conv2d:
    """The U-Net's input conv for ``C·u²`` input channels (``C = image_channels``, ``u = unshuffle``).

    Unchanged if it already has ``C·u²`` inputs (e.g. SD's 4 latent channels for a gray image and
    ``u = 2``: the four sub-images are the four channels). Otherwise the image channel ``c`` feeds
    what the model's channel ``c`` saw (``C == M``) or what all ``M`` model channels saw (a gray
    image for an ``M``-channel model: weights summed), and each of the ``u²`` sub-images gets
    ``1/u²`` of it: ``W'[:, c·u² + k] = W_c / u²`` (the conv sees a 2× box-downsampled image).
    """
    c, u2, m = int(image_channels), int(unshuffle) ** 2, conv.in_channels
    if m == c * u2:
        return conv
    if m == c:
        weight = conv.weight
    elif c == 1:
        weight = conv.weight.sum(dim=1, keepdim=True)
    else:
        raise IDMError(f"cannot adapt a U-Net with {m} input channels to {c}-channel images")
    new = nn.Conv2d(c * u2, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None)
    new = new.to(conv.weight)
    new.weight.copy_(weight.repeat_interleave(u2, dim=1) / u2)
    if conv.bias is not None:
        new.bias.copy_(conv.bias)
    return new


@torch.no_grad()
def adapt_out_conv(conv: nn.Conv2d, image_channels: int, unshuffle: int, model_channels: int) -> nn.Conv2d:
    """The U-Net's output conv for ``C·u²`` output channels (ε of each sub-image).

    Of a learned-variance output (``2·model_channels`` channels) only the first ``model_channels``
    (the ε part) are kept. Unchanged if that is ``C·u²``; otherwise image channel ``c`` gets the
    model's channel ``c`` (``C == M``) or the mean over the model's channels (gray image), and every
    sub-pixel the same estimate: ``W'[c·u² + k] = W_c``, ``b'[c·u² + k] = b_c`` (a nearest-upsampled ε).
    """
    c, u2, m = int(image_channels), int(unshuffle) ** 2, int(model_channels)
    if conv.out_channels not in (m, 2 * m):
        raise IDMError(f"U-Net output conv has {conv.out_channels} channels for {m} input channels")
    weight = conv.weight[:m]
    bias = None if conv.bias is None else conv.bias[:m]
    if m == c * u2:
        if conv.out_channels == m:
            return conv
        target_w, target_b = weight, bias
    elif m == c:
        target_w = weight.repeat_interleave(u2, dim=0)
        target_b = None if bias is None else bias.repeat_interleave(u2, dim=0)
    elif c == 1:
        target_w = weight.mean(dim=0, keepdim=True).repeat_interleave(u2, dim=0)
        target_b = None if bias is None else bias.mean(dim=0, keepdim=True).repeat_interleave(u2, dim=0)
    else:
        raise IDMError(f"cannot adapt a U-Net with {m} output channels to {c}-channel images")
    new = nn.Conv2d(conv.in_channels, c * u2, conv.kernel_size, conv.stride, conv.padding, bias=bias is not None)
    new = new.to(conv.weight)
    new.weight.copy_(target_w)
    if bias is not None:
        new.bias.copy_(target_b)
    return new


@torch.no_grad()
def adapt_unet(prior_unet: UNet, unshuffle: int) -> UNet:
    """A copy of ``prior_unet`` with in/out convs for ``unshuffle`` (the prior is not modified)."""
    unet = copy.deepcopy(prior_unet)
    u2 = unshuffle**2
    if u2 == 1:
        return unet
    cfg = unet.config
    unet.config = replace(cfg, in_channels=cfg.in_channels * u2, out_channels=cfg.out_channels * u2)
    unet.input_conv = adapt_in_conv(unet.input_conv, cfg.in_channels, unshuffle)
    unet.out[-1] = adapt_out_conv(unet.out[-1], cfg.out_channels, unshuffle, cfg.out_channels)
    return unet


@torch.no_grad()
def adapt_diffusers_unet(model: nn.Module, image_channels: int, unshuffle: int) -> nn.Module:
    """Replace ``model``'s ``conv_in``/``conv_out`` (in place) for ``image_channels·unshuffle²`` channels."""
    model_channels = model.conv_in.in_channels
    model.conv_in = adapt_in_conv(model.conv_in, image_channels, unshuffle)
    model.conv_out = adapt_out_conv(model.conv_out, image_channels, unshuffle, model_channels)
    return model


def initial_abar(steps: int, schedule_init: str, alpha_init: float, schedule: NoiseSchedule,
                 sigma_range: tuple[float, float] = (0.1, 0.01)) -> torch.Tensor:
    """ᾱ_1…ᾱ_T (T,) float64 at initialisation (decreasing: step T is the noisiest).

    ``"paper"``: ᾱ_t = alpha_init^t. ``"prior"``: the prior's ᾱ at its DDIM-respaced timesteps
    ``schedule.respaced(T)`` (ascending, so ᾱ_1 belongs to the smallest timestep). ``"sigma"``:
    image-scale noise std σ_t geometric from ``sigma_range[0]`` (step T) to ``sigma_range[1]``
    (step 1), ᾱ_t = 1 / (1 + 4σ_t²) (inverse of :func:`idm.priors.denoiser.image_sigma`).
    """
    if schedule_init == "paper":
        return torch.full((steps,), float(alpha_init), dtype=torch.float64).cumprod(0)
    if schedule_init == "sigma":
        high, low = (float(s) for s in sigma_range)
        sigma = torch.logspace(math.log10(low), math.log10(high), steps, dtype=torch.float64) if steps > 1 \
            else torch.tensor([high], dtype=torch.float64)
        return 1.0 / (1.0 + 4.0 * sigma**2)
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
