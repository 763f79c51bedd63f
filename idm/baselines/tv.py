"""``tv``: total-variation regularised reconstruction by FISTA with an inner TV proximal step.

Solves  min_x ½‖A x − y‖² + λ·TV(x)  subject to x ∈ [0, 1]  (isotropic TV, forward differences),
using only ``op.A`` / ``op.A_adjoint``, so it works for every operator:

* outer loop: FISTA (Beck & Teboulle 2009) with step 1/L, L = ‖A‖² estimated by power iteration
  (:meth:`LinearOperator.norm_squared`, kept on the operator per dtype and device);
* inner loop: the box-constrained TV proximal map by the fast gradient projection on the dual
  (Beck & Teboulle, "Fast gradient-based algorithms for constrained total variation image
  denoising and deblurring", 2009), warm-started from the previous outer iteration.

Medical operators:

* **MRI** (complex images, k-space data): TV of the complex image as in compressed-sensing MRI
  (Lustig, Donoho & Pauly, MRM 58:1182, 2007): ``TV(x) = Σ √(|∂₁x|² + |∂₂x|²)`` with complex
  forward differences (isotropic, Re and Im coupled); no box (the estimate is complex; compare
  magnitudes). Start: ``A†y`` (zero-filled / CG-SENSE).
* **CT** (real images, sinograms): the data term on the sinogram, box [0, 1] (HU-windowed
  images); start: FBP (``op.fbp``), clipped to the box.

Default λ and iterations by operator kind: :func:`default_lambda`, :func:`default_iterations`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import IDMError
from ..physics import MRI, BlockCS, Denoising, Inpainting, LinearOperator, ParallelBeamCT, SuperResolution
from ..physics._args import as_int
from ..registry import register_method
from ._common import on_device, reject_extra


def _diffs(x: torch.Tensor, volume: bool = False) -> tuple[torch.Tensor, ...]:
    """Forward differences along H and W (and, for a ``volume``, along the batch axis z: first),
    zero at the last row/column/slice (each ``x.shape``)."""
    planar = (
        torch.nn.functional.pad(torch.diff(x, dim=-2), (0, 0, 0, 1)),
        torch.nn.functional.pad(torch.diff(x, dim=-1), (0, 1)),
    )
    if not volume:
        return planar
    return (torch.cat((torch.diff(x, dim=0), torch.zeros_like(x[:1]))), *planar)


def _diffs_adjoint(*parts: torch.Tensor) -> torch.Tensor:
    """Adjoint of :func:`_diffs` (minus the divergence) of its 2 (image) or 3 (volume) fields."""
    *pz, px, py = parts
    out = torch.zeros_like(px)
    out[..., :-1, :] -= px[..., :-1, :]
    out[..., 1:, :] += px[..., :-1, :]
    out[..., :, :-1] -= py[..., :, :-1]
    out[..., :, 1:] += py[..., :, :-1]
    if pz:
        out[:-1] -= pz[0][:-1]
        out[1:] += pz[0][:-1]
    return out


def gradient(x: torch.Tensor, volume: bool = False) -> torch.Tensor:
    """Forward differences of ``(B, C, H, W)`` → ``(B, C, 2, H, W)`` (zero at the last row/column); a
    ``volume`` (the batch axis is z) → ``(B, C, 3, H, W)``, the z difference first."""
    return torch.stack(_diffs(x, volume), dim=2)


def gradient_adjoint(p: torch.Tensor) -> torch.Tensor:
    """Adjoint of :func:`gradient` (minus the divergence): ``(B, C, 2 or 3, H, W)`` → ``(B, C, H, W)``."""
    return _diffs_adjoint(*p.unbind(2))


def _magnitude(*parts: torch.Tensor) -> torch.Tensor:
    """Pointwise ``√(Σ |g|²)`` of the difference fields (``torch.hypot`` for two real fields; complex
    ones couple Re and Im)."""
    if len(parts) == 2 and not parts[0].is_complex():
        return torch.hypot(*parts)
    return sum(g.real.square() + g.imag.square() if g.is_complex() else g.square() for g in parts).sqrt()


def total_variation(x: torch.Tensor, volume: bool = False) -> torch.Tensor:
    """Isotropic TV per image: ``(B, C, H, W)`` → ``(B,)`` (complex images: complex differences). A
    ``volume`` (3D TV, the batch axis is z): per slice, its terms including the difference to the next
    slice; the sum is the volume's TV."""
    return _magnitude(*_diffs(x, volume)).sum(dim=(1, 2, 3))


