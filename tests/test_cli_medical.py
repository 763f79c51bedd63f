"""`idm --operator mri|ct`: measure → file → reconstruct round trips, option errors, raw k-space and
raw sinograms (tiny files written here, and the real files of ../shared/data when present), eval."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from idm.cli import main
from idm.cli.common import synthetic_sensitivities
from idm.data import load_image, sample_images, save_image
from idm.data.phantoms import shepp_logan
from idm.io.measurement import build_operator, load_measurement
from idm.metrics import psnr
from idm.physics import ParallelBeamCT
from idm.physics.mri import fft2c, ifft2c
from idm.registry import METHODS

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    images = sample_images(SIZE)
    for name in ("camera", "coffee"):
        save_image(folder / f"{name}.png", images[name])
    return folder


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def score(path: Path, truth: Path | torch.Tensor) -> float:
    reference = load_image(truth)[None] if isinstance(truth, Path) else truth
    return float(psnr(load_image(path)[None], reference)[0])


# --- measure → file → reconstruct ------------------------------------------------------------------
def test_mri_single_coil_round_trip(image_dir, tmp_path, capsys):
    meas = tmp_path / "k.safetensors"
    code, out, err = run(capsys, "measure", image_dir / "camera.png", "--operator", "mri", "--acceleration", 2,
                         "--mask", "equispaced", "--seed", 3, "-o", meas)
    assert code == 0, err
    stored = load_measurement(meas)
    assert stored.y.dtype == torch.complex64 and tuple(stored.y.shape) == (1, 1, SIZE, SIZE)
    config = stored.operator_config
    assert (config["kind"], config["acceleration"], config["mask_type"], config["seed"]) == ("mri", 2.0, "equispaced", 3)
    op = build_operator(stored)
    assert float(op.mask.float().mean()) == pytest.approx(0.5, abs=0.1)
    png, raw = tmp_path / "x.png", tmp_path / "x.npy"
    assert run(capsys, "reconstruct", meas, "--method", "pinv", "-o", png)[0] == 0
    assert run(capsys, "reconstruct", meas, "--method", "pinv", "-o", raw)[0] == 0
    values = np.load(raw)
    assert values.dtype == np.complex64 and values.shape == (SIZE, SIZE)  # one channel: (H, W)
    expected = op.A_dagger(stored.y)[0, 0].numpy()
    np.testing.assert_allclose(values, expected, atol=1e-6)
    # the PNG is the magnitude, clipped to [0, 1]
    magnitude = torch.from_numpy(np.abs(values)).clamp(0, 1)[None, None]
    assert torch.allclose(load_image(png)[None], magnitude, atol=1 / 255 + 1e-6)
    assert score(png, image_dir / "camera.png") > 18


def test_mri_multi_coil_round_trip_with_explicit_sensitivities(image_dir, tmp_path, capsys):
    sens_file = tmp_path / "sens.npy"
    np.save(sens_file, synthetic_sensitivities(4, (SIZE, SIZE)).numpy())
    meas = tmp_path / "k.safetensors"
    code, _, err = run(capsys, "measure", image_dir / "camera.png", "--operator", "mri", "--acceleration", 2,
                       "--sensitivities", sens_file, "--coils", 4, "-o", meas)
    assert code == 0, err
    stored = load_measurement(meas)
    assert tuple(stored.y.shape) == (1, 4, SIZE, SIZE) and stored.y.is_complex()
    assert stored.operator_config["sensitivities"] == "explicit"
    assert torch.equal(stored.operator_tensors["sensitivities"], torch.from_numpy(np.load(sens_file)))
    out = tmp_path / "x.png"
    code, _, err = run(capsys, "reconstruct", meas, "--method", "pinv", "-o", out)
    assert code == 0, err
    assert score(out, image_dir / "camera.png") > 30  # CG-SENSE with 4 coils at 2×, noiseless
    # simulated coils (--coils without a file), straight from the image
    code, stdout, err = run(capsys, "reconstruct", image_dir / "camera.png", "--operator", "mri", "--coils", 4,
                            "--acceleration", 2, "--method", "pinv", "-o", tmp_path / "y.png")
    assert code == 0, err
    assert "magnitude PSNR" in stdout


def test_mri_mask_file_and_complex_npy_image(tmp_path, capsys):
    truth = shepp_logan(SIZE)[0].double() * torch.exp(1j * torch.linspace(0, 1, SIZE))[None, :]
    np.save(tmp_path / "phantom.npy", truth.to(torch.complex64).numpy())
    columns = np.zeros(SIZE, dtype=np.uint8)
    columns[::2] = 1
    columns[12:20] = 1
    np.save(tmp_path / "mask.npy", columns)
    meas = tmp_path / "k.safetensors"
    code, _, err = run(capsys, "measure", tmp_path / "phantom.npy", "--operator", "mri", "--mask", tmp_path / "mask.npy",
                       "-o", meas)
    assert code == 0, err
    stored = load_measurement(meas)
    assert stored.operator_config["mask"] == "explicit"
    assert torch.equal(stored.operator_tensors["mask"][0], torch.from_numpy(columns).bool())
    assert run(capsys, "reconstruct", meas, "--method", "pinv", "-o", tmp_path / "x.png")[0] == 0


def test_ct_round_trip(image_dir, tmp_path, capsys):
    meas = tmp_path / "s.safetensors"
    code, out, err = run(capsys, "measure", image_dir / "camera.png", "--operator", "ct", "--views", 30, "-o", meas)
    assert code == 0, err
    stored = load_measurement(meas)
    detectors = math.ceil(math.sqrt(2) * SIZE)
    assert tuple(stored.y.shape) == (1, 1, 30, detectors) and stored.y.dtype == torch.float32
    assert stored.operator_config["views"] == 30
    methods = ["pinv", "tv"] + (["fbp"] if "fbp" in METHODS.names() else [])
    for method in methods:
        out_png = tmp_path / f"{method}.png"
        code, _, err = run(capsys, "reconstruct", meas, "--method", method, "-o", out_png)
        assert code == 0, err
        assert score(out_png, image_dir / "camera.png") > 25, method


def test_ct_fbp_round_trip(image_dir, tmp_path, capsys):
    if "fbp" not in METHODS.names():
        pytest.skip("method fbp is not registered in this installation")
    meas = tmp_path / "s.safetensors"
    assert run(capsys, "measure", image_dir / "camera.png", "--operator", "ct", "--views", 90, "-o", meas)[0] == 0
    code, _, err = run(capsys, "reconstruct", meas, "--method", "fbp", "-o", tmp_path / "x.png")
    assert code == 0, err
    assert score(tmp_path / "x.png", image_dir / "camera.png") > 20


def test_ct_limited_angle_and_detectors_are_stored(image_dir, tmp_path, capsys):
    meas = tmp_path / "s.safetensors"
    code, _, err = run(capsys, "measure", image_dir / "camera.png", "--operator", "ct", "--views", 20,
                       "--angles", "0,90", "--detectors", 40, "--noise", 0.01, "-o", meas)
    assert code == 0, err
    config = load_measurement(meas).operator_config
    assert (config["angle_range"], config["detectors"], config["noise_sigma"]) == ([0.0, 90.0], 40, 0.01)


# --- option errors: one line, exit 2, nothing written ------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["measure", "{img}", "--views", 30, "--ratio", 0.3, "-o", "{out}"], "--views applies to --operator ct only"),
    (["measure", "{img}", "--operator", "mri", "--ratio", 0.3, "-o", "{out}"],
     "--ratio applies to --operator blockcs or inpainting only"),
    (["measure", "{img}", "--operator", "ct", "--acceleration", 4, "-o", "{out}"],
     "--acceleration applies to --operator mri only"),
    (["measure", "{img}", "--operator", "blockcs", "--factor", 2, "--ratio", 0.3, "-o", "{out}"],
     "--factor applies to --operator superres only"),
    (["measure", "{img}", "--operator", "mri", "--acceleration", 0.5, "-o", "{out}"], "acceleration"),
    (["measure", "{img}", "--operator", "ct", "--angles", "90,10", "-o", "{out}"], "--angles"),
    (["measure", "{img}", "--operator", "ct", "--angles", "abc", "-o", "{out}"], "--angles"),
    (["measure", "{img}", "--operator", "mri", "--mask", "{missing}", "-o", "{out}"], "does not exist"),
    (["measure", "{img}", "--operator", "mri", "--sensitivities", "{missing}", "-o", "{out}"], "does not exist"),
    (["measure", "{img}", "--operator", "mri", "--mask-file", "{img}", "--acceleration", 4, "-o", "{out}"],
     "--acceleration does not apply with a mask file"),
    (["measure", "{img}", "--operator", "inpainting", "-o", "{out}"], "--ratio is required"),
    (["reconstruct", "{img}", "--operator", "ct", "--views", 0, "-o", "{out}"], "--views must be >= 1"),
    (["reconstruct", "{img}", "--row", 1, "-o", "{out}"], "--row applies to --sinogram only"),
    (["reconstruct", "--kspace", "{missing}", "--acceleration", 4, "-o", "{out}"],
     "--acceleration does not apply to --kspace"),
    (["reconstruct", "--sinogram", "{missing}", "--operator", "mri", "-o", "{out}"], "--operator mri contradicts"),
    (["reconstruct", "{img}", "--kspace", "{missing}", "-o", "{out}"], "exclude each other"),
    (["eval", "--data", "{dir}", "--operator", "superres", "--views", 3], "--views applies to --operator ct only"),
])
def test_option_errors(image_dir, tmp_path, capsys, argv, message):
    out = tmp_path / "out" / "x.png"
    names = {"img": image_dir / "camera.png", "out": out, "missing": tmp_path / "missing.npy", "dir": image_dir}
    code, stdout, err = run(capsys, *[str(a).format(**names) if isinstance(a, str) else a for a in argv])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not out.parent.exists()


def test_file_decides_the_operator(image_dir, tmp_path, capsys):
    meas = tmp_path / "k.safetensors"
    assert run(capsys, "measure", image_dir / "camera.png", "--operator", "mri", "-o", meas)[0] == 0
    for extra, message in ((["--operator", "ct"], "--operator ct contradicts"),
                           (["--acceleration", 8], "--acceleration does not apply to the measurement file"),
                           (["--noise", 0.1], "--noise does not apply")):
        code, _, err = run(capsys, "reconstruct", meas, "--method", "pinv", "-o", tmp_path / "x.png", *extra)
        assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.png").exists()
    # giving the file's own operator is fine
    assert run(capsys, "reconstruct", meas, "--operator", "mri", "--method", "pinv", "-o", tmp_path / "x.png")[0] == 0


# --- raw k-space -----------------------------------------------------------------------------------
def _phantom() -> torch.Tensor:
    return shepp_logan(SIZE)[0].double()


def test_raw_single_coil_kspace_mat(tmp_path, capsys):
    scipy_io = pytest.importorskip("scipy.io")
    truth = _phantom()
    kspace = fft2c(truth.to(torch.complex128))
    kspace[:, 1::3] = 0  # undersampled columns
    scipy_io.savemat(tmp_path / "k.mat", {"kData": kspace.numpy().astype(np.complex64)})
    out = tmp_path / "x.png"
    code, _, err = run(capsys, "reconstruct", "--kspace", tmp_path / "k.mat", "--method", "pinv", "-o", out)
    assert code == 0, err
    image = load_image(out)[None]
    zero_filled = ifft2c(kspace).abs()
    assert torch.allclose(image[0, 0].double(), zero_filled / zero_filled.max(), atol=1 / 255 + 1e-6)


def test_raw_multi_coil_kspace_estimates_sensitivities(tmp_path, capsys):
    truth = _phantom()
    sens = synthetic_sensitivities(4, (SIZE, SIZE)).to(torch.complex128)
    kspace = fft2c(sens * truth)
    kspace[:, :, 0:9:2] = 0  # outer columns undersampled, the 24 centre columns kept
    kspace[:, :, 25::2] = 0
    np.save(tmp_path / "k.npy", kspace.numpy().astype(np.complex64))
    out = tmp_path / "x.png"
    code, _, err = run(capsys, "reconstruct", "--kspace", tmp_path / "k.npy", "--method", "pinv", "-o", out)
    assert code == 0, err
    image = load_image(out)[None]
    assert float(psnr(image, (truth / truth.max()).float()[None, None])[0]) > 25
    # explicit sensitivities: --coils must agree, the shape must match
    np.save(tmp_path / "s.npy", sens.numpy().astype(np.complex64))
    code, _, err = run(capsys, "reconstruct", "--kspace", tmp_path / "k.npy", "--sensitivities", tmp_path / "s.npy",
                       "--method", "pinv", "-o", tmp_path / "y.png")
    assert code == 0, err
    assert score(tmp_path / "y.png", (truth / truth.max()).float()[None, None]) > 30
    code, _, err = run(capsys, "reconstruct", "--kspace", tmp_path / "k.npy", "--coils", 8, "-o", tmp_path / "z.png")
    assert code == 2 and "--coils 8 contradicts" in err
    # too little fully sampled centre for ESPIRiT: one-line error asking for --sensitivities
    kspace[:, :, 1::2] = 0
    np.save(tmp_path / "sparse.npy", kspace.numpy().astype(np.complex64))
    code, _, err = run(capsys, "reconstruct", "--kspace", tmp_path / "sparse.npy", "-o", tmp_path / "z.png")
    assert code == 2 and "--sensitivities" in err and err.count("\n") == 1
    assert not (tmp_path / "z.png").exists()


# --- raw sinograms ---------------------------------------------------------------------------------
def _write_dxchange(path: Path, sinogram: torch.Tensor, theta: np.ndarray, offset: int = 0) -> Path:
    """Raw counts of a (views, D) sinogram as 2 identical detector rows, with white/dark fields;
    ``offset`` moves the rotation axis ``offset`` cells away from D // 2 (zero-padding the edge)."""
    h5py = pytest.importorskip("h5py")
    sino = sinogram.numpy()
    if offset:
        sino = np.roll(np.pad(sino, ((0, 0), (abs(offset), abs(offset)))), offset, axis=1)[:, abs(offset):-abs(offset)]
    dark, white = 100.0, 10000.0
    counts = dark + (white - dark) * np.exp(-sino)
    data = np.repeat(counts[:, None, :], 2, axis=1).astype(np.float32)
    with h5py.File(path, "w") as handle:
        handle.create_dataset("exchange/data", data=data)
        handle.create_dataset("exchange/data_white", data=np.full((3, 2, sino.shape[1]), white, np.float32))
        handle.create_dataset("exchange/data_dark", data=np.full((2, 2, sino.shape[1]), dark, np.float32))
        handle.create_dataset("exchange/theta", data=theta)
    return path


