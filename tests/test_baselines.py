"""Classic baselines ``pinv`` and ``tv``: registration, shapes, determinism, and TV beating pinv."""

from __future__ import annotations

import pytest
import torch

from idm.baselines.tv import gradient, gradient_adjoint, total_variation, tv_prox
from idm.errors import IDMError
from idm.physics import BlockCS, Denoising, Inpainting, LinearOperator, SuperResolution
from idm.registry import get_method

SIZE = (24, 40)

#: one operator of every kind (small, fast)
FACTORIES = {
    "blockcs": lambda size: BlockCS(size, ratio=0.3, block_size=8, seed=1),
    "inpainting": lambda size: Inpainting(size, ratio=0.5, seed=2),
    "superres": lambda size: SuperResolution(size, factor=2),
    "denoising": lambda size: Denoising(size, noise_sigma=0.1),
}


def psnr(x: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR (dB, peak 1) of ``x`` clipped to [0, 1] against ``reference`` in [0, 1]."""
    mse = (x.clamp(0, 1) - reference).square().mean()
    return float(10 * torch.log10(1 / mse))


@pytest.fixture(scope="module")
def camera() -> torch.Tensor:
    """scikit-image's camera man, 512² → 96×128 by area averaging, ``(1, 1, 96, 128)`` in [0, 1]."""
    data = pytest.importorskip("skimage.data")
    image = torch.from_numpy(data.camera()).double().div(255)[None, None]
    return torch.nn.functional.adaptive_avg_pool2d(image, (96, 128)).float()


@pytest.fixture(scope="module")
def blockcs_camera(camera) -> tuple[BlockCS, torch.Tensor, torch.Tensor]:
    op = BlockCS(tuple(camera.shape[2:]), ratio=0.1, block_size=16, seed=3)  # N = 256: a cheap SVD
    return op, camera, op.measure(camera)


@pytest.mark.parametrize("method", ["pinv", "tv"])
def test_registered(method):
    info = get_method(method)
    assert info.name == method and not info.needs_checkpoint and info.description


@pytest.mark.parametrize("kind", sorted(FACTORIES))
@pytest.mark.parametrize("method", ["pinv", "tv"])
def test_every_operator_kind(kind, method):
    op = FACTORIES[kind](SIZE)
    x = torch.rand(2, 1, *SIZE, generator=torch.Generator().manual_seed(0))
    y = op.measure(x, generator=torch.Generator().manual_seed(1))
    reconstruct = get_method(method).build(iterations=20) if method == "tv" else get_method(method).build()
    estimate = reconstruct(y, op)
    assert estimate.shape == (2, 1, *op.domain_size) and estimate.dtype == y.dtype
    assert torch.isfinite(estimate).all()
    assert torch.equal(reconstruct(y, op), estimate)  # deterministic
    if method == "tv":
        assert estimate.min() >= 0 and estimate.max() <= 1


def test_pinv_is_the_pseudo_inverse():
    op = FACTORIES["superres"](SIZE)
    y = torch.rand(op.measurement_shape(1, 2))
    estimate = get_method("pinv").build()(y, op)
    assert torch.equal(estimate, op.A_dagger(y))
    assert torch.allclose(op.A(estimate), y, atol=1e-6)


def test_tv_beats_pinv_on_a_real_image(blockcs_camera):
    op, image, y = blockcs_camera
    pinv = op.crop(get_method("pinv").build()(y, op))
    tv = op.crop(get_method("tv").build(ratio=0.1)(y, op))  # the CLI passes ratio to every method
    assert psnr(tv, image) > psnr(pinv, image) + 5.0
    assert psnr(tv, image) > 20.0
    # the estimate is consistent with the measurements (small relative residual)
    residual = (op.A(op.pad(tv)) - y).norm() / y.norm()
    assert residual < 0.05


def test_tv_reduces_its_objective(blockcs_camera):
    op, _, y = blockcs_camera
    lam = 2e-3

    def objective(x: torch.Tensor) -> float:
        return float(0.5 * (op.A(x) - y).square().sum() + lam * total_variation(x).sum())

    start = op.A_dagger(y).clamp(0, 1)
    short = get_method("tv").build(lam=lam, iterations=5)(y, op)
    long = get_method("tv").build(lam=lam, iterations=60)(y, op)
    assert objective(long) < objective(short) < objective(start)


def test_tv_batch_is_independent(blockcs_camera):
    op, image, _ = blockcs_camera
    pair = torch.cat([image, image.flip(-1)])
    y = op.measure(pair)
    reconstruct = get_method("tv").build(iterations=15)
    together = reconstruct(y, op)
    alone = torch.cat([reconstruct(y[:1], op), reconstruct(y[1:], op)])
    assert torch.allclose(together, alone, atol=1e-5)


def test_tv_denoises():
    op = Denoising((64, 64), noise_sigma=0.1)
    rows = torch.linspace(0, 1, 64)
    clean = ((rows[:, None] > 0.5).float() * 0.6 + 0.2 * rows[None, :]).expand(1, 1, 64, 64)
    noisy = op.measure(clean, generator=torch.Generator().manual_seed(0))
    estimate = get_method("tv").build()(noisy, op)
    assert psnr(estimate, clean) > psnr(noisy, clean) + 5.0


def test_tv_progress_bar(capsys):
    """progress=True draws one bar named tv over the outer iterations on stderr; it changes nothing
    else, and progress=False (the default) prints nothing."""
    op = FACTORIES["inpainting"](SIZE)
    y = op.measure(torch.rand(1, 1, *SIZE))
    quiet = get_method("tv").build(iterations=3)(y, op)
    assert capsys.readouterr() == ("", "")
    shown = get_method("tv").build(iterations=3, progress=True)(y, op)
    out, err = capsys.readouterr()
    assert out == "" and torch.equal(shown, quiet)
    frames = [frame.strip() for frame in err.split("\r") if frame.strip()]
    assert frames and all(frame.startswith("tv:") for frame in frames), err
    assert all("/3 [" in frame for frame in frames), err  # the bar counts the 3 outer FISTA iterations


# --- the TV pieces ----------------------------------------------------------------------
def test_gradient_adjointness():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 9, generator=generator, dtype=torch.float64)
    p = torch.randn(2, 3, 2, 7, 9, generator=generator, dtype=torch.float64)
    assert torch.allclose((gradient(x) * p).sum(), (x * gradient_adjoint(p)).sum(), rtol=1e-12)


