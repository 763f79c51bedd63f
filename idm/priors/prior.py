"""A pre-trained diffusion prior: U-Net + noise schedule + value-range convention, saved as a checkpoint.

Checkpoint directory (via :mod:`idm.io.checkpoint`): ``model.safetensors`` (the U-Net's
state dict), ``config.json`` ::

    {"architecture": "unet", "prediction": "eps", "value_range": [-1, 1],
     "unet": UNetConfig.to_dict(), "schedule": NoiseSchedule.to_dict(), ...extra}

and ``README.md`` (the model card).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import IDMError
from .samplers import SAMPLERS
from .schedule import NoiseSchedule, from_model_range, to_model_range
from .unet import UNet, UNetConfig

ARCHITECTURE = "unet"
VALUE_RANGE = (-1.0, 1.0)


@dataclass
class Prior:
    """ε-prediction diffusion prior on the value range [-1, 1] (images [0, 1] map to ``2x - 1``).

    ``prior(x, t) -> eps`` calls the U-Net; ``x`` (B, C, H, W) on [-1, 1], ``t`` (B,) timesteps.
    ``extra`` holds further config entries (e.g. training metadata) kept on save.
    """

    unet: UNet
    schedule: NoiseSchedule = field(default_factory=NoiseSchedule)
    extra: dict[str, Any] = field(default_factory=dict)

    value_range = VALUE_RANGE
    to_model_range = staticmethod(to_model_range)
    from_model_range = staticmethod(from_model_range)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def channels(self) -> int:
        return self.unet.config.in_channels

    def to(self, device: str | torch.device) -> "Prior":
        self.unet.to(device)
        return self

    def config(self) -> dict[str, Any]:
        return {
            **self.extra,
            "architecture": ARCHITECTURE,
            "prediction": "eps",
            "value_range": list(VALUE_RANGE),
            "unet": self.unet.config.to_dict(),
            "schedule": self.schedule.to_dict(),
        }

    @torch.no_grad()
    def sample(
        self,
        n: int,
        size: int | tuple[int, int] = 64,
        *,
        steps: int = 50,
        sampler: str = "ddim",
        eta: float | None = None,
        seed: int | None = 0,
        progress: bool = False,
    ) -> torch.Tensor:
        """Draw ``n`` images of ``size`` (an int or (H, W)) from the prior → (n, C, H, W) on [0, 1]."""
        if sampler not in SAMPLERS:
            raise IDMError(f"unknown sampler {sampler!r}; available: {', '.join(SAMPLERS)}")
        if n < 1:
            raise IDMError(f"number of samples must be >= 1, got {n}")
        h, w = (size, size) if isinstance(size, int) else size
        device = self.device
        gen = torch.Generator(device=device)
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(int(seed))
        x = torch.randn((n, self.channels, h, w), generator=gen, device=device)
        self.unet.check_input(x)
        kw = {} if eta is None else {"eta": eta}
        was_training = self.unet.training
        self.unet.eval()
        try:
            x0 = SAMPLERS[sampler](self, x, self.schedule, steps, generator=gen, progress=progress, **kw)
        finally:
            self.unet.train(was_training)
        return from_model_range(x0).clamp(0.0, 1.0)

    def save(self, directory: str | Path, card: str, *, dtype: torch.dtype | None = torch.float16) -> Path:
        """Write the checkpoint directory (weights stored as ``dtype``, e.g. fp16/bf16; None keeps fp32)."""
        from ..io.checkpoint import save_checkpoint

        tensors = {k: v.detach() for k, v in self.unet.state_dict().items()}
        return save_checkpoint(directory, tensors, self.config(), card, dtype=dtype)


def prior_from_config(config: dict[str, Any]) -> Prior:
    """Build an (untrained) :class:`Prior` from a checkpoint config dict."""
    if config.get("architecture") != ARCHITECTURE or config.get("prediction", "eps") != "eps":
        raise IDMError(f"checkpoint is not an eps-prediction U-Net prior (architecture={config.get('architecture')!r})")
    try:
        unet_cfg = UNetConfig.from_dict(config["unet"])
        schedule = NoiseSchedule.from_dict(config["schedule"])
    except (KeyError, TypeError) as exc:
        raise IDMError(f"prior checkpoint config is incomplete or malformed: {exc}") from None
    reserved = {"architecture", "prediction", "value_range", "unet", "schedule", "format"}
    return Prior(UNet(unet_cfg), schedule, {k: v for k, v in config.items() if k not in reserved})


def load_prior(name_or_path: str | Path = "prior-gray", device: str | torch.device = "cpu") -> Prior:
    """Load a prior checkpoint (a directory, or a bare name searched in the repo's ``checkpoints/``).

    Weights stored in fp16/bf16 are loaded as float32. The U-Net is returned in eval mode.
    """
    from ..io.checkpoint import load_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(name_or_path)
    tensors, config = load_checkpoint(path, expect={"architecture": ARCHITECTURE}, device="cpu", dtype=torch.float32)
    prior = prior_from_config(config)
    try:
        missing, unexpected = prior.unet.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # shape mismatch
        first = str(exc).strip().splitlines()[-1].strip()
        raise IDMError(f"checkpoint {path} does not match its U-Net config: {first}") from None
    if missing or unexpected:
        raise IDMError(
            f"checkpoint {path} does not match its U-Net config "
            f"(missing {len(missing)} tensors e.g. {missing[:2]}, unexpected {len(unexpected)} e.g. {unexpected[:2]})"
        )
    prior.unet.eval()
    return prior.to(device)
