"""Pieces shared by the zero-shot solvers: timestep pairs, the padded canvas, data consistency.

Conventions (as in :mod:`idm.priors.samplers`): the diffusion state ``x_t`` and every x̂₀ estimate
live on the prior's value range [-1, 1]; measurements ``y`` and the operator act on [0, 1] images
of the operator's domain ``(B, C, *op.domain_size)``. Data consistency is applied to the [0, 1]
image, so the operator is used exactly as it measured (no ``A(2x − 1) = 2Ax − A(1)`` juggling).

The state lives on a *canvas*: the domain padded at the bottom/right to a multiple of the U-Net's
``size_multiple``. The padding pixels are not measured; they evolve under the prior alone and are
cropped away at the end.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..errors import IDMError
from ..physics.base import LinearOperator
from ..physics.canvas import Canvas
from ..priors.schedule import NoiseSchedule, from_model_range, to_model_range

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[dict], None]

#: timestep of the clean image after the last step (ᾱ = 1)
FINAL = -1


# --- timesteps -----------------------------------------------------------------------------------
def jump_indices(n: int, travel_length: int = 1, travel_repeat: int = 1) -> list[int]:
    """Indices into ``n`` respaced timesteps, visited in order: ``n−1, …, 0, −1`` with time travel.

    Every ``travel_length`` indices (at ``k = 0, L, 2L, … < n − L``) the walk jumps back ``L``
    indices and descends again, ``travel_repeat − 1`` extra times (RePaint / DDNM schedule).
    ``travel_length = travel_repeat = 1`` gives the plain descent. ``−1`` stands for the clean image.
    """
    if n < 1:
        raise IDMError(f"need at least one timestep, got {n}")
    if travel_length < 1 or travel_repeat < 1:
        raise IDMError(f"time travel length and repeat must be >= 1, got {travel_length} and {travel_repeat}")
    jumps = {k: travel_repeat - 1 for k in range(0, n - travel_length, travel_length)}
    k, order = n, []
    while k >= 1:
        k -= 1
        order.append(k)
        if jumps.get(k, 0) > 0:
            jumps[k] -= 1
            for _ in range(travel_length):
                k += 1
                order.append(k)
    order.append(FINAL)
    return order


def timestep_pairs(
    schedule: NoiseSchedule, steps: int, travel_length: int = 1, travel_repeat: int = 1, t_max: int | None = None
) -> list[tuple[int, int]]:
    """Consecutive ``(t, t_next)`` timesteps of a sampling run over ``schedule.respaced(steps, t_max)``
    (``t_max``: the first step, default the schedule's last; ``steps`` is capped at ``t_max + 1``).

    ``t_next < t`` is a denoising step (``t_next = -1``: the last one, to the clean image);
    ``t_next > t`` is a time-travel jump back to a noisier timestep.
    """
    if t_max is not None:
        steps = min(steps, int(t_max) + 1)
    timesteps = schedule.respaced(steps, t_max)
    order = [timesteps[k] if k >= 0 else FINAL for k in jump_indices(len(timesteps), travel_length, travel_repeat)]
    return list(zip(order[:-1], order[1:]))


def abar_at(schedule: NoiseSchedule, t: int) -> float:
    """``ᾱ_t`` as a Python float, with ``ᾱ_{-1} = 1`` (the clean image)."""
    return 1.0 if t == FINAL else float(schedule.alphas_cumprod[t])


# --- canvas --------------------------------------------------------------------------------------
def operator_canvas(op: LinearOperator, multiple: int) -> Canvas:
    """The operator's 2D domain padded at the bottom/right to multiples of ``multiple``."""
    if len(op.domain_size) != 2:
        raise IDMError(f"zero-shot diffusion solvers work on 2D images, the operator's domain is {op.domain_size}")
    return Canvas.to_multiple(op.domain_size, multiple)


# --- noise, data consistency ---------------------------------------------------------------------
def randn(shape: tuple[int, ...], generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise drawn on the CPU from ``generator`` (device-independent), moved to ``like``."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=like.device, dtype=like.dtype)


def initial_state(
    y: torch.Tensor, op: LinearOperator, size_multiple: int, generator: torch.Generator | None
) -> tuple[Canvas, torch.Tensor]:
    """The canvas of ``op`` (padded to ``size_multiple``) and the initial state ``x_T ~ N(0, I)``
    of shape ``(B, C, *canvas.size)`` (B, C, device and dtype those of the image ``Aᵀy``, e.g.
    2 channels for :class:`~idm.physics.mri.ComplexParts`), drawn from ``generator``."""
    canvas = operator_canvas(op, size_multiple)
    image = op.A_adjoint(y)
    return canvas, randn((*image.shape[:2], *canvas.size), generator, image)


def data_consistency(
    x0: torch.Tensor, y: torch.Tensor, op: LinearOperator, canvas: Canvas, weight: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`LinearOperator.project <idm.physics.LinearOperator.project>` applied to an x̂₀
    estimate on the canvas: ``x ← x − weight·A†(A x − y)`` on [0, 1].

    ``x0`` is the canvas estimate on [-1, 1]. Returns ``(corrected canvas on [-1, 1], corrected
    domain image on [0, 1])``.
    """
    image = op.project(from_model_range(canvas.crop(x0)), y, weight)
    return canvas.paste(x0, to_model_range(image)), image


def diffused_start(noise: torch.Tensor, y: torch.Tensor, op: LinearOperator, canvas: Canvas, schedule: NoiseSchedule,
                   level: float) -> tuple[int, torch.Tensor]:
    """``(t₀, x_t₀)``: the data-consistent mid-grey image (:func:`data_consistency` of the zero state; MRI:
    the zero-filled image) diffused with ``noise`` (the canvas state ``x_T``) to the timestep whose
    noise-to-signal ratio is ``level`` σ₀ (Chung et al., "Come-closer-diffuse-faster", CVPR 2022)."""
    first = schedule.timestep_for_noise(level)
    abar = abar_at(schedule, first)
    grey = data_consistency(torch.zeros_like(noise), y, op, canvas)[0]
    return first, math.sqrt(abar) * grey + math.sqrt(1.0 - abar) * noise


def misfit(x0: torch.Tensor, y: torch.Tensor, op: LinearOperator, canvas: Canvas) -> torch.Tensor:
    """Per-image ``‖y − A x̂₀‖`` measured on the prior's scale (twice the [0, 1] misfit) → ``(B,)``.

    ``x0`` is the canvas estimate on [-1, 1]; on [-1, 1] the measurements are ``2y − A(1)``, so the
    misfit there is ``2‖y − A((x̂₀ + 1)/2)‖`` — the norm the DPS step size ζ is calibrated for.
    """
    residual = y - op.A(from_model_range(canvas.crop(x0)))
    return 2.0 * torch.linalg.vector_norm(residual.flatten(1), dim=1)


def check_inputs(y: torch.Tensor, op: LinearOperator, channels: int) -> None:
    """Raise :class:`IDMError` unless ``y`` are finite real measurements of ``op`` with ``channels`` channels."""
    op.check_measurements(y)
    if y.is_complex() or not y.is_floating_point():
        raise IDMError(f"zero-shot solvers need real floating-point measurements, got {y.dtype}")
    if y.shape[1] != channels:
        raise IDMError(f"the prior has {channels} channel(s), the measurements have {y.shape[1]}")
    if not bool(torch.isfinite(y).all()):
        raise IDMError("measurements contain NaN or infinite values")


def check_complex_inputs(y: torch.Tensor, op: LinearOperator) -> None:
    """Raise :class:`IDMError` unless ``y`` are finite complex measurements of ``op`` (MRI)."""
    op.check_measurements(y)
    if not bool(torch.isfinite(torch.view_as_real(y)).all()):
        raise IDMError("measurements contain NaN or infinite values")


def denoiser_sigma_max(prior: Any) -> float:
    """The largest σ the denoiser was trained for (DnCNN's ``sigma_max``; unbounded otherwise)."""
    net = getattr(prior, "denoiser", None)
    config = getattr(net, "config", None)
    return float(getattr(config, "sigma_max", math.inf))
