"""``fbp``: filtered backprojection, for operators that have it (CT: :class:`~idm.physics.ParallelBeamCT`).

The operator's own ``op.fbp(y, filter)`` (Kak & Slaney 1988, ch. 3): an approximate inverse for
full-view data; sparse-view or limited-angle FBP shows streaks and a missing wedge. The estimate
is real, on the operator's domain ``(B, C, *op.domain_size)``, and not clipped.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import IDMError
from ..physics import LinearOperator
from ..physics.ct import FBP_FILTERS
from ..registry import register_method
from ._common import on_device, reject_extra


@register_method("fbp", "filtered backprojection (CT operators)")
def build(
    *,
    checkpoint: Any = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = False,
    filter: str | None = "ramp",
    **options: Any,
):
    """``reconstruct(y, op)`` → ``op.fbp(y, filter)`` of shape ``(B, C, *op.domain_size)`` (not clipped).

    Option ``filter``: one of ``ramp`` (default), ``shepp-logan``, ``cosine``, ``hamming``, ``hann``,
    or None (no filter). Operators without filtered backprojection raise :class:`IDMError`.
    """
    reject_extra("fbp", checkpoint, options)
    if filter is not None and filter not in FBP_FILTERS:
        raise IDMError(f"fbp: unknown filter {filter!r}; available: {', '.join(FBP_FILTERS)} or None")

    def solve(y: torch.Tensor, op: LinearOperator) -> torch.Tensor:
        fbp = getattr(op, "fbp", None)
        if not callable(fbp):
            raise IDMError(f"method 'fbp' needs an operator with filtered backprojection (ct), got {op.kind!r}")
        return fbp(y, filter=filter)

    return on_device(device, solve)
