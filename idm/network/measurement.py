"""What one reconstruction knows about its measurement, passed explicitly through the network."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..physics.base import LinearOperator


@dataclass(frozen=True)
class MeasurementContext:
    """The operator and measurements of one forward pass, and the padding of the U-Net's canvas.

    The network works on a *canvas*: the operator's domain ``(B, C, *op.domain_size)`` zero-padded
    at the bottom/right to ``canvas_size`` (a multiple of the U-Net's size requirement). Injectors
    and data consistency crop canvas-sized maps to the domain, apply the operator and pad back.

    Attributes:
        op: the linear operator (only ``A``, ``A_adjoint`` and ``A_dagger`` are called).
        y: measurements, shape ``op.measurement_shape(B, C)``.
        aty: ``Aᵀy`` on the canvas, shape ``(B, C, *canvas_size)`` (an injector input).
        canvas_size: padded spatial size ``(H, W)``.
    """

    op: LinearOperator
    y: torch.Tensor
    aty: torch.Tensor
    canvas_size: tuple[int, int]

    @classmethod
    def build(cls, op: LinearOperator, y: torch.Tensor, multiple: int) -> "MeasurementContext":
        """The context for measurements ``y`` of ``op``, on a canvas padded to a multiple of ``multiple``."""
        canvas = (-(-op.domain_size[0] // multiple) * multiple, -(-op.domain_size[1] // multiple) * multiple)
        return cls(op, y, _pad(op.A_adjoint(y), canvas), canvas)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Domain ``(B, C, *domain)`` → canvas ``(B, C, *canvas_size)`` (zeros at the bottom/right)."""
        return _pad(x, self.canvas_size)

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        """Canvas → domain."""
        h, w = self.op.domain_size
        return x[..., :h, :w]

    def AtA(self, z: torch.Tensor) -> torch.Tensor:
        """AᵀA on a canvas-sized map (canvas → canvas)."""
        return self.pad(self.op.A_adjoint(self.op.A(self.crop(z))))

    def data_consistency(self, x0: torch.Tensor) -> torch.Tensor:
        """Range-null-space projection ``x − A†(A x − y)`` of a canvas image on [0, 1].

        Outside the domain (padding) the image is set to 0, the value the padded truth has.
        """
        x = self.crop(x0)
        return self.pad(x - self.op.A_dagger(self.op.A(x) - self.y))


def _pad(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Zero-pad the last two axes of ``x`` at the bottom/right to ``size``."""
    dh, dw = size[0] - x.shape[-2], size[1] - x.shape[-1]
    return F.pad(x, (0, dw, 0, dh)) if dh or dw else x
