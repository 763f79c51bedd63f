"""idm — memory-efficient, end-to-end trainable invertible diffusion reconstruction.

Quick use::

    from idm.physics import BlockCS
    op = BlockCS(x.shape[2:], ratio=0.1)
    x_hat = op.crop(idm.reconstruct(op.measure(x), op, method="tv"))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import IDMError

if TYPE_CHECKING:
    import torch

    from .physics.base import LinearOperator

__version__ = "0.1.0"
__all__ = ["IDMError", "reconstruct", "__version__"]


def reconstruct(
    y: "torch.Tensor",
    op: "LinearOperator",
    method: str = "tv",
    *,
    checkpoint: str | None = None,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = False,
    **options: Any,
) -> "torch.Tensor":
    """Reconstruct measurements ``y`` of ``op`` with a registered method (``options``: the method's
    own, e.g. ``steps=10``; unknown ones raise :class:`~idm.errors.IDMError`).

    Returns the estimate on the operator's domain, shape ``(B, C, *op.domain_size)``, values
    nominally in [0, 1]; ``op.crop`` recovers the image size. For repeated use, build the method
    once with ``idm.registry.get_method(name).build(...)``.
    """
    import torch

    from .registry import get_method

    ratio = op.config().get("ratio")
    build = get_method(method).build
    with torch.no_grad():
        return build(checkpoint=checkpoint, device=device, seed=seed, progress=progress, ratio=ratio,
                     **options)(y.to(device), op)
