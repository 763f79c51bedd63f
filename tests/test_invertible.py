"""Exactness of the two-level invertible machinery (idm.invertible) against plain autograd."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from idm.invertible import (
    CheckpointedBody,
    Coupling,
    InjectionSite,
    ReversibleSampler,
    ReversibleSequence,
    ReversibleUNet,
    convert_unet,
    inversion_error,
    set_memory_mode,
)
from idm.network import IDMConfig, IDMNet
from idm.physics import Inpainting
from idm.priors.unet import UNet, UNetConfig

from conftest import tiny_unet_config

TINY = tiny_unet_config()
TOL = {torch.float64: 1e-8, torch.float32: 1e-4}
#: float32 only: per-tensor bound for gradients that are sums with cancellation (the scalars v, s, m),
#: whose relative error can exceed the float32 rounding of the whole gradient by ~10x
FLOAT32_PER_TENSOR = 1e-3


pytestmark = pytest.mark.usefixtures("one_thread")


def randomised_unet(config: UNetConfig = TINY, dtype: torch.dtype = torch.float64) -> UNet:
    """A U-Net whose zero-initialised layers (residual outputs, attention projection, output conv)
    are given random weights, so that every block does something."""
    unet = UNet(config)
    with torch.no_grad():
        for param in unet.parameters():
            if not param.any():
                param.normal_(0.0, 0.2)
    return unet.to(dtype)


def relative_errors(got: list[torch.Tensor | None], ref: list[torch.Tensor | None]) -> list[float]:
    errors = []
    for g, r in zip(got, ref, strict=True):
        assert (g is None) == (r is None)
        if r is not None:
            errors.append(float((g - r).abs().max() / r.abs().max().clamp_min(1e-30)))
    return errors


def assert_grads_match(got: list[torch.Tensor | None], ref: list[torch.Tensor | None], dtype: torch.dtype) -> None:
    """float64: every tensor within ``TOL`` (max-abs relative); float32: the whole gradient (all tensors
    concatenated, norm-relative) within ``TOL`` and every tensor within ``FLOAT32_PER_TENSOR``."""
    per_tensor = relative_errors(got, ref)
    if dtype == torch.float64:
        assert max(per_tensor) <= TOL[dtype], max(per_tensor)
        return
    flat_got = torch.cat([g.flatten() for g in got if g is not None])
    flat_ref = torch.cat([r.flatten() for r in ref if r is not None])
    overall = float((flat_got - flat_ref).norm() / flat_ref.norm())
    assert overall <= TOL[dtype], overall
    assert max(per_tensor) <= FLOAT32_PER_TENSOR, max(per_tensor)


def weighted_loss(out: torch.Tensor) -> torch.Tensor:
    weights = torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype).reshape(out.shape)
    return (out * weights).sum() + 0.1 * out.pow(2).sum()


class ConvBody(nn.Module):
    """Shape-preserving body using a context dict: ``tanh(conv(h)) * ctx["scale"] + ctx["shift"]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, h: torch.Tensor, context: dict) -> torch.Tensor:
        return torch.tanh(self.conv(h)) * context["scale"] + context["shift"] + context["n"] * 0.01 * h


def sequence_grads(seq: nn.Module, mode: str, x: torch.Tensor, context: dict) -> list[torch.Tensor | None]:
    set_memory_mode(seq, mode)
    inputs = [x, context["scale"], context["shift"], *seq.parameters()]
    return list(torch.autograd.grad(weighted_loss(seq(x, context)), inputs, allow_unused=True))


def make_context(dtype: torch.dtype) -> dict:
    return {
        "scale": torch.randn(1, 3, 1, 1, dtype=dtype, requires_grad=True),
        "shift": torch.randn(2, 3, 6, 6, dtype=dtype, requires_grad=True),
        "n": 3,  # a non-tensor leaf passes through
    }


# --- coupling and sequence ------------------------------------------------------------------


def test_coupling_inverse_recovers_inputs():
    coupling = Coupling(ConvBody(3)).double()
    context = make_context(torch.float64)
    x1, x2 = torch.randn(2, 2, 3, 6, 6, dtype=torch.float64)
    y1, y2 = coupling(x1, x2, context)
    assert torch.equal(y2, x1)
    r1, r2 = coupling.inverse(y1, y2, context)
    assert torch.allclose(r1, x1, atol=1e-13) and torch.allclose(r2, x2, atol=1e-13)
    assert not torch.allclose(y1, x2)


