"""Bring your own prior: pre-trained diffusers U-Nets as diffusion priors (needs ``pip install 'idm[hub]'``).

Where a model comes from (``path_or_hub_id``):

* a **model folder** written by ``save_pretrained`` (``config.json`` with ``"_class_name"``,
  ``diffusion_pytorch_model[.VARIANT].safetensors``); its scheduler config is looked for beside it
  (``scheduler_config.json``, the legacy single-folder layout) and in ``../scheduler/`` (a pipeline's
  ``unet/`` folder given directly);
* a **pipeline folder** (``model_index.json``, ``unet/``, ``scheduler/scheduler_config.json``);
* ``hf:ORG/NAME[/SUBFOLDER]``: a Hugging Face Hub repository. Only this explicit prefix ever touches
  the network; the configs and the safetensors weights of the U-Net are downloaded into the
  Hugging Face cache and then loaded like a local folder.

Weights are read from safetensors only (``use_safetensors=True``; a folder with only pickled
``.bin`` weights is refused). Without a scheduler config the default DDPM schedule (linear,
1000 steps, β 1e-4 → 0.02) is assumed, with a one-line warning on stderr.

:class:`DiffusersPrior` wraps a ``UNet2DModel`` (pixel space, unconditional) in the interface of
:class:`idm.priors.Prior` used by the zero-shot solvers. ``UNet2DConditionModel`` folders (Stable
Diffusion style: latent space, text-conditioned) are loaded by :func:`load_diffusers_unet` for
conversion / fine-tuning, but are not zero-shot priors.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import IDMError
from .prior import VALUE_RANGE, PriorSampling
from .schedule import NoiseSchedule, from_model_range, schedule_from_diffusers, to_model_range

HUB_PREFIX = "hf:"
#: the diffusers U-Net classes :func:`load_diffusers_unet` loads
UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
#: what the network predicts (diffusers' ``prediction_type``)
PREDICTIONS = ("epsilon", "v_prediction", "sample")

WEIGHTS_NAME = "diffusion_pytorch_model"
MODEL_CONFIG = "config.json"
PIPELINE_INDEX = "model_index.json"
SCHEDULER_CONFIG = "scheduler_config.json"


# --- locating a model ----------------------------------------------------------------------------
def is_hub_id(name: Any) -> bool:
    """Whether ``name`` is an explicit Hugging Face Hub id ``hf:ORG/NAME[/SUBFOLDER]``."""
    return isinstance(name, str) and name.startswith(HUB_PREFIX)


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None if the file is missing or is not a JSON object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def is_diffusers_folder(path: Any) -> bool:
    """Whether ``path`` is a diffusers model folder (``config.json`` with ``"_class_name"``) or
    pipeline folder (``model_index.json`` and a ``unet/`` subfolder). Never raises."""
    try:
        folder = Path(path).expanduser()
        if not folder.is_dir():
            return False
        if (folder / PIPELINE_INDEX).is_file() and (folder / "unet").is_dir():
            return True
        config = _read_json(folder / MODEL_CONFIG)
    except (TypeError, OSError):
        return False
    return config is not None and "_class_name" in config


@dataclass(frozen=True)
class DiffusersSource:
    """A located diffusers U-Net: its folder, class name, weights variant (None: the plain
    ``diffusion_pytorch_model.safetensors``), scheduler config (None if absent) and provenance."""

    unet_dir: Path
    class_name: str
    variant: str | None
    scheduler_config: dict[str, Any] | None
    source: str


def _weights_variant(unet_dir: Path) -> str | None:
    """The safetensors weights variant in ``unet_dir`` (None: unsuffixed); IDMError if there are none."""
    if (unet_dir / f"{WEIGHTS_NAME}.safetensors").is_file() or (
        unet_dir / f"{WEIGHTS_NAME}.safetensors.index.json"
    ).is_file():
        return None
    files = unet_dir.glob(f"{WEIGHTS_NAME}.*.safetensors")
    variants = sorted(p.name[len(WEIGHTS_NAME) + 1 : -len(".safetensors")] for p in files)
    if variants:
        return variants[0]
    if any(unet_dir.glob("*.bin")) or any(unet_dir.glob("*.pt")) or any(unet_dir.glob("*.ckpt")):
        raise IDMError(
            f"{unet_dir} holds only pickled PyTorch weights (.bin/.pt/.ckpt), which idm never loads; convert them to "
            f"safetensors first (save_pretrained(..., safe_serialization=True) in a trusted environment)"
        )
    raise IDMError(f"{unet_dir} has no {WEIGHTS_NAME}.safetensors weights")


def locate_local(folder: str | Path, source: str | None = None) -> DiffusersSource:
    """Locate the U-Net, its weights and its scheduler config in a local model or pipeline folder."""
    folder = Path(folder).expanduser()
    source = source or str(folder)
    if not folder.is_dir():
        raise IDMError(
            f"diffusers model folder not found: {folder} "
            f"(to download from the Hugging Face Hub, write {HUB_PREFIX}ORG/NAME)"
        )
    if (folder / PIPELINE_INDEX).is_file() and (folder / "unet" / MODEL_CONFIG).is_file():
        unet_dir, schedulers = folder / "unet", [folder / "scheduler" / SCHEDULER_CONFIG]
    elif (folder / MODEL_CONFIG).is_file():
        unet_dir = folder
        schedulers = [folder / SCHEDULER_CONFIG, folder.parent / "scheduler" / SCHEDULER_CONFIG]
    else:
        raise IDMError(f"not a diffusers model or pipeline folder: {folder} (no {MODEL_CONFIG} or unet/{MODEL_CONFIG})")
    config = _read_json(unet_dir / MODEL_CONFIG)
    if config is None or not isinstance(config.get("_class_name"), str):
        raise IDMError(f"{unet_dir / MODEL_CONFIG} is not a diffusers model config (no \"_class_name\")")
    variant = _weights_variant(unet_dir)
    scheduler_path = next((p for p in schedulers if p.is_file()), None)
    scheduler = None
    if scheduler_path is not None:
        scheduler = _read_json(scheduler_path)
        if scheduler is None:
            raise IDMError(f"corrupt diffusers scheduler config {scheduler_path}")
    return DiffusersSource(unet_dir, config["_class_name"], variant, scheduler, source)


def _hub_patterns(subfolder: str) -> list[str]:
    """Files to fetch from a Hub repository: configs, and the U-Net's unsuffixed safetensors weights."""
    patterns = [PIPELINE_INDEX, SCHEDULER_CONFIG, f"scheduler/{SCHEDULER_CONFIG}"]
    for base in ([subfolder] if subfolder else ["", "unet"]):
        prefix = f"{base}/" if base else ""
        patterns += [
            f"{prefix}{MODEL_CONFIG}",
            f"{prefix}{WEIGHTS_NAME}.safetensors",
            f"{prefix}{WEIGHTS_NAME}.safetensors.index.json",
            f"{prefix}{WEIGHTS_NAME}-*.safetensors",
        ]
    return patterns


