"""MRI: undersampled Cartesian k-space, single-coil and multi-coil (SENSE).

Convention (the one used throughout ``idm`` for MRI): the operator works on **complex** images
``x`` of shape ``(B, 1, H, W)`` (``complex64`` or ``complex128``); real images are accepted and
read as having zero imaginary part (``float32`` → ``complex64``, ``float64`` → ``complex128``),
and every output (``A``, ``A_adjoint``, ``A_dagger``, ``project``) is complex. Networks that want
real channels use :func:`complex_to_channels` / :func:`channels_to_complex`
(``(B, 1, H, W)`` complex ↔ ``(B, 2, H, W)`` real, channels ``[Re, Im]``).

k-space is the centred orthonormal DFT over the last two axes,
``F x = fftshift(fft2(ifftshift(x)), norm="ortho")`` (:func:`fft2c`, :func:`ifft2c`), so the
k-space centre (DC) sits at index ``(H // 2, W // 2)`` and ``‖F x‖ = ‖x‖``.

Forward model (SENSE; Pruessmann et al., MRM 1999 and 2001), for coils ``c = 1 … Nc``:

    y_c = M ⊙ F(S_c ⊙ x),        Aᴴ y = Σ_c conj(S_c) ⊙ F⁻¹(M ⊙ y_c)

with a 0/1 sampling mask ``M`` (H, W) and sensitivities ``S`` (Nc, H, W); single-coil is
``Nc = 1, S = 1``. Measurements ``y`` have shape ``(B, Nc, H, W)`` (``(B, C, H, W)`` for
single-coil images with C channels) and are zero outside the mask.

Masks (fastMRI: Zbontar et al., arXiv:1811.08839, 2018): 1D Cartesian along the phase-encode
direction = the columns (last axis), the same for every row; the centre ``round(W·center_fraction)``
columns are fully sampled and the others are drawn so the total is ``W / acceleration`` on
average; default centre fraction ``0.32 / acceleration`` (0.08 at 4×, 0.04 at 8×, as fastMRI).
Sensitivities from the fully sampled centre: :func:`estimate_sensitivities` (ESPIRiT; Uecker et
al., MRM 2014).
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import IDMError
from ._args import as_int, image_size_2d
from .base import LinearOperator, conjugate_gradient

#: mask kinds a generated mask can have (``MRI(mask_type=...)``)
MASK_TYPES = ("random", "equispaced", "poisson")

_DIMS = (-2, -1)


# --- Fourier transforms ------------------------------------------------------------------
def fft2c(x: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2D DFT over the last two axes: ``fftshift(fft2(ifftshift(x)), ortho)``."""
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=_DIMS), norm="ortho"), dim=_DIMS)


