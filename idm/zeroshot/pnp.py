"""``pnp``: zero-shot plug-and-play reconstruction by half-quadratic splitting with a deep denoiser.

Plug-and-play (Venkatakrishnan, Bouman & Wohlberg, "Plug-and-Play priors for model based
reconstruction", IEEE GlobalSIP 2013) replaces the proximal map of an image prior by a Gaussian
denoiser ``D(z, σ)``; this is the HQS variant of DPIR (Zhang, Li, Zuo, Zhang, Van Gool & Timofte,
"Plug-and-Play Image Restoration with Deep Denoiser Prior", IEEE TPAMI 44(10), 2021). It solves
``min_x 1/(2σ_y²)‖y − A x‖² + Φ(x)`` by alternating, for ``k = 1 … K``::

    z_k = argmin_z ‖y − A z‖² + α_k ‖z − x_{k−1}‖²   = x_{k−1} − w_k · A†(A x_{k−1} − y)
    x_k = D(clip(z_k, 0, 1), σ_k)

    w_k = 1 / (1 + α_k),   α_k = λ σ_y² / σ_k²      (DPIR's data step, λ = ``lam``)
    σ_k = σ_max · (σ_min / σ_max)^((k−1)/(K−1))       (geometric, ``sigma_max`` → ``sigma_min``)

and returns the data-consistent ``z_{K+1}`` (the data step applied once more to ``x_K``; on
Set12 it beats returning ``x_K`` by 0.1–1 dB, docs/pnp.md). The data step is the shared
range-null-space correction :meth:`~idm.physics.LinearOperator.project`: for noise-free
measurements (``σ_y = op.noise.sigma = 0``) ``w = 1``, the exact projection onto ``{z : A z = y}``; for noisy
ones it is DPIR's proximal step, exact when ``A Aᵀ = I`` (block CS, inpainting; for other
operators the same damping of the range-space correction). The denoiser sees ``z`` clipped to the
box [0, 1] of its training images: DnCNN is not non-expansive, and without the clip an overshoot
can grow from one iteration to the next (measured: a Set12 image at 10 % went to 5 dB with
σ_max = 0.1).

Complex images (MRI, |x| ≤ 1): the denoiser, trained on real [0, 1] images, denoises the real
and imaginary parts separately, each mapped from [-1, 1] to [0, 1] (:func:`complex_denoiser`); the
data step is the operator's own (single-coil: k-space replacement; multi-coil: CG-SENSE), the
result complex. On the fastMRI knee slice 001 at 4× (random mask, seed 0) Re/Im beat "denoise
the magnitude, keep the phase" by 0.5 dB (32.94 vs 32.45 dB PSNR of the magnitude at σ 0.01 →
0.005; 32.66 vs 32.16 at 0.02 → 0.01), hence σ 0.01 → 0.005 for MRI (:data:`MRI_SIGMAS`).

``x_0`` is the ``tv`` reconstruction (``start="tv"``, default) or ``A†y`` (``start="adjoint"``).
The defaults (6 iterations from ``tv``, σ 0.02 → 0.01 up to 40 % measured and 0.015 → 0.0075
above, :func:`default_sigmas`) are a short refinement of the tv estimate; more iterations at small
σ slowly lose quality, and ``A†y`` is a poor start for scrambled block CS (its mean brightness
lies mostly in the null space, which a denoiser does not restore).

Shapes and ranges: ``y`` measurements of ``op`` (``op.measurement_shape(B, C)``) of [0, 1] images;
the result is ``(B, C, *op.domain_size)`` on [0, 1] (not clipped); ``σ`` on the [0, 1] image scale.
The denoiser is a :class:`~idm.priors.denoiser.DenoiserPrior` (default ``dncnn-17``, DnCNN-17N
trained for σ ≤ 0.2; for MRI and CT the medical denoisers ``prior-mri`` / ``prior-ct``) or any diffusion prior, used through its one-step x̂₀ at the matching noise
level (:func:`prior_denoiser`; untuned). Deterministic: ``seed`` is unused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import IDMError
from ..physics.base import LinearOperator
from ..physics.canvas import Canvas
from ..priors.prior import PriorLike, load_prior
from ..priors.schedule import from_model_range, to_model_range, x0_from_eps
from ..registry import checked_options, register_method
from .common import check_complex_inputs, check_inputs, denoiser_sigma_max

#: the denoiser used when no checkpoint is given
DEFAULT_DENOISER = "dncnn-17"
#: the denoiser ``pnp`` uses for an operator kind when no checkpoint is given (the medical denoiser
#: priors, fine-tuned from ``dncnn-6`` on MRI / CT slices: on the held-out knee / CT slices as good
#: as or better than ``dncnn-17`` at a third of its cost, docs/medical.md); other kinds: DEFAULT_DENOISER
OPERATOR_DENOISERS = {"mri": "prior-mri", "ct": "prior-ct"}

#: ``D(z, σ)``: images (B, C, H, W) on [0, 1] with noise of std σ → denoised images
Denoise = Callable[[torch.Tensor, float], torch.Tensor]

STARTS = ("tv", "adjoint")
#: ``sigma_max``/``sigma_min`` None: by the operator (:func:`default_sigmas`); the rest tuned on the
#: first 4 Set12 images at 10/30/50 % (docs/pnp.md): a short descent from the tv estimate
DEFAULTS: dict[str, Any] = {"iterations": 6, "sigma_max": None, "sigma_min": None, "lam": 0.23, "start": "tv"}
LIMITS: dict[str, tuple[float, float]] = {
    "iterations": (1, math.inf),
    "sigma_max": (1e-4, 1.0),
    "sigma_min": (1e-4, 1.0),
    "lam": (0.0, math.inf),
}
#: default (σ_max, σ_min) by the measured fraction of the domain (block CS: the ratio), first row
#: whose bound is >= the fraction; tuned on Train400 and the first 4 Set12 images (docs/pnp.md)
SIGMAS_BY_FRACTION = ((0.4, 0.02, 0.01), (1.0, 0.015, 0.0075))
#: default (σ_max, σ_min) for MRI (fastMRI knee slice 001 at 4×; see the module docstring)
MRI_SIGMAS = (0.01, 0.005)


def pnp_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """:data:`DEFAULTS` updated with ``options``, type- and range-checked (``ratio`` is dropped).

    Unknown names, wrong types, out-of-range values, ``sigma_min > sigma_max`` and an unknown
    ``start`` raise :class:`IDMError`. ``sigma_max``/``sigma_min`` None (the default) stand for
    :func:`default_sigmas` of the operator (:func:`resolve_sigmas`).
    """
    given = {key: value for key, value in options.items() if key != "ratio"}
    special = {key: given.pop(key) for key in ("start", "sigma_max", "sigma_min") if key in given}
    settings = checked_options("pnp", DEFAULTS, given, LIMITS)
    for key, value in special.items():
        if key == "start":
            if value not in STARTS:
                raise IDMError(f"method 'pnp': option start must be one of {', '.join(STARTS)}, got {value!r}")
            settings[key] = value
        else:  # a float, or None: the operator's default
            settings[key] = None if value is None else checked_options("pnp", {key: 0.0}, {key: value}, LIMITS)[key]
    if settings["sigma_min"] is not None and settings["sigma_max"] is not None:
        if settings["sigma_min"] > settings["sigma_max"]:
            raise IDMError(
                f"method 'pnp': sigma_min ({settings['sigma_min']:g}) must not exceed sigma_max ({settings['sigma_max']:g})"
            )
    return settings


def default_sigmas(op: LinearOperator) -> tuple[float, float]:
    """``(σ_max, σ_min)`` for ``op`` from :data:`SIGMAS_BY_FRACTION`: 0.02 → 0.01 up to 40 %
    measured, 0.015 → 0.0075 above (a better start needs a gentler denoiser); MRI: :data:`MRI_SIGMAS`."""
    from ..baselines.tv import measured_fraction
    from ..physics import MRI

    if isinstance(op, MRI):
        return MRI_SIGMAS

    fraction = measured_fraction(op)
    return next((hi, lo) for bound, hi, lo in SIGMAS_BY_FRACTION if fraction <= bound + 1e-9)


def resolve_sigmas(sigma_max: float | None, sigma_min: float | None, op: LinearOperator) -> tuple[float, float]:
    """The ``(σ_max, σ_min)`` used on ``op``: the given ones; a missing one from
    :func:`default_sigmas`, moved to keep ``σ_min <= σ_max``."""
    auto_max, auto_min = default_sigmas(op)
    if sigma_max is None and sigma_min is None:
        return auto_max, auto_min
    if sigma_max is None:
        return max(auto_max, sigma_min), sigma_min  # type: ignore[arg-type]
    if sigma_min is None:
        return sigma_max, min(auto_min, sigma_max)
    return sigma_max, sigma_min


def noise_levels(iterations: int, sigma_max: float, sigma_min: float) -> list[float]:
    """σ_1 … σ_K, geometric from ``sigma_max`` to ``sigma_min`` (one iteration: ``[sigma_max]``)."""
    if iterations == 1:
        return [float(sigma_max)]
    ratio = sigma_min / sigma_max
    return [sigma_max * ratio ** (k / (iterations - 1)) for k in range(iterations)]


def data_weight(lam: float, sigma_y: float, sigma: float) -> float:
    """``w = 1 / (1 + λ σ_y² / σ²)``, the HQS data step's weight (1 for noise-free measurements)."""
    return 1.0 / (1.0 + lam * sigma_y**2 / sigma**2)


