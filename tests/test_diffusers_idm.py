"""Diffusers U-Nets converted into the invertible IDM network (offline, tiny random configs)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers")

from idm.bench.accounting import peak_memory_bytes  # noqa: E402
from idm.bench.memory import MemoryCase, idm_factory  # noqa: E402
from idm.cli import main as idm_main  # noqa: E402
from idm.errors import IDMError  # noqa: E402
from idm.invertible import convert_unet  # noqa: E402
from idm.invertible.diffusers import PruneOptions, diffusers_layout, prune_diffusers_unet  # noqa: E402
from idm.io.checkpoint import read_checkpoint_config  # noqa: E402
from idm.network import IDMNet, load_idm  # noqa: E402
from idm.network.adapt import adapt_in_conv, adapt_out_conv  # noqa: E402
from idm.physics import BlockCS  # noqa: E402
from idm.priors import NoiseSchedule  # noqa: E402
from idm.registry import get_method  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def randomised(model: torch.nn.Module, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """Random weights for the zero-initialised layers, so every block does something."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.2)
    return model.to(dtype)


def tiny_unet2d(in_channels: int = 1, out_channels: int | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=16, in_channels=in_channels, out_channels=out_channels or in_channels, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=4)


def tiny_sd() -> torch.nn.Module:
    """A Stable-Diffusion-shaped UNet2DConditionModel: 4 latent channels, 3 cross-attention stages + 1 plain."""
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4, cross_attention_dim=12, attention_head_dim=4)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    """A pipeline-style folder: ``unet/`` (safetensors) + ``scheduler/`` (SD's scaled-linear DDPM)."""
    root = tmp_path_factory.mktemp("sd") / "pipeline"
    tiny_sd().save_pretrained(root / "unet")
    diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(
        root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                       "unet": ["diffusers", "UNet2DConditionModel"]}))
    return root


# --- conversion equals the (pruned) original --------------------------------------------------
def test_converted_unet2d_equals_the_original_at_v0() -> None:
    model = randomised(tiny_unet2d())
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    rev = convert_unet(diffusers_layout(prune_diffusers_unet(model, PruneOptions()), 300.0), v_init=0.0,
                       memory_mode="plain")
    with torch.no_grad():
        ref, out = model(x, 300).sample, rev(x)
    assert float(ref.abs().max()) > 0.1
    assert float((out - ref).abs().max()) <= 1e-12 * float(ref.abs().max())


def test_sd_style_pruning_and_conversion_equal_the_pruned_original() -> None:
    model = randomised(tiny_sd())
    pruned = prune_diffusers_unet(model, PruneOptions.paper())
    assert len(pruned.down_blocks) == 2 and len(pruned.up_blocks) == 2 and pruned.mid_block is None
    assert len(model.down_blocks) == 4 and model.mid_block is not None  # the original is untouched
    assert all(b.attn2 is None for b in pruned.modules() if hasattr(b, "attn1"))
    assert sum(p.numel() for p in pruned.parameters()) < 0.6 * sum(p.numel() for p in model.parameters())
    x = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    text = torch.zeros(2, 1, 12, dtype=torch.float64)  # unused: cross-attention is gone
    rev = convert_unet(diffusers_layout(pruned, 300.0), v_init=0.0, memory_mode="plain")
    with torch.no_grad():
        ref, out = pruned(x, 300, encoder_hidden_states=text).sample, rev(x)
    assert float(ref.abs().max()) > 0.1
    assert float((out - ref).abs().max()) <= 1e-12 * float(ref.abs().max())
    # most of the network sits in reversible runs
    reversible = sum(p.numel() for s in rev.sequences() for p in s.parameters())
    assert reversible > 0.5 * sum(p.numel() for p in rev.parameters())


def test_unsupported_models_and_options_are_refused() -> None:
    with pytest.raises(IDMError, match="prune cross_attention"):
        prune_diffusers_unet(tiny_sd(), PruneOptions(cross_attention=False))
    with pytest.raises(IDMError, match="cannot remove 2"):
        prune_diffusers_unet(tiny_unet2d(), PruneOptions(deepest=2))
    with pytest.raises(IDMError, match="unsupported diffusers model"):
        prune_diffusers_unet(torch.nn.Conv2d(1, 1, 1), PruneOptions())


# --- channel adaptation --------------------------------------------------------------------------
def test_gray_images_on_an_rgb_model_with_learned_variance() -> None:
    conv_in, conv_out = torch.nn.Conv2d(3, 5, 3, padding=1).double(), torch.nn.Conv2d(5, 6, 3, padding=1).double()
    new_in, new_out = adapt_in_conv(conv_in, 1, 2), adapt_out_conv(conv_out, 1, 2, 3)
    assert (new_in.in_channels, new_out.out_channels) == (4, 4)
    gray = torch.rand(1, 1, 8, 8, dtype=torch.float64)
    # each sub-image channel sees 1/4 of the gray image replicated to the model's 3 channels
    sub = F.pixel_unshuffle(gray.expand(1, 1, 8, 8), 2)
    expected = conv_in(F.interpolate(sub.mean(1, keepdim=True), scale_factor=1).expand(1, 3, 4, 4))
    assert torch.allclose(new_in(sub), expected)
    h = torch.randn(1, 5, 4, 4, dtype=torch.float64)
    eps = conv_out(h)[:, :3].mean(1, keepdim=True)  # ε half of the learned-variance output, mean over RGB
    assert torch.allclose(new_out(h), eps.expand(1, 4, 4, 4))
    with pytest.raises(IDMError, match="cannot adapt"):
        adapt_in_conv(conv_in, 2, 1)


