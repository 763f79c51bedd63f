"""Checkpoints cannot be misapplied: ``check_trained_operator`` compares every operator parameter
that changes A (kind, block size, matrix seed, ratio) with the checkpoint's, the CLI sets block size
and matrix seed, and every registered method returns an estimate on the operator's domain."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from idm.baselines.unrolled import UnrolledConfig, UnrolledNet
from idm.cli import main
from idm.data import sample_images, save_image
from idm.errors import IDMError
from idm.evaluation import blockcs_factory
from idm.io.checkpoint import TRAINED_OPERATOR_PARAMETERS, check_trained_operator
from idm.io.measurement import load_measurement
from idm.physics import MRI, BlockCS, Inpainting, ParallelBeamCT
from idm.registry import METHODS, get_method

from conftest import tiny_prior, tiny_unet_config

pytestmark = pytest.mark.usefixtures("one_thread")

#: what the tiny unrolled checkpoint below was trained with
RATIO, BLOCK, MATRIX_SEED = 0.25, 8, 3
CONFIG = {"operator": "blockcs", "ratio": RATIO, "block_size": BLOCK, "matrix_seed": MATRIX_SEED}


def blockcs(size=(16, 16), ratio=RATIO, block_size=BLOCK, matrix_seed=MATRIX_SEED, **changes) -> BlockCS:
    return BlockCS(size, ratio, block_size=block_size, matrix_seed=matrix_seed, **changes)


def raises_line(message: str):
    """``pytest.raises`` for an :class:`IDMError` whose text is exactly ``message`` (one line)."""
    assert "\n" not in message
    return pytest.raises(IDMError, match=f"^{re.escape(message)}$")


# --- check_trained_operator ----------------------------------------------------------------------
def test_a_matching_operator_passes_whatever_its_permutation_noise_and_image_size() -> None:
    """Training redraws the permutation every step, so the permutation seed is free; so are the
    noise level and the image size (the domain grows in whole blocks)."""
    check_trained_operator("ck", CONFIG, blockcs())
    check_trained_operator("ck", CONFIG, blockcs().redraw(12345))
    check_trained_operator("ck", CONFIG, blockcs(size=(40, 21), seed=7, noise_sigma=0.05))


@pytest.mark.parametrize(
    "op, message",
    [
        (Inpainting((16, 16), ratio=0.25), "checkpoint ck was trained for blockcs measurements, got inpainting"),
        (blockcs(block_size=16), "checkpoint ck was trained with block size 8, the measurements have block size 16 "
                                 "(measure with --block-size 8)"),
        (blockcs(matrix_seed=0), "checkpoint ck was trained with matrix seed 3, the measurements have matrix seed 0 "
                                 "(measure with --matrix-seed 3)"),
        (blockcs(ratio=0.5), "checkpoint ck was trained for ratio 0.25, the measurements have ratio 0.5"),
    ],
    ids=["kind", "block-size", "matrix-seed", "ratio"],
)
def test_each_mismatch_is_one_line_naming_checkpoint_trained_and_measured_value(op, message) -> None:
    with raises_line(message):
        check_trained_operator("ck", CONFIG, op)


def test_a_block_size_mismatch_is_reported_even_at_the_same_ratio() -> None:
    """Same ratio, other B: another Φ (q × B²) altogether."""
    with raises_line("checkpoint ck was trained with block size 8, the measurements have block size 4 "
                     "(measure with --block-size 8)"):
        check_trained_operator("ck", CONFIG, blockcs(block_size=4))


def test_multi_ratio_checkpoint_checks_the_range_and_the_matrix() -> None:
    config = {"operator": "blockcs", "ratio": None, "ratio_range": [0.05, 0.6], "block_size": 32, "matrix_seed": 0}
    check_trained_operator("multi", config, BlockCS((40, 40), 0.33))
    with raises_line("checkpoint multi was trained for ratios in [0.05, 0.6], the measurements have ratio 0.8"):
        check_trained_operator("multi", config, BlockCS((40, 40), 0.8))
    with raises_line("checkpoint multi was trained with matrix seed 0, the measurements have matrix seed 1 "
                     "(measure with --matrix-seed 0)"):
        check_trained_operator("multi", config, BlockCS((40, 40), 0.3, matrix_seed=1))


@pytest.mark.parametrize("old", [{"ratio": 0.25}, {"ratio": 0.25, "block_size": None, "matrix_seed": None}],
                         ids=["keys-missing", "keys-null"])
def test_old_checkpoints_are_taken_to_use_the_defaults_of_their_time(old) -> None:
    """No ``operator`` → block CS; no ``block_size`` / ``matrix_seed`` → 32 / 0 (the only values
    used before they were recorded)."""
    assert TRAINED_OPERATOR_PARAMETERS["blockcs"] == {"block_size": 32, "matrix_seed": 0}
    check_trained_operator("old", old, BlockCS((16, 16), 0.25))
    with raises_line("checkpoint old was trained with block size 32, the measurements have block size 8 "
                     "(measure with --block-size 32)"):
        check_trained_operator("old", old, BlockCS((16, 16), 0.25, block_size=8))
    with raises_line("checkpoint old was trained with matrix seed 0, the measurements have matrix seed 2 "
                     "(measure with --matrix-seed 0)"):
        check_trained_operator("old", old, BlockCS((16, 16), 0.25, matrix_seed=2))


def test_a_checkpoint_without_any_ratio_is_refused() -> None:
    with raises_line("checkpoint ck records neither the ratio nor the ratio range it was trained for"):
        check_trained_operator("ck", {"operator": "blockcs", "block_size": 8, "matrix_seed": 3}, blockcs())


# --- through a learned method and the CLI ------------------------------------------------------
@pytest.fixture(scope="module")
def unrolled_ck(tmp_path_factory) -> Path:
    """A tiny unrolled checkpoint trained (nominally) with ratio 0.25, block 8, matrix seed 3."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("ck") / "unrolled-tiny"
    UnrolledNet(UnrolledConfig(phases=2, channels=4)).save(directory, "# tiny", ratio=RATIO, block_size=BLOCK,
                                                           extra={"matrix_seed": MATRIX_SEED}, dtype=None)
    return directory


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    save_image(folder / "camera.png", sample_images(64)["camera"][:, :36, :44])  # not a multiple of 8 or 32
    return folder


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_method_refuses_another_matrix_or_block_size(unrolled_ck: Path) -> None:
    reconstruct = get_method("unrolled").build(checkpoint=str(unrolled_ck), ratio=RATIO)
    good = blockcs(size=(20, 20))
    y = good.measure(torch.rand(1, 1, 20, 20))
    assert reconstruct(y, good).shape == (1, 1, *good.domain_size)
    other_matrix = blockcs(size=(20, 20), matrix_seed=0)
    with raises_line(f"checkpoint {unrolled_ck} was trained with matrix seed 3, the measurements have matrix seed 0 "
                     "(measure with --matrix-seed 3)"):
        reconstruct(other_matrix.measure(torch.rand(1, 1, 20, 20)), other_matrix)
    other_block = blockcs(size=(20, 20), block_size=4)
    with raises_line(f"checkpoint {unrolled_ck} was trained with block size 8, the measurements have block size 4 "
                     "(measure with --block-size 8)"):
        reconstruct(other_block.measure(torch.rand(1, 1, 20, 20)), other_block)


