"""Padding to a size: the one helper behind operator domains, network canvases and denoiser inputs.

A :class:`Canvas` is an ``inner`` spatial size (e.g. the user's image, or an operator's domain)
embedded at the start of every spatial axis of a larger ``size`` (padding at the bottom/right,
and at the back for 3D). It works on the last ``len(inner)`` axes of batch-first tensors
``(B, C, *inner)`` ↔ ``(B, C, *size)``:

* :meth:`Canvas.pad` fills the margin with zeros (``mode="constant"``) or mirrors the image
  (``"reflect"``, ``"replicate"``, ``"circular"``: what a denoiser should see at its borders);
* :meth:`Canvas.crop` returns the inner part (a view);
* :meth:`Canvas.paste` replaces the inner part of a padded tensor and keeps its margin.

Used by :class:`~idm.physics.base.LinearOperator` (image → domain, e.g. block CS pads to whole
blocks), the zero-shot solvers and the IDM network (domain → a multiple of the U-Net's size
requirement) and the denoiser priors (reflect padding to the network's size multiple).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import IDMError


def padded_size(size: Sequence[int], multiple: int) -> tuple[int, ...]:
    """Each entry of ``size`` rounded up to a multiple of ``multiple`` (≥ 1)."""
    if multiple < 1:
        raise IDMError(f"size multiple must be >= 1, got {multiple}")
    return tuple(-(-int(s) // multiple) * multiple for s in size)


@dataclass(frozen=True)
class Canvas:
    """``inner`` spatial size padded at the end of each axis to ``size`` (see the module docstring)."""

    inner: tuple[int, ...]
    size: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.inner) != len(self.size) or any(i > s for i, s in zip(self.inner, self.size)):
            raise IDMError(f"canvas {self.size} cannot hold {self.inner}")

    @classmethod
    def to_multiple(cls, inner: Sequence[int], multiple: int) -> "Canvas":
        """The canvas of ``inner`` padded to multiples of ``multiple``."""
        inner = tuple(int(s) for s in inner)
        return cls(inner, padded_size(inner, multiple))

    @property
    def padded(self) -> bool:
        return self.inner != self.size

    def _check(self, x: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
        if x.ndim < len(expected) or tuple(x.shape[x.ndim - len(expected):]) != expected:
            raise IDMError(f"expected a tensor of spatial size {expected} ({what}), got shape {tuple(x.shape)}")

    def pad(self, x: torch.Tensor, mode: str = "constant") -> torch.Tensor:
        """``(…, *inner)`` → ``(…, *size)``, the margin filled by ``mode`` (``torch.nn.functional.pad``;
        ``"reflect"`` needs a margin smaller than the image)."""
        self._check(x, self.inner, "the inner size")
        if not self.padded:
            return x
        pads: list[int] = []
        for inner, size in zip(reversed(self.inner), reversed(self.size)):
            pads += [0, size - inner]
        if mode == "constant":
            return F.pad(x, pads)
        batch = x.shape[: x.ndim - len(self.inner)]  # F.pad's non-constant modes want (N, C, *spatial)
        flat = x.reshape(-1, 1, *self.inner)
        return F.pad(flat, pads, mode=mode).reshape(*batch, *self.size)

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        """``(…, *size)`` → ``(…, *inner)`` (a view)."""
        self._check(x, self.size, "the canvas size")
        return x[(Ellipsis, *(slice(0, s) for s in self.inner))]

    def paste(self, canvas: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
        """A copy of ``canvas`` ``(…, *size)`` with its inner part replaced by ``inner`` ``(…, *inner)``."""
        if not self.padded:
            return inner
        out = canvas.clone()
        out[(Ellipsis, *(slice(0, s) for s in self.inner))] = inner
        return out
