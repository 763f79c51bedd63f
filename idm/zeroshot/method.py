"""The zero-shot solvers as registered reconstruction methods: ``ddnm``, ``ddnm+``, ``dps``, ``diffuserecon``
and ``mbir`` (a volume as the batch of its slices).

Each factory loads a diffusion prior (``checkpoint``: a prior directory or shipped name, default
``"prior-gray"``, or a diffusers ``UNet2DModel`` folder / ``hf:ORG/NAME`` id, see
:func:`idm.priors.load_prior`) and returns a :class:`ZeroShotReconstructor`, ``reconstruct(y, op) -> x`` with
``x`` ``(B, C, *op.domain_size)`` on [0, 1] (not clipped). Each call draws its noise from a fresh
CPU generator seeded with ``seed``, so a result depends only on ``(seed, y, op)``. Options (keyword
arguments of ``build``) are those of :data:`SOLVERS`; ``ratio`` is accepted and ignored (the
operator carries it), anything else raises :class:`IDMError`. ``diffuserecon`` also gives a per-pixel
uncertainty: :meth:`ZeroShotReconstructor.with_uncertainty`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import IDMError
from ..physics.base import LinearOperator
from ..priors.prior import PriorLike, load_prior
from ..registry import Posterior, checked_options, register_method, require_uncertainty
from ..physics.mri import ComplexParts, merge_groups, split_groups
from .common import check_complex_inputs, check_inputs, denoiser_sigma_max
from .ddnm import sample_ddnm
from .diffuserecon import sample_diffuserecon
from .mbir import mbir_defaults, sample_mbir
from .dps import sample_dps

#: the prior used when no checkpoint is given
DEFAULT_PRIOR = "prior-gray"


@dataclass(frozen=True)
class SolverSpec:
    """A zero-shot method: its sampler, its options with their defaults (whose types they must
    have) and whether the sampler is told the measurement noise ``op.noise.sigma``;
    ``by_operator(op)`` gives the defaults that depend on the operator (they replace ``defaults``
    for the options the user did not set)."""

    sampler: Callable[..., torch.Tensor]
    defaults: Mapping[str, Any]
    noise_aware: bool = False
    description: str = ""
    limits: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    by_operator: Callable[[LinearOperator], Mapping[str, Any]] | None = None


_STEP_LIMIT = (1, math.inf)
SOLVERS: dict[str, SolverSpec] = {
    "ddnm": SolverSpec(
        sample_ddnm,
        {"steps": 100, "eta": 0.85, "clip": True},
        description="DDNM: range-null-space zero-shot sampling on the diffusion prior (100 steps, η=0.85)",
        limits={"steps": _STEP_LIMIT, "eta": (0.0, 1.0)},
    ),
    "ddnm+": SolverSpec(
        sample_ddnm,
        {"steps": 100, "eta": 0.85, "clip": True, "travel_length": 1, "travel_repeat": 1},
        noise_aware=True,
        description="DDNM+: noise-aware DDNM for noisy measurements, optional time travel",
        limits={"steps": _STEP_LIMIT, "eta": (0.0, 1.0), "travel_length": _STEP_LIMIT, "travel_repeat": _STEP_LIMIT},
    ),
    "dps": SolverSpec(
        sample_dps,
        {"steps": 1000, "zeta": 1.0, "clip": True},
        description="DPS: diffusion posterior sampling, gradient of ‖y − A x̂₀‖ through the U-Net (1000 steps)",
        limits={"steps": _STEP_LIMIT, "zeta": (0.0, math.inf)},
    ),
    "diffuserecon": SolverSpec(
        sample_diffuserecon,
        {"samples": 4, "steps": 10, "refine": 3, "refine_level": 0.1, "start_level": 0.0, "clip": True},
        description="DiffuseRecon: K measurement-guided samples, mean refined by DDIM, per-pixel std (uncertainty)",
        limits={"samples": (1, 256), "steps": _STEP_LIMIT, "refine": (0, math.inf), "refine_level": (1e-3, 10.0),
                "start_level": (0.0, 100.0)},
    ),
    "mbir": SolverSpec(
        sample_mbir,
        {"steps": 30, "eta": 0.85, "lam": 0.1, "rho": 10.0, "cg_iterations": 10, "chunk": 8, "start_level": 0.0,
         "clip": True},
        description="DiffusionMBIR: a 2D prior on every slice of a volume (the batch) + one z-TV ADMM iteration per step",
        limits={"steps": _STEP_LIMIT, "eta": (0.0, 1.0), "lam": (0.0, math.inf), "rho": (1e-9, math.inf),
                "cg_iterations": (1, 10_000), "chunk": (1, 1_000_000), "start_level": (0.0, 100.0)},
        by_operator=mbir_defaults,
    ),
}


def solver_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The defaults of method ``name`` updated with ``options``, type- and range-checked
    (:func:`~idm.registry.checked_options`)."""
    spec = SOLVERS[name]
    return checked_options(name, spec.defaults, options, spec.limits)