def test_blockcs_factory_sets_the_matrix_seed() -> None:
    op = blockcs_factory(0.25, seed=2, block_size=8, matrix_seed=5)((20, 12), 3)
    assert (op.block_size, op.matrix_seed, op.seed) == (8, 5, 5)
    assert torch.equal(op.matrix, BlockCS((8, 8), 0.25, block_size=8, matrix_seed=5).matrix)


def test_measure_stores_block_size_and_matrix_seed_and_reconstruct_uses_the_file(image_dir, unrolled_ck, tmp_path,
                                                                                  capsys) -> None:
    meas = tmp_path / "m.safetensors"
    assert main(["measure", str(image_dir / "camera.png"), "--ratio", str(RATIO), "--block-size", str(BLOCK),
                 "--matrix-seed", str(MATRIX_SEED), "-o", str(meas)]) == 0
    config = load_measurement(meas).operator_config
    assert (config["block_size"], config["matrix_seed"], config["ratio"]) == (BLOCK, MATRIX_SEED, RATIO)
    capsys.readouterr()
    # the file alone decides the operator: the learned method's check passes without any option
    out = tmp_path / "out.png"
    assert main(["reconstruct", str(meas), "-o", str(out), "--method", "unrolled", "--checkpoint", str(unrolled_ck)]) == 0
    assert out.is_file()
    # repeating the file's settings is fine, contradicting them is an error (not silently ignored)
    assert main(["reconstruct", str(meas), "-o", str(out), "--method", "pinv", "--block-size", str(BLOCK),
                 "--matrix-seed", str(MATRIX_SEED), "--ratio", str(RATIO)]) == 0
    capsys.readouterr()
    for option, value, words, stored in (("--matrix-seed", "0", "matrix seed", MATRIX_SEED),
                                         ("--block-size", "32", "block size", BLOCK),
                                         ("--ratio", "0.5", "ratio", RATIO)):
        bad = tmp_path / f"bad{option}.png"
        assert main(["reconstruct", str(meas), "-o", str(bad), "--method", "pinv", option, value]) == 2
        assert error_line(capsys) == (f"error: {option} {value} contradicts the measurement file {meas}, which was "
                                      f"measured with {words} {stored}; drop {option} (the file decides)")
        assert not bad.exists()