def _tiny_sinogram(views: int = 61) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    truth = torch.nn.functional.pad(shepp_logan(SIZE - 8)[0].double(), (4, 4, 4, 4))  # room to move the axis
    theta = np.linspace(0.0, 180.0, views)  # includes 180°: a mirrored pair for the axis estimate
    op = ParallelBeamCT((SIZE, SIZE), angles=theta.tolist(), detectors=SIZE)
    return op.A(truth[None, None] * 0.05)[0, 0], theta, truth


@pytest.mark.parametrize("offset", [0, 3])
def test_raw_sinogram(tmp_path, capsys, offset):
    sinogram, theta, truth = _tiny_sinogram()
    path = _write_dxchange(tmp_path / "s.h5", sinogram, theta, offset)
    out = tmp_path / "x.png"
    code, stdout, err = run(capsys, "reconstruct", "--sinogram", path, "--row", 0, "--method", "pinv", "-o", out)
    assert code == 0, err
    assert f"rotation axis at detector {SIZE // 2 + offset:.1f}" in stdout
    image = load_image(out)[None]
    assert tuple(image.shape) == (1, 1, SIZE, SIZE)
    assert float(psnr(image, (truth / truth.max()).float()[None, None])[0]) > 20
    # middle: the axis is assumed at D // 2, so an offset axis blurs the image
    code, _, err = run(capsys, "reconstruct", "--sinogram", path, "--rotation-center", "middle", "--method", "pinv",
                       "-o", tmp_path / "m.png")
    assert code == 0, err
    if offset:
        assert score(tmp_path / "m.png", (truth / truth.max()).float()[None, None]) < score(out, (truth / truth.max()).float()[None, None])


