"""The IDM reconstruction network: the prior's T-step sampler as one invertible network.

Sampler (Chen et al., "Invertible Diffusion Models for Compressed Sensing", IEEE TPAMI 2025), on
the prior's value range [-1, 1] (``x_model = 2·x_image − 1``)::

    x = sqrt(ᾱ_T) · (2·x_start − 1)            start: x_start = A†y, or the tv / pnp result (config.start)
    for t = T … 1:                                 (config.passes > 1: repeated from x_start = the output)
        ε  = shuffle(UNet(unshuffle(x)))                           (injectors see A, y, step t)
        x̂₀ = (x − sqrt(1 − ᾱ_t)·ε) / sqrt(ᾱ_t)                    x0_from_eps
        x̂₀ = 2·DC((x̂₀ + 1)/2) − 1,  DC(x) = x − A†(A x − y)       op.project, on [0, 1]
        x  = sqrt(ᾱ_{t−1})·x̂₀ + sqrt(1 − ᾱ_{t−1})·ε               ddim_step, η = 0 (ᾱ_0 = 1: x = x̂₀)
    output (x + 1)/2 on [0, 1]

with a learnable α ∈ R^T, ᾱ = cumprod(α) (α clamped to [1e-4, 0.9999] in use). Images are padded
internally (zeros, bottom/right) to a multiple of :attr:`IDMConfig.size_multiple` and the output is
cropped to the operator's domain ``(B, C, *op.domain_size)``.

Invertibility (:mod:`idm.invertible`): the T steps form a
:class:`~idm.invertible.ReversibleSampler` (level 1: each step is a coupling on duplicated streams
``(x, s·x)``, merged ``y₁ + m·y₂``); the U-Net is a :class:`~idm.invertible.ReversibleUNet` whose
shape-preserving runs, injectors included, are reversible sequences (level 2). ``levels`` only
selects the memory strategy — ``"none"`` plain autograd, ``"steps"`` level 1 only, ``"both"`` — the
parameters and the function are the same. Without grad (inference) every level runs the plain
forward, which stores nothing anyway.

Note: with the couplings' ``v = 0.5`` (the official initialisation) the network at initialisation is
not exactly the plain sampler (see :mod:`idm.invertible.coupling`); with every ``v`` set to 0
(:meth:`IDMNet.zero_couplings`, only for ``levels="none"``) it is.
"""

from __future__ import annotations

import copy
from dataclasses import replace
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import IDMError, check_ratio
from ..io.checkpoint import load_unique_state_dict, unique_state_dict
from ..invertible import ReversibleSampler, ReversibleUNet, convert_unet, set_memory_mode, unet_layout
from ..invertible.convert import InjectionSite
from ..physics.base import LinearOperator
from ..physics.mri import merge_groups, split_groups
from ..invertible.layout import dncnn_layout
from ..priors.denoiser import denoiser_eps
from ..priors.dncnn import DnCNN, DnCNNConfig, network_input
from ..priors.schedule import NoiseSchedule, ddim_step, from_model_range, to_model_range, x0_from_eps
from ..priors.unet import UNet
from .adapt import adapt_diffusers_unet, adapt_unet, alpha_from_abar, constant_timestep, initial_abar
from .config import IDMConfig
from .injector import Injector
from .measurement import MeasurementContext

ARCHITECTURE = "idm"
ALPHA_RANGE = (1e-4, 0.9999)


