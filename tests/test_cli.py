"""The `idm` command: measure → file → reconstruct, eval JSON, demo, and one-line errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from idm.cli import main
from idm.data import load_image, sample_images, save_image
from idm.metrics import psnr


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    images = sample_images(64)
    for name in ("camera", "coffee"):
        save_image(folder / f"{name}.png", images[name])
    save_image(folder / "odd.png", images["moon"][:, :45, :50])
    return folder


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_measure_file_reconstruct_uses_only_the_file(image_dir, tmp_path, capsys):
    meas = tmp_path / "y.safetensors"
    code, _, err = run(capsys, "measure", image_dir / "camera.png", "--ratio", 0.3, "--seed", 7, "-o", meas)
    assert code == 0, err
    # the decoder sees nothing but the file: move it elsewhere, delete the source folder's copy
    moved = tmp_path / "elsewhere" / "m.safetensors"
    moved.parent.mkdir()
    os.replace(meas, moved)
    out_png = tmp_path / "out.png"
    code, _, err = run(capsys, "reconstruct", moved, "-o", out_png, "--method", "tv")
    assert code == 0, err
    x = load_image(out_png)[None]
    truth = load_image(image_dir / "camera.png")[None]
    assert x.shape == truth.shape
    assert float(psnr(x, truth)[0]) > 20.0


def test_measure_batch_and_odd_size(image_dir, tmp_path, capsys):
    meas = tmp_path / "y.safetensors"
    code, _, err = run(capsys, "measure", image_dir / "camera.png", image_dir / "coffee.png",
                       "--ratio", 0.5, "-o", meas)
    assert code == 0, err
    code, _, err = run(capsys, "reconstruct", meas, "-o", tmp_path / "outs", "--method", "pinv")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "outs").iterdir()) == ["camera.png", "coffee.png"]
    code, _, err = run(capsys, "reconstruct", image_dir / "odd.png", "--ratio", 0.5, "-o", tmp_path / "odd.png")
    assert code == 0, err
    assert Image.open(tmp_path / "odd.png").size == (50, 45)


def test_noise_and_seed_are_stored(image_dir, tmp_path, capsys):
    from idm.io.measurement import build_operator, load_measurement

    meas = tmp_path / "y.safetensors"
    run(capsys, "measure", image_dir / "camera.png", "--ratio", 0.1, "--seed", 3, "--noise", 0.05,
        "--block-size", 16, "-o", meas)
    op = build_operator(load_measurement(meas))
    cfg = op.config()
    assert (cfg["ratio"], cfg["seed"], cfg["block_size"], cfg["noise_sigma"]) == (0.1, 3, 16, 0.05)
    assert tuple(cfg["image_size"]) == (64, 64)


def test_eval_json_shape(image_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    code, stdout, err = run(capsys, "eval", "--data", image_dir, "--ratio", 0.3, "--method", "pinv",
                            "--limit", 2, "--json", out)
    assert code == 0, err
    assert "mean" in stdout
    result = json.loads(out.read_text())
    assert set(result) == {"method", "ratio", "images", "mean"}
    assert result["method"] == "pinv" and result["ratio"] == 0.3
    assert [set(i) for i in result["images"]] == [{"name", "psnr", "ssim", "seconds"}] * 2
    assert set(result["mean"]) == {"psnr", "ssim", "seconds"}
    assert all(isinstance(v, float) for v in result["mean"].values())


def test_eval_tv_beats_pinv(image_dir, tmp_path, capsys):
    scores = {}
    for method in ("pinv", "tv"):
        out = tmp_path / f"{method}.json"
        run(capsys, "eval", "--data", image_dir, "--ratio", 0.1, "--method", method, "--limit", 1, "--json", out)
        scores[method] = json.loads(out.read_text())["mean"]["psnr"]
    assert scores["tv"] > scores["pinv"] + 5


def test_demo_tiny(tmp_path, capsys):
    code, stdout, err = run(capsys, "demo", "-o", tmp_path / "demo", "--ratios", 0.5, "--methods", "pinv", "tv",
                            "--size", 64, "--limit", 2)
    assert code == 0, err
    assert "pinv" in stdout and "tv" in stdout
    assert (tmp_path / "demo" / "demo-ratio50.png").is_file()
    runs = json.loads((tmp_path / "demo" / "results.json").read_text())["runs"]
    assert [r["method"] for r in runs] == ["pinv", "tv"]


# --- bad input: one clear line, non-zero exit, no output file --------------------------------

def _expect_error(capsys, argv, fragment: str, output: Path | None = None) -> None:
    code, _, err = run(capsys, *argv)
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], err
    if output is not None:
        assert not output.exists()


@pytest.mark.parametrize("ratio", ["0", "1.5", "-0.1", "nan"])
def test_bad_ratio(image_dir, tmp_path, capsys, ratio):
    out = tmp_path / "y.safetensors"
    _expect_error(capsys, ["measure", image_dir / "camera.png", "--ratio", ratio, "-o", out], "ratio", out)


def test_nan_pixels(tmp_path, capsys):
    bad = tmp_path / "nan.tif"
    array = np.full((32, 32), 0.5, dtype=np.float32)
    array[3, 4] = np.nan
    import tifffile

    tifffile.imwrite(bad, array)
    out = tmp_path / "y.safetensors"
    _expect_error(capsys, ["measure", bad, "--ratio", 0.1, "-o", out], "NaN", out)


def test_corrupt_and_missing_files(image_dir, tmp_path, capsys):
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "o.png"
    _expect_error(capsys, ["reconstruct", corrupt, "--ratio", 0.1, "-o", out], "broken.png", out)
    _expect_error(capsys, ["reconstruct", tmp_path / "missing.safetensors", "-o", out], "missing.safetensors", out)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 40)
    _expect_error(capsys, ["reconstruct", garbage, "-o", out], "garbage.safetensors", out)


def test_measurement_metadata_mismatch(image_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    meas = tmp_path / "y.safetensors"
    run(capsys, "measure", image_dir / "camera.png", "--ratio", 0.1, "-o", meas)
    with safe_open(str(meas), "pt") as handle:
        metadata = handle.metadata()
    operator = json.loads(metadata["operator"])
    operator["ratio"] = 0.5  # y has 103 rows per block, the metadata now claims 512
    tampered = tmp_path / "tampered.safetensors"
    save_file(load_file(str(meas)), str(tampered), metadata={**metadata, "operator": json.dumps(operator)})
    out = tmp_path / "o.png"
    _expect_error(capsys, ["reconstruct", tampered, "-o", out], "shape", out)


def test_unknown_method_and_missing_checkpoint(image_dir, tmp_path, capsys):
    out = tmp_path / "o.png"
    _expect_error(capsys, ["reconstruct", image_dir / "camera.png", "--ratio", 0.1, "-o", out, "--method", "nope"],
                  "unknown method", out)
    _expect_error(capsys, ["eval", "--data", tmp_path / "nowhere", "--ratio", 0.1, "--method", "tv"], "nowhere")


def test_images_of_different_sizes_in_one_file(image_dir, tmp_path, capsys):
    out = tmp_path / "y.safetensors"
    _expect_error(capsys, ["measure", image_dir / "camera.png", image_dir / "odd.png", "--ratio", 0.1, "-o", out],
                  "differ in size", out)


def test_keep_freed_memory_sets_glibc_thresholds_and_can_be_turned_off(monkeypatch) -> None:
    import platform
    import sys

    from idm.runtime import keep_freed_memory

    monkeypatch.setenv("IDM_KEEP_FREED_MEMORY", "0")
    assert keep_freed_memory() is False
    monkeypatch.delenv("IDM_KEEP_FREED_MEMORY")
    assert keep_freed_memory() is (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc")
