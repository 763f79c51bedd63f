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

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import IDMError
from ..physics.canvas import Canvas
from ..priors.schedule import (NoiseSchedule, ddim_sigma, ddim_step, eps_from_x0, from_model_range, to_model_range,
                               x0_from_eps)
from ..zeroshot.common import EpsModel, abar_at, randn, timestep_pairs
from .lmi import LocalMutualInformation

#: defaults of :func:`sample_translation` (the ``idm translate`` options)
TRANSLATE_DEFAULTS = {"steps": 2, "start": 0.02, "scale": 0.003, "eta": 0.0, "init": "contrast"}
#: what the sampler starts from: the source itself (MIDiffusion / SDEdit) or its contrast map (:func:`contrast_map`)
TRANSLATE_INITS = ("source", "contrast")
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

    settings = checked_options("translate", TRANSLATE_DEFAULTS, options, TRANSLATE_LIMITS)
    if settings["init"] not in TRANSLATE_INITS:
        raise IDMError(f"translate: init must be one of {', '.join(TRANSLATE_INITS)}, got {settings['init']!r}")
    return settings


# --- the contrast map: which intensity map of the source does the target prior find most likely? ------
#: pixels at or below this value (on [0, 1]) are background unless enclosed by foreground: the zero
#: background of a skull-stripped scan and the noise floor of an unstripped one (SynDiff's head slices)
FOREGROUND_FLOOR = 0.05


def foreground(image: np.ndarray) -> np.ndarray:
    """The pixels of ``image`` (``(..., H, W)`` on [0, 1], each 2-D image on its own) above
    :data:`FOREGROUND_FLOOR`, with their holes filled: dark pixels not connected to the image border
    (e.g. clipped CSF inside a skull-stripped brain's ventricles) count as foreground."""
    from skimage.measure import label

    inside = np.asarray(image) > FOREGROUND_FLOOR
    if inside.ndim < 2:
        raise IDMError(f"a foreground needs a 2-D image, got shape {inside.shape}")
    out = inside.reshape(-1, *inside.shape[-2:]).copy()
    for plane in out:
        outside = label(~plane, connectivity=1)
        edges = np.concatenate([outside[0], outside[-1], outside[:, 0], outside[:, -1]])
        plane |= (outside > 0) & ~np.isin(outside, edges)
    return out.reshape(inside.shape)


def histogram_match(source: torch.Tensor, reference: np.ndarray) -> torch.Tensor:
    """``source`` (any shape, [0, 1]) with the histogram of ``reference`` over the foreground (scikit-image
    ``match_histograms`` of the source's :func:`foreground` to the reference's non-zero pixels; the
    background stays zero, so a skull-stripped scan is not matched to the background share of another
    data set)."""
    from skimage.exposure import match_histograms

    image = source.detach().cpu().numpy()
    out = np.zeros_like(image, dtype=np.float32)
    inside, values = foreground(image), np.asarray(reference, dtype=np.float64).ravel()
    values = values[values > 0]
    if inside.any() and values.size:
        out[inside] = match_histograms(image[inside], values)
    return torch.from_numpy(out).to(source.device)


def contrast_candidates(source: torch.Tensor, reference: np.ndarray, classes: int = 3) -> tuple[list[str], torch.Tensor]:
    """Every re-ordering of the source's tissue classes, histogram-matched to ``reference``.

    ``source`` ``(H, W)`` on [0, 1]; its :func:`foreground` is split into ``classes`` intensity classes by
    multi-Otsu thresholds (scikit-image ``threshold_multiotsu``). A candidate puts the classes in the
    order ``π`` (a permutation) and orders the pixels inside each class by ``d · s`` (``d = ±1``), then
    :func:`histogram_match` gives that order the target histogram: ``classes! · 2`` candidates, among them
    the plain histogram match (``π`` = identity, ``d = +1``) and the inverted one (reversed, ``d = −1``).
    Every candidate is a function of the source, injective inside each class, so each has the source's
    (local) mutual information — LMI guidance cannot choose among them; the prior can
    (:func:`prior_energy`). Returns the labels (``"0-1-2+"``: class order, direction) and ``(N, 1, H, W)``.
    """
    from itertools import permutations

    from skimage.filters import threshold_multiotsu

    image = source.detach().cpu().double()
    inside = torch.from_numpy(foreground(image.numpy()))
    values = image[inside]
    if values.numel() < classes or int(torch.unique(values).numel()) < classes:
        raise IDMError(f"the source has too few distinct foreground intensities for {classes} contrast classes")
    thresholds = torch.from_numpy(threshold_multiotsu(values.numpy(), classes=classes))
    label = torch.bucketize(values, thresholds)
    labels, images = [], []
    for order in permutations(range(classes)):
        for direction in (1, -1):
            within = values if direction > 0 else 1.0 - values
            key = torch.zeros_like(image)
            key[inside] = 1.0 + torch.tensor(order, dtype=torch.float64)[label] + 0.999 * within  # > 0: foreground
            labels.append("-".join(map(str, order)) + ("+" if direction > 0 else "-"))
            images.append(histogram_match(key.float(), reference))
    return labels, torch.stack(images)[:, None].to(source.device)