def locate_hub(hub_id: str) -> DiffusersSource:
    """Download (into the Hugging Face cache) what ``hf:ORG/NAME[/SUBFOLDER]`` needs, then locate it."""
    spec = hub_id[len(HUB_PREFIX) :].strip("/")
    parts = spec.split("/")
    if len(parts) < 2 or not all(parts):
        raise IDMError(f"malformed Hugging Face Hub id {hub_id!r}: expected {HUB_PREFIX}ORG/NAME[/SUBFOLDER]")
    repo, subfolder = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(repo, allow_patterns=_hub_patterns(subfolder)))
    except ImportError:
        raise IDMError("loading from the Hugging Face Hub needs huggingface_hub: pip install 'idm[hub]'") from None
    except (OSError, ValueError) as exc:  # network, missing repository, gated model, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise IDMError(f"cannot download {hub_id} from the Hugging Face Hub: {first}") from None
    return locate_local(local / subfolder if subfolder else local, source=hub_id)


def locate(path_or_hub_id: str | Path) -> DiffusersSource:
    """Locate a diffusers U-Net given as a local folder or an explicit ``hf:`` id (see the module docstring)."""
    if is_hub_id(path_or_hub_id):
        return locate_hub(str(path_or_hub_id))
    return locate_local(path_or_hub_id)