class SamplingStep(nn.Module):
    """Step ``t`` of the sampler as a coupling body ``(x, context) -> x_{t−1}`` (canvas, model range).

    ``context = {"meas": MeasurementContext, "abar": (T+1,) tensor with abar[0] = 1}``. The U-Net
    is shared by all steps (registered in each so reversible backward sees its parameters).
    With a denoiser backbone (``denoiser``: its :class:`~idm.priors.dncnn.DnCNNConfig`) the
    converted network maps the denoiser's input to its noise estimate and ε follows from it at
    the step's learnable ᾱ_t (:func:`~idm.priors.denoiser.denoiser_eps`).
    """

    def __init__(self, t: int, unet: ReversibleUNet, unshuffle: int, denoiser: DnCNNConfig | None = None,
                 fold: int = 1) -> None:
        super().__init__()
        self.t, self.unshuffle, self.fold = int(t), int(unshuffle), int(fold)
        self.unet = unet
        self.denoiser = denoiser

    def noise(self, x: torch.Tensor, meas: MeasurementContext, abar: torch.Tensor) -> torch.Tensor:
        """ε estimate for the canvas ``x`` (B, C, H, W) at ``abar`` (the step's ᾱ_t, a scalar tensor);
        the backbone sees ``(fold·B, C/fold, H, W)`` (complex images: Re and Im as two items,
        :func:`~idm.physics.mri.split_groups`)."""
        context = {"meas": meas, "step": self.t - 1}
        h = split_groups(x, self.fold)
        if self.denoiser is not None:
            eps = denoiser_eps(lambda z, s: self.unet(network_input(self.denoiser, z, s), context), h, abar)
        else:
            u = self.unshuffle
            eps = self.unet(F.pixel_unshuffle(h, u) if u > 1 else h, context)
            eps = F.pixel_shuffle(eps, u) if u > 1 else eps
        return merge_groups(eps, self.fold)

    def forward(self, x: torch.Tensor, context: dict[str, Any]) -> torch.Tensor:
        meas: MeasurementContext = context["meas"]
        abar: torch.Tensor = context["abar"]
        a, a_prev = abar[self.t].to(x.dtype), abar[self.t - 1].to(x.dtype)
        eps = self.noise(x, meas, a)
        with torch.autocast(x.device.type, enabled=False):  # data consistency in full precision
            eps = eps.to(x.dtype)
            x0 = to_model_range(meas.data_consistency(from_model_range(x0_from_eps(x, eps, a))))
            return ddim_step(x0, eps, a_prev)

    def extra_repr(self) -> str:
        return f"t={self.t}"


