"""Hyper-parameters of the IDM reconstruction network (:class:`IDMConfig`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from ..errors import IDMError, check_keys
from ..priors.unet import UNetConfig

#: invertibility levels: ``none`` plain autograd, ``steps`` each sampling step a reversible
#: coupling (level 1), ``both`` level 1 plus reversible U-Net runs and injectors inside (level 2)
LEVELS = ("none", "steps", "both")
#: initialisations of the learnable schedule α ∈ R^T (ᾱ = cumprod α)
SCHEDULE_INITS = ("paper", "prior", "sigma")
#: initial estimates x_start the sampler starts from (x_T = √ᾱ_T · x_start on the model range)
STARTS = ("adjoint", "tv", "pnp", "fbp")


def check_count(value: object, what: str) -> int:
    """``value`` (e.g. :attr:`IDMConfig.passes`) if it is a positive integer, else a one-line :class:`IDMError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise IDMError(f"{what} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class IDMConfig:
    """Architecture of :class:`~idm.network.idm.IDMNet`.

    Attributes:
        steps: number of sampling steps T.
        unshuffle: the U-Net runs on a ``unshuffle``× pixel-unshuffled image (2 as in the paper,
            or 1 to run the prior at full resolution, as is).
        unet: the **prior's** U-Net config (image channels in/out); with ``unshuffle = u`` the
            network's U-Net has ``channels · u²`` input/output channels.
            None when ``backbone`` is given.
        backbone: a diffusers U-Net instead of ours: ``{"library": "diffusers", "class_name":
            "UNet2DModel" | "UNet2DConditionModel", "config": the model's config, "prune":
            PruneOptions dict, "image_channels": C, "source": where it came from}``
            (:mod:`idm.invertible.diffusers`); the weights live in the IDM checkpoint.
        injectors: add the measurement-injection adapters (one per U-Net stage and step).
        levels: invertibility, one of :data:`LEVELS`; it changes memory use, not the function.
        denoiser: a Gaussian denoiser backbone instead of a U-Net: the
            :class:`~idm.priors.dncnn.DnCNNConfig` dict of a denoiser prior (e.g. ``dncnn-17``); the
            network then runs at full resolution (``unshuffle = 1``), its middle layers are the
            reversible couplings and ε comes from the denoiser's noise estimate at σ_t
            (:func:`idm.priors.denoiser.denoiser_eps`).
        schedule_init: ``"paper"`` (every α_t = ``alpha_init``, IDM paper), ``"prior"`` (ᾱ at the
            prior's DDIM-respaced timesteps) or ``"sigma"`` (image-scale noise std
            σ_t = √((1 − ᾱ_t)/ᾱ_t)/2 geometric from ``sigma_max`` at step T to ``sigma_min`` at step 1:
            the range a denoiser backbone was trained for; the default for denoisers).
        sigma_max, sigma_min: the σ range of ``schedule_init="sigma"`` (on [0, 1]).
        complex: the images are complex (MRI, :mod:`idm.physics.mri`): the network works on the
            real canvas ``[Re, Im]`` (:func:`~idm.physics.mri.complex_to_channels`, 2 channels per
            backbone channel) and folds the two parts into the batch for the backbone, so a
            1-channel prior denoises Re and Im as two images; the injectors see both parts
            together (``Injector(group=2)``) and data consistency acts on the complex image.
        sigma_scale: a calibrated, ratio-dependent schedule: pairs ``(ratio, factor)`` (sorted by
            ratio); for measurements with a sampling ratio r (block CS, inpainting) every step's noise
            variance σ_t² = (1 − ᾱ_t)/ᾱ_t is multiplied by ``factor(r)``, interpolated linearly in
            ``log factor`` between the pairs and held constant outside them (None: 1). Not learned:
            fitted after training on training images (``train/calibrate_schedule.py``), because one
            learned ᾱ cannot suit every ratio of a multi-ratio network.
        dc_iterations: conjugate-gradient steps of each data-consistency solve for operators whose
            A† is iterative (CT; multi-coil MRI), part of the trained function; None uses the operator's
            own A† (exact for block CS, inpainting, single-coil MRI).
        passes: how many times the T-step sampler runs, each pass started from the previous pass's
            output (x_start ← x₀, then x_T = √ᾱ_T · (2 x_start − 1) again): ``passes · T`` backbone
            evaluations with the same weights and schedule, which at low sampling ratios is worth
            more than its time (docs/denoiser-priors.md). Part of the trained function when training
            with it (``idm finetune --passes``); set after training it is an inference choice like
            ``sigma_scale``.
        ztv: ``(λ, ρ)``: the batch is the slices of one volume (z first) and each step's data
            consistency is the z-TV one (:func:`idm.physics.volume.ztv_consistency`, ``dc_iterations``
            CG steps, default 10), which couples neighbouring slices as DiffusionMBIR's ADMM does; the
            ``tv`` start is then 3D TV. None (default): every image on its own.
        start: the initial estimate x_start (``x_T = √ᾱ_T · (2 x_start − 1)``): ``"adjoint"``
            (A†y, free), ``"tv"`` (the ``tv`` baseline), ``"pnp"`` (the ``pnp`` method with the
            shipped ``dncnn-17``) or ``"fbp"`` (CT only: filtered backprojection, nearly free); computed without gradient, its cost is added to every call.
        alpha_init: the initial α for ``schedule_init="paper"``.
        coupling_v: initial mixing weight v of every reversible coupling (0.5 as in the official
            code); stored per coupling as a learnable scalar.
        prior_schedule: the prior's noise schedule (``NoiseSchedule.to_dict()``), used to place the
            per-step constant time embeddings (and ``schedule_init="prior"``).
    """

    steps: int = 3
    unshuffle: int = 2
    unet: UNetConfig | None = field(default_factory=UNetConfig)
    injectors: bool = True
    levels: str = "both"
    schedule_init: str = "paper"
    alpha_init: float = 0.5
    coupling_v: float = 0.5
    prior_schedule: dict[str, Any] = field(default_factory=lambda: {"kind": "linear", "num_steps": 1000,
                                                                     "beta_start": 1e-4, "beta_end": 0.02})
    backbone: dict[str, Any] | None = None
    denoiser: dict[str, Any] | None = None
    sigma_max: float = 0.1
    sigma_min: float = 0.01
    start: str = "adjoint"
    complex: bool = False
    dc_iterations: int | None = None
    sigma_scale: tuple[tuple[float, float], ...] | None = None
    passes: int = 1
    ztv: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.denoiser is not None:
            from ..priors.dncnn import DnCNNConfig

            object.__setattr__(self, "unet", None)
            DnCNNConfig.from_dict(self.denoiser)  # validates
            if self.backbone is not None:
                raise IDMError("IDM config has both a denoiser and a diffusers backbone")
            if int(self.unshuffle) != 1:
                raise IDMError(f"a denoiser backbone runs at full resolution: unshuffle must be 1, got {self.unshuffle}")
        elif self.backbone is not None:
            object.__setattr__(self, "unet", None)
            missing = {"library", "class_name", "config", "prune", "image_channels"} - set(self.backbone)
            if missing or self.backbone["library"] != "diffusers":
                raise IDMError(f"IDM backbone must be a diffusers description (missing {sorted(missing)})")
        elif self.unet is None:
            raise IDMError("IDM config needs a U-Net config or a backbone")
        elif not isinstance(self.unet, UNetConfig):  # a dict, e.g. from JSON
            object.__setattr__(self, "unet", UNetConfig.from_dict(self.unet))
        if int(self.steps) < 1:
            raise IDMError(f"IDM needs at least one sampling step, got steps={self.steps}")
        if int(self.unshuffle) not in (1, 2):
            raise IDMError(f"IDM unshuffle must be 1 or 2, got {self.unshuffle}")
        if self.levels not in LEVELS:
            raise IDMError(f"unknown invertibility levels {self.levels!r}; use one of {', '.join(LEVELS)}")
        if self.schedule_init not in SCHEDULE_INITS:
            raise IDMError(f"unknown schedule init {self.schedule_init!r}; use one of {', '.join(SCHEDULE_INITS)}")
        if not 0.0 < float(self.alpha_init) < 1.0:
            raise IDMError(f"alpha_init must lie in (0, 1), got {self.alpha_init}")
        if not 0.0 < float(self.sigma_min) < float(self.sigma_max):
            raise IDMError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min} and {self.sigma_max}")
        if self.start not in STARTS:
            raise IDMError(f"unknown start {self.start!r}; use one of {', '.join(STARTS)}")
        if not 0.0 < float(self.coupling_v) < 1.0:
            raise IDMError(f"coupling_v must lie in (0, 1), got {self.coupling_v}")
        if self.dc_iterations is not None:
            check_count(self.dc_iterations, "dc_iterations")
        if self.sigma_scale is not None:
            pairs = tuple(sorted((float(r), float(f)) for r, f in self.sigma_scale))
            if not pairs or any(not (0 < r <= 1 and f > 0) for r, f in pairs) or len({r for r, _ in pairs}) != len(pairs):
                raise IDMError(f"sigma_scale must be distinct (ratio in (0, 1], factor > 0) pairs, got {self.sigma_scale!r}")
            object.__setattr__(self, "sigma_scale", pairs)
        check_count(self.passes, "passes")
        if self.ztv is not None:
            try:
                lam, rho = (float(v) for v in self.ztv)
            except (TypeError, ValueError):
                raise IDMError(f"ztv must be a pair (lam, rho), got {self.ztv!r}") from None
            if not (0.0 <= lam < math.inf and 0.0 < rho < math.inf):
                raise IDMError(f"ztv needs lam >= 0 and rho > 0, got {self.ztv!r}")
            object.__setattr__(self, "ztv", (lam, rho))
        if not isinstance(self.complex, bool):
            raise IDMError(f"complex must be true or false, got {self.complex!r}")
        object.__setattr__(self, "steps", int(self.steps))
        object.__setattr__(self, "unshuffle", int(self.unshuffle))

    @property
    def channels(self) -> int:
        """Channels C of the network's real canvas (``2 ×`` the backbone's for complex images)."""
        return self.fold * self.backbone_channels

    @property
    def fold(self) -> int:
        """How many canvas channel groups the backbone sees as separate batch items (2 for complex images)."""
        return 2 if self.complex else 1

    @property
    def backbone_channels(self) -> int:
        """Image channels of the prior network (denoiser, U-Net or diffusers backbone)."""
        if self.denoiser:
            return int(self.denoiser["channels"])
        return int(self.backbone["image_channels"]) if self.backbone else self.unet.in_channels

    @property
    def size_multiple(self) -> int:
        """The network pads images internally to a multiple of this."""
        if self.denoiser:
            return 1
        if self.backbone:  # every kept down stage but the last halves the resolution
            kept = len(self.backbone["config"]["down_block_types"]) - int(self.backbone["prune"].get("deepest", 0))
            return 2 ** (kept - 1) * self.unshuffle
        return self.unet.size_multiple * self.unshuffle

    def describe_backbone(self) -> str:
        """One line for model cards: the U-Net the network was built from."""
        if self.denoiser:
            d = self.denoiser
            return f"DnCNN denoiser, {d['depth']} layers, {d['features']} ch{', σ input' if d['sigma_input'] else ''}"
        if self.backbone:
            cfg, prune = self.backbone["config"], self.backbone["prune"]
            return (f"diffusers {self.backbone['class_name']} from `{self.backbone.get('source')}` (blocks "
                    f"{list(cfg['block_out_channels'])}, pruned: {', '.join(k for k, v in prune.items() if v) or 'nothing'}"
                    f"{' = ' + str(prune['deepest']) if prune.get('deepest') else ''})")
        return f"U-Net base {self.unet.base_channels} ch, mults {list(self.unet.channel_mults)}"

    def sigma_factor(self, ratio: float | None) -> float:
        """The calibrated factor of σ_t² at sampling ratio ``ratio`` (1 without calibration or ratio)."""
        if self.sigma_scale is None or ratio is None:
            return 1.0
        pairs = self.sigma_scale
        if ratio <= pairs[0][0]:
            return pairs[0][1]
        for (r0, f0), (r1, f1) in zip(pairs, pairs[1:]):
            if ratio <= r1:
                w = (ratio - r0) / (r1 - r0)
                return math.exp((1 - w) * math.log(f0) + w * math.log(f1))
        return pairs[-1][1]

    def with_levels(self, levels: str) -> "IDMConfig":
        return replace(self, levels=levels)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["unet"] = None if self.unet is None else self.unet.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IDMConfig":
        """Inverse of :meth:`to_dict` (``unet`` is parsed in ``__post_init__``); unknown keys raise."""
        check_keys(d, (f.name for f in fields(cls)), "IDM config")
        return cls(**d)