# --- loading -------------------------------------------------------------------------------------
def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError:
        raise IDMError("diffusers models need the diffusers package: pip install 'idm[hub]'") from None
    return diffusers


def _load_model(located: DiffusersSource, device: str | torch.device) -> nn.Module:
    if located.class_name not in UNET_CLASSES:
        raise IDMError(
            f"{located.source} is a diffusers {located.class_name}, not a U-Net ({' or '.join(UNET_CLASSES)})"
        )
    cls = getattr(_diffusers(), located.class_name)
    try:
        model = cls.from_pretrained(
            str(located.unet_dir),
            use_safetensors=True,
            local_files_only=True,
            variant=located.variant,
            torch_dtype=torch.float32,
        )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise IDMError(f"cannot load the diffusers {located.class_name} of {located.source}: {first}") from None
    return model.to(device).eval()


def load_diffusers_unet(
    path_or_hub_id: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any] | None, str]:
    """Load a diffusers ``UNet2DModel`` or ``UNet2DConditionModel`` (float32, eval mode, on ``device``).

    Returns ``(model, scheduler_config, source)``: the scheduler config dict of the model's
    scheduler (None when there is none) and the folder or ``hf:`` id it came from.
    """
    located = locate(path_or_hub_id)
    return _load_model(located, device), located.scheduler_config, located.source


def scheduler_settings(located: DiffusersSource) -> tuple[NoiseSchedule, str]:
    """``(schedule, prediction type)`` from the located scheduler config; without one, the DDPM
    schedule and ε-prediction, with a warning on stderr."""
    scheduler = located.scheduler_config
    if scheduler is None:
        print(
            f"warning: {located.source} has no scheduler config; assuming the DDPM schedule "
            f"(linear, 1000 steps, beta 1e-4 -> 0.02) and epsilon prediction",
            file=sys.stderr,
        )
        return NoiseSchedule(), "epsilon"
    return schedule_from_diffusers(scheduler), scheduler.get("prediction_type", "epsilon")


@dataclass(frozen=True)
class DiffusersBackbone:
    """A loaded diffusers U-Net (``UNet2DModel`` or ``UNet2DConditionModel``) with its noise
    schedule: what :meth:`idm.network.IDMNet.from_prior` converts (the model itself is not changed)."""

    model: nn.Module
    schedule: NoiseSchedule
    prediction: str
    source: str
    channels: int = 1


def load_diffusers_backbone(path_or_hub_id: str | Path, *, device: str | torch.device = "cpu") -> DiffusersBackbone:
    """A diffusers U-Net folder or ``hf:`` id with its schedule (see :func:`scheduler_settings`)."""
    located = locate(path_or_hub_id)
    schedule, prediction = scheduler_settings(located)
    return DiffusersBackbone(_load_model(located, device), schedule, prediction, located.source)


def load_diffusers_prior(
    path_or_hub_id: str | Path, *, channels: int = 1, device: str | torch.device = "cpu"
) -> "DiffusersPrior":
    """A :class:`DiffusersPrior` (eval mode, on ``device``) serving images of ``channels`` channels
    from a diffusers ``UNet2DModel`` folder or ``hf:`` id; its schedule and prediction type come from
    the scheduler config (default DDPM schedule and ε-prediction, with a warning, when there is none)."""
    located = locate(path_or_hub_id)
    if located.class_name == "UNet2DConditionModel":
        raise IDMError(
            f"{located.source} is a UNet2DConditionModel (latent, text-conditioned, Stable Diffusion style): "
            f"it is only supported for conversion / fine-tuning, not as a zero-shot prior (use a UNet2DModel)"
        )
    schedule, prediction = scheduler_settings(located)
    model = _load_model(located, device)
    return DiffusersPrior(model, schedule, channels=channels, prediction=prediction, source=located.source)


