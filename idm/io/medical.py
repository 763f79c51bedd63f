"""Readers for real medical data: CT / MRI volumes, raw MRI k-space and raw CT projections.

Optional dependencies (``pip install 'idm[medical]'``): ``nibabel`` (NIfTI), ``pydicom`` (DICOM;
compressed transfer syntaxes need a decoder plug-in such as ``pylibjpeg`` + ``pylibjpeg-openjpeg``
for JPEG 2000), ``h5py`` (HDF5: fastMRI, DXchange/TomoPy, MATLAB v7.3) and ``scipy`` (MATLAB v5).
Each is imported only by the reader that needs it; a missing one is an :class:`~idm.errors.IDMError`
naming the ``pip install`` command.

Three readers, one per kind of data, so that MRI raw k-space is never read as an image:

* :func:`read_volume` — an image or volume (:class:`MedicalImage`: float32 ``(D, H, W)`` or
  ``(H, W)``, spacing in mm, modality, units): NIfTI, DICOM file or series folder, ``.npy`` /
  ``.npz``, MATLAB ``.mat`` (v5 and v7.3) and image datasets of HDF5 files (fastMRI
  ``reconstruction_rss``).
* :func:`read_kspace` — Cartesian k-space, complex64 ``(Nc, H, W)`` in the convention of
  :mod:`idm.physics.mri`: fastMRI HDF5 ``kspace``, MATLAB ``.mat``, ``.npy`` / ``.npz``.
* :func:`read_sinogram` — raw parallel-beam projections of a DXchange / TomoPy HDF5 file,
  dark/white-field corrected into a −log attenuation sinogram (:class:`Sinogram`).

CT numbers: DICOM CT pixels are rescaled to Hounsfield units (``RescaleSlope · stored +
RescaleIntercept``); every CT number ``idm`` states (PSNR, SSIM, ...) is computed on the
normalisation :func:`hu_window` with the window :data:`CT_WINDOW` = [−1000, 1000] HU mapped
linearly onto [0, 1] and clipped (air → 0, water → 0.5, dense bone and metal → 1).

Every failure (missing file, unknown extension, corrupt or truncated file, missing or ambiguous
key, missing optional dependency, wrong dimensionality, undecodable pixel data) raises
:class:`~idm.errors.IDMError` with a one-line message. Readers only read: they write nothing.
"""

from __future__ import annotations

import gzip
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import IDMError
from .atomic import atomic_write

__all__ = [
    "CT_WINDOW",
    "MedicalImage",
    "Sinogram",
    "hu_unwindow",
    "hu_window",
    "read_kspace",
    "read_sinogram",
    "read_volume",
]

#: the CT window [low, high] in HU that :func:`hu_window` maps onto [0, 1] by default
CT_WINDOW = (-1000.0, 1000.0)

#: smallest transmission kept by :func:`read_sinogram` (−log 1e-6 ≈ 13.8)
MIN_TRANSMISSION = 1e-6

#: pip package of each optional module
_PIP = {"nibabel": "nibabel", "pydicom": "pydicom", "h5py": "h5py", "scipy.io": "scipy"}

#: dataset / variable names that hold raw k-space (refused by read_volume, preferred by read_kspace)
_KSPACE_NAMES = ("kspace", "kData", "kdata", "k_space", "DATA")

#: fastMRI image datasets read_volume picks by default, in order
_IMAGE_NAMES = ("reconstruction_rss", "reconstruction_esc", "reconstruction")

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"


# --- results --------------------------------------------------------------------------------------
@dataclass
class MedicalImage:
    """An image or volume read by :func:`read_volume`.

    Attributes:
        data: float32 tensor ``(D, H, W)`` (a volume: D slices of H rows × W columns) or ``(H, W)``
            (one image); complex64 for complex-valued images (e.g. a complex MRI image in ``.npy``).
        spacing: voxel size in mm per axis of ``data`` (``(dz, dy, dx)`` or ``(dy, dx)``);
            ``None`` when the file does not store it (``.npy``, ``.mat``, HDF5).
        modality: DICOM modality (``"CT"``, ``"MR"``, ...) or the ``modality`` given to
            :func:`read_volume`; ``None`` when unknown.
        units: ``"HU"`` for CT in Hounsfield units; DICOM ``RescaleType`` otherwise; ``None``
            when unknown.
        meta: ``path``, ``format``, ``key`` (containers), ``affine`` (NIfTI and DICOM: 4 × 4 float64
            mapping the index ``(k, i, j, 1)`` of ``data`` to RAS+ mm; ``k = 0`` for a 2-D image), and
            format-specific entries (NIfTI: ``oriented``, False when the header's sform and qform
            codes are both 0 — no stored orientation, nibabel's fallback affine from the voxel sizes;
            DICOM: ``files`` in slice order, ``sorted_by``, ``slice_positions``, ``uniform_spacing``,
            ``series_uid``, ``transfer_syntax``).
    """

    data: torch.Tensor
    spacing: tuple[float, ...] | None = None
    modality: str | None = None
    units: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Sinogram:
    """A −log attenuation sinogram read by :func:`read_sinogram`.

    Attributes:
        data: float32 tensor ``(views, rows, detectors)``; row ``r`` as the input of
            :class:`idm.physics.ct.ParallelBeamCT` is ``data[:, r, :][None, None]`` (its sinogram is
            ``(B, C, n_views, D)``), with ``angles=angles.tolist()``.
        angles: float64 tensor ``(views,)``, degrees.
        meta: ``path``, ``dark_frames``, ``white_frames``, ``clipped`` (number of values whose
            transmission was clipped to ``min_transmission``), ``min_transmission``.
    """

    data: torch.Tensor
    angles: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)


# --- helpers ---------------------------------------------------------------------------------------
def _reason(error: BaseException) -> str:
    """The first non-empty line of an exception's message (or its type), for one-line errors."""
    for line in str(error).splitlines():
        line = line.strip()
        if line:
            text = f"{type(error).__name__}: {line}"
            return text if len(text) <= 300 else text[:297] + "..."
    return type(error).__name__