def test_couplings_pass_memcnns_invertibility_check():
    """memcnn's own test helper (``memcnn.is_invertible_module``) agrees: every coupling IDM builds
    — around a conv body and around DnCNN's middle layers — is invertible (memcnn passes no context,
    so U-Net blocks, which read the time embedding from it, are covered by the tests above)."""
    import memcnn

    from idm.invertible import convert_unet
    from idm.invertible.layout import dncnn_layout
    from idm.priors.dncnn import DnCNN, DnCNNConfig

    couplings = [Coupling(Widening(3)).double()]
    dncnn = convert_unet(dncnn_layout(DnCNN(DnCNNConfig(depth=4, features=8))))
    couplings += [m for m in dncnn.modules() if isinstance(m, Coupling)]
    assert len(couplings) > 2
    for coupling in couplings:
        channels = next(p for p in coupling.parameters() if p.ndim == 4).shape[1]
        coupling = coupling.double()
        assert memcnn.is_invertible_module(coupling, ((2, channels, 6, 6), (2, channels, 6, 6)),
                                           test_input_dtype=torch.float64, atol=1e-10)


class Widening(nn.Module):
    """A 1×1 conv body from 3 to ``out`` channels (shape-preserving for ``out = 3``)."""

    def __init__(self, out: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, out, 1)

    def forward(self, h: torch.Tensor, context=None) -> torch.Tensor:
        return self.conv(h)


def test_coupling_rejects_shape_changing_body():
    coupling = Coupling(Widening())
    with pytest.raises(ValueError, match="changed the shape"):
        coupling(torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4), None)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("depth", [1, 4])
def test_sequence_gradients_match_plain_autograd(dtype, depth):
    seq = ReversibleSequence([ConvBody(3) for _ in range(depth)]).to(dtype)
    with torch.no_grad():
        seq.m.fill_(0.3)  # make the second stream reach the output
    x = torch.randn(2, 3, 6, 6, dtype=dtype, requires_grad=True)
    context = make_context(dtype)
    ref = sequence_grads(seq, "plain", x, context)
    for mode in ("reversible", "checkpoint"):
        assert_grads_match(sequence_grads(seq, mode, x, context), ref, dtype)
    assert all(g is not None for g in ref)


def test_reversible_forward_equals_plain_forward():
    seq = ReversibleSequence([ConvBody(3) for _ in range(3)])
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    context = make_context(torch.float32)
    outs = [set_memory_mode(seq, mode)(x, context) for mode in ("plain", "reversible", "checkpoint")]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_backward_accumulates_into_grad_like_plain():
    seq = ReversibleSequence([ConvBody(3) for _ in range(2)]).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    context = make_context(torch.float64)
    collected = {}
    for mode in ("plain", "reversible"):
        seq.zero_grad(set_to_none=True)
        set_memory_mode(seq, mode)
        for _ in range(2):  # two backward passes accumulate
            weighted_loss(seq(x, context)).backward()
        collected[mode] = [p.grad.clone() for p in seq.parameters()]
    assert max(relative_errors(collected["reversible"], collected["plain"])) <= 1e-8


def test_reversible_mode_refuses_v_zero():
    seq = ReversibleSequence([ConvBody(3)], v_init=0.0)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    with pytest.raises(ValueError, match="v = 0"):
        seq(x, make_context(torch.float32))
    set_memory_mode(seq, "plain")
    seq(x, make_context(torch.float32)).sum().backward()  # plain autograd has no such limit


def test_unknown_memory_mode_is_rejected():
    with pytest.raises(ValueError, match="memory mode"):
        ReversibleSequence([ConvBody(3)], memory_mode="magic")


# --- inversion error ----------------------------------------------------------------------


def test_inversion_error_is_small_for_well_conditioned_couplings():
    seq = ReversibleSequence([ConvBody(3) for _ in range(4)]).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    assert inversion_error(seq, x, make_context(torch.float64)) < 1e-12


def test_inversion_error_grows_as_v_shrinks():
    torch.manual_seed(0)
    bodies = [ConvBody(3) for _ in range(6)]
    x = torch.randn(2, 3, 6, 6)
    context = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in make_context(torch.float32).items()}
    good = inversion_error(ReversibleSequence(bodies, v_init=0.5), x, context)
    bad = inversion_error(ReversibleSequence(bodies, v_init=1e-3), x, context)
    assert bad > 100 * max(good, 1e-7)