def prior_denoiser(prior: PriorLike) -> Denoise:
    """``D(z, σ)`` of a prior: a :class:`~idm.priors.denoiser.DenoiserPrior`'s own ``denoise``; for a
    diffusion prior its one-step x̂₀ at the timestep whose noise matches σ.

    The [0, 1] image ``z`` with noise of std σ is, on [-1, 1], ``x₀ + 2σ n``, i.e. ``x_t / √ᾱ_t`` at
    the ``t`` with ``√((1 − ᾱ_t)/ᾱ_t) = 2σ`` (the nearest of the schedule's timesteps), and
    ``D(z, σ) = (x̂₀(x_t, t) + 1) / 2``. The image is padded (reflected) at the bottom/right to the
    prior's ``size_multiple`` and cropped back.
    """
    denoise = getattr(prior, "denoise", None)
    if callable(denoise):
        return denoise
    schedule, multiple = prior.schedule, prior.size_multiple

    def one_step(z: torch.Tensor, sigma: float) -> torch.Tensor:
        t = schedule.timestep_for_noise(2.0 * float(sigma))
        abar = float(schedule.alphas_cumprod[t])
        canvas = Canvas.to_multiple(z.shape[-2:], multiple)
        x_t = math.sqrt(abar) * to_model_range(canvas.pad(z, mode="reflect"))
        steps = torch.full((z.shape[0],), t, dtype=torch.long, device=z.device)
        return canvas.crop(from_model_range(x0_from_eps(x_t, prior(x_t, steps), abar)))

    return one_step


