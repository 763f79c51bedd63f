"""Reading, checking and writing grayscale images as tensors in [0, 1].

Colour images are reduced to their luminance, Y = 0.299 R + 0.587 G + 0.114 B (full-range BT.601,
the Y of OpenCV's ``COLOR_RGB2YCrCb`` used by the compressed-sensing literature). For integer
images Y is rounded to the source bit depth, as OpenCV does on uint8/uint16 data, so the result
is exactly the "Y channel of the 8-bit image" the published tables evaluate on.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import IDMError
from ..io.atomic import atomic_path

#: file suffixes read and written (case-insensitive)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
#: multi-channel training arrays (e.g. the four MRI contrasts of a scan): ``.npy`` ``(C, H, W)`` on [0, 1]
ARRAY_SUFFIX = ".npy"
_TIFF_SUFFIXES = (".tif", ".tiff")
_SAVE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP"}
_LUMA = np.array([0.299, 0.587, 0.114])


def _check_suffix(path: Path) -> None:
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise IDMError(
            f"unsupported image format {path.suffix or '(no suffix)'!r} for {path}; "
            f"supported: {', '.join(IMAGE_SUFFIXES)}"
        )


def _read_pillow(path: Path) -> np.ndarray:
    """Pixel array ``(H, W)`` or ``(H, W, C)`` of a png/jpg/bmp (and plain tif) file."""
    with Image.open(path) as image:
        image.load()
        mode = image.mode
        if mode == "1":
            image = image.convert("L")
        elif mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
            image = image.convert("RGBA" if "A" in mode or "transparency" in image.info else "RGB")
        elif mode == "I" and image.format == "PNG":  # older Pillow reads 16-bit PNG as mode "I"
            return np.asarray(image).astype(np.uint16)
        elif mode not in ("L", "LA", "RGB", "RGBA", "F") and not mode.startswith("I;16"):
            raise IDMError(f"unsupported pixel format {mode!r} in {path}")
        array = np.asarray(image)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("="))
    return array


def _read_tiff(path: Path) -> np.ndarray:
    """Pixel array of a TIFF (tifffile reads 16-bit colour and float data Pillow cannot)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        array = series.asarray()
        axes = series.axes
    if array.size == 0:
        raise IDMError(f"image {path} is empty (shape {array.shape})")
    # keep the spatial axes Y, X and the sample (colour) axis S; any other axis must have size 1
    for axis in reversed(range(array.ndim)):
        if axes[axis] not in "YXS":
            if array.shape[axis] != 1:
                raise IDMError(f"{path} holds a stack ({axes}, shape {array.shape}), not a single 2D image")
            array = array.take(0, axis=axis)
            axes = axes[:axis] + axes[axis + 1 :]
    if "S" in axes:
        array = np.moveaxis(array, axes.index("S"), -1)
    return array


def _luminance(array: np.ndarray, path: object) -> np.ndarray:
    """``(H, W)`` gray values in [0, 1] (float64) of an ``(H, W)`` or ``(H, W, C)`` pixel array."""
    if array.ndim == 3:
        channels = array.shape[-1]
        if channels in (1, 2):  # gray, gray + alpha
            array = array[..., 0]
        elif channels in (3, 4):  # RGB, RGBA
            luma = array[..., :3].astype(np.float64) @ _LUMA
            array = np.round(luma).astype(array.dtype) if array.dtype.kind in "ui" else luma
        else:
            raise IDMError(f"unsupported number of channels ({channels}) in {path}")
    elif array.ndim != 2:
        raise IDMError(f"unsupported image layout (shape {array.shape}) in {path}")
    if array.dtype == np.bool_:
        return array.astype(np.float64)
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float64) / 65535.0
    if array.dtype.kind == "f":
        values = array.astype(np.float64)
        if not np.isfinite(values).all():
            raise IDMError(f"image {path} contains NaN or infinite pixel values")
        if values.size and (values.min() < 0.0 or values.max() > 1.0):
            raise IDMError(
                f"floating-point image {path} has values in [{values.min():g}, {values.max():g}], "
                "expected [0, 1]"
            )
        return values
    raise IDMError(f"unsupported pixel type {array.dtype} in {path} (expected 8/16-bit integers or float)")