def ifft2c(k: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fft2c`: ``fftshift(ifft2(ifftshift(k)), ortho)``."""
    return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(k, dim=_DIMS), norm="ortho"), dim=_DIMS)


# --- complex ↔ real channels -----------------------------------------------------------------
def complex_to_channels(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, *spatial)`` complex → ``(B, 2C, *spatial)`` real, channels ``[Re x₁, Im x₁, Re x₂, …]``."""
    if not x.is_complex() or x.ndim < 3:
        raise IDMError(f"complex_to_channels expects a complex tensor (B, C, ...), got {x.dtype} {tuple(x.shape)}")
    parts = torch.view_as_real(x)  # (B, C, *spatial, 2)
    return parts.movedim(-1, 2).reshape(x.shape[0], 2 * x.shape[1], *x.shape[2:])


def channels_to_complex(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`complex_to_channels`: ``(B, 2C, *spatial)`` real → ``(B, C, *spatial)`` complex."""
    if x.is_complex() or not x.is_floating_point() or x.ndim < 3 or x.shape[1] % 2:
        raise IDMError(f"channels_to_complex expects a real tensor (B, 2C, ...), got {x.dtype} {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    pairs = x.reshape(x.shape[0], x.shape[1] // 2, 2, *x.shape[2:]).movedim(2, -1)
    return torch.view_as_complex(pairs.contiguous())


def split_groups(x: torch.Tensor, group: int) -> torch.Tensor:
    """``(B, g·c, H, W) → (g·B, c, H, W)``: item ``i·B + b`` is channel block ``i`` of image ``b``
    (complex images as ``[Re, Im]`` channels through a ``c``-channel network: ``g = 2``)."""
    return torch.cat(x.chunk(group, dim=1), dim=0) if group > 1 else x


def merge_groups(h: torch.Tensor, group: int) -> torch.Tensor:
    """The inverse of :func:`split_groups`: ``(g·B, c, H, W) → (B, g·c, H, W)``."""
    return torch.cat(h.chunk(group, dim=0), dim=1) if group > 1 else h


class ComplexParts(LinearOperator):
    """A complex-image operator ``op`` seen by solvers of real [0, 1] images (zero-shot diffusion).

    The real image ``u`` (B, 2C, H, W) holds the parts of the complex image ``v`` (B, C, H, W),
    ``[Re v, Im v] = 2u − 1`` (parts on [−1, 1] ↔ u on [0, 1]: a solver's model range *is* the
    parts, as :func:`idm.zeroshot.pnp.complex_denoiser` sees them). Then
    ``op.A(v) = 2·A_u(u) − A_u(1)`` with the linear ``A_u(u) = op.A(channels_to_complex(u))``, so
    measurements ``y`` of ``v`` are measurements :meth:`measurements` ``(y + A_u(1))/2`` of ``u``
    (noise std halved); :meth:`image` maps a solution back to ``v``.
    """

    kind = "complex-parts"

    def __init__(self, op: LinearOperator) -> None:
        super().__init__(op.image_size, op.noise.sigma / 2)
        self.op = op

    @property
    def domain_size(self) -> tuple[int, ...]:
        return self.op.domain_size

    def A(self, u: torch.Tensor) -> torch.Tensor:
        return self.op.A(channels_to_complex(u))

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return complex_to_channels(self.op.A_adjoint(y))

    def A_dagger(self, y: torch.Tensor, iterations: int | None = None) -> torch.Tensor:
        return complex_to_channels(self.op.A_dagger(y) if iterations is None else self.op.A_dagger(y, iterations=iterations))

    def project(self, u: torch.Tensor, y: torch.Tensor, weight: float = 1.0,
                iterations: int | None = None) -> torch.Tensor:
        return complex_to_channels(self.op.project(channels_to_complex(u), y, weight, iterations)).to(u.dtype)

    def exact_norm_squared(self) -> float | None:
        return self.op.exact_norm_squared()

    def measurement_shape(self, batch: int, channels: int) -> tuple[int, ...]:
        return self.op.measurement_shape(batch, channels // 2)

    def check_measurements(self, y: torch.Tensor) -> None:
        self.op.check_measurements(y)

    def measurements(self, y: torch.Tensor) -> torch.Tensor:
        """Measurements ``y`` of complex images ``v`` → those of their parts image ``u``."""
        ones = torch.ones((1, 2, *self.domain_size), dtype=y.real.dtype, device=y.device)
        return (y + self.A(ones)) / 2

    def image(self, u: torch.Tensor) -> torch.Tensor:
        """A parts image ``u`` (B, 2C, *domain) on [0, 1] → the complex image ``v`` (B, C, *domain)."""
        return channels_to_complex(2 * u - 1)

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "op": self.op.config()}


def _as_complex(x: torch.Tensor, what: str) -> torch.Tensor:
    """``x`` as complex64/complex128 (real float32/float64 get a zero imaginary part)."""
    if not isinstance(x, torch.Tensor):
        raise IDMError(f"MRI {what} must be a torch tensor, got {type(x).__name__}")
    if x.dtype in (torch.complex64, torch.complex128):
        return x
    if x.dtype in (torch.float32, torch.float64):
        return x.to(torch.complex64 if x.dtype == torch.float32 else torch.complex128)
    raise IDMError(f"MRI {what} must be complex64/complex128 (or real float32/float64), got {x.dtype}")


# --- sampling masks ----------------------------------------------------------------------
def default_center_fraction(acceleration: float) -> float:
    """``0.32 / acceleration``: fastMRI's 0.08 at 4× and 0.04 at 8×."""
    return 0.32 / acceleration


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _mask_args(shape: Any, acceleration: Any, center_fraction: Any, seed: Any) -> tuple:
    """Validated ``(shape, acceleration, center_fraction, seed)`` (the default centre fraction filled in)."""
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise IDMError(f"mask shape must be a tuple of sizes, got {shape!r}") from None
    if not shape or any(s <= 0 for s in shape):
        raise IDMError(f"mask shape must be positive, got {shape}")
    if not _is_number(acceleration) or not acceleration >= 1:
        raise IDMError(f"MRI acceleration must be a number >= 1, got {acceleration!r}")
    acceleration = float(acceleration)
    if center_fraction is None:
        center_fraction = default_center_fraction(acceleration)
    if not _is_number(center_fraction) or not 0 <= center_fraction <= 1:
        raise IDMError(f"MRI center fraction must lie in [0, 1], got {center_fraction!r}")
    return shape, acceleration, float(center_fraction), as_int("mask seed", seed)


def _centre_lines(width: int, center_fraction: float, acceleration: float) -> tuple[int, int]:
    """(first index, count) of the fully sampled centre: ``round(W·cf)`` lines around index ``W // 2``."""
    count = round(width * center_fraction)
    if count > width / acceleration + 1e-9:
        raise IDMError(
            f"MRI center fraction {center_fraction:g} ({count} of {width} lines) exceeds the budget of "
            f"1/acceleration = {1 / acceleration:g}"
        )
    return (width - count + 1) // 2, count


def _broadcast_columns(columns: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return columns.expand(shape).clone()


def random_mask(
    shape: tuple[int, ...], acceleration: float, center_fraction: float | None = None, seed: int = 0
) -> torch.Tensor:
    """fastMRI random 1D Cartesian mask, bool of ``shape`` (the same columns for every row).

    The ``n = round(W·center_fraction)`` centre columns are kept; each other column is kept with
    probability ``(W/acceleration − n) / (W − n)``, so ``E[#columns] = W / acceleration``.
    """
    shape, acceleration, center_fraction, seed = _mask_args(shape, acceleration, center_fraction, seed)
    width = shape[-1]
    start, count = _centre_lines(width, center_fraction, acceleration)
    generator = torch.Generator().manual_seed(seed)
    probability = (width / acceleration - count) / (width - count) if width > count else 0.0
    columns = torch.rand(width, generator=generator, dtype=torch.float64) < probability
    columns[start : start + count] = True
    return _broadcast_columns(columns, shape)


def equispaced_mask(
    shape: tuple[int, ...], acceleration: float, center_fraction: float | None = None, seed: int = 0
) -> torch.Tensor:
    """fastMRI equispaced 1D Cartesian mask (the "fraction" variant), bool of ``shape``.

    The ``n = round(W·center_fraction)`` centre columns plus columns every
    ``a' = acceleration·(n − W) / (n·acceleration − W)`` lines (rounded) from a random offset in
    ``[0, round(a'))`` drawn from ``seed``; ``a'`` is chosen so the total is ≈ ``W / acceleration``.
    """
    shape, acceleration, center_fraction, seed = _mask_args(shape, acceleration, center_fraction, seed)
    width = shape[-1]
    start, count = _centre_lines(width, center_fraction, acceleration)
    columns = torch.zeros(width, dtype=torch.bool)
    budget = width - count * acceleration
    if budget > 1e-9:  # room for lines outside the centre
        spacing = acceleration * (width - count) / budget
        generator = torch.Generator().manual_seed(seed)
        offset = int(torch.randint(0, max(1, round(spacing)), (1,), generator=generator))
        lines = torch.arange(offset, width - 1, spacing, dtype=torch.float64).round().long()
        columns[lines.clamp_max(width - 1)] = True
    columns[start : start + count] = True
    return _broadcast_columns(columns, shape)


def poisson_mask(
    shape: tuple[int, ...], acceleration: float, center_fraction: float | None = None, seed: int = 0, power: float = 2.0
) -> torch.Tensor:
    """2D variable-density random mask, bool ``(H, W)`` with exactly ``round(H·W / acceleration)`` samples.

    A centred ``round(H·cf) × round(W·cf)`` block is fully sampled; the other samples are drawn
    without replacement with density ``∝ (1 − r/√2)^power + 10⁻⁶``, ``r`` the radius in k-space
    normalised to 1 at the edges (Lustig et al., MRM 2007). It is *not* a true Poisson disc (no
    minimum distance between samples), only its variable-density profile.
    """
    shape, acceleration, center_fraction, seed = _mask_args(shape, acceleration, center_fraction, seed)
    if len(shape) != 2:
        raise IDMError(f"a poisson mask is 2D (H, W), got shape {shape}")
    height, width = shape
    total = round(height * width / acceleration)
    (row0, rows), (col0, cols) = (_centre_lines(n, center_fraction, 1.0) for n in shape)
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[row0 : row0 + rows, col0 : col0 + cols] = True
    if rows * cols > total:
        raise IDMError(f"the poisson mask's centre ({rows}×{cols}) exceeds its {total} samples at {acceleration:g}×")
    ky = (torch.arange(height, dtype=torch.float64) - height // 2) / (height / 2)
    kx = (torch.arange(width, dtype=torch.float64) - width // 2) / (width / 2)
    radius = (ky[:, None].square() + kx[None, :].square()).sqrt() / math.sqrt(2)
    weights = (1 - radius).clamp_min(0) ** float(power) + 1e-6
    weights[mask] = 0.0
    if total > rows * cols:
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.multinomial(weights.flatten(), total - rows * cols, replacement=False, generator=generator)
        mask.view(-1)[chosen] = True
    return mask


def withhold_lines(mask: torch.Tensor, keep: float, generator: torch.Generator) -> torch.Tensor:
    """A copy of a 1D Cartesian ``mask`` (bool (H, W), the same columns in every row) in which each
    sampled column outside the contiguous sampled run through the centre column ``W // 2`` is kept
    with probability ``keep`` (drawn from ``generator``); the centre run is always kept."""
    mask = torch.as_tensor(mask).bool()
    if mask.ndim != 2 or not bool((mask == mask[:1]).all()):
        raise IDMError("withholding lines needs a 1D Cartesian mask (the same sampled columns in every row)")
    if not 0.0 < keep <= 1.0:
        raise IDMError(f"the kept fraction of lines must lie in (0, 1], got {keep!r}")
    columns = mask[0].clone()
    width, centre = columns.numel(), columns.numel() // 2
    low, high = centre, centre
    while low > 0 and columns[low - 1]:
        low -= 1
    while high < width - 1 and columns[high + 1]:
        high += 1
    draw = torch.rand(width, generator=generator, dtype=torch.float64) < keep
    outer = torch.ones(width, dtype=torch.bool)
    outer[low : high + 1] = False
    columns[outer] &= draw[outer]
    return _broadcast_columns(columns, tuple(mask.shape))


def make_mask(
    mask_type: str, shape: tuple[int, ...], acceleration: float, center_fraction: float | None = None, seed: int = 0
) -> torch.Tensor:
    """The mask of kind ``mask_type`` (one of :data:`MASK_TYPES`), bool of ``shape``."""
    if mask_type == "random":
        return random_mask(shape, acceleration, center_fraction, seed)
    if mask_type == "equispaced":
        return equispaced_mask(shape, acceleration, center_fraction, seed)
    if mask_type == "poisson":
        return poisson_mask(shape, acceleration, center_fraction, seed)
    raise IDMError(f"unknown MRI mask type {mask_type!r}; available: {', '.join(MASK_TYPES)}")


def load_mask(mask: Any, shape: tuple[int, int]) -> torch.Tensor:
    """A user's 0/1 mask as bool ``shape = (H, W)``.

    ``mask``: a tensor/array (or a path to ``.npy``, ``.pt``/``.pth`` or a ``.mat`` holding one
    array) of shape ``(H, W)``, or ``(W,)`` for 1D column sampling (repeated for every row).
    """
    if isinstance(mask, (str, Path)):
        path = Path(mask)
        if not path.is_file():
            raise IDMError(f"MRI mask file {str(path)!r} does not exist")
        if path.suffix == ".npy":
            mask = np.load(path)
        elif path.suffix in (".pt", ".pth"):
            mask = torch.load(path, map_location="cpu", weights_only=True)
        elif path.suffix == ".mat":
            import scipy.io

            arrays = [v for k, v in scipy.io.loadmat(path).items() if not k.startswith("__")]
            if len(arrays) != 1:
                raise IDMError(f"MRI mask file {str(path)!r} must hold exactly one array, found {len(arrays)}")
            mask = arrays[0]
        else:
            raise IDMError(f"MRI mask file {str(path)!r}: use .npy, .pt/.pth or .mat")
    try:
        mask = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).detach().cpu()
    except (TypeError, ValueError):
        raise IDMError(f"MRI mask must be an array of 0/1, got {type(mask).__name__}") from None
    if mask.ndim == 1 and mask.shape[0] == shape[-1]:
        mask = mask.expand(shape)
    if tuple(mask.shape) != tuple(shape):
        raise IDMError(
            f"MRI mask of shape {tuple(mask.shape)} matches neither the image size {tuple(shape)} "
            f"nor ({shape[-1]},) columns"
        )
    if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        raise IDMError("MRI mask must contain only 0 and 1")
    return mask.to(torch.bool).clone()


# --- the operator ------------------------------------------------------------------------
class MRI(LinearOperator):
    """Cartesian (multi-coil) MRI ``y_c = M ⊙ F(S_c x)`` on complex images ``(B, 1, H, W)``.

    Mask: explicit ``mask`` ((H, W) or (W,) 0/1 array, or a file; see :func:`load_mask`) or
    generated from ``(mask_type, acceleration, center_fraction, seed)`` (:func:`make_mask`).
    Sensitivities: ``None`` (single-coil; images may then have any number of channels C, each
    measured on its own: y ``(B, C, H, W)``) or an explicit ``(Nc, H, W)`` complex tensor
    (multi-coil; images ``(B, 1, H, W)``, y ``(B, Nc, H, W)``).

    ``A†``: single-coil ``A† = Aᴴ = F⁻¹ M`` (zero-filled inverse FFT; exact, ``A A† y = y`` for
    ``y`` zero outside the mask); multi-coil: CG-SENSE, ``cg_iterations`` conjugate-gradient steps
    on ``AᴴA x = Aᴴy`` from 0 (stopping early at ``‖r‖ ≤ cg_tol·‖Aᴴy‖``; Pruessmann et al. 2001).
    Noise: complex Gaussian with ``E|n|² = noise_sigma²``.

    ``config()`` holds ``"explicit"`` for an explicit mask and for the sensitivities; the tensors
    themselves are in :meth:`tensors` for ``make_operator(config, tensors)``.
    """

    kind = "mri"

    def __init__(
        self,
        image_size: tuple[int, ...],
        acceleration: float | None = None,
        center_fraction: float | None = None,
        mask_type: str = "random",
        seed: int = 0,
        mask: Any = None,
        sensitivities: Any = None,
        noise_sigma: float = 0.0,
        cg_iterations: int = 30,
        cg_tol: float = 1e-6,
    ) -> None:
        super().__init__(image_size, noise_sigma)
        image_size_2d(self.kind, self.image_size)
        if (mask is None) == (acceleration is None):
            raise IDMError("MRI needs exactly one of an explicit mask or an acceleration")
        if mask_type not in MASK_TYPES:
            raise IDMError(f"unknown MRI mask type {mask_type!r}; available: {', '.join(MASK_TYPES)}")
        self.mask_type = mask_type
        self.seed = as_int("mask seed", seed)
        self.cg_iterations = as_int("CG iterations", cg_iterations, minimum=1)
        if not _is_number(cg_tol) or not cg_tol >= 0:
            raise IDMError(f"CG tolerance must be a number >= 0, got {cg_tol!r}")
        self.cg_tol = float(cg_tol)
        if mask is None:
            _, self.acceleration, self.center_fraction, _ = _mask_args(
                self.image_size, acceleration, center_fraction, seed
            )
            self._mask = make_mask(mask_type, self.image_size, self.acceleration, self.center_fraction, self.seed)
        else:
            if isinstance(mask, str) and mask == "explicit":
                raise IDMError("MRI mask 'explicit' is not a tensor; pass the stored one to make_operator(config, tensors)")
            self.acceleration = self.center_fraction = None
            self._mask = load_mask(mask, self.image_size)
        self._sens = None if sensitivities is None else self._explicit_sensitivities(sensitivities)
        self._cast: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def _explicit_sensitivities(self, sens: Any) -> torch.Tensor:
        if isinstance(sens, str):
            raise IDMError(f"MRI sensitivities {sens!r} are not a tensor; pass them to make_operator(config, tensors)")
        sens = torch.as_tensor(sens).detach().cpu()
        if sens.ndim != 3 or tuple(sens.shape[1:]) != self.image_size or sens.shape[0] < 1:
            size = ", ".join(map(str, self.image_size))
            raise IDMError(f"MRI sensitivities of shape {tuple(sens.shape)} must be (Ncoil, {size})")
        sens = _as_complex(sens if sens.is_complex() or sens.is_floating_point() else sens.double(), "sensitivities")
        if not bool(torch.isfinite(torch.view_as_real(sens)).all()):
            raise IDMError("MRI sensitivities contain NaN or infinite values")
        return sens.to(torch.complex64).clone()

    # --- properties -------------------------------------------------------------------
    @property
    def explicit(self) -> bool:
        """Whether the mask is explicit (not described by mask type, acceleration and seed)."""
        return self.acceleration is None

    @property
    def mask(self) -> torch.Tensor:
        """The (H, W) bool sampling mask on the CPU."""
        return self._mask

    @property
    def sensitivities(self) -> torch.Tensor | None:
        """The (Nc, H, W) complex64 coil sensitivities on the CPU, or ``None`` (single-coil)."""
        return self._sens

    @property
    def coils(self) -> int:
        return 1 if self._sens is None else self._sens.shape[0]

    def _as(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The mask (real dtype of ``like``) or sensitivities (dtype of ``like``) on ``like``'s device."""
        dtype = like.real.dtype if name == "mask" else like.dtype
        key = (name, dtype, like.device)
        if key not in self._cast:
            source = self._mask if name == "mask" else self._sens
            self._cast[key] = source.to(device=like.device, dtype=dtype)
        return self._cast[key]

    # --- the operator -------------------------------------------------------------------
    def A(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` (``(B, C, H, W)`` single-coil) → ``(B, Nc, H, W)`` complex, 0 off the mask."""
        x = _as_complex(x, "image")
        self.check_domain(x)
        if self._sens is not None:
            x = x * self._as("sens", x)  # (B, 1, H, W) · (Nc, H, W) → (B, Nc, H, W)
        return fft2c(x) * self._as("mask", x)

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``Aᴴ y = Σ_c conj(S_c) F⁻¹(M ⊙ y_c)``: ``(B, Nc, H, W)`` → ``(B, 1, H, W)`` complex."""
        y = _as_complex(y, "measurements")
        self.check_measurements(y)
        x = ifft2c(y * self._as("mask", y))
        if self._sens is not None:
            x = (x * self._as("sens", y).conj()).sum(1, keepdim=True)
        return x

    def exact_norm_squared(self) -> float | None:
        """Single-coil: 1 (AᴴA = F⁻¹ M F, a projection) unless the mask is empty; multi-coil: None
        (it depends on the sensitivities)."""
        return 1.0 if self._sens is None and bool(self._mask.any()) else None

    def A_dagger(self, y: torch.Tensor, iterations: int | None = None) -> torch.Tensor:
        """Zero-filled ``F⁻¹ M y`` (single-coil, exact) or CG-SENSE ``(AᴴA)⁻¹ Aᴴ y`` (multi-coil;
        ``iterations`` CG steps, default :attr:`cg_iterations`)."""
        b = self.A_adjoint(y)
        if self._sens is None:
            return b
        dims = tuple(range(1, b.ndim))
        tol = self.cg_tol * float(b.detach().abs().square().sum(dims).sqrt().min()) if b.numel() else 0.0
        steps = self.cg_iterations if iterations is None else as_int("CG iterations", iterations, minimum=1)
        return conjugate_gradient(self.AtA, b, iterations=steps, tol=tol)

    def measurement_shape(self, batch: int, channels: int) -> tuple[int, ...]:
        if self._sens is None:
            return (batch, channels, *self.image_size)
        if channels != 1:
            raise IDMError(f"multi-coil MRI images have one channel (B, 1, H, W), got {channels} channels")
        return (batch, self.coils, *self.image_size)

    def check_domain(self, x: torch.Tensor) -> None:
        super().check_domain(x)
        if self._sens is not None and x.shape[1] != 1:
            raise IDMError(f"multi-coil MRI images must be (B, 1, H, W), got shape {tuple(x.shape)}")

    def check_measurements(self, y: torch.Tensor) -> None:
        wrong_coils = self._sens is not None and y.ndim > 1 and y.shape[1] != self.coils
        if y.ndim != 4 or tuple(y.shape[2:]) != self.image_size or wrong_coils:
            coils = "C" if self._sens is None else str(self.coils)
            raise IDMError(
                f"measurements of shape {tuple(y.shape)} do not match the operator {self!r}; "
                f"expected (B, {coils}, {', '.join(map(str, self.image_size))})"
            )

    # --- description --------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        config = super().config()
        if self.explicit:
            config["mask"] = "explicit"
        else:
            config.update(
                mask_type=self.mask_type,
                acceleration=self.acceleration,
                center_fraction=self.center_fraction,
                seed=self.seed,
            )
        if self._sens is not None:
            config["sensitivities"] = "explicit"
        return {**config, "cg_iterations": self.cg_iterations, "cg_tol": self.cg_tol}

    def tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"mask": self._mask.clone()} if self.explicit else {}
        if self._sens is not None:
            tensors["sensitivities"] = self._sens.clone()
        return tensors

    def with_mask(self, mask: Any) -> "MRI":
        """The same operator (sensitivities, noise, CG settings) with another explicit ``mask``."""
        args = {key: value for key, value in self.config_args().items()
                if key in ("image_size", "noise_sigma", "cg_iterations", "cg_tol")}
        return MRI(**args, mask=mask, sensitivities=self._sens)

    def with_image_size(self, image_size: tuple[int, ...]) -> "MRI":
        tensors = self.tensors()
        if tensors and tuple(image_size) != self.image_size:
            raise IDMError(
                f"an MRI operator with an explicit {' and '.join(sorted(tensors))} of size {self.image_size} "
                f"cannot be used for images of size {tuple(image_size)}"
            )
        return MRI(**{**self.config_args(), **tensors, "image_size": tuple(image_size)})


