"""Diffusion prior: schedules, U-Net structure, samplers, checkpoints, denoising evaluation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from idm.errors import IDMError
from idm.priors import (
    AttentionBlock,
    NoiseSchedule,
    Prior,
    ResBlock,
    UNet,
    UNetConfig,
    from_model_range,
    load_prior,
    sample_ddim,
    sample_ddpm,
    split_runs,
    to_model_range,
)
from idm.priors.evaluate import evaluate_denoising

TINY = UNetConfig(base_channels=8, channel_mults=(1, 2, 2), num_res_blocks=2, attention_levels=(1,), groups=4, num_heads=2)


def randomized(unet: UNet, scale: float = 0.05) -> UNet:
    """Replace the zero-initialised layers by small random weights so every block contributes."""
    with torch.no_grad():
        for p in unet.parameters():
            if not p.abs().any():
                p.normal_(0, scale)
    return unet


# --- schedules --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_alphas_cumprod_decrease_inside_unit_interval(kind: str) -> None:
    s = NoiseSchedule(kind)
    a = s.alphas_cumprod
    assert a.dtype == torch.float64 and a.numel() == 1000
    assert bool((a > 0).all()) and bool((a < 1).all())
    assert bool((a[1:] < a[:-1]).all())
    assert a[0] > 0.999 and a[-1] < 1e-3


def test_q_sample_has_the_forward_process_mean_and_variance() -> None:
    s = NoiseSchedule()
    t = 400
    x0 = torch.full((20000, 1, 2, 2), 0.6)
    x_t = s.q_sample(x0, torch.full((20000,), t), torch.randn(x0.shape))
    a = float(s.alphas_cumprod[t])
    assert float(x_t.mean()) == pytest.approx(math.sqrt(a) * 0.6, abs=0.01)
    assert float(x_t.var()) == pytest.approx(1 - a, rel=0.03)


def test_predict_x0_and_eps_invert_q_sample() -> None:
    s = NoiseSchedule("cosine")
    x0, noise = torch.rand(3, 1, 4, 4) * 2 - 1, torch.randn(3, 1, 4, 4)
    t = torch.tensor([0, 500, 990])
    x_t = s.q_sample(x0, t, noise)
    torch.testing.assert_close(s.predict_x0(x_t, t, noise), x0, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(s.predict_eps(x_t, t, x0), noise, atol=1e-4, rtol=1e-4)


def test_respaced_timesteps() -> None:
    s = NoiseSchedule()
    ts = s.respaced(50)
    assert len(ts) == 50 and ts[0] == 0 and ts[-1] == 999 and ts == sorted(set(ts))
    assert s.respaced(1) == [999]
    assert s.respaced(4, t_max=30) == [0, 10, 20, 30]
    with pytest.raises(IDMError):
        s.respaced(0)
    with pytest.raises(IDMError):
        s.respaced(5, t_max=1000)
    with pytest.raises(IDMError):
        NoiseSchedule("quadratic")


def test_timestep_for_noise_matches_noise_to_signal_ratio() -> None:
    s = NoiseSchedule()
    for t in (10, 200, 700):
        assert s.timestep_for_noise(s.noise_to_signal(t)) == t


def test_value_range_helpers_are_inverse() -> None:
    x = torch.rand(2, 1, 3, 3)
    torch.testing.assert_close(from_model_range(to_model_range(x)), x)
    assert float(to_model_range(torch.zeros(1))) == -1 and float(to_model_range(torch.ones(1))) == 1


# --- U-Net ------------------------------------------------------------------------------------
def test_unet_shapes_zero_init_and_time_dependence() -> None:
    unet = UNet(TINY)
    x = torch.randn(2, 1, 16, 24)
    out = unet(x, torch.tensor([3, 700]))
    assert out.shape == x.shape
    assert not out.abs().any(), "the output conv is zero-initialised"
    randomized(unet)
    a = unet(x, torch.tensor([3, 3]))
    b = unet(x, torch.tensor([700, 700]))
    assert not torch.allclose(a, b)
    torch.testing.assert_close(unet(x, emb=unet.embed_time(torch.tensor([3, 3]))), a)
    torch.testing.assert_close(unet(x, 3), a)  # scalar timestep broadcast over the batch


def test_unet_rejects_bad_inputs() -> None:
    unet = UNet(TINY)  # size multiple 4
    with pytest.raises(IDMError, match="divisible by 4"):
        unet(torch.randn(1, 1, 18, 16), torch.zeros(1))
    with pytest.raises(IDMError):
        unet(torch.randn(1, 2, 16, 16), torch.zeros(1))
    with pytest.raises(IDMError):
        unet(torch.randn(1, 1, 16, 16))
    with pytest.raises(IDMError):
        UNetConfig(attention_levels=(7,))


def test_unet_in_three_dimensions() -> None:
    """``dims = 3``: the same structure from 3-D layers on (B, C, D, H, W); a 2-D config still loads without
    the key; attention runs over all D·H·W positions; gradients reach every parameter; clear errors."""
    cfg = UNetConfig(**{**TINY.to_dict(), "dims": 3, "attention_levels": (1,)})
    unet = randomized(UNet(cfg))
    x = torch.randn(2, 1, 8, 12, 4)
    out = unet(x, torch.tensor([3, 700]))
    assert out.shape == x.shape and not torch.allclose(out[0], unet(x, torch.tensor([700, 700]))[0])
    out.square().sum().backward()
    assert all(p.grad is not None for p in unet.parameters())
    assert isinstance(unet.input_conv, torch.nn.Conv3d) and UNetConfig.from_dict(cfg.to_dict()) == cfg
    legacy = {k: v for k, v in TINY.to_dict().items() if k != "dims"}
    assert UNetConfig.from_dict(legacy).dims == 2
    with pytest.raises(IDMError, match="D, H, W"):
        unet(torch.randn(1, 1, 8, 8), torch.zeros(1))
    with pytest.raises(IDMError, match="divisible"):
        unet(torch.randn(1, 1, 8, 8, 6), torch.zeros(1))
    with pytest.raises(IDMError, match="dims"):
        UNetConfig(dims=4)


def test_config_round_trip() -> None:
    cfg = UNetConfig(base_channels=16, channel_mults=(1, 2), attention_levels=(), dropout=0.1)
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(IDMError):
        UNetConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_preserves_shape_flags_match_actual_shapes_and_runs() -> None:
    unet = UNet(TINY)
    seen: list[tuple[torch.nn.Module, bool]] = []

    def hook(module, inputs, output):
        seen.append((module, tuple(inputs[0].shape) == tuple(output.shape)))

    blocks = [b for stage in unet.stages() for b in stage.blocks]
    blocks += [stage.resample for stage in unet.stages() if stage.resample is not None]
    handles = [b.register_forward_hook(hook) for b in blocks]
    unet(torch.randn(1, 1, 16, 16), torch.zeros(1))
    for h in handles:
        h.remove()
    assert len(seen) == len(blocks)
    for module, same in seen:
        assert module.preserves_shape == same, type(module).__name__
    for stage in unet.stages():
        runs = split_runs(stage.blocks)
        assert [b for run in runs for b in run] == list(stage.blocks)
        for run in runs:
            assert all(b.preserves_shape for b in run) or (len(run) == 1 and not run[0].preserves_shape)
    for stage in unet.up:  # the first block consumes the skip: channel-changing; all later ones preserve
        assert not stage.blocks[0].preserves_shape and all(b.preserves_shape for b in stage.blocks[1:])
    assert all(isinstance(b, (ResBlock, AttentionBlock)) for b in blocks if b.preserves_shape)


def test_tiny_unet_overfits_one_batch() -> None:
    torch.manual_seed(0)
    unet, s = UNet(TINY), NoiseSchedule()
    x0 = to_model_range(torch.rand(4, 1, 8, 8).round())
    t, noise = torch.randint(0, 1000, (4,)), torch.randn(4, 1, 8, 8)
    x_t = s.q_sample(x0, t, noise)
    opt = torch.optim.Adam(unet.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = F.mse_loss(unet(x_t, t), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.3 * losses[0]


# --- samplers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", [sample_ddim, sample_ddpm])
def test_one_step_from_t_returns_x0_estimate(sampler) -> None:
    s, t = NoiseSchedule(), 300
    x_t = torch.randn(2, 1, 4, 4)
    eps = torch.randn(2, 1, 4, 4)
    calls = []

    def model(x, tt):
        calls.append(tt)
        return eps

    out = sampler(model, x_t, s, 1, t_start=t, clip=False)
    assert len(calls) == 1 and calls[0].tolist() == [t, t]
    torch.testing.assert_close(out, s.predict_x0(x_t, t, eps))


def gaussian_eps_model(schedule: NoiseSchedule, std: float):
    """Exact ε for data x0 ~ N(0, std²): E[eps | x_t] = sqrt(1 - a) x_t / (a std² + 1 - a)."""

    def model(x, t):
        a = schedule.abar(t, x)
        return (1 - a).sqrt() * x / (a * std**2 + 1 - a)

    return model


@pytest.mark.parametrize("sampler,kw", [(sample_ddim, {}), (sample_ddim, {"eta": 1.0}), (sample_ddpm, {})])
def test_samplers_reproduce_gaussian_data_distribution(sampler, kw) -> None:
    s, std = NoiseSchedule(), 0.4
    x_T = torch.randn(4000, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    # with few steps the exact-ε DDIM/DDPM updates shrink the variance (Cauchy-Schwarz); 1000 steps ~ exact
    out = sampler(gaussian_eps_model(s, std), x_T, s, 1000, clip=False, generator=gen, **kw)
    assert float(out.std()) == pytest.approx(std, rel=0.02)
    assert abs(float(out.mean())) < 0.02


def test_ddim_eta0_is_deterministic_and_callback_sees_every_step() -> None:
    s = NoiseSchedule()
    model = gaussian_eps_model(s, 0.5)
    x_T = torch.randn(2, 1, 4, 4)
    seen = []
    a = sample_ddim(model, x_T, s, 5, callback=lambda d: seen.append(d["t"]))
    b = sample_ddim(model, x_T, s, 5, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(a, b)
    assert seen == s.respaced(5)[::-1]


# --- Prior: sampling, checkpoints, evaluation -------------------------------------------------
def test_prior_sample_range_and_seed() -> None:
    prior = Prior(randomized(UNet(TINY)))
    a = prior.sample(2, 8, steps=3, seed=5)
    assert a.shape == (2, 1, 8, 8) and float(a.min()) >= 0 and float(a.max()) <= 1
    torch.testing.assert_close(prior.sample(2, 8, steps=3, seed=5), a)
    with pytest.raises(IDMError):
        prior.sample(1, 10, steps=2)
    with pytest.raises(IDMError):
        prior.sample(1, 8, steps=2, sampler="euler")


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2), (None, 1e-6)])
def test_prior_checkpoint_round_trip(tmp_path, dtype, tol) -> None:
    prior = Prior(randomized(UNet(TINY), 0.2), NoiseSchedule("cosine"), {"note": "x"})
    prior.save(tmp_path / "ck", "# card", dtype=dtype)
    loaded = load_prior(tmp_path / "ck")
    assert loaded.unet.config == TINY and loaded.schedule.kind == "cosine" and loaded.extra == {"note": "x"}
    assert (tmp_path / "ck" / "README.md").read_text().startswith("# card")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 600])
    with torch.no_grad():
        ref, out = prior(x, t), loaded(x, t)
    assert float((out - ref).abs().max()) <= tol * max(1.0, float(ref.abs().max()))


def test_load_prior_rejects_wrong_checkpoints(tmp_path) -> None:
    from idm.io.checkpoint import save_checkpoint

    prior = Prior(UNet(TINY))
    tensors = prior.unet.state_dict()
    save_checkpoint(tmp_path / "other", tensors, {"architecture": "idm"}, "card")
    with pytest.raises(IDMError, match="architecture"):
        load_prior(tmp_path / "other")
    bigger = {**prior.config(), "unet": {**TINY.to_dict(), "base_channels": 16}}
    save_checkpoint(tmp_path / "mismatch", tensors, bigger, "card")
    with pytest.raises(IDMError, match="does not match"):
        load_prior(tmp_path / "mismatch")
    with pytest.raises(IDMError):
        load_prior(tmp_path / "missing")


def test_evaluate_denoising_noise_level_mapping() -> None:
    prior = Prior(UNet(TINY))  # zero output conv: eps = 0, so x̂₀ is the (rescaled) noisy input itself
    images = [torch.full((1, 20, 30), 0.5), torch.full((1, 16, 16), 0.4)]
    res = evaluate_denoising(prior, images, sigmas=(15, 25))
    for sigma in (15, 25):
        r = res[f"sigma{sigma}"]
        assert r["input_psnr"] == pytest.approx(20 * math.log10(255 / sigma), abs=0.3)
        assert r["psnr"] == pytest.approx(r["input_psnr"], abs=0.3)
        assert prior.schedule.noise_to_signal(r["t"]) == pytest.approx(2 * sigma / 255, rel=0.05)
    with pytest.raises(IDMError):
        evaluate_denoising(prior, [])


# --- the lean GroupNorm-SiLU-conv of ResBlock ------------------------------------------


def _saved_bytes(fn) -> int:
    """Bytes of tensors autograd saves for backward while ``fn()`` runs (each storage counted once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_norm_silu_conv_gradients_equal_plain_autograd(channels_last: bool, bias: bool) -> None:
    from idm.priors.lean import norm_silu_conv

    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(3, 12, eps=1e-6).double()
    conv = torch.nn.Conv2d(12, 8, 3, padding=1, bias=bias).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 12, 10, 14, dtype=torch.float64)
    if channels_last:
        x, conv = x.to(memory_format=torch.channels_last), conv.to(memory_format=torch.channels_last)
    weight = torch.randn(2, 8, 10, 14, dtype=torch.float64)
    params = [x.requires_grad_(), *norm.parameters(), *conv.parameters()]
    plain = torch.autograd.grad((conv(F.silu(norm(x))) * weight).sum(), params)
    lean_out = norm_silu_conv(x, norm, conv)
    assert lean_out.grad_fn is not None and "NormSiLUConv" in type(lean_out.grad_fn).__name__
    lean = torch.autograd.grad((lean_out * weight).sum(), params)
    for a, b in zip(plain, lean):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_lean_resblock_saves_only_its_input_for_the_first_conv_and_equals_plain() -> None:
    from idm.invertible import set_memory_mode
    from idm.priors.unet import ResBlock

    torch.manual_seed(0)
    block = ResBlock(16, 8, 32, groups=4).double()
    torch.nn.init.normal_(block.conv2.weight, std=0.1)
    h = torch.randn(1, 16, 32, 32, dtype=torch.float64, requires_grad=True)
    emb = torch.randn(1, 32, dtype=torch.float64)
    grads, saved = {}, {}
    for mode in ("plain", "reversible"):
        set_memory_mode(block, mode)
        assert block.memory_mode == mode
        out = {}
        saved[mode] = _saved_bytes(lambda: out.setdefault("y", block(h, emb)))
        grads[mode] = torch.autograd.grad(out["y"].square().sum(), [h, *block.parameters()])
    for a, b in zip(grads["plain"], grads["reversible"]):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    input_map = h.numel() * 8
    # plain keeps the GroupNorm and SiLU outputs of the 16-channel input as well: two input-sized maps more
    assert saved["plain"] - saved["reversible"] >= 2 * input_map - 1024


