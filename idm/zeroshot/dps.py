"""DPS — diffusion posterior sampling (Chung et al., ICLR 2023).

For each step ``t → t'`` of the respaced schedule (ᾱ = ᾱ_t, ᾱ' = ᾱ_{t'}, ᾱ_{-1} = 1)::

    ε      = model(x_t, t)                                   (with gradients w.r.t. x_t)
    x̂₀     = (x_t − sqrt(1 − ᾱ) ε) / sqrt(ᾱ)
    x_t'   = DDPM posterior sample q(x_t' | x_t, clip(x̂₀))   (respaced β = 1 − ᾱ/ᾱ')
    x_t'  ← x_t' − ζ ∇_{x_t} ‖y − A x̂₀(x_t)‖                   (gradient through the U-Net)

The misfit is the un-squared norm per image on the prior's [-1, 1] scale (twice the norm on
[0, 1], see :func:`~idm.zeroshot.common.misfit`), as in the official code, where ζ ≈ 0.3–1.0.
The last step (to ᾱ' = 1) has no noise; its result, mapped to [0, 1] and cropped to the
operator's domain, is returned (not clipped).
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..physics.base import LinearOperator
from ..priors.schedule import NoiseSchedule, ddpm_posterior, from_model_range, x0_from_eps
from .common import Callback, EpsModel, abar_at, initial_state, misfit, randn, timestep_pairs


def sample_dps(
    model: EpsModel,
    y: torch.Tensor,
    op: LinearOperator,
    schedule: NoiseSchedule,
    *,
    steps: int = 1000,
    zeta: float = 1.0,
    clip: bool = True,
    size_multiple: int = 1,
    generator: torch.Generator | None = None,
    progress: bool = False,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPS reconstruction of measurements ``y`` of ``op`` → ``(B, C, *op.domain_size)`` on [0, 1].

    Args (as :func:`~idm.zeroshot.ddnm.sample_ddnm`, plus):
        zeta: step size ζ of the measurement gradient (0: unconditional DDPM sampling).
        clip: clamp x̂₀ to [-1, 1] in the posterior mean (the gradient uses the unclamped x̂₀).
        callback: called after every step with ``{"i", "t", "x", "x0", "misfit"}`` (``x0``: the
            step's x̂₀ on [0, 1] domain, ``misfit``: its (B,) misfit, None when ``zeta = 0``).
    Runs with gradients enabled internally (also under ``torch.no_grad()``); the model's
    parameters receive no gradients.
    """
    canvas, x = initial_state(y, op, size_multiple, generator)
    batch = y.shape[0]
    pairs = timestep_pairs(schedule, steps)
    for i, (t, t_next) in enumerate(tqdm(pairs, disable=not progress, desc="dps", leave=False)):
        abar, abar_next = abar_at(schedule, t), abar_at(schedule, t_next)
        t_batch = torch.full((batch,), t, dtype=torch.long, device=x.device)
        x = x.detach()
        with torch.set_grad_enabled(zeta > 0.0):
            x.requires_grad_(zeta > 0.0)
            eps = model(x, t_batch)
            x0 = x0_from_eps(x, eps, abar)
            distance = misfit(x0, y, op, canvas) if zeta > 0.0 else None
            grad = torch.autograd.grad(distance.sum(), x)[0] if distance is not None else None
        x, x0 = x.detach(), x0.detach()
        mean_x0 = x0.clamp(-1.0, 1.0) if clip else x0
        mean, variance = ddpm_posterior(x, mean_x0, abar, abar_next)
        x_next = mean + math.sqrt(variance) * randn(x.shape, generator, x) if variance > 0.0 else mean
        if grad is not None:
            x_next = x_next - zeta * grad
        x = x_next
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": from_model_range(canvas.crop(x0)),
                      "misfit": None if distance is None else distance.detach()})
    return from_model_range(canvas.crop(x)).detach()
