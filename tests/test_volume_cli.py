"""``idm reconstruct VOLUME.nii.gz --operator ct|mri``: slice-by-slice measurement of a NIfTI volume,
reconstruction as one batch of slices, NIfTI output with the input's affine, one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from idm.cli import main

nib = pytest.importorskip("nibabel")
pytestmark = pytest.mark.usefixtures("one_thread")


def write_volume(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


@pytest.fixture
def ct_volume(tmp_path: Path) -> tuple[Path, np.ndarray]:
    xx, yy = np.meshgrid(np.linspace(-1, 1, 16), np.linspace(-1, 1, 16), indexing="ij")
    body = np.where(xx**2 + yy**2 < 0.7, 60.0, -1000.0)  # HU: soft tissue in air
    data = np.stack([body + 20 * k for k in range(4)], axis=-1).astype(np.float32)  # (x, y, z) on disk
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = [-5.0, 3.0, 40.0]
    return write_volume(tmp_path / "ct.nii.gz", data, affine), affine


def test_ct_volume_round_trip_keeps_the_affine(ct_volume, tmp_path: Path, capsys) -> None:
    from idm.io.medical import read_volume

    path, _ = ct_volume
    out = tmp_path / "recon.nii.gz"
    code = main(["reconstruct", str(path), "--operator", "ct", "--views", "8", "--method", "tv", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "coronal" in capsys.readouterr().out
    original, result = read_volume(path), read_volume(out)
    assert tuple(result.data.shape) == tuple(original.data.shape) == (4, 16, 16)
    np.testing.assert_allclose(result.meta["affine"], original.meta["affine"])
    assert 0.0 <= float(result.data.mean()) <= 1.0  # the [0, 1] scale of the windowed volume


def test_bad_volumes_give_one_line_errors(ct_volume, tmp_path: Path, capsys) -> None:
    path, affine = ct_volume
    cases = [
        (["--operator", "blockcs", "--ratio", "0.3", "-o", str(tmp_path / "a.nii.gz")], "--operator ct or mri"),
        (["--operator", "ct", "-o", str(tmp_path / "a.png")], "NIfTI"),
    ]
    broken = np.full((8, 8, 3), np.nan, dtype=np.float32)
    nan_path = write_volume(tmp_path / "nan.nii.gz", broken, affine)
    for argv, message in cases:
        assert main(["reconstruct", str(path), "--method", "tv", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and message in err
    flat = write_volume(tmp_path / "flat.nii.gz", np.zeros((8, 8), dtype=np.float32), affine)  # a 2-D image
    unoriented = tmp_path / "unoriented.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 3), dtype=np.float32), None), str(unoriented))  # no sform / qform
    for bad, message in [(nan_path, "NaN"), (flat, "not a volume (3-D)"), (unoriented, "has no affine")]:
        assert main(["reconstruct", str(bad), "--operator", "ct", "--method", "tv", "-o", str(tmp_path / "n.nii.gz")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and message in err, err
    assert not any(tmp_path.glob("a.*")) and not (tmp_path / "n.nii.gz").exists()


def test_mri_volume_with_mbir(tmp_path: Path, capsys) -> None:
    from conftest import tiny_prior, tiny_unet_config

    prior = tmp_path / "prior"
    tiny_prior(tiny_unet_config(), seed=3).save(prior, "# tiny", dtype=None)
    xx, yy = np.meshgrid(np.linspace(-1, 1, 16), np.linspace(-1, 1, 16), indexing="ij")
    data = np.stack([np.clip(1 - xx**2 - yy**2, 0, 1) * (1 + 0.1 * k) for k in range(3)], axis=-1).astype(np.float32)
    path = write_volume(tmp_path / "brain.nii", data, np.eye(4))
    out = tmp_path / "recon.nii"
    code = main(["reconstruct", str(path), "--operator", "mri", "--acceleration", "4", "--method", "mbir",
                 "--prior", str(prior), "--option", "steps=2", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    from idm.io.medical import read_volume

    assert tuple(read_volume(out).data.shape) == (3, 16, 16)