class IDMNet(nn.Module):
    """IDM: ``forward(y, op) -> x`` of shape ``(B, C, *op.domain_size)``, values nominally in [0, 1].

    Args:
        prior_unet: the pre-trained prior's U-Net (copied, not modified) — ours, or a diffusers
            model when ``config.backbone`` is set — or None for an untrained network of the
            architecture in ``config`` (to load weights into).
        config: :class:`IDMConfig`; ``config.unet`` must match ``prior_unet.config``.
    """

    def __init__(self, prior_unet: nn.Module | None, config: IDMConfig) -> None:
        super().__init__()
        self.config = config
        schedule = NoiseSchedule.from_dict(config.prior_schedule)
        abar = initial_abar(config.steps, config.schedule_init, config.alpha_init, schedule,
                            (config.sigma_max, config.sigma_min))
        t_constant = constant_timestep(schedule, abar)
        denoiser = DnCNNConfig.from_dict(config.denoiser) if config.denoiser is not None else None
        if denoiser is not None:
            if prior_unet is not None and getattr(prior_unet, "config", None) != denoiser:
                raise IDMError(f"IDM config's denoiser {denoiser} does not match the prior's {prior_unet.config}")
            layout = dncnn_layout(copy.deepcopy(prior_unet) if prior_unet is not None else DnCNN(denoiser))
        elif config.backbone is not None:
            layout = self._diffusers_layout(prior_unet, t_constant)
        else:
            if prior_unet is not None and getattr(prior_unet, "config", None) != config.unet:
                raise IDMError(f"IDM config's U-Net {config.unet} does not match the prior's {prior_unet.config}")
            unet = adapt_unet(prior_unet if prior_unet is not None else UNet(config.unet), config.unshuffle)
            layout = unet_layout(unet, t_constant)
        self.unet = convert_unet(
            layout,
            injectors=self._injector_factory() if config.injectors else None,
            v_init=config.coupling_v,
        )
        self.alpha = nn.Parameter(alpha_from_abar(abar).float())
        steps = [SamplingStep(t, self.unet, config.unshuffle, denoiser, config.fold) for t in range(config.steps, 0, -1)]
        self.sampler = ReversibleSampler(steps, v_init=config.coupling_v)
        self._start_solver: Any = None  # the tv / pnp reconstructor of config.start, see start_estimate
        self.set_levels(config.levels)

    def _diffusers_layout(self, model: nn.Module | None, t_constant: int):
        """Layout of the pruned, channel-adapted copy of the diffusers ``model`` (built from the
        recorded config when None)."""
        from ..invertible.diffusers import PruneOptions, diffusers_layout, prune_diffusers_unet

        backbone = self.config.backbone
        if model is None:
            model = diffusers_from_config(backbone)
        elif type(model).__name__ != backbone["class_name"]:
            raise IDMError(f"IDM backbone is a {backbone['class_name']}, got a {type(model).__name__}")
        pruned = prune_diffusers_unet(model, PruneOptions.from_dict(backbone["prune"]))
        adapt_diffusers_unet(pruned, self.config.backbone_channels, self.config.unshuffle)
        return diffusers_layout(pruned, t_constant)

    def _injector_factory(self):
        cfg = self.config

        def factory(site: InjectionSite) -> Injector | None:
            if not site.last:
                return None
            return Injector(site.channels, cfg.unshuffle * 2**site.level, cfg.channels, cfg.steps, group=cfg.fold)

        return factory

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def from_prior(cls, prior: Any, config: IDMConfig | None = None, *, prune: dict[str, Any] | None = None,
                   **changes: Any) -> "IDMNet":
        """IDM network initialised from a prior: a :class:`~idm.priors.Prior` (its U-Net and
        schedule), or a diffusers U-Net with its schedule — a :class:`~idm.priors.hub.DiffusersBackbone`
        or :class:`~idm.priors.hub.DiffusersPrior` (see :meth:`from_diffusers`; ``prune`` applies to
        these only)."""
        if getattr(prior, "model", None) is not None and not hasattr(prior, "unet"):
            return cls.from_diffusers(prior.model, prior.schedule, image_channels=prior.channels, prune=prune,
                                      source=getattr(prior, "source", None), config=config, **changes)
        if prune is not None:
            raise IDMError("prune options apply to diffusers priors only")
        if getattr(prior, "denoiser", None) is not None:  # a DenoiserPrior
            if not isinstance(prior.denoiser, DnCNN):
                raise IDMError(f"an IDM backbone must be a DnCNN denoiser or a diffusion U-Net, not "
                               f"{type(prior.denoiser).__name__} (e.g. ffdnet: its GPL weights cannot go into a checkpoint)")
            base = config.to_dict() if config is not None else IDMConfig(schedule_init="sigma").to_dict()
            base.update({"unshuffle": 1}, **changes)
            base.update(unet=None, backbone=None, denoiser=prior.denoiser.config.to_dict(),
                        prior_schedule=prior.schedule.to_dict())
            return cls(prior.denoiser, IDMConfig.from_dict(base))
        base = config.to_dict() if config is not None else IDMConfig().to_dict()
        base.update(changes, unet=prior.unet.config.to_dict(), prior_schedule=prior.schedule.to_dict())
        return cls(prior.unet, IDMConfig.from_dict(base))

    @classmethod
    def from_diffusers(cls, model: nn.Module, schedule: NoiseSchedule, *, image_channels: int = 1,
                       prune: "dict[str, Any] | None" = None, source: str | None = None,
                       config: IDMConfig | None = None, **changes: Any) -> "IDMNet":
        """IDM network from a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` and its noise
        ``schedule`` (:mod:`idm.invertible.diffusers`); ``prune``: :class:`PruneOptions` fields
        (default: the paper's pruning for SD-style models, none for ``UNet2DModel``)."""
        from ..invertible.diffusers import PruneOptions, class_name

        name = class_name(model)
        options = PruneOptions.from_dict(prune) if prune is not None else PruneOptions.default_for(name)
        backbone = {"library": "diffusers", "class_name": name, "config": _json_config(model.config),
                    "prune": options.to_dict(), "image_channels": int(image_channels), "source": source}
        base = config.to_dict() if config is not None else IDMConfig().to_dict()
        base.update(changes, unet=None, backbone=backbone, prior_schedule=schedule.to_dict())
        return cls(model, IDMConfig.from_dict(base))

    @property
    def levels(self) -> str:
        return self.config.levels

    def set_levels(self, levels: str) -> "IDMNet":
        """Switch the invertibility levels (memory strategy only; parameters unchanged)."""
        self.config = self.config.with_levels(levels)
        set_memory_mode(self.unet, "reversible" if levels == "both" else "plain")
        self.sampler.memory_mode = "plain" if levels == "none" else "reversible"
        return self

    def set_ztv(self, ztv: tuple[float, float] | None) -> "IDMNet":
        """Couple the slices of a volume (the batch) by z-TV consistency with ``(λ, ρ)``, or not (None):
        :attr:`IDMConfig.ztv`, an inference choice for a network trained without it."""
        if self.config.ztv != (None if ztv is None else tuple(float(v) for v in ztv)):
            self.config = replace(self.config, ztv=ztv)
            self._start_solver = None  # the tv start follows (3D TV for volumes)
        return self

    @torch.no_grad()
    def zero_couplings(self) -> "IDMNet":
        """Set every coupling's v to 0: the network becomes exactly the plain sampler with
        injectors (not invertible; only usable with ``levels="none"``)."""
        if self.levels != "none":
            raise IDMError("couplings with v = 0 cannot be inverted; set levels='none' first")
        for name, p in self.named_parameters():
            if name.endswith(".v") or name == "v":
                p.zero_()
        return self

    # --- the sampler -------------------------------------------------------------------------
    def abar(self, ratio: float | None = None) -> torch.Tensor:
        """``(T + 1,)`` cumulative products ``[1, ᾱ_1, …, ᾱ_T]`` of the clamped α; with a sampling
        ``ratio`` and a calibrated ``config.sigma_scale``, each σ_t² = (1 − ᾱ_t)/ᾱ_t scaled by its factor."""
        alpha = self.alpha.clamp(*ALPHA_RANGE)
        abar = alpha.cumprod(0)
        factor = self.config.sigma_factor(ratio)
        if factor != 1.0:
            abar = 1 / (1 + factor * (1 - abar) / abar)
        return torch.cat([alpha.new_ones(1), abar])

    def forward(self, y: torch.Tensor, op: LinearOperator) -> torch.Tensor:
        """Measurements ``y`` (``op.measurement_shape(B, C)``) → estimate ``(B, C, *op.domain_size)``,
        complex ``(B, 1, H, W)`` for a complex network (``config.complex``, MRI: ``y`` complex)."""
        op.check_measurements(y)
        if len(op.domain_size) != 2:
            raise IDMError(f"IDM works on 2D images, the operator's domain is {op.domain_size}")
        if y.is_complex() != self.config.complex:
            raise IDMError(f"this IDM network is for {'complex (MRI)' if self.config.complex else 'real'} "
                           f"measurements, got {y.dtype} ones")
        if not (y.is_complex() or y.is_floating_point()) or not bool(torch.isfinite(torch.view_as_real(y) if y.is_complex() else y).all()):
            raise IDMError("measurements must be finite floating-point values")
        y = y.to(torch.complex128 if self.alpha.dtype == torch.float64 else torch.complex64) if y.is_complex() \
            else y.to(self.alpha.dtype)
        meas = MeasurementContext.build(op, y, self.config.size_multiple, self.config.dc_iterations, self.config.ztv)
        if meas.aty.shape[1] != self.config.channels:
            raise IDMError(f"IDM network expects {self.config.backbone_channels}-channel "
                           f"{'complex ' if self.config.complex else ''}images, the measurements give "
                           f"{meas.aty.shape[1] // self.config.fold}")
        ratio = op.config().get("ratio")
        abar = self.abar(float(ratio) if ratio is not None else None)
        canvas = meas.to_canvas(self.start_estimate(y, op))
        for _ in range(self.config.passes):  # each pass restarts from the previous one's x₀
            canvas = from_model_range(self.sampler(abar[-1].sqrt() * to_model_range(canvas), {"meas": meas, "abar": abar}))
        return meas.from_canvas(canvas)

    def start_estimate(self, y: torch.Tensor, op: LinearOperator) -> torch.Tensor:
        """The initial estimate x_start (B, C, *op.domain_size) on [0, 1] (complex for complex ``y``) of
        ``config.start``: A†y, or the ``tv`` / ``pnp`` / ``fbp`` method's result (without gradient; ``tv``
        is 3D TV when the batch is a volume, ``config.ztv``)."""
        if self.config.start == "adjoint":
            return op.A_dagger(y)
        if self._start_solver is None:  # built on first use (a method, not a module: no parameters)
            from ..registry import get_method

            volume = {"volume": True} if self.config.ztv is not None and self.config.start == "tv" else {}
            self._start_solver = get_method(self.config.start).build(device=y.device, **volume)
        with torch.no_grad():
            return self._start_solver(y, op).to(y.dtype)

    # --- weights -----------------------------------------------------------------------------
    def unique_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict with each tensor once (the U-Net is shared by every step)."""
        return unique_state_dict(self)

    def load_unique_state_dict(self, tensors: dict[str, torch.Tensor], source: str = "state") -> None:
        """Load a :meth:`unique_state_dict`; :class:`IDMError` on missing/unexpected/mis-shaped tensors."""
        load_unique_state_dict(self, tensors, source=source, what="the IDM network")

    def checkpoint_config(self, *, ratio: float | None, operator: str = "blockcs", block_size: int | None = 32,
                          extra: dict[str, Any] | None = None,
                          ratio_range: tuple[float, float] | list[float] | None = None) -> dict[str, Any]:
        """The checkpoint's ``config.json``: trained for one ``ratio``, or (``ratio=None``) for every
        ratio in ``ratio_range`` (a multi-ratio network)."""
        if operator == "blockcs" and (ratio is None) == (ratio_range is None):
            raise IDMError("a block-CS IDM checkpoint is trained for one ratio or for a ratio range: give exactly one")
        return {
            **(extra or {}),
            **({"ratio_range": [check_ratio(r) for r in ratio_range]} if ratio_range is not None else {}),
            "architecture": ARCHITECTURE,
            "operator": operator,
            "ratio": None if ratio is None else check_ratio(ratio),
            "block_size": block_size,
            "value_range": [0, 1],
            "idm": self.config.to_dict(),
        }

    def save(self, directory: str | os.PathLike[str], card: str, *, ratio: float | None, operator: str = "blockcs",
             block_size: int | None = 32, extra: dict[str, Any] | None = None,
             dtype: torch.dtype | None = torch.float16, ratio_range: tuple[float, float] | list[float] | None = None) -> Path:
        """Write a checkpoint directory (weights as ``dtype``: fp16 / bf16, None keeps fp32)."""
        from ..io.checkpoint import save_checkpoint

        config = self.checkpoint_config(ratio=ratio, operator=operator, block_size=block_size, extra=extra,
                                        ratio_range=ratio_range)
        return save_checkpoint(directory, self.unique_state_dict(), config, card, dtype=dtype)


def _json_config(config: Any) -> dict[str, Any]:
    """A diffusers model config as plain JSON data (tuples → lists)."""
    import json

    return json.loads(json.dumps(dict(config)))


def diffusers_from_config(backbone: dict[str, Any]) -> nn.Module:
    """An untrained diffusers model of the recorded class and config (no download)."""
    try:
        import diffusers
    except ImportError:
        raise IDMError("this IDM network is built on a diffusers U-Net: pip install 'idm[hub]'") from None
    cls = getattr(diffusers, backbone["class_name"], None)
    if cls is None:
        raise IDMError(f"diffusers has no model class {backbone['class_name']!r}")
    return cls.from_config(backbone["config"])


def load_idm_prior(source: str | os.PathLike[str]) -> Any:
    """The prior an IDM network starts from, loaded once (for :meth:`IDMNet.from_prior`): a prior
    checkpoint (name or folder) → :class:`~idm.priors.Prior`; a local diffusers folder (model or
    pipeline; ``UNet2DModel`` or ``UNet2DConditionModel``) or an explicit ``hf:`` hub id →
    :class:`~idm.priors.hub.DiffusersBackbone` with the folder's noise schedule."""
    from ..priors import load_prior
    from ..priors.hub import is_diffusers_folder, is_hub_id, load_diffusers_backbone

    if is_hub_id(source) or is_diffusers_folder(source):
        return load_diffusers_backbone(source)
    return load_prior(source)


