"""The linear-operator interface shared by every reconstructor.

An operator maps an image ``x`` of shape ``(B, C, *domain_size)`` to measurements ``y`` of shape
``measurement_shape(B, C)``. Tensors are batch-first and may live on any device and dtype
(complex operators, e.g. MRI, and 3D volumes with ``domain_size = (D, H, W)`` use the same
interface). Images of the user's size ``image_size`` are embedded into the domain with
:meth:`pad` and recovered with :meth:`crop` (identity unless the operator needs padding, as
block CS does).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import IDMError
from .canvas import Canvas


class GaussianNoise:
    """Additive white Gaussian noise ``y + sigma·n`` (``sigma`` on the [0, 1] image scale)."""

    def __init__(self, sigma: float = 0.0) -> None:
        if not (sigma >= 0.0) or sigma != sigma:
            raise IDMError(f"noise level sigma must be >= 0, got {sigma}")
        self.sigma = float(sigma)

    def __call__(self, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.sigma == 0.0:
            return y
        noise = torch.randn(y.shape, generator=generator, dtype=y.real.dtype, device="cpu")
        if y.is_complex():
            imaginary = torch.randn(y.shape, generator=generator, dtype=y.real.dtype, device="cpu")
            noise = torch.complex(noise, imaginary) / 2**0.5
        return y + self.sigma * noise.to(y.device)


class LinearOperator:
    """Base class: subclasses implement :meth:`A`, :meth:`A_adjoint` and usually :meth:`A_dagger`.

    Attributes:
        image_size: spatial size of the user's images, e.g. ``(H, W)``.
        domain_size: spatial size the operator acts on (``image_size`` padded as needed).
        noise: the measurement noise model, applied by :meth:`measure`.
    """

    #: registry name, set by subclasses (used in measurement files and checkpoint configs)
    kind: str = "linear"

    def __init__(self, image_size: tuple[int, ...], noise_sigma: float = 0.0) -> None:
        if len(image_size) < 2 or any(int(s) <= 0 for s in image_size):
            raise IDMError(f"image size must be positive, got {tuple(image_size)}")
        self.image_size = tuple(int(s) for s in image_size)
        self.noise = GaussianNoise(noise_sigma)
        self._norm_squared: dict[tuple[torch.dtype, torch.device], float] = {}

    # --- the operator -------------------------------------------------------------------
    @property
    def domain_size(self) -> tuple[int, ...]:
        return self.image_size

    def A(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def A_dagger(self, y: torch.Tensor, iterations: int | None = None) -> torch.Tensor:
        """Pseudo-inverse A†y. The default solves the normal equations by ``iterations`` (50)
        conjugate-gradient steps (operators with an exact A† do not take ``iterations``)."""
        return conjugate_gradient(self.AtA, self.A_adjoint(y), iterations=50 if iterations is None else iterations)

    def AtA(self, x: torch.Tensor) -> torch.Tensor:
        return self.A_adjoint(self.A(x))

    def exact_norm_squared(self) -> float | None:
        """‖A‖² where the operator knows it in closed form (AᴴA a nonzero orthogonal projection: 1),
        else None. Subclasses override it; :meth:`norm_squared` then skips the power iteration."""
        return None

    def norm_squared(self, like: torch.Tensor | None = None, iterations: int = 30) -> float:
        """‖A‖², the largest eigenvalue of AᴴA: :meth:`exact_norm_squared` if known, else by power
        iteration from a seeded ``(1, 1, *domain)`` image of ``like``'s dtype and device (default CPU
        float32), computed once per dtype and device and kept on the operator (a lower bound that
        converges from below)."""
        exact = self.exact_norm_squared()
        if exact is not None:
            return exact
        dtype = like.dtype if like is not None else torch.float32
        device = like.device if like is not None else torch.device("cpu")
        if (dtype, device) not in self._norm_squared:
            generator = torch.Generator().manual_seed(0)
            x = torch.randn((1, 1, *self.domain_size), generator=generator, dtype=dtype).to(device)
            x = x / x.norm()
            value = 0.0
            for _ in range(iterations):
                x = self.AtA(x)
                value = float(x.norm())
                if value == 0.0:
                    raise IDMError(f"operator {self!r} is zero; nothing to reconstruct")
                x = x / value
            self._norm_squared[(dtype, device)] = value
        return self._norm_squared[(dtype, device)]

    def measurement_shape(self, batch: int, channels: int) -> tuple[int, ...]:
        probe = torch.zeros(1, 1, *self.domain_size)
        return (batch, channels, *self.A(probe).shape[2:])

    # --- measuring ----------------------------------------------------------------------
    def measure(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Noisy measurements ``A(pad(x)) + noise`` of images ``x`` of shape ``(B, C, *image_size)``."""
        return self.noise(self.A(self.pad(x)), generator)

    def project(self, x: torch.Tensor, y: torch.Tensor, weight: float = 1.0,
                iterations: int | None = None) -> torch.Tensor:
        """Range-null-space data consistency ``x − weight·A†(A x − y)`` of a domain image on [0, 1].

        ``x`` (B, C, *domain_size); with ``weight = 1`` and ``A A† = I`` the result satisfies
        ``A x = y`` (it is ``A†y + (I − A†A) x``; Wang et al., "DDNM", ICLR 2023); ``weight = 0``
        returns ``x`` itself. The one data-consistency step of every reconstructor in ``idm``.
        ``iterations``: for operators whose A† is iterative (CT, multi-coil MRI: conjugate
        gradients), the CG steps of this solve (None: the operator's own); a few steps from 0 on the
        residual give an inexact but cheap correction (Chung et al., "Decomposed diffusion sampler", ICLR 2024).
        """
        if weight == 0.0:
            return x
        residual = self.A(x) - y
        return x - weight * (self.A_dagger(residual) if iterations is None else self.A_dagger(residual, iterations=iterations))

    @property
    def canvas(self) -> Canvas:
        """The user's image size inside the operator's domain."""
        return Canvas(self.image_size, self.domain_size)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Embed ``(B, C, *image_size)`` into the domain (zero padding at the end of each axis)."""
        self.check_image(x)
        return self.canvas.pad(x)

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`pad`: ``(B, C, *domain_size)`` → ``(B, C, *image_size)``."""
        return self.canvas.crop(x)

    def check_domain(self, x: torch.Tensor) -> None:
        """Raise :class:`IDMError` unless ``x`` has shape ``(B, C, *domain_size)``."""
        if x.ndim != 2 + len(self.domain_size) or tuple(x.shape[2:]) != self.domain_size:
            raise IDMError(
                f"tensor of shape {tuple(x.shape)} does not match the operator's domain "
                f"{self.domain_size}; expected (B, C, {', '.join(map(str, self.domain_size))})"
            )

    def check_measurements(self, y: torch.Tensor) -> None:
        """Raise :class:`IDMError` unless ``y`` has shape ``measurement_shape(B, C)``."""
        expected = tuple(self.measurement_shape(1, 1)[2:])
        if y.ndim != 2 + len(expected) or tuple(y.shape[2:]) != expected:
            raise IDMError(
                f"measurements of shape {tuple(y.shape)} do not match the operator {self!r}; "
                f"expected (B, C, {', '.join(map(str, expected))})"
            )

    def check_image(self, x: torch.Tensor) -> None:
        if x.ndim != 2 + len(self.image_size) or tuple(x.shape[2:]) != self.image_size:
            raise IDMError(
                f"image of shape {tuple(x.shape)} does not match the operator's image size "
                f"{self.image_size}; expected (B, C, {', '.join(map(str, self.image_size))})"
            )

    # --- description --------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """JSON-serialisable description; ``make_operator(op.config(), op.tensors())`` rebuilds it."""
        return {"kind": self.kind, "image_size": list(self.image_size), "noise_sigma": self.noise.sigma}

    def tensors(self) -> dict[str, torch.Tensor]:
        """Tensors that cannot go in :meth:`config` (e.g. an explicit mask), keyed by argument name.

        ``config()`` holds the string ``"explicit"`` for each of them; measurement files store them
        next to the config and hand them back to ``make_operator(config, tensors)``.
        """
        return {}

    def with_image_size(self, image_size: tuple[int, ...]) -> "LinearOperator":
        """The same operator (same seeds and parameters) for images of another size."""
        return type(self)(**{**self.config_args(), "image_size": tuple(image_size)})

    def config_args(self) -> dict[str, Any]:
        args = dict(self.config())
        args.pop("kind")
        return args

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.config_args().items())
        return f"{type(self).__name__}({args})"


