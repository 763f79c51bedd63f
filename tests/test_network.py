"""The IDM network: sampler wiring, two-level invertibility, injectors, checkpoints, the ``idm`` method."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from idm.errors import IDMError
from idm.network import IDMConfig, IDMNet, load_idm
from idm.network.adapt import adapt_unet
from idm.physics import MRI, BlockCS, Inpainting, ParallelBeamCT, SuperResolution
from idm.priors import NoiseSchedule, Prior, UNet
from idm.registry import get_method

from conftest import blockcs_training_losses, tiny_unet_config

TINY = tiny_unet_config(num_res_blocks=2)


def randomized(module: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Give the zero-initialised layers (U-Net out conv, injector outputs) small random weights."""
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim > 0 and not p.abs().any():
                p.normal_(0, scale)
    return module


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prior() -> Prior:
    torch.manual_seed(1)
    return Prior(randomized(UNet(TINY)), NoiseSchedule())


def images(batch: int = 2, size: int = 32) -> torch.Tensor:
    """Smooth random images in [0, 1]."""
    x = torch.rand(batch, 1, size // 4, size // 4)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


# --- the sampler ---------------------------------------------------------------------------------
def plain_sampler(unet: UNet, emb: torch.Tensor, abar: list[float], y: torch.Tensor, op, unshuffle: int,
                  start: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: deterministic DDIM with range-null-space data consistency, written out directly,
    from ``start`` (default A†y)."""
    T = len(abar) - 1
    x = math.sqrt(abar[T]) * (2 * (op.A_dagger(y) if start is None else start) - 1)
    for t in range(T, 0, -1):
        h = F.pixel_unshuffle(x, unshuffle) if unshuffle > 1 else x
        eps = unet(h, emb=emb)
        eps = F.pixel_shuffle(eps, unshuffle) if unshuffle > 1 else eps
        a, a_prev = abar[t], abar[t - 1]
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        image = (x0 + 1) / 2
        image = image - op.A_dagger(op.A(image) - y)
        x0 = 2 * image - 1
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return (x + 1) / 2


@pytest.mark.parametrize("unshuffle", [1, 2])
def test_network_with_zero_couplings_is_the_plain_sampler(prior: Prior, unshuffle: int) -> None:
    net = IDMNet.from_prior(prior, steps=3, unshuffle=unshuffle, levels="none").double().zero_couplings()
    # α initialised to 0.5 (the IDM paper's initialisation): ᾱ = 0.5, 0.25, 0.125; the constant embedding is the
    # prior's at the timestep whose ᾱ is closest to the middle step's 0.25
    abar = [1.0, 0.5, 0.25, 0.125]
    torch.testing.assert_close(net.abar().detach(), torch.tensor(abar, dtype=torch.float64))
    t_const = int((prior.schedule.alphas_cumprod - 0.25).abs().argmin())
    assert net.unet.t_constant == t_const
    reference_unet = adapt_unet(prior.unet, unshuffle)
    emb = reference_unet.embed_time(torch.tensor([t_const])).double()  # the prior computes it in float32
    reference_unet.double()
    op = BlockCS((32, 32), 0.25, block_size=8, seed=3)
    y = op.A(images().double())
    with torch.no_grad():
        expected = plain_sampler(reference_unet, emb, abar, y, op, unshuffle)
        got = net(y, op)  # injectors are zero-initialised: identity
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    # passes = 2: the sampler runs again from its own output
    net.config = dataclasses.replace(net.config, passes=2)
    with torch.no_grad():
        twice = plain_sampler(reference_unet, emb, abar, y, op, unshuffle, start=expected)
        torch.testing.assert_close(net(y, op), twice, rtol=1e-10, atol=1e-10)
    assert float((twice - expected).abs().max()) > 1e-3  # the second pass does something


def test_passes_keep_gradients_equal_to_plain_autograd_and_are_validated(prior: Prior) -> None:
    torch.manual_seed(0)
    net = randomized(IDMNet.from_prior(prior, steps=2, unshuffle=2, levels="none", passes=2)).double()
    op = BlockCS((32, 32), 0.25, block_size=8, seed=5)
    x = images().double()
    y = op.A(x)
    loss_plain, plain = _gradients(net, "none", y, x, op)
    loss, grads = _gradients(net, "both", y, x, op)
    assert loss == pytest.approx(loss_plain, rel=1e-10)
    for name, g in plain.items():
        assert float((grads[name] - g).norm()) <= 1e-8 * max(float(g.norm()), 1e-3), name
    for bad in (0, True, 1.5):
        with pytest.raises(IDMError, match="passes"):
            dataclasses.replace(net.config, passes=bad)


def test_unshuffled_unet_initialisation_reproduces_the_prior_on_half_resolution(prior: Prior) -> None:
    """Adapted in/out convs: on a nearest-upsampled image z the 4-channel U-Net gives the prior's ε(z) upsampled."""
    adapted = adapt_unet(prior.unet, 2).double()
    assert adapted.config.in_channels == adapted.config.out_channels == 4
    original = copy.deepcopy(prior.unet).double()
    z = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    up = F.interpolate(z, scale_factor=2, mode="nearest")
    emb = original.embed_time(torch.tensor([300]))
    with torch.no_grad():
        got = F.pixel_shuffle(adapted(F.pixel_unshuffle(up, 2), emb=emb), 2)
        expected = F.interpolate(original(z, emb=emb), scale_factor=2, mode="nearest")
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert prior.unet.input_conv.in_channels == 1  # the prior itself is untouched


def test_prior_schedule_initialisation(prior: Prior) -> None:
    net = IDMNet.from_prior(prior, steps=3, schedule_init="prior")
    expected = prior.schedule.alphas_cumprod[prior.schedule.respaced(3)].float()
    torch.testing.assert_close(net.abar().detach()[1:], expected)


# --- two-level invertibility -------------------------------------------------------------------
def _gradients(net: IDMNet, levels: str, y: torch.Tensor, x: torch.Tensor, op) -> tuple[float, dict]:
    net.set_levels(levels)
    net.zero_grad(set_to_none=True)
    loss = (net(y, op) - x).abs().mean()
    loss.backward()
    return float(loss.detach()), {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-8), (torch.float32, 1e-4)])
