"""Small functional samplers for an ε-prediction model (k-diffusion style, one shared signature).

``sample_xxx(model, x_T, schedule, steps, *, t_start=None, eta=..., generator=None, clip=True,
progress=False, callback=None) -> x_0``

* ``model(x, t) -> eps``: ``x`` (B, C, H, W) on the model range [-1, 1] (see
  :mod:`idm.priors.schedule`), ``t`` a (B,) long tensor of timesteps on ``x``'s device.
* ``x_T``: the starting point, a sample of ``q(x_t | x_0)`` at ``t = t_start`` (default the last
  timestep, where ``x_T`` is standard normal noise).
* ``steps``: number of model calls, over ``schedule.respaced(steps, t_start)`` (evenly spaced,
  descending from ``t_start`` to 0).
* ``clip``: clamp each x̂₀ estimate to [-1, 1].
* ``callback({"i", "t", "x", "x0"})`` is called after every step with the new ``x`` and the x̂₀
  that produced it. The samplers do not disable gradients; wrap calls in ``torch.no_grad()``.

The output is x̂₀ on the model range [-1, 1]; map it to [0, 1] with
:func:`idm.priors.schedule.from_model_range`.
"""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from .schedule import NoiseSchedule, ddim_sigma, ddim_step, ddpm_posterior, eps_from_x0, x0_from_eps

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[dict], None]


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _sample(
    model: EpsModel,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    steps: int,
    t_start: int | None,
    step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, float], torch.Tensor],
    clip: bool,
    progress: bool,
    callback: Callback | None,
) -> torch.Tensor:
    """Shared loop: for each respaced t (descending) predict eps, x̂₀ and call ``step(x, x0, eps, abar, abar_prev)``."""
    timesteps = schedule.respaced(steps, t_start)[::-1]
    abar = schedule.alphas_cumprod
    x0 = x
    for i, t in enumerate(tqdm(timesteps, disable=not progress, desc="sampling", leave=False)):
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps = model(x, t_batch)
        a, a_prev = float(abar[t]), (float(abar[timesteps[i + 1]]) if i + 1 < len(timesteps) else 1.0)
        x0 = x0_from_eps(x, eps, a)
        if clip:
            x0 = x0.clamp(-1.0, 1.0)
            eps = eps_from_x0(x, x0, a)
        x = step(x, x0, eps, a, a_prev) if i + 1 < len(timesteps) else x0
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x0


def sample_ddim(
    model: EpsModel,
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    steps: int,
    *,
    t_start: int | None = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    clip: bool = True,
    progress: bool = False,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021) over the respaced steps: :func:`~idm.priors.schedule.ddim_step` with
    ``s = ddim_sigma(abar, abar', eta)``; ``eta = 0`` is deterministic."""

    def step(x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, a: float, a_prev: float) -> torch.Tensor:
        s = ddim_sigma(a, a_prev, eta)
        return ddim_step(x0, eps, a_prev, sigma=s, noise=_noise_like(x, generator) if s > 0 else None)

    return _sample(model, x_T, schedule, steps, t_start, step, clip, progress, callback)


def sample_ddpm(
    model: EpsModel,
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    steps: int,
    *,
    t_start: int | None = None,
    eta: float = 1.0,
    generator: torch.Generator | None = None,
    clip: bool = True,
    progress: bool = False,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Ancestral DDPM (Ho et al. 2020) over the respaced steps: sample the posterior
    :func:`~idm.priors.schedule.ddpm_posterior` ``q(x' | x_t, x̂₀)`` with its std scaled by ``eta``."""

    def step(x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, a: float, a_prev: float) -> torch.Tensor:
        mean, var = ddpm_posterior(x, x0, a, a_prev)
        std = eta * var**0.5
        return mean + std * _noise_like(x, generator) if std > 0 else mean

    return _sample(model, x_T, schedule, steps, t_start, step, clip, progress, callback)


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"ddim": sample_ddim, "ddpm": sample_ddpm}