# --- the prior -----------------------------------------------------------------------------------
def _check_zero_shot_unet(model: nn.Module, channels: int, what: str) -> None:
    """IDMError unless ``model`` is an unconditional ε/v/x₀ ``UNet2DModel`` able to serve ``channels``-channel images."""
    name = type(model).__name__
    if not isinstance(model, _diffusers().UNet2DModel):
        detail = ""
        if name == "UNet2DConditionModel":
            detail = " (latent, text-conditioned): only supported for conversion / fine-tuning"
        raise IDMError(f"a zero-shot prior needs a diffusers UNet2DModel, got {name}{detail}")
    config = model.config
    if config.time_embedding_type == "fourier":
        raise IDMError(f"{what} is a variance-exploding score model (Fourier time embedding); not supported")
    if config.class_embed_type is not None or config.num_class_embeds is not None:
        raise IDMError(f"{what} is class-conditional; only unconditional UNet2DModel priors are supported")
    m, out = int(config.in_channels), int(config.out_channels)
    if out not in (m, 2 * m):
        raise IDMError(f"{what} has in_channels={m} and out_channels={out}; expected {m} or {2 * m} outputs")
    if not (channels == m or (channels == 1 and m == 3)):
        raise IDMError(f"a model with {m} input channel(s) cannot serve {channels}-channel images "
                       f"(only {m}, or gray on RGB)")


class DiffusersPrior(PriorSampling):
    """A diffusers ``UNet2DModel`` as an ε-prediction prior on [-1, 1] (the interface of :class:`~idm.priors.Prior`).

    ``prior(x, t) -> eps``: ``x`` (B, channels, H, W) on [-1, 1], H and W multiples of
    ``size_multiple``; ``t`` (B,) integer timesteps of ``schedule``; ``eps`` shaped like ``x``.

    Conventions handled: a gray prior (``channels = 1``) on an RGB model (``in_channels = 3``) feeds
    the gray image to all three channels and returns the mean of the three ε channels; learned-variance
    models (``out_channels = 2·in_channels``) keep the ε half; ``prediction`` ``"v_prediction"``
    (ε = √ᾱ·v + √(1−ᾱ)·x) and ``"sample"`` (ε = (x − √ᾱ·x̂₀)/√(1−ᾱ)) are converted to ε.
    """

    value_range = VALUE_RANGE
    to_model_range = staticmethod(to_model_range)
    from_model_range = staticmethod(from_model_range)

    def __init__(
        self,
        model: nn.Module,
        schedule: NoiseSchedule | None = None,
        *,
        channels: int = 1,
        prediction: str = "epsilon",
        source: str = "",
    ) -> None:
        _check_zero_shot_unet(model, channels, source or type(model).__name__)
        if prediction not in PREDICTIONS:
            raise IDMError(f"prediction type {prediction!r} is not supported; supported: {', '.join(PREDICTIONS)}")
        self.model, self.schedule = model, schedule if schedule is not None else NoiseSchedule()
        self.prediction, self.source = prediction, source
        self._channels, self._model_channels = int(channels), int(model.config.in_channels)

    @property
    def channels(self) -> int:
        """Image channels served (1 = grayscale)."""
        return self._channels

    @property
    def module(self) -> nn.Module:
        """The diffusers model, e.g. for ``.eval()`` or ``.requires_grad_(False)``."""
        return self.model

    @property
    def size_multiple(self) -> int:
        """Image height and width must be multiples of this (the U-Net downsamples between its down blocks)."""
        return 2 ** (len(self.model.config.down_block_types) - 1)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> "DiffusersPrior":
        self.model.to(device)
        return self

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise IDMError(f"prior expects input (B, {self.channels}, H, W), got {tuple(x.shape)}")
        m = self._model_channels
        inp = x.expand(-1, m, -1, -1) if m != self.channels else x
        steps = torch.as_tensor(t, device=x.device).long().reshape(-1).expand(x.shape[0])
        out = self.model(inp, steps, return_dict=False)[0][:, :m]
        if self.prediction == "v_prediction":
            a = self.schedule.abar(steps, inp)
            out = a.sqrt() * out + (1 - a).sqrt() * inp
        elif self.prediction == "sample":
            out = self.schedule.predict_eps(inp, steps, out)
        return out.mean(dim=1, keepdim=True) if m != self.channels else out

    def __repr__(self) -> str:
        return (
            f"DiffusersPrior({self.source or type(self.model).__name__!r}, channels={self.channels}, "
            f"prediction={self.prediction!r}, {self.schedule!r})"
        )
