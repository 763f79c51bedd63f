"""Zero-shot cross-modality translation guided by local mutual information (after MIDiffusion, Wang,
Yang et al., 2023).

A diffusion prior of the *target* modality (e.g. T2) samples an image whose local structure follows a
*source* image of another modality (e.g. T1): at every step of a DDIM / DDPM run the clean estimate
is pushed up the gradient of the local-wise mutual information between source and estimate
(:class:`~idm.medical.lmi.LocalMutualInformation`, a contrast-free similarity). With states on the
prior's [-1, 1] range, ``s`` the source on [0, 1] and ``t₀`` the first timestep (``start`` · T)::

    x_t₀ = √ᾱ_t₀ (2s − 1) + √(1 − ᾱ_t₀) z                     (start = 1: x_T = z, pure noise)
    for each step t → t' of the respaced schedule:
        ε  = model(x_t, t);  x̂₀ = clamp((x_t − √(1 − ᾱ_t) ε) / √ᾱ_t, −1, 1);  ε ← (x_t − √ᾱ_t x̂₀) / √(1 − ᾱ_t)
        g  = ∇ Σ LMI(s, x̂₀⁺)  at x̂₀⁺ = (x̂₀ + 1) / 2           (the estimate on [0, 1])
        x̂₀ ← x̂₀ + 2 · scale · g / rms(g)                      (a step of ``scale`` on [0, 1] per step)
        x_t' = DDIM(x̂₀, ε, ᾱ_t', η)                            (η = 1: DDPM-like)

The gradient is taken at the estimate, not through the network (cheap: one LMI backward per step),
and normalised per image, so ``scale`` is an image-intensity step independent of the image size.
``scale = 0`` is plain SDEdit (Meng et al., ICLR 2022: the source noised to ``start`` and denoised by
the target prior); ``start = 1, scale = 0`` is unguided sampling. Any image size: the state lives on
the source padded at the bottom / right to the prior's size multiple (:class:`~idm.physics.Canvas`);
LMI is computed on the unpadded image.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..errors import IDMError
from ..physics.canvas import Canvas
from ..priors.schedule import (NoiseSchedule, ddim_sigma, ddim_step, eps_from_x0, from_model_range, to_model_range,
                               x0_from_eps)
from ..zeroshot.common import EpsModel, abar_at, randn, timestep_pairs
from .lmi import LocalMutualInformation

#: defaults of :func:`sample_translation` (the ``idm translate`` options)
TRANSLATE_DEFAULTS = {"steps": 20, "start": 0.45, "scale": 0.003, "eta": 0.0}
#: their ranges (start: a fraction of T, 1 = pure noise; eta: DDIM η, 1 = DDPM-like)
TRANSLATE_LIMITS = {"steps": (1, 100_000), "start": (1e-6, 1.0), "scale": (0.0, 10.0), "eta": (0.0, 1.0)}


def check_source(source: torch.Tensor, channels: int) -> None:
    """One-line :class:`IDMError` unless ``source`` is a finite, non-empty ``(B, channels, H, W)`` batch on
    [0, 1] (:func:`idm.data.check_image`)."""
    from ..data import check_image

    if source.ndim != 4:
        raise IDMError(f"a source image batch is (B, C, H, W), got shape {tuple(source.shape)}")
    check_image(source, "the source image")
    if source.shape[1] != channels:
        raise IDMError(f"the prior has {channels} channel(s), the source has {source.shape[1]}")


def translate_settings(options: dict) -> dict:
    """:data:`TRANSLATE_DEFAULTS` updated with ``options``, each checked against :data:`TRANSLATE_LIMITS`
    (unknown names, wrong types and out-of-range values: :class:`IDMError`)."""
    from ..registry import checked_options

    return checked_options("translate", TRANSLATE_DEFAULTS, options, TRANSLATE_LIMITS)


def lmi_ascent(x0: torch.Tensor, source: torch.Tensor, canvas: Canvas, lmi: LocalMutualInformation,
               scale: float) -> torch.Tensor:
    """The canvas estimate ``x0`` (prior range) after one normalised LMI-gradient step of ``scale``
    on [0, 1] towards ``source`` (module docstring)."""
    image = from_model_range(canvas.crop(x0)).detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(lmi(source, image).sum(), image)
    rms = grad.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-12)
    return canvas.paste(x0, to_model_range((image + scale * grad / rms).detach()))


def sample_translation(
    model: EpsModel,
    source: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    steps: int = TRANSLATE_DEFAULTS["steps"],
    start: float = TRANSLATE_DEFAULTS["start"],
    scale: float = TRANSLATE_DEFAULTS["scale"],
    eta: float = TRANSLATE_DEFAULTS["eta"],
    lmi: LocalMutualInformation | None = None,
    size_multiple: int = 1,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Translate ``source`` ``(B, C, H, W)`` on [0, 1] with the target-modality prior ``model`` → ``(B, C, H, W)``
    on [0, 1], not clipped (module docstring).

    Args:
        model: ``model(x, t) -> ε`` on [-1, 1]; schedule: its noise schedule.
        steps: respaced steps from ``t₀``; start: ``t₀ / T`` in (0, 1] (1: from pure noise);
        scale: LMI step per sampling step, in [0, 1] image units (0: SDEdit / unguided);
        eta: DDIM η (0 deterministic, 1 DDPM-like); lmi: the similarity (default
        :class:`~idm.medical.lmi.LocalMutualInformation` ()); generator: the noise (CPU generator).
    """
    settings = translate_settings({"steps": steps, "start": start, "scale": scale, "eta": eta})
    steps, start, scale, eta = (settings[key] for key in ("steps", "start", "scale", "eta"))
    lmi = LocalMutualInformation() if lmi is None else lmi
    canvas = Canvas.to_multiple(tuple(source.shape[-2:]), size_multiple)
    first = round(start * (schedule.num_steps - 1))
    noise = randn((*source.shape[:2], *canvas.size), generator, source)
    abar = abar_at(schedule, first)
    x = noise if start == 1.0 else abar**0.5 * to_model_range(canvas.pad(source)) + (1 - abar) ** 0.5 * noise
    x0 = x
    for t, t_next in tqdm(timestep_pairs(schedule, int(steps), t_max=first), disable=not progress, desc="translate",
                          leave=False):
        abar, abar_next = abar_at(schedule, t), abar_at(schedule, t_next)
        eps = model(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))
        x0 = x0_from_eps(x, eps, abar).clamp(-1.0, 1.0)
        eps = eps_from_x0(x, x0, abar)  # the noise of the clipped estimate (as idm.priors.samplers)
        if scale > 0:
            x0 = lmi_ascent(x0, source, canvas, lmi, scale)
        sigma = ddim_sigma(abar, abar_next, eta) if abar_next < 1.0 else 0.0
        x = ddim_step(x0, eps, abar_next, sigma=sigma, noise=randn(x.shape, generator, x) if sigma > 0 else None)
    return from_model_range(canvas.crop(x0))