def _require(module: str, what: str, action: str = "reading"):
    """Import an optional dependency or raise an IDMError with the pip command."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = _PIP.get(module, module)
        raise IDMError(
            f"{action} {what} needs the optional package {package}: pip install {package} "
            f"(or pip install 'idm[medical]')"
        ) from None


def _existing(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise IDMError(f"file not found: {path}")
    return path


def _head(path: Path, size: int = 132) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(size)
    except OSError as error:
        raise IDMError(f"cannot read {path}: {_reason(error)}") from None


def _kind(path: Path) -> str:
    """The format of ``path``: dicom-series, nifti, npy, npz, mat, mat73, hdf5 or dicom."""
    if path.is_dir():
        return "dicom-series"
    name = path.name.lower()
    head = _head(path)
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith(".mat") or head.startswith(b"MATLAB"):
        return "mat73" if head.startswith(b"MATLAB 7.3") or head[:8] == _HDF5_MAGIC else "mat"
    if name.endswith(".npy"):
        return "npy"
    if name.endswith(".npz"):
        return "npz"
    if name.endswith((".h5", ".hdf5", ".hdf", ".he5")):
        return "hdf5"
    if name.endswith((".dcm", ".dicom", ".ima")) or head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(_HDF5_MAGIC):
        return "hdf5"
    if head.startswith(_NPY_MAGIC):
        return "npy"
    raise IDMError(
        f"unknown medical file format: {path} (supported: .nii, .nii.gz, DICOM file or series folder, "
        f".npy, .npz, .mat, .h5/.hdf5)"
    )


def _shape(shape: tuple[int, ...]) -> str:
    return "×".join(str(s) for s in shape) if shape else "scalar"


def _choose(path: Path, available: dict[str, tuple[int, ...]], candidates: list[str], key: str | None,
            what: str) -> str:
    """The key to read: ``key`` if present, else the only candidate; IDMError listing the keys."""
    listing = ", ".join(f"{k} ({_shape(s)})" for k, s in available.items()) or "none"
    if key is not None:
        if key not in available:
            raise IDMError(f"{path} has no {what} {key!r}; available: {listing}")
        return key
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise IDMError(f"{path} holds no {what}-like array; available: {listing}")
    raise IDMError(f"{path} holds several arrays, pass key= one of: {listing}")


def _is_kspace_name(key: str) -> bool:
    return key.split("/")[-1] in _KSPACE_NAMES


# --- MATLAB ------------------------------------------------------------------------------------------
_MATLAB_NUMERIC = {"double", "single", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64",
                   "uint64", "logical"}


def _mat_variables(path: Path, kind: str) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Numeric variables of a MAT file: name → (MATLAB shape, complex?)."""
    if kind == "mat73":
        h5py = _require("h5py", "MATLAB v7.3 files")
        try:
            with h5py.File(path, "r") as handle:
                found = {}
                for name, item in handle.items():
                    if name.startswith("#") or not isinstance(item, h5py.Dataset):
                        continue
                    matlab_class = item.attrs.get("MATLAB_class", b"")
                    matlab_class = matlab_class.decode() if isinstance(matlab_class, bytes) else str(matlab_class)
                    if matlab_class and matlab_class not in _MATLAB_NUMERIC or "MATLAB_empty" in item.attrs:
                        continue
                    names = item.dtype.names or ()
                    is_complex = "real" in names and "imag" in names
                    if not (is_complex or item.dtype.kind in "biuf"):
                        continue
                    found[name] = (tuple(reversed(item.shape)), is_complex)
                return found
        except IDMError:
            raise
        except Exception as error:
            raise IDMError(f"corrupt MATLAB v7.3 (HDF5) file {path}: {_reason(error)}") from None
    scipy_io = _require("scipy.io", "MATLAB files")
    try:
        listing = scipy_io.whosmat(str(path))
    except Exception as error:
        raise IDMError(f"corrupt MATLAB file {path}: {_reason(error)}") from None
    return {name: (tuple(shape), False) for name, shape, matlab_class in listing
            if matlab_class in _MATLAB_NUMERIC}


def _mat_array(path: Path, kind: str, key: str) -> np.ndarray:
    """One variable of a MAT file in MATLAB's axis order (v7.3 arrays are stored transposed)."""
    if kind == "mat73":
        h5py = _require("h5py", "MATLAB v7.3 files")
        try:
            with h5py.File(path, "r") as handle:
                raw = handle[key][()]
        except Exception as error:
            raise IDMError(f"corrupt MATLAB v7.3 (HDF5) file {path}: {_reason(error)}") from None
        if raw.dtype.names and "real" in raw.dtype.names and "imag" in raw.dtype.names:
            raw = raw["real"] + 1j * raw["imag"]
        return np.asarray(raw).transpose()  # HDF5 holds MATLAB's column-major array reversed
    scipy_io = _require("scipy.io", "MATLAB files")
    try:
        value = scipy_io.loadmat(str(path), variable_names=[key])[key]
    except Exception as error:
        raise IDMError(f"corrupt MATLAB file {path}: {_reason(error)}") from None
    return np.asarray(value)


# --- HDF5 ---------------------------------------------------------------------------------------------
def _hdf5_datasets(handle, h5py) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def visit(name: str, item) -> None:
        if isinstance(item, h5py.Dataset) and item.ndim >= 1 and (item.dtype.kind in "biufc" or item.dtype.names):
            found[name] = item

    handle.visititems(visit)
    return found


def _open_hdf5(path: Path, what: str):
    h5py = _require("h5py", what)
    try:
        return h5py, h5py.File(path, "r")
    except Exception as error:
        raise IDMError(f"corrupt HDF5 file {path}: {_reason(error)}") from None


def _complex_compound(array: np.ndarray) -> np.ndarray:
    names = array.dtype.names or ()
    if "real" in names and "imag" in names:
        return array["real"] + 1j * array["imag"]
    if "r" in names and "i" in names:
        return array["r"] + 1j * array["i"]
    return array


