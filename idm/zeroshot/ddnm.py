"""DDNM and DDNM+ (Wang et al., ICLR 2023): range-null-space decomposition on a diffusion prior.

For each step ``t → t'`` of the respaced schedule (ᾱ = ᾱ_t, ᾱ' = ᾱ_{t'}, ᾱ_{-1} = 1)::

    ε  = model(x_t, t)
    x̂₀ = (x_t − sqrt(1 − ᾱ) ε) / sqrt(ᾱ)                (clamped to [-1, 1] if clip)
    x̂₀ ← x̂₀ − λ A†(A x̂₀ − y)                           (on [0, 1]; λ = 1: A†y + (I − A†A) x̂₀)
    x_t' = a x̂₀ + γ (η z + sqrt(1 − η²) ε),  z ~ N(0, I)

with ``a = sqrt(ᾱ')`` and ``σ = sqrt(1 − ᾱ')`` the signal and noise coefficients of ``x_t'``.
Noise-free DDNM has ``λ = 1, γ = σ``. DDNM+ (noise σ_y on y, ``2σ_y`` on the prior's [-1, 1]
scale) uses ``λ = 1`` while ``σ ≥ a σ_y`` and ``λ = σ / (a σ_y)`` after, and the reduced noise
std ``γ = sqrt(σ² − (λ a σ_y)²)``; with σ_y = 0 both coincide exactly (same code path).

Time travel (DDNM+, RePaint): with ``travel_length = L > 1`` or ``travel_repeat = r > 1``, after
reaching certain timesteps the state is diffused forward again by ``q(x_j | x_i)``
(``x_j = sqrt(ᾱ_j/ᾱ_i) x_i + sqrt(1 − ᾱ_j/ᾱ_i) z``) and denoised anew (see
:func:`~idm.zeroshot.common.jump_indices`).

The result is the corrected x̂₀ of the last step on [0, 1], cropped to the operator's domain and
**not clipped** — noise-free, it satisfies ``A x = y`` up to rounding.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..physics.base import LinearOperator
from ..priors.schedule import NoiseSchedule, x0_from_eps
from .common import Callback, EpsModel, abar_at, data_consistency, initial_state, randn, timestep_pairs


def noise_aware_weights(a: float, sigma: float, sigma_y: float) -> tuple[float, float]:
    """DDNM+'s ``(λ, γ)`` for a step whose result has signal coefficient ``a`` and noise std ``sigma``.

    ``sigma_y`` is the measurement noise std on the prior's scale. ``λ`` weighs the correction,
    ``γ`` is the std of the noise the step injects (``γ = sigma`` when ``sigma_y = 0``).
    """
    if sigma >= a * sigma_y:
        lam = 1.0
    else:
        lam = sigma / (a * sigma_y)
    return lam, math.sqrt(max(sigma**2 - (lam * a * sigma_y) ** 2, 0.0))


def sample_ddnm(
    model: EpsModel,
    y: torch.Tensor,
    op: LinearOperator,
    schedule: NoiseSchedule,
    *,
    steps: int = 100,
    eta: float = 0.85,
    sigma_y: float = 0.0,
    travel_length: int = 1,
    travel_repeat: int = 1,
    clip: bool = True,
    size_multiple: int = 1,
    generator: torch.Generator | None = None,
    progress: bool = False,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DDNM(+) reconstruction of measurements ``y`` of ``op`` → ``(B, C, *op.domain_size)`` on [0, 1].

    Args:
        model: ``model(x, t) -> ε``, ``x`` (B, C, H', W') on [-1, 1], ``t`` (B,) long timesteps.
        y: measurements ``op.measurement_shape(B, C)`` of [0, 1] images, on the model's device.
        schedule: the prior's training schedule; ``steps`` of its timesteps are used.
        eta: share of fresh noise in the injected noise (0: deterministic DDIM-like, 1: all fresh).
        sigma_y: measurement noise std on the [0, 1] image scale (0: plain DDNM).
        travel_length, travel_repeat: time travel (1, 1: off).
        clip: clamp each x̂₀ to [-1, 1] before the correction (the output itself is never clipped).
        size_multiple: the canvas is padded to multiples of this (the U-Net's ``size_multiple``).
        generator: CPU generator of the initial noise and the fresh noise of each step.
        callback: called after every step with ``{"i", "t", "x", "x0"}`` (``x0``: corrected, [0, 1] domain).
    """
    canvas, x = initial_state(y, op, size_multiple, generator)
    batch = y.shape[0]
    sigma_y_model = 2.0 * float(sigma_y)  # [0, 1] → [-1, 1] scale
    pairs = timestep_pairs(schedule, steps, travel_length, travel_repeat)
    image = canvas.crop(x)
    for i, (t, t_next) in enumerate(tqdm(pairs, disable=not progress, desc="ddnm", leave=False)):
        abar, abar_next = abar_at(schedule, t), abar_at(schedule, t_next)
        if t_next > t:  # time travel: diffuse forward from t to t_next
            ratio = abar_next / abar
            x = math.sqrt(ratio) * x + math.sqrt(1.0 - ratio) * randn(x.shape, generator, x)
            continue
        eps = model(x, torch.full((batch,), t, dtype=torch.long, device=x.device))
        x0 = x0_from_eps(x, eps, abar)
        if clip:
            x0 = x0.clamp(-1.0, 1.0)
        a, sigma = math.sqrt(abar_next), math.sqrt(1.0 - abar_next)
        lam, gamma = noise_aware_weights(a, sigma, sigma_y_model)
        x0, image = data_consistency(x0, y, op, canvas, lam)
        x = a * x0
        if gamma > 0.0:
            x = x + gamma * (eta * randn(x.shape, generator, x) + math.sqrt(1.0 - eta**2) * eps)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": image})
    return image