def test_measure_defaults_are_block_32_and_matrix_seed_0(image_dir, tmp_path) -> None:
    meas = tmp_path / "m.safetensors"
    assert main(["measure", str(image_dir / "camera.png"), "--ratio", "0.1", "-o", str(meas)]) == 0
    config = load_measurement(meas).operator_config
    assert (config["block_size"], config["matrix_seed"]) == (32, 0)


def test_reconstruct_an_image_with_block_size_and_matrix_seed(image_dir, unrolled_ck, tmp_path, capsys) -> None:
    base = ["reconstruct", str(image_dir / "camera.png"), "--ratio", str(RATIO), "--method", "unrolled",
            "--checkpoint", str(unrolled_ck)]
    out = tmp_path / "out.png"
    assert main([*base, "-o", str(out), "--block-size", str(BLOCK), "--matrix-seed", str(MATRIX_SEED)]) == 0
    assert out.is_file() and "PSNR" in capsys.readouterr().out
    bad = tmp_path / "bad.png"
    assert main([*base, "-o", str(bad), "--block-size", str(BLOCK)]) == 2
    assert error_line(capsys) == (f"error: checkpoint {unrolled_ck} was trained with matrix seed 3, the measurements "
                                  "have matrix seed 0 (measure with --matrix-seed 3)")
    assert main([*base, "-o", str(bad), "--matrix-seed", str(MATRIX_SEED)]) == 2
    assert error_line(capsys) == (f"error: checkpoint {unrolled_ck} was trained with block size 8, the measurements "
                                  "have block size 32 (measure with --block-size 8)")
    assert not bad.exists()


def test_eval_with_block_size_and_matrix_seed(image_dir, unrolled_ck, tmp_path, capsys) -> None:
    base = ["eval", "--data", str(image_dir), "--ratio", str(RATIO), "--block-size", str(BLOCK)]
    learned = ["--method", "unrolled", "--checkpoint", str(unrolled_ck)]
    assert main([*base, *learned, "--matrix-seed", str(MATRIX_SEED)]) == 0
    capsys.readouterr()
    assert main([*base, *learned, "--matrix-seed", "4"]) == 2
    assert error_line(capsys) == (f"error: checkpoint {unrolled_ck} was trained with matrix seed 3, the measurements "
                                  "have matrix seed 4 (measure with --matrix-seed 3)")
    # the seed reaches the operator of methods without a checkpoint too: another Φ, other scores
    scores = {}
    for seed in ("0", "5"):
        path = tmp_path / f"pinv{seed}.json"
        assert main([*base, "--method", "pinv", "--matrix-seed", seed, "--json", str(path)]) == 0
        scores[seed] = json.loads(path.read_text())["mean"]["psnr"]
    assert scores["0"] != scores["5"]