class ZeroShotReconstructor:
    """``reconstruct(y, op) -> x``: one zero-shot method bound to a loaded prior and its settings."""

    def __init__(self, name: str, prior: PriorLike, settings: Mapping[str, Any], *, seed: int, progress: bool,
                 given: frozenset[str] = frozenset()) -> None:
        self.name, self.prior, self.settings = name, prior, dict(settings)
        self.seed, self.progress, self.given = int(seed), bool(progress), frozenset(given)

    def __call__(self, y: torch.Tensor, op: LinearOperator) -> torch.Tensor:
        """Measurements ``y`` (``op.measurement_shape(B, C)``) → ``(B, C, *op.domain_size)`` on [0, 1], on y's device.

        Complex measurements (MRI) of complex images ``(B, C, …)``: the solver runs on the parts image
        of :class:`~idm.physics.mri.ComplexParts` (``[Re, Im]`` on [−1, 1] as the model-range state,
        each part through the ``C``-channel prior) and returns the complex image (not clipped)."""
        result = self._solve(y, op)
        return result.x if isinstance(result, Posterior) else result

    @property
    def gives_uncertainty(self) -> bool:
        """Only ``diffuserecon`` draws several samples."""
        return self.name == "diffuserecon"

    def with_uncertainty(self, y: torch.Tensor, op: LinearOperator) -> Posterior:
        """``diffuserecon`` only: the reconstruction and its per-pixel std (``Posterior``; the std is
        ``(B, C, *op.domain_size)`` on the image's [0, 1] scale, of the magnitude for complex images)."""
        require_uncertainty(self.name, self)
        return self._solve(y, op)

    def _solve(self, y: torch.Tensor, op: LinearOperator) -> torch.Tensor | Posterior:
        """The sampler's result on y's device: complex measurements are solved on the parts image
        (:class:`~idm.physics.mri.ComplexParts`) and the reconstruction mapped back to complex."""
        device, finish = y.device, None
        if y.is_complex():
            check_complex_inputs(y, op)
            channels = op.A_adjoint(y[:1]).shape[1]
            if channels != self.prior.channels:
                raise IDMError(f"the prior has {self.prior.channels} channel(s), the complex images have {channels}")
            op = ComplexParts(op)
            result = self._sample(op, op.measurements(y.to(device=self.prior.device, dtype=torch.complex64)),
                                  fold_parts(self.prior))
            finish = op.image
        else:
            check_inputs(y, op, self.prior.channels)
            result = self._sample(op, y.to(device=self.prior.device, dtype=torch.float32), self.prior)
        x = result.x if isinstance(result, Posterior) else result
        x = (x if finish is None else finish(x)).to(device)
        return Posterior(x, result.std.to(device)) if isinstance(result, Posterior) else x

    def _sample(self, op: LinearOperator, y: torch.Tensor, model: Callable[..., torch.Tensor]) -> torch.Tensor | Posterior:
        spec = SOLVERS[self.name]
        extra = {"sigma_y": op.noise.sigma} if spec.noise_aware else {}
        settings = dict(self.settings)
        if spec.by_operator is not None:
            settings.update({k: v for k, v in spec.by_operator(op).items() if k not in self.given})
        if "start_level" in settings:
            limit = denoiser_sigma_max(self.prior)
            if settings["start_level"] == 0.0 and math.isfinite(limit):
                settings["start_level"] = 2.0 * limit  # a Gaussian denoiser cannot start from pure noise
        generator = torch.Generator().manual_seed(self.seed)
        return spec.sampler(
            model,
            y,
            op,
            self.prior.schedule,
            size_multiple=self.prior.size_multiple,
            generator=generator,
            progress=self.progress,
            **settings,
            **extra,
        )

    def __repr__(self) -> str:
        return f"ZeroShotReconstructor({self.name!r}, {', '.join(f'{k}={v!r}' for k, v in self.settings.items())})"


def fold_parts(model: Callable[..., torch.Tensor]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``ε`` model of parts images ``(B, 2C, H, W)`` (channels ``[Re₁, Im₁, Re₂, …]``,
    :func:`~idm.physics.mri.complex_to_channels`) from a ``C``-channel ``model(x, t)``: the real parts
    and the imaginary parts as two batch items (:func:`~idm.physics.mri.split_groups`)."""

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        by_part = x.unflatten(1, (-1, 2)).transpose(1, 2).flatten(1, 2)  # [Re₁ … Re_C, Im₁ … Im_C]
        out = merge_groups(model(split_groups(by_part, 2), t.repeat(2)), 2)
        return out.unflatten(1, (2, -1)).transpose(1, 2).flatten(1, 2)

    return eps


def build_solver(
    name: str,
    *,
    checkpoint: Any = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = False,
    **options: Any,
) -> ZeroShotReconstructor:
    """Factory behind the registered methods (see the module docstring)."""
    settings = solver_options(name, options)
    prior = load_prior(DEFAULT_PRIOR if checkpoint is None else checkpoint, device=device)
    prior.module.requires_grad_(False)
    if settings["steps"] > prior.schedule.num_steps:
        raise IDMError(
            f"method {name!r}: {settings['steps']} steps exceed the prior's {prior.schedule.num_steps}-step schedule"
        )
    return ZeroShotReconstructor(name, prior, settings, seed=seed, progress=progress, given=frozenset(options))


def _register(name: str) -> None:
    def build(
        *,
        checkpoint: Any = None,
        device: str | torch.device = "cpu",
        seed: int = 0,
        progress: bool = False,
        **options: Any,
    ) -> ZeroShotReconstructor:
        return build_solver(name, checkpoint=checkpoint, device=device, seed=seed, progress=progress, **options)

    build.__doc__ = f"``{name}``: {SOLVERS[name].description}. Options and defaults: {dict(SOLVERS[name].defaults)}."
    register_method(name, SOLVERS[name].description, checkpoint_kind="prior")(build)


_register("ddnm")
_register("ddnm+")
_register("dps")
_register("diffuserecon")
_register("mbir")
