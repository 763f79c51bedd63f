"""Super-resolution (average pooling) and denoising (identity)."""

from __future__ import annotations

from typing import Any

import torch
from einops import reduce

from ._args import as_int, image_size_2d
from .base import LinearOperator
from .canvas import padded_size


class SuperResolution(LinearOperator):
    """Average pooling by an integer ``factor``: ``(B, C, H', W')`` → ``(B, C, H'/f, W'/f)``.

    The image is zero-padded at the bottom/right to a multiple of ``factor`` (``domain_size``).
    Aᵀ is nearest-neighbour upsampling divided by f²; A† is nearest-neighbour upsampling
    (A·Aᵀ = I/f², so A† = f²·Aᵀ and A·A† = I).
    """

    kind = "superres"

    def __init__(self, image_size: tuple[int, ...], factor: int, noise_sigma: float = 0.0) -> None:
        super().__init__(image_size, noise_sigma)
        image_size_2d(self.kind, self.image_size)
        self.factor = as_int("super-resolution factor", factor, minimum=1)
        self._domain = padded_size(self.image_size, self.factor)

    @property
    def domain_size(self) -> tuple[int, ...]:
        return self._domain

    def A(self, x: torch.Tensor) -> torch.Tensor:
        self.check_domain(x)
        return reduce(x, "b c (h f1) (w f2) -> b c h w", "mean", f1=self.factor, f2=self.factor)

    def _upsample(self, y: torch.Tensor) -> torch.Tensor:
        self.check_measurements(y)
        return y.repeat_interleave(self.factor, dim=-2).repeat_interleave(self.factor, dim=-1)

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self._upsample(y) / self.factor**2

    def A_dagger(self, y: torch.Tensor) -> torch.Tensor:
        return self._upsample(y)

    def measurement_shape(self, batch: int, channels: int) -> tuple[int, ...]:
        return (batch, channels, *(s // self.factor for s in self._domain))

    def config(self) -> dict[str, Any]:
        return {**super().config(), "factor": self.factor}


class Denoising(LinearOperator):
    """Identity operator: the measurement is the noisy image itself, ``y = x + sigma·n``."""

    kind = "denoising"

    def __init__(self, image_size: tuple[int, ...], noise_sigma: float = 0.1) -> None:
        super().__init__(image_size, noise_sigma)

    def A(self, x: torch.Tensor) -> torch.Tensor:
        self.check_domain(x)
        return x

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        self.check_measurements(y)
        return y

    def A_dagger(self, y: torch.Tensor) -> torch.Tensor:
        return self.A_adjoint(y)

    def measurement_shape(self, batch: int, channels: int) -> tuple[int, ...]:
        return (batch, channels, *self.image_size)