# --- NIfTI --------------------------------------------------------------------------------------------
def write_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray | None = None) -> None:
    """Write a 2-D or 3-D array (real or complex) as NIfTI-1 — ``.nii``, or gzip-compressed
    ``.nii.gz`` — atomically; the axes are stored reversed (an (H, W) image as x = column, y = row),
    so :func:`read_volume` gives the array back. ``affine``: the 4 × 4 voxel-to-RAS matrix in
    :func:`read_volume`'s index order (its ``meta["affine"]``: (k, i, j) = (z, y, x)), default the
    identity (1 mm voxels); a volume read by :func:`read_volume` and written with its affine reads back
    with the same array and affine."""
    nib = _require("nibabel", "NIfTI files", action="writing")
    matrix = np.eye(4)
    if affine is not None:
        affine = np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.isfinite(affine).all():
            raise IDMError(f"a NIfTI affine is a finite 4 x 4 matrix, got shape {affine.shape}")
        matrix = affine[:, [2, 1, 0, 3]]  # (k, i, j) = (z, y, x) → NIfTI's (x, y, z)
    data = nib.Nifti1Image(np.asarray(array).transpose(), matrix).to_bytes()
    if str(path).lower().endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    with atomic_write(path) as handle:
        handle.write(data)


def _read_nifti(path: Path) -> MedicalImage:
    nib = _require("nibabel", "NIfTI files")
    try:
        image = nib.load(str(path))
        oriented = bool(int(image.header["sform_code"]) or int(image.header["qform_code"]))
        if len(image.shape) > 3:
            if any(s != 1 for s in image.shape[3:]):
                raise IDMError(f"{path} is a {len(image.shape)}-D NIfTI image of shape "
                               f"{_shape(image.shape)}; read_volume reads 2-D and 3-D images")
            image = image.slicer[(slice(None),) * 3 + (0,) * (len(image.shape) - 3)]
        original = "".join(nib.aff2axcodes(image.affine)) if len(image.shape) == 3 else None
        if len(image.shape) == 3:
            image = nib.as_closest_canonical(image)
        if np.issubdtype(image.get_data_dtype(), np.complexfloating):
            array = np.asarray(image.dataobj).astype(np.complex64)
        else:
            array = np.asarray(image.get_fdata(dtype=np.float32))
        zooms = tuple(float(z) for z in image.header.get_zooms()[: array.ndim])
    except IDMError:
        raise
    except Exception as error:
        raise IDMError(f"corrupt NIfTI file {path}: {_reason(error)}") from None
    if array.ndim not in (2, 3):
        raise IDMError(f"{path} is a {array.ndim}-D NIfTI image; read_volume reads 2-D and 3-D images")
    affine = np.asarray(image.affine, dtype=np.float64)
    meta = {"format": "nifti", "affine": affine[:, [2, 1, 0, 3]],  # index (k, i, j) = (z, y, x)
            "orientation": "RAS+" if array.ndim == 3 else None, "original_orientation": original,
            "oriented": oriented}
    data = np.ascontiguousarray(array.transpose())  # (x, y, z) → (z, y, x)
    return MedicalImage(torch.from_numpy(data), tuple(reversed(zooms)), None, None, meta)


# --- DICOM --------------------------------------------------------------------------------------------
#: transfer syntax UID prefix → pip command of a decoder plug-in
_DICOM_PLUGINS = {
    "1.2.840.10008.1.2.4.9": "pip install pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000 (.90 ... .93)
    "1.2.840.10008.1.2.4.20": "pip install pylibjpeg pylibjpeg-openjpeg",  # HTJ2K (.201 ... .203)
    "1.2.840.10008.1.2.4.8": "pip install pylibjpeg pylibjpeg-libjpeg",  # JPEG-LS (.80, .81)
    "1.2.840.10008.1.2.4.5": "pip install pylibjpeg pylibjpeg-libjpeg",  # JPEG baseline / extended
    "1.2.840.10008.1.2.4.7": "pip install pylibjpeg pylibjpeg-libjpeg",  # JPEG lossless
    "1.2.840.10008.1.2.5": "pip install pylibjpeg pylibjpeg-rle",  # RLE
}


def _decoder_hint(uid: str) -> str:
    for prefix, command in _DICOM_PLUGINS.items():
        if uid.startswith(prefix):
            return command
    return "pip install pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg"


def _dicom_decoder_available(uid: str) -> bool:
    """Whether pydicom has a working decoder for the transfer syntax ``uid``."""
    try:
        from pydicom.pixels import get_decoder
    except ImportError:  # pydicom < 3: found out when decoding
        return True
    try:
        return bool(get_decoder(uid).is_available)
    except Exception:  # no decoder registered for this UID at all
        return False


def _dicom_read(path: Path, pydicom, force: bool):
    try:
        ds = pydicom.dcmread(str(path), force=force)
    except Exception as error:
        raise IDMError(f"corrupt DICOM file {path}: {_reason(error)}") from None
    return ds


def _dicom_pixels(path: Path, ds) -> np.ndarray:
    """Stored values → rescaled values (float64) of one DICOM file, ``(H, W)`` or ``(frames, H, W)``."""
    uid = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    if uid and not _dicom_decoder_available(uid):
        name = getattr(getattr(ds.file_meta, "TransferSyntaxUID", None), "name", uid)
        raise IDMError(f"no decoder for the DICOM transfer syntax {name} ({uid}) of {path}: {_decoder_hint(uid)}")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise IDMError(f"{path} is a colour DICOM image ({ds.get('PhotometricInterpretation')}); "
                       f"read_volume reads grayscale CT / MR images")
    try:
        stored = ds.pixel_array
    except Exception as error:
        text = _reason(error)
        if uid and ("plugin" in text.lower() or "handler" in text.lower() or "decod" in text.lower()):
            raise IDMError(f"cannot decode the DICOM pixel data of {path} ({uid}): {_decoder_hint(uid)}") from None
        raise IDMError(f"corrupt DICOM pixel data in {path}: {text}") from None
    values = np.asarray(stored, dtype=np.float64)
    try:
        from pydicom.pixels import apply_rescale
    except ImportError:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        return values * slope + intercept
    return np.asarray(apply_rescale(values, ds), dtype=np.float64)


def _dicom_units(ds) -> tuple[str | None, str | None]:
    modality = str(ds.get("Modality", "") or "") or None
    rescale_type = str(ds.get("RescaleType", "") or "") or None
    if modality == "CT" and rescale_type in (None, "HU"):
        return modality, "HU"  # the CT modality LUT output is HU (DICOM PS3.3 C.11.1.1.2)
    return modality, rescale_type


