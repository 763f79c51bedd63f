"""Readers of real medical data (idm.io.medical): each format on a tiny file the test writes, a
corrupt / truncated file of each kind (one-line IDMError, nothing written), missing optional
dependencies, and the real files of ../shared/data (skipped when absent)."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from idm.errors import IDMError
from idm.io.medical import (
    CT_WINDOW,
    MedicalImage,
    Sinogram,
    hu_unwindow,
    hu_window,
    read_kspace,
    read_sinogram,
    read_volume,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# --- helpers -----------------------------------------------------------------------------------------
def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@contextlib.contextmanager
def _writes_nothing(folder: Path):
    """The block leaves ``folder`` exactly as it was (no new, changed or removed file)."""
    before = _listing(folder)
    yield
    assert _listing(folder) == before


def _one_line_error(call, *args, match: str | None = None, **kwargs) -> str:
    with pytest.raises(IDMError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message, repr(message)
    if match is not None:
        assert match in message, message
    return message


def _truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


# --- file writers ------------------------------------------------------------------------------------
def _write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    nib = pytest.importorskip("nibabel")
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def _dicom_slice(path: Path, stored: np.ndarray, z: float | None, instance: int | None, series: str,
                 slope: float = 2.0, intercept: float = -1024.0, compress: bool = False) -> Path:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID = "CT", series
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    if z is not None:
        ds.ImagePositionPatient = [-10.0, -20.0, z]
    if instance is not None:
        ds.InstanceNumber = instance
    ds.PixelSpacing = [0.5, 0.75]
    ds.SliceThickness = 2.5
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "HU"
    ds.PixelData = stored.astype(np.uint16).tobytes()
    if compress:
        from pydicom.uid import JPEG2000Lossless

        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    ds.save_as(str(path), enforce_file_format=True)
    assert pydicom.dcmread(str(path)).Rows == stored.shape[0]
    return path


def _stored_slice(value: int) -> np.ndarray:
    return (np.arange(12, dtype=np.uint16).reshape(3, 4) + value)


def _dicom_series(folder: Path, positions=True, instances=True) -> Path:
    """Three slices at z = 5, 7, 9 mm written in the file order (z = 9, 5, 7), stored values
    100 + z·10 + pattern."""
    folder.mkdir()
    for name, z, instance in (("a.dcm", 9.0, 3), ("b.dcm", 5.0, 1), ("c.dcm", 7.0, 2)):
        _dicom_slice(folder / name, _stored_slice(int(100 + 10 * z)), z if positions else None,
                     instance if instances else None, series="1.2.3")
    (folder / "README.txt").write_text("not a DICOM file\n")
    return folder


def _write_mat73(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """A MAT v7.3 file as MATLAB writes it: HDF5 after a 512-byte header, each variable stored
    transposed (column-major), complex as a compound (real, imag), with its MATLAB_class."""
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w", userblock_size=512) as handle:
        for name, array in arrays.items():
            stored = np.asarray(array).transpose()
            if np.iscomplexobj(stored):
                compound = np.empty(stored.shape, dtype=[("real", "<f8"), ("imag", "<f8")])
                compound["real"], compound["imag"] = stored.real, stored.imag
                stored = compound
            dataset = handle.create_dataset(name, data=stored)
            dataset.attrs["MATLAB_class"] = np.bytes_("double")
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    with open(path, "r+b") as handle:
        handle.write(header.ljust(116) + b"\x00" * 8 + b"\x00\x02IM")
    return path


def _write_fastmri(path: Path, kspace: np.ndarray, rss: np.ndarray | None = None) -> Path:
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w") as handle:
        handle.create_dataset("kspace", data=kspace)
        if rss is not None:
            handle.create_dataset("reconstruction_rss", data=rss)
        handle.attrs["acquisition"] = "CORPD_FBK"
    return path


def _write_dxchange(path: Path, data, white, dark=None, theta=None, units="degrees") -> Path:
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w") as handle:
        handle.create_dataset("exchange/data", data=data)
        handle.create_dataset("exchange/data_white", data=white)
        if dark is not None:
            handle.create_dataset("exchange/data_dark", data=dark)
        if theta is not None:
            dataset = handle.create_dataset("exchange/theta", data=theta)
            dataset.attrs["units"] = units
    return path


# --- NIfTI --------------------------------------------------------------------------------------------
def test_nifti_is_read_in_canonical_ras_as_z_y_x(tmp_path):
    nib = pytest.importorskip("nibabel")
    array = np.arange(4 * 3 * 2, dtype=np.int16).reshape(4, 3, 2)  # (x, y, z) on disk
    affine = np.diag([-2.0, -3.0, 4.0, 1.0])  # x → patient's left, y → posterior: LPS on disk
    affine[:3, 3] = [10.0, 20.0, -30.0]
    path = _write_nifti(tmp_path / "vol.nii.gz", array, affine)
    with _writes_nothing(tmp_path):
        image = read_volume(path)
    assert isinstance(image, MedicalImage)
    canonical = array[::-1, ::-1, :]  # RAS+: x and y flipped
    assert image.data.dtype == torch.float32 and tuple(image.data.shape) == (2, 3, 4)
    assert torch.equal(image.data, torch.from_numpy(canonical.transpose(2, 1, 0).astype(np.float32)))
    assert image.spacing == (4.0, 3.0, 2.0)
    assert image.meta["orientation"] == "RAS+" and image.meta["original_orientation"] == "LPS"
    assert image.modality is None and image.units is None
    # the affine maps the returned index (k, i, j) to the same RAS point as the file's (x, y, z)
    k, i, j = 1, 2, 3
    x, y, z = array.shape[0] - 1 - j, array.shape[1] - 1 - i, k
    assert np.allclose(image.meta["affine"] @ [k, i, j, 1], affine @ [x, y, z, 1])
    assert image.data[k, i, j] == array[x, y, z]
    ct = read_volume(path, modality="CT")
    assert ct.modality == "CT" and ct.units == "HU"
    assert nib.load(str(path)).shape == (4, 3, 2)  # the file is untouched


def test_nifti_2d_and_4d(tmp_path):
    image = np.random.default_rng(0).random((5, 4)).astype(np.float32)
    two_d = read_volume(_write_nifti(tmp_path / "slice.nii", image, np.eye(4)))
    assert tuple(two_d.data.shape) == (4, 5) and torch.equal(two_d.data, torch.from_numpy(image.T.copy()))
    assert two_d.spacing == (1.0, 1.0)
    trailing = read_volume(_write_nifti(tmp_path / "t1.nii.gz", np.ones((4, 3, 2, 1), np.float32), np.eye(4)))
    assert tuple(trailing.data.shape) == (2, 3, 4)
    path = _write_nifti(tmp_path / "series.nii.gz", np.ones((4, 3, 2, 5), np.float32), np.eye(4))
    _one_line_error(read_volume, path, match="4-D")


def test_corrupt_and_truncated_nifti(tmp_path):
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"this is not a NIfTI file" * 20)
    truncated = _truncate(_write_nifti(tmp_path / "cut.nii.gz", np.ones((16, 16, 16), np.float32) * 3, np.eye(4)))
    plain = _truncate(_write_nifti(tmp_path / "cut.nii", np.ones((16, 16, 16), np.float32), np.eye(4)), 0.4)
    with _writes_nothing(tmp_path):
        for path in (garbage, truncated, plain):
            _one_line_error(read_volume, path, match="NIfTI")


# --- DICOM --------------------------------------------------------------------------------------------
def test_dicom_series_is_sorted_by_position_and_rescaled_to_hu(tmp_path):
    folder = _dicom_series(tmp_path / "series")
    with _writes_nothing(tmp_path):
        image = read_volume(folder)
    assert tuple(image.data.shape) == (3, 3, 4) and image.data.dtype == torch.float32
    for k, z in enumerate((5.0, 7.0, 9.0)):  # sorted inferior → superior, not in file order
        expected = 2.0 * _stored_slice(int(100 + 10 * z)).astype(np.float32) - 1024.0
        assert torch.equal(image.data[k], torch.from_numpy(expected))
    assert image.modality == "CT" and image.units == "HU"
    assert image.spacing == (2.0, 0.5, 0.75)
    assert image.meta["files"] == ["b.dcm", "c.dcm", "a.dcm"] and image.meta["sorted_by"] == "ImagePositionPatient"
    assert image.meta["uniform_spacing"] and image.meta["slice_positions"] == [5.0, 7.0, 9.0]
    # voxel (k, i, j) → RAS: LPS (−10 + 0.75 j, −20 + 0.5 i, 5 + 2 k) with x, y negated
    assert np.allclose(image.meta["affine"] @ [2, 1, 3, 1], [10 - 0.75 * 3, 20 - 0.5 * 1, 9.0, 1])


def test_dicom_series_without_positions_sorts_by_instance_number(tmp_path):
    image = read_volume(_dicom_series(tmp_path / "series", positions=False))
    assert image.meta["sorted_by"] == "InstanceNumber" and image.meta["files"] == ["b.dcm", "c.dcm", "a.dcm"]
    assert image.spacing == (2.5, 0.5, 0.75)  # SliceThickness without positions


def test_single_dicom_file(tmp_path):
    path = _dicom_slice(tmp_path / "one.dcm", _stored_slice(1000), 3.0, 1, series="9.9")
    image = read_volume(path)
    assert tuple(image.data.shape) == (3, 4) and image.units == "HU" and image.spacing == (0.5, 0.75)
    assert torch.equal(image.data, torch.from_numpy(2.0 * _stored_slice(1000).astype(np.float32) - 1024.0))
    renamed = tmp_path / "CT.1.2.3.4"  # no extension: recognised by the DICM preamble
    renamed.write_bytes(path.read_bytes())
    assert torch.equal(read_volume(renamed).data, image.data)


def test_dicom_folder_with_two_series_needs_a_key(tmp_path):
    folder = _dicom_series(tmp_path / "mixed")
    _dicom_slice(folder / "other.dcm", _stored_slice(5), 100.0, 1, series="4.5.6")
    message = _one_line_error(read_volume, folder, match="2 DICOM series")
    assert "1.2.3 (3 files)" in message and "4.5.6 (1 file)" in message
    assert tuple(read_volume(folder, key="4.5.6").data.shape) == (1, 3, 4)  # a folder is a volume
    assert tuple(read_volume(folder, key="1.2.3").data.shape) == (3, 3, 4)
    _one_line_error(read_volume, folder, key="7.7", match="no DICOM series '7.7'")


def test_corrupt_truncated_and_empty_dicom(tmp_path):
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(os.urandom(64))
    truncated = _truncate(_dicom_slice(tmp_path / "cut.dcm", np.zeros((64, 64), np.uint16), 0.0, 1, series="1"), 0.6)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here\n")
    bad_series = _dicom_series(tmp_path / "bad_series")
    _truncate(bad_series / "c.dcm", 0.8)
    with _writes_nothing(tmp_path):
        _one_line_error(read_volume, garbage, match="garbage.dcm")
        _one_line_error(read_volume, truncated, match="cut.dcm")
        _one_line_error(read_volume, empty, match="no DICOM images")
        _one_line_error(read_volume, bad_series, match="c.dcm")


def test_jpeg2000_dicom_and_a_missing_decoder(tmp_path, monkeypatch):
    pytest.importorskip("pydicom")
    from pydicom.pixels import get_decoder, get_encoder
    from pydicom.uid import JPEG2000Lossless

    if not get_encoder(JPEG2000Lossless).is_available:
        pytest.skip("no JPEG 2000 encoder (pip install pylibjpeg pylibjpeg-openjpeg)")
    stored = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 3000)
    path = _dicom_slice(tmp_path / "j2k.dcm", stored, 0.0, 1, series="1", slope=1.0, compress=True)
    image = read_volume(path)
    assert torch.equal(image.data, torch.from_numpy(stored.astype(np.float32) - 1024.0))
    assert image.meta["transfer_syntax"] == JPEG2000Lossless
    monkeypatch.setattr(get_decoder(JPEG2000Lossless), "_available", {})  # as without any plug-in
    _one_line_error(read_volume, path, match="pip install pylibjpeg pylibjpeg-openjpeg")


# --- NumPy --------------------------------------------------------------------------------------------
def test_npy_and_npz(tmp_path):
    volume = np.random.default_rng(0).random((3, 4, 5))
    np.save(tmp_path / "vol.npy", volume)
    np.save(tmp_path / "complex.npy", volume[0] + 1j * volume[1])
    np.save(tmp_path / "batched.npy", volume[None, None])
    np.savez(tmp_path / "pair.npz", image=volume, mask=volume > 0.5, kspace=volume + 0j)
    with _writes_nothing(tmp_path):
        image = read_volume(tmp_path / "vol.npy")
        assert image.data.dtype == torch.float32 and torch.allclose(image.data.double(), torch.from_numpy(volume))
        assert image.spacing is None and image.meta["format"] == "npy"
        complex_image = read_volume(tmp_path / "complex.npy")
        assert complex_image.data.dtype == torch.complex64 and tuple(complex_image.data.shape) == (4, 5)
        assert tuple(read_volume(tmp_path / "batched.npy").data.shape) == (3, 4, 5)
        _one_line_error(read_volume, tmp_path / "pair.npz", match="pass key=")
        assert tuple(read_volume(tmp_path / "pair.npz", key="mask").data.shape) == (3, 4, 5)
        _one_line_error(read_volume, tmp_path / "pair.npz", key="kspace", match="read_kspace")
        _one_line_error(read_volume, tmp_path / "pair.npz", key="nope", match="available: image (3×4×5)")


def test_corrupt_npy_and_wrong_dimensionality(tmp_path):
    np.save(tmp_path / "line.npy", np.ones(7))
    np.save(tmp_path / "big.npy", np.ones((2, 3, 4, 5)))
    np.save(tmp_path / "cut.npy", np.ones((50, 50)))
    _truncate(tmp_path / "cut.npy")
    (tmp_path / "garbage.npy").write_bytes(b"\x00not numpy at all")
    (tmp_path / "garbage.npz").write_bytes(b"PK\x03\x04 broken zip")
    with _writes_nothing(tmp_path):
        _one_line_error(read_volume, tmp_path / "line.npy", match="shape 7")
        _one_line_error(read_volume, tmp_path / "big.npy", match="2×3×4×5")
        for name in ("cut.npy", "garbage.npy", "garbage.npz"):
            _one_line_error(read_volume, tmp_path / name, match="corrupt NumPy file")


# --- MATLAB -------------------------------------------------------------------------------------------
def test_mat_v5_volume_and_kspace(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(1)
    volume = rng.random((6, 5, 3))  # MATLAB (rows, cols, slices)
    kspace = rng.standard_normal((6, 5, 2)) + 1j * rng.standard_normal((6, 5, 2))  # (H, W, coils)
    scipy_io.savemat(tmp_path / "data.mat", {"img": volume, "kData": kspace, "mask": np.ones((6, 5))})
    scipy_io.savemat(tmp_path / "single.mat", {"slice2d": volume[..., 0], "note": "text"})
    with _writes_nothing(tmp_path):
        image = read_volume(tmp_path / "data.mat", key="img")
        assert tuple(image.data.shape) == (3, 6, 5) and image.meta["format"] == "mat"
        assert torch.allclose(image.data.double(), torch.from_numpy(np.moveaxis(volume, -1, 0)))
        message = _one_line_error(read_volume, tmp_path / "data.mat", match="pass key=")
        assert "img (6×5×3)" in message and "mask (6×5)" in message
        _one_line_error(read_volume, tmp_path / "data.mat", key="kData", match="read_kspace")
        k = read_kspace(tmp_path / "data.mat")  # kData by name
        assert k.dtype == torch.complex64 and tuple(k.shape) == (2, 6, 5)
        assert torch.allclose(k.to(torch.complex128), torch.from_numpy(np.moveaxis(kspace, -1, 0)), atol=1e-6)
        assert torch.allclose(read_volume(tmp_path / "single.mat").data.double(), torch.from_numpy(volume[..., 0]))
        _one_line_error(read_kspace, tmp_path / "data.mat", key="img", match="real array")
        _one_line_error(read_kspace, tmp_path / "single.mat", match="no k-space-like array")


def test_mat_v73_is_untransposed(tmp_path):
    rng = np.random.default_rng(2)
    volume = rng.random((6, 5, 3))  # as MATLAB shows it: (rows, cols, slices)
    kspace = rng.standard_normal((6, 5, 2)) + 1j * rng.standard_normal((6, 5, 2))
    path = _write_mat73(tmp_path / "v73.mat", {"data_fs": volume, "k": kspace})
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "r") as handle:
        assert handle["data_fs"].shape == (3, 5, 6)  # transposed on disk
    with _writes_nothing(tmp_path):
        image = read_volume(path, key="data_fs")
        assert image.meta["format"] == "mat73" and tuple(image.data.shape) == (3, 6, 5)
        assert torch.allclose(image.data.double(), torch.from_numpy(np.moveaxis(volume, -1, 0)))
        _one_line_error(read_volume, path, match="pass key= one of: data_fs (6×5×3), k (6×5×2)")
        k = read_kspace(path)  # the only complex array
        assert tuple(k.shape) == (2, 6, 5)
        assert torch.allclose(k.to(torch.complex128), torch.from_numpy(np.moveaxis(kspace, -1, 0)), atol=1e-6)
        _one_line_error(read_volume, path, key="missing", match="data_fs (6×5×3)")


def test_corrupt_mat_files(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    (tmp_path / "garbage.mat").write_bytes(b"definitely not MATLAB" * 10)
    scipy_io.savemat(tmp_path / "cut.mat", {"x": np.ones((100, 100))})
    _truncate(tmp_path / "cut.mat")
    _truncate(_write_mat73(tmp_path / "cut73.mat", {"x": np.ones((100, 100))}))
    with _writes_nothing(tmp_path):
        _one_line_error(read_volume, tmp_path / "garbage.mat", match="corrupt MATLAB file")
        _one_line_error(read_volume, tmp_path / "cut.mat", match="corrupt MATLAB file")
        _one_line_error(read_volume, tmp_path / "cut73.mat", match="corrupt MATLAB v7.3")
        _one_line_error(read_kspace, tmp_path / "cut.mat", match="corrupt MATLAB file")


# --- HDF5: fastMRI k-space and images -------------------------------------------------------------
def test_fastmri_multicoil_hdf5(tmp_path):
    rng = np.random.default_rng(3)
    kspace = (rng.standard_normal((3, 2, 8, 6)) + 1j * rng.standard_normal((3, 2, 8, 6))).astype(np.complex64)
    rss = rng.random((3, 8, 6)).astype(np.float32)
    path = _write_fastmri(tmp_path / "file1000.h5", kspace, rss)
    with _writes_nothing(tmp_path):
        k = read_kspace(path, slice=1)
        assert k.dtype == torch.complex64 and torch.equal(k, torch.from_numpy(kspace[1]))
        assert torch.equal(read_kspace(path, slice=-1), torch.from_numpy(kspace[2]))
        _one_line_error(read_kspace, path, match="pass slice= (0 … 2)")
        _one_line_error(read_kspace, path, slice=3, match="out of range")
        shifted = read_kspace(path, slice=0, shift=True)
        assert torch.equal(shifted, torch.fft.fftshift(torch.from_numpy(kspace[0]), dim=(-2, -1)))
        image = read_volume(path)  # reconstruction_rss, never the k-space
        assert image.meta["key"] == "reconstruction_rss" and torch.equal(image.data, torch.from_numpy(rss))
        _one_line_error(read_volume, path, key="kspace", match="read_kspace")


def test_fastmri_singlecoil_hdf5_and_corrupt(tmp_path):
    kspace = (np.arange(2 * 4 * 4).reshape(2, 4, 4) * (1 + 1j)).astype(np.complex64)
    path = _write_fastmri(tmp_path / "single.h5", kspace)
    assert tuple(read_kspace(path, slice=0).shape) == (1, 4, 4)
    assert torch.equal(read_kspace(path, slice=1)[0], torch.from_numpy(kspace[1]))
    _write_fastmri(tmp_path / "real.h5", np.ones((1, 4, 4), np.float32))
    _one_line_error(read_kspace, tmp_path / "real.h5", key="kspace", match="real array")
    (tmp_path / "garbage.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 40)
    _truncate(_write_fastmri(tmp_path / "cut.h5", np.ones((4, 64, 64), np.complex64)), 0.3)
    with _writes_nothing(tmp_path):
        for name in ("garbage.h5", "cut.h5"):
            _one_line_error(read_kspace, tmp_path / name, slice=0, match="corrupt HDF5 file")
            _one_line_error(read_volume, tmp_path / name, match="corrupt HDF5 file")


def test_npy_kspace(tmp_path):
    kspace = (np.arange(2 * 4 * 5).reshape(2, 4, 5) * 1j).astype(np.complex128)
    np.save(tmp_path / "k.npy", kspace)
    np.save(tmp_path / "k2d.npy", kspace[0])
    np.save(tmp_path / "k4d.npy", np.stack([kspace, 2 * kspace]))
    np.save(tmp_path / "image.npy", np.ones((4, 5)))
    assert torch.equal(read_kspace(tmp_path / "k.npy"), torch.from_numpy(kspace.astype(np.complex64)))
    assert tuple(read_kspace(tmp_path / "k2d.npy").shape) == (1, 4, 5)
    assert torch.equal(read_kspace(tmp_path / "k4d.npy", slice=1), torch.from_numpy((2 * kspace).astype(np.complex64)))
    _one_line_error(read_kspace, tmp_path / "k4d.npy", match="2 slices")
    _one_line_error(read_kspace, tmp_path / "image.npy", match="real array")
    _one_line_error(read_kspace, tmp_path / "k.npy", slice=0, match="one slice")


# --- DXchange / TomoPy sinograms ---------------------------------------------------------------------
def test_dxchange_flat_and_dark_field_correction(tmp_path):
    rng = np.random.default_rng(4)
    dark = rng.uniform(90, 110, (2, 2, 5)).astype(np.float32)
    white = rng.uniform(900, 1100, (3, 2, 5)).astype(np.float32)
    data = rng.uniform(200, 800, (4, 2, 5)).astype(np.float32)
    data[0, 0, 0] = 50.0  # below the dark field: clipped
    theta = np.array([0.0, 45.0, 90.0, 135.0])
    path = _write_dxchange(tmp_path / "scan.h5", data, white, dark, theta)
    with _writes_nothing(tmp_path):
        sinogram = read_sinogram(path)
    assert isinstance(sinogram, Sinogram) and sinogram.data.dtype == torch.float32
    d, w = dark.astype(np.float64).mean(0), white.astype(np.float64).mean(0)
    transmission = (data - d) / (w - d)
    expected = -np.log(np.maximum(transmission, 1e-6))
    assert tuple(sinogram.data.shape) == (4, 2, 5)
    assert np.allclose(sinogram.data.numpy(), expected, rtol=1e-6, atol=1e-6)
    assert float(sinogram.data[0, 0, 0]) == pytest.approx(-np.log(1e-6), rel=1e-6)
    assert sinogram.meta["clipped"] == 1 and sinogram.meta["dark_frames"] == 2 and sinogram.meta["white_frames"] == 3
    assert torch.equal(sinogram.angles, torch.from_numpy(theta))
    one_row = read_sinogram(path, rows=1)
    assert tuple(one_row.data.shape) == (4, 1, 5) and torch.equal(one_row.data[:, 0], sinogram.data[:, 1])
    radians = read_sinogram(_write_dxchange(tmp_path / "rad.h5", data, white, dark, np.deg2rad(theta), "radians"))
    assert torch.allclose(radians.angles, torch.from_numpy(theta))
    no_dark = read_sinogram(_write_dxchange(tmp_path / "nodark.h5", data, white, None, theta))
    assert no_dark.meta["dark_frames"] == 0
    assert np.allclose(no_dark.data.numpy(), -np.log(data / white.astype(np.float64).mean(0)), rtol=1e-6)


def test_dxchange_errors(tmp_path):
    data, white = np.ones((4, 2, 5), np.float32), np.ones((3, 2, 5), np.float32) * 2
    _one_line_error(read_sinogram, _write_dxchange(tmp_path / "notheta.h5", data, white), match="exchange/theta")
    _one_line_error(read_sinogram, _write_dxchange(tmp_path / "angles.h5", data, white, None, np.arange(3.0)),
                    match="3 angles for 4 views")
    _one_line_error(read_sinogram, _write_dxchange(tmp_path / "shape.h5", data, white[:, :, :4], None, np.arange(4.0)),
                    match="do not match")
    _one_line_error(read_sinogram, tmp_path / "shape.h5", rows=5, match="out of range")
    (tmp_path / "scan.txt").write_text("x")
    _one_line_error(read_sinogram, tmp_path / "scan.txt", match="unknown sinogram file format")
    big = _write_dxchange(tmp_path / "cut.h5", np.ones((64, 8, 64), np.float32), white, None, np.arange(64.0))
    _truncate(big, 0.3)
    with _writes_nothing(tmp_path):
        _one_line_error(read_sinogram, big, match="corrupt HDF5 file")


# --- generic errors and missing dependencies -----------------------------------------------------
def test_missing_file_and_unknown_format(tmp_path):
    _one_line_error(read_volume, tmp_path / "nothing.nii.gz", match="file not found")
    _one_line_error(read_kspace, tmp_path / "nothing.h5", match="file not found")
    _one_line_error(read_sinogram, tmp_path / "nothing.h5", match="file not found")
    (tmp_path / "notes.txt").write_text("hello")
    _one_line_error(read_volume, tmp_path / "notes.txt", match="unknown medical file format")
    _one_line_error(read_kspace, tmp_path / "notes.txt", match="unknown medical file format")
    nifti = _write_nifti(tmp_path / "v.nii.gz", np.ones((2, 2, 2), np.float32), np.eye(4))
    _one_line_error(read_kspace, nifti, match="not k-space")


@pytest.mark.parametrize(("module", "package", "writer"), [
    ("nibabel", "nibabel", "nifti"),
    ("pydicom", "pydicom", "dicom"),
    ("h5py", "h5py", "hdf5"),
    ("h5py", "h5py", "mat73"),
    ("scipy.io", "scipy", "mat"),
])
def test_missing_optional_dependency_names_the_pip_command(tmp_path, monkeypatch, module, package, writer):
    if writer == "nifti":
        path = _write_nifti(tmp_path / "v.nii.gz", np.ones((2, 2, 2), np.float32), np.eye(4))
    elif writer == "dicom":
        path = _dicom_slice(tmp_path / "s.dcm", _stored_slice(0), 0.0, 1, series="1")
    elif writer == "hdf5":
        path = _write_fastmri(tmp_path / "k.h5", np.ones((1, 4, 4), np.complex64))
    elif writer == "mat73":
        path = _write_mat73(tmp_path / "v.mat", {"x": np.ones((3, 3))})
    else:
        scipy_io = pytest.importorskip("scipy.io")
        path = tmp_path / "v.mat"
        scipy_io.savemat(path, {"x": np.ones((3, 3))})
    monkeypatch.setitem(sys.modules, module, None)
    message = _one_line_error(read_volume, path, match=f"pip install {package}")
    assert "idm[medical]" in message
    if writer == "hdf5":
        _one_line_error(read_kspace, path, match="pip install h5py")
        _one_line_error(read_sinogram, path, match="pip install h5py")


# --- CT normalisation ------------------------------------------------------------------------------
def test_hu_window_and_its_inverse():
    hu = torch.tensor([-3024.0, -1000.0, 0.0, 500.0, 1000.0, 3000.0])
    x = hu_window(hu)
    assert CT_WINDOW == (-1000.0, 1000.0)
    assert torch.equal(x, torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0]))
    assert torch.equal(hu_unwindow(x), torch.tensor([-1000.0, -1000.0, 0.0, 500.0, 1000.0, 1000.0]))
    inside = torch.linspace(-160, 240, 9, dtype=torch.float64)
    assert torch.allclose(hu_unwindow(hu_window(inside, -160, 240), -160, 240), inside)
    assert hu_window(np.array([0], dtype=np.int16)).dtype == torch.float32
    _one_line_error(hu_window, hu, 100, -100, match="low < high")
    _one_line_error(hu_unwindow, x, "a", 1, match="two numbers")
    _one_line_error(hu_window, hu + 0j, match="complex")


# --- real data (skip without ../shared/data) -------------------------------------------------------
def _real(shared_data: Path, relative: str) -> Path:
    path = shared_data / relative
    if not path.exists():
        pytest.skip(f"real data not available: {path} is missing")
    return path


def test_real_jpeg2000_ct_dicom_series(shared_data):
    pytest.importorskip("pydicom")
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEG2000Lossless

    folder = _real(shared_data, "ct/totalsegmentator/example_ct_dicom")
    if not get_decoder(JPEG2000Lossless).is_available:
        pytest.skip("no JPEG 2000 decoder: pip install pylibjpeg pylibjpeg-openjpeg")
    image = read_volume(folder)
    assert tuple(image.data.shape) == (20, 512, 512) and image.modality == "CT" and image.units == "HU"
    assert image.meta["transfer_syntax"] == JPEG2000Lossless and image.meta["sorted_by"] == "ImagePositionPatient"
    assert image.spacing == pytest.approx((2.0, 0.9765625, 0.9765625)) and image.meta["uniform_spacing"]
    assert float(image.data.min()) >= -1100 and float(image.data.max()) < 4000  # measured −1024 … 1839
    air, body = (image.data < -900).float().mean(), ((image.data > -100) & (image.data < 100)).float().mean()
    assert air > 0.2 and body > 0.1  # air around the body, soft tissue inside
    assert 0.0 <= float(hu_window(image.data).min()) and float(hu_window(image.data).max()) <= 1.0


def test_real_jpeg2000_series_without_a_decoder_names_the_plugin(shared_data, monkeypatch):
    pytest.importorskip("pydicom")
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEG2000Lossless

    folder = _real(shared_data, "ct/totalsegmentator/example_ct_dicom")
    monkeypatch.setattr(get_decoder(JPEG2000Lossless), "_available", {})
    _one_line_error(read_volume, folder, match="pip install pylibjpeg pylibjpeg-openjpeg")


def test_real_uncompressed_head_ct_slice(shared_data):
    image = read_volume(_real(shared_data, "ct/pydicom_data/693_UNCR.dcm"))
    assert tuple(image.data.shape) == (512, 512) and image.units == "HU"
    assert float(image.data.min()) == -3024.0  # padding outside the scan circle (stored −2000, intercept −1024)
    assert 1000 < float(image.data.max()) < 4000


def test_real_ct_nifti(shared_data):
    pytest.importorskip("nibabel")
    image = read_volume(_real(shared_data, "ct/totalsegmentator/example_ct.nii.gz"), modality="CT")
    assert tuple(image.data.shape) == (112, 101, 122) and image.spacing == (3.0, 3.0, 3.0)
    assert image.units == "HU" and image.meta["orientation"] == "RAS+"
    assert float(image.data.min()) <= -1000 and float(image.data.max()) > 1000
    assert float(image.data.median()) < 0  # much air


def test_real_brats_nifti_slice(shared_data):
    pytest.importorskip("nibabel")
    folder = _real(shared_data, "mri/brats2020_slices/Diffusion-based-Segmentation/training")
    path = next(iter(sorted(folder.rglob("*_t1_*.nii.gz"))), None)
    if path is None:
        pytest.skip(f"no BraTS t1 slice under {folder}")
    image = read_volume(path)
    assert tuple(image.data.shape) == (240, 240) and image.spacing == (1.0, 1.0)
    assert float(image.data.min()) >= 0.0 and float(image.data.max()) <= 1.0 and float(image.data.max()) > 0.5


def test_real_syndiff_mat73_volume(shared_data):
    pytest.importorskip("h5py")
    image = read_volume(_real(shared_data, "mri/multicontrast_syndiff_T1T2/T1.mat"))
    # stored (25, 152, 256) by h5py = MATLAB (256, 152, 25): 25 slices of 256 rows × 152 columns
    assert image.meta["format"] == "mat73" and image.meta["key"] == "data_fs"
    assert tuple(image.data.shape) == (25, 256, 152) and image.data.dtype == torch.float32
    assert float(image.data.min()) >= 0.0 and float(image.data.max()) <= 1.0
    # upright head: taller than wide, so more signal rows than signal columns
    mask = image.data[12] > 0.1
    assert int(mask.any(1).sum()) > int(mask.any(0).sum())


def _centred(kspace: torch.Tensor) -> tuple[int, int]:
    energy = kspace.abs().square().sum(0)
    peak = divmod(int(energy.argmax()), energy.shape[1])
    return peak[0] - energy.shape[0] // 2, peak[1] - energy.shape[1] // 2


def _centre_fraction(kspace: torch.Tensor, centred: bool = True) -> float:
    """Share of the coil-combined image magnitude in the central half of the FOV, reconstructing
    ``kspace`` as centred (``ifft2c``) or as uncentred (plain ``ifft2``)."""
    from idm.physics.mri import ifft2c

    coils = ifft2c(kspace) if centred else torch.fft.ifft2(kspace, norm="ortho")
    image = coils.abs().square().sum(0).sqrt()  # root sum of squares over the coils
    h, w = image.shape
    return float(image[h // 4: 3 * h // 4, w // 4: 3 * w // 4].sum() / image.sum())


def test_real_espirit_8coil_kspace(shared_data):
    pytest.importorskip("scipy.io")
    kspace = read_kspace(_real(shared_data, "mri/kspace_loraks_espirit/ESPIRiT_data/brain_alias_8ch.mat"))
    assert tuple(kspace.shape) == (8, 320, 256) and kspace.dtype == torch.complex64
    offset = _centred(kspace)
    assert max(abs(offset[0]), abs(offset[1])) <= 1, offset  # measured (0, −1): stored centred
    # ifft2c puts the head in the middle (the FOV is smaller than the head, so it fills the image):
    # measured 0.24 of the RSS magnitude in the centre half, 0.17 for plain ifft2 (split over the corners)
    assert _centre_fraction(kspace) > 1.2 * _centre_fraction(kspace, centred=False)


def test_real_loraks_single_coil_kspace(shared_data):
    pytest.importorskip("scipy.io")
    kspace = read_kspace(_real(shared_data, "mri/kspace_loraks_espirit/LORAKS_examples/T2_single_channel.mat"))
    assert tuple(kspace.shape) == (1, 256, 340) and kspace.dtype == torch.complex64
    offset = _centred(kspace)
    assert max(abs(offset[0]), abs(offset[1])) <= 1, offset  # measured (−1, −1)
    assert _centre_fraction(kspace) > 0.4  # measured 0.45
    assert _centre_fraction(kspace, centred=False) < 0.1  # measured 0.02: the head split over the corners
    _one_line_error(read_volume, shared_data / "mri/kspace_loraks_espirit/LORAKS_examples/T2_single_channel.mat",
                    key="kData", match="read_kspace")


def test_real_tooth_sinogram(shared_data):
    pytest.importorskip("h5py")
    sinogram = read_sinogram(_real(shared_data, "ct/tooth_microct_tomopy/tooth.h5"))
    assert tuple(sinogram.data.shape) == (181, 2, 640) and tuple(sinogram.angles.shape) == (181,)
    assert float(sinogram.angles[0]) == 0.0 and 178 < float(sinogram.angles[-1]) <= 180
    assert bool(torch.isfinite(sinogram.data).all()) and sinogram.meta["clipped"] == 0
    assert -0.5 < float(sinogram.data.min()) and float(sinogram.data.max()) < 5  # measured −0.10 … 1.95
    assert float(sinogram.data.mean()) > 0.05  # the tooth attenuates


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_write_nifti_reads_back_the_same_array(tmp_path, suffix):
    """What `idm reconstruct -o x.nii.gz` / `--uncertainty std.nii.gz` write reads back unchanged."""
    pytest.importorskip("nibabel")
    from idm.io.medical import read_volume, write_nifti

    image = np.arange(6, dtype=np.float32).reshape(2, 3)
    write_nifti(tmp_path / f"x{suffix}", image)
    np.testing.assert_array_equal(np.asarray(read_volume(tmp_path / f"x{suffix}").data).squeeze(), image)


def test_write_nifti_keeps_the_affine_of_a_read_volume(tmp_path):
    """A volume read in RAS+ (z, y, x) order and written with its ``meta["affine"]`` reads back with the same
    array and affine (the round trip of a reconstructed volume); a malformed affine is one clear error."""
    pytest.importorskip("nibabel")
    from idm.io.medical import read_volume, write_nifti

    array = np.arange(4 * 3 * 2, dtype=np.float32).reshape(4, 3, 2)
    affine = np.diag([-2.0, -3.0, 4.0, 1.0])  # LPS on disk: read_volume turns it to RAS+
    affine[:3, 3] = [10.0, 20.0, -30.0]
    first = read_volume(_write_nifti(tmp_path / "vol.nii.gz", array, affine))
    write_nifti(tmp_path / "out.nii.gz", first.data.numpy(), affine=first.meta["affine"])
    again = read_volume(tmp_path / "out.nii.gz")
    assert torch.equal(again.data, first.data) and again.spacing == first.spacing
    np.testing.assert_allclose(again.meta["affine"], first.meta["affine"])
    with pytest.raises(IDMError, match="4 x 4"):
        write_nifti(tmp_path / "bad.nii.gz", first.data.numpy(), affine=np.eye(3))
    assert not (tmp_path / "bad.nii.gz").exists()
