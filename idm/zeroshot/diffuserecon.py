"""DiffuseRecon (Peng et al., "Towards performant and reliable undersampled MR reconstruction via
diffusion model sampling", MICCAI 2022): measurement-guided sampling with an uncertainty map.

K samples are drawn at once (one batch). For each step ``t → t'`` of the respaced schedule
(ᾱ = ᾱ_t, ᾱ' = ᾱ_{t'}, ᾱ_{-1} = 1; states on the prior's [-1, 1] range)::

    ε    = model(x_t, t)
    x̂₀   = (x_t − sqrt(1 − ᾱ) ε) / sqrt(ᾱ)                (clamped to [-1, 1])
    x_t' = DDPM posterior sample q(x_t' | x_t, x̂₀)          (ᾱ' = 1: x̂₀)
    x_t' ← x_t' − A†(A x_t' − y_t'),   y_t' = sqrt(ᾱ') y₋ + sqrt(1 − ᾱ') A ε

with ``y₋ = 2y − A(1)`` the measurements of the [-1, 1] image: the measured part of the sample
(MRI single-coil: the sampled k-space locations, ``A† = F⁻¹M``) is replaced by the measurement
noised as the sample is, with the step's own noise estimate — the paper's k-space guidance; the last
step (ᾱ' = 1) replaces it by the measurement itself. Complex MRI runs on the parts image of
:class:`~idm.physics.mri.ComplexParts` (``y₋`` is then the k-space itself).

With ``start_level`` σ₀ the samples start, instead of from pure noise, from the data-consistent
mid-grey image (the zero-filled image for MRI) diffused to the step of noise std σ₀ and take ``steps``
evenly spaced steps from there (Chung et al., "Come-closer-diffuse-faster", CVPR 2022): fewer steps,
and usable with Gaussian-denoiser priors, which are trained for small σ only.

Coarse-to-fine: the K samples (``steps`` respaced steps) are averaged; the average is diffused to the
refinement step (``refine_level``: its noise std σ = sqrt((1 − ᾱ)/ᾱ) on the [-1, 1] scale) with one
seeded noise draw and denoised by ``refine`` deterministic DDIM steps with the same guidance — the
reconstruction. The uncertainty is the per-pixel standard deviation of the K samples (of their
magnitude on :class:`~idm.physics.mri.ComplexParts`; 0 for K = 1), on the image's [0, 1] scale.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..physics.base import LinearOperator
from ..physics.canvas import Canvas
from ..physics.mri import ComplexParts
from ..priors.schedule import NoiseSchedule, ddim_step, ddpm_posterior, from_model_range, x0_from_eps
from ..registry import Posterior
from .common import EpsModel, abar_at, data_consistency, diffused_start, initial_state, randn, timestep_pairs


def guided_step(x: torch.Tensor, eps: torch.Tensor, y: torch.Tensor, a_one: torch.Tensor, op: LinearOperator,
                canvas: Canvas, abar_next: float) -> torch.Tensor:
    """``x − A†(A x − y_t')`` with ``y_t' = sqrt(ᾱ') y₋ + sqrt(1 − ᾱ') A ε`` (module docstring), done by
    :func:`~idm.zeroshot.common.data_consistency` on the [0, 1] measurements ``(y_t' + A(1))/2``
    (``y`` are the [0, 1] image's measurements, so ``y₋ = 2y − A(1)``; ``a_one`` is ``A(1)``)."""
    a, s = math.sqrt(abar_next), math.sqrt(1.0 - abar_next)
    target = a * (2 * y - a_one) + (s * op.A(canvas.crop(eps)) if s > 0 else 0)
    return data_consistency(x, (target + a_one) / 2, op, canvas)[0]


def sample_diffuserecon(
    model: EpsModel,
    y: torch.Tensor,
    op: LinearOperator,
    schedule: NoiseSchedule,
    *,
    samples: int = 8,
    steps: int = 20,
    refine: int = 5,
    refine_level: float = 0.1,
    clip: bool = True,
    size_multiple: int = 1,
    generator: torch.Generator | None = None,
    progress: bool = False,
    start_level: float = 0.0,
) -> Posterior:
    """DiffuseRecon of measurements ``y`` (B, …) of ``op`` → :class:`Posterior` (module docstring).

    Args:
        model: ``model(x, t) -> ε``, ``x`` (N, C, H', W') on [-1, 1], ``t`` (N,) long timesteps.
        samples: K, drawn in one batch of K·B.
        steps: respaced steps of each sample (coarse stage).
        refine: deterministic DDIM steps of the refinement from the K-sample mean (0: the mean itself).
        refine_level: noise std σ (on [-1, 1]) the mean is diffused to before refining.
        generator: CPU generator of every noise draw (the result depends only on it, y and op).
        start_level: noise std σ₀ (on [-1, 1]) to start from the diffused zero-filled image (0: from
            pure noise at the schedule's last step).
    """
    batch = y.shape[0]
    y_k = y.repeat(samples, *([1] * (y.ndim - 1)))
    canvas, x = initial_state(y_k, op, size_multiple, generator)
    a_one = op.A(torch.ones_like(canvas.crop(x[:1])))  # A(1), for the measurements on [-1, 1]
    start = None
    if start_level > 0:
        start, x = diffused_start(x, y_k, op, canvas, schedule, start_level)
    pairs = timestep_pairs(schedule, steps, t_max=start)
    for t, t_next in tqdm(pairs, disable=not progress, desc="diffuserecon", leave=False):
        x = _step(model, x, y_k, a_one, op, canvas, schedule, t, t_next, clip, generator, stochastic=True)
    values = from_model_range(canvas.crop(x))  # (K·B, C, *domain)
    if isinstance(op, ComplexParts):  # the spread of the magnitude |Re + i·Im|, one channel per pair
        values = op.image(values).abs()
    values = values.unflatten(0, (samples, batch))
    std = values.std(0, correction=0) if samples > 1 else torch.zeros_like(values[0])
    mean = x.unflatten(0, (samples, batch)).mean(0)
    if refine > 0:
        start = schedule.timestep_for_noise(refine_level)
        abar = abar_at(schedule, start)
        mean = math.sqrt(abar) * mean + math.sqrt(1.0 - abar) * randn(mean.shape, generator, mean)
        for t, t_next in timestep_pairs(schedule, refine, t_max=start):
            mean = _step(model, mean, y, a_one, op, canvas, schedule, t, t_next, clip, generator, stochastic=False)
    return Posterior(from_model_range(canvas.crop(mean)), std)


def _step(model: EpsModel, x: torch.Tensor, y: torch.Tensor, a_one: torch.Tensor, op: LinearOperator, canvas: Canvas,
          schedule: NoiseSchedule, t: int, t_next: int, clip: bool, generator: torch.Generator | None,
          stochastic: bool) -> torch.Tensor:
    """One guided step ``t → t_next``: DDPM posterior sample (``stochastic``) or DDIM (η = 0), then
    :func:`guided_step`."""
    abar, abar_next = abar_at(schedule, t), abar_at(schedule, t_next)
    eps = model(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))
    x0 = x0_from_eps(x, eps, abar)
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
    if stochastic:
        mean, variance = ddpm_posterior(x, x0, abar, abar_next)
        x = mean + math.sqrt(variance) * randn(x.shape, generator, x) if variance > 0.0 else mean
    else:
        x = ddim_step(x0, eps, abar_next)
    return guided_step(x, eps, y, a_one, op, canvas, abar_next)

