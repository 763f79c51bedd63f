"""A Gaussian denoiser used as a diffusion prior (:class:`DenoiserPrior`), and its checkpoints.

A denoiser ``D(z, σ)`` of images on [0, 1] (``z = x + σ n``, ``n ~ N(0, I)``) is an x̂₀-predictor
for every noise level, so it serves as an ε-prediction prior on [-1, 1] (Kadkhodaie & Simoncelli,
NeurIPS 2021; the plug-and-play view of Zhu et al., "DiffPIR", CVPR 2023): for the diffusion state
``x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε`` (x₀ on [-1, 1])::

    z   = (x_t / √ᾱ_t + 1) / 2                 the image on [0, 1] with noise of std σ_t
    σ_t = √((1 − ᾱ_t) / ᾱ_t) / 2               (half the model-range noise-to-signal ratio)
    x̂₀ = 2 D(z, σ_t) − 1,   ε = (x_t − √ᾱ_t x̂₀) / √(1 − ᾱ_t) = n̂ / σ_t

with ``n̂ = z − D(z, σ_t)`` the denoiser's noise estimate. The prior's discrete ``schedule`` only
names the timesteps ``t`` the samplers use; any ᾱ works (:meth:`DenoiserPrior.eps_at`).

Checkpoint directory (:mod:`idm.io.checkpoint`): ``config.json`` ``{"architecture": "dncnn",
"dncnn": DnCNNConfig.to_dict(), "schedule": NoiseSchedule.to_dict() (optional), ...}`` and the
:class:`~idm.priors.dncnn.DnCNN` weights; shipped: ``dncnn-17`` (scico's DnCNN-17N, converted by
``train/convert_scico_dncnn.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import IDMError
from .dncnn import DnCNN, DnCNNConfig
from .prior import PriorSampling
from .schedule import NoiseSchedule, from_model_range, to_model_range

ARCHITECTURE = "dncnn"


def image_sigma(abar: torch.Tensor) -> torch.Tensor:
    """σ_t = √((1 − ᾱ) / ᾱ) / 2: the noise std on the [0, 1] image scale of a state at ᾱ."""
    return ((1 - abar) / abar).sqrt() * 0.5


def denoiser_eps(residual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                 abar: torch.Tensor) -> torch.Tensor:
    """ε of the state ``x`` (B, C, H, W) on [-1, 1] at ``abar`` (a tensor broadcastable to (B, 1, 1, 1),
    0 < ᾱ < 1) from a denoiser's noise estimate ``residual(z, σ) -> n̂`` on [0, 1] (module docstring):
    ``ε = n̂(z, σ_t) / σ_t`` with ``z = (x/√ᾱ + 1)/2``."""
    sigma = image_sigma(abar)
    return residual(from_model_range(x / abar.sqrt()), sigma) / sigma


@dataclass
class DenoiserPrior(PriorSampling):
    """ε-prediction prior on [-1, 1] from a Gaussian denoiser (module docstring).

    ``prior(x, t) -> ε`` for ``x`` (B, C, H, W) on [-1, 1] (any H, W) and ``t`` (B,) timesteps of
    ``schedule``; :meth:`eps_at` takes ᾱ directly; :meth:`denoise` is ``D(z, σ)`` on [0, 1].
    """

    denoiser: nn.Module  # a DnCNN, or the user's FFDNet (idm.priors.ffdnet): D(z, σ), residual(z, σ), config
    schedule: NoiseSchedule = field(default_factory=NoiseSchedule)
    extra: dict[str, Any] = field(default_factory=dict)

    value_range = (-1.0, 1.0)
    size_multiple = 1
    to_model_range = staticmethod(to_model_range)
    from_model_range = staticmethod(from_model_range)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.eps_at(x, self.schedule.abar(t, x))

    def eps_at(self, x: torch.Tensor, abar: torch.Tensor | float) -> torch.Tensor:
        """ε for the state ``x`` (B, C, H, W) on [-1, 1] at ``abar`` (scalar or (B, 1, 1, 1)), 0 < ᾱ < 1."""
        return denoiser_eps(self.denoiser.residual, x, torch.as_tensor(abar, dtype=x.dtype, device=x.device))

    def denoise(self, z: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """``D(z, σ)``: ``z`` (B, C, H, W) on [0, 1] with noise of std ``sigma`` (float or (B,))."""
        return self.denoiser(z, sigma)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def channels(self) -> int:
        return self.denoiser.config.channels

    @property
    def module(self) -> nn.Module:
        return self.denoiser

    def to(self, device: str | torch.device) -> "DenoiserPrior":
        self.denoiser.to(device)
        return self

    def config(self) -> dict[str, Any]:
        return {**self.extra, "architecture": ARCHITECTURE, "dncnn": self.denoiser.config.to_dict(),
                "schedule": self.schedule.to_dict()}

    def save(self, directory: str | Path, card: str, *, dtype: torch.dtype | None = torch.float16) -> Path:
        """Write the checkpoint directory (weights stored as ``dtype``; None keeps fp32)."""
        from ..io.checkpoint import save_checkpoint

        if not isinstance(self.denoiser, DnCNN):
            raise IDMError(f"only DnCNN denoiser priors can be saved as idm checkpoints, not {type(self.denoiser).__name__}")
        return save_checkpoint(directory, self.denoiser.state_dict(), self.config(), card, dtype=dtype)


def denoiser_prior_from_checkpoint(path: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> DenoiserPrior:
    """A :class:`DenoiserPrior` from a loaded ``dncnn`` checkpoint (weights as float32)."""
    try:
        net = DnCNN(DnCNNConfig.from_dict(config["dncnn"]))
        schedule = NoiseSchedule.from_dict(config["schedule"]) if "schedule" in config else NoiseSchedule()
    except (KeyError, TypeError) as exc:
        raise IDMError(f"denoiser checkpoint config is incomplete or malformed: {exc}") from None
    try:
        net.load_state_dict(tensors)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise IDMError(f"checkpoint {path} does not match its DnCNN config: {first}") from None
    reserved = {"architecture", "dncnn", "schedule", "format"}
    return DenoiserPrior(net.eval(), schedule, {k: v for k, v in config.items() if k not in reserved})