#: the noise levels of :func:`prior_energy`: ``levels`` timesteps evenly over this fraction of T
ENERGY_RANGE = (0.05, 0.4)


@torch.no_grad()
def prior_energy(model: EpsModel, images: torch.Tensor, schedule: NoiseSchedule, *, size_multiple: int = 1,
                 levels: int = 4, mask: torch.Tensor | None = None, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """The denoising loss of the prior on ``images`` ``(N, C, H, W)`` on [0, 1] → ``(N,)``, lower = more
    likely (the ε-matching terms of the diffusion ELBO, Ho et al. 2020, unweighted)::

        E(x) = mean over t ∈ {levels timesteps in ENERGY_RANGE · T} of  Σ m ‖ε − model(√ᾱ_t x + √(1 − ᾱ_t) ε, t)‖² / Σ m

    with ``x`` on [-1, 1] padded to the prior's size multiple, ``m`` the ``mask`` ``(H, W)`` (default all
    pixels) and the **same** ``ε`` for every image (common random numbers: the differences between
    candidates are not noise)."""
    canvas = Canvas.to_multiple(tuple(images.shape[-2:]), size_multiple)
    x = to_model_range(canvas.pad(images))
    weight = torch.ones(images.shape[-2:], device=images.device) if mask is None else mask.to(images.device).float()
    if weight.shape != images.shape[-2:] or float(weight.sum()) <= 0:
        raise IDMError(f"the energy mask must be a non-empty {tuple(images.shape[-2:])} image, got {tuple(weight.shape)}")
    first, last = (round(f * (schedule.num_steps - 1)) for f in ENERGY_RANGE)
    energy = torch.zeros(images.shape[0], device=images.device)
    for t in torch.linspace(first, last, levels).round().long().tolist():
        eps = randn((1, *x.shape[1:]), generator, x).expand_as(x)
        out = model(schedule.q_sample(x, t, eps), torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))
        error = canvas.crop(out - eps).pow(2).mean(dim=1)
        energy += (error * weight).sum(dim=(1, 2)) / weight.sum() / levels
    return energy


#: the contrast map scores the foreground eroded by a disk of this radius (pixels): the candidates' rim at
#: the edge of the foreground (skull-strip border, partial-volume pixels) is an artefact of the intensity
#: map that dominates the denoising loss otherwise (docs/translation.md)
INTERIOR_RADIUS = 4


def interior(image: torch.Tensor, radius: int = INTERIOR_RADIUS) -> torch.Tensor:
    """The :func:`foreground` of ``image`` ``(H, W)`` eroded by a disk of ``radius`` (scikit-image), as a bool
    ``(H, W)``; the foreground itself where erosion leaves nothing, the whole image where that is empty."""
    from skimage.morphology import disk, erosion

    inside = foreground(image.detach().cpu().numpy())
    inner = erosion(inside, disk(radius)) if radius > 0 else inside
    chosen = inner if inner.any() else inside if inside.any() else np.ones_like(inside)
    return torch.from_numpy(chosen)