def conjugate_gradient(
    apply: "callable", b: torch.Tensor, iterations: int = 50, tol: float = 1e-10
) -> torch.Tensor:
    """Solve ``apply(x) = b`` for a symmetric positive semi-definite ``apply``, batch-wise, from x = 0.

    Stops after ``iterations`` or once every item's residual ``‖b − apply(x)‖`` (as CG's recursion
    tracks it) is below ``tol`` or at the rounding level, ``100·eps·‖b‖`` (eps of the dtype), or its
    search direction ``p`` has a Rayleigh quotient ``pᵀAp / pᵀp`` below ``100·eps`` times the largest
    seen (a direction of the numerical null space); an item that stopped stays where it is while the
    others go on, so an item's result does not depend on the rest of the batch. (Past the rounding
    level a step along such a direction can be arbitrarily long without the residual showing it: a
    masked Fourier operator's ``AᵀA`` is a projection, exact after one step.) In floating point a *singular* system (e.g. masked Fourier
    measurements plus a difference penalty sharing a null space) stalls at the rounding level and
    then diverges: an item whose residual grows 1000-fold above its smallest stops there and gets its
    iterate of smallest residual instead of the last."""
    dims = tuple(range(1, b.ndim))
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = (r.conj() * r).real.sum(dims, keepdim=True)
    best, best_rs = x, rs
    rounding = 100 * torch.finfo(rs.dtype).eps
    floor = torch.clamp_min(rs * rounding**2, tol * tol)  # per item
    diverged = torch.zeros_like(rs, dtype=torch.bool)
    done = rs <= floor
    largest = torch.zeros_like(rs)  # largest Rayleigh quotient seen: ≈ ‖A‖ along the Krylov space
    for _ in range(iterations):
        if bool(done.all()):
            break
        Ap = apply(p)
        pAp = (p.conj() * Ap).real.sum(dims, keepdim=True)
        quotient = pAp / (p.conj() * p).real.sum(dims, keepdim=True).clamp_min(1e-30)
        largest = torch.maximum(largest, quotient)
        done = done | (quotient <= rounding * largest)  # p in the numerical null space: no step
        alpha = torch.where(done, 0.0, rs / pAp.clamp_min(1e-30))  # a stopped item stays where it is
        x = x + alpha * p
        r = r - alpha * Ap
        rs_new = (r.conj() * r).real.sum(dims, keepdim=True)
        improved = rs_new < best_rs
        best, best_rs = torch.where(improved, x, best), torch.where(improved, rs_new, best_rs)
        diverged = diverged | (rs_new > 1e6 * best_rs)
        done = done | diverged | (rs_new <= floor)
        p = torch.where(done, p, r + (rs_new / rs.clamp_min(1e-30)) * p)
        rs = rs_new
    return torch.where(diverged, best, x)