class Drifting(nn.Module):
    """A body that is not a function: every call adds one more to its output."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, h: torch.Tensor, context=None) -> torch.Tensor:
        self.calls += 1
        return h + self.calls


def test_inversion_error_detects_non_deterministic_body():
    seq = ReversibleSequence([Drifting(), Drifting()])
    assert inversion_error(seq, torch.zeros(1, 2, 3, 3)) > 0.5


# --- level 2: the reversible U-Net --------------------------------------------------------


def test_converted_unet_with_v_zero_equals_original():
    unet = randomised_unet()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    for t in (0.0, 500.0):
        with torch.no_grad():
            ref = unet(x, t)
            out = convert_unet(unet, t_constant=t, v_init=0.0, memory_mode="plain")(x)
        assert float((out - ref).abs().max()) <= 1e-12 * float(ref.abs().max())
    assert float(ref.abs().max()) > 0


def test_converted_unet_at_idm_initialisation_is_a_different_network():
    """Documented limitation: with v = 0.5 the couplings mix streams, so the output differs."""
    unet = randomised_unet()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        out = convert_unet(unet, v_init=0.5)(x)
        ref = unet(x, 0.0)
    assert not torch.allclose(out, ref, atol=1e-6)


def segment_summary(rev: ReversibleUNet) -> list[tuple[str, tuple[int, ...], int | None, list[str]]]:
    """(segment type, skips consumed, skip produced, [body kind:module type, ...]) per segment."""
    rows = []
    for segment, pops, push in zip(rev.segments, rev.pops, rev.pushes):
        bodies = [segment] if isinstance(segment, CheckpointedBody) else list(segment.bodies)
        rows.append((type(segment).__name__, pops, push, [f"{b.kind}:{type(b.module).__name__}" for b in bodies]))
    return rows


def test_conversion_structure():
    rev = convert_unet(randomised_unet())
    # down1 starts with a channel-changing ResBlock (checkpointed together with the Downsample
    # before it); the coarsest up ResBlock is shape-preserving given its skip and joins the middle
    # run; the finest is not (checkpointed with the Upsample before it and the output head after).
    assert segment_summary(rev) == [
        ("CheckpointedBody", (), None, ["plain:Conv2d"]),
        ("ReversibleSequence", (), 1, ["block:ResBlock"]),
        ("CheckpointedChain", (), None, ["block:Downsample", "block:ResBlock"]),
        ("ReversibleSequence", (), 4, ["block:AttentionBlock"]),
        ("ReversibleSequence", (4,), None, ["block:ResBlock", "block:AttentionBlock", "block:ResBlock",
                                            "skip_block:ResBlock", "block:AttentionBlock"]),
        ("CheckpointedChain", (1,), None, ["block:Upsample", "skip_block:ResBlock", "plain:Sequential"]),
    ]
    assert rev.emb.shape == (1, TINY.emb_dim) and not rev.emb.requires_grad
    assert all(p.dtype == torch.float64 for p in rev.parameters())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_level2_gradients_match_plain_autograd(dtype):
    rev = convert_unet(randomised_unet(dtype=dtype))
    x = torch.randn(2, 1, 8, 8, dtype=dtype, requires_grad=True)

    def grads(mode):
        set_memory_mode(rev, mode)
        return list(torch.autograd.grad(weighted_loss(rev(x)), [x, *rev.parameters()], allow_unused=True))

    ref = grads("plain")
    assert_grads_match(grads("reversible"), ref, dtype)
    assert_grads_match(grads("checkpoint"), ref, dtype)
    assert inversion_error(rev, x) < (1e-12 if dtype == torch.float64 else 1e-4)


def test_resample_output_feeding_a_checkpointed_layer_is_not_kept_for_backward():
    """The Upsample and the channel-changing finest up ResBlock after it form one checkpointed
    segment: the Upsample's full-resolution output is recomputed in backward, not stored."""
    unet = randomised_unet()
    rev = convert_unet(unet)
    outputs: list[weakref.ref] = []
    unet.up[0].resample.register_forward_hook(lambda module, args, out: outputs.append(weakref.ref(out)))
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    for mode in ("reversible", "checkpoint"):  # (run separately, each layer's checkpoint kept it)
        set_memory_mode(rev, mode)
        outputs.clear()
        loss = weighted_loss(rev(x))
        gc.collect()
        assert len(outputs) == 1 and outputs[0]() is None
        (grad,) = torch.autograd.grad(loss, [x])
        assert torch.isfinite(grad).all()


