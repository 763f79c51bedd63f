"""Bring your own prior: tiny random diffusers U-Nets (saved with ``save_pretrained``) as zero-shot priors, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers")

import idm  # noqa: E402
from idm.cli import main  # noqa: E402
from idm.data import sample_images, save_image  # noqa: E402
from idm.errors import IDMError  # noqa: E402
from idm.physics import BlockCS, Inpainting  # noqa: E402
from idm.priors import (  # noqa: E402
    DiffusersPrior,
    NoiseSchedule,
    is_diffusers_folder,
    load_diffusers_prior,
    load_diffusers_unet,
    load_prior,
    schedule_from_diffusers,
)
from idm.registry import get_method  # noqa: E402

from conftest import tiny_prior, tiny_unet_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = (19, 21)  # odd: the zero-shot canvas is padded to the U-Net's size multiple (2)


def tiny_unet(in_channels: int = 1, out_channels: int | None = None, seed: int = 0) -> "diffusers.UNet2DModel":
    """A random two-level ``UNet2DModel`` (8/16 channels, attention on level 2), size multiple 2."""
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=16,
        in_channels=in_channels,
        out_channels=in_channels if out_channels is None else out_channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
    ).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Saved models: ``model`` (gray, no scheduler), ``pipeline`` (gray, v-prediction, scaled-linear
    DDPM scheduler), ``rgb`` (3 channels, learned variance, DDPM scheduler beside it in the legacy
    layout), ``conditional`` (a UNet2DConditionModel), ``pickle`` (.bin weights only), ``idm`` (an idm prior)."""
    root = tmp_path_factory.mktemp("hub")
    tiny_unet(seed=1).save_pretrained(root / "model")
    scheduler = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        prediction_type="v_prediction")
    diffusers.DDPMPipeline(unet=tiny_unet(seed=2), scheduler=scheduler).save_pretrained(root / "pipeline")
    tiny_unet(3, 6, seed=3).save_pretrained(root / "rgb")
    diffusers.DDPMScheduler().save_pretrained(root / "rgb")
    torch.manual_seed(4)
    diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, norm_num_groups=4, attention_head_dim=2,
    ).save_pretrained(root / "conditional")
    tiny_unet(seed=5).save_pretrained(root / "pickle", safe_serialization=False)
    tiny_prior(tiny_unet_config(), seed=6).save(root / "idm", "# tiny idm prior", dtype=None)
    return {name: root / name for name in ("model", "pipeline", "rgb", "conditional", "pickle", "idm")}


def smooth_images(batch: int = 2, size: tuple[int, int] = SIZE) -> torch.Tensor:
    x = torch.rand(batch, 1, 5, 5, generator=torch.Generator().manual_seed(batch))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def inputs(channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(2, channels, 8, 12, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 700])


def raw(model, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x, t).sample


# --- schedules -----------------------------------------------------------------------------------
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_schedule_matches_diffusers(beta_schedule: str) -> None:
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=500, beta_schedule=beta_schedule,
                                        beta_start=0.00085, beta_end=0.012)
    schedule = schedule_from_diffusers(dict(scheduler.config))
    assert schedule.num_steps == 500 and schedule.alphas_cumprod.dtype == torch.float64
    torch.testing.assert_close(schedule.alphas_cumprod.float(), scheduler.alphas_cumprod, atol=2e-6, rtol=1e-5)
    again = NoiseSchedule.from_dict(json.loads(json.dumps(schedule.to_dict())))
    assert torch.equal(again.alphas_cumprod, schedule.alphas_cumprod) and again.kind == schedule.kind


def test_scaled_linear_betas_are_linear_in_their_square_root() -> None:
    schedule = NoiseSchedule("scaled_linear", 11, 0.0001, 0.0121)
    roots = schedule.betas.sqrt()
    torch.testing.assert_close(roots, torch.linspace(0.01, 0.11, 11, dtype=torch.float64))


def test_unsupported_scheduler_configs() -> None:
    with pytest.raises(IDMError, match="trained_betas is not supported"):
        schedule_from_diffusers({"beta_schedule": "linear", "trained_betas": [0.1, 0.2]})
    with pytest.raises(IDMError, match="sigmoid"):
        schedule_from_diffusers(dict(diffusers.DDPMScheduler(beta_schedule="sigmoid").config))
    with pytest.raises(IDMError, match="variance-exploding"):
        schedule_from_diffusers(dict(diffusers.ScoreSdeVeScheduler().config))
    with pytest.raises(IDMError, match="unknown noise schedule"):
        NoiseSchedule("quadratic")


# --- locating and loading ------------------------------------------------------------------------
def test_diffusers_folders_are_recognised(folders) -> None:
    for name in ("model", "pipeline", "rgb", "conditional", "pickle"):
        assert is_diffusers_folder(folders[name]), name
    assert is_diffusers_folder(folders["pipeline"] / "unet")
    assert not is_diffusers_folder(folders["idm"])
    assert not is_diffusers_folder(folders["model"] / "missing")
    assert not is_diffusers_folder("prior-gray")