def test_bench_quality_with_matrix_seed(image_dir, unrolled_ck, tmp_path, capsys) -> None:
    base = ["bench", "quality", "--data", str(image_dir), "--ratios", str(RATIO), "--methods", "unrolled",
            "--checkpoint", f"unrolled={unrolled_ck}", "--block-size", str(BLOCK)]
    path = tmp_path / "q.json"
    assert main([*base, "--matrix-seed", str(MATRIX_SEED), "--json", str(path)]) == 0
    assert [row["method"] for row in json.loads(path.read_text())["rows"]] == ["unrolled"]
    capsys.readouterr()
    assert main([*base, "--json", str(tmp_path / "never.json")]) == 2
    assert error_line(capsys) == (f"error: checkpoint {unrolled_ck} was trained with matrix seed 3, the measurements "
                                  "have matrix seed 0 (measure with --matrix-seed 3)")
    assert not (tmp_path / "never.json").exists()


# --- every registered method returns the operator's domain ---------------------------------------
@pytest.fixture(scope="module")
def prior_dir(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("prior") / "prior"
    tiny_prior(tiny_unet_config(), seed=0).save(directory, "# tiny", dtype=None)
    return str(directory)


#: fast build arguments per registered method (the learned ones use the small shipped checkpoints)
def build_arguments(prior_dir: str) -> dict[str, dict]:
    return {
        "pinv": {},
        "tv": {"iterations": 3},
        "unrolled": {},  # shipped unrolled-cs10
        "idm": {},  # shipped idm-multi (B = 32, ratios 0.05-0.6)
        "ddnm": {"checkpoint": prior_dir, "steps": 2},
        "ddnm+": {"checkpoint": prior_dir, "steps": 2},
        "dps": {"checkpoint": prior_dir, "steps": 2},
        "diffuserecon": {"checkpoint": prior_dir, "samples": 2, "steps": 2, "refine": 1},
        "mbir": {"checkpoint": prior_dir, "steps": 2},  # the batch of 2 images as a 2-slice volume
        "pnp": {"checkpoint": prior_dir, "iterations": 1, "start": "adjoint"},
        "fbp": {},  # CT only: measured below with a sparse-view CT operator
        "mcddpm": {"samples": 2, "steps": 2},  # shipped mcddpm-mri; single-coil MRI only
    }


#: methods that need another operator than block CS (image size = domain for these)
OTHER_OPERATOR = {"fbp": lambda: ParallelBeamCT((40, 40), views=8), "mcddpm": lambda: MRI((40, 40), acceleration=4)}


def test_the_shape_test_covers_every_registered_method() -> None:
    assert set(build_arguments("")) == set(METHODS.names())


@pytest.mark.parametrize("name", sorted(build_arguments("")))
def test_every_registered_method_returns_the_operator_domain(name: str, prior_dir: str) -> None:
    """The registry's promise: ``reconstruct(y, op)`` has shape ``(B, C, *op.domain_size)``, here for a
    40×40 image measured in 32×32 blocks (domain 64×64)."""
    op = OTHER_OPERATOR[name]() if name in OTHER_OPERATOR else BlockCS((40, 40), 0.1, block_size=32, seed=1)
    assert op.domain_size == ((40, 40) if name in OTHER_OPERATOR else (64, 64))
    x = torch.rand(2, 1, 40, 40, generator=torch.Generator().manual_seed(0))
    y = op.measure(x)
    reconstruct = get_method(name).build(ratio=0.1, **build_arguments(prior_dir)[name])
    with torch.no_grad():
        out = reconstruct(y, op)
    assert out.shape == (2, 1, *op.domain_size) and torch.isfinite(out).all()
    assert op.crop(out).shape == x.shape
