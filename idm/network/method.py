"""The ``idm`` reconstruction method: a fine-tuned IDM network loaded from a checkpoint.

Without ``checkpoint`` the shipped checkpoint ``idm-cs{round(100·ratio)}`` matching the
measurement's ratio is used (searched by :func:`idm.io.checkpoint.resolve_checkpoint`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import IDMError, check_ratio
from ..io.checkpoint import check_trained_operator, shipped_checkpoint
from ..physics.base import LinearOperator
from ..registry import register_method
from .idm import load_idm


@register_method("idm", "IDM: the prior's sampler fine-tuned end to end (invertible diffusion, T=3)", checkpoint_kind="idm")
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
    name = shipped_checkpoint("idm", ratio, "idm finetune") if checkpoint is None else checkpoint
    net, config = load_idm(name, device=device, ratio=ratio)
    device = torch.device(device)

    def reconstruct(y: torch.Tensor, op: LinearOperator) -> torch.Tensor:
        check_trained_operator(name, config, op)
        op.check_measurements(y)
        with torch.no_grad():
            x = net(y.to(device=device, dtype=torch.float32), op)
        return x.to(y.device)

    return reconstruct
