"""``idm bench quality --operator ct3d | mri3d``: a volume measured slice by slice, every method on
the whole volume, PSNR / SSIM per plane, seconds and peak memory, JSON and a three-plane figure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from idm.cli import main
from idm.evaluation import PLANES, plane_scores

nib = pytest.importorskip("nibabel")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def ct_volume(tmp_path: Path) -> Path:
    xx, yy = np.meshgrid(np.linspace(-1, 1, 16), np.linspace(-1, 1, 16), indexing="ij")
    body = np.where(xx**2 + yy**2 < 0.7, 60.0, -1000.0) + np.where((xx - 0.2) ** 2 + yy**2 < 0.05, 800.0, 0.0)
    data = np.stack([body + 30 * k for k in range(8)], axis=-1).astype(np.float32)  # (x, y, z) on disk, HU
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0])), str(path))
    return path


def test_plane_scores_permute_the_volume() -> None:
    truth = 0.8 * torch.rand(8, 1, 9, 10, generator=torch.Generator().manual_seed(0))  # +0.1 is not clipped
    estimate = truth.clone()
    estimate[3] += 0.1  # one axial slice wrong: one axial PSNR finite, every coronal / sagittal slice touched
    scores = plane_scores(estimate, truth)
    assert list(scores) == list(PLANES)
    assert scores["axial"]["psnr"] == pytest.approx(20.0, abs=0.01)  # exact slices left out of the mean
    assert scores["coronal"]["psnr"] == pytest.approx(10 * np.log10(8 / 0.01), abs=0.01)
    assert scores["sagittal"]["psnr"] == pytest.approx(scores["coronal"]["psnr"])
    assert all(0 < s["ssim"] <= 1 for s in scores.values())


def test_ct3d_bench_writes_rows_per_plane_and_a_figure(ct_volume: Path, tmp_path: Path, capsys) -> None:
    from conftest import tiny_prior, tiny_unet_config

    prior = tmp_path / "prior"
    tiny_prior(tiny_unet_config(), seed=3).save(prior, "# tiny", dtype=None)
    out, figure = tmp_path / "rows.json", tmp_path / "planes.png"
    code = main(["bench", "quality", "--operator", "ct3d", "--data", str(ct_volume), "--views", "8", "--slices", "0:7",
                 "--methods", "fbp", "tv", "mbir", "--prior", str(prior), "--option", "mbir.steps=2",
                 "--option", "tv.iterations=5", "--json", str(out), "--figure", str(figure)])
    assert code == 0, capsys.readouterr().err
    payload = json.loads(out.read_text())
    assert payload["operator"] == "ct3d" and payload["shape"] == [7, 16, 16] and payload["slices"] == [0, 7]
    labels = [row["label"] for row in payload["rows"]]
    assert labels == ["fbp", "tv (3D)", "mbir", "mbir without z-TV (slice-wise 2D)"]
    assert payload["rows"][1]["options"]["volume"] is True
    assert payload["rows"][2]["options"]["lam"] == 0.1 and payload["rows"][2]["options"]["rho"] == 10.0  # CT's
    assert payload["rows"][3]["options"]["lam"] == 0.0 and payload["rows"][3]["options"]["rho"] == 1e-9
    for row in payload["rows"]:
        assert set(PLANES) <= set(row) and row["seconds"] > 0 and row["case"] == "8 views over 0–180°"
        assert all(np.isfinite(row[p]["psnr"]) for p in PLANES)
    tv, fbp = payload["rows"][1], payload["rows"][0]
    assert tv["axial"]["psnr"] > fbp["axial"]["psnr"]
    assert figure.stat().st_size > 0 and "tv (3D)" in capsys.readouterr().out


def test_mri3d_bench_measures_every_slice_with_one_2d_mask(tmp_path: Path, capsys) -> None:
    xx, yy = np.meshgrid(np.linspace(-1, 1, 16), np.linspace(-1, 1, 16), indexing="ij")
    data = np.stack([np.clip(1 - xx**2 - yy**2, 0, 1) * (1 + 0.1 * k) for k in range(7)], axis=-1).astype(np.float32)
    path = tmp_path / "brain.nii"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    out = tmp_path / "rows.json"
    code = main(["bench", "quality", "--operator", "mri3d", "--data", str(path), "--accelerations", "4",
                 "--methods", "pinv", "tv", "--option", "tv.iterations=5", "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    rows = json.loads(out.read_text())["rows"]
    assert [r["case"] for r in rows] == ["4x poisson"] * 2 and [r["label"] for r in rows] == ["pinv", "tv (3D)"]
    assert all(np.isfinite(r[p]["psnr"]) for r in rows for p in PLANES)


def test_two_phase_encode_axes_are_per_slice_2d_masks() -> None:
    """3D Cartesian k-space with the readout along z and a (ky, kx) mask equals the per-slice 2D
    measurements of the same mask, up to the unitary 1D Fourier transform along z."""
    from idm.physics import MRI

    volume = torch.rand(6, 1, 8, 10, generator=torch.Generator().manual_seed(1)).to(torch.complex64)
    op = MRI((8, 10), acceleration=3, mask_type="poisson", seed=2)
    per_slice = op.A(volume)
    k3d = torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(volume[:, 0], dim=(0, 1, 2)), dim=(0, 1, 2),
                                            norm="ortho"), dim=(0, 1, 2)) * op.mask
    along_z = torch.fft.fftshift(torch.fft.fft(torch.fft.ifftshift(per_slice[:, 0], dim=0), dim=0, norm="ortho"), dim=0)
    torch.testing.assert_close(along_z, k3d.to(along_z.dtype), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["--operator", "ct3d", "--slices", "5:2"], "not a range"),
    (["--operator", "ct3d", "--slices", "a"], "START:STOP"),
    (["--operator", "ct3d", "--mask", "poisson"], "--mask applies to --operator mri3d"),
    (["--operator", "mri3d", "--views", "8"], "apply to --operator ct3d"),
    (["--operator", "blockcs", "--views", "8"], "apply to --operator ct3d / mri3d"),
    (["--operator", "ct3d", "--ratios", "0.2"], "--ratios do(es) not apply"),
    (["--operator", "ct3d", "--accelerations", "4"], "--accelerations do(es) not apply"),
    (["--operator", "mri3d", "--crop", "32"], "--crop do(es) not apply"),
])
def test_bad_volume_bench_arguments_give_one_line_errors(ct_volume: Path, argv, message, capsys) -> None:
    assert main(["bench", "quality", "--data", str(ct_volume), "--methods", "fbp", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and message in err, err


def test_raw_tooth_projections_are_subsampled_real_measurements(shared_data: Path, tmp_path: Path, capsys) -> None:
    """``--data tooth.h5``: both detector rows as a 2-slice volume, truth = full-angle FBP, each case
    keeps 8 or 23 of the 181 measured views; more views score higher."""
    pytest.importorskip("h5py")
    path = shared_data / "ct/tooth_microct_tomopy/tooth.h5"
    if not path.exists():
        pytest.skip(f"real data not available: {path} is missing")
    out = tmp_path / "tooth.json"
    assert main(["bench", "quality", "--operator", "ct3d", "--data", str(path), "--bin", "8", "--views", "8", "23",
                 "--methods", "fbp", "--json", str(out)]) == 0, capsys.readouterr().err
    payload = json.loads(out.read_text())
    assert payload["shape"] == [2, 80, 80] and payload["slices"] == [0, 2]
    (few, many) = payload["rows"]
    assert few["case"] == "8 of 181 measured views" and many["case"] == "23 of 181 measured views"
    assert many["axial"]["psnr"] > few["axial"]["psnr"] + 3
    assert main(["bench", "quality", "--operator", "ct3d", "--data", str(path), "--noise", "0.1",
                 "--methods", "fbp"]) == 2
    assert "raw projections are measured data" in capsys.readouterr().err
