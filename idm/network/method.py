"""The ``idm`` reconstruction method: a fine-tuned IDM network loaded from a checkpoint.

Without ``checkpoint`` the shipped checkpoint for the measurements is used (searched by
:func:`idm.io.checkpoint.resolve_checkpoint`): block CS ``idm-cs{round(100·ratio)}`` or a multi-ratio
``idm-*`` whose range holds the ratio; MRI ``idm-mri``; CT ``idm-ct`` (chosen at the first call, from
the operator's kind).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import IDMError, check_ratio
from ..io.checkpoint import check_trained_operator, shipped_checkpoint
from ..physics.base import LinearOperator
from ..physics.volume import ztv_defaults
from ..registry import Posterior, Reconstruct, checked_options, register_method
from .config import check_count
from .idm import load_idm

#: the shipped checkpoint of each operator kind without a sampling ratio
OPERATOR_CHECKPOINTS = {"mri": "idm-mri", "ct": "idm-ct"}
#: default items (slices of a volume) per network call of the ``idm`` method
CHUNK = 8


@register_method("idm", "IDM: the prior's sampler fine-tuned end to end (invertible diffusion, T=3)", checkpoint_kind="idm")
def build(
    *,
    checkpoint: str | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = False,
    ratio: float | None = None,
    passes: int | None = None,
    dc_iterations: int | None = None,
    samples: int = 8,
    keep: float = 0.8,
    volume: bool | None = None,
    lam: float | None = None,
    rho: float | None = None,
    chunk: int | None = None,
    **options: Any,
) -> "IDMReconstructor":
    """``reconstruct(y, op)`` → IDM estimate ``(B, C, *op.domain_size)`` (not clipped);
    ``reconstruct.with_uncertainty(y, op)`` (1D Cartesian MRI) adds a per-pixel std: see
    :class:`IDMReconstructor` (options ``samples`` K and ``keep``).

    ``ratio`` (the measurements' sampling ratio) picks the shipped checkpoint when ``checkpoint``
    is None and is checked against the checkpoint's. ``passes`` overrides the checkpoint's number
    of sampler passes (:attr:`IDMConfig.passes`; e.g. 1 for speed), ``dc_iterations`` its CG steps
    per data-consistency solve (:attr:`IDMConfig.dc_iterations`; CT, multi-coil MRI: more steps fit
    the measurements more closely, e.g. ``idm-ct`` trained with 10 gains 0.4 dB with 40 at 23 views).
    ``volume``: the batch is the slices of one volume (z first) and every step's data consistency
    couples them by z-TV (:attr:`IDMConfig.ztv`; default: as the checkpoint was trained); ``lam`` and
    ``rho`` set its (λ, ρ) (default: the checkpoint's, else :func:`idm.physics.volume.ztv_defaults` of
    the operator). ``chunk``: items (slices) per network call, default :data:`CHUNK` — the items of a
    batch are independent, so the result does not depend on it and memory is bounded by it; with z-TV
    coupling the whole volume is one call (``chunk`` is then an error). The IDM network is deterministic: ``seed`` draws only the withheld lines of
    ``with_uncertainty``. No other options.
    """
    if options:
        raise IDMError(f"method 'idm' has no option(s) {', '.join(sorted(options))}")
    if volume is not None and not isinstance(volume, bool):
        raise IDMError(f"idm option volume must be true or false, got {volume!r}")
    coupling = checked_options("idm", {"lam": 0.0, "rho": 1.0},
                               {k: v for k, v in (("lam", lam), ("rho", rho)) if v is not None},
                               {"lam": (0.0, math.inf), "rho": (1e-9, math.inf)})
    if volume is False and (lam is not None or rho is not None):
        raise IDMError("idm options lam and rho set the z-TV coupling of volumes; they need volume=true")
    spread = checked_options("idm", {"samples": 8, "keep": 0.8}, {"samples": samples, "keep": keep},
                             {"samples": (2, 1024), "keep": (1e-3, 1.0)})
    per_call = CHUNK if chunk is None else check_count(chunk, "idm option chunk")
    if volume is True and chunk is not None:
        raise IDMError("idm option chunk splits a batch into independent items; with volume=true the z-TV "
                       "consistency couples every slice, so the volume runs as one batch")
    changes = {"passes": passes, "dc_iterations": dc_iterations}
    changes = {key: check_count(value, f"idm option {key}") for key, value in changes.items() if value is not None}
    if ratio is not None:
        ratio = check_ratio(ratio)
    loaded: dict[str, Any] = {}

    def network(kind: str, measured_ratio: float | None):
        if "net" not in loaded:
            if checkpoint is not None:
                name = checkpoint
            elif kind in OPERATOR_CHECKPOINTS:
                name = OPERATOR_CHECKPOINTS[kind]
            else:
                name = shipped_checkpoint("idm", ratio if ratio is not None else measured_ratio, "idm finetune")
            loaded["name"] = name
            loaded["net"], loaded["config"] = load_idm(name, device=device, ratio=ratio)
            if changes:
                loaded["net"].config = replace(loaded["net"].config, **changes)
        return loaded["name"], loaded["net"], loaded["config"]

    if checkpoint is not None or ratio is not None:
        network("blockcs", ratio)  # load now: a missing or mismatched checkpoint fails before any work
    device = torch.device(device)

    def reconstruct(y: torch.Tensor, op: LinearOperator) -> torch.Tensor:
        name, net, config = network(op.kind, op.config().get("ratio"))
        if volume is not None or lam is not None or rho is not None:
            trained = config.get("idm", {}).get("ztv")  # the checkpoint's own, whatever set_ztv did since
            ztv = None
            if volume is not False:
                lam0, rho0 = trained if trained is not None else ztv_defaults(op)
                ztv = (coupling["lam"] if lam is not None else lam0, coupling["rho"] if rho is not None else rho0)
            net.set_ztv(ztv)
        check_trained_operator(name, config, op)
        op.check_measurements(y)
        if net.config.ztv is not None and chunk is not None:
            raise IDMError(f"{name} couples the slices of a volume by z-TV (trained so), so it runs the volume as "
                           "one batch: leave out idm option chunk, or set volume=false")
        step = y.shape[0] if net.config.ztv is not None else per_call
        y_net = y.to(device=device, dtype=torch.complex64 if y.is_complex() else torch.float32)
        starts = range(0, y.shape[0], step)
        with torch.no_grad():
            x = torch.cat([net(y_net[i : i + step], op)
                           for i in tqdm(starts, desc="idm", unit="chunk", disable=not progress or len(starts) < 2, leave=False)])
        return x.to(y.device)

    return IDMReconstructor(reconstruct, spread["samples"], spread["keep"], seed)


class IDMReconstructor:
    """The ``idm`` method: ``reconstruct(y, op)``, and for 1D Cartesian MRI ``with_uncertainty(y, op)``.

    IDM is deterministic, so its uncertainty is a resampling one (honestly: not a posterior): K more
    reconstructions, each from the measurements with every sampled k-space line outside the fully
    sampled centre withheld with probability ``1 − keep`` (:func:`~idm.physics.mri.withhold_lines`;
    the withheld lines are zeroed in ``y`` and dropped from the operator's mask). The std is the
    per-pixel standard deviation of their magnitudes: how much the estimate at a pixel depends on which
    lines were acquired — large where the network fills in structure that few lines support. The
    reconstruction itself is the ordinary one from all the lines.
    """

    def __init__(self, reconstruct: Reconstruct, samples: int, keep: float, seed: int) -> None:
        self.reconstruct, self.samples, self.keep, self.seed = reconstruct, samples, keep, seed

    def __call__(self, y: torch.Tensor, op: LinearOperator) -> torch.Tensor:
        return self.reconstruct(y, op)

    def with_uncertainty(self, y: torch.Tensor, op: LinearOperator) -> Posterior:
        """The reconstruction ``(B, C, *domain)`` and the std of the magnitudes of K line-withholding
        reconstructions ``(B, C, *domain)`` on the image's scale (class docstring)."""
        from ..physics.mri import MRI, withhold_lines

        if not isinstance(op, MRI):
            raise IDMError(f"idm's uncertainty withholds measured MRI k-space lines; operator {op.kind!r} has none")
        x = self.reconstruct(y, op)
        generator = torch.Generator().manual_seed(self.seed)
        draws = []
        for _ in range(self.samples):
            sub = op.with_mask(withhold_lines(op.mask, self.keep, generator))
            draws.append(self.reconstruct(y * sub.mask.to(y.device, y.real.dtype), sub).abs())
        return Posterior(x, torch.stack(draws).std(0, correction=0))
