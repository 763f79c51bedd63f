"""Discrete DDPM noise schedules and the prior's value-range convention.

**Value range.** Images are in [0, 1] everywhere in ``idm``; the diffusion prior works on
[-1, 1]. Convert with :func:`to_model_range` (``2x - 1``) before noising / calling the network
and :func:`from_model_range` (``(x + 1) / 2``) afterwards.

**Forward process.** ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` for integer
``t in [0, num_steps)``, ``abar_t = prod_{s<=t} (1 - beta_s)`` (``alphas_cumprod``, float64).

**One home for the sampling maths.** Every sampler in ``idm`` (the prior's DDIM/DDPM, DDNM, DPS,
PnP and the IDM network's steps) uses the four functions below; each takes ᾱ as a Python float or
as a tensor broadcastable against the state (the IDM network's learnable schedule):

* :func:`x0_from_eps` / :func:`eps_from_x0` — invert the forward process;
* :func:`ddim_step` — DDIM (Song et al., ICLR 2021, eq. 12), ``η = 0`` deterministic;
* :func:`ddpm_posterior` — mean and variance of ``q(x_{t'} | x_t, x̂₀)`` (Ho et al., NeurIPS 2020, eq. 7)
  between two (possibly respaced) timesteps.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import IDMError


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """Image on [0, 1] → prior's range [-1, 1]."""
    return x * 2.0 - 1.0


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """Prior's range [-1, 1] → image on [0, 1] (not clamped)."""
    return (x + 1.0) * 0.5


def _gather(values: torch.Tensor, t: torch.Tensor | int | Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """``values[t]`` as ``like.dtype`` on ``like.device``, shaped to broadcast against ``like`` (B, ...)."""
    idx = torch.as_tensor(t, dtype=torch.long).cpu()
    if (idx < 0).any() or (idx >= values.numel()).any():
        raise IDMError(f"timestep out of range [0, {values.numel()}): {idx.tolist()}")
    out = values[idx].to(device=like.device, dtype=like.dtype)
    return out.reshape(-1, *([1] * (like.ndim - 1))) if out.ndim else out


Abar = float | torch.Tensor


def _root(value: Any) -> Any:
    """√max(value, 0) of a float or a tensor."""
    return value.clamp(min=0).sqrt() if isinstance(value, torch.Tensor) else math.sqrt(max(value, 0.0))


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, abar: Abar) -> torch.Tensor:
    """``x̂₀ = (x_t − √(1 − ᾱ) ε) / √ᾱ``: the clean image implied by the noise estimate ``eps`` (same
    shape as ``x_t``) at ``abar`` (0 < ᾱ ≤ 1)."""
    return (x_t - _root(1 - abar) * eps) / _root(abar)


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, abar: Abar) -> torch.Tensor:
    """``ε = (x_t − √ᾱ x̂₀) / √(1 − ᾱ)``: the noise implied by the estimate ``x0`` (0 < ᾱ < 1)."""
    return (x_t - _root(abar) * x0) / _root(1 - abar)


def ddim_sigma(abar: Abar, abar_next: Abar, eta: float) -> Abar:
    """DDIM's fresh-noise std ``s = η √((1 − ᾱ') / (1 − ᾱ)) √(1 − ᾱ / ᾱ')`` for the step ᾱ → ᾱ' (ᾱ' > ᾱ)."""
    return eta * _root((1 - abar_next) / (1 - abar) * (1 - abar / abar_next))


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, abar_next: Abar, *, sigma: Abar = 0.0,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """DDIM update ``x' = √ᾱ' x̂₀ + √(1 − ᾱ' − s²) ε + s z`` (``s = sigma``, see :func:`ddim_sigma`;
    ``noise`` z is needed when s > 0). ``ᾱ' = 1`` returns x̂₀."""
    out = _root(abar_next) * x0 + _root(1 - abar_next - sigma**2) * eps
    if noise is not None:
        return out + sigma * noise
    if not isinstance(sigma, torch.Tensor) and sigma > 0:
        raise IDMError("a stochastic DDIM step (sigma > 0) needs noise")
    return out


def ddpm_posterior(x_t: torch.Tensor, x0: torch.Tensor, abar: Abar, abar_next: Abar) -> tuple[torch.Tensor, Abar]:
    """Mean and variance of ``q(x' | x_t, x̂₀)`` from ᾱ to ᾱ' (respaced ``β = 1 − ᾱ/ᾱ'``)::

        mean = √ᾱ' β / (1 − ᾱ) · x̂₀ + √(1 − β) (1 − ᾱ') / (1 − ᾱ) · x_t,   var = β (1 − ᾱ') / (1 − ᾱ)
    """
    beta = 1 - abar / abar_next
    mean = (_root(abar_next) * beta / (1 - abar)) * x0 + (_root(1 - beta) * (1 - abar_next) / (1 - abar)) * x_t
    return mean, beta * (1 - abar_next) / (1 - abar)


#: schedule kinds: betas linear in beta, linear in sqrt(beta) (Stable Diffusion), cosine ᾱ
SCHEDULE_KINDS = ("linear", "scaled_linear", "cosine")