def _dicom_geometry(ds) -> tuple[np.ndarray | None, np.ndarray | None, tuple[float, float] | None]:
    """(row direction, column direction) cosines in LPS and (row spacing, column spacing) mm."""
    try:
        orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
        row_dir, col_dir = orientation[:3], orientation[3:6]
    except Exception:
        row_dir = col_dir = None
    try:
        spacing = (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1]))
    except Exception:
        spacing = None
    return row_dir, col_dir, spacing


def _ras_affine(origin, slice_step, row_dir, col_dir, pixel_spacing) -> np.ndarray:
    """4 × 4 affine (k, i, j) → RAS mm from DICOM LPS geometry."""
    affine = np.eye(4)
    affine[:3, 0] = slice_step
    affine[:3, 1] = col_dir * pixel_spacing[0]  # i: down the rows, along the column direction
    affine[:3, 2] = row_dir * pixel_spacing[1]  # j: along a row
    affine[:3, 3] = origin
    affine[:2, :] *= -1  # LPS → RAS
    return affine


def _read_dicom_file(path: Path, force: bool) -> MedicalImage:
    pydicom = _require("pydicom", "DICOM files")
    ds = _dicom_read(path, pydicom, force)
    if "PixelData" not in ds:
        what = "an image without pixel data (truncated?)" if _dicom_is_image(ds) else "not a DICOM image (no pixel data)"
        raise IDMError(f"corrupt DICOM file {path}: {what}")
    data = _dicom_pixels(path, ds)
    if data.ndim not in (2, 3):
        raise IDMError(f"{path} holds DICOM pixel data of shape {_shape(data.shape)}; expected 2-D or multi-frame")
    modality, units = _dicom_units(ds)
    row_dir, col_dir, pixel = _dicom_geometry(ds)
    spacing: tuple[float, ...] | None = pixel
    if data.ndim == 3 and pixel is not None:
        between = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")
        spacing = (float(between), *pixel) if between else None
    meta: dict[str, Any] = {"format": "dicom", "transfer_syntax": str(ds.file_meta.TransferSyntaxUID)
                            if "TransferSyntaxUID" in getattr(ds, "file_meta", {}) else None,
                            "series_uid": str(ds.get("SeriesInstanceUID", "") or "")}
    if row_dir is not None and pixel is not None and "ImagePositionPatient" in ds:
        origin = np.asarray([float(v) for v in ds.ImagePositionPatient])
        thickness = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0
        step = np.cross(row_dir, col_dir) * (spacing[0] if data.ndim == 3 and spacing else float(thickness))
        affine = _ras_affine(origin, step, row_dir, col_dir, pixel)
        meta["affine"] = affine  # a 2-D image is slice k = 0
    return MedicalImage(torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)), spacing, modality, units, meta)


def _series_listing(series: dict[str, list]) -> str:
    return ", ".join(f"{uid or '(no UID)'} ({len(v)} file{'s' if len(v) != 1 else ''})" for uid, v in series.items())


def _sop_class(ds):
    return ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)


def _dicom_is_image(ds) -> bool:
    """Whether a dataset is (or claims to be) an image: an image storage SOP class or image attributes."""
    name = getattr(_sop_class(ds), "name", "") or ""
    return "Image Storage" in name or any(k in ds for k in ("Rows", "Columns", "PhotometricInterpretation"))


def _read_dicom_series(folder: Path, key: str | None) -> MedicalImage:
    pydicom = _require("pydicom", "DICOM series")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    slices = []
    for file in files:
        is_dicom = _head(file)[128:132] == b"DICM" or file.name.lower().endswith((".dcm", ".dicom", ".ima"))
        if not is_dicom:
            continue  # README, thumbnails, ... next to the series
        ds = _dicom_read(file, pydicom, force=True)
        if "PixelData" in ds:
            slices.append((file, ds))
        elif _dicom_is_image(ds):  # pydicom stops quietly at the end of a truncated file
            raise IDMError(f"corrupt DICOM file {file}: an image without pixel data (truncated?)")
        elif not _sop_class(ds):
            raise IDMError(f"corrupt DICOM file {file}: no SOP class and no pixel data (not DICOM?)")
        # else: DICOMDIR, structured reports, ... carry no image
    if not slices:
        raise IDMError(f"no DICOM images in the folder {folder}")
    series: dict[str, list] = {}
    for file, ds in slices:
        series.setdefault(str(ds.get("SeriesInstanceUID", "") or ""), []).append((file, ds))
    if key is not None:
        if key not in series:
            raise IDMError(f"{folder} has no DICOM series {key!r}; available: "
                           + _series_listing(series))
        slices = series[key]
    elif len(series) > 1:
        raise IDMError(f"{folder} holds {len(series)} DICOM series, pass key= one SeriesInstanceUID: "
                       + _series_listing(series))

    first = slices[0][1]
    row_dir, col_dir, pixel = _dicom_geometry(first)
    positions = None
    try:
        ipp = np.asarray([[float(v) for v in ds.ImagePositionPatient] for _, ds in slices], dtype=np.float64)
        if row_dir is None or ipp.shape != (len(slices), 3):
            raise ValueError("no usable positions")
        positions = ipp @ np.cross(row_dir, col_dir)
    except (AttributeError, TypeError, ValueError):
        positions = None
    if positions is not None:
        order = np.argsort(positions, kind="stable")
        sorted_by = "ImagePositionPatient"
        if len(np.unique(np.round(positions, 4))) != len(positions):
            raise IDMError(f"{folder}: several DICOM images share a slice position (more than one series "
                           f"or repeated acquisitions); pass a folder with one series")
    elif all(str(ds.get("InstanceNumber", "")).strip().lstrip("-").isdigit() for _, ds in slices):
        order = np.argsort([int(ds.InstanceNumber) for _, ds in slices], kind="stable")
        sorted_by = "InstanceNumber"
    else:
        order = np.arange(len(slices))
        sorted_by = "file name"
    slices = [slices[i] for i in order]

    images = []
    for file, ds in slices:
        image = _dicom_pixels(file, ds)
        if image.ndim != 2:
            raise IDMError(f"{file} is a multi-frame DICOM image; read it on its own, not in a series folder")
        if images and image.shape != images[0].shape:
            raise IDMError(f"{folder}: DICOM images of different sizes ({_shape(images[0].shape)} and "
                           f"{_shape(image.shape)} in {file.name})")
        images.append(image)
    data = np.stack(images).astype(np.float32)
    modality, units = _dicom_units(first)

    meta: dict[str, Any] = {"format": "dicom-series", "files": [f.name for f, _ in slices], "sorted_by": sorted_by,
                            "series_uid": str(first.get("SeriesInstanceUID", "") or ""),
                            "transfer_syntax": str(first.file_meta.TransferSyntaxUID)
                            if "TransferSyntaxUID" in getattr(first, "file_meta", {}) else None}
    slice_spacing = None
    if positions is not None:
        positions = positions[order]
        meta["slice_positions"] = positions.tolist()
        if len(positions) > 1:
            gaps = np.diff(positions)
            slice_spacing = float(np.median(gaps))
            meta["uniform_spacing"] = bool(np.allclose(gaps, slice_spacing, rtol=1e-2, atol=1e-3))
    if slice_spacing is None:
        value = first.get("SpacingBetweenSlices") or first.get("SliceThickness")
        slice_spacing = float(value) if value else None
    spacing = (slice_spacing, *pixel) if slice_spacing is not None and pixel is not None else None
    if positions is not None and pixel is not None and slice_spacing is not None:
        origin = np.asarray([float(v) for v in slices[0][1].ImagePositionPatient])
        meta["affine"] = _ras_affine(origin, np.cross(row_dir, col_dir) * slice_spacing, row_dir, col_dir, pixel)
    return MedicalImage(torch.from_numpy(data), spacing, modality, units, meta)


