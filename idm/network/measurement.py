"""What one reconstruction knows about its measurement, passed explicitly through the network."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..physics.base import LinearOperator
from ..physics.canvas import Canvas
from ..physics.mri import channels_to_complex, complex_to_channels
from ..physics.volume import ztv_consistency

#: CG steps of the z-TV consistency when the network sets no ``dc_iterations``
ZTV_ITERATIONS = 10


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
        aty: ``Aᵀy / ‖A‖²`` on the canvas, shape ``(B, C, *canvas.size)`` (an injector input).
        canvas: the domain inside the padded canvas.
        complex: the operator acts on complex images (MRI): the canvas holds them as real channels
            ``[Re, Im]`` (:func:`~idm.physics.mri.complex_to_channels`) and :meth:`AtA`,
            :meth:`data_consistency` and :meth:`to_canvas` convert at this boundary.
    """

    op: LinearOperator
    y: torch.Tensor
    aty: torch.Tensor
    canvas: Canvas
    complex: bool = False
    gram_scale: float = 1.0
    dc_iterations: int | None = None
    ztv: tuple[float, float] | None = None

    @classmethod
    def build(cls, op: LinearOperator, y: torch.Tensor, multiple: int,
              dc_iterations: int | None = None, ztv: tuple[float, float] | None = None) -> "MeasurementContext":
        """The context for measurements ``y`` of ``op`` (complex ``y``: a complex-image operator), on a
        canvas padded to a multiple of ``multiple``; ``dc_iterations``: CG steps of each
        data-consistency solve (:meth:`~idm.physics.LinearOperator.project`; None: the operator's A†);
        ``ztv``: (λ, ρ) of the z-TV consistency of a volume (the batch is its slices), or None."""
        canvas = Canvas.to_multiple(op.domain_size, multiple)
        is_complex = y.is_complex()
        scale = 1.0 / op.norm_squared(like=y.real if is_complex else y)
        aty = op.A_adjoint(y) * scale
        return cls(op, y, canvas.pad(complex_to_channels(aty) if is_complex else aty), canvas, is_complex, scale,
                   dc_iterations, ztv)

    def to_canvas(self, x: torch.Tensor) -> torch.Tensor:
        """An image of the operator's domain (complex for complex operators) → real canvas."""
        return self.pad(complex_to_channels(x.to(self.y.dtype)) if self.complex else x)

    def from_canvas(self, x: torch.Tensor) -> torch.Tensor:
        """Real canvas → image of the operator's domain (complex for complex operators)."""
        x = self.crop(x)
        return channels_to_complex(x) if self.complex else x

    def _apply(self, f, z: torch.Tensor) -> torch.Tensor:
        """``f`` (domain → domain) on a canvas map, converting complex images at the boundary."""
        out = f(self.from_canvas(z))
        return self.pad(complex_to_channels(out).to(z.dtype) if self.complex else out)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Domain ``(B, C, *domain)`` → canvas ``(B, C, *canvas.size)`` (zeros at the bottom/right)."""
        return self.canvas.pad(x)

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        """Canvas → domain."""
        return self.canvas.crop(x)

    def AtA(self, z: torch.Tensor) -> torch.Tensor:
        """``AᵀA z / ‖A‖²`` on a canvas-sized map (canvas → canvas): the normalised Gram operator the
        injectors see (‖A‖² is 1 for block CS, MRI and inpainting, ~10³ for CT)."""
        return self._apply(lambda x: self.op.A_adjoint(self.op.A(x)) * self.gram_scale, z)

    def data_consistency(self, x0: torch.Tensor) -> torch.Tensor:
        """:meth:`~idm.physics.LinearOperator.project` (``x − A†(A x − y)``) of a canvas image on [0, 1];
        with ``ztv`` the z-TV consistency of the batch as a volume
        (:func:`~idm.physics.volume.ztv_consistency`, ``dc_iterations`` CG steps, default
        :data:`ZTV_ITERATIONS`).

        Outside the domain (padding) the image is set to 0, the value the padded truth has.
        """
        if self.ztv is not None:
            lam, rho = self.ztv
            iterations = ZTV_ITERATIONS if self.dc_iterations is None else self.dc_iterations
            return self._apply(lambda x: ztv_consistency(x, self.y, self.op, lam, rho, iterations), x0)
        return self._apply(lambda x: self.op.project(x, self.y, iterations=self.dc_iterations), x0)
