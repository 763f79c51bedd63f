"""``pinv``: the pseudo-inverse reconstruction x = A†y.

For MRI this is the zero-filled inverse FFT (single-coil) or CG-SENSE (multi-coil), a **complex**
image on the operator's domain (as every MRI output in ``idm``): metrics compare its magnitude
``|x|`` with the ground truth's (fastMRI convention, both normalised by the ground truth's max).
For CT it is the conjugate-gradient least-squares solution (``op.A_dagger``; FBP is ``fbp``).
"""

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
    """``reconstruct(y, op)`` → A†y of shape ``(B, C, *op.domain_size)`` (not clipped; complex for MRI)."""
    reject_extra("pinv", checkpoint, options)
    return on_device(device, _pinv)
