"""Images in and out: reading/writing files, folders, training patches, sample images, phantoms.

Images are gray tensors ``(1, H, W)`` (batches ``(B, 1, H, W)``), float32 in [0, 1].
"""

from .images import IMAGE_SUFFIXES, ImageFolder, check_image, load_image, load_volume, load_volumes, save_image
from .patches import RandomPatches, dihedral
from .phantoms import random_ellipses, shepp_logan
from .samples import SAMPLE_NAMES, sample_images, square_resize

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageFolder",
    "RandomPatches",
    "SAMPLE_NAMES",
    "check_image",
    "dihedral",
    "load_image",
    "load_volume",
    "load_volumes",
    "random_ellipses",
    "sample_images",
    "save_image",
    "shepp_logan",
    "square_resize",
]
