"""What one reconstruction knows about its measurement, passed explicitly through the network."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..physics.base import LinearOperator
from ..physics.canvas import Canvas


@dataclass(frozen=True)
class MeasurementContext:
    """The operator and measurements of one forward pass, and the network's canvas.

    The network works on a *canvas*: the operator's domain ``(B, C, *op.domain_size)`` zero-padded
    at the bottom/right to a multiple of the U-Net's size requirement (:class:`~idm.physics.Canvas`).
    Injectors and data consistency crop canvas-sized maps to the domain, apply the operator and pad
    back.

    Attributes:
        op: the linear operator (``A``, ``A_adjoint`` and ``project`` are called).
        y: measurements, shape ``op.measurement_shape(B, C)``.
        aty: ``Aᵀy`` on the canvas, shape ``(B, C, *canvas.size)`` (an injector input).
        canvas: the domain inside the padded canvas.
    """

    op: LinearOperator
    y: torch.Tensor
    aty: torch.Tensor
    canvas: Canvas

    @classmethod
    def build(cls, op: LinearOperator, y: torch.Tensor, multiple: int) -> "MeasurementContext":
        """The context for measurements ``y`` of ``op``, on a canvas padded to a multiple of ``multiple``."""
        canvas = Canvas.to_multiple(op.domain_size, multiple)
        return cls(op, y, canvas.pad(op.A_adjoint(y)), canvas)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Domain ``(B, C, *domain)`` → canvas ``(B, C, *canvas.size)`` (zeros at the bottom/right)."""
        return self.canvas.pad(x)

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        """Canvas → domain."""
        return self.canvas.crop(x)

    def AtA(self, z: torch.Tensor) -> torch.Tensor:
        """AᵀA on a canvas-sized map (canvas → canvas)."""
        return self.pad(self.op.A_adjoint(self.op.A(self.crop(z))))

    def data_consistency(self, x0: torch.Tensor) -> torch.Tensor:
        """:meth:`~idm.physics.LinearOperator.project` (``x − A†(A x − y)``) of a canvas image on [0, 1].

        Outside the domain (padding) the image is set to 0, the value the padded truth has.
        """
        return self.pad(self.op.project(self.crop(x0), self.y))