def idm_from_prior(source: str | os.PathLike[str], *, prune: dict[str, Any] | None = None, **changes: Any) -> IDMNet:
    """IDM network at initialisation from the prior at ``source`` (see :func:`load_idm_prior`).
    ``changes``: :class:`IDMConfig` fields; ``prune``: for diffusers models
    (:class:`~idm.invertible.diffusers.PruneOptions` fields)."""
    return IDMNet.from_prior(load_idm_prior(source), prune=prune, **changes)


def idm_from_config(config: dict[str, Any]) -> IDMNet:
    """An (untrained) :class:`IDMNet` of the architecture recorded in a checkpoint config."""
    if config.get("architecture") != ARCHITECTURE:
        raise IDMError(f"checkpoint is not an IDM network (architecture={config.get('architecture')!r})")
    try:
        idm_config = IDMConfig.from_dict(config["idm"])
    except (KeyError, TypeError) as exc:
        raise IDMError(f"IDM checkpoint config is incomplete or malformed: {exc}") from None
    return IDMNet(None, idm_config)


def load_idm(
    name_or_path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    ratio: float | None = None,
    levels: str | None = None,
) -> tuple[IDMNet, dict[str, Any]]:
    """Load an IDM checkpoint (directory or shipped name) → ``(network in eval mode, config)``.

    ``ratio``: if given, the checkpoint must have been trained for it, or for a range holding it
    (:class:`IDMError` otherwise).
    ``levels``: override the stored invertibility levels (default: ``"none"``, the fast plain
    network — the function is the same; fine-tuning sets its own).
    """
    from ..io.checkpoint import in_ratio_range, load_checkpoint, read_checkpoint_config, resolve_checkpoint

    path = resolve_checkpoint(name_or_path)
    stored = read_checkpoint_config(path)
    if stored.get("architecture") != ARCHITECTURE:
        raise IDMError(f"{path} is not an IDM checkpoint (architecture {stored.get('architecture')!r})")
    expect: dict[str, Any] = {"architecture": ARCHITECTURE}
    if ratio is not None and stored.get("ratio_range") is None:
        expect["ratio"] = check_ratio(ratio)
    elif ratio is not None:
        low, high = stored["ratio_range"]
        if not in_ratio_range(check_ratio(ratio), (low, high)):
            raise IDMError(f"checkpoint {path} was trained for ratios in [{low:g}, {high:g}], not {ratio:g}")
    tensors, config = load_checkpoint(path, expect=expect, device="cpu", dtype=torch.float32)
    net = idm_from_config(config)
    net.load_unique_state_dict(tensors, source=f"checkpoint {path}")
    net.set_levels(levels or "none")
    net.eval()
    return net.to(device), config
