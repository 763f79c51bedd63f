"""MC-DDPM (``idm.medical.mcddpm``, method ``mcddpm``, ``idm pretrain --conditional mri``): exact
k-space consistency, the std of K samples, seeding, the training loss, checkpoints and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from idm.cli import main as idm_main
from idm.errors import IDMError
from idm.io.checkpoint import load_state
from idm.medical.mcddpm import MCDDPM, diffusion_loss, load_mcddpm, sample_mcddpm, unet_config
from idm.physics import MRI, ParallelBeamCT
from idm.physics.mri import fft2c, random_mask
from idm.priors import UNet
from idm.registry import METHODS
from idm.training.pretrain import STATE_FILE, main as pretrain_main

TINY = {"base_channels": 8, "channel_mults": (1, 2), "num_res_blocks": 1, "attention_levels": ()}


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> MCDDPM:
    """A tiny MC-DDPM with small random (not zero) output weights, so ε̂ depends on its inputs."""
    torch.manual_seed(seed)
    unet = UNet(unet_config(**TINY))
    torch.nn.init.normal_(unet.out[-1].weight, std=0.02)
    return MCDDPM(unet.to(dtype).eval())


def knee_like(size: int = 24, dtype: torch.dtype = torch.complex64) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    magnitude = (1 - (xx**2 + yy**2)).clamp_min(0) + 0.3 * torch.sin(5 * xx)
    return torch.polar(magnitude.abs(), 0.5 * xx + 0.2)[None, None].to(dtype)


@pytest.mark.parametrize("prediction", ["eps", "x0"])
def test_samples_agree_with_the_measurement_on_the_sampled_locations(prediction: str) -> None:
    model = tiny_model(dtype=torch.float64)
    model.prediction, model.data_scale = prediction, 0.1
    x = knee_like(dtype=torch.complex128)
    op = MRI((24, 24), acceleration=4, seed=3)
    y = op.A(x)
    with torch.no_grad():
        posterior = sample_mcddpm(model, y, op.mask, samples=3, steps=4, generator=torch.Generator().manual_seed(0))
    assert posterior.x.shape == (1, 1, 24, 24) and posterior.std.shape == (1, 1, 24, 24)
    assert float((op.A(posterior.x) - y).abs().max()) <= 1e-5 * float(y.abs().max())
    unsampled = ~op.mask
    assert float((fft2c(posterior.x) - fft2c(x))[..., unsampled].abs().max()) > 1e-3  # the rest is sampled
    assert float(posterior.std.min()) >= 0 and float(posterior.std.max()) > 0


def test_one_sample_has_zero_std_and_a_seed_fixes_the_result() -> None:
    model = tiny_model()
    op = MRI((24, 24), acceleration=8, seed=1)
    y = op.A(knee_like())
    with torch.no_grad():
        single = sample_mcddpm(model, y, op.mask, samples=1, steps=3, generator=torch.Generator().manual_seed(0))
    assert torch.count_nonzero(single.std) == 0

    def run(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        from idm.medical.mcddpm import MCDDPMReconstructor

        posterior = MCDDPMReconstructor(model, {"samples": 2, "steps": 3}, seed=seed, progress=False).with_uncertainty(y, op)
        return posterior.x, posterior.std

    first, again, other = run(5), run(5), run(6)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("prediction", ["eps", "x0"])
def test_loss_falls_on_a_tiny_set(prediction: str) -> None:
    torch.manual_seed(0)
    unet = UNet(unet_config(**TINY))
    x = torch.cat([knee_like(16), knee_like(16) * 0.5j])
    masks = torch.stack([random_mask((16, 16), 4, seed=s) for s in range(2)])[:, None]
    optimizer = torch.optim.Adam(unet.parameters(), lr=3e-3)

    def loss() -> torch.Tensor:  # the same t and noise every time: the loss of one fixed batch
        return diffusion_loss(unet, x, masks, MCDDPM(unet).schedule, torch.Generator().manual_seed(0), 2, prediction)

    start = float(loss().detach())
    for _ in range(40):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    if prediction == "eps":
        assert 0.9 < start < 1.1  # zero-initialised output: ε̂ = 0, loss = E|ε|² per real coordinate
    assert float(loss().detach()) < 0.5 * start


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = tiny_model()
    model.extra, model.prediction, model.data_scale = {"accelerations": [4.0, 8.0]}, "x0", 0.1
    model.save(tmp_path / "ckpt", "# tiny\n", dtype=None)
    loaded = load_mcddpm(tmp_path / "ckpt")
    state, condition = knee_like(16), knee_like(16) * 0.3
    t = torch.tensor([7])
    torch.testing.assert_close(loaded.output(state, condition, t), model.output(state, condition, t))
    assert loaded.extra["accelerations"] == [4.0, 8.0] and loaded.prediction == "x0" and loaded.data_scale == 0.1
    with pytest.raises(IDMError, match="architecture"):
        load_mcddpm("prior-mri")


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A saved :func:`tiny_model`."""
    tiny_model().save(tmp_path / "ckpt", "# tiny\n", dtype=None)
    return tmp_path / "ckpt"


