"""Prior pre-training (``idm.training.pretrain``: ``idm pretrain``, the script ``train/pretrain_prior.py``),
export and ``idm sample`` — tiny CPU runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from idm.cli import main as idm_main
from idm.io.checkpoint import load_state
from idm.priors import UNet, load_prior
from idm.training.pretrain import LOG_FILE, STATE_FILE, lr_factor, main

TINY_ARGS = [
    "--steps", "6", "--batch", "4", "--patch", "16", "--base-channels", "8", "--channel-mults", "1,2",
    "--res-blocks", "1", "--attn", "1", "--warmup", "2", "--dropout", "0.1", "--save-every", "2",
    "--sample-every", "0", "--threads", "1", "--no-progress",
]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    yy, xx = np.mgrid[:40, :36]
    for i in range(3):
        pixels = 128 + 100 * np.sin(xx / (2.0 + i)) * np.cos(yy / 4.0)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"img{i}.png")
    return folder


@pytest.fixture(scope="module")
def full_run(image_dir, tmp_path_factory) -> Path:
    """An uninterrupted 6-step run (with its export)."""
    out = tmp_path_factory.mktemp("runs") / "full"
    assert main(["--data", str(image_dir), "--out", str(out), *TINY_ARGS]) == 0
    return out


def losses(run: Path) -> list[tuple[int, float]]:
    lines = (run / LOG_FILE).read_text().splitlines()
    return [(d["step"], d["loss"]) for d in map(json.loads, lines)]


def test_lr_warmup_then_cosine() -> None:
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100) == pytest.approx(0.1)
    assert lr_factor(40, 10, 100) > lr_factor(60, 10, 100)


def test_run_writes_state_log_and_checkpoint(full_run) -> None:
    assert [s for s, _ in losses(full_run)] == [1, 2, 3, 4, 5, 6]
    state = load_state(full_run / STATE_FILE)
    assert state["step"] == 6 and "optimizer" in state and "ema" in state and state["rng"]
    card = (full_run / "checkpoint" / "README.md").read_text()
    assert "python -m train.pretrain_prior" in card and "6 x 4" in card


def test_resume_after_interruption_matches_uninterrupted_run(image_dir, full_run, tmp_path) -> None:
    out = tmp_path / "resumed"
    args = ["--data", str(image_dir), "--out", str(out), *TINY_ARGS]
    assert main([*args, "--stop-after", "2"]) == 0  # state saved at step 2
    saved = tmp_path / "state_at_2.safetensors"
    shutil.copy(out / STATE_FILE, saved)
    assert main([*args, "--resume", "--stop-after", "2"]) == 0  # runs steps 3-4, saves at 4
    shutil.copy(saved, out / STATE_FILE)  # simulate a crash after step 4 whose last save was step 2
    assert main([*args, "--resume"]) == 0
    assert losses(out) == losses(full_run)  # bit-identical losses, incl. dropout and noise
    a = load_prior(full_run / "checkpoint")
    b = load_prior(out / "checkpoint")
    for key, value in a.unet.state_dict().items():
        torch.testing.assert_close(b.unet.state_dict()[key], value, rtol=0, atol=0)


def test_resume_refuses_changed_options_and_overwrite(image_dir, full_run, capsys) -> None:
    args = ["--data", str(image_dir), "--out", str(full_run), *TINY_ARGS]
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert main([*args[:-1], "--lr", "1e-3", "--no-progress", "--resume"]) == 2
    assert "--lr" in capsys.readouterr().err


def test_export_round_trip_matches_ema_weights_in_fp16(full_run) -> None:
    prior = load_prior(full_run / "checkpoint")
    config = json.loads((full_run / "checkpoint" / "config.json").read_text())
    assert config["training"]["steps"] == 6 and config["training"]["storage_dtype"] == "fp16"
    ema = load_state(full_run / STATE_FILE)["ema"]
    reference = UNet(prior.unet.config).eval()
    reference.load_state_dict({k[len("module."):]: v for k, v in ema.items() if k.startswith("module.")})
    with torch.no_grad():  # make the comparison sensitive: perturb both nets identically
        for p, q in zip(reference.parameters(), prior.unet.parameters()):
            noise = torch.randn_like(p) * 0.1
            p.add_(noise)
            q.add_(noise)
        x, t = torch.randn(2, 1, 16, 16), torch.tensor([5, 900])
        ref, out = reference(x, t), prior(x, t)
    assert float((out - ref).abs().max()) <= 5e-3 * max(1.0, float(ref.abs().max()))


def test_tiny_model_loss_falls(image_dir, tmp_path) -> None:
    out = tmp_path / "overfit"
    args = ["--data", str(image_dir), "--out", str(out), "--steps", "40", "--batch", "8", "--patch", "8",
            "--base-channels", "8", "--channel-mults", "1,2", "--res-blocks", "1", "--attn", "",
            "--lr", "3e-3", "--warmup", "0", "--save-every", "40", "--sample-every", "0", "--threads", "1",
            "--no-progress"]
    assert main(args) == 0
    values = [v for _, v in losses(out)]
    assert np.mean(values[-10:]) < 0.6 * np.mean(values[:10])


def test_sample_grid_and_evaluate_from_cli(full_run, image_dir, tmp_path, capsys) -> None:
    grid = tmp_path / "grid.png"
    code = idm_main(["sample", "--checkpoint", str(full_run / "checkpoint"), "--n", "4", "--steps", "3",
                     "--size", "16", "--no-progress", "-o", str(grid)])
    assert code == 0
    with Image.open(grid) as im:
        assert im.size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2) and im.mode == "L"
    capsys.readouterr()
    assert idm_main(["pretrain", "--evaluate", str(full_run / "checkpoint"), "--data", str(image_dir)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"sigma15", "sigma25", "sigma50"} and result["sigma25"]["images"] == 3


def test_bad_inputs_give_clear_errors(image_dir, full_run, tmp_path, capsys) -> None:
    base = ["--data", str(image_dir), *TINY_ARGS]
    assert main([*base, "--out", str(tmp_path / "a"), "--patch", "17"]) == 2  # not divisible by 2
    assert "divisible" in capsys.readouterr().err
    assert main([*TINY_ARGS, "--out", str(tmp_path / "b")]) == 2
    assert "--data" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "c"), "--patch", "64"]) == 2  # larger than the images
    assert "smaller than the patch" in capsys.readouterr().err
    assert idm_main(["sample", "--checkpoint", str(full_run / "checkpoint"), "--size", "15",
                     "--no-progress", "-o", str(tmp_path / "g.png")]) == 2
    assert "divisible" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()
    assert idm_main(["sample", "--checkpoint", str(tmp_path / "nope"), "-o", str(tmp_path / "g.png")]) == 2


def test_time_budget_stops_saves_and_exports(image_dir, tmp_path) -> None:
    out = tmp_path / "budget"
    assert main(["--data", str(image_dir), "--out", str(out), *TINY_ARGS, "--max-minutes", "0"]) == 0
    assert load_state(out / STATE_FILE)["step"] == 1
    config = json.loads((out / "checkpoint" / "config.json").read_text())
    assert config["training"]["steps"] == 1 and config["training"]["planned_steps"] == 6
    assert "stopped by the time budget" in (out / "checkpoint" / "README.md").read_text()


# --- --arch dncnn: denoiser priors (e.g. the medical ones) -----------------------------------------
DNCNN_ARGS = ["--arch", "dncnn", "--steps", "4", "--batch", "2", "--patch", "16", "--warmup", "1", "--save-every", "2",
              "--threads", "1", "--no-progress"]


def test_denoiser_prior_trains_resumes_exactly_and_exports(image_dir, tmp_path) -> None:
    from idm.priors.denoiser import DenoiserPrior
    from idm.training.pretrain import random_phase_parts

    base = ["--data", str(image_dir), *DNCNN_ARGS, "--depth", "4", "--features", "8", "--random-phase",
            "--sigma-max", "0.1", "--eval-data", str(image_dir)]
    assert main([*base, "--out", str(tmp_path / "full")]) == 0
    prior = load_prior(tmp_path / "full" / "checkpoint")
    assert isinstance(prior, DenoiserPrior) and prior.denoiser.config.depth == 4
    assert prior.denoiser.config.sigma_max == 0.1 and prior.extra["training"]["random_phase"] is True
    card = (tmp_path / "full" / "checkpoint" / "README.md").read_text()
    assert "--random-phase --out" in card and "--base-channels" not in card and "Denoising PSNR" in card
    # interrupted after 2 steps and resumed: the same weights as the uninterrupted run
    assert main([*base, "--out", str(tmp_path / "part"), "--stop-after", "2"]) == 0
    assert main([*base, "--out", str(tmp_path / "part"), "--resume"]) == 0
    full, part = load_state(tmp_path / "full" / STATE_FILE), load_state(tmp_path / "part" / STATE_FILE)
    for key, value in full["model"].items():
        assert torch.equal(value, part["model"][key]), key
    # the MRI representation: Re / Im of x·e^{iφ} on [0, 1], |x| kept
    x = torch.rand(3, 1, 8, 8)
    parts = random_phase_parts(x, torch.Generator().manual_seed(0)) * 2 - 1
    re, im = parts.chunk(2)
    torch.testing.assert_close(torch.complex(re, im).abs(), x)


def test_denoiser_fine_tuning_starts_from_the_init_and_checks_it(image_dir, tmp_path, capsys) -> None:
    from idm.priors.denoiser import DenoiserPrior
    from idm.priors.dncnn import DnCNN, DnCNNConfig
    from idm.priors import NoiseSchedule

    torch.manual_seed(0)
    DenoiserPrior(DnCNN(DnCNNConfig(depth=3, features=4)), NoiseSchedule()).save(tmp_path / "init", "# init", dtype=None)
    base = ["--data", str(image_dir), *DNCNN_ARGS, "--init", str(tmp_path / "init")]
    assert main([*base, "--out", str(tmp_path / "ft"), "--lr", "1e-9", "--ema-decay", "0"]) == 0
    tuned, init = load_prior(tmp_path / "ft" / "checkpoint"), load_prior(tmp_path / "init")
    for (key, a), b in zip(tuned.denoiser.state_dict().items(), init.denoiser.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3, msg=key)  # lr ≈ 0: the init's weights (fp16 storage)
    assert main([*base, "--out", str(tmp_path / "bad"), "--init", str(tmp_path / "nope")]) == 2
    assert main(["--data", str(image_dir), *TINY_ARGS, "--out", str(tmp_path / "u"), "--random-phase"]) == 2
    assert "--arch dncnn" in capsys.readouterr().err


def test_pretrain_takes_multichannel_arrays(tmp_path: Path) -> None:
    """A folder of (C, H, W) .npy arrays (e.g. the four MRI contrasts) trains a C-channel prior; one-channel
    architectures refuse it with a one-line error."""
    data = tmp_path / "scans"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        np.save(data / f"scan{i}.npy", rng.random((4, 24, 20), dtype=np.float32))
    out = tmp_path / "run"
    assert main(["--data", str(data), "--out", str(out), *TINY_ARGS]) == 0
    prior = load_prior(out / "checkpoint")
    assert prior.channels == 4 and prior.sample(1, 16, steps=2, seed=0).shape == (1, 4, 16, 16)
    assert (out / "checkpoint" / "samples.png").is_file()
    assert main(["--data", str(data), "--out", str(tmp_path / "dn"), "--arch", "dncnn", "--steps", "2",
                 "--patch", "16", "--no-progress"]) == 2
