"""Denoiser priors: scico DnCNN conversion, ``DenoiserPrior``, the DnCNN-backbone IDM network and
multi-ratio IDM checkpoints."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from idm.data import save_image
from idm.errors import IDMError
from idm.network import IDMNet, load_idm
from idm.physics import BlockCS
from idm.priors import NoiseSchedule, load_prior
from idm.priors.denoiser import DenoiserPrior
from idm.priors.dncnn import CircularConv2d, DnCNN, DnCNNConfig, circular_pad
from idm.registry import get_method

msgpack = pytest.importorskip("msgpack")
convert = pytest.importorskip("train.convert_scico_dncnn")

pytestmark = pytest.mark.usefixtures("one_thread")


# --- a scico-format weights file, made here ------------------------------------------------------
def _array(a: np.ndarray) -> "msgpack.ExtType":
    a = np.ascontiguousarray(a, dtype=np.float32)
    return msgpack.ExtType(1, msgpack.packb((list(a.shape), a.dtype.name, a.tobytes())))


def flax_tree(depth: int, sigma_input: bool, seed: int = 0) -> dict:
    """Random DnCNN variables in the layout of scico's ``DnCNNNet`` (HWIO kernels, batch norms)."""
    rng = np.random.default_rng(seed)
    cin = 2 if sigma_input else 1
    params = {"conv_start": {"kernel": rng.normal(0, 0.2, (3, 3, cin, 64))},
              "conv_end": {"kernel": rng.normal(0, 0.05, (3, 3, 64, cin))}}
    stats = {}
    for k in range(depth - 2):
        params[f"ConvBNBlock_{k}"] = {"Conv_0": {"kernel": rng.normal(0, 0.05, (3, 3, 64, 64))},
                                      "BatchNorm_0": {"scale": rng.uniform(0.5, 1.5, 64), "bias": rng.normal(0, 0.1, 64)}}
        stats[f"ConvBNBlock_{k}"] = {"BatchNorm_0": {"mean": rng.normal(0, 0.1, 64), "var": rng.uniform(0.5, 2, 64)}}
    return {"params": params, "batch_stats": stats}


def pack(tree: dict) -> bytes:
    def encode(node):
        return {k: encode(v) for k, v in node.items()} if isinstance(node, dict) else _array(node)

    return msgpack.packb(encode(tree))


def reference_dncnn(tree: dict, z: torch.Tensor, sigma: float | None) -> torch.Tensor:
    """scico's forward written directly: circular conv (HWIO kernels), batch norm with running
    statistics, ReLU; output ``input − net`` on the first channel."""
    def conv(h, kernel):
        w = torch.from_numpy(np.asarray(kernel, dtype=np.float32)).permute(3, 2, 0, 1)
        return F.conv2d(F.pad(h, (1, 1, 1, 1), mode="circular"), w)

    h_in = z if sigma is None else torch.cat([z, torch.full_like(z, sigma)], dim=1)
    h = torch.relu(conv(h_in, tree["params"]["conv_start"]["kernel"]))
    k = 0
    while f"ConvBNBlock_{k}" in tree["params"]:
        p, s = tree["params"][f"ConvBNBlock_{k}"], tree["batch_stats"][f"ConvBNBlock_{k}"]["BatchNorm_0"]
        h = F.batch_norm(conv(h, p["Conv_0"]["kernel"]), *(torch.from_numpy(np.asarray(v, dtype=np.float32)) for v in (
            s["mean"], s["var"], p["BatchNorm_0"]["scale"], p["BatchNorm_0"]["bias"])), training=False, eps=1e-5)
        h = torch.relu(h)
        k += 1
    return (h_in - conv(h, tree["params"]["conv_end"]["kernel"]))[:, :1]


@pytest.mark.parametrize("variant, sigma", [("6N", 0.1), ("6M", None)])
def test_converted_network_equals_scico_forward(variant: str, sigma: float | None) -> None:
    tree = flax_tree(6, sigma is not None)
    net, _ = convert.convert_tree(convert.decode_flax_msgpack(pack(tree)), variant)
    z = torch.rand(2, 1, 20, 24)
    with torch.no_grad():
        torch.testing.assert_close(net(z, sigma), reference_dncnn(tree, z, sigma), rtol=1e-4, atol=1e-5)


