"""Built-in sample images: gray versions of photographs bundled with scikit-image (no download)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import IDMError
from .images import _luminance

#: the scikit-image photographs used (all shipped inside the scikit-image package itself)
SAMPLE_NAMES = ("camera", "astronaut", "coffee", "chelsea", "rocket", "moon")


def square_resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """Center-crop ``(C, H, W)`` to a square and resize it to ``(C, size, size)`` (antialiased
    bicubic, clipped to [0, 1])."""
    if size < 1:
        raise IDMError(f"image size must be positive, got {size}")
    height, width = image.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = image[..., top : top + side, left : left + side]
    if side == size:
        return square.clone()
    resized = F.interpolate(square[None], size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return resized[0].clamp(0, 1)


def sample_images(size: int = 256) -> dict[str, torch.Tensor]:
    """The sample images, ``name -> (1, size, size)`` float32 in [0, 1], quantised to 8 bits.

    Photographs from ``skimage.data`` (camera, astronaut, coffee, chelsea, rocket, moon; all
    bundled with scikit-image, so no network is needed), reduced to their luminance Y like
    :func:`idm.data.load_image`, center-cropped to a square and resized. Deterministic.
    """
    import skimage.data

    images: dict[str, torch.Tensor] = {}
    for name in SAMPLE_NAMES:
        gray = _luminance(np.asarray(getattr(skimage.data, name)()), f"skimage.data.{name}")
        resized = square_resize(torch.from_numpy(gray.astype(np.float32))[None], size)
        images[name] = (resized * 255).round() / 255
    return images