def complex_denoiser(denoise: Denoise) -> Denoise:
    """``D`` for complex images with parts in [-1, 1]: ``Re`` and ``Im`` denoised separately (one
    batch), each as ``2·D(clip((v + 1)/2, 0, 1), σ/2) − 1``."""

    def apply(z: torch.Tensor, sigma: float) -> torch.Tensor:
        parts = torch.cat((z.real, z.imag)).add(1.0).mul(0.5).clamp(0.0, 1.0)
        re, im = denoise(parts, 0.5 * sigma).to(z.real.dtype).mul(2.0).sub(1.0).chunk(2)
        return torch.complex(re, im)

    return apply


def sample_pnp(
    denoise: Denoise,
    y: torch.Tensor,
    op: LinearOperator,
    start: torch.Tensor,
    sigmas: list[float],
    *,
    lam: float = DEFAULTS["lam"],
    progress: bool = False,
    callback: Callable[[dict], None] | None = None,
) -> torch.Tensor:
    """HQS iterations (module docstring) from ``start`` (B, C, *op.domain_size) on [0, 1] with the
    noise levels ``sigmas``; returns the final data step ``z_{K+1}``, same shape.

    ``callback({"k", "sigma", "z", "x"})`` is called after each denoising step. Complex images
    (MRI) are handed to ``denoise`` unclipped (wrap it in :func:`complex_denoiser`).
    """
    sigma_y = op.noise.sigma
    x = start
    for k, sigma in enumerate(tqdm(sigmas, desc="pnp", disable=not progress, leave=False)):
        z = op.project(x, y, data_weight(lam, sigma_y, sigma))
        x = denoise(z if z.is_complex() else z.clamp(0.0, 1.0), sigma)
        if callback is not None:
            callback({"k": k, "sigma": sigma, "z": z, "x": x})
    return op.project(x, y, data_weight(lam, sigma_y, sigmas[-1]))