# --- numpy / containers ----------------------------------------------------------------------------
def _load_numpy(path: Path, kind: str, key: str | None, kspace: bool) -> tuple[np.ndarray, str | None]:
    what = "k-space" if kspace else "image"
    try:
        if kind == "npy":
            return np.load(path, allow_pickle=False), None
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except Exception as error:
        raise IDMError(f"corrupt NumPy file {path}: {_reason(error)}") from None
    available = {name: a.shape for name, a in arrays.items()}
    candidates = [n for n, a in arrays.items() if a.ndim >= 2 and a.dtype.kind in "biufc"
                  and (np.iscomplexobj(a) if kspace else not _is_kspace_name(n))]
    chosen = _choose(path, available, candidates, key, what)
    return arrays[chosen], chosen


def _as_volume(path: Path, array: np.ndarray, key: str | None, matlab: bool) -> torch.Tensor:
    array = np.asarray(array)
    if array.dtype.kind not in "biufc":
        raise IDMError(f"{path}{f' [{key}]' if key else ''} holds {array.dtype} data, not a numeric image")
    while array.ndim > 3 and array.shape[0] == 1 and not matlab:
        array = array[0]
    while array.ndim > 3 and array.shape[-1] == 1 and matlab:
        array = array[..., 0]
    if array.ndim not in (2, 3):
        raise IDMError(f"{path}{f' [{key}]' if key else ''} holds an array of shape {_shape(array.shape)}; "
                       f"read_volume reads 2-D (H, W) and 3-D images")
    if matlab and array.ndim == 3:
        array = np.moveaxis(array, -1, 0)  # MATLAB (rows, cols, slices) → (slices, rows, cols)
    dtype = np.complex64 if np.iscomplexobj(array) else np.float32
    return torch.from_numpy(np.ascontiguousarray(array, dtype=dtype))