def contrast_map(model: EpsModel, source: torch.Tensor, reference: np.ndarray, schedule: NoiseSchedule, *,
                 classes: int = 3, size_multiple: int = 1, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, list[str]]:
    """The source ``(B, 1, H, W)`` on [0, 1] mapped to the target contrast the prior prefers → ``(B, 1, H, W)``
    and the chosen candidate per image: the :func:`contrast_candidates` of each image (class orders and
    directions, matched to the ``reference`` target histogram) with the lowest :func:`prior_energy` over
    the :func:`interior` of the source's foreground. A
    zero-shot choice: the prior and the target histogram only, no paired data."""
    if source.shape[1] != 1:
        raise IDMError(f"the contrast map works on one-channel images, the source has {source.shape[1]}")
    mapped, chosen = [], []
    for image in source[:, 0]:
        labels, candidates = contrast_candidates(image, reference, classes)
        state = generator.get_state() if generator is not None else None
        energy = prior_energy(model, candidates, schedule, size_multiple=size_multiple, mask=interior(image),
                              generator=generator)
        if state is not None:
            generator.set_state(state)  # every image scores its candidates on the same noise
        best = int(energy.argmin())
        mapped.append(candidates[best])
        chosen.append(labels[best])
    return torch.stack(mapped), chosen


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
    init: str = TRANSLATE_DEFAULTS["init"],
    reference: np.ndarray | None = None,
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
        eta: DDIM η (0 deterministic, 1 DDPM-like);
        init: ``"source"`` — start from the source noised to ``start`` (MIDiffusion, SDEdit); ``"contrast"`` —
        from the :func:`contrast_map` of the source (the intensity map the prior prefers, matched to
        ``reference``, values of target-modality images on [0, 1]); LMI is measured against the source
        either way (it is unchanged by such maps); lmi: the similarity (default
        :class:`~idm.medical.lmi.LocalMutualInformation` ()); generator: the noise (CPU generator).
    """
    settings = translate_settings({"steps": steps, "start": start, "scale": scale, "eta": eta, "init": init})
    steps, start, scale, eta, init = (settings[key] for key in ("steps", "start", "scale", "eta", "init"))
    lmi = LocalMutualInformation() if lmi is None else lmi
    canvas = Canvas.to_multiple(tuple(source.shape[-2:]), size_multiple)
    first = round(start * (schedule.num_steps - 1))
    if init == "contrast":
        if reference is None:
            raise IDMError("init='contrast' needs reference values of the target modality (e.g. --reference DIR)")
        begin, _ = contrast_map(model, source, reference, schedule, size_multiple=size_multiple, generator=generator)
    else:
        begin = source
    noise = randn((*source.shape[:2], *canvas.size), generator, source)
    abar = abar_at(schedule, first)
    x = noise if start == 1.0 else abar**0.5 * to_model_range(canvas.pad(begin)) + (1 - abar) ** 0.5 * noise
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


def reference_values(folder: str | Path) -> np.ndarray:
    """Every pixel of the images in ``folder`` (:func:`idm.data.load_image`, gray [0, 1]) as one 1-D array:
    the target histogram of :func:`histogram_match` and the contrast map."""
    from ..data import load_image
    from ..data.images import IMAGE_SUFFIXES

    root = Path(folder)
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if root.is_dir() else []
    if not files:
        raise IDMError(f"no reference images in {root}")
    return np.concatenate([load_image(p).numpy().ravel() for p in files])


#: images the prior draws for the target histogram when no reference is given (and their DDIM steps)
PRIOR_REFERENCE = {"n": 2, "steps": 20}


def prior_reference(prior: object, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Target-modality values for the contrast map when the user has no target images: the pixels of
    :data:`PRIOR_REFERENCE` unguided samples of ``prior`` at ``size`` padded to its size multiple, with the
    (near-black) background below 2 % set to 0."""
    canvas = Canvas.to_multiple(size, prior.size_multiple)
    samples = prior.sample(PRIOR_REFERENCE["n"], canvas.size, steps=PRIOR_REFERENCE["steps"], seed=seed)
    values = samples.cpu().numpy().ravel()
    return np.where(values < 0.02, 0.0, values)


def target_values(prior: object, reference: np.ndarray | str | Path | None, size: tuple[int, int],
                  seed: int = 0) -> np.ndarray:
    """The target-modality values of the contrast map: ``reference`` itself (values), the images of a
    ``reference`` folder (:func:`reference_values`) or, without one, :func:`prior_reference` at ``size``."""
    if reference is None:
        return prior_reference(prior, size, seed)
    if isinstance(reference, (str, Path)):
        return reference_values(reference)
    return np.asarray(reference)


def translate(source: torch.Tensor, prior: object, *, seed: int = 0, device: str | torch.device = "cpu",
              reference: np.ndarray | str | Path | None = None, progress: bool = False,
              **options: float | str) -> torch.Tensor:
    """Translate ``source`` ``(B, C, H, W)`` (or ``(C, H, W)``, ``(H, W)``) on [0, 1] into the modality of
    ``prior`` (a prior directory, shipped name or loaded prior) → the same shape
    on [0, 1], clipped. ``options``: ``steps``, ``start``, ``scale``, ``eta``, ``init`` of
    :func:`sample_translation` (defaults :data:`TRANSLATE_DEFAULTS`); ``reference`` (``init="contrast"``):
    target-modality values or a folder of target images, default the prior's own samples
    (:func:`target_values`); the noise comes from a CPU generator seeded with ``seed``."""
    from ..priors.prior import load_prior

    settings = translate_settings(options)
    model = load_prior(prior, device=device) if isinstance(prior, (str, bytes)) or hasattr(prior, "__fspath__") else prior
    shape = source.shape
    if source.ndim in (2, 3):
        source = source.reshape(1, *([1] if source.ndim == 2 else []), *shape)
    check_source(source, model.channels)
    if settings["init"] == "contrast":
        reference = target_values(model, reference, tuple(source.shape[-2:]), seed)
    with torch.no_grad():
        out = sample_translation(model, source.to(device=device, dtype=torch.float32), model.schedule,
                                 size_multiple=model.size_multiple, generator=torch.Generator().manual_seed(int(seed)),
                                 reference=reference, progress=progress, **settings)
    return out.clamp(0, 1).reshape(shape).to(source.device)