def start_image(y: torch.Tensor, op: LinearOperator, start: str) -> torch.Tensor:
    """``x_0``: the ``tv`` reconstruction (its default λ and iterations) or ``A†y``."""
    if start == "adjoint":
        return op.A_dagger(y)
    from ..baselines.tv import default_iterations, default_lambda, tv_reconstruct

    return tv_reconstruct(op, y, default_lambda(op, y), default_iterations(op))  # λ as the tv method sets it


class PnPReconstructor:
    """``reconstruct(y, op) -> x``: HQS plug-and-play bound to a loaded denoiser and its settings."""

    def __init__(self, prior: PriorLike, settings: Mapping[str, Any], *, progress: bool = False) -> None:
        self.prior, self.settings, self.progress = prior, dict(settings), bool(progress)
        self.denoise = prior_denoiser(prior)

    @torch.no_grad()
    def __call__(self, y: torch.Tensor, op: LinearOperator) -> torch.Tensor:
        """Measurements ``y`` (``op.measurement_shape(B, C)``) → ``(B, C, *op.domain_size)`` on [0, 1], on y's device."""
        if y.is_complex():  # MRI: complex k-space, possibly of several coils, of (B, 1, H, W) images
            check_complex_inputs(y, op)
        else:
            check_inputs(y, op, self.prior.channels)
        if len(op.domain_size) != 2:
            raise IDMError(f"pnp works on 2D images, the operator's domain is {op.domain_size}")
        s = self.settings
        y_dev = y.to(device=self.prior.device, dtype=torch.complex64 if y.is_complex() else torch.float32)
        x0 = start_image(y_dev, op, s["start"])
        if x0.is_complex() and x0.shape[1] != self.prior.channels:
            raise IDMError(f"the prior has {self.prior.channels} channel(s), the images have {x0.shape[1]}")
        denoise = complex_denoiser(self.denoise) if x0.is_complex() else self.denoise
        sigmas = noise_levels(s["iterations"], *resolve_sigmas(s["sigma_max"], s["sigma_min"], op))
        x = sample_pnp(denoise, y_dev, op, x0, sigmas, lam=s["lam"], progress=self.progress)
        return x.to(y.device)

    def __repr__(self) -> str:
        return f"PnPReconstructor({', '.join(f'{k}={v!r}' for k, v in self.settings.items())})"


@register_method("pnp", "plug-and-play HQS with a deep denoiser (DnCNN-17, DPIR-style), started from tv", "prior")
def build(
    *,
    checkpoint: Any = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = False,
    **options: Any,
) -> PnPReconstructor:
    """``pnp`` (module docstring): ``checkpoint`` a denoiser or any prior :func:`~idm.priors.load_prior`
    accepts; without one, the denoiser of the operator's kind (:data:`OPERATOR_DENOISERS`, else
    ``"dncnn-17"``), loaded at the first call. Options and defaults: :data:`DEFAULTS` (``iterations``,
    ``sigma_max``, ``sigma_min`` (None: by the operator, :func:`default_sigmas`), ``lam``, ``start``
    in :data:`STARTS`). ``seed`` is unused."""
    settings = pnp_options(options)
    if checkpoint is not None:
        return _reconstructor(checkpoint, settings, device, progress)
    # loaded now, so that options beyond its trained σ range fail before any work; the others on first use
    loaded = {DEFAULT_DENOISER: _reconstructor(DEFAULT_DENOISER, settings, device, progress)}

    def reconstruct(y: torch.Tensor, op: LinearOperator) -> torch.Tensor:
        name = OPERATOR_DENOISERS.get(op.kind, DEFAULT_DENOISER)
        if name not in loaded:
            loaded[name] = _reconstructor(name, settings, device, progress)
        return loaded[name](y, op)

    return reconstruct


def _reconstructor(checkpoint: Any, settings: dict[str, Any], device: str | torch.device,
                   progress: bool) -> PnPReconstructor:
    prior = load_prior(checkpoint, device=device)
    prior.module.requires_grad_(False)
    limit = denoiser_sigma_max(prior)
    for key in ("sigma_max", "sigma_min"):
        if settings[key] is not None and settings[key] > limit + 1e-12:
            raise IDMError(f"method 'pnp': {key} {settings[key]:g} exceeds the denoiser's trained range (σ <= {limit:g})")
    return PnPReconstructor(prior, settings, progress=progress)
