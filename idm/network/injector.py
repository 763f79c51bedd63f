"""Measurement-injection adapters: let every U-Net stage see the measurement (IDM: Chen et al.,
"Invertible Diffusion Models for Compressed Sensing", IEEE TPAMI 2025).

One :class:`Injector` sits at the end of each U-Net stage and holds separate weights for each
sampling step. For features ``h`` of shape ``(B, ch, H/r, W/r)`` (``r`` = the stage's total
down-scaling from the canvas, unshuffle included) and step ``k``::

    z     = pixel_shuffle(conv1x1_k(h), r)                      (B, C, H, W)   image-sized map
    m     = cat[z, AᵀA z, Aᵀy]                                  (B, 3C, H, W)
    h_out = h + conv1x1'_k(pixel_unshuffle(m, r))               (B, ch, H/r, W/r)

The paper (and official code) applies the 1×1 convs on the image side of the (un)shuffle, which
needs ``ch`` divisible by ``r²``; here they act on the feature side, which is the same map with
weights untied across the ``r²`` sub-pixel positions and works for any channel count.
``conv1x1'_k`` is zero-initialised, so a new injector is the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .measurement import MeasurementContext


class Injector(nn.Module):
    """Per-step measurement injection for one U-Net stage: ``(h, context) -> h + δ``.

    ``context`` is ``{"meas": MeasurementContext, "step": k}`` with ``k`` the step's index
    (0…T−1) selecting the per-step weights.

    Args:
        features: channel count ``ch`` of the stage's features.
        scale: ``r``, canvas size / feature-map size.
        channels: image channels ``C``.
        steps: number of sampling steps T (one pair of convs each).
    """

    preserves_shape = True

    def __init__(self, features: int, scale: int, channels: int, steps: int) -> None:
        if scale < 1:
            raise ValueError(f"injector scale must be >= 1, got {scale}")
        super().__init__()
        self.scale, self.channels = int(scale), int(channels)
        r2 = self.scale**2
        self.to_image = nn.ModuleList(nn.Conv2d(features, channels * r2, 1) for _ in range(steps))
        self.to_features = nn.ModuleList(nn.Conv2d(3 * channels * r2, features, 1) for _ in range(steps))
        for conv in self.to_features:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, h: torch.Tensor, context: dict) -> torch.Tensor:
        """``h`` (B, ch, H/r, W/r) → same shape."""
        ctx: MeasurementContext = context["meas"]
        step: int = context["step"]
        z = F.pixel_shuffle(self.to_image[step](h), self.scale)
        aty = ctx.aty.to(z.dtype)
        m = torch.cat([z, ctx.AtA(z), aty.expand(z.shape[0], *aty.shape[1:])], dim=1)
        return h + self.to_features[step](F.pixel_unshuffle(m, self.scale))