class ScaleInjector(nn.Module):
    """A shape-preserving injector reading ``context["map"]`` (B, 1, H, W) at its level's resolution."""

    def __init__(self, site: InjectionSite) -> None:
        super().__init__()
        self.site = site
        self.conv = nn.Conv2d(site.channels + 1, site.channels, 1)

    def forward(self, h: torch.Tensor, context: dict) -> torch.Tensor:
        guide = nn.functional.avg_pool2d(context["map"], 2**self.site.level) if self.site.level else context["map"]
        return h + self.conv(torch.cat([h, guide.expand(h.shape[0], -1, -1, -1)], dim=1))


def test_injectors_are_inserted_and_get_gradients():
    sites: list[InjectionSite] = []

    def factory(site: InjectionSite) -> nn.Module | None:
        sites.append(site)
        return ScaleInjector(site).double() if site.stage != "up1" else None

    rev = convert_unet(randomised_unet(), injectors=factory)
    assert {s.stage for s in sites} == {"down0", "down1", "middle", "up0", "up1"}
    assert [(s.stage, s.position) for s in sites if s.last] == [("down0", 0), ("down1", 1), ("middle", 2),
                                                                ("up0", 1), ("up1", 0)]
    injectors = [m for m in rev.modules() if isinstance(m, ScaleInjector)]
    assert len(injectors) == len(sites) - sum(s.stage == "up1" for s in sites)
    # every injector sits inside a reversible run
    for seq in rev.sequences():
        assert seq.memory_mode == "reversible"
    assert all(any(m is inj for seq in rev.sequences() for m in seq.modules()) for inj in injectors)

    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    guide = torch.randn(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)

    def grads(mode):
        set_memory_mode(rev, mode)
        out = rev(x, {"map": guide})
        return list(torch.autograd.grad(weighted_loss(out), [guide, *rev.parameters()], allow_unused=True))

    ref = grads("plain")
    got = grads("reversible")
    assert ref[0] is not None and float(ref[0].abs().max()) > 0
    assert max(relative_errors(got, ref)) <= 1e-8


def test_unet_input_is_checked():
    from idm.errors import IDMError

    rev = convert_unet(randomised_unet())
    with pytest.raises(IDMError, match="divisible"):
        rev(torch.randn(1, 1, 7, 8, dtype=torch.float64))
    with pytest.raises(TypeError):
        ReversibleUNet(nn.Conv2d(1, 1, 1))  # type: ignore[arg-type]


# --- level 1 and nesting ------------------------------------------------------------------