def test_raw_sinogram_binning_and_errors(tmp_path, capsys):
    sinogram, theta, _ = _tiny_sinogram()
    path = _write_dxchange(tmp_path / "s.h5", sinogram, theta)
    code, _, err = run(capsys, "reconstruct", "--sinogram", path, "--bin", 2, "--method", "pinv", "-o", tmp_path / "b.png")
    assert code == 0, err
    assert tuple(load_image(tmp_path / "b.png").shape) == (1, SIZE // 2, SIZE // 2)
    for extra, message in ((["--row", 5], "out of range"), (["--bin", 100], "--bin 100"),
                           (["--rotation-center", "x"], "--rotation-center"), (["--views", 3], "does not apply")):
        code, _, err = run(capsys, "reconstruct", "--sinogram", path, "-o", tmp_path / "e.png", *extra)
        assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "e.png").exists()


# --- idm eval --operator mri | ct ------------------------------------------------------------------
def test_eval_mri_and_ct(image_dir, tmp_path, capsys):
    out = tmp_path / "mri.json"
    code, stdout, err = run(capsys, "eval", "--data", image_dir, "--operator", "mri", "--acceleration", 2,
                            "--method", "pinv", "--json", out)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["operator"]["kind"] == "mri" and result["ratio"] is None and len(result["images"]) == 2
    # fastMRI PSNR: magnitudes normalised by the ground truth's maximum
    from idm.evaluation import operator_factory

    truth = load_image(image_dir / "camera.png")[None]
    op = operator_factory("mri", seed=0, acceleration=2.0, center_fraction=None, mask_type="random")((SIZE, SIZE), 0)
    estimate = op.A_dagger(op.A(truth)).abs().double()
    peak = truth.double().max()
    expected = 10 * math.log10(1 / float((estimate / peak - truth.double() / peak).square().mean()))
    assert result["images"][0]["name"] == "camera" and result["images"][0]["psnr"] == pytest.approx(expected, abs=1e-6)
    out = tmp_path / "ct.json"
    code, stdout, err = run(capsys, "eval", "--data", image_dir, "--operator", "ct", "--views", 30, "--method", "pinv",
                            "--json", out)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["operator"]["views"] == 30 and result["mean"]["psnr"] > 25