# --- public readers ---------------------------------------------------------------------------------
def read_volume(path: str | Path, key: str | None = None, modality: str | None = None) -> MedicalImage:
    """Read an image or volume as float32 ``(D, H, W)`` (slices × rows × columns) or ``(H, W)``.

    Formats and axis order:

    * **NIfTI** ``.nii`` / ``.nii.gz`` (nibabel): 3-D images are reoriented to the closest canonical
      RAS+ orientation (``nibabel.as_closest_canonical``: array axes x, y, z increase towards the
      patient's Right, Anterior, Superior) and returned as ``(D, H, W) = (z, y, x)``: slice 0 is the
      most inferior, row 0 the most posterior, column 0 the patient's left. (For the radiological
      display of an axial slice, anterior up and the patient's right on the left, show
      ``data[k].flip(0, 1)``.) 2-D images ``(x, y)`` are returned as ``(y, x)``; trailing singleton
      axes of 4-D files are dropped. Scaling (``scl_slope``/``scl_inter``) is applied. NIfTI does not
      say which modality it holds: pass ``modality="CT"`` for a CT volume in HU (``units="HU"``).
    * **DICOM** file (``.dcm`` / ``.dicom`` / ``.ima``, or any file with the ``DICM`` preamble), or a
      **folder** holding one series (pydicom): the slices are sorted by their position along the
      slice normal (``ImagePositionPatient`` · (row × column direction), inferior → superior for an
      axial series), else by ``InstanceNumber``; rows and columns as stored (for the usual axial
      orientation row 0 is anterior and column 0 the patient's right, the radiological view).
      Stored values are rescaled, ``RescaleSlope · stored + RescaleIntercept``; for CT the result
      is in Hounsfield units (``units="HU"``; padding outside the scan circle, e.g. −3024 HU, is kept:
      :func:`hu_window` clips it). Compressed transfer syntaxes need a decoder plug-in (JPEG 2000:
      ``pip install pylibjpeg pylibjpeg-openjpeg``). ``key`` picks a ``SeriesInstanceUID`` in a
      folder holding several series. Spacing: the median gap between slice positions and
      ``PixelSpacing``.
    * **NumPy** ``.npy`` (as stored: 3-D is ``(D, H, W)``; leading singleton axes of 4-D+ arrays are
      dropped) and ``.npz`` (``key`` names the array).
    * **MATLAB** ``.mat`` v5 (``scipy.io.loadmat``) and v7.3 (HDF5, h5py; MATLAB writes the array
      transposed, the reader undoes it so shapes are those MATLAB shows). MATLAB's 3-D arrays
      ``(rows, cols, slices)`` are returned as ``(slices, rows, cols)``. ``key`` names the variable.
    * **HDF5** ``.h5`` / ``.hdf5`` (h5py), arrays as stored: ``key`` names the dataset; by default the
      fastMRI ``reconstruction_rss`` (``reconstruction_esc``) image, or the only image-like dataset.

    Complex-valued images (e.g. a complex MRI image in ``.npy``) come back as complex64. Raw k-space
    (a dataset or variable named ``kspace``, ``kData``, ``DATA``, ...) is refused: read it with
    :func:`read_kspace`.

    Args:
        path: file or DICOM series folder.
        key: the array of a container holding several (``.npz``, ``.mat``, HDF5) or the DICOM series
            UID; without it the reader takes the only candidate and otherwise lists the keys in
            its error.
        modality: declare the modality of a file that does not store it (``"CT"`` → ``units="HU"``);
            for DICOM the header's value is used and this argument only fills a missing one.

    Raises:
        IDMError: missing file, unknown format, corrupt file, missing or ambiguous key, missing
            optional dependency (with the pip command), undecodable DICOM, wrong dimensionality.
    """
    path = _existing(path)
    kind = _kind(path)
    if kind == "nifti":
        image = _read_nifti(path)
    elif kind == "dicom-series":
        image = _read_dicom_series(path, key)
    elif kind == "dicom":
        image = _read_dicom_file(path, force=path.name.lower().endswith((".dcm", ".dicom", ".ima")))
    elif kind in ("npy", "npz"):
        array, chosen = _load_numpy(path, kind, key, kspace=False)
        if chosen is not None and _is_kspace_name(chosen):
            raise IDMError(f"{path} [{chosen}] holds raw k-space; read it with read_kspace")
        image = MedicalImage(_as_volume(path, array, chosen, matlab=False), meta={"format": kind, "key": chosen})
    elif kind in ("mat", "mat73"):
        variables = _mat_variables(path, kind)
        available = {name: shape for name, (shape, _) in variables.items()}
        candidates = [n for n, (s, _) in variables.items() if len(s) >= 2 and not _is_kspace_name(n)]
        chosen = _choose(path, available, candidates, key, "image")
        if _is_kspace_name(chosen):
            raise IDMError(f"{path} [{chosen}] holds raw k-space; read it with read_kspace")
        array = _mat_array(path, kind, chosen)
        image = MedicalImage(_as_volume(path, array, chosen, matlab=True), meta={"format": kind, "key": chosen})
    else:  # hdf5
        h5py, handle = _open_hdf5(path, "HDF5 files")
        try:
            with handle:
                datasets = _hdf5_datasets(handle, h5py)
                available = {name: tuple(d.shape) for name, d in datasets.items()}
                if key is None and "exchange/data" in datasets:
                    raise IDMError(f"{path} holds raw DXchange projections (exchange/data); read them with "
                                   f"read_sinogram")
                preferred = [n for n in _IMAGE_NAMES if n in datasets]
                candidates = preferred[:1] or [n for n, d in datasets.items() if d.ndim >= 2 and not _is_kspace_name(n)]
                chosen = _choose(path, available, candidates, key, "image")
                if _is_kspace_name(chosen):
                    raise IDMError(f"{path} [{chosen}] holds raw k-space; read it with read_kspace")
                array = _complex_compound(datasets[chosen][()])
        except IDMError:
            raise
        except Exception as error:
            raise IDMError(f"corrupt HDF5 file {path}: {_reason(error)}") from None
        image = MedicalImage(_as_volume(path, array, chosen, matlab=False), meta={"format": "hdf5", "key": chosen})
    if modality is not None and image.modality is None:
        image.modality = str(modality)
        if image.modality.upper() == "CT" and image.units is None:
            image.units = "HU"
    image.meta["path"] = str(path)
    return image