def test_gradients_of_reversible_levels_equal_plain_autograd(prior: Prior, dtype: torch.dtype, tolerance: float) -> None:
    torch.manual_seed(0)
    net = randomized(IDMNet.from_prior(prior, steps=2, unshuffle=2, levels="none")).to(dtype)
    op = BlockCS((32, 32), 0.25, block_size=8, seed=5)
    x = images().to(dtype)
    y = op.A(x)
    loss_plain, plain = _gradients(net, "none", y, x, op)
    assert len(plain) == len(list(net.parameters()))  # every parameter (α, v, s, m, injectors, U-Net) is trained
    flat_plain = torch.cat([g.flatten() for g in plain.values()])
    for levels in ("steps", "both"):
        loss, grads = _gradients(net, levels, y, x, op)
        assert loss == pytest.approx(loss_plain, rel=tolerance)
        assert grads.keys() == plain.keys()
        flat = torch.cat([grads[n].flatten() for n in plain])
        error = float((flat - flat_plain).norm() / flat_plain.norm())
        assert error <= tolerance, f"levels={levels}: relative gradient error {error:.2e}"
        if dtype == torch.float64:
            for name, g in plain.items():
                assert float((grads[name] - g).norm()) <= tolerance * max(float(g.norm()), 1e-3), name


def test_reversible_training_stores_less_than_plain_autograd(prior: Prior) -> None:
    """Level 1 + 2 keep far fewer saved activations than plain autograd (counted via saved-tensor hooks)."""
    net = IDMNet.from_prior(prior, steps=3, unshuffle=1)
    op = BlockCS((32, 32), 0.25, block_size=8)
    x = images()
    y = op.A(x)
    saved_bytes = {}
    for levels in ("none", "both"):
        net.set_levels(levels)
        total = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = (net(y, op) - x).abs().mean()
        loss.backward()
        saved_bytes[levels] = total[0]
    assert saved_bytes["both"] < 0.2 * saved_bytes["none"]


def test_loss_falls_when_training_a_tiny_network(prior: Prior) -> None:
    torch.manual_seed(0)
    net = IDMNet.from_prior(prior, steps=2, unshuffle=2, levels="both")
    losses = blockcs_training_losses(net, images(4), steps=12)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0]