def test_eval_mri_complex_npy_ground_truth(tmp_path, capsys):
    folder = tmp_path / "npy"
    folder.mkdir()
    truth = (_phantom() * torch.exp(1j * torch.linspace(0, 2, SIZE))[None, :]).to(torch.complex64)
    np.save(folder / "a.npy", truth.numpy())
    code, stdout, err = run(capsys, "eval", "--data", folder, "--operator", "mri", "--acceleration", 1,
                            "--method", "pinv", "--json", tmp_path / "r.json")
    assert code == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["images"][0]["psnr"] > 60  # fully sampled: exact


# --- real data (skip without ../shared/data) -------------------------------------------------------
def _real(shared_data: Path, relative: str) -> Path:
    path = shared_data / relative
    if not path.exists():
        pytest.skip(f"real data not available: {path} is missing")
    return path


def _not_garbage(path: Path) -> torch.Tensor:
    image = load_image(path)[0]
    assert bool(torch.isfinite(image).all()) and float(image.std()) > 0.05 and float(image.max()) == 1.0
    return image


def test_real_single_coil_kspace(shared_data, tmp_path, capsys):
    pytest.importorskip("scipy.io")
    path = _real(shared_data, "mri/kspace_loraks_espirit/LORAKS_examples/T2_single_channel.mat")
    out = tmp_path / "t2.png"
    code, _, err = run(capsys, "reconstruct", "--kspace", path, "--method", "pinv", "-o", out)
    assert code == 0, err
    image = _not_garbage(out)
    assert tuple(image.shape) == (256, 340)
    h, w = image.shape  # the head in the middle, air at the borders
    assert float(image[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4].mean()) > 3 * float(image[:, : w // 10].mean())


def test_real_multi_coil_kspace(shared_data, tmp_path, capsys):
    pytest.importorskip("scipy.io")
    path = _real(shared_data, "mri/kspace_loraks_espirit/ESPIRiT_data/brain_alias_8ch.mat")
    out = tmp_path / "brain.png"
    code, _, err = run(capsys, "reconstruct", "--kspace", path, "--method", "pinv", "-o", out)
    assert code == 0, err
    image = _not_garbage(out)
    assert tuple(image.shape) == (320, 256)
    h, w = image.shape
    assert float(image[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4].mean()) > 0.1


@pytest.mark.parametrize("method", ["pinv", "fbp"])
def test_real_tooth_sinogram(shared_data, tmp_path, capsys, method):
    pytest.importorskip("h5py")
    if method not in METHODS.names():
        pytest.skip(f"method {method} is not registered in this installation")
    path = _real(shared_data, "ct/tooth_microct_tomopy/tooth.h5")
    out = tmp_path / "tooth.png"
    binning = ["--bin", 4] if method == "pinv" else []  # CG on the full 640² image takes minutes on a CPU
    code, stdout, err = run(capsys, "reconstruct", "--sinogram", path, "--method", method, "-o", out, *binning)
    assert code == 0, err
    centre = float(stdout.split("rotation axis at detector ")[1].split()[0])
    assert 290 <= centre <= 300  # tomopy's find_center gives ≈ 296 for this file
    image = _not_garbage(out)
    # a clear object: a compact bright tooth in the middle on a dark background
    side = image.shape[0]
    middle = image[side // 4 : 3 * side // 4, side // 4 : 3 * side // 4]
    assert float((middle > 0.4).float().mean()) > 0.05
    border = torch.cat([image[: side // 8].flatten(), image[-side // 8 :].flatten()])
    assert float(border.mean()) < 0.1 and float(middle.mean()) > 3 * float(border.mean())


# --- idm demo --medical ----------------------------------------------------------------------------
def test_demo_medical_missing_data(tmp_path, capsys):
    out = tmp_path / "out"
    missing = tmp_path / "no-data"
    code, stdout, err = run(capsys, "demo", "--medical", "--data-root", missing, "-o", out)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert str(missing) in err and "--data-root" in err
    (missing / "mri").mkdir(parents=True)  # a root without the files: the first missing one is named
    code, stdout, err = run(capsys, "demo", "--medical", "--data-root", missing, "--cases", "ct-23v", "-o", out)
    assert code == 2 and str(missing / "ct/totalsegmentator/example_ct.nii.gz") in err and err.count("\n") == 1, err
    assert not out.exists()
    for argv, message in ((("--cases", "knee-4x"), "--cases needs --medical"),
                          (("--medical", "--ratios", 0.1), "--ratios does not apply to idm demo --medical")):
        code, _, err = run(capsys, "demo", *argv, "-o", out)
        assert code == 2 and message in err, err
    assert not out.exists()


def test_demo_medical_real_data(shared_data, tmp_path, capsys):
    pytest.importorskip("nibabel")
    pytest.importorskip("scipy.io")
    out = tmp_path / "demo"
    code, stdout, err = run(capsys, "demo", "--medical", "--data-root", shared_data, "--cases", "knee-4x", "ct-23v",
                            "brain-8coil", "--methods", "pinv", "fbp", "-o", out)
    assert code == 0, err
    assert "note: skipping fbp on knee-4x" in stdout and "note: skipping fbp on brain-8coil" in stdout
    table = [line.split() for line in stdout.splitlines() if line.split()[:1] in (["knee-4x"], ["ct-23v"], ["brain-8coil"])]
    rows = {tuple(cells[:2]): cells[2:] for cells in table}
    assert len(table) == 4 and set(rows) == {("knee-4x", "pinv"), ("ct-23v", "pinv"), ("ct-23v", "fbp"), ("brain-8coil", "pinv")}
    assert rows["brain-8coil", "pinv"][:2] == ["—", "—"]  # no ground truth: seconds only
    result = json.loads((out / "results.json").read_text())
    cases = {c["case"]: c for c in result["cases"]}
    assert list(cases) == ["knee-4x", "ct-23v", "brain-8coil"]
    knee, ct, brain = cases["knee-4x"], cases["ct-23v"], cases["brain-8coil"]
    assert len(knee["images"]) == 4 and [r["method"] for r in knee["runs"]] == ["pinv"]
    assert knee["operator"] == {"kind": "mri", "acceleration": 4.0, "mask_type": "random", "seed": 0}
    assert 26 < knee["runs"][0]["mean"]["psnr"] < 30  # zero-filled at 4x (docs/medical.md: 27.7 on 3 of the 4)
    assert len(knee["runs"][0]["images"]) == 4 and knee["runs"][0]["images"][3]["name"] == "knee-singlecoil-001"
    scores = {r["method"]: r["mean"] for r in ct["runs"]}
    assert ct["images"] == ["slice056"] and ct["operator"]["views"] == 23
    assert 25 < scores["fbp"]["psnr"] < scores["pinv"]["psnr"] < 31  # docs: 26.8 / 28.6 over three slices
    assert brain["runs"][0]["images"][0]["psnr"] is None and brain["runs"][0]["mean"]["seconds"] > 0
    for name in cases:
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_medical_skips_idm_without_checkpoint(shared_data, tmp_path, capsys, monkeypatch):
    pytest.importorskip("nibabel")
    import idm.io.checkpoint

    monkeypatch.setattr(idm.io.checkpoint, "checkpoint_search_dirs", lambda: [tmp_path])
    code, stdout, err = run(capsys, "demo", "--medical", "--data-root", shared_data, "--cases", "ct-23v",
                            "-o", tmp_path / "demo")
    assert code == 0, err
    assert "note: skipping idm" in stdout and "idm-ct" in stdout
    assert "note: skipping pnp" in stdout and "prior-ct" in stdout
    runs = json.loads((tmp_path / "demo" / "results.json").read_text())["cases"][0]["runs"]
    assert [r["method"] for r in runs] == ["fbp", "tv"] and runs[1]["mean"]["psnr"] > runs[0]["mean"]["psnr"] + 3