def test_load_prior_dispatches_a_model_folder(folders, capsys) -> None:
    prior = load_prior(folders["model"])
    assert "no scheduler config" in capsys.readouterr().err
    assert isinstance(prior, DiffusersPrior) and isinstance(prior.module, diffusers.UNet2DModel)
    assert not prior.module.training and prior.source == str(folders["model"])
    assert prior.channels == 1 and prior.size_multiple == 2 and prior.value_range == (-1.0, 1.0)
    assert prior.prediction == "epsilon" and prior.schedule.to_dict() == NoiseSchedule().to_dict()
    x, t = inputs()
    torch.testing.assert_close(prior(x, t), raw(prior.model, x, t), atol=0, rtol=0)


@pytest.mark.parametrize("where", ["pipeline", "pipeline/unet"])
def test_load_prior_dispatches_a_pipeline_folder(folders, where: str, capsys) -> None:
    prior = load_prior(folders["model"].parent / where)
    assert "warning" not in capsys.readouterr().err  # the scheduler config was found
    assert prior.prediction == "v_prediction" and prior.schedule.kind == "scaled_linear"
    assert prior.schedule.beta_start == 0.00085 and prior.schedule.beta_end == 0.012


def test_load_diffusers_unet_returns_model_scheduler_and_source(folders) -> None:
    model, scheduler, source = load_diffusers_unet(folders["pipeline"])
    assert isinstance(model, diffusers.UNet2DModel) and scheduler["prediction_type"] == "v_prediction"
    assert source == str(folders["pipeline"])
    model, scheduler, _ = load_diffusers_unet(folders["conditional"])
    assert isinstance(model, diffusers.UNet2DConditionModel) and scheduler is None


