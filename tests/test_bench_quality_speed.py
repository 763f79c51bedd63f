"""``idm bench quality`` and ``idm bench speed`` on tiny configurations (tiny prior, tiny IDM, 2-3 images)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from idm.bench.methods import MethodChoice, build_method, parse_value
from idm.bench.quality import run_quality
from idm.bench.speed import count_unet_calls
from idm.cli import main
from idm.data import ImageFolder
from idm.errors import IDMError
from idm.evaluation import blockcs_factory, evaluate
from idm.network import IDMNet
from idm.priors import Prior
from idm.registry import METHODS

from conftest import tiny_prior, tiny_unet_config

TINY = tiny_unet_config()
QUALITY_KEYS = {"method", "ratio", "psnr", "ssim", "seconds"}
SPEED_KEYS = {"method", "seconds", "unet_evals"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prior() -> Prior:
    return tiny_prior(TINY, seed=5)


@pytest.fixture(scope="module")
def prior_dir(prior: Prior, tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("bench") / "prior"
    prior.save(directory, "# tiny test prior", dtype=None)
    return str(directory)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, shape in enumerate([(24, 28), (20, 20), (18, 26)]):
        Image.fromarray((rng.random(shape) * 255).astype(np.uint8)).save(folder / f"img{i}.png")
    return folder


def quality_args(data_dir: Path, prior_dir: str, tmp_path: Path, *extra: str) -> list[str]:
    return ["bench", "quality", "--data", str(data_dir), "--ratios", "0.25", "0.5", "--methods", "pinv", "tv", "ddnm",
            "--prior", prior_dir, "--option", "ddnm.steps=3", "--block-size", "8", "--limit", "2",
            "--json", str(tmp_path / "quality.json"), "--figure", str(tmp_path / "quality.png"), *extra]


# --- quality -------------------------------------------------------------------------------------
def test_quality_writes_rows_and_figure(data_dir: Path, prior_dir: str, tmp_path: Path, capsys) -> None:
    assert main(quality_args(data_dir, prior_dir, tmp_path, "--per-image")) == 0
    payload = json.loads((tmp_path / "quality.json").read_text())
    assert set(payload) == {"rows"}
    rows = payload["rows"]
    assert [(r["method"], r["ratio"]) for r in rows] == [(m, r) for r in (0.25, 0.5) for m in ("pinv", "tv", "ddnm")]
    for row in rows:
        assert set(row) == QUALITY_KEYS
        assert isinstance(row["method"], str) and all(isinstance(row[k], float) for k in QUALITY_KEYS - {"method"})
        assert math.isfinite(row["psnr"]) and 0.0 <= row["ssim"] <= 1.0 and row["seconds"] >= 0.0
    with Image.open(tmp_path / "quality.png") as figure:
        assert figure.format == "PNG" and figure.width > figure.height > 0
    out = capsys.readouterr().out
    assert "img0" in out and "img1" in out and "img2" not in out  # per-image rows, --limit 2


def test_quality_scores_every_method_on_the_same_measurements(data_dir: Path, prior_dir: str, tmp_path: Path) -> None:
    """The benchmark's pinv row is exactly evaluate()'s on the same images, operators and seed."""
    assert main(quality_args(data_dir, prior_dir, tmp_path, "--seed", "3")) == 0
    rows = json.loads((tmp_path / "quality.json").read_text())["rows"]
    images = list(ImageFolder(data_dir, limit=2))
    for ratio in (0.25, 0.5):
        for method, options in (("pinv", {}), ("ddnm", {"steps": 3})):
            expected = evaluate(method, images, blockcs_factory(ratio, seed=3, block_size=8), ratio=ratio,
                                checkpoint=None if method == "pinv" else prior_dir, seed=3, options=options).mean
            row = next(r for r in rows if r["method"] == method and r["ratio"] == ratio)
            assert row["psnr"] == pytest.approx(expected["psnr"], abs=1e-9)
            assert row["ssim"] == pytest.approx(expected["ssim"], abs=1e-9)


def error_line(capsys) -> str:
    """The one ``error: ...`` line the CLI printed on stderr (progress bars aside)."""
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_quality_errors(data_dir: Path, prior_dir: str, tmp_path: Path, capsys) -> None:
    """Each failure exits with 2 and its own one-line message, and writes no JSON."""
    # an explicitly named method whose checkpoint is missing is an error, not a silent skip
    missing = tmp_path / "missing"
    assert main(quality_args(data_dir, str(missing), tmp_path)) == 2
    assert error_line(capsys) == f"error: checkpoint not found: {missing}"
    # a prior that exists but is broken is a different error than a missing one
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{oops")
    assert main(quality_args(data_dir, str(broken), tmp_path)) == 2
    assert error_line(capsys).startswith(f"error: corrupt checkpoint config {broken / 'config.json'}: ")
    assert main(quality_args(data_dir, prior_dir, tmp_path, "--option", "dps.steps=3")) == 2  # dps not compared
    assert error_line(capsys) == "error: --option dps.steps=3: expected METHOD.KEY=VALUE with METHOD among pinv, tv, ddnm"
    assert main(quality_args(data_dir, prior_dir, tmp_path, "--option", "ddnm.temperature=1")) == 2
    assert error_line(capsys) == "error: method 'ddnm' has no option(s) temperature; options: clip, eta, steps"
    assert main(quality_args(data_dir, prior_dir, tmp_path, "--ratios", "1.5")) == 2
    assert error_line(capsys) == "error: sampling ratio must lie in (0, 1], got 1.5"
    assert main(quality_args(tmp_path / "no-images", prior_dir, tmp_path)) == 2
    assert error_line(capsys) == f"error: image folder not found: {tmp_path / 'no-images'}"
    assert not (tmp_path / "quality.json").exists() and not (tmp_path / "quality.png").exists()


def test_missing_checkpoint_skips_only_default_methods(tmp_path: Path, capsys) -> None:
    missing = str(tmp_path / "missing")
    assert build_method(MethodChoice("ddnm", missing), device="cpu", seed=0, ratio=0.1) is None
    assert "skipping ddnm at ratio 0.1" in capsys.readouterr().out
    with pytest.raises(IDMError, match="not found"):
        build_method(MethodChoice("ddnm", missing, explicit=True), device="cpu", seed=0, ratio=0.1)
    with pytest.raises(IDMError, match="no option"):  # methods without checkpoints are never skipped
        build_method(MethodChoice("pinv", options={"steps": 3}), device="cpu", seed=0, ratio=0.1)


def test_parse_value() -> None:
    assert parse_value("20") == 20 and isinstance(parse_value("20"), int)
    assert parse_value("0.5") == 0.5 and parse_value("1e-3") == 1e-3
    assert parse_value("true") is True and parse_value("False") is False
    assert parse_value("prior-gray") == "prior-gray"


# --- speed ---------------------------------------------------------------------------------------
def test_counter_counts_unet_calls_only_inside(prior: Prior) -> None:
    x, t = torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        with count_unet_calls() as counter:
            for _ in range(3):
                prior(x, t)
            prior.unet.input_conv(x)  # a sub-module is not a U-Net evaluation
        prior(x, t)
    assert counter.calls == 3


def test_speed_reports_time_and_unet_evaluations(prior: Prior, prior_dir: str, tmp_path: Path, capsys) -> None:
    idm_dir = tmp_path / "idm"
    IDMNet.from_prior(prior, steps=2, unshuffle=2).save(idm_dir, "# tiny test IDM", ratio=0.25, block_size=8)
    path = tmp_path / "speed.json"
    args = ["bench", "speed", "--size", "16", "--ratio", "0.25", "--block-size", "8", "--repeat", "2",
            "--methods", "pinv", "ddnm", "dps", "idm", "--prior", prior_dir, "--checkpoint", f"idm={idm_dir}",
            "--option", "ddnm.steps=3", "--option", "dps.steps=4", "--json", str(path)]
    assert main(args) == 0
    payload = json.loads(path.read_text())
    assert set(payload) == {"rows"}
    for row in payload["rows"]:
        assert set(row) == SPEED_KEYS
        assert isinstance(row["seconds"], float) and row["seconds"] >= 0.0 and isinstance(row["unet_evals"], int)
    evals = {row["method"]: row["unet_evals"] for row in payload["rows"]}
    assert evals == {"pinv": 0, "ddnm": 3, "dps": 4, "idm": 2}
    assert "× idm" in capsys.readouterr().out


def test_speed_errors(prior_dir: str, tmp_path: Path, capsys) -> None:
    """Each failure exits with 2 and its own one-line message, and writes no JSON."""
    base = ["bench", "speed", "--size", "16", "--methods", "pinv", "--json", str(tmp_path / "s.json")]
    assert main([*base, "--repeat", "0"]) == 2
    assert error_line(capsys) == "error: --size and --repeat must be positive"
    assert main([*base, "--operator", "ct", "--ratio", "0.1"]) == 2
    assert error_line(capsys) == "error: --ratio applies to --operator blockcs or inpainting only"
    assert main([*base, "--checkpoint", f"idm={prior_dir}"]) == 2  # idm is not compared (the path exists)
    assert error_line(capsys) == "error: --checkpoint idm=" + prior_dir + ": method 'idm' is not among the compared ones (pinv)"
    assert main([*base, "--methods", "nonexistent"]) == 2
    assert error_line(capsys) == f"error: unknown method 'nonexistent'; available: {', '.join(METHODS.names())}"
    assert main(["bench", "speed", "--size", "32", "--ratio", "0.3", "--methods", "idm", "--matrix-seed", "3",
                 "--json", str(tmp_path / "s.json")]) == 2
    assert error_line(capsys) == ("error: checkpoint idm-multi was trained with matrix seed 0, the measurements have "
                                  "matrix seed 3 (measure with --matrix-seed 0)")
    assert not (tmp_path / "s.json").exists()


def test_default_method_trained_for_another_operator_is_skipped(data_dir: Path, capsys) -> None:
    """The shipped ``unrolled-cs30`` was trained with block size 32: with block size 8 a default
    ``unrolled`` is skipped with the mismatch as its note, an explicit one stops with that error."""
    folder = ImageFolder(data_dir, limit=1)
    images = [folder[0]]
    results = run_quality(images, [0.3], [MethodChoice("pinv"), MethodChoice("unrolled")], block_size=8)
    assert [r.method for r in results] == ["pinv"]
    assert "note: skipping unrolled at ratio 0.3: checkpoint unrolled-cs30 was trained with block size 32" in capsys.readouterr().out
    with pytest.raises(IDMError, match="trained with block size 32, the measurements have block size 8"):
        run_quality(images, [0.3], [MethodChoice("unrolled", explicit=True)], block_size=8)