# --- any operator --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "op",
    [
        BlockCS((40, 24), 0.3, block_size=8, seed=2),  # domain 40x24 → padded canvas 40x24 (multiple of 4)
        Inpainting((30, 26), ratio=0.4, seed=1),  # domain not a multiple of 4: the canvas is padded
        SuperResolution((30, 30), factor=3),
    ],
    ids=["blockcs", "inpainting", "superres"],
)
def test_network_works_with_any_operator(prior: Prior, op) -> None:
    net = randomized(IDMNet.from_prior(prior, steps=2, unshuffle=2, levels="both"))
    x = torch.rand(2, 1, *op.image_size)
    y = op.measure(x)
    out = net(y, op)
    assert out.shape == (2, 1, *op.domain_size)
    assert bool(torch.isfinite(out).all())
    (out - x).abs().mean().backward()  # (not mean |out|: its gradient can lie in A's row space)
    injector_grads = [p.grad for n, p in net.named_parameters() if ".to_image." in n]
    assert injector_grads and any(g is not None and bool(g.abs().sum() > 0) for g in injector_grads)
    # with v = 0 the output is the last data-consistent x̂₀: it reproduces the measurements
    plain = IDMNet.from_prior(prior, steps=2, unshuffle=2, levels="none")
    plain.load_state_dict(net.state_dict())
    with torch.no_grad():
        out0 = plain.zero_couplings()(y, op)
    torch.testing.assert_close(op.A(out0), y, rtol=1e-4, atol=1e-4)


def test_bad_measurements_raise_clear_errors(prior: Prior) -> None:
    net = IDMNet.from_prior(prior, steps=1)
    op = BlockCS((32, 32), 0.25, block_size=8)
    with pytest.raises(IDMError, match="do not match"):
        net(torch.zeros(1, 1, 16, 10), op)
    y = op.A(images(1))
    y[0, 0, 0, 0] = float("nan")
    with pytest.raises(IDMError, match="finite"):
        net(y, op)
    with pytest.raises(IDMError, match="levels"):
        IDMConfig(levels="all")
    with pytest.raises(IDMError, match="unshuffle"):
        IDMConfig(unshuffle=4)
    with pytest.raises(IDMError, match="v = 0"):
        IDMNet.from_prior(prior, steps=1, levels="both").zero_couplings()


# --- checkpoints and the `idm` method ------------------------------------------------------------
def save_tiny(prior: Prior, directory, ratio: float, dtype=None) -> IDMNet:
    net = randomized(IDMNet.from_prior(prior, steps=2, unshuffle=2))
    net.save(directory, "# tiny test IDM", ratio=ratio, block_size=8, dtype=dtype)
    return net


def test_checkpoint_round_trip(prior: Prior, tmp_path) -> None:
    net = save_tiny(prior, tmp_path / "fp32", 0.25)
    loaded, config = load_idm(tmp_path / "fp32", ratio=0.25)
    assert config["architecture"] == "idm" and config["operator"] == "blockcs"
    assert config["ratio"] == 0.25 and config["block_size"] == 8
    assert IDMConfig.from_dict(config["idm"]).unet == TINY
    assert not loaded.training and loaded.levels == "none"
    op = BlockCS((32, 32), 0.25, block_size=8)
    y = op.A(images())
    with torch.no_grad():
        expected = net.set_levels("none")(y, op)
        torch.testing.assert_close(loaded(y, op), expected, rtol=0, atol=0)
    # compact storage: fp16 weights, each shared U-Net tensor once, output close to fp32
    net.save(tmp_path / "fp16", "# tiny", ratio=0.25, block_size=8, dtype=torch.float16)
    half, _ = load_idm(tmp_path / "fp16")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "fp16" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert {f.get_tensor(k).dtype for k in keys} == {torch.float16}
    assert len(keys) == len(set(id(p) for p in net.state_dict(keep_vars=True).values()))
    with torch.no_grad():
        torch.testing.assert_close(half(y, op), expected, rtol=0, atol=2e-2)
    with pytest.raises(IDMError, match="ratio"):
        load_idm(tmp_path / "fp32", ratio=0.1)
    json.loads((tmp_path / "fp16" / "config.json").read_text())  # valid JSON config