def load_image(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read an image file as a gray tensor of shape ``(1, H, W)``, float32 in [0, 1].

    png, jpg, tif/tiff and bmp are supported; colour images are reduced to their luminance Y
    (see the module docstring); 8-bit data is scaled by 1/255, 16-bit by 1/65535, floating-point
    TIFFs must already lie in [0, 1]. Raises :class:`IDMError` naming the file if it is missing,
    unreadable, of an unsupported format, empty, or holds NaN/inf pixels.
    """
    path = Path(path)
    _check_suffix(path)
    if not path.is_file():
        raise IDMError(f"image not found: {path}")
    readers = [_read_tiff, _read_pillow] if path.suffix.lower() in _TIFF_SUFFIXES else [_read_pillow]
    errors: list[str] = []
    for reader in readers:  # a TIFF tifffile cannot decode (e.g. a codec it lacks) may suit Pillow
        try:
            array = reader(path)
            break
        except IDMError:
            raise
        except Exception as error:  # decoders raise many types on corrupt files (OSError, ValueError, ...)
            errors.append(str(error).splitlines()[0] if str(error) else type(error).__name__)
    else:
        raise IDMError(f"cannot read image {path}: {errors[0]}")
    gray = _luminance(array, path)
    if gray.size == 0:
        raise IDMError(f"image {path} is empty (shape {gray.shape})")
    return torch.from_numpy(gray.astype(np.float32)).unsqueeze(0)


def check_image(x: torch.Tensor, name: str = "image", tolerance: float = 1e-3) -> torch.Tensor:
    """Validate an image ``(C, H, W)`` or batch ``(B, C, H, W)`` with values in [0, 1]; return it.

    Raises :class:`IDMError` for a non-tensor, a wrong number of dimensions, a non-floating dtype,
    NaN/inf values, or values outside ``[-tolerance, 1 + tolerance]``.
    """
    if not isinstance(x, torch.Tensor):
        raise IDMError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.ndim not in (3, 4):
        raise IDMError(f"{name} must have shape (C, H, W) or (B, C, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise IDMError(f"{name} must be a floating-point tensor in [0, 1], got dtype {x.dtype}")
    if x.numel() == 0:
        raise IDMError(f"{name} is empty (shape {tuple(x.shape)})")
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        kinds = "NaN" if bool(torch.isnan(x).any()) else "inf"
        if kinds == "NaN" and bool(torch.isinf(x).any()):
            kinds = "NaN and inf"
        raise IDMError(f"{name} contains {bad} {kinds} value(s)")
    low, high = float(x.min()), float(x.max())
    if low < -tolerance or high > 1.0 + tolerance:
        raise IDMError(f"{name} values must lie in [0, 1], got range [{low:.4g}, {high:.4g}]")
    return x


def save_image(path: str | os.PathLike[str], x: torch.Tensor) -> Path:
    """Write a gray image ``(H, W)``, ``(1, H, W)`` or ``(1, 1, H, W)`` in [0, 1] as an 8-bit file.

    Values are clipped to [0, 1] and rounded to 8 bits; the format follows the suffix (png, jpg
    at quality 95, tif, bmp). The file is written atomically.
    """
    path = Path(path)
    _check_suffix(path)
    if not isinstance(x, torch.Tensor):
        raise IDMError(f"image to save must be a tensor, got {type(x).__name__}")
    image = x.detach()
    while image.ndim > 2 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 2:
        raise IDMError(f"can only save one gray image (H, W) or (1, H, W), got shape {tuple(x.shape)}")
    if image.numel() == 0:
        raise IDMError(f"cannot save an empty image (shape {tuple(x.shape)}) to {path}")
    if not bool(torch.isfinite(image).all()):
        raise IDMError(f"image to save to {path} contains NaN or inf values")
    pixels = (image.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    file_format = _SAVE_FORMATS[path.suffix.lower()]
    options = {"quality": 95} if file_format == "JPEG" else {}
    with atomic_path(path) as temp:
        Image.fromarray(pixels, mode="L").save(temp, format=file_format, **options)
    return path


def read_npy(path: str | os.PathLike[str], what: str = "array") -> np.ndarray:
    """The array of a ``.npy`` file (never unpickled); :class:`IDMError` naming the file when it is
    missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise IDMError(f"{what} not found: {path}")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as error:
        raise IDMError(f"cannot read {path}: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None


def load_volume(path: str | os.PathLike[str], what: str = "volume") -> torch.Tensor:
    """A real 3-D volume on [0, 1] as float32 ``(1, D, H, W)`` from a ``(D, H, W)`` ``.npy`` array or a 3-D
    NIfTI file (:func:`idm.io.medical.read_volume` axis order); :class:`IDMError` naming it (``what``) and
    the file for anything else."""
    path = Path(path)
    if not path.is_file():
        raise IDMError(f"{what} not found: {path}")
    if path.suffix.lower() == ARRAY_SUFFIX:
        volume = torch.from_numpy(np.asarray(read_npy(path, what)))
    elif path.name.lower().endswith((".nii", ".nii.gz")):
        from ..io.medical import read_volume

        volume = read_volume(path).data
    else:
        raise IDMError(f"{what} {path}: a volume is read from .npy or .nii[.gz]")
    if volume.ndim != 3 or volume.is_complex():
        raise IDMError(f"{what} {path} is not a real 3-D volume (shape {tuple(volume.shape)})")
    return check_image(volume.float()[None], name=f"{what} {path}")


def load_volumes(source: str | os.PathLike[str]) -> tuple[list[str], torch.Tensor]:
    """The ``(D, H, W)`` ``.npy`` volumes of a folder (or one file), each read by :func:`load_volume`: names
    (stems) and ``(N, 1, D, H, W)`` float32 on [0, 1]; :class:`IDMError` when there are none or their
    shapes differ."""
    path = Path(source)
    if not path.exists():
        raise IDMError(f"volumes not found: {path}")
    files = sorted(path.glob("*" + ARRAY_SUFFIX)) if path.is_dir() else [path]
    if not files:
        raise IDMError(f"no .npy volumes in {path}")
    volumes = [load_volume(file) for file in files]
    shapes = {tuple(v.shape[1:]) for v in volumes}
    if len(shapes) != 1:
        raise IDMError(f"the volumes of {path} differ in shape: {sorted(shapes)}")
    return [f.stem for f in files], torch.stack(volumes)


def load_array(path: str | os.PathLike[str]) -> torch.Tensor:
    """A real ``.npy`` array ``(C, H, W)`` (or ``(H, W)``: one channel) on [0, 1] as float32 ``(C, H, W)``;
    :class:`IDMError` naming the file for anything else."""
    array = read_npy(path)
    if array.ndim not in (2, 3) or array.dtype.kind not in "fiu":
        raise IDMError(f"{path} holds {array.dtype} {array.shape}; a training array is real (C, H, W) or (H, W)")
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return check_image(x[None] if x.ndim == 2 else x, name=f"array {path}")


class ImageFolder:
    """The image files of a folder (non-recursive), sorted by name, read on access.

    ``folder[i]`` is ``(name, image)`` with ``name`` the file stem and ``image`` a ``(1, H, W)``
    tensor in [0, 1] (see :func:`load_image`); with :data:`ARRAY_SUFFIX` among ``suffixes``, ``.npy``
    files are read by :func:`load_array` as ``(C, H, W)``.
    """

    def __init__(self, root: str | os.PathLike[str], limit: int | None = None,
                 suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise IDMError(f"image folder not found: {self.root}")
        paths = sorted(
            (p for p in self.root.iterdir() if p.is_file() and p.suffix.lower() in suffixes),
            key=lambda p: p.name,
        )
        if limit is not None:
            if limit < 1:
                raise IDMError(f"image limit must be a positive number, got {limit}")
            paths = paths[:limit]
        if not paths:
            raise IDMError(f"no images ({', '.join(suffixes)}) in {self.root}")
        self.paths: list[Path] = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor]:
        path = self.paths[index]
        return path.stem, load_array(path) if path.suffix.lower() == ARRAY_SUFFIX else load_image(path)

    def __iter__(self):
        for index in range(len(self)):
            yield self[index]

    def __repr__(self) -> str:
        return f"ImageFolder({str(self.root)!r}, {len(self)} images)"