# --- coil sensitivities ------------------------------------------------------------------
def estimate_sensitivities(
    kspace: torch.Tensor,
    calibration: int | tuple[int, int] = 24,
    kernel: int = 6,
    threshold: float = 0.02,
    crop: float = 0.95,
) -> torch.Tensor:
    """ESPIRiT coil sensitivities (Uecker et al., MRM 71:990, 2014) from the fully sampled centre.

    Args:
        kspace: ``(Nc, H, W)`` complex multi-coil k-space in the :func:`fft2c` convention; only the
            centred ``calibration`` block (rows × cols, around index ``(H//2, W//2)``) is used and
            must be fully sampled.
        kernel: k-space kernel size k (k × k patches of all coils).
        threshold: singular values of the calibration matrix ≥ ``threshold · σ_max`` span the
            signal subspace V∥.
        crop: pixels whose largest eigenvalue of ``G(x)`` is below ``crop`` get zero maps.

    Returns:
        ``(Nc, H, W)`` complex64 maps on the CPU, ``Σ_c |S_c|² = 1`` where kept (0 elsewhere),
        phase relative to coil 0. One map set: data whose FOV is smaller than the object need
        ESPIRiT's second set (not computed here).

    ``G(x) = (1/k²) Σ_{p,q} e^{2πi(p−q)·x} P_{(·,p),(·,q)}`` with ``P = V∥ V∥ᴴ`` is the image-space
    form of "project every patch onto V∥ and average"; its eigenvector of eigenvalue ≈ 1 is the
    sensitivity vector at x (one set of maps).
    """
    if not isinstance(kspace, torch.Tensor) or not kspace.is_complex() or kspace.ndim != 3:
        got = tuple(kspace.shape) if isinstance(kspace, torch.Tensor) else type(kspace).__name__
        raise IDMError(f"ESPIRiT needs complex k-space of shape (Ncoil, H, W), got {got}")
    coils, height, width = kspace.shape
    cal = (calibration, calibration) if isinstance(calibration, int) else tuple(calibration)
    kernel = as_int("ESPIRiT kernel size", kernel, minimum=1)
    fits = len(cal) == 2 and all(kernel < c <= n for c, n in zip(cal, (height, width)))
    if not fits or 2 * kernel - 1 > min(height, width):
        raise IDMError(f"ESPIRiT calibration region {cal} must exceed the kernel ({kernel}) and fit in {height}×{width}")
    kspace = kspace.detach().cpu().to(torch.complex128)
    rows, cols = (slice(n // 2 - c // 2, n // 2 - c // 2 + c) for n, c in zip((height, width), cal))
    calib = kspace[:, rows, cols]
    if bool((calib.abs().sum(dim=(0, 1)) == 0).any()) or bool((calib.abs().sum(dim=(0, 2)) == 0).any()):
        raise IDMError(f"ESPIRiT calibration region {cal} at the k-space centre is not fully sampled (a line is zero)")
    # calibration matrix: one row per k × k patch, entries (coil, p1, p2)
    patches = calib.unfold(1, kernel, 1).unfold(2, kernel, 1)  # (Nc, n1, n2, k, k)
    matrix = patches.permute(1, 2, 0, 3, 4).reshape(-1, coils * kernel * kernel)
    _, singular, vh = torch.linalg.svd(matrix, full_matrices=False)
    signal = vh[singular >= threshold * singular[0]]  # rows: conj of V∥'s columns
    projector = (signal.mH @ signal).conj().reshape(coils, kernel, kernel, coils, kernel, kernel)  # P = V∥ V∥ᴴ
    # K[c, c', d] = Σ_{p − q = d} P[(c, p), (c', q)], d ∈ [−(k−1), k−1]², then G = F⁻¹(K) / k²
    span = 2 * kernel - 1
    correlation = torch.zeros(coils, coils, span, span, dtype=torch.complex128)
    for q1 in range(kernel):
        for q2 in range(kernel):
            block = projector[:, :, :, :, q1, q2].permute(0, 3, 1, 2)  # (c, c', p1, p2)
            correlation[:, :, kernel - 1 - q1 : span - q1, kernel - 1 - q2 : span - q2] += block
    placed = torch.zeros(coils, coils, height, width, dtype=torch.complex64)
    r0, c0 = height // 2 - (kernel - 1), width // 2 - (kernel - 1)
    placed[:, :, r0 : r0 + span, c0 : c0 + span] = correlation.to(torch.complex64)
    gram = ifft2c(placed) * (math.sqrt(height * width) / kernel**2)  # (Nc, Nc, H, W)
    values, vectors = torch.linalg.eigh(gram.permute(2, 3, 0, 1))  # ascending, (H, W, Nc[, Nc])
    maps = vectors[..., -1]  # (H, W, Nc), unit norm
    first = maps[..., :1]
    phase = torch.where(first.abs() > 1e-12, first / first.abs().clamp_min(1e-12), torch.ones_like(first))
    maps = maps * phase.conj() * (values[..., -1:] >= crop)
    return maps.permute(2, 0, 1).contiguous()


__all__ = [
    "MASK_TYPES",
    "MRI",
    "channels_to_complex",
    "complex_to_channels",
    "default_center_fraction",
    "equispaced_mask",
    "estimate_sensitivities",
    "fft2c",
    "ifft2c",
    "load_mask",
    "make_mask",
    "poisson_mask",
    "random_mask",
]