class NoiseSchedule:
    """A discrete schedule of ``num_steps`` betas (float64). ``kind`` is ``"linear"`` (beta_start →
    beta_end), ``"scaled_linear"`` (``linspace(sqrt(beta_start), sqrt(beta_end))²``, Stable
    Diffusion) or ``"cosine"`` (Nichol & Dhariwal 2021, betas clipped at 0.999; ignores beta_start/end)."""

    def __init__(self, kind: str = "linear", num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> None:
        if num_steps < 1:
            raise IDMError(f"schedule needs at least 1 step, got {num_steps}")
        self.kind, self.num_steps = kind, int(num_steps)
        self.beta_start, self.beta_end = float(beta_start), float(beta_end)
        if kind == "linear":
            betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
        elif kind == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
        elif kind == "cosine":
            s = 0.008
            steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
            f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        else:
            raise IDMError(f"unknown noise schedule {kind!r}; use one of {', '.join(SCHEDULE_KINDS)}")
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)

    # --- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_steps": self.num_steps, "beta_start": self.beta_start, "beta_end": self.beta_end}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "NoiseSchedule":
        return cls(**d)

    def __repr__(self) -> str:
        return f"NoiseSchedule({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"

    # --- forward process -----------------------------------------------------------------------
    def abar(self, t: torch.Tensor | int | Sequence[int], like: torch.Tensor) -> torch.Tensor:
        """``alphas_cumprod[t]`` broadcastable against ``like`` (B, ...)."""
        return _gather(self.alphas_cumprod, t, like)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor) -> torch.Tensor:
        """Sample ``x_t ~ q(x_t | x_0)``: ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` (x0 on [-1, 1])."""
        a = self.abar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor) -> torch.Tensor:
        """Invert the forward process given the noise: ``(x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``."""
        return x0_from_eps(x_t, eps, self.abar(t, x_t))

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor | int, x0: torch.Tensor) -> torch.Tensor:
        """Noise implied by ``x_t`` and ``x0``: ``(x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)``."""
        return eps_from_x0(x_t, x0, self.abar(t, x_t))

    # --- respacing / noise levels --------------------------------------------------------------
    def respaced(self, steps: int, t_max: int | None = None) -> list[int]:
        """``steps`` evenly spaced timesteps from 0 to ``t_max`` (default ``num_steps - 1``), ascending.

        The largest is always ``t_max``; with ``steps >= 2`` the smallest is 0 (``steps = 1`` gives ``[t_max]``).
        """
        t_max = self.num_steps - 1 if t_max is None else int(t_max)
        if not 0 <= t_max < self.num_steps:
            raise IDMError(f"t_max must lie in [0, {self.num_steps}), got {t_max}")
        if not 1 <= steps <= t_max + 1:
            raise IDMError(f"number of sampling steps must lie in [1, {t_max + 1}], got {steps}")
        return sorted({int(v) for v in np.round(np.linspace(t_max, 0, steps))})

    def noise_to_signal(self, t: int) -> float:
        """``sqrt((1 - abar_t) / abar_t)``: std of the noise relative to the signal at step ``t``."""
        a = float(self.alphas_cumprod[t])
        return math.sqrt((1 - a) / a)

    def timestep_for_noise(self, ratio: float) -> int:
        """Timestep whose noise-to-signal ratio is closest to ``ratio`` (increasing in t)."""
        nsr = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        return int(torch.argmin((nsr - ratio).abs()))


#: diffusers ``beta_schedule`` names → :class:`NoiseSchedule` kinds
DIFFUSERS_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}


def schedule_from_diffusers(config: dict[str, Any]) -> NoiseSchedule:
    """The :class:`NoiseSchedule` of a diffusers scheduler config (``scheduler_config.json`` of a
    DDPM/DDIM/PNDM/... scheduler, as a dict).

    Reads ``num_train_timesteps``, ``beta_schedule`` (``linear``, ``scaled_linear`` or
    ``squaredcos_cap_v2`` → ``cosine``), ``beta_start``, ``beta_end``, with diffusers' defaults
    (1000, linear, 1e-4, 0.02) for missing entries. Explicit ``trained_betas``, zero-terminal-SNR
    rescaling and variance-exploding (sigma) schedulers raise :class:`IDMError`.
    """
    if not isinstance(config, dict):
        raise IDMError(f"a diffusers scheduler config must be a JSON object, got {type(config).__name__}")
    name = config.get("_class_name", "scheduler")
    if config.get("trained_betas") is not None:
        raise IDMError(f"diffusers {name} with explicit trained_betas is not supported")
    if config.get("rescale_betas_zero_snr"):
        raise IDMError(f"diffusers {name} with rescale_betas_zero_snr is not supported (ᾱ_T = 0 has no x̂₀)")
    if "beta_start" not in config and "beta_schedule" not in config and "sigma_max" in config:
        raise IDMError(f"diffusers {name} is a variance-exploding (sigma) scheduler; only DDPM-type beta schedules are supported")
    beta_schedule = config.get("beta_schedule", "linear")
    if beta_schedule not in DIFFUSERS_BETA_SCHEDULES:
        raise IDMError(
            f"diffusers beta_schedule {beta_schedule!r} is not supported; supported: {', '.join(DIFFUSERS_BETA_SCHEDULES)}"
        )
    try:
        return NoiseSchedule(
            DIFFUSERS_BETA_SCHEDULES[beta_schedule],
            int(config.get("num_train_timesteps", 1000)),
            float(config.get("beta_start", 1e-4)),
            float(config.get("beta_end", 0.02)),
        )
    except (TypeError, ValueError) as exc:
        raise IDMError(f"malformed diffusers scheduler config: {exc}") from None
