"""The ``idm`` reconstruction method: a fine-tuned IDM network loaded from a checkpoint.

Without ``checkpoint`` the shipped checkpoint ``idm-cs{round(100·ratio)}`` matching the
measurement's ratio is used (searched by :func:`idm.io.checkpoint.resolve_checkpoint`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import IDMError, check_ratio
from ..io.checkpoint import resolve_checkpoint
from ..physics.base import LinearOperator
from ..registry import register_method
from .idm import load_idm


def shipped_name(ratio: float) -> str:
    """Name of the shipped checkpoint for ``ratio``, e.g. ``idm-cs10`` for 0.1."""
    return f"idm-cs{round(check_ratio(ratio) * 100)}"


def default_checkpoint(ratio: float | None) -> str:
    """The shipped checkpoint name for ``ratio``; :class:`IDMError` if there is none."""
    if ratio is None:
        raise IDMError("method 'idm' needs the sampling ratio (to pick a shipped checkpoint) or --checkpoint")
    name = shipped_name(ratio)
    try:
        resolve_checkpoint(name)
    except IDMError:
        raise IDMError(
            f"no shipped IDM checkpoint for ratio {float(ratio):g}; pass --checkpoint or fine-tune one "
            f"with idm finetune --ratio {float(ratio):g}"
        ) from None
    return name


@register_method("idm", "IDM: the prior's sampler fine-tuned end to end (invertible diffusion, T=3)", needs_checkpoint=True)
def build(
    *,
    checkpoint: str | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = False,
    ratio: float | None = None,
    **options: Any,
):
    """``reconstruct(y, op)`` → IDM estimate ``(B, C, *op.domain_size)`` (not clipped).

    ``ratio`` (the measurements' sampling ratio) picks the shipped checkpoint when ``checkpoint``
    is None and is checked against the checkpoint's. The IDM network is deterministic: ``seed``
    is unused. No other options.
    """
    if options:
        raise IDMError(f"method 'idm' has no option(s) {', '.join(sorted(options))}")
    if ratio is not None:
        ratio = check_ratio(ratio)
    name = default_checkpoint(ratio) if checkpoint is None else checkpoint
    net, config = load_idm(name, device=device, ratio=ratio)
    trained_ratio, trained_kind = float(config["ratio"]), config.get("operator", "blockcs")
    device = torch.device(device)

    def reconstruct(y: torch.Tensor, op: LinearOperator) -> torch.Tensor:
        op_config = op.config()
        if op.kind != trained_kind:
            raise IDMError(f"IDM checkpoint {name} was trained for {trained_kind} measurements, got {op.kind}")
        measured = op_config.get("ratio")
        if measured is None or abs(float(measured) - trained_ratio) > 1e-6:
            raise IDMError(
                f"IDM checkpoint {name} was trained for ratio {trained_ratio:g}, the measurements have ratio {measured}"
            )
        op.check_measurements(y)
        with torch.no_grad():
            x = net(y.to(device=device, dtype=torch.float32), op)
        return x.to(y.device)

    return reconstruct