def test_an_hf_id_downloads_only_what_the_unet_needs(folders, monkeypatch) -> None:
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, *, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(folders["pipeline"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    prior = load_prior("hf:someone/tiny-ddpm")
    assert prior.source == "hf:someone/tiny-ddpm" and prior.prediction == "v_prediction"
    _, _, source = load_diffusers_unet("hf:someone/tiny-ddpm/unet")
    assert source == "hf:someone/tiny-ddpm/unet"
    assert [repo for repo, _ in calls] == ["someone/tiny-ddpm"] * 2
    assert "unet/diffusion_pytorch_model.safetensors" in calls[1][1]
    assert not any(p.endswith(".bin") or p == "*" for _, patterns in calls for p in patterns)


# --- ε conventions -------------------------------------------------------------------------------
def test_gray_images_on_an_rgb_model_with_learned_variance(folders) -> None:
    gray = load_diffusers_prior(folders["rgb"])
    x, t = inputs()
    out = raw(gray.model, x.expand(-1, 3, -1, -1), t)
    assert out.shape[1] == 6  # ε and the variance interpolation
    torch.testing.assert_close(gray(x, t), out[:, :3].mean(dim=1, keepdim=True))
    rgb = load_diffusers_prior(folders["rgb"], channels=3)
    x3, _ = inputs(3)
    torch.testing.assert_close(rgb(x3, t), raw(rgb.model, x3, t)[:, :3])
    with pytest.raises(IDMError, match="cannot serve 2-channel"):
        load_diffusers_prior(folders["rgb"], channels=2)
    with pytest.raises(IDMError, match=r"expects input \(B, 3"):
        rgb(x, t)


def test_v_and_sample_predictions_are_converted_to_eps() -> None:
    model, schedule = tiny_unet(seed=7), NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012)
    scheduler = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x, t = inputs()
    output = raw(model, x, t)
    a = schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    eps_v = DiffusersPrior(model, schedule, prediction="v_prediction")(x, t)
    torch.testing.assert_close(eps_v, a.sqrt() * output + (1 - a).sqrt() * x)
    # the ε found is the one whose velocity (diffusers' definition) is the model's output
    x0 = schedule.predict_x0(x, t, eps_v)
    torch.testing.assert_close(scheduler.get_velocity(x0, eps_v, t), output, atol=1e-4, rtol=1e-4)
    eps_x0 = DiffusersPrior(model, schedule, prediction="sample")(x, t)
    torch.testing.assert_close(schedule.predict_x0(x, t, eps_x0), output, atol=1e-4, rtol=1e-4)
    with pytest.raises(IDMError, match="prediction type"):
        DiffusersPrior(model, schedule, prediction="flow")


# --- zero-shot reconstruction --------------------------------------------------------------------
def test_ddnm_on_a_diffusers_prior_satisfies_the_measurements(folders) -> None:
    op = BlockCS(SIZE, 0.3, block_size=8, seed=1)
    y = op.measure(smooth_images())
    x = idm.reconstruct(y, op, method="ddnm", checkpoint=str(folders["pipeline"]))
    assert x.shape == (2, 1, *op.domain_size) and bool(torch.isfinite(x).all())
    torch.testing.assert_close(op.A(x), y, atol=1e-4, rtol=0)
    gray_rgb = get_method("ddnm+").build(checkpoint=str(folders["rgb"]), steps=4)(y, op)
    torch.testing.assert_close(op.A(gray_rgb), y, atol=1e-4, rtol=0)


def test_dps_on_a_diffusers_prior_runs_and_is_guided(folders) -> None:
    op = Inpainting(SIZE, ratio=0.4, seed=2)
    y = op.measure(smooth_images(1))
    with torch.no_grad():
        free = get_method("dps").build(checkpoint=str(folders["pipeline"]), steps=10, zeta=0.0)(y, op)
        guided = get_method("dps").build(checkpoint=str(folders["pipeline"]), steps=10, zeta=1.0)(y, op)
    assert guided.shape == (1, 1, *op.domain_size) and bool(torch.isfinite(guided).all())
    assert float((op.A(guided) - y).norm()) < float((op.A(free) - y).norm())
    prior = load_prior(folders["pipeline"])
    assert all(p.grad is None for p in prior.module.parameters())


def test_sampling_from_a_diffusers_prior(folders) -> None:
    prior = load_prior(folders["pipeline"])
    images = prior.sample(2, (8, 6), steps=3, seed=1)
    assert images.shape == (2, 1, 8, 6) and float(images.min()) >= 0 and float(images.max()) <= 1
    assert torch.equal(prior.sample(2, (8, 6), steps=3, seed=1), images)
    with pytest.raises(IDMError, match="divisible by 2"):
        prior.sample(1, 7, steps=2)


# --- errors --------------------------------------------------------------------------------------
def test_a_conditional_unet_is_not_a_zero_shot_prior(folders) -> None:
    with pytest.raises(IDMError, match="UNet2DConditionModel.*only supported for conversion"):
        load_prior(folders["conditional"])
    with pytest.raises(IDMError, match="only supported for conversion"):
        get_method("ddnm").build(checkpoint=str(folders["conditional"]))
    model, _, _ = load_diffusers_unet(folders["conditional"])
    with pytest.raises(IDMError, match="needs a diffusers UNet2DModel"):
        DiffusersPrior(model)


def test_missing_folders_never_reach_the_network(folders, monkeypatch) -> None:
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("the network was tried")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    missing = folders["model"].parent / "google" / "ddpm-cat-256"
    with pytest.raises(IDMError, match="not found.*hf:ORG/NAME"):
        load_diffusers_unet(missing)
    with pytest.raises(IDMError, match="not found"):
        load_prior("google/ddpm-cat-256")
    with pytest.raises(IDMError, match="malformed Hugging Face Hub id"):
        load_prior("hf:google")


def test_pickled_weights_are_refused(folders) -> None:
    assert not list(folders["pickle"].glob("*.safetensors"))
    with pytest.raises(IDMError, match="pickled.*convert them to safetensors"):
        load_prior(folders["pickle"])


def test_a_folder_without_weights(folders, tmp_path) -> None:
    (tmp_path / "config.json").write_text((folders["model"] / "config.json").read_text())
    with pytest.raises(IDMError, match="no diffusion_pytorch_model.safetensors"):
        load_diffusers_unet(tmp_path)


# --- command line --------------------------------------------------------------------------------
def test_methods_record_what_their_checkpoint_is() -> None:
    kinds = {name: get_method(name).checkpoint_kind for name in ("ddnm", "ddnm+", "dps", "idm", "tv", "pinv")}
    assert kinds == {"ddnm": "prior", "ddnm+": "prior", "dps": "prior", "idm": "idm", "tv": None, "pinv": None}
    assert get_method("idm").needs_checkpoint and not get_method("tv").needs_checkpoint


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "camera.png"
    save_image(path, sample_images(32)["camera"])
    return path


def test_cli_reconstruct_with_a_diffusers_prior(folders, image, tmp_path, capsys) -> None:
    out = tmp_path / "x.png"
    code = main(["reconstruct", str(image), "--ratio", "0.5", "--method", "ddnm", "--prior", str(folders["pipeline"]),
                 "-o", str(out)])
    assert code == 0 and out.is_file()
    assert "ddnm: 1 image(s)" in capsys.readouterr().out


@pytest.mark.parametrize("argv,fragment", [
    (["--method", "tv", "--prior", "{model}"], "--prior is for the methods built on a diffusion prior (ddnm, ddnm+, diffuserecon, dps, mbir, pnp)"),
    (["--method", "ddnm", "--prior", "{model}", "--checkpoint", "{model}"], "either --prior or --checkpoint"),
    (["--method", "ddnm", "--prior", "{conditional}"], "only supported for conversion"),
])
def test_cli_prior_errors(folders, image, tmp_path, capsys, argv, fragment) -> None:
    argv = [a.format(**{k: str(v) for k, v in folders.items()}) for a in argv]
    out = tmp_path / "x.png"
    for command in (["reconstruct", str(image), "-o", str(out)], ["eval", "--data", str(image.parent)]):
        code = main([*command, "--ratio", "0.5", *argv])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code != 0 and len(lines) == 1 and fragment in lines[0], err
    assert not out.exists()