def translate(source: torch.Tensor, prior: object, *, seed: int = 0, device: str | torch.device = "cpu",
              progress: bool = False, **options: float) -> torch.Tensor:
    """Translate ``source`` ``(B, C, H, W)`` (or ``(C, H, W)``, ``(H, W)``) on [0, 1] into the modality of
    ``prior`` (a prior directory, shipped name or loaded prior) → the same shape
    on [0, 1], clipped. ``options``: ``steps``, ``start``, ``scale``, ``eta`` of :func:`sample_translation`
    (defaults :data:`TRANSLATE_DEFAULTS`); the noise comes from a CPU generator seeded with ``seed``."""
    from ..priors.prior import load_prior

    settings = translate_settings(options)
    model = load_prior(prior, device=device) if isinstance(prior, (str, bytes)) or hasattr(prior, "__fspath__") else prior
    shape = source.shape
    if source.ndim in (2, 3):
        source = source.reshape(1, *([1] if source.ndim == 2 else []), *shape)
    check_source(source, model.channels)
    with torch.no_grad():
        out = sample_translation(model, source.to(device=device, dtype=torch.float32), model.schedule,
                                 size_multiple=model.size_multiple, generator=torch.Generator().manual_seed(int(seed)),
                                 progress=progress, **settings)
    return out.clamp(0, 1).reshape(shape).to(source.device)
