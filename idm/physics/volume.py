"""Volumes as batches of slices ``(D, C, H, W)`` (z is the batch axis) measured slice by slice by a 2D
operator, and the z-total-variation pieces that couple the slices (DiffusionMBIR, Chung et al., CVPR
2023): the forward difference along z, its adjoint, soft thresholding, and one ADMM iteration of

    min_x ½‖A x − y‖² + λ‖D_z x‖₁,     D_z x = x[1:] − x[:-1]

split as ``D_z x = z`` with the scaled dual ``u``: the x-update solves ``(AᵀA + ρD_zᵀD_z) x = Aᵀy +
ρD_zᵀ(z − u)`` by conjugate gradients from the current x (the whole volume as one vector), then
``z ← soft(D_z x + u, λ/ρ)``, ``u ← u + D_z x − z``. :func:`ztv_consistency` is the stateless
variant (one iteration from ``u = 0`` and ``z = soft(D_z x, λ/ρ)``), the data-consistency step of a
few-step network on volumes.
"""

from __future__ import annotations

import torch

from .base import LinearOperator, conjugate_gradient
from .mri import MRI, ComplexParts

#: (λ, ρ) of the z-TV ADMM by modality, chosen on tuning slices (docs/mbir.md): CT images on [0, 1]
#: measured by parallel-beam projections (z = 16–23 of the held-out example_ct, 23 views); MRI parts
#: images (the [0, 1] state of a complex image) measured by masked unitary Fourier transforms (Colin27
#: slices 84–91, 8× Poisson)
CT_ADMM = (0.1, 10.0)
MRI_ADMM = (1e-3, 0.1)


def ztv_defaults(op: LinearOperator) -> tuple[float, float]:
    """``(λ, ρ)`` for the operator: :data:`MRI_ADMM` for MRI (also seen through
    :class:`~idm.physics.mri.ComplexParts`), :data:`CT_ADMM` otherwise."""
    inner = op.op if isinstance(op, ComplexParts) else op
    return MRI_ADMM if isinstance(inner, MRI) else CT_ADMM


def z_diff(x: torch.Tensor) -> torch.Tensor:
    """``D_z x = x[1:] − x[:-1]`` along the slice (batch) axis: (D, …) → (D − 1, …)."""
    return x[1:] - x[:-1]


def z_diff_adjoint(v: torch.Tensor) -> torch.Tensor:
    """``D_zᵀ v`` for ``v`` (D − 1, …) → (D, …)."""
    out = v.new_zeros((v.shape[0] + 1, *v.shape[1:]))
    out[1:] += v
    out[:-1] -= v
    return out


def soft_threshold(v: torch.Tensor, tau: float) -> torch.Tensor:
    """``max(|v| − τ, 0) · v / |v|`` (real or complex)."""
    magnitude = v.abs()
    return v * ((magnitude - tau).clamp_min(0) / magnitude.clamp_min(1e-30))


def ztv_objective(x: torch.Tensor, y: torch.Tensor, op: LinearOperator, lam: float) -> float:
    """``½‖A x − y‖² + λ‖D_z x‖₁`` of a volume ``x`` (D, C, H, W)."""
    return float(0.5 * (op.A(x) - y).abs().square().sum() + lam * z_diff(x).abs().sum())


def admm_step(x: torch.Tensor, y: torch.Tensor, op: LinearOperator, z: torch.Tensor, u: torch.Tensor, lam: float,
              rho: float, iterations: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ADMM iteration (module docstring) from the volume ``x`` (D, C, H, W) with the splitting
    variables ``z``, ``u`` (D − 1, C, H, W) → ``(x, z, u)``."""
    def normal(v: torch.Tensor) -> torch.Tensor:
        return op.A_adjoint(op.A(v)) + rho * z_diff_adjoint(z_diff(v))

    rhs = op.A_adjoint(y) + rho * z_diff_adjoint(z - u)
    shape = x.shape
    flat = conjugate_gradient(lambda v: normal(v.reshape(shape)).reshape(1, -1), (rhs - normal(x)).reshape(1, -1),
                              iterations=iterations)
    x = x + flat.reshape(shape)
    dz = z_diff(x)
    z = soft_threshold(dz + u, lam / rho)
    return x, z, u + dz - z


def ztv_consistency(x: torch.Tensor, y: torch.Tensor, op: LinearOperator, lam: float, rho: float,
                    iterations: int) -> torch.Tensor:
    """z-TV data consistency of a volume estimate ``x`` (D, C, H, W): the x-update of one ADMM
    iteration from ``z = soft(D_z x, λ/ρ)`` and ``u = 0`` — ``iterations`` CG steps from ``x`` on
    ``min ½‖A v − y‖² + ρ/2 ‖D_z v − z‖²``, which fits the measurements while keeping the
    thresholded slice-to-slice differences of ``x``. As ``ρ → 0`` it is the plain consistency step
    (CG on ``AᵀA v = Aᵀy`` from ``x``). Stateless, so it can sit inside a reversible sampling step."""
    z = soft_threshold(z_diff(x), lam / rho)
    return admm_step(x, y, op, z, torch.zeros_like(z), lam, rho, iterations)[0]
