"""A small IDM-like sampler used by the memory benchmark (and tests) before the real IDM network.

``ChainSampler(unet, steps)(y, mask) -> x̂``: inpainting measurements ``y = mask ⊙ x`` of images
``x`` ``(B, C, H, W)`` on [0, 1], a learnable schedule ``α ∈ R^T`` (initialised 0.5,
``ᾱ = cumprod(α)``, ``ᾱ_0 = 1``), start ``x_T = √ᾱ_T · Aᵀy`` and T deterministic steps
``t = T … 1`` (IDM §Sampler):

1. ``ε = U-Net(x)`` (a :class:`~idm.invertible.convert.ReversibleUNet`, no timestep);
2. ``x̂₀ = (x − √(1 − ᾱ_t)·ε) / √ᾱ_t``;
3. data consistency (range–null space) ``x̂₀ ← x̂₀ − Aᵀ(A x̂₀ − y)`` with ``A = Aᵀ = mask ⊙ ·``;
4. DDIM (η = 0) ``x ← √ᾱ_{t−1}·x̂₀ + √(1 − ᾱ_{t−1})·ε``.

The steps form a :class:`~idm.invertible.sequence.ReversibleSampler` (level 1); the schedule and
the measurement travel to every step in the explicit ``context``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..invertible import ReversibleSampler, ReversibleUNet


class ChainStep(nn.Module):
    """Step ``t`` of :class:`ChainSampler`: ``(x, context) -> x_{t−1}``, same shape as ``x``.

    ``context``: ``{"alpha_bar": (T+1,), "y": (B, C, H, W), "mask": (1, 1, H, W), "unet": any}``,
    where ``context["unet"]`` is handed to the U-Net's injectors.
    """

    def __init__(self, unet: ReversibleUNet, t: int) -> None:
        super().__init__()
        self.unet = unet
        self.t = int(t)

    def forward(self, x: torch.Tensor, context: dict[str, Any]) -> torch.Tensor:
        alpha_bar, y, mask = context["alpha_bar"], context["y"], context["mask"]
        a, a_prev = alpha_bar[self.t], alpha_bar[self.t - 1]
        eps = self.unet(x, context.get("unet"))
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        x0 = x0 - mask * (mask * x0 - y)
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


class ChainSampler(nn.Module):
    """``forward(y, mask) -> x̂`` ``(B, C, H, W)``; see the module docstring."""

    def __init__(self, unet: ReversibleUNet, steps: int) -> None:
        super().__init__()
        if steps < 1:
            raise ValueError(f"the sampler needs at least one step, got {steps}")
        self.alpha = nn.Parameter(torch.full((steps,), 0.5))
        self.unet = unet
        self.sampler = ReversibleSampler([ChainStep(unet, t) for t in range(steps, 0, -1)])

    def forward(self, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        alpha_bar = torch.cat([self.alpha.new_ones(1), torch.cumprod(self.alpha, 0)])
        x = alpha_bar[-1].sqrt() * (mask * y)
        return self.sampler(x, {"alpha_bar": alpha_bar, "y": y, "mask": mask})
