"""``pinv``: the pseudo-inverse reconstruction x = A†y."""

from __future__ import annotations

from typing import Any

import torch

from ..physics import LinearOperator
from ..registry import register_method
from ._common import on_device, reject_extra


def _pinv(y: torch.Tensor, op: LinearOperator) -> torch.Tensor:
    return op.A_dagger(y)


@register_method("pinv", "pseudo-inverse A†y (zero-filled / back-projected estimate)")
def build(
    *,
    checkpoint: Any = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = False,
    **options: Any,
):
    """``reconstruct(y, op)`` → A†y of shape ``(B, C, *op.domain_size)`` (not clipped)."""
    reject_extra("pinv", checkpoint, options)
    return on_device(device, _pinv)