def test_bad_inputs_give_one_line_errors(checkpoint: Path) -> None:
    method = METHODS.get("mcddpm").build(checkpoint=checkpoint, samples=2, steps=2)
    op = MRI((24, 24), acceleration=4, seed=0)
    y = op.A(knee_like())
    with pytest.raises(IDMError, match="shape"):
        method(y[..., :20], op)  # k-space of another size
    with pytest.raises(IDMError, match="single-coil"):
        method(y, ParallelBeamCT((24, 24), views=8))
    multi = MRI((24, 24), acceleration=4, sensitivities=torch.ones(2, 24, 24, dtype=torch.complex64))
    with pytest.raises(IDMError, match="2 coils"):
        method(multi.A(knee_like()), multi)
    with pytest.raises(IDMError, match="all zero"):
        method(torch.zeros_like(y), op)
    with pytest.raises(IDMError, match="NaN"):
        method(y * float("nan"), op)
    with pytest.raises(IDMError, match="no option"):
        METHODS.get("mcddpm").build(checkpoint=checkpoint, refine=3)
    with pytest.raises(IDMError, match="samples"):
        METHODS.get("mcddpm").build(checkpoint=checkpoint, samples=0)
    with pytest.raises(IDMError, match="start_level"):
        METHODS.get("mcddpm").build(checkpoint=checkpoint, start="tv")
    with pytest.raises(IDMError, match="one of"):
        METHODS.get("mcddpm").build(checkpoint=checkpoint, start="fbp", start_level=1.0)


def test_kspace_off_the_mask_is_ignored(checkpoint: Path) -> None:
    method = METHODS.get("mcddpm").build(checkpoint=checkpoint, samples=2, steps=2)
    op = MRI((24, 24), acceleration=4, seed=0)
    y = op.A(knee_like())
    noisy = y + 0.05 * torch.randn_like(y)  # noise on every location, sampled or not
    torch.testing.assert_close(method(noisy, op), method(noisy * op.mask, op))


def test_a_started_run_diffuses_the_start_and_stays_consistent(checkpoint: Path) -> None:
    op = MRI((24, 24), acceleration=4, seed=2)
    y = op.A(knee_like())
    started = METHODS.get("mcddpm").build(checkpoint=checkpoint, samples=2, steps=3, start="tv", start_level=0.5)
    posterior = started.with_uncertainty(y, op)
    assert float((op.A(posterior.x) - y).abs().max()) <= 1e-4 * float(y.abs().max())
    plain = METHODS.get("mcddpm").build(checkpoint=checkpoint, samples=2, steps=3)(y, op)
    assert not torch.allclose(plain, posterior.x)


@pytest.fixture(scope="module")
def slice_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mri-slices")
    for i in range(2):
        magnitude = knee_like(32).abs()[0, 0].numpy() * (0.7 + 0.1 * i)
        Image.fromarray((magnitude / magnitude.max() * 65535).astype(np.uint16)).save(folder / f"s{i}.png")
    return folder


CONDITIONAL_ARGS = ["--conditional", "mri", "--random-phase", "--prediction", "x0", "--data-scale", "0.1", "--steps", "4", "--batch", "2", "--patch", "16",
                    "--base-channels", "8", "--channel-mults", "1,2", "--res-blocks", "1", "--attn", "",
                    "--warmup", "1", "--save-every", "2", "--threads", "1", "--no-progress"]


def test_pretrain_conditional_resumes_exactly_exports_and_reconstructs(slice_dir: Path, tmp_path: Path, capsys) -> None:
    base = ["--data", str(slice_dir), *CONDITIONAL_ARGS]
    assert pretrain_main([*base, "--out", str(tmp_path / "full")]) == 0
    assert pretrain_main([*base, "--out", str(tmp_path / "part"), "--stop-after", "2"]) == 0
    assert pretrain_main([*base, "--out", str(tmp_path / "part"), "--resume"]) == 0
    full, part = load_state(tmp_path / "full" / STATE_FILE), load_state(tmp_path / "part" / STATE_FILE)
    for key, value in full["model"].items():
        assert torch.equal(value, part["model"][key]), key
    checkpoint = tmp_path / "full" / "checkpoint"
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["architecture"] == "mcddpm" and config["accelerations"] == [4.0, 8.0] and config["prediction"] == "x0"
    assert config["data_scale"] == 0.1
    assert config["unet"]["in_channels"] == 4 and "--conditional mri" in (checkpoint / "README.md").read_text()
    # the exported model reconstructs through the CLI, writing the std beside the image
    truth = tmp_path / "knee.npy"
    np.save(truth, knee_like(32)[0, 0].numpy())
    out, std = tmp_path / "recon.npy", tmp_path / "std.npy"
    code = idm_main(["reconstruct", str(truth), "--operator", "mri", "--acceleration", "4", "--method", "mcddpm",
                     "--checkpoint", str(checkpoint), "--option", "samples=2", "--option", "steps=2",
                     "-o", str(out), "--uncertainty", str(std)])
    assert code == 0, capsys.readouterr().err
    assert np.load(out).shape == (32, 32) and np.load(std).shape == (32, 32)
    # a mask of the wrong shape: one line naming the problem, nothing written
    bad = tmp_path / "mask.npy"
    np.save(bad, np.ones((16, 16)))
    capsys.readouterr()
    code = idm_main(["reconstruct", str(truth), "--operator", "mri", "--mask", str(bad), "--method", "mcddpm",
                     "--checkpoint", str(checkpoint), "-o", str(tmp_path / "never.npy")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "\n" not in err and "mask" in err
    assert not (tmp_path / "never.npy").exists()
    # --conditional with the denoiser architecture is refused, its options without --conditional too
    assert pretrain_main([*base, "--arch", "dncnn", "--out", str(tmp_path / "bad")]) == 2
    assert "--conditional" in capsys.readouterr().err
    plain = [arg for arg in base if arg not in ("--conditional", "mri", "--random-phase", "--prediction", "x0",
                                                 "--data-scale", "0.1")]
    assert pretrain_main([*plain, "--accelerations", "4", "--out", str(tmp_path / "bad")]) == 2
    assert "apply to --conditional mri only" in capsys.readouterr().err
    assert pretrain_main([*base, "--accelerations", "nan", "--out", str(tmp_path / "bad")]) == 2
    assert "--accelerations" in capsys.readouterr().err