def test_converter_round_trip_through_a_checkpoint(tmp_path) -> None:
    tree = flax_tree(6, True, seed=3)
    mpk = tmp_path / "dncnn6N.mpk"
    mpk.write_bytes(pack(tree))
    assert convert.main(["--source", str(mpk), "--variant", "6N", "--out", str(tmp_path / "dn"), "--dtype", "float32"]) == 0
    config = json.loads((tmp_path / "dn" / "config.json").read_text())
    assert config["architecture"] == "dncnn" and config["provenance"]["license"] == "BSD-3-Clause"
    assert "BSD" in (tmp_path / "dn" / "README.md").read_text()
    prior = load_prior(tmp_path / "dn")
    assert isinstance(prior, DenoiserPrior)
    z = torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(prior.denoise(z, 0.05), reference_dncnn(tree, z, 0.05), rtol=1e-4, atol=1e-5)


def test_converter_gives_one_line_errors(tmp_path, capsys) -> None:
    data = pack(flax_tree(6, True))
    truncated = tmp_path / "dncnn6N.mpk"
    truncated.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    assert convert.main(["--source", str(truncated), "--variant", "6N", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "truncated" in err and "\n" not in err
    assert not out.exists()  # nothing half-written
    wrong = tmp_path / "wrong.mpk"
    wrong.write_bytes(data)
    assert convert.main(["--source", str(wrong), "--variant", "17N", "--out", str(out)]) == 2
    assert "does not hold a DnCNN-17N" in capsys.readouterr().err
    assert convert.main(["--source", str(tmp_path / "missing.whl"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_shipped_denoisers_load_and_denoise() -> None:
    for name in ("dncnn-17", "dncnn-6"):
        prior = load_prior(name)
        assert isinstance(prior, DenoiserPrior) and prior.channels == 1 and prior.size_multiple == 1
        x = torch.linspace(0.2, 0.8, 32).repeat(32, 1)[None, None]
        z = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert F.mse_loss(prior.denoise(z, 0.1), x) < 0.25 * F.mse_loss(z, x)


# --- DenoiserPrior ---------------------------------------------------------------------------------
def tiny_denoiser(seed: int = 0) -> DnCNN:
    torch.manual_seed(seed)
    return DnCNN(DnCNNConfig(depth=4, features=8)).eval()


def test_denoiser_prior_eps_and_x0_are_consistent() -> None:
    prior = DenoiserPrior(tiny_denoiser(), NoiseSchedule())
    x_t = torch.randn(2, 1, 12, 12, dtype=torch.float64)
    prior.denoiser.double()
    t = torch.tensor([50, 400])
    abar = prior.schedule.abar(t, x_t)
    with torch.no_grad():
        x0 = prior.schedule.predict_x0(x_t, t, prior(x_t, t))
        sigma = ((1 - abar) / abar).sqrt() / 2
        expected = 2 * prior.denoise((x_t / abar.sqrt() + 1) / 2, sigma) - 1
    torch.testing.assert_close(x0, expected, rtol=1e-10, atol=1e-10)


def test_denoiser_prior_samples_and_runs_ddnm() -> None:
    prior = DenoiserPrior(tiny_denoiser(), NoiseSchedule())
    images = prior.sample(2, (8, 12), steps=4)
    assert images.shape == (2, 1, 8, 12) and bool(torch.isfinite(images).all())
    from idm.zeroshot.ddnm import sample_ddnm

    op = BlockCS((16, 16), 0.5, block_size=8)
    y = op.A(torch.rand(1, 1, 16, 16))
    with torch.no_grad():
        x = sample_ddnm(prior, y, op, prior.schedule, steps=5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(op.A(x), y, rtol=1e-4, atol=1e-4)  # data-consistent


# --- IDM on a DnCNN backbone -------------------------------------------------------------------------
def _gradients(net: IDMNet, levels: str, y, x, op):
    net.set_levels(levels)
    net.zero_grad()
    loss = (net(y, op) - x).abs().mean()
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def assert_levels_give_plain_gradients(net: IDMNet, y, x, op) -> None:
    """Every parameter gets a gradient, and levels steps / both give plain autograd's (float64)."""
    loss_plain, plain = _gradients(net, "none", y, x, op)
    assert len(plain) == len(list(net.parameters()))
    for levels in ("steps", "both"):
        loss, grads = _gradients(net, levels, y, x, op)
        assert loss == pytest.approx(loss_plain, rel=1e-10)
        for name, grad in plain.items():
            assert float((grads[name] - grad).norm()) <= 1e-8 * max(float(grad.norm()), 1e-3), name


def test_circular_conv_is_torchs_circular_conv_in_channels_last_layout() -> None:
    """DnCNN's convolution pads into a channels-last buffer: the same values and gradients as
    ``nn.Conv2d(padding_mode="circular")``, and the output keeps the layout."""
    conv = CircularConv2d(3, 4, bias=True).double()
    ref = torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular").double()
    ref.load_state_dict(conv.state_dict())
    x = torch.randn(2, 3, 7, 5, dtype=torch.float64, requires_grad=True)
    out = conv(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref(x))
    g_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, conv.weight, conv.bias), g_out)
    for got, want in zip(grads, torch.autograd.grad(ref(x), (x, ref.weight, ref.bias), g_out)):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(circular_pad(x.detach(), 2), F.pad(x.detach(), (2,) * 4, mode="circular"))


def test_dncnn_backbone_gradients_equal_plain_autograd_and_invert() -> None:
    prior = DenoiserPrior(tiny_denoiser(1), NoiseSchedule())
    net = IDMNet.from_prior(prior, steps=2, coupling_v=0.5, levels="none").double()
    with torch.no_grad():  # give the zero-initialised injector outputs weights, so they get gradients
        for p in net.parameters():
            if p.ndim > 0 and not p.abs().any():
                p.normal_(0, 0.05)
    assert net.config.unshuffle == 1 and net.config.schedule_init == "sigma"
    op = BlockCS((16, 16), 0.25, block_size=8, seed=2)
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = op.A(x)
    assert_levels_give_plain_gradients(net, y, x, op)
    from idm.invertible import inversion_error

    assert len(net.unet.sequences()) == 1  # the middle conv-ReLU layers and injectors: one reversible run
    assert inversion_error(net.set_levels("both"), y, op) < 1e-9


@pytest.mark.parametrize("coils", [1, 3])
def test_complex_mri_network_gradients_equal_plain_autograd_invert_and_fit_the_data(coils: int) -> None:
    """IDM on the MRI operator (complex images as [Re, Im] channels, a 1-channel DnCNN folded over
    them): the reversible levels give plain autograd's gradients (float64, T = 2), the network inverts,
    and with v = 0 its output is k-space consistent."""
    from idm.physics import MRI

    prior = DenoiserPrior(tiny_denoiser(5), NoiseSchedule())
    net = IDMNet.from_prior(prior, steps=2, coupling_v=0.5, levels="none", complex=True).double()
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 0 and not p.abs().any():
                p.normal_(0, 0.05)
    assert net.config.channels == 2 and net.config.fold == 2
    g = torch.Generator().manual_seed(0)
    sens = None
    if coils > 1:
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
        sens = torch.stack([torch.exp(-((yy - c) ** 2 + xx**2)) * torch.exp(1j * c * xx) for c in (-1.0, 0.0, 1.0)])
        sens = sens / sens.abs().square().sum(0).sqrt()
    op = MRI((16, 16), acceleration=2, center_fraction=0.25, seed=1, sensitivities=sens, cg_iterations=200, cg_tol=0)
    x = torch.complex(torch.rand(2, 1, 16, 16, generator=g, dtype=torch.float64),
                      0.2 * torch.rand(2, 1, 16, 16, generator=g, dtype=torch.float64))
    y = op.A(x)
    assert net(y, op).dtype == torch.complex128 and net(y, op).shape == (2, 1, 16, 16)
    assert_levels_give_plain_gradients(net, y, x, op)
    from idm.invertible import inversion_error

    assert inversion_error(net.set_levels("both"), y, op) < 1e-9
    with torch.no_grad():
        out = net.set_levels("none").zero_couplings()(y, op)
    torch.testing.assert_close(op.A(out), y, rtol=1e-6, atol=1e-6)
    with pytest.raises(IDMError, match="complex"):
        net(y.real.contiguous(), op)


def test_dncnn_backbone_zero_couplings_is_the_plain_denoiser_sampler() -> None:
    prior = DenoiserPrior(tiny_denoiser(2), NoiseSchedule())
    net = IDMNet.from_prior(prior, steps=1, levels="none", sigma_max=0.05, sigma_min=0.01).zero_couplings()
    op = BlockCS((16, 16), 0.5, block_size=8, seed=1)
    x = torch.rand(1, 1, 16, 16)
    y = op.A(x)
    start = op.A_dagger(y)
    with torch.no_grad():
        out = net(y, op)
        abar = net.abar()[1]
        eps = prior.eps_at(abar.sqrt() * (2 * start - 1), abar)
        x0 = (2 * start - 1 - (1 - abar).sqrt() / abar.sqrt() * eps + 1) / 2
        expected = x0 - op.A_dagger(op.A(x0) - y)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_dncnn_backbone_starts_and_configuration_errors() -> None:
    prior = DenoiserPrior(tiny_denoiser(3), NoiseSchedule())
    op = BlockCS((32, 32), 0.3, block_size=16, seed=1)
    x = torch.rand(1, 1, 32, 32)
    y = op.A(x)
    for start in ("adjoint", "tv"):
        net = IDMNet.from_prior(prior, steps=2, levels="none", start=start).eval()
        with torch.no_grad():
            assert net(y, op).shape == x.shape
    tv_net = IDMNet.from_prior(prior, steps=2, levels="none", start="tv")
    with torch.no_grad():
        torch.testing.assert_close(tv_net.start_estimate(y, op), get_method("tv").build()(y, op))
    with pytest.raises(IDMError, match="unshuffle must be 1"):
        IDMNet.from_prior(prior, unshuffle=2)
    with pytest.raises(IDMError, match="unknown start"):
        IDMNet.from_prior(prior, start="magic")
    with pytest.raises(IDMError, match="sigma_min < sigma_max"):
        IDMNet.from_prior(prior, sigma_max=0.01, sigma_min=0.1)


# --- multi-ratio checkpoints ---------------------------------------------------------------------------
def test_multi_ratio_checkpoint_serves_untrained_ratios(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("IDM_CHECKPOINT_DIR", str(tmp_path))
    net = IDMNet.from_prior(DenoiserPrior(tiny_denoiser(4), NoiseSchedule()), steps=2, levels="none")
    net.save(tmp_path / "idm-multi", "# card", ratio=None, ratio_range=(0.05, 0.6), block_size=8, dtype=None)
    build = get_method("idm").build
    for ratio in (0.2, 0.4):  # never trained as such: one network serves the range
        reconstruct = build(ratio=ratio)
        op = BlockCS((16, 16), ratio, block_size=8, seed=3)
        x = torch.rand(1, 1, 16, 16)
        with torch.no_grad():
            torch.testing.assert_close(reconstruct(op.A(x), op), net.eval()(op.A(x), op), rtol=1e-6, atol=1e-6)
    with pytest.raises(IDMError, match=r"no shipped idm checkpoint for ratio 0\.8"):
        build(ratio=0.8)
    reconstruct = build(checkpoint=str(tmp_path / "idm-multi"))
    op = BlockCS((16, 16), 0.8, block_size=8)
    with pytest.raises(IDMError, match=r"trained for ratios in \[0\.05, 0\.6\]"):
        reconstruct(op.A(torch.rand(1, 1, 16, 16)), op)
    with pytest.raises(IDMError, match=r"ratios in \[0\.05, 0\.6\], not 0\.7"):
        load_idm(tmp_path / "idm-multi", ratio=0.7)
    with pytest.raises(IDMError, match="exactly one"):
        net.checkpoint_config(ratio=0.1, ratio_range=(0.05, 0.6))


def test_finetune_trains_a_multi_ratio_denoiser_network(tmp_path) -> None:
    from PIL import Image

    from idm.training.finetune import main

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray((rng.random((40, 40)) * 255).astype("uint8")).save(data / f"{i}.png")
    prior_dir = tmp_path / "dn"
    DenoiserPrior(tiny_denoiser(5), NoiseSchedule()).save(prior_dir, "# tiny denoiser", dtype=None)
    out = tmp_path / "run"
    code = main(["--prior", str(prior_dir), "--ratio-range", "0.1,0.5", "--val-ratios", "0.2,0.4", "--data", str(data),
                 "--val", str(data), "--val-limit", "1", "--steps", "3", "--batch", "2", "--patch", "32",
                 "--block-size", "16", "--levels", "none", "--start", "tv", "--out", str(out), "--no-progress",
                 "--val-every", "0"])
    assert code == 0
    config = json.loads((out / "checkpoint" / "config.json").read_text())
    assert config["ratio"] is None and config["ratio_range"] == [0.1, 0.5]
    assert config["idm"]["start"] == "tv" and config["idm"]["denoiser"]["depth"] == 4
    assert set(config["validation"]) >= {"psnr@0.2", "psnr@0.4", "psnr"}
    card = (out / "checkpoint" / "README.md").read_text()
    assert "every ratio in [0.1, 0.5]" in card and "--ratio-range 0.1,0.5" in card
    net, _ = load_idm(out / "checkpoint", ratio=0.3)
    assert net.config.denoiser is not None


def test_ratio_range_is_for_idm_networks_only(tmp_path, capsys) -> None:
    from idm.training.finetune import main

    code = main(["--arch", "unrolled", "--ratio-range", "0.1,0.5", "--data", str(tmp_path), "--out", str(tmp_path / "r"),
                 "--steps", "1", "--batch", "1", "--patch", "32", "--block-size", "16", "--no-progress"])
    assert code == 2 and "--arch unrolled trains for one block-CS --ratio" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_calibrated_sigma_scale_interpolates_and_the_tool_writes_it(tmp_path) -> None:
    net = IDMNet.from_prior(DenoiserPrior(tiny_denoiser(6), NoiseSchedule()), steps=2, levels="none")
    config = replace(net.config, sigma_scale=((0.5, 0.25), (0.1, 1.0)))
    assert config.sigma_scale == ((0.1, 1.0), (0.5, 0.25))  # sorted
    assert config.sigma_factor(None) == 1.0 and config.sigma_factor(0.05) == 1.0 and config.sigma_factor(0.8) == 0.25
    assert config.sigma_factor(0.3) == pytest.approx(0.5)  # log-linear between the anchors
    for bad in (((0.0, 1.0),), ((0.2, 0.0),), ((0.2, 1.0), (0.2, 2.0))):
        with pytest.raises(IDMError, match="sigma_scale"):
            replace(net.config, sigma_scale=bad)
    abar = net.abar().detach()
    net.config = config
    scaled = net.abar(0.5).detach()
    torch.testing.assert_close((1 - scaled[1:]) / scaled[1:], 0.25 * (1 - abar[1:]) / abar[1:])
    torch.testing.assert_close(net.abar(0.05).detach(), abar)
    # the tool: a grid per ratio on training images, the best factor into config and card, weights unchanged
    from train.calibrate_schedule import main

    net.config = replace(config, sigma_scale=None)
    net.save(tmp_path / "multi", "# card", ratio=None, ratio_range=(0.1, 0.5), block_size=8, dtype=None)
    for i in range(2):
        save_image(tmp_path / "train" / f"{i}.png", torch.rand(1, 16, 16))
    assert main(["--checkpoint", str(tmp_path / "multi"), "--data", str(tmp_path / "train"), "--ratios", "0.2,0.4",
                 "--factors", "0.5,1", "--out", str(tmp_path / "cal")]) == 0
    calibrated, stored = load_idm(tmp_path / "cal")
    assert [r for r, _ in calibrated.config.sigma_scale] == [0.2, 0.4]
    assert all(f in (0.5, 1.0) for _, f in calibrated.config.sigma_scale)
    assert "## Schedule calibration" in (tmp_path / "cal" / "README.md").read_text()
    assert (tmp_path / "multi" / "model.safetensors").read_bytes() == (tmp_path / "cal" / "model.safetensors").read_bytes()
    assert calibrated.config.passes == 1
    assert main(["--checkpoint", str(tmp_path / "multi"), "--data", str(tmp_path / "train"), "--ratios", "0.2",
                 "--factors", "1", "--passes", "2", "--out", str(tmp_path / "cal2")]) == 0
    assert load_idm(tmp_path / "cal2")[0].config.passes == 2
    assert main(["--checkpoint", str(tmp_path / "cal"), "--data", str(tmp_path / "train"), "--factors", "0,1"]) == 2
