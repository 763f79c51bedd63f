"""Synthetic test objects: the Shepp–Logan phantom and random-ellipse phantoms."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import IDMError
from .samples import square_resize


def shepp_logan(size: int = 256) -> torch.Tensor:
    """The (modified) Shepp–Logan phantom of scikit-image, ``(1, size, size)`` float32 in [0, 1]."""
    import skimage.data

    phantom = torch.from_numpy(np.asarray(skimage.data.shepp_logan_phantom(), dtype=np.float32))
    return square_resize(phantom[None], size)


def random_ellipses(size: int = 256, n: int = 10, seed: int = 0) -> torch.Tensor:
    """A random phantom ``(1, size, size)`` float32 in [0, 1]: ``n`` ellipses inside a body.

    A large ellipse of intensity 0.5–0.8 holds ``n`` smaller rotated ellipses that each add an
    intensity in [-0.3, 0.3]; the sum is clipped to [0, 1]. Deterministic given ``seed``.
    """
    if size < 1:
        raise IDMError(f"phantom size must be positive, got {size}")
    if n < 0:
        raise IDMError(f"number of ellipses must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    coords = (np.arange(size) + 0.5) / size * 2 - 1  # pixel centres in [-1, 1]
    yy, xx = np.meshgrid(coords, coords, indexing="ij")

    def ellipse(cy: float, cx: float, ry: float, rx: float, angle: float) -> np.ndarray:
        cos, sin = np.cos(angle), np.sin(angle)
        u = (xx - cx) * cos + (yy - cy) * sin
        v = -(xx - cx) * sin + (yy - cy) * cos
        return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0

    body = ellipse(0.0, 0.0, rng.uniform(0.75, 0.92), rng.uniform(0.6, 0.85), rng.uniform(-0.3, 0.3))
    image = body * rng.uniform(0.5, 0.8)
    for _ in range(n):
        radius = rng.uniform(0.05, 0.35, size=2)
        center = rng.uniform(-0.5, 0.5, size=2)
        inside = ellipse(center[0], center[1], radius[0], radius[1], rng.uniform(0, np.pi)) & body
        image = image + inside * rng.uniform(-0.3, 0.3)
    return torch.from_numpy(np.clip(image, 0.0, 1.0).astype(np.float32))[None]