def read_kspace(path: str | Path, key: str | None = None, slice: int | None = None,
                shift: bool = False) -> torch.Tensor:
    """Read Cartesian MRI k-space as complex64 ``(Nc, H, W)`` (single-coil: ``Nc = 1``).

    The convention is that of :mod:`idm.physics.mri`: k-space is the centred orthonormal DFT of the
    image, its centre (DC) at index ``(H // 2, W // 2)``; ``idm.physics.mri.ifft2c(k)`` is the
    coil images ``(Nc, H, W)`` and ``k[None]`` a measurement ``y`` of shape ``(B, Nc, H, W)``.
    Values are the file's, unscaled.

    Formats and axis order:

    * **HDF5** (fastMRI; h5py): dataset ``kspace`` (or ``key``), ``(slices, coils, H, W)`` for
      multi-coil files, ``(slices, H, W)`` for single-coil ones, ``(H, W)``; ``slice`` picks one
      slice (required when the file holds several; only that slice is read). fastMRI stores centred
      k-space (its ``ifft2c`` is ``idm``'s).
    * **MATLAB** ``.mat`` v5 / v7.3: ``(H, W)`` or MATLAB's ``(H, W, coils)``, returned
      ``(coils, H, W)``; e.g. ESPIRiT ``brain_alias_8ch.mat`` ``DATA`` (320, 256, 8) → (8, 320, 256),
      LORAKS ``T2_single_channel.mat`` ``kData`` (256, 340) → (1, 256, 340). Without ``key`` the
      reader takes the only complex variable, or the one named ``kspace`` / ``kData`` / ``DATA``.
    * **NumPy** ``.npy`` / ``.npz``: ``(H, W)``, ``(Nc, H, W)`` or ``(slices, Nc, H, W)`` (with ``slice``).

    Centring: the reader does **not** shift. The LORAKS and ESPIRiT example files store centred
    k-space: the energy peak of ``T2_single_channel.mat`` lies at (127, 169) of 256 × 340, that of
    ``brain_alias_8ch.mat`` (summed over coils) at (160, 127) of 320 × 256, within one sample of
    ``(H // 2, W // 2)``, and ``ifft2c`` of either gives the head in the middle of the field of view
    (plain ``ifft2`` would split it across the corners). For a file storing k-space with DC at
    ``(0, 0)`` (uncentred, ``numpy.fft.fft2`` order) pass ``shift=True``: the reader then applies
    ``fftshift`` over (H, W).

    Real-valued arrays are refused (k-space is complex; images are read with :func:`read_volume`).

    Raises:
        IDMError: missing file, unknown format, corrupt file, missing / ambiguous key, missing
            optional dependency, real-valued data, wrong dimensionality, missing or out-of-range slice.
    """
    path = _existing(path)
    kind = _kind(path)
    if kind in ("nifti", "dicom", "dicom-series"):
        raise IDMError(f"{path} is an image file ({kind}), not k-space; read it with read_volume")
    chosen: str | None = None
    if kind in ("npy", "npz"):
        array, chosen = _load_numpy(path, kind, key, kspace=True)
        array = _pick_slice(path, np.asarray(array), slice)
    elif kind in ("mat", "mat73"):
        variables = _mat_variables(path, kind)
        available = {name: shape for name, (shape, _) in variables.items()}
        named = [n for n in _KSPACE_NAMES if n in available and len(available[n]) >= 2]
        candidates = named[:1]
        if key is None and not candidates:  # the only complex variable
            if kind == "mat73":
                candidates = [n for n, (s, c) in variables.items() if len(s) >= 2 and c]
            else:  # whosmat does not say which variables are complex
                candidates = [n for n, s in available.items() if len(s) >= 2
                              and np.iscomplexobj(_mat_array(path, kind, n))]
        chosen = _choose(path, available, candidates, key, "k-space")
        array = _mat_array(path, kind, chosen)
        if array.ndim == 3:
            array = np.moveaxis(array, -1, 0)  # MATLAB (H, W, coils) → (coils, H, W)
        elif array.ndim != 2:
            raise IDMError(f"{path} [{chosen}] holds an array of shape {_shape(array.shape)}; MATLAB k-space "
                           f"must be (H, W) or (H, W, coils)")
        if slice is not None:
            raise IDMError(f"{path} [{chosen}] holds one slice of k-space; slice= applies to HDF5 / NumPy files")
    elif kind == "hdf5":
        h5py, handle = _open_hdf5(path, "HDF5 k-space files")
        try:
            with handle:
                datasets = _hdf5_datasets(handle, h5py)
                available = {name: tuple(d.shape) for name, d in datasets.items()}
                named = [n for n in datasets if _is_kspace_name(n)]
                candidates = named[:1] or [n for n, d in datasets.items()
                                           if d.ndim >= 2 and (d.dtype.kind == "c" or d.dtype.names)]
                chosen = _choose(path, available, candidates, key, "k-space")
                dataset = datasets[chosen]
                if dataset.ndim in (3, 4):
                    index = _slice_index(path, dataset.shape[0], slice, chosen)
                    array = dataset[index]
                    if dataset.ndim == 3:
                        array = array[None]  # fastMRI single-coil (slices, H, W)
                elif dataset.ndim == 2:
                    if slice not in (None, 0):
                        raise IDMError(f"{path} [{chosen}] holds one slice of k-space; got slice={slice}")
                    array = dataset[()][None]
                else:
                    raise IDMError(f"{path} [{chosen}] holds an array of shape {_shape(dataset.shape)}; "
                                   f"expected (slices, coils, H, W), (slices, H, W) or (H, W)")
                array = _complex_compound(np.asarray(array))
        except IDMError:
            raise
        except Exception as error:
            raise IDMError(f"corrupt HDF5 file {path}: {_reason(error)}") from None
    else:  # pragma: no cover - _kind returns only the kinds above
        raise IDMError(f"unsupported k-space file: {path}")

    where = f"{path}{f' [{chosen}]' if chosen else ''}"
    if array.dtype.kind not in "biufc":
        raise IDMError(f"{where} holds {array.dtype} data, not k-space")
    if not np.iscomplexobj(array):
        raise IDMError(f"{where} holds a real array, but k-space is complex (read images with read_volume)")
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise IDMError(f"{where} holds k-space of shape {_shape(array.shape)}; expected (Nc, H, W) or (H, W)")
    kspace = torch.from_numpy(np.ascontiguousarray(array, dtype=np.complex64))
    if shift:
        kspace = torch.fft.fftshift(kspace, dim=(-2, -1))
    return kspace


def _slice_index(path: Path, count: int, slice: int | None, key: str | None) -> int:
    where = f"{path}{f' [{key}]' if key else ''}"
    if slice is None:
        if count == 1:
            return 0
        raise IDMError(f"{where} holds {count} slices of k-space: pass slice= (0 … {count - 1})")
    if isinstance(slice, bool) or not isinstance(slice, (int, np.integer)):
        raise IDMError(f"slice must be an integer, got {slice!r}")
    if not -count <= int(slice) < count:
        raise IDMError(f"slice {slice} is out of range: {where} holds {count} slices (0 … {count - 1})")
    return int(slice) % count


def _pick_slice(path: Path, array: np.ndarray, slice: int | None) -> np.ndarray:
    """One slice of NumPy k-space ``(slices, Nc, H, W)``; other shapes pass through."""
    if array.ndim == 4:
        return array[_slice_index(path, array.shape[0], slice, None)]
    if slice is not None:
        raise IDMError(f"{path} holds k-space of shape {_shape(array.shape)} (one slice); slice= needs "
                       f"(slices, Nc, H, W)")
    return array


def single_slice(data: torch.Tensor, path: str | Path, what: str = "image") -> torch.Tensor:
    """``data`` ``(H, W)`` or ``(1, H, W)`` (a volume of one slice) as ``(H, W)``; :class:`IDMError` otherwise."""
    if data.ndim == 3 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 2:
        raise IDMError(f"{what} {path} must be one 2-D slice, it holds shape {tuple(data.shape)}")
    return data