# --- the shared sampling maths (one home: idm.priors.schedule) ----------------------------------
from idm.priors.schedule import ddim_sigma, ddim_step, ddpm_posterior, eps_from_x0, x0_from_eps  # noqa: E402


@pytest.mark.parametrize("as_tensor", [False, True])
def test_x0_and_eps_invert_the_forward_process(as_tensor: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 1, 4, 4, generator=gen, dtype=torch.float64), torch.randn(2, 1, 4, 4, generator=gen, dtype=torch.float64)
    abar = torch.tensor(0.3, dtype=torch.float64) if as_tensor else 0.3
    x_t = math.sqrt(0.3) * x0 + math.sqrt(0.7) * eps
    torch.testing.assert_close(x0_from_eps(x_t, eps, abar), x0)
    torch.testing.assert_close(eps_from_x0(x_t, x0, abar), eps)
    schedule = NoiseSchedule()
    t = 500
    a = float(schedule.alphas_cumprod[t])
    torch.testing.assert_close(schedule.predict_x0(x_t, t, eps), x0_from_eps(x_t, eps, a))


def test_ddim_step_is_deterministic_and_ends_at_x0() -> None:
    x0, eps = torch.randn(1, 1, 3, 3), torch.randn(1, 1, 3, 3)
    torch.testing.assert_close(ddim_step(x0, eps, 0.5), math.sqrt(0.5) * x0 + math.sqrt(0.5) * eps)
    torch.testing.assert_close(ddim_step(x0, eps, 1.0), x0)
    with pytest.raises(IDMError, match="needs noise"):
        ddim_step(x0, eps, 0.5, sigma=0.1)


def test_ddim_with_eta_one_has_the_ddpm_posterior_variance() -> None:
    abar, abar_next = 0.2, 0.6
    _, variance = ddpm_posterior(torch.zeros(1), torch.zeros(1), abar, abar_next)
    assert math.isclose(ddim_sigma(abar, abar_next, 1.0) ** 2, variance, rel_tol=1e-12)
    assert ddim_sigma(abar, abar_next, 0.0) == 0.0
    # with the true x0 and noise, the DDPM posterior mean is the eta = 1 DDIM step without its fresh noise
    x0, eps = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    x_t = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps
    mean, _ = ddpm_posterior(x_t, x0, abar, abar_next)
    s = ddim_sigma(abar, abar_next, 1.0)
    torch.testing.assert_close(mean, ddim_step(x0, eps, abar_next, sigma=s, noise=torch.zeros(5, dtype=torch.float64)))