# --- the IDM network on a diffusers backbone ------------------------------------------------------
def sd_network(steps: int = 2, levels: str = "both") -> IDMNet:
    schedule = NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012)
    net = IDMNet.from_diffusers(randomised(tiny_sd(), torch.float32), schedule, levels=levels, steps=steps)
    with torch.no_grad():  # the injectors' zero-initialised outputs too
        for p in net.parameters():
            if p.ndim > 0 and not p.any():
                p.normal_(0.0, 0.05)
    return net.double()


def test_idm_network_gradients_equal_plain_autograd_at_T2() -> None:
    net = sd_network()
    op = BlockCS((32, 32), 0.25, block_size=8)
    x = torch.rand(2, 1, 32, 32, dtype=torch.float64)
    y = op.A(x)
    grads = {}
    for levels in ("none", "both"):
        net.set_levels(levels)
        loss = (net(y, op) - x).abs().mean()
        grads[levels] = torch.autograd.grad(loss, list(net.parameters()))
    ref = torch.cat([g.flatten() for g in grads["none"]])
    got = torch.cat([g.flatten() for g in grads["both"]])
    assert float(ref.norm()) > 0
    assert float((got - ref).norm() / ref.norm()) <= 1e-8


def test_memory_of_the_converted_sd_network_is_flat_in_T(sd_folder: Path) -> None:
    factory = idm_factory(str(sd_folder), seed=0)
    peaks = {}
    for steps in (1, 4):
        setup = factory(MemoryCase("invertible", steps, 64, 1), torch.device("cpu"))
        peaks[steps] = peak_memory_bytes(lambda: setup.loss().backward(), torch.device("cpu"))
    vanilla = factory(MemoryCase("vanilla", 4, 64, 1), torch.device("cpu"))
    peak_vanilla = peak_memory_bytes(lambda: vanilla.loss().backward(), torch.device("cpu"))
    assert peaks[4] <= 1.15 * peaks[1]
    assert peaks[4] < 0.5 * peak_vanilla


def test_checkpoint_round_trip_rebuilds_the_diffusers_backbone(tmp_path: Path) -> None:
    net = sd_network(levels="none").float()
    net.save(tmp_path / "idm-sd", "# tiny", ratio=0.25, block_size=8, dtype=None)
    config = read_checkpoint_config(tmp_path / "idm-sd")
    assert config["idm"]["backbone"]["class_name"] == "UNet2DConditionModel"
    loaded, _ = load_idm(tmp_path / "idm-sd")
    op = BlockCS((32, 32), 0.25, block_size=8)
    y = op.A(torch.rand(1, 1, 32, 32))
    with torch.no_grad():
        assert torch.equal(loaded(y, op), net.eval()(y, op))


def test_bench_memory_and_finetune_take_a_diffusers_prior(sd_folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "mem.json"
    assert idm_main(["bench", "memory", "--prior", str(sd_folder), "--steps", "1", "2", "--size", "32",
                     "--modes", "vanilla", "invertible", "--threads", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["mode"], r["steps"]) for r in rows} == {(m, s) for m in ("vanilla", "invertible") for s in (1, 2)}
    assert "IDM network from" in capsys.readouterr().out

    data = tmp_path / "data"
    data.mkdir()
    from idm.data import save_image

    for i in range(2):
        save_image(data / f"{i}.png", torch.rand(1, 40, 40))
    run = tmp_path / "run"
    args = ["finetune", "--prior", str(sd_folder), "--ratio", "0.25", "--data", str(data), "--out", str(run),
            "--steps", "2", "--batch", "2", "--patch", "32", "--block-size", "8", "--sampling-steps", "2",
            "--val-every", "0", "--threads", "1", "--no-progress"]
    assert idm_main(args) == 0
    losses = [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    config = read_checkpoint_config(run / "checkpoint")
    assert config["training"]["init_kind"] == "diffusers"
    assert "diffusers UNet2DConditionModel" in (run / "checkpoint" / "README.md").read_text()
    reconstruct = get_method("idm").build(checkpoint=str(run / "checkpoint"), ratio=0.25)
    op = BlockCS((32, 32), 0.25, block_size=8)
    with torch.no_grad():
        assert torch.isfinite(reconstruct(op.A(torch.rand(1, 1, 32, 32)), op)).all()
    # --prune only with a diffusers prior; --prior and --init exclusive
    assert idm_main([*args[:-1], "--no-progress", "--init", "prior-gray"]) == 2