def read_sinogram(path: str | Path, rows: int | slice | None = None,
                  min_transmission: float = MIN_TRANSMISSION) -> Sinogram:
    """Read raw parallel-beam projections (DXchange / TomoPy HDF5) as a −log attenuation sinogram.

    The file holds ``exchange/data`` (views, rows, detectors) raw counts I, ``exchange/data_white``
    (flat fields W) and ``exchange/data_dark`` (dark fields D, optional: 0 when absent), each
    averaged over its frames (as ``tomopy.normalize``), and ``exchange/theta`` (view angles; degrees
    unless its ``units`` attribute says radians). The flat/dark-field correction is

        t = (I − D) / (W − D),     p = −log(max(t, min_transmission))

    computed in float64: non-positive transmissions (I ≤ D, or a dead pixel with W ≤ D) are
    clipped to ``min_transmission`` (default 1e-6, p ≤ 13.8) and counted in ``meta["clipped"]``;
    t > 1 (noise in the open beam) is kept, giving slightly negative p.

    Args:
        path: the HDF5 file.
        rows: detector rows to read (an int or a slice; default all). Only those rows are read.
        min_transmission: the clip value of t.

    Returns:
        :class:`Sinogram`: ``data`` float32 (views, rows, detectors), ``angles`` float64 degrees.

    Raises:
        IDMError: missing file, not HDF5, corrupt file, missing ``exchange/data`` / ``data_white`` /
            ``theta``, mismatched shapes, missing h5py.
    """
    path = _existing(path)
    if path.is_dir():
        raise IDMError(f"{path} is a folder; read_sinogram reads a DXchange HDF5 file")
    if not (0.0 < float(min_transmission) < 1.0):
        raise IDMError(f"min_transmission must lie in (0, 1), got {min_transmission!r}")
    if not _head(path, 8).startswith(_HDF5_MAGIC) and not path.name.lower().endswith((".h5", ".hdf5", ".hdf", ".cxi")):
        raise IDMError(f"unknown sinogram file format: {path} (read_sinogram reads DXchange HDF5 files)")
    h5py, handle = _open_hdf5(path, "DXchange HDF5 files")
    try:
        with handle:
            for name in ("exchange/data", "exchange/data_white", "exchange/theta"):
                if name not in handle:
                    raise IDMError(f"{path} has no {name} (a DXchange / TomoPy file holds exchange/data, "
                                   f"data_white, data_dark and theta)")
            data = handle["exchange/data"]
            if data.ndim != 3:
                raise IDMError(f"{path} exchange/data has shape {_shape(data.shape)}; expected (views, rows, detectors)")
            select = (slice(None), rows if rows is not None else slice(None), slice(None))
            if isinstance(rows, (int, np.integer)) and not isinstance(rows, bool):
                if not -data.shape[1] <= rows < data.shape[1]:
                    raise IDMError(f"row {rows} is out of range: {path} has {data.shape[1]} detector rows")
                select = (slice(None), slice(int(rows) % data.shape[1], int(rows) % data.shape[1] + 1), slice(None))
            elif rows is not None and not isinstance(rows, slice):
                raise IDMError(f"rows must be an int or a slice, got {rows!r}")
            counts = np.asarray(data[select], dtype=np.float64)
            white_set = handle["exchange/data_white"]
            white = np.asarray(white_set[select], dtype=np.float64)
            if "exchange/data_dark" in handle:
                dark = np.asarray(handle["exchange/data_dark"][select], dtype=np.float64)
                dark_frames = int(dark.shape[0])
            else:
                dark, dark_frames = np.zeros((1, *counts.shape[1:])), 0
            theta_set = handle["exchange/theta"]
            theta = np.asarray(theta_set[()], dtype=np.float64).reshape(-1)
            units = theta_set.attrs.get("units", b"degrees")
            units = (units.decode() if isinstance(units, bytes) else str(units)).lower()
    except IDMError:
        raise
    except Exception as error:
        raise IDMError(f"corrupt HDF5 file {path}: {_reason(error)}") from None
    if white.ndim != 3 or dark.ndim != 3 or white.shape[1:] != counts.shape[1:] or dark.shape[1:] != counts.shape[1:]:
        raise IDMError(f"{path}: white / dark fields {_shape(white.shape)} / {_shape(dark.shape)} do not match "
                       f"the projections {_shape(counts.shape)}")
    if theta.shape[0] != counts.shape[0]:
        raise IDMError(f"{path}: exchange/theta has {theta.shape[0]} angles for {counts.shape[0]} views")
    if units.startswith("rad"):
        theta = np.rad2deg(theta)
    dark_mean, white_mean = dark.mean(axis=0), white.mean(axis=0)
    numerator, denominator = counts - dark_mean, white_mean - dark_mean
    with np.errstate(divide="ignore", invalid="ignore"):
        transmission = np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), 0.0)
    invalid = ~(transmission >= min_transmission)  # also catches NaN
    transmission = np.where(invalid, min_transmission, transmission)
    sinogram = -np.log(transmission)
    meta = {"path": str(path), "format": "dxchange", "dark_frames": dark_frames, "white_frames": int(white.shape[0]),
            "clipped": int(invalid.sum()), "min_transmission": float(min_transmission)}
    return Sinogram(torch.from_numpy(sinogram.astype(np.float32)), torch.from_numpy(theta), meta)


# --- CT normalisation ------------------------------------------------------------------------------
def _window(low: float, high: float) -> tuple[float, float]:
    try:
        low, high = float(low), float(high)
    except (TypeError, ValueError):
        raise IDMError(f"the HU window must be two numbers, got {low!r}, {high!r}") from None
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise IDMError(f"the HU window needs low < high, got [{low:g}, {high:g}]")
    return low, high


def hu_window(volume: torch.Tensor | np.ndarray | MedicalImage, low: float = CT_WINDOW[0],
              high: float = CT_WINDOW[1]) -> torch.Tensor:
    """CT normalisation: Hounsfield units → [0, 1], ``clip((HU − low) / (high − low), 0, 1)``.

    The default window [−1000, 1000] HU (:data:`CT_WINDOW`: air 0, water 0.5, cortical bone
    (≥ 700 HU) ≥ 0.85) is the normalisation every CT number of ``idm`` is stated with (PSNR with
    peak 1 on these [0, 1] images). Values outside the window, such as the −3024 HU padding outside
    the scan circle, are clipped. Floating tensors keep their dtype; others become float32; a
    :class:`MedicalImage` must be in HU (or of unknown units).
    """
    low, high = _window(low, high)
    if isinstance(volume, MedicalImage):
        if volume.units not in (None, "HU"):
            raise IDMError(f"hu_window expects CT numbers in HU, got an image in {volume.units}")
        volume = volume.data
    x = torch.as_tensor(volume)
    if x.is_complex():
        raise IDMError("hu_window expects real CT numbers in HU, got a complex tensor")
    if not x.is_floating_point():
        x = x.float()
    return ((x - low) / (high - low)).clamp(0.0, 1.0)


def hu_unwindow(x: torch.Tensor | np.ndarray, low: float = CT_WINDOW[0], high: float = CT_WINDOW[1]) -> torch.Tensor:
    """Inverse of :func:`hu_window` on [0, 1]: ``low + x · (high − low)`` HU (clipped values stay at the
    window's edges)."""
    low, high = _window(low, high)
    x = torch.as_tensor(x)
    if not x.is_floating_point():
        x = x.float()
    return low + x * (high - low)
