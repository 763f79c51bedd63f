"""MC-DDPM (Xie & Li, "Measurement-conditioned denoising diffusion probabilistic model for
under-sampled medical image reconstruction", MICCAI 2022): a DDPM over the *unsampled* k-space
only, conditioned on the measurement; K samples give a reconstruction and a per-pixel std.

Single-coil Cartesian MRI (:class:`~idm.physics.MRI`, one coil), mask ``M`` (H, W), centred
orthonormal DFT ``F`` (:func:`~idm.physics.mri.fft2c`). Complex images ``(B, 1, H, W)`` are scaled
by ``s = max |F⁻¹ y|`` (the zero-filled image's largest magnitude, per image; the network sees
magnitudes of about 1 whatever the scanner's units)::

    k₀  = (1 − M) ⊙ F x₀ / (s c)                       the unknown k-space: the diffused variable
    k_t = √ᾱ_t k₀ + √(1 − ᾱ_t) (1 − M) ⊙ ε              ε complex, Re and Im ~ N(0, 1)
    ε̂   = (1 − M) ⊙ F U([F⁻¹ k_t, F⁻¹ y / s], t)        U: image-domain U-Net, [Re, Im] channels, 4 in → 2 out

Loss (``idm pretrain --conditional mri``, :func:`diffusion_loss`): ``‖ε̂ − (1 − M) ε‖²`` per unsampled
real coordinate (1 at the zero-initialised start). With ``prediction = "x0"`` the network's output is
read as the clean unknown k-space instead, ``k̂₀ = (1 − M) ⊙ F U(…)``, and the loss is ``‖k̂₀ − k₀‖²``
(x₀-parametrisation, Ramesh et al. 2022 / Karras et al. 2022: at high noise the network regresses the
conditional mean, which a network trained for minutes does far better than a noise estimate that
x̂₀ = (k_t − √(1 − ᾱ) ε̂)/√ᾱ amplifies by 1/√ᾱ). Sampling (:func:`sample_mcddpm`): ``k_T = (1 − M) ε``,
DDPM ancestral steps over a respaced schedule (:func:`~idm.priors.schedule.ddpm_posterior`, fresh noise
only on the unsampled locations) to ``k̂₀``; the sample ``s F⁻¹(y / s + c k̂₀)`` equals ``y`` on ``M``
exactly. K samples run as one batch; the reconstruction is their (complex) mean, the uncertainty the
per-pixel standard deviation of their magnitudes, on the image's scale (0 for K = 1).

The constant ``c`` (``data_scale``) brings the unknown k-space to about unit RMS per coordinate (it is
≈ 0.08–0.1 of the zero-filled maximum for brain slices at 4×–8×): without it the unit-variance noise
swamps the signal from ᾱ < 0.99 on (the first 3 % of a linear schedule) and the other 97 % of the
steps would all be "pure noise" (the latent scale factor of Rombach et al., CVPR 2022, for the same
reason).

Checkpoint (:mod:`idm.io.checkpoint`): ``config.json`` ``{"architecture": "mcddpm", "unet":
UNetConfig.to_dict(), "schedule": NoiseSchedule.to_dict(), "accelerations": [...], ...}`` and the U-Net
weights; shipped: ``mcddpm-mri`` (the default of the method).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import IDMError
from ..physics.canvas import Canvas
from ..physics.mri import MRI, channels_to_complex, complex_to_channels, fft2c, ifft2c
from ..priors.schedule import NoiseSchedule, ddpm_posterior, x0_from_eps
from ..priors.unet import UNet, UNetConfig
from ..registry import Posterior, checked_options, register_method
from ..zeroshot.common import abar_at, check_complex_inputs, randn, timestep_pairs

ARCHITECTURE = "mcddpm"
#: the shipped checkpoint
DEFAULT_CHECKPOINT = "mcddpm-mri"
#: U-Net input / output channels: [Re, Im] of the state and of the zero-filled image → [Re, Im] of ε̂ (or x̂₀)
IN_CHANNELS, OUT_CHANNELS = 4, 2
#: what the network's output is: the noise ε or the clean unknown k-space k₀ (module docstring)
PREDICTIONS = ("eps", "x0")

Network = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def unet_config(**sizes: Any) -> UNetConfig:
    """The U-Net of an MC-DDPM (4 channels in, 2 out) with the given sizes (:class:`UNetConfig` fields)."""
    return UNetConfig(in_channels=IN_CHANNELS, out_channels=OUT_CHANNELS, **sizes)


def network_output(net: Network, state: torch.Tensor, condition: torch.Tensor, t: torch.Tensor,
                   size_multiple: int) -> torch.Tensor:
    """The image-domain prediction (of ε or x₀), complex ``(N, 1, H, W)``, of ``net(h, t)`` (a U-Net with
    4 input and 2 output channels) for the state image ``F⁻¹ k_t`` and the scaled zero-filled image
    ``F⁻¹ y / s`` (both complex ``(N, 1, H, W)``); ``t`` (N,) timesteps. The input is zero-padded at the
    bottom / right to a multiple of ``size_multiple`` and the output cropped back."""
    h = torch.cat((complex_to_channels(state), complex_to_channels(condition)), dim=1)
    canvas = Canvas.to_multiple(h.shape[-2:], size_multiple)
    return channels_to_complex(canvas.crop(net(canvas.pad(h), t)))


def complex_noise(shape: tuple[int, ...], generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """Complex noise with Re, Im ~ N(0, 1), drawn on the CPU from ``generator`` (device-independent;
    :func:`~idm.zeroshot.common.randn` of the two parts)."""
    parts = randn((2, *shape), generator, like.real)
    return torch.complex(parts[0], parts[1])


def zero_filled_scale(zero_filled: torch.Tensor) -> torch.Tensor:
    """``s = max |F⁻¹ y|`` per image, ``(N, 1, 1, 1)`` real, of complex zero-filled images ``(N, 1, H, W)``."""
    return zero_filled.abs().amax(dim=(1, 2, 3), keepdim=True)


def diffusion_loss(net: Network, x0: torch.Tensor, mask: torch.Tensor, schedule: NoiseSchedule,
                   generator: torch.Generator, size_multiple: int, prediction: str = "eps",
                   data_scale: float = 1.0) -> torch.Tensor:
    """The training loss (module docstring) of complex images ``x0`` (B, 1, H, W) measured on the bool
    masks ``mask`` (B, 1, H, W) (or one (H, W) mask), t uniform over the schedule; noise and t from
    ``generator`` (on x0's device); ``prediction``: one of :data:`PREDICTIONS`; ``data_scale``: c."""
    check_prediction(prediction)
    keep = (~mask.bool()).to(x0.real.dtype)
    y = mask.to(x0.real.dtype) * fft2c(x0)
    condition = ifft2c(y)
    scale = zero_filled_scale(condition).clamp_min(1e-6)
    k0 = keep * fft2c(x0) / (scale * data_scale)
    t = torch.randint(0, schedule.num_steps, (x0.shape[0],), generator=generator, device=x0.device)
    abar = schedule.abar(t, x0.real)
    parts = torch.randn((2, *x0.shape), generator=generator, device=x0.device, dtype=x0.real.dtype)
    eps = keep * torch.complex(parts[0], parts[1])
    k_t = abar.sqrt() * k0 + (1 - abar).sqrt() * eps
    predicted = keep * fft2c(network_output(net, ifft2c(k_t), condition / scale, t, size_multiple))
    unsampled = keep.expand(x0.shape).sum().clamp_min(1.0)
    return (predicted - (eps if prediction == "eps" else k0)).abs().square().sum() / (2 * unsampled)


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise IDMError(f"unknown MC-DDPM prediction {prediction!r}; available: {', '.join(PREDICTIONS)}")
    return prediction


@dataclass
class MCDDPM:
    """A trained MC-DDPM: the image-domain U-Net (4 → 2 channels), its noise schedule, what it predicts
    (:data:`PREDICTIONS`), the scale c of the diffused k-space (``data_scale``) and the checkpoint's other config entries (``extra``: training record, accelerations)."""

    unet: UNet
    schedule: NoiseSchedule = field(default_factory=NoiseSchedule)
    extra: dict[str, Any] = field(default_factory=dict)
    prediction: str = "eps"
    data_scale: float = 1.0

    def output(self, state: torch.Tensor, condition: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """See :func:`network_output`."""
        return network_output(self.unet, state, condition, t, self.unet.config.size_multiple)

    def clean_kspace(self, k: torch.Tensor, condition: torch.Tensor, t: int, keep: torch.Tensor) -> torch.Tensor:
        """``k̂₀`` (N, 1, H, W), zero on the sampled locations, from the state ``k`` at timestep ``t``."""
        timesteps = torch.full((k.shape[0],), t, dtype=torch.long, device=k.device)
        out = keep * fft2c(self.output(ifft2c(k), condition, timesteps))
        return x0_from_eps(k, out, abar_at(self.schedule, t)) if self.prediction == "eps" else out

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def module(self) -> nn.Module:
        return self.unet

    def to(self, device: str | torch.device) -> "MCDDPM":
        self.unet.to(device)
        return self

    def config(self) -> dict[str, Any]:
        return {**self.extra, "architecture": ARCHITECTURE, "unet": self.unet.config.to_dict(),
                "schedule": self.schedule.to_dict(), "prediction": self.prediction, "data_scale": self.data_scale}

    def save(self, directory: str | Path, card: str, *, dtype: torch.dtype | None = torch.float16) -> Path:
        """Write the checkpoint directory (weights stored as ``dtype``; None keeps fp32)."""
        from ..io.checkpoint import save_checkpoint

        return save_checkpoint(directory, self.unet.state_dict(), self.config(), card, dtype=dtype)


def load_mcddpm(name_or_path: str | Path = DEFAULT_CHECKPOINT, device: str | torch.device = "cpu") -> MCDDPM:
    """An :class:`MCDDPM` checkpoint (a directory or a shipped name), in eval mode, on ``device``."""
    from ..io.checkpoint import load_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(name_or_path)
    tensors, config = load_checkpoint(path, expect={"architecture": ARCHITECTURE}, device="cpu", dtype=torch.float32)
    try:
        unet = UNet(UNetConfig.from_dict(config["unet"]))
        schedule = NoiseSchedule.from_dict(config["schedule"])
    except (KeyError, TypeError) as exc:
        raise IDMError(f"MC-DDPM checkpoint config is incomplete or malformed: {exc}") from None
    prediction = check_prediction(config.get("prediction", "eps"))
    data_scale = config.get("data_scale", 1.0)
    if not isinstance(data_scale, (int, float)) or not data_scale > 0:
        raise IDMError(f"checkpoint {path}: data_scale must be a positive number, got {data_scale!r}")
    if (unet.config.in_channels, unet.config.out_channels) != (IN_CHANNELS, OUT_CHANNELS):
        raise IDMError(f"checkpoint {path}: an MC-DDPM U-Net maps {IN_CHANNELS} channels to {OUT_CHANNELS}")
    try:
        unet.load_state_dict(tensors)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise IDMError(f"checkpoint {path} does not match its U-Net config: {first}") from None
    reserved = {"architecture", "unet", "schedule", "format", "prediction", "data_scale"}
    extra = {k: v for k, v in config.items() if k not in reserved}
    return MCDDPM(unet.eval(), schedule, extra, prediction, float(data_scale)).to(device)


def sample_mcddpm(model: MCDDPM, y: torch.Tensor, mask: torch.Tensor, *, samples: int = 8, steps: int = 20,
                  generator: torch.Generator | None = None, progress: bool = False, start: torch.Tensor | None = None,
                  start_level: float = 0.0, chunk: int = 8) -> Posterior:
    """MC-DDPM reconstruction of single-coil k-space ``y`` (B, 1, H, W) complex, zero off the bool
    ``mask`` (H, W) → :class:`~idm.registry.Posterior` (complex mean image and magnitude std, both
    (B, 1, H, W); module docstring). The K = ``samples`` chains run in batches of ``chunk``·B (memory);
    ``steps`` respaced DDPM steps; every noise draw comes from the CPU ``generator`` (the result depends on
    it, on K, ``chunk`` and the batch B). k-space off the mask is ignored (set to 0).

    ``start`` (complex (B, 1, H, W), e.g. a ``tv`` reconstruction) with ``start_level`` σ₀ > 0: the samples
    start from its unknown k-space diffused to the step whose noise-to-signal ratio √((1 − ᾱ)/ᾱ) is σ₀
    (on the scaled k-space) and take ``steps`` steps from there instead of from pure noise at the last
    step (Chung et al., "Come-closer-diffuse-faster", CVPR 2022)."""
    batch = y.shape[0]
    keep = (~mask.bool()).to(device=y.device, dtype=y.real.dtype)
    y = (1 - keep) * y  # only the sampled locations are measurements (noise elsewhere is dropped)
    scale = zero_filled_scale(ifft2c(y))
    if bool((scale <= 0).any()):
        raise IDMError("the measured k-space is all zero: nothing to condition on")
    measured = y / scale
    first, initial = None, None
    if start is not None and start_level > 0:
        first = model.schedule.timestep_for_noise(start_level)
        initial = keep * fft2c(start.to(measured.dtype)) / (scale * model.data_scale)
    pairs = timestep_pairs(model.schedule, steps, t_max=first)
    bar = tqdm(total=len(pairs) * math.ceil(samples / chunk), disable=not progress, desc="mcddpm", leave=False)
    draws = []
    for done in range(0, samples, chunk):  # K·B chains in batches of at most chunk·B
        n = min(chunk, samples - done)
        k = _chains(model, measured.repeat(n, 1, 1, 1), keep, initial, first, pairs, generator, bar)
        draws.append(ifft2c(measured.repeat(n, 1, 1, 1) + model.data_scale * k).unflatten(0, (n, batch)))
    bar.close()
    images = torch.cat(draws) * scale  # (K, B, 1, H, W)
    std = images.abs().std(0, correction=0) if samples > 1 else torch.zeros(images.shape[1:], device=y.device)
    return Posterior(images.mean(0), std)


def _chains(model: MCDDPM, measured: torch.Tensor, keep: torch.Tensor, initial: torch.Tensor | None,
            first: int | None, pairs: list[tuple[int, int]], generator: torch.Generator | None, bar: Any) -> torch.Tensor:
    """Run N = len(measured) chains (``measured`` (N, 1, H, W) scaled k-space, zero off the mask) down
    ``pairs`` from pure noise, or from ``initial`` (B, 1, H, W) diffused to timestep ``first``; → k̂₀ (N, …)."""
    k = keep * complex_noise(tuple(measured.shape), generator, measured)
    if initial is not None and first is not None:
        abar = abar_at(model.schedule, first)
        k = math.sqrt(abar) * initial.repeat(len(measured) // len(initial), 1, 1, 1) + math.sqrt(1.0 - abar) * k
    condition = ifft2c(measured)
    for t, t_next in pairs:
        abar, abar_next = abar_at(model.schedule, t), abar_at(model.schedule, t_next)
        mean, variance = ddpm_posterior(k, model.clean_kspace(k, condition, t, keep), abar, abar_next)
        k = mean + math.sqrt(variance) * keep * complex_noise(tuple(k.shape), generator, k) if variance > 0 else mean
        bar.update()
    return k


#: options of the method ``mcddpm`` and their defaults (ranges in :data:`LIMITS`)
DEFAULTS: dict[str, Any] = {"samples": 8, "steps": 20, "start": "noise", "start_level": 0.0}
LIMITS = {"samples": (1, 1024), "steps": (1, 1000), "start_level": (0.0, 1000.0)}
#: what ``start`` may name: pure noise, or the registered method whose reconstruction is diffused
STARTS = ("noise", "tv", "pnp", "idm")


class MCDDPMReconstructor:
    """``reconstruct(y, op) -> x``: MC-DDPM bound to a loaded model (``with_uncertainty`` adds the std)."""

    name = "mcddpm"

    def __init__(self, model: MCDDPM, settings: Mapping[str, Any], *, seed: int, progress: bool) -> None:
        self.model, self.settings, self.seed, self.progress = model, dict(settings), int(seed), bool(progress)
        self._start: Any = None  # the start method, built on first use

    def __call__(self, y: torch.Tensor, op: MRI) -> torch.Tensor:
        """Single-coil k-space ``y`` (B, 1, H, W) of ``op`` → the complex reconstruction (B, 1, H, W)."""
        return self.with_uncertainty(y, op).x

    def with_uncertainty(self, y: torch.Tensor, op: MRI) -> Posterior:
        """The reconstruction and its per-pixel std (:func:`sample_mcddpm`), on y's device."""
        if not isinstance(op, MRI) or op.coils != 1:
            what = type(op).__name__ if not isinstance(op, MRI) else f"MRI with {op.coils} coils"
            raise IDMError(f"mcddpm reconstructs single-coil Cartesian MRI k-space, not {what}")
        if not y.is_complex() or y.shape[1] != 1:
            raise IDMError(f"mcddpm expects complex k-space of one image channel (B, 1, H, W), got {tuple(y.shape)} "
                           f"{y.dtype}")
        check_complex_inputs(y, op)
        device = self.model.device
        generator = torch.Generator().manual_seed(self.seed)
        settings = {**DEFAULTS, **self.settings}
        name, start = settings.pop("start"), None
        if name != "noise" and settings["start_level"] > 0:
            if self._start is None:
                from ..registry import get_method

                self._start = get_method(name).build(device=device, seed=self.seed)
            start = self._start(y, op).to(device=device, dtype=torch.complex64)
        with torch.no_grad():
            posterior = sample_mcddpm(self.model, y.to(device=device, dtype=torch.complex64), op.mask.to(device),
                                      generator=generator, progress=self.progress, start=start, **settings)
        return Posterior(posterior.x.to(y.device), posterior.std.to(y.device))

    def __repr__(self) -> str:
        return f"MCDDPMReconstructor({', '.join(f'{k}={v!r}' for k, v in self.settings.items())})"


@register_method("mcddpm", "MC-DDPM: conditional diffusion over the unsampled k-space (single-coil MRI, "
                           "mean and std of K samples)", checkpoint_kind="mcddpm")
def build(*, checkpoint: Any = None, device: str | torch.device = "cpu", seed: int = 0, progress: bool = False,
          **options: Any) -> MCDDPMReconstructor:
    """``mcddpm``: options ``samples`` (K, default 8), ``steps`` (respaced DDPM steps, default 20), ``start``
    (``noise``, or a method of :data:`STARTS` whose reconstruction is diffused to ``start_level``, the
    noise-to-signal ratio of the first step; see :func:`sample_mcddpm`); ``checkpoint``: an MC-DDPM
    checkpoint (default ``mcddpm-mri``)."""
    settings = checked_options("mcddpm", DEFAULTS, options, LIMITS)
    if settings["start"] not in STARTS:
        raise IDMError(f"method 'mcddpm': option start must be one of {', '.join(STARTS)}, got {settings['start']!r}")
    if (settings["start"] == "noise") != (settings["start_level"] == 0):
        raise IDMError("method 'mcddpm': start=METHOD needs start_level > 0 (and start_level needs a start method)")
    model = load_mcddpm(DEFAULT_CHECKPOINT if checkpoint is None else checkpoint, device=device)
    model.unet.requires_grad_(False)
    if settings["steps"] > model.schedule.num_steps:
        raise IDMError(f"method 'mcddpm': {settings['steps']} steps exceed the model's "
                       f"{model.schedule.num_steps}-step schedule")
    return MCDDPMReconstructor(model, settings, seed=seed, progress=progress)
