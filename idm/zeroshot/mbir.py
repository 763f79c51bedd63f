"""DiffusionMBIR (Chung et al., "Solving 3D inverse problems using pre-trained 2D diffusion models",
CVPR 2023): a 2D prior on every slice of a volume, coupled along the slice axis by total variation.

A volume is a batch of slices ``(D, C, H, W)`` (the slice axis z is the batch axis) measured slice by
slice by a 2D operator (CT: parallel beam per axial slice; MRI: a 2D mask per slice). For each step
``t → t'`` of the respaced schedule (states on the prior's [-1, 1] range)::

    ε    = model(x_t, t)                         (slices in chunks of ``chunk``)
    x̂₀   = (x_t − sqrt(1 − ᾱ) ε) / sqrt(ᾱ)       (clamped to [-1, 1])
    x̂₀   ← one ADMM iteration of min ½‖A x − y‖² + λ‖D_z x‖₁ from x̂₀ (on [0, 1]; :func:`admm_step`)
    x_t' = DDIM(x̂₀, ε, ᾱ', η)

with ``D_z x = x[1:] − x[:-1]`` the forward difference along z. The ADMM iteration solves
``(AᵀA + ρ D_zᵀD_z) x = Aᵀy + ρ D_zᵀ(z − u)`` by ``cg_iterations`` conjugate-gradient steps from the
current x̂₀ (the whole volume as one vector), then ``z ← soft(D_z x + u, λ/ρ)``, ``u ← u + D_z x − z``;
``z`` and ``u`` are carried across the steps (:func:`idm.physics.volume.admm_step`). With ``start_level`` σ₀ the volume starts from the
data-consistent mid-grey volume diffused to noise σ₀ (:func:`~idm.zeroshot.common.diffused_start`, as
``diffuserecon``; Gaussian-denoiser priors need it).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..physics.base import LinearOperator
from ..physics.ct import ParallelBeamCT
from ..physics.volume import admm_step, z_diff, ztv_defaults
from ..priors.schedule import NoiseSchedule, ddim_sigma, ddim_step, from_model_range, to_model_range, x0_from_eps
from .common import EpsModel, abar_at, diffused_start, initial_state, randn, timestep_pairs


#: CG steps per ADMM x-update: full-angle CT and MRI, and limited-angle CT (a wedge < 180°), whose
#: missing directions the measurements fill slowly — chosen on the tuning slices z = 16–23 of
#: ``example_ct`` at 30 steps (docs/mbir.md: at 23 views 20 steps lose 0.3 dB, at 90° they gain 0.9)
CG_ITERATIONS = {"full": 10, "limited": 20}
#: CT views covering less than this many degrees are limited angle (explicit angles subsampled from a
#: full scan cover 180° only up to their uneven spacing)
LIMITED_ANGLE = 175.0


def mbir_defaults(op: LinearOperator) -> dict[str, float | int]:
    """``{"lam", "rho", "cg_iterations"}`` for the operator: the z-TV ADMM's λ, ρ
    (:func:`idm.physics.volume.ztv_defaults`) and :data:`CG_ITERATIONS` (limited-angle CT, coverage
    below :data:`LIMITED_ANGLE`, or not)."""
    lam, rho = ztv_defaults(op)
    limited = isinstance(op, ParallelBeamCT) and op.coverage < LIMITED_ANGLE
    return {"lam": lam, "rho": rho, "cg_iterations": CG_ITERATIONS["limited" if limited else "full"]}


def sample_mbir(
    model: EpsModel,
    y: torch.Tensor,
    op: LinearOperator,
    schedule: NoiseSchedule,
    *,
    steps: int = 30,
    eta: float = 0.85,
    lam: float = 0.1,
    rho: float = 10.0,
    cg_iterations: int = 10,
    chunk: int = 8,
    start_level: float = 0.0,
    clip: bool = True,
    size_multiple: int = 1,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """DiffusionMBIR of a volume's measurements ``y`` (D, …: one item per slice) → the volume
    (D, C, *op.domain_size) on [0, 1], not clipped (module docstring).

    Args:
        model: ``model(x, t) -> ε`` for slices ``x`` (N, C, H', W') on [-1, 1], ``t`` (N,) timesteps.
        steps: respaced steps; eta: DDIM η of each step; lam, rho: λ and ρ of the z-TV ADMM (the
            registered method ``mbir`` defaults to :func:`mbir_defaults` of the operator);
        cg_iterations: CG steps per ADMM x-update; chunk: slices per model call (memory; the result
            does not depend on it); start_level: see the module docstring (0: from pure noise).
    """
    canvas, x = initial_state(y, op, size_multiple, generator)
    first = None
    if start_level > 0:
        first, x = diffused_start(x, y, op, canvas, schedule, start_level)
    z = torch.zeros_like(z_diff(canvas.crop(x)))
    u = torch.zeros_like(z)
    image = None
    for t, t_next in tqdm(timestep_pairs(schedule, steps, t_max=first), disable=not progress, desc="mbir", leave=False):
        abar, abar_next = abar_at(schedule, t), abar_at(schedule, t_next)
        timesteps = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        eps = torch.cat([model(x[i : i + chunk], timesteps[i : i + chunk]) for i in range(0, x.shape[0], chunk)])
        x0 = x0_from_eps(x, eps, abar)
        if clip:
            x0 = x0.clamp(-1.0, 1.0)
        image, z, u = admm_step(from_model_range(canvas.crop(x0)), y, op, z, u, lam, rho, cg_iterations)
        x0 = canvas.paste(x0, to_model_range(image))
        sigma = ddim_sigma(abar, abar_next, eta) if abar_next < 1.0 else 0.0
        noise = randn(x.shape, generator, x) if sigma > 0 else None
        x = ddim_step(x0, eps, abar_next, sigma=sigma, noise=noise)
    return image
