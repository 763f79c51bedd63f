"""train/medical_slices.py: slice selection, normalisation, 16-bit PNG round trip, all-or-nothing
output and one-line errors on tiny fake data roots; one test on the real data (skips without it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from idm.data.images import load_image
from idm.errors import IDMError
from idm.io.medical import MedicalImage, hu_window, read_volume
from train import medical_slices as ms

nib = pytest.importorskip("nibabel")
pytestmark = pytest.mark.usefixtures("one_thread")


def _nifti(path: Path, xyz: np.ndarray) -> Path:
    """Write an (x, y, z) or (x, y) array with an identity affine (read back as (z, y, x) / (y, x))."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.Nifti1Image(xyz.astype(np.float32), np.eye(4)).to_filename(str(path))
    return path


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_error(call, *args, match: str, **kwargs) -> str:
    with pytest.raises(IDMError, match=match) as info:
        call(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def _fake_ct_root(root: Path) -> Path:
    """example_ct (x 96, y 97, z 92: HU ramp, z encoded in the values), its last 10 slices as
    example_ct_sm, and a cropped train volume whose slices 0-2 are air."""
    x, y, z = np.meshgrid(np.arange(96), np.arange(97), np.arange(92), indexing="ij")
    ct = -1000.0 + 20.0 * x + 5.0 * z  # > -500 HU for x >= 25 (74 % of the pixels)
    _nifti(root / "ct/totalsegmentator/example_ct.nii.gz", ct)
    _nifti(root / "ct/totalsegmentator/example_ct_sm.nii.gz", ct[:, :, 82:])
    crop = np.full((98, 100, 8), -1000.0)
    crop[:, :, 3:] = 40.0
    _nifti(root / "ct/totalsegmentator/fake_report_ct_cropped/ct_cropped.nii.gz", crop)
    return root


def _fake_mri_root(root: Path) -> Path:
    """BraTS-like 2-D slices (train subject 001 and 006, val subject 006, with seg maps) and a
    100 x 104 x 100 template holding a ball."""
    rng = np.random.default_rng(0)
    brats = root / "mri/brats2020_slices"
    for folder, subject in (("Diffusion-based-Segmentation/training/000001", "001"),
                            ("diffusion-anomaly/testing/000247", "006"),
                            ("Diffusion-based-Segmentation/testing/000246", "006")):
        for contrast in ("t1", "t1ce", "t2", "flair", "seg"):
            _nifti(brats / folder / f"brats_train_{subject}_{contrast}_080_w.nii.gz", rng.random((120, 100)))
    x, y, z = np.meshgrid(np.arange(100), np.arange(104), np.arange(100), indexing="ij")
    ball = ((x - 50) ** 2 + (y - 52) ** 2 + (z - 50) ** 2 < 35 ** 2) * (100.0 + z)
    _nifti(root / "mri/brain_3d_templates/antspy/ch2.nii.gz", ball)
    return root


# --- core functions ------------------------------------------------------------------------------
def test_png16_round_trip(tmp_path):
    image = np.random.default_rng(1).random((97, 130)).astype(np.float32)
    image[0, 0], image[0, 1] = 0.0, 1.0
    ms.write_png16(tmp_path / "a.png", image)
    with Image.open(tmp_path / "a.png") as png:
        assert png.mode == "I;16" and png.format == "PNG"
    back = load_image(tmp_path / "a.png")
    assert back.shape == (1, 97, 130) and back.dtype == torch.float32
    assert float((back[0] - torch.from_numpy(image)).abs().max()) <= 0.5 / 65535 + 1e-7
    assert float(back.min()) == 0.0 and float(back.max()) == 1.0


def test_normalisations():
    x = torch.arange(10000, dtype=torch.float32).reshape(100, 100)
    out, record = ms.normalise(x, "percentile")
    assert record["scale"] == pytest.approx(np.percentile(np.arange(10000), 99.9))
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0 and (out == 1.0).sum() == 10
    z = torch.polar(torch.full((4, 4), 2.0), torch.rand(4, 4))
    out, record = ms.normalise(z, "max")
    assert record["scale"] == pytest.approx(2.0) and np.allclose(np.abs(out), 1.0) and np.iscomplexobj(out)
    out, record = ms.normalise(torch.tensor([[-3024.0, -1000.0, 0.0, 1000.0, 3000.0]]), "hu")
    assert out.tolist() == [[0.0, 0.0, 0.5, 1.0, 1.0]] and record["window_hu"] == [-1000.0, 1000.0]
    _one_line_error(ms.normalise, torch.zeros(8, 8), "percentile", match="empty")


def test_views_of_a_template_are_upright_every_fourth_slice():
    volume = torch.arange(9 * 10 * 11, dtype=torch.float32).reshape(9, 10, 11)
    source = ms.Source("t.nii.gz", "{stem}", views="3d")
    seen = list(ms.views(MedicalImage(volume), source))
    assert [(a, i) for a, i, _ in seen] == ([("axial", i) for i in (0, 4, 8)] + [("coronal", i) for i in (0, 4, 8)]
                                            + [("sagittal", i) for i in (0, 4, 8)])
    axis, index, view = seen[4]  # coronal 4: (z, x), rows flipped so that superior is at the top
    assert view.shape == (9, 11) and torch.equal(view, volume[:, 4, :].flip(0))
    assert ms.foreground(torch.tensor([0.0, 4.0, 6.0, 10.0]), "percentile", 100.0) == 0.5
    assert ms.foreground(torch.tensor([-1000.0, -501.0, -499.0, 40.0]), "hu", 0.0) == 0.5
    dicom = MedicalImage(volume, meta={"format": "dicom-series"})  # flipped into the NIfTI orientation
    _, _, first = next(ms.views(dicom, ms.Source("d", "{stem}", views="axial")))
    assert torch.equal(first, volume[0].flip(0, 1))


# --- exports on fake data roots ------------------------------------------------------------------
def test_ct_splits_on_a_fake_root(tmp_path):
    root = _fake_ct_root(tmp_path / "data")
    volume = read_volume(root / "ct/totalsegmentator/example_ct.nii.gz", modality="CT")
    manifest = ms.export_split("ct", "test", root, tmp_path / "test")
    assert sorted(p.name for p in (tmp_path / "test").iterdir()) == ["manifest.json", "slice040.npy", "slice056.npy",
                                                                      "slice075.npy"]
    for z in (40, 56, 75):  # exactly the slices of docs/medical.md
        assert np.array_equal(np.load(tmp_path / f"test/slice{z:03d}.npy"), hu_window(volume.data[z]).numpy())
    assert manifest["sizes"] == {"97x96": 3} and manifest["files"][0]["index"] == 40

    manifest = ms.export_split("ct", "val", root, tmp_path / "val")
    assert [r["file"] for r in manifest["files"]] == ["slice020.png", "slice090.png"]
    assert torch.allclose(load_image(tmp_path / "val/slice090.png")[0], hu_window(volume.data[90]), atol=1e-5)

    train = ms.export_split("ct", "train", root, tmp_path / "train", sources=ms.SOURCES[("ct", "train")][:1])
    assert train["count"] == 5 and train["sources"][0]["dropped_low_foreground"] == 3
    assert [r["index"] for r in train["files"]] == [3, 4, 5, 6, 7]
    assert set(train["excluded"]) == set(ms.HELD_OUT)
    assert train["checks"]["example_ct_sm"].startswith("equal to example_ct slices 82-91")
    on_disk = json.loads((tmp_path / "train/manifest.json").read_text())
    assert on_disk["files"][0] == {"file": "fake_report_ct_cropped-003.png", "source":
                                   "ct/totalsegmentator/fake_report_ct_cropped/ct_cropped.nii.gz", "axis": "axial",
                                   "index": 3, "normalisation": {"method": "hu_window", "window_hu": [-1000.0, 1000.0]},
                                   "split": "train", "foreground": 1.0, "shape": [100, 98]}


def test_mri_train_drops_seg_maps_val_subjects_and_empty_template_slices(tmp_path):
    root = _fake_mri_root(tmp_path / "data")
    sources = (*ms.SOURCES[("mri", "train")][:2], ms.SOURCES[("mri", "train")][3])
    manifest = ms.export_split("mri", "train", root, tmp_path / "out", sources=sources, min_foreground=0.15)
    names = {r["file"] for r in manifest["files"]}
    assert {n for n in names if n.startswith("brats")} == {f"brats_train_001_{c}_080_w.png"
                                                           for c in ("t1", "t1ce", "t2", "flair")}
    assert len(manifest["excluded"]) == 4 and all("subject 006" in r for r in manifest["excluded"].values())
    template = [r for r in manifest["files"] if r["source"].endswith("ch2.nii.gz")]
    assert template and all(r["foreground"] >= 0.15 and r["index"] % 4 == 0 for r in template)
    assert {r["axis"] for r in template} == {"axial", "coronal", "sagittal"}
    assert manifest["sources"][-1]["dropped_low_foreground"] > 0
    for record in manifest["files"]:
        image = load_image(tmp_path / "out" / record["file"])
        assert list(image.shape[1:]) == record["shape"] and min(record["shape"]) >= 96
        assert float(image.max()) == 1.0  # divided by its 99.9th percentile, clipped
    val = ms.export_split("mri", "val", root, tmp_path / "val")
    assert val["count"] == 4 and val["excluded"] == {}


def test_mri_test_writes_images_over_their_max_magnitude_as_npy(tmp_path):
    root = tmp_path / "data"
    knee = root / "mri/fastmri_knee_scoremri"
    (knee / "real/retrospective").mkdir(parents=True)
    (knee / "single-coil").mkdir()
    rng = np.random.default_rng(2)
    for i in (1, 2, 3):
        np.save(knee / f"real/retrospective/00{i}.npy", (rng.random((96, 100)) * 3).astype(np.float32))
    complex_image = (rng.standard_normal((100, 96)) + 1j * rng.standard_normal((100, 96))).astype(np.complex128)
    np.save(knee / "single-coil/001.npy", complex_image)
    assert ms.main(["--modality", "mri", "--split", "test", "--data", str(root), "--out", str(tmp_path / "t")]) == 0
    files = sorted(p.name for p in (tmp_path / "t").glob("*.npy"))
    assert files == ["knee-retro-001.npy", "knee-retro-002.npy", "knee-retro-003.npy", "knee-singlecoil-001.npy"]
    image = np.load(tmp_path / "t/knee-singlecoil-001.npy")  # complex: the phase is kept
    assert image.dtype == np.complex64 and image.shape == (100, 96)
    assert np.allclose(image, complex_image / np.abs(complex_image).max(), atol=1e-6)
    assert np.load(tmp_path / "t/knee-retro-001.npy").dtype == np.float32


# --- failures --------------------------------------------------------------------------------------
def test_failures_write_nothing_and_keep_an_earlier_export(tmp_path, capsys):
    root = _fake_ct_root(tmp_path / "data")
    runs = tmp_path / "runs"
    ms.export_split("ct", "val", root, runs / "val")
    before = _listing(runs)

    small = _nifti(root / "ct/small/s.nii.gz", np.zeros((64, 200)))  # read as 200 x 64
    _one_line_error(ms.export_split, "ct", "train", root, runs / "small",
                    sources=[ms.Source("ct/small/*.nii.gz", "{stem}", norm="hu")], match="smaller than 96x96")
    _one_line_error(ms.export_split, "ct", "train", root, runs / "x",
                    sources=[ms.Source("ct/nothing/*.nii.gz", "{stem}")], match="no files match")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("keep")
    _one_line_error(ms.export_split, "ct", "val", root, tmp_path / "mine", match="not an earlier export")
    assert (tmp_path / "mine/notes.txt").read_text() == "keep" and small.is_file()

    corrupt = root / "ct/totalsegmentator/example_ct.nii.gz"
    corrupt.write_bytes(corrupt.read_bytes()[:300])
    _one_line_error(ms.export_split, "ct", "val", root, runs / "val", match="corrupt NIfTI")
    _one_line_error(ms.export_split, "ct", "test", root, runs / "test", match="corrupt NIfTI")
    assert _listing(runs) == before  # the earlier export untouched; no new folder, no temp folder left

    assert ms.main(["--modality", "ct", "--split", "val", "--data", str(tmp_path / "none"), "--out",
                    str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data folder not found") and err.count("\n") == 1


# --- real data -------------------------------------------------------------------------------------
def test_real_data_held_out_ct_and_mri_val(shared_data, tmp_path):
    checks = ms.held_out_check(shared_data)
    assert checks["example_ct_sm"].startswith("equal to example_ct slices 82-111")
    assert len(ms.exclusions("mri", shared_data)) == 8  # the diffusion-anomaly slices of BraTS subject 006
    manifest = ms.export_split("ct", "test", shared_data, tmp_path / "ct-test")
    volume = read_volume(shared_data / "ct/totalsegmentator/example_ct.nii.gz", modality="CT")
    for z in (40, 56, 75):
        assert np.array_equal(np.load(tmp_path / f"ct-test/slice{z:03d}.npy"), hu_window(volume.data[z]).numpy())
    assert manifest["sizes"] == {"101x122": 3}
    manifest = ms.export_split("mri", "val", shared_data, tmp_path / "mri-val")
    assert manifest["count"] == 8 and manifest["sizes"] == {"240x240": 8}
    image = load_image(tmp_path / "mri-val" / manifest["files"][0]["file"])
    assert image.shape == (1, 240, 240) and 0.0 <= float(image.min()) and float(image.max()) == 1.0


def test_real_data_t2_splits_keep_the_translation_pairs_apart(shared_data, tmp_path):
    """The T2 prior trains on subject 001's t2 and the SynDiff T2 slices; the translation test pairs are the
    co-registered t1 / t2 slices of the other BraTS subjects."""
    train = ms.export_split("t2", "train", shared_data, tmp_path / "train")
    brats = {r["file"] for r in train["files"] if r["file"].startswith("brats")}
    assert brats and all("_001_t2_" in name for name in brats)
    assert sum(r["file"].startswith("syndiff") for r in train["files"]) == 25
    test = ms.export_split("t2", "test", shared_data, tmp_path / "test")
    names = {r["file"] for r in test["files"]}
    assert len(names) == 8 and not any("_001_" in n for n in names)
    assert {n.replace("_t1_", "_t2_") for n in names if "_t1_" in n} == {n for n in names if "_t2_" in n}
