"""``tv``: total-variation regularised reconstruction by FISTA with an inner TV proximal step.

Solves  min_x ½‖A x − y‖² + λ·TV(x)  subject to x ∈ [0, 1]  (isotropic TV, forward differences),
using only ``op.A`` / ``op.A_adjoint``, so it works for every operator:

* outer loop: FISTA (Beck & Teboulle 2009) with step 1/L, L = ‖A‖² estimated by power iteration;
* inner loop: the box-constrained TV proximal map by the fast gradient projection on the dual
  (Beck & Teboulle, "Fast gradient-based algorithms for constrained total variation image
  denoising and deblurring", 2009), warm-started from the previous outer iteration.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import IDMError
from ..physics import BlockCS, Denoising, Inpainting, LinearOperator, SuperResolution
from ..physics._args import as_int
from ..registry import register_method
from ._common import on_device, reject_extra


def _diffs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward differences along H and W, zero at the last row/column (each ``x.shape``)."""
    return (
        torch.nn.functional.pad(torch.diff(x, dim=-2), (0, 0, 0, 1)),
        torch.nn.functional.pad(torch.diff(x, dim=-1), (0, 1)),
    )


def _diffs_adjoint(px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Adjoint of :func:`_diffs` (minus the divergence)."""
    out = torch.zeros_like(px)
    out[..., :-1, :] -= px[..., :-1, :]
    out[..., 1:, :] += px[..., :-1, :]
    out[..., :, :-1] -= py[..., :, :-1]
    out[..., :, 1:] += py[..., :, :-1]
    return out


def gradient(x: torch.Tensor) -> torch.Tensor:
    """Forward differences of ``(B, C, H, W)`` → ``(B, C, 2, H, W)`` (zero at the last row/column)."""
    return torch.stack(_diffs(x), dim=2)


def gradient_adjoint(p: torch.Tensor) -> torch.Tensor:
    """Adjoint of :func:`gradient` (minus the divergence): ``(B, C, 2, H, W)`` → ``(B, C, H, W)``."""
    return _diffs_adjoint(p[:, :, 0], p[:, :, 1])


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Isotropic TV per image: ``(B, C, H, W)`` → ``(B,)``."""
    gx, gy = _diffs(x)
    return torch.hypot(gx, gy).sum(dim=(1, 2, 3))


def tv_prox(
    b: torch.Tensor, tau: float, dual: torch.Tensor, iterations: int, box: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """argmin_x ½‖x − b‖² + τ·TV(x) (+ x ∈ [0, 1] if ``box``), and the final dual field.

    ``dual`` (shape ``(B, C, 2, H, W)``, pointwise norm ≤ 1) warm-starts the dual iteration.
    """
    if tau <= 0.0:
        return (b.clamp(0.0, 1.0) if box else b), dual

    def primal(px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
        x = torch.add(b, _diffs_adjoint(px, py), alpha=-tau)
        return x.clamp_(0.0, 1.0) if box else x

    px, py = dual[:, :, 0], dual[:, :, 1]
    qx, qy, t = px, py, 1.0
    for _ in range(iterations):
        gx, gy = _diffs(primal(qx, qy))
        sx = gx.mul_(1.0 / (8.0 * tau)).add_(qx)
        sy = gy.mul_(1.0 / (8.0 * tau)).add_(qy)
        scale = torch.hypot(sx, sy).clamp_min_(1.0)
        nx, ny = sx.div_(scale), sy.div_(scale)
        t_new = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        weight = 1.0 + (t - 1.0) / t_new  # q = n + momentum·(n − p)
        qx, qy = torch.lerp(px, nx, weight), torch.lerp(py, ny, weight)
        px, py, t = nx, ny, t_new
    return primal(px, py), torch.stack((px, py), dim=2)


def operator_norm_squared(op: LinearOperator, like: torch.Tensor, iterations: int = 30, seed: int = 0) -> float:
    """‖A‖² (largest eigenvalue of AᵀA) by power iteration on one ``(1, 1, *domain)`` image."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 1, *op.domain_size), generator=generator, dtype=like.dtype).to(like.device)
    x = x / x.norm()
    value = 0.0
    for _ in range(iterations):
        x = op.AtA(x)
        value = float(x.norm())
        if value == 0.0:
            raise IDMError(f"operator {op!r} is zero; nothing to reconstruct")
        x = x / value
    return value


# noiseless λ for block CS by ratio (upper bounds), tuned on BSD68 (150 FISTA iterations)
BLOCKCS_LAMBDA = ((0.1, 2e-3), (0.5, 1e-3), (1.0, 3e-4))
INPAINTING_LAMBDA = 1.5e-3
#: noise adds NOISE_LAMBDA · σ · (measured fraction of the domain)
NOISE_LAMBDA = 0.5


def measured_fraction(op: LinearOperator) -> float:
    """How much of the domain the measurements see: q/N, kept pixels, 1/f², 1 for denoising."""
    if isinstance(op, BlockCS):
        return op.rows / op.block_pixels
    if isinstance(op, Inpainting):
        return float(op.mask.float().mean())
    if isinstance(op, SuperResolution):
        return 1.0 / op.factor**2
    if isinstance(op, Denoising):
        return 1.0
    return min(1.0, math.prod(op.measurement_shape(1, 1)) / math.prod(op.domain_size))


def default_lambda(op: LinearOperator) -> float:
    """λ tuned on BSD68 crops for noiseless measurements, plus a term growing with the noise."""
    if isinstance(op, BlockCS):
        base = next(lam for ratio, lam in BLOCKCS_LAMBDA if op.ratio <= ratio + 1e-9)
    elif isinstance(op, Inpainting):
        base = INPAINTING_LAMBDA
    elif isinstance(op, SuperResolution):
        base = 1e-3 / op.factor**2
    elif isinstance(op, Denoising):
        base = 0.0
    else:
        base = 1e-3
    return base + NOISE_LAMBDA * op.noise.sigma * measured_fraction(op)


def default_iterations(op: LinearOperator) -> int:
    return 50 if isinstance(op, Denoising) else 150


def tv_reconstruct(
    op: LinearOperator,
    y: torch.Tensor,
    lam: float,
    iterations: int,
    inner_iterations: int = 3,
    box: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """FISTA on ½‖Ax − y‖² + λ·TV(x); returns x of shape ``(B, C, *op.domain_size)``."""
    if len(op.domain_size) != 2:
        raise IDMError(f"tv works on 2D images, the operator's domain is {op.domain_size}")
    if y.is_complex():
        raise IDMError("tv works on real-valued measurements")
    step = 1.0 / (1.01 * operator_norm_squared(op, y))  # 1 % margin: power iteration is a lower bound
    x = op.A_dagger(y)
    x = x.clamp(0.0, 1.0) if box else x
    z, t = x, 1.0
    dual = torch.zeros((*x.shape[:2], 2, *x.shape[2:]), dtype=x.dtype, device=x.device)
    for _ in tqdm(range(iterations), desc="tv", disable=not progress, leave=False):
        b = z - step * op.A_adjoint(op.A(z) - y)
        x_new, dual = tv_prox(b, lam * step, dual, inner_iterations, box)
        t_new = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        z = x_new + ((t - 1.0) / t_new) * (x_new - x)
        x, t = x_new, t_new
    return x


@register_method("tv", "total-variation regularised reconstruction (FISTA, box [0, 1])")
def build(
    *,
    checkpoint: Any = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = False,
    lam: float | None = None,
    iterations: int | None = None,
    inner_iterations: int = 3,
    **options: Any,
):
    """``reconstruct(y, op)`` → TV estimate ``(B, C, *op.domain_size)`` in [0, 1].

    Options: ``lam`` (λ ≥ 0, default :func:`default_lambda` of the operator), ``iterations``
    (outer FISTA iterations, default :func:`default_iterations`), ``inner_iterations`` (TV prox
    iterations per outer one). Deterministic; ``seed`` is unused.
    """
    reject_extra("tv", checkpoint, options)
    if lam is not None and (isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not (0.0 <= lam < math.inf)):
        raise IDMError(f"tv: lam must be a finite number >= 0, got {lam!r}")
    if iterations is not None:
        iterations = as_int("tv: iterations", iterations, minimum=1)
    inner_iterations = as_int("tv: inner_iterations", inner_iterations, minimum=1)

    @torch.no_grad()
    def solve(y: torch.Tensor, op: LinearOperator) -> torch.Tensor:
        return tv_reconstruct(
            op,
            y,
            default_lambda(op) if lam is None else float(lam),
            default_iterations(op) if iterations is None else iterations,
            inner_iterations,
            progress=progress,
        )

    return on_device(device, solve)
