"""Classic baselines on the medical operators: ``pinv`` (zero-filled / CG-SENSE / CG), ``fbp``,
``tv`` (complex TV on MRI, box [0, 1] on CT) and ``pnp`` on single- and multi-coil MRI and CT."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from idm.baselines.tv import (
    default_iterations, default_lambda, gradient, gradient_adjoint, start_estimate,
    total_variation, tv_prox, tv_reconstruct,
)
from idm.errors import IDMError
from idm.metrics import psnr
from idm.physics import MRI, BlockCS, Inpainting, ParallelBeamCT
from idm.registry import get_method
from idm.zeroshot.pnp import complex_denoiser

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = (24, 20)


def phantom(batch: int = 2, size: tuple[int, int] = SIZE, complex_: bool = False) -> torch.Tensor:
    """Smooth random images in [0, 1] (complex: that magnitude with a smooth phase)."""
    g = torch.Generator().manual_seed(batch)
    x = F.interpolate(torch.rand(batch, 1, 5, 5, generator=g), size=size, mode="bicubic", align_corners=False)
    x = x.clamp(0, 1)
    if not complex_:
        return x
    phase = F.interpolate(torch.rand(batch, 1, 3, 3, generator=g), size=size, mode="bilinear", align_corners=False)
    return torch.polar(x, 2.0 * phase)


def sensitivities(coils: int = 4, size: tuple[int, int] = SIZE) -> torch.Tensor:
    """Smooth complex maps with Σ_c |S_c|² = 1."""
    g = torch.Generator().manual_seed(7)
    parts = torch.rand(1, 2 * coils, 3, 3, generator=g) + 0.2
    maps = F.interpolate(parts, size=size, mode="bilinear", align_corners=False)[0]
    maps = torch.complex(maps[:coils], maps[coils:] - 0.6)
    return maps / maps.abs().square().sum(0, keepdim=True).sqrt()


OPERATORS = {
    "mri-single": lambda: MRI(SIZE, acceleration=4, seed=0),
    "mri-multi": lambda: MRI(SIZE, acceleration=4, seed=0, sensitivities=sensitivities()),
    "ct": lambda: ParallelBeamCT(SIZE, views=8),
}


def case(kind: str) -> tuple:
    op = OPERATORS[kind]()
    x = phantom(complex_=kind.startswith("mri"))
    return op, x, op.measure(x)


def objective(op, x, y, lam) -> torch.Tensor:
    residual = (op.A(x) - y).abs().square().sum(dim=(1, 2, 3))
    return 0.5 * residual + lam * total_variation(x)


@pytest.mark.parametrize("kind", sorted(OPERATORS))
@pytest.mark.parametrize("method", ["pinv", "tv"])
def test_baselines_on_medical_operators(kind, method):
    op, x, y = case(kind)
    reconstruct = get_method(method).build(iterations=20) if method == "tv" else get_method(method).build()
    estimate = reconstruct(y, op)
    assert estimate.shape == (2, 1, *op.domain_size)
    assert estimate.dtype == (torch.complex64 if kind.startswith("mri") else torch.float32)
    assert torch.isfinite(torch.view_as_real(estimate) if estimate.is_complex() else estimate).all()
    assert torch.equal(reconstruct(y, op), estimate)  # deterministic
    if kind == "ct" and method == "tv":
        assert estimate.min() >= 0 and estimate.max() <= 1


@pytest.mark.parametrize("kind", sorted(OPERATORS))
def test_pinv_is_zero_filled_cg_sense_or_cg(kind):
    op, _, y = case(kind)
    estimate = get_method("pinv").build()(y, op)
    assert torch.equal(estimate, op.A_dagger(y))
    if kind == "mri-single":  # zero-filled inverse FFT, exactly consistent with the data
        assert torch.equal(estimate, op.A_adjoint(y))
        assert torch.allclose(op.A(estimate), y, atol=1e-5)
    if kind == "mri-multi":  # CG-SENSE recovers the image from 4 coils at 4× (noiseless)
        misfit = (op.A(estimate) - y).norm() / y.norm()
        assert misfit < 1e-2


@pytest.mark.parametrize("kind", sorted(OPERATORS))
def test_tv_lowers_its_objective_from_its_start(kind):
    op, _, y = case(kind)
    lam = default_lambda(op, y)
    start = start_estimate(op, y)
    start = start if start.is_complex() else start.clamp(0, 1)
    estimate = tv_reconstruct(op, y, lam, 30)
    assert (objective(op, estimate, y, lam) < objective(op, start, y, lam)).all()


def test_tv_defaults_by_operator_kind():
    mri4, mri8 = MRI((64, 64), acceleration=4), MRI((64, 64), acceleration=8)
    ct = ParallelBeamCT((32, 32), views=8)
    assert default_lambda(mri8) > default_lambda(mri4) > 0
    norm = ct.norm_squared(torch.zeros(1))
    assert norm > 100 and default_lambda(ct) == pytest.approx(2e-4 * norm)
    assert default_iterations(mri4) == default_iterations(ct) == 100
    # ‖A‖² of single-coil MRI is 1 (orthonormal FFT, mask)
    assert mri4.norm_squared(torch.zeros(1, dtype=torch.complex64)) == pytest.approx(1.0, rel=1e-4)


def test_norm_is_kept_on_the_operator_per_dtype():
    op = ParallelBeamCT((16, 16), views=8)  # no closed form: power iteration, kept per dtype
    first = op.norm_squared(torch.zeros(1))
    assert op.norm_squared(torch.zeros(1)) == first > 1.0
    assert op.norm_squared(torch.zeros(1, dtype=torch.float64)) == pytest.approx(first, rel=1e-5)
    assert len(op._norm_squared) == 2


@pytest.mark.parametrize("op", [BlockCS((16, 16), ratio=0.25, block_size=8, seed=1), Inpainting((16, 16), ratio=0.3),
                                MRI((16, 16), acceleration=4)], ids=["blockcs", "inpainting", "mri"])
def test_projection_operators_know_their_norm_and_it_matches_power_iteration(op):
    assert op.norm_squared(torch.zeros(1)) == 1.0 and not op._norm_squared  # no power iteration run
    x = torch.randn(1, 1, *op.domain_size, generator=torch.Generator().manual_seed(0))
    for _ in range(30):
        x = op.AtA(x)
        value = float(x.norm())
        x = x / value
    assert value == pytest.approx(1.0, rel=1e-4)  # the power iteration agrees


def test_complex_tv_is_the_tv_of_the_complex_image():
    x = phantom(complex_=True)
    gx, gy = gradient(x).unbind(2)
    expected = (gx.abs().square() + gy.abs().square()).sqrt().sum(dim=(1, 2, 3))
    assert torch.allclose(total_variation(x), expected)
    # the real TV is unchanged, and the complex one of a real image is the real one
    real = phantom()
    assert torch.allclose(total_variation(real.to(torch.complex64)), total_variation(real))
    # the gradient's adjoint under the complex inner product
    p = torch.randn(2, 1, 2, *SIZE, dtype=torch.complex64)
    lhs = (gradient(x) * p.conj()).sum()
    rhs = (x * gradient_adjoint(p).conj()).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-4, atol=1e-4)


def test_complex_tv_prox_is_rotation_equivariant_and_has_no_box():
    b = phantom(complex_=True)
    dual = torch.zeros(2, 1, 2, *SIZE, dtype=torch.complex64)
    x, _ = tv_prox(b, 0.05, dual, 10, box=False)
    rotated, _ = tv_prox(b * 1j, 0.05, dual, 10, box=False)
    assert torch.allclose(rotated, x * 1j, atol=1e-6)
    assert total_variation(x).sum() < total_variation(b).sum()
    with pytest.raises(IDMError, match="real images only"):
        tv_prox(b, 0.05, dual, 10, box=True)


def test_tv_rejects_complex_data_of_a_real_operator():
    op = ParallelBeamCT(SIZE, views=8)
    y = torch.zeros(op.measurement_shape(1, 1), dtype=torch.complex64)
    with pytest.raises(IDMError):
        get_method("tv").build(iterations=2)(y, op)


# --- fbp --------------------------------------------------------------------------------------------
def test_fbp_is_the_operators_fbp():
    info = get_method("fbp")
    assert info.name == "fbp" and not info.needs_checkpoint and info.description
    op, _, y = case("ct")
    estimate = info.build()(y, op)
    assert estimate.shape == (2, 1, *op.domain_size) and estimate.dtype == torch.float32
    assert torch.equal(estimate, op.fbp(y))
    assert torch.equal(info.build(filter="hann")(y, op), op.fbp(y, filter="hann"))


@pytest.mark.parametrize("make", [lambda: MRI(SIZE, acceleration=4), lambda: BlockCS((16, 16), 0.25, block_size=8),
                                  lambda: Inpainting(SIZE, ratio=0.5)], ids=["mri", "blockcs", "inpainting"])
def test_fbp_needs_an_operator_with_fbp(make):
    op = make()
    y = op.measure(phantom(1, op.image_size, complex_=isinstance(op, MRI)))
    message = f"^method 'fbp' needs an operator with filtered backprojection \\(ct\\), got '{op.kind}'$"
    with pytest.raises(IDMError, match=message):
        get_method("fbp").build()(y, op)


def test_fbp_options():
    with pytest.raises(IDMError, match="unknown filter"):
        get_method("fbp").build(filter="box")
    with pytest.raises(IDMError, match="no option"):
        get_method("fbp").build(lam=1.0)
    get_method("fbp").build(ratio=0.5)  # passed to every method by the CLI, ignored


# --- pnp --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pnp():
    return get_method("pnp").build(iterations=2)


@pytest.mark.parametrize("kind", sorted(OPERATORS))
def test_pnp_on_medical_operators(pnp, kind):
    op, x, y = case(kind)
    estimate = pnp(y, op)
    assert estimate.shape == (2, 1, *op.domain_size)
    assert estimate.dtype == (torch.complex64 if kind.startswith("mri") else torch.float32)
    assert torch.isfinite(torch.view_as_real(estimate) if estimate.is_complex() else estimate).all()
    # the last step is the data step: consistent with the (noiseless) measurements
    misfit = float((op.A(estimate) - y).norm() / y.norm())
    assert misfit < {"mri-single": 1e-6, "mri-multi": 1e-2, "ct": 0.05}[kind]


def test_complex_denoiser_denoises_re_and_im():
    seen = []

    def identity(z, sigma):
        seen.append((z.shape, sigma, float(z.min()), float(z.max())))
        return z

    z = phantom(complex_=True)
    out = complex_denoiser(identity)(z, 0.02)
    assert torch.allclose(out, z, atol=1e-6)
    assert seen == [((4, 1, *SIZE), 0.01, seen[0][2], seen[0][3])] and 0 <= seen[0][2] <= seen[0][3] <= 1


# --- real data (../shared/data) ---------------------------------------------------------------------
def _knee(shared_data) -> torch.Tensor:
    path = shared_data / "mri" / "fastmri_knee_scoremri" / "single-coil" / "001.npy"
    if not path.is_file():
        pytest.skip(f"knee slice not available: {path} is missing")
    x = torch.from_numpy(np.load(path)).to(torch.complex64)[None, None]
    return x / x.abs().max()


def _magnitude_psnr(x: torch.Tensor, truth: torch.Tensor) -> float:
    return float(psnr(x.abs(), truth.abs())[0])


def test_real_knee_tv_beats_zero_filled(shared_data):
    truth = _knee(shared_data)
    op = MRI(truth.shape[2:], acceleration=4, seed=0)
    y = op.A(truth)
    zero_filled = _magnitude_psnr(get_method("pinv").build()(y, op), truth)
    tv = _magnitude_psnr(get_method("tv").build()(y, op), truth)
    assert zero_filled == pytest.approx(28.6, abs=0.3)  # measured 28.64 dB
    assert tv > zero_filled + 3.5  # measured 32.84 dB


def test_real_ct_tv_beats_fbp(shared_data):
    pytest.importorskip("nibabel")
    from idm.io.medical import hu_window, read_volume

    path = shared_data / "ct" / "totalsegmentator" / "example_ct.nii.gz"
    if not path.is_file():
        pytest.skip(f"CT volume not available: {path} is missing")
    volume = hu_window(read_volume(path, modality="CT"))
    image = volume[volume.shape[0] // 2][None, None]
    image = F.interpolate(image, size=(128, 128), mode="bilinear", align_corners=False).clamp(0, 1)
    op = ParallelBeamCT((128, 128), views=23)
    y = op.A(image)
    fbp = float(psnr(get_method("fbp").build()(y, op), image)[0])
    tv = float(psnr(get_method("tv").build()(y, op), image)[0])
    assert tv > fbp + 5.0