def test_idm_method_picks_the_shipped_checkpoint_for_the_ratio(prior: Prior, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("IDM_CHECKPOINT_DIR", str(tmp_path))
    net = save_tiny(prior, tmp_path / "idm-cs25", 0.25)
    build = get_method("idm").build
    reconstruct = build(ratio=0.25)
    op = BlockCS((32, 32), 0.25, block_size=8, seed=4)
    y = op.A(images())
    with torch.no_grad():
        torch.testing.assert_close(reconstruct(y, op), net.set_levels("none")(y, op), rtol=1e-6, atol=1e-6)
    # an explicit checkpoint folder works too
    explicit = build(checkpoint=str(tmp_path / "idm-cs25"), ratio=0.25)
    with torch.no_grad():
        torch.testing.assert_close(explicit(y, op), reconstruct(y, op), rtol=0, atol=0)
    # the passes option overrides the checkpoint's
    net.config = dataclasses.replace(net.config, passes=2)
    with torch.no_grad():
        torch.testing.assert_close(build(ratio=0.25, passes=2)(y, op), net.set_levels("none")(y, op), rtol=1e-6, atol=1e-6)


def test_idm_method_errors(prior: Prior, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("IDM_CHECKPOINT_DIR", str(tmp_path))
    save_tiny(prior, tmp_path / "idm-cs25", 0.25)
    build = get_method("idm").build
    # 0.8: no idm-cs80 and outside the shipped multi-ratio idm-multi's range
    with pytest.raises(IDMError, match=r"no shipped idm checkpoint for ratio 0\.8; pass --checkpoint or train one with idm finetune "
                                       r"--ratio 0\.8"):
        build(ratio=0.8)
    lazy = build()  # neither checkpoint nor ratio: chosen at the first call from the operator
    far = BlockCS((32, 32), 0.8, block_size=8)
    with pytest.raises(IDMError, match=r"no shipped idm checkpoint for ratio 0\.8"):
        lazy(far.A(images()), far)
    for op in (MRI((32, 32), acceleration=4), ParallelBeamCT((32, 32), views=8)):  # the shipped idm-mri / idm-ct
        with torch.no_grad():
            out = build()(op.A(images(1)), op)
        assert out.shape == (1, 1, 32, 32) and out.is_complex() == (op.kind == "mri")
    with pytest.raises(IDMError, match="trained for ratio 0.25"):
        build(checkpoint=str(tmp_path / "idm-cs25"), ratio=0.1)
    with pytest.raises(IDMError, match="no option"):
        build(ratio=0.25, steps=5)
    with pytest.raises(IDMError, match="passes must be a positive integer"):
        build(ratio=0.25, passes=0)
    with pytest.raises(IDMError, match="dc_iterations must be a positive integer"):
        build(ratio=0.25, dc_iterations=1.5)
    ct = ParallelBeamCT((32, 32), views=8)
    with torch.no_grad():  # more CG steps per data-consistency solve fit the sinogram more closely
        fits = [float((ct.A(build(dc_iterations=k)(ct.A(images(1)), ct)) - ct.A(images(1))).norm()) for k in (2, 30)]
    assert fits[1] < fits[0]
    reconstruct = build(checkpoint=str(tmp_path / "idm-cs25"))
    op = BlockCS((32, 32), 0.1, block_size=8)
    with pytest.raises(IDMError, match="trained for ratio 0.25"):
        reconstruct(op.A(images()), op)
    inpainting = Inpainting((32, 32), ratio=0.25)
    with pytest.raises(IDMError, match="blockcs"):
        reconstruct(inpainting.A(images()), inpainting)
    (tmp_path / "prior").mkdir()
    prior.save(tmp_path / "prior", "# prior")
    with pytest.raises(IDMError, match="not an IDM checkpoint"):
        build(checkpoint=str(tmp_path / "prior"))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_grouped_injector_is_the_documented_map_and_keeps_the_layout(layout) -> None:
    """Injector(group=2) on features (2·B, ch, H, W) (item i·B + b = block i of image b) equals the
    module doc's formula on the regrouped (B, 2·ch, H, W) features, in either memory layout."""
    from idm.network.injector import Injector
    from idm.physics.mri import merge_groups, split_groups
    from idm.network.measurement import MeasurementContext
    from idm.physics import MRI

    g = torch.Generator().manual_seed(0)
    inj = Injector(features=3, scale=1, channels=2, steps=2, group=2).double()
    with torch.no_grad():
        for p in inj.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    op = MRI((8, 8), acceleration=2, center_fraction=0.25, seed=0)
    x = torch.complex(torch.rand(2, 1, 8, 8, generator=g, dtype=torch.float64),
                      torch.rand(2, 1, 8, 8, generator=g, dtype=torch.float64))
    meas = MeasurementContext.build(op, op.A(x), 1, None)
    h = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64).contiguous(memory_format=layout)
    out = inj(h, {"meas": meas, "step": 1})
    assert out.shape == h.shape and out.is_contiguous(memory_format=layout)
    feats = merge_groups(h, 2)  # (B, 2·ch, H, W)
    z = inj.to_image[1](feats)
    m = torch.cat([z, meas.AtA(z), meas.aty.expand(2, -1, -1, -1)], dim=1)
    torch.testing.assert_close(out, split_groups(feats + inj.to_features[1](m), 2))
    torch.testing.assert_close(merge_groups(split_groups(feats, 2), 2), feats)