def tv_prox(
    b: torch.Tensor, tau: float, dual: torch.Tensor, iterations: int, box: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """argmin_x ½‖x − b‖² + τ·TV(x) (+ x ∈ [0, 1] if ``box``), and the final dual field.

    ``dual`` (shape ``(B, C, 2, H, W)``, pointwise norm ≤ 1) warm-starts the dual iteration; a dual
    of shape ``(B, C, 3, H, W)`` makes it the 3D TV of ``b`` as a volume (the batch axis is z; see
    :func:`gradient`). Complex ``b`` (MRI): complex dual of the same shape, TV with complex
    differences; ``box`` must be False (there is no [0, 1] box for complex values).
    """
    if box and b.is_complex():
        raise IDMError("tv_prox: the [0, 1] box applies to real images only (pass box=False)")
    if tau <= 0.0:
        return (b.clamp(0.0, 1.0) if box else b), dual

    volume = dual.shape[2] == 3
    lipschitz = 4.0 * dual.shape[2]  # ‖∇‖² ≤ 4 per axis

    def primal(fields: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x = torch.add(b, _diffs_adjoint(*fields), alpha=-tau)
        return x.clamp_(0.0, 1.0) if box else x

    p = dual.unbind(2)
    q, t = p, 1.0
    for _ in range(iterations):
        s = tuple(g.mul_(1.0 / (lipschitz * tau)).add_(qi) for g, qi in zip(_diffs(primal(q), volume), q))
        scale = _magnitude(*s).clamp_min_(1.0)
        n = tuple(si.div_(scale) for si in s)
        t_new = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        weight = 1.0 + (t - 1.0) / t_new  # q = n + momentum·(n − p)
        q = tuple(torch.lerp(pi, ni, weight) for pi, ni in zip(p, n))
        p, t = n, t_new
    return primal(p), torch.stack(p, dim=2)


# noiseless λ for block CS by ratio (upper bounds), tuned on BSD68 (150 FISTA iterations)
BLOCKCS_LAMBDA = ((0.1, 2e-3), (0.5, 1e-3), (1.0, 3e-4))
INPAINTING_LAMBDA = 1.5e-3
#: noise adds NOISE_LAMBDA · σ · (measured fraction of the domain)
NOISE_LAMBDA = 0.5
#: MRI: noiseless λ/‖A‖² by the sampled fraction of k-space (upper bounds), images with max |x| = 1
MRI_LAMBDA = ((0.15, 3e-3), (1.0, 2e-3))
MRI_ITERATIONS = 100
#: CT: noiseless λ/‖A‖² (‖A‖² ≈ views·max(H, W)), images HU-windowed to [0, 1]
CT_LAMBDA = 2e-4
CT_ITERATIONS = 100


def measured_fraction(op: LinearOperator) -> float:
    """How much of the domain the measurements see: q/N, kept pixels, 1/f², 1 for denoising,
    the sampled fraction of k-space for MRI (any number of coils)."""
    if isinstance(op, BlockCS):
        return op.rows / op.block_pixels
    if isinstance(op, Inpainting):
        return float(op.mask.float().mean())
    if isinstance(op, SuperResolution):
        return 1.0 / op.factor**2
    if isinstance(op, Denoising):
        return 1.0
    if isinstance(op, MRI):
        return float(op.mask.float().mean())
    return min(1.0, math.prod(op.measurement_shape(1, 1)) / math.prod(op.domain_size))


def default_lambda(op: LinearOperator, like: torch.Tensor | None = None) -> float:
    """λ tuned for noiseless measurements, plus a term growing with the noise.

    Natural images: tuned on BSD68 crops. MRI and CT: ``λ₀ · ‖A‖²`` (``‖A‖²`` by
    :meth:`~idm.physics.LinearOperator.norm_squared` for ``like``'s dtype/device, CPU float32 by default), λ₀ from
    :data:`MRI_LAMBDA` / :data:`CT_LAMBDA`, tuned on fastMRI knee slices (4×/8×) and a
    TotalSegmentator CT slice (23 views); the noise term is not tuned for them.
    """
    if isinstance(op, BlockCS):
        base = next(lam for ratio, lam in BLOCKCS_LAMBDA if op.ratio <= ratio + 1e-9)
    elif isinstance(op, Inpainting):
        base = INPAINTING_LAMBDA
    elif isinstance(op, SuperResolution):
        base = 1e-3 / op.factor**2
    elif isinstance(op, Denoising):
        base = 0.0
    elif isinstance(op, (MRI, ParallelBeamCT)):
        if isinstance(op, MRI):
            fraction = measured_fraction(op)
            relative = next(lam for bound, lam in MRI_LAMBDA if fraction <= bound + 1e-9)
        else:
            relative = CT_LAMBDA
        if like is None:
            like = torch.zeros((), dtype=torch.complex64 if isinstance(op, MRI) else torch.float32)
        base = relative * op.norm_squared(like)
    else:
        base = 1e-3
    return base + NOISE_LAMBDA * op.noise.sigma * measured_fraction(op)


def default_iterations(op: LinearOperator) -> int:
    if isinstance(op, MRI):
        return MRI_ITERATIONS
    if isinstance(op, ParallelBeamCT):
        return CT_ITERATIONS
    return 50 if isinstance(op, Denoising) else 150


def start_estimate(op: LinearOperator, y: torch.Tensor) -> torch.Tensor:
    """FISTA's start: FBP for operators that have it (CT: cheap, the right scale), else ``A†y``."""
    fbp = getattr(op, "fbp", None)
    return fbp(y) if callable(fbp) else op.A_dagger(y)


def tv_reconstruct(
    op: LinearOperator,
    y: torch.Tensor,
    lam: float,
    iterations: int,
    inner_iterations: int = 3,
    box: bool = True,
    progress: bool = False,
    volume: bool = False,
) -> torch.Tensor:
    """FISTA on ½‖Ax − y‖² + λ·TV(x); returns x of shape ``(B, C, *op.domain_size)``.

    Real images: the box [0, 1] if ``box``. Complex measurements (MRI): a complex estimate with the
    TV of the complex image and no box (``box`` is ignored). ``volume``: the batch is the slices of
    one volume (z first) and TV is the isotropic 3D TV (:func:`gradient` with ``volume``).
    """
    if len(op.domain_size) != 2:
        raise IDMError(f"tv works on 2D images, the operator's domain is {op.domain_size}")
    step = 1.0 / (1.01 * op.norm_squared(y))  # 1 % margin: power iteration is a lower bound
    x = start_estimate(op, y)
    if x.is_complex():
        box = False
    elif y.is_complex():
        raise IDMError(f"tv: complex measurements of an operator with real images ({op.kind})")
    x = x.clamp(0.0, 1.0) if box else x
    z, t = x, 1.0
    dual = torch.zeros((*x.shape[:2], 3 if volume else 2, *x.shape[2:]), dtype=x.dtype, device=x.device)
    for _ in tqdm(range(iterations), desc="tv", disable=not progress, leave=False):
        b = z - step * op.A_adjoint(op.A(z) - y)
        x_new, dual = tv_prox(b, lam * step, dual, inner_iterations, box)
        t_new = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        z = x_new + ((t - 1.0) / t_new) * (x_new - x)
        x, t = x_new, t_new
    return x


@register_method("tv", "total-variation regularised reconstruction (FISTA, box [0, 1]; complex TV on MRI)")
def build(
    *,
    checkpoint: Any = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = False,
    lam: float | None = None,
    iterations: int | None = None,
    inner_iterations: int = 3,
    volume: bool = False,
    **options: Any,
):
    """``reconstruct(y, op)`` → TV estimate ``(B, C, *op.domain_size)`` in [0, 1] (MRI: complex,
    not boxed; metrics compare its magnitude).

    Options: ``lam`` (λ ≥ 0, default :func:`default_lambda` of the operator), ``iterations``
    (outer FISTA iterations, default :func:`default_iterations`), ``inner_iterations`` (TV prox
    iterations per outer one), ``volume`` (the batch is the slices of one volume, z first: 3D TV).
    Deterministic; ``seed`` is unused.
    """
    reject_extra("tv", checkpoint, options)
    if lam is not None and (isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not (0.0 <= lam < math.inf)):
        raise IDMError(f"tv: lam must be a finite number >= 0, got {lam!r}")
    if iterations is not None:
        iterations = as_int("tv: iterations", iterations, minimum=1)
    inner_iterations = as_int("tv: inner_iterations", inner_iterations, minimum=1)
    if not isinstance(volume, bool):
        raise IDMError(f"tv: volume must be true or false, got {volume!r}")

    @torch.no_grad()
    def solve(y: torch.Tensor, op: LinearOperator) -> torch.Tensor:
        return tv_reconstruct(
            op,
            y,
            default_lambda(op, y) if lam is None else float(lam),
            default_iterations(op) if iterations is None else iterations,
            inner_iterations,
            progress=progress,
            volume=volume,
        )

    return on_device(device, solve)
