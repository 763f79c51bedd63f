"""Random training patches with the 8 flips/rotations (the dihedral group of the square)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import IDMError
from .images import ImageFolder, check_image


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th (0…7) element of the dihedral group applied to the last two axes of ``x``:
    a rotation by ``k % 4`` quarter turns, followed by a left-right flip when ``k >= 4``."""
    if not 0 <= k < 8:
        raise ValueError(f"dihedral transform index must be in 0..7, got {k}")
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if k >= 4 else x


class RandomPatches(Dataset):
    """Random ``patch_size`` crops of in-memory images, each with a random flip/rotation.

    ``dataset[i]`` is a ``(C, p, p)`` float32 tensor in [0, 1]; it depends only on ``(seed, i)``
    (not on the order of access, the worker or earlier calls), so training resumes exactly. Each
    item picks an image uniformly, a crop position uniformly and one of the 8 dihedral transforms.

    Args:
        images: ``(C, H, W)`` tensors (all with the same C) or an :class:`ImageFolder`, loaded
            into memory once; with ``depth``, volumes ``(D, H, W)`` of any D ≥ ``depth``.
        patch_size: side ``p`` of the square patches; every image must be at least ``p × p``.
        length: number of items (e.g. iterations × batch size of one epoch).
        seed: the random seed.
        depth: items are chunks ``(depth, p, p)`` of ``depth`` contiguous slices (a random first
            slice; one crop and one dihedral transform for all of them).
    """

    def __init__(
        self,
        images: Sequence[torch.Tensor] | ImageFolder,
        patch_size: int,
        length: int,
        seed: int = 0,
        depth: int | None = None,
    ) -> None:
        if patch_size < 1:
            raise IDMError(f"patch size must be positive, got {patch_size}")
        if length < 1:
            raise IDMError(f"number of patches must be positive, got {length}")
        if seed < 0:
            raise IDMError(f"seed must be a non-negative integer, got {seed}")
        if isinstance(images, ImageFolder):
            loaded = [image for _, image in images]
            names = [p.name for p in images.paths]
        else:
            loaded = [check_image(image, f"image {i}") for i, image in enumerate(images)]
            names = [f"image {i}" for i in range(len(loaded))]
        if not loaded:
            raise IDMError("no images to sample patches from")
        if depth is not None:
            short = [f"{name} ({image.shape[0]})" for name, image in zip(names, loaded) if image.shape[0] < depth]
            if depth < 1 or short:
                raise IDMError(f"chunks of {depth} slices need volumes that deep; too shallow: {', '.join(short)}")
        channels = {image.shape[0] for image in loaded}
        if depth is None and len(channels) != 1:
            raise IDMError(f"all images must have the same number of channels, got {sorted(channels)}")
        for name, image in zip(names, loaded):
            if min(image.shape[-2:]) < patch_size:
                raise IDMError(
                    f"{name} of size {tuple(image.shape[-2:])} is smaller than the patch size {patch_size}"
                )
        self.images = [image.detach().to("cpu", torch.float32).contiguous() for image in loaded]
        self.patch_size = int(patch_size)
        self.length = int(length)
        self.seed = int(seed)
        self.depth = None if depth is None else int(depth)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"patch index {index} out of range for {self.length} patches")
        rng = np.random.default_rng([self.seed, index])
        image = self.images[int(rng.integers(len(self.images)))]
        height, width = image.shape[-2:]
        top = int(rng.integers(height - self.patch_size + 1))
        left = int(rng.integers(width - self.patch_size + 1))
        if self.depth is not None:
            first = int(rng.integers(image.shape[0] - self.depth + 1))
            image = image[first : first + self.depth]
        patch = image[:, top : top + self.patch_size, left : left + self.patch_size]
        return dihedral(patch, int(rng.integers(8))).contiguous()