def test_volume_gradient_adjointness_and_tv():
    """The 3D gradient (z = the batch axis, first) has its adjoint, and the volume TV sums its norms."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 7, 9, generator=generator, dtype=torch.float64)
    p = torch.randn(4, 1, 3, 7, 9, generator=generator, dtype=torch.float64)
    assert torch.allclose((gradient(x, volume=True) * p).sum(), (x * gradient_adjoint(p)).sum(), rtol=1e-12)
    g = gradient(x, volume=True)
    assert torch.equal(g[:-1, :, 0], x[1:] - x[:-1]) and not g[-1, :, 0].any()
    assert torch.equal(g[:, :, 1:], gradient(x))
    assert torch.allclose(total_variation(x, volume=True).sum(), g.square().sum(2).sqrt().sum())


def test_volume_tv_reduces_the_3d_objective_and_couples_slices(blockcs_camera):
    """``volume=True``: FISTA on the 3D TV; slices no longer independent, and a z-constant volume
    with noisy measurements comes out closer to constant along z than with slice-wise TV."""
    op, image, _ = blockcs_camera
    stack = image.expand(3, -1, -1, -1).contiguous()
    y = op.measure(stack, generator=torch.Generator().manual_seed(0))
    y = y + 0.02 * torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    lam = 2e-3

    def objective(x: torch.Tensor) -> float:
        return float(0.5 * (op.A(x) - y).square().sum() + lam * total_variation(x, volume=True).sum())

    short = get_method("tv").build(lam=lam, iterations=5, volume=True)(y, op)
    long = get_method("tv").build(lam=lam, iterations=40, volume=True)(y, op)
    assert objective(long) < objective(short) < objective(op.A_dagger(y).clamp(0, 1))
    flat = get_method("tv").build(lam=lam, iterations=40)(y, op)
    assert (long[1:] - long[:-1]).abs().mean() < 0.75 * (flat[1:] - flat[:-1]).abs().mean()
    with pytest.raises(IDMError, match="volume must be true or false"):
        get_method("tv").build(volume="yes")


def test_tv_prox_limits():
    b = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1.4 - 0.2
    dual = torch.zeros(1, 1, 2, 16, 16, dtype=torch.float64)
    x, _ = tv_prox(b, 0.0, dual, iterations=10)
    assert torch.equal(x, b.clamp(0, 1))  # τ = 0: projection onto the box
    x, _ = tv_prox(b, 100.0, dual, iterations=300, box=False)
    assert torch.allclose(x, b.mean().expand_as(b), atol=1e-3)  # huge τ: the constant image


# --- bad input --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method, options, match",
    [
        ("pinv", {"checkpoint": "model.safetensors"}, "checkpoint"),
        ("tv", {"steps": 3}, "steps"),
        ("pinv", {"lam": 0.1}, "lam"),
        ("tv", {"lam": -1.0}, "lam"),
        ("tv", {"lam": float("nan")}, "lam"),
        ("tv", {"iterations": 0}, "iterations"),
        ("tv", {"iterations": 2.5}, "iterations"),
        ("tv", {"lam": "big"}, "lam"),
    ],
)
def test_bad_options(method, options, match):
    with pytest.raises(IDMError, match=match):
        get_method(method).build(**options)


@pytest.mark.parametrize("method", ["pinv", "tv"])
def test_wrong_measurement_shape(method):
    op: LinearOperator = FACTORIES["blockcs"](SIZE)
    reconstruct = get_method(method).build()
    with pytest.raises(IDMError, match="measurements"):
        reconstruct(torch.rand(1, 1, 3, 3), op)


@pytest.mark.parametrize("method", ["pinv", "tv"])
def test_one_reconstructor_serves_many_operators(method):
    reconstruct = get_method(method).build(iterations=5) if method == "tv" else get_method(method).build()
    for kind in ("blockcs", "superres"):
        for size in (SIZE, (16, 16)):
            op = FACTORIES[kind](size)
            y = op.measure(torch.rand(1, 1, *size))
            assert reconstruct(y, op).shape == (1, 1, *op.domain_size)
