"""Inpainting: keep the pixels where a binary mask is 1."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import IDMError, check_ratio
from ._args import as_int, count_for_ratio, image_size_2d
from .base import LinearOperator


class Inpainting(LinearOperator):
    """``y = mask ⊙ x`` with a (H, W) 0/1 mask shared by all images and channels.

    Either an explicit ``mask`` (tensor or array of shape ``image_size``, values 0/1) or a random
    mask keeping ``ceil(ratio·H·W)`` pixels drawn from ``seed``. Measurements have the image's
    shape ``(B, C, H, W)`` (zeros where the mask is 0); Aᵀ = A† = mask ⊙ y.

    ``config()`` of an explicit mask holds ``"mask": "explicit"``; the mask itself is in
    :meth:`tensors` (a bool tensor) for ``make_operator(config, tensors)``.
    """

    kind = "inpainting"

    def __init__(
        self,
        image_size: tuple[int, ...],
        mask: torch.Tensor | np.ndarray | None = None,
        ratio: float | None = None,
        seed: int = 0,
        noise_sigma: float = 0.0,
    ) -> None:
        super().__init__(image_size, noise_sigma)
        image_size_2d(self.kind, self.image_size)
        if (mask is None) == (ratio is None):
            raise IDMError("inpainting needs exactly one of an explicit mask or a ratio of kept pixels")
        self.seed = as_int("mask seed", seed)
        self.ratio = None if ratio is None else check_ratio(ratio)
        self._mask = self._random_mask() if mask is None else self._explicit_mask(mask)
        self._cast: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def _explicit_mask(self, mask: Any) -> torch.Tensor:
        if isinstance(mask, str):
            raise IDMError(
                f"inpainting mask {mask!r} is not a tensor; pass the stored mask with make_operator(config, tensors)"
            )
        mask = torch.as_tensor(mask).detach().cpu()
        if tuple(mask.shape) != self.image_size:
            raise IDMError(f"inpainting mask of shape {tuple(mask.shape)} does not match the image size {self.image_size}")
        if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
            raise IDMError("inpainting mask must contain only 0 and 1")
        return mask.to(torch.bool)

    def _random_mask(self) -> torch.Tensor:
        pixels = self.image_size[0] * self.image_size[1]
        generator = torch.Generator().manual_seed(self.seed)
        kept = torch.randperm(pixels, generator=generator)[: count_for_ratio(self.ratio, pixels)]
        mask = torch.zeros(pixels, dtype=torch.bool)
        mask[kept] = True
        return mask.reshape(self.image_size)

    @property
    def explicit(self) -> bool:
        return self.ratio is None

    @property
    def mask(self) -> torch.Tensor:
        """The (H, W) bool mask on the CPU."""
        return self._mask

    def _mask_as(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.dtype, like.device)
        if key not in self._cast:
            self._cast[key] = self._mask.to(device=like.device, dtype=like.dtype)
        return self._cast[key]

    # --- the operator -------------------------------------------------------------------
    def A(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` → ``(B, C, H, W)``, zero where the mask is 0."""
        self.check_domain(x)
        return x * self._mask_as(x)

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        self.check_measurements(y)
        return y * self._mask_as(y)

    def exact_norm_squared(self) -> float | None:
        """1 (AᵀA is the 0/1 mask, a projection) unless the mask keeps nothing."""
        return 1.0 if bool(self.mask.any()) else None

    def A_dagger(self, y: torch.Tensor) -> torch.Tensor:
        return self.A_adjoint(y)

    def measurement_shape(self, batch: int, channels: int) -> tuple[int, ...]:
        return (batch, channels, *self.image_size)

    # --- description --------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        if self.explicit:
            return {**super().config(), "mask": "explicit"}
        return {**super().config(), "ratio": self.ratio, "seed": self.seed}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"mask": self._mask.clone()} if self.explicit else {}

    def with_image_size(self, image_size: tuple[int, ...]) -> "Inpainting":
        if not self.explicit:
            return super().with_image_size(image_size)
        if tuple(image_size) != self.image_size:
            raise IDMError(
                f"an explicit inpainting mask of size {self.image_size} cannot be used for images of size {tuple(image_size)}"
            )
        return Inpainting(self.image_size, mask=self._mask, noise_sigma=self.noise.sigma)
