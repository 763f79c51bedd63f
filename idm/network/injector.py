"""Measurement-injection adapters: let every U-Net stage see the measurement (IDM: Chen et al.,
"Invertible Diffusion Models for Compressed Sensing", IEEE TPAMI 2025).

One :class:`Injector` sits at the end of each U-Net stage and holds separate weights for each
sampling step. For features ``h`` of shape ``(B, ch, H/r, W/r)`` (``r`` = the stage's total
down-scaling from the canvas, unshuffle included) and step ``k``::

    z     = pixel_shuffle(conv1x1_k(h), r)                      (B, C, H, W)   image-sized map
    m     = cat[z, AᵀA z / ‖A‖², Aᵀy / ‖A‖²]                    (B, 3C, H, W)
    h_out = h + conv1x1'_k(pixel_unshuffle(m, r))               (B, ch, H/r, W/r)

The paper (and official code) applies the 1×1 convs on the image side of the (un)shuffle, which
needs ``ch`` divisible by ``r²``; here they act on the feature side, which is the same map with
weights untied across the ``r²`` sub-pixel positions and works for any channel count.
``conv1x1'_k`` is zero-initialised, so a new injector is the identity. The Gram maps are divided by
``‖A‖²`` (:meth:`~idm.physics.LinearOperator.norm_squared`; 1 for block CS, MRI and inpainting) so
that operators of any scale, e.g. CT's ‖A‖² ≈ 10³, feed the injectors maps of the image's scale.

With ``group = g > 1`` the backbone sees the canvas' ``C`` channels as ``g`` batch items of ``C/g``
channels (complex MRI: Re and Im through a 1-channel prior, :attr:`IDMConfig.complex`), item
``i·B + b`` holding channel block ``i`` of image ``b`` (:func:`~idm.physics.mri.split_groups`); the injector treats
the features as ``(B, g·ch, …)`` (block ``i`` = items ``i·B … i·B + B − 1``), so ``z``, ``AᵀA z`` and
``Aᵀy`` are formed on whole ``C``-channel images, and splits its update back. It never copies the
features into that shape: the 1×1 convs act on each block with the matching slice of their weights,
so features keep their memory layout (channels-last on CPU, :func:`idm.priors.dncnn.circular_pad`).
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

    def __init__(self, features: int, scale: int, channels: int, steps: int, group: int = 1) -> None:
        if scale < 1 or group < 1:
            raise ValueError(f"injector scale and group must be >= 1, got {scale} and {group}")
        super().__init__()
        self.scale, self.channels, self.group = int(scale), int(channels), int(group)
        r2, width = self.scale**2, features * self.group
        self.to_image = nn.ModuleList(nn.Conv2d(width, channels * r2, 1) for _ in range(steps))
        self.to_features = nn.ModuleList(nn.Conv2d(3 * channels * r2, width, 1) for _ in range(steps))
        for conv in self.to_features:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, h: torch.Tensor, context: dict) -> torch.Tensor:
        """``h`` (group·B, ch, H/r, W/r) → same shape (and memory layout)."""
        ctx: MeasurementContext = context["meas"]
        step: int = context["step"]
        blocks = h.chunk(self.group, dim=0)  # block i: (B, ch, H/r, W/r), channels i·ch … of the image's features
        to_image, to_features = self.to_image[step], self.to_features[step]
        image = [F.conv2d(part, w) for part, w in zip(blocks, to_image.weight.chunk(self.group, dim=1))]
        z = F.pixel_shuffle(torch.stack(image).sum(0) + to_image.bias.view(1, -1, 1, 1), self.scale)
        aty = ctx.aty.to(z.dtype)
        m = torch.cat([z, ctx.AtA(z), aty.expand(z.shape[0], *aty.shape[1:])], dim=1)
        m = F.pixel_unshuffle(m, self.scale).contiguous(memory_format=_layout(h))
        update = [F.conv2d(m, w, b) for w, b in zip(to_features.weight.chunk(self.group, dim=0),
                                                    to_features.bias.chunk(self.group, dim=0))]
        return h + (torch.cat(update, dim=0) if self.group > 1 else update[0])


def _layout(t: torch.Tensor) -> torch.memory_format:
    """channels-last for a 4D channels-last tensor with more than one channel, else contiguous."""
    cl = t.ndim == 4 and t.shape[1] > 1 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format