class ToyStep(nn.Module):
    """A sampling-step-like body with its own parameters and a shared learnable schedule in context."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x: torch.Tensor, context: dict) -> torch.Tensor:
        a = context["alpha_bar"][self.index]
        return a.sqrt() * torch.tanh(self.conv(x)) + (1 - a) * context["y"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_level1_gradients_match_plain_autograd(dtype):
    sampler = ReversibleSampler([ToyStep(i) for i in range(4)]).to(dtype)
    alpha = torch.full((4,), 0.7, dtype=dtype, requires_grad=True)
    y = torch.randn(2, 1, 8, 8, dtype=dtype, requires_grad=True)
    x = torch.randn(2, 1, 8, 8, dtype=dtype, requires_grad=True)

    def grads(mode):
        sampler.memory_mode = mode
        context = {"alpha_bar": torch.cumprod(alpha, 0), "y": y}
        out = sampler(x, context)
        return list(torch.autograd.grad(weighted_loss(out), [x, y, alpha, *sampler.parameters()]))

    ref = grads("plain")
    assert_grads_match(grads("reversible"), ref, dtype)
    assert len(sampler.steps) == 4


def chain_grads(net: IDMNet, level1: str, level2: str, y, op, x, *, autocast: bool = False, seed: int = 0):
    set_memory_mode(net.unet, level2)
    net.sampler.memory_mode = level1
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = (net(y, op).to(x.dtype) - x).pow(2).mean()
    return list(torch.autograd.grad(loss, list(net.parameters())))


def chain_problem(dtype: torch.dtype, steps: int = 3, config: UNetConfig = TINY):
    """The IDM network (T = ``steps``, injectors, full-resolution U-Net with randomised weights) on
    inpainting of 8×8 images with half the pixels kept."""
    net = IDMNet(None, IDMConfig(unet=config, steps=steps, unshuffle=1))
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.startswith("unet.") and not param.any():
                param.normal_(0.0, 0.2)
    net = net.to(dtype)
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(2, 1, 8, 8, generator=generator, dtype=dtype)
    op = Inpainting((8, 8), ratio=0.5, seed=1)
    return net, op.A(x), op, x


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nested_levels_gradients_match_plain_autograd(dtype):
    net, y, op, x = chain_problem(dtype)
    ref = chain_grads(net, "plain", "plain", y, op, x)
    for level1, level2 in (("reversible", "plain"), ("plain", "reversible"), ("reversible", "reversible")):
        assert_grads_match(chain_grads(net, level1, level2, y, op, x), ref, dtype)
    assert inversion_error(net, y, op) < (1e-11 if dtype == torch.float64 else 1e-4)


def test_nested_levels_replay_dropout():
    config = UNetConfig(**{**TINY.to_dict(), "channel_mults": (1, 2), "dropout": 0.3})
    net, y, op, x = chain_problem(torch.float64, config=config)
    net.train()
    ref = chain_grads(net, "plain", "plain", y, op, x, seed=5)
    got = chain_grads(net, "reversible", "reversible", y, op, x, seed=5)
    other = chain_grads(net, "plain", "plain", y, op, x, seed=6)
    assert max(relative_errors(got, ref)) <= 1e-8
    assert max(relative_errors(other, ref)) > 1e-3  # the dropout masks do matter


def test_nested_levels_under_bf16_autocast():
    net, y, op, x = chain_problem(torch.float32)
    ref = torch.cat([g.flatten() for g in chain_grads(net, "plain", "plain", y, op, x)])
    bf16_plain = torch.cat([g.flatten() for g in chain_grads(net, "plain", "plain", y, op, x, autocast=True)])
    bf16_rev = torch.cat([g.flatten() for g in chain_grads(net, "reversible", "reversible", y, op, x, autocast=True)])
    assert torch.isfinite(bf16_rev).all()
    error_rev = float((bf16_rev - ref).norm() / ref.norm())
    error_plain = float((bf16_plain - ref).norm() / ref.norm())
    assert error_rev < 0.25 and error_rev < 1.5 * error_plain + 0.02
    assert torch.nn.functional.cosine_similarity(bf16_rev, ref, dim=0) > 0.97


class Constant(nn.Module):
    """A body whose output depends on nothing that needs a gradient."""

    def forward(self, h: torch.Tensor, context=None) -> torch.Tensor:
        return torch.ones_like(h)


def test_body_independent_of_its_input():
    seq = ReversibleSequence([Constant(), ConvBody(3)]).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    context = make_context(torch.float64)
    ref = sequence_grads(seq, "plain", x, context)
    assert_grads_match(sequence_grads(seq, "reversible", x, context), ref, torch.float64)


def test_tensor_needing_grad_hidden_in_an_opaque_context_object_is_refused():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Holder:
        shift: torch.Tensor

    class UsesHolder(nn.Module):
        def forward(self, h: torch.Tensor, context: Holder) -> torch.Tensor:
            return h * 0.5 + context.shift

    seq = ReversibleSequence([UsesHolder()])
    x = torch.randn(1, 2, 3, 3, requires_grad=True)
    seq(x, Holder(torch.zeros(1, 2, 3, 3))).sum().backward()  # no grad needed: fine
    with pytest.raises(ValueError, match="requires grad"):
        seq(x, Holder(torch.zeros(1, 2, 3, 3, requires_grad=True)))


def test_inference_coupling_reuses_fresh_buffers_but_never_its_inputs() -> None:
    """Without grad the coupling blends into the body's output in place; a body that returns its input
    (or a view of it) must not have that input overwritten."""
    from idm.invertible.coupling import Coupling

    class Returns(torch.nn.Module):
        def __init__(self, fn) -> None:
            super().__init__()
            self.fn = fn

        def forward(self, x, context=None):
            return self.fn(x)

    x1, x2 = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    for fn in (lambda x: x, lambda x: x[:], lambda x: 2 * x):
        coupling = Coupling(Returns(fn), v_init=0.3)
        keep1, keep2 = x1.clone(), x2.clone()
        with torch.no_grad():
            y1, y2 = coupling(x1, x2)
        torch.testing.assert_close(y1, 0.7 * fn(keep1) + 0.3 * keep2)
        assert torch.equal(x1, keep1) and torch.equal(x2, keep2) and torch.equal(y2, keep1)
