"""MRI operators (``idm.physics.mri``): FFT, masks, adjointness, A†/CG-SENSE, configs, ESPIRiT, errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from idm.errors import IDMError
from idm.physics import OPERATORS, conjugate_gradient, make_operator
from idm.physics.mri import (
    MRI,
    channels_to_complex,
    complex_to_channels,
    equispaced_mask,
    estimate_sensitivities,
    fft2c,
    ifft2c,
    load_mask,
    poisson_mask,
    random_mask,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = (24, 32)
COILS = 4


def smooth_sensitivities(coils: int, size: tuple[int, int], dtype=torch.complex64) -> torch.Tensor:
    """``(coils, H, W)`` smooth synthetic coil maps: Gaussians centred around the image with linear phases."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size[0]), torch.linspace(-1, 1, size[1]), indexing="ij")
    maps = []
    for c in range(coils):
        angle = 2 * math.pi * c / coils
        magnitude = torch.exp(-((yy - 1.2 * math.sin(angle)) ** 2 + (xx - 1.2 * math.cos(angle)) ** 2) / 2.0)
        maps.append(magnitude * torch.exp(1j * (0.5 * c + 0.8 * (yy * math.cos(angle) - xx * math.sin(angle)))))
    return torch.stack(maps).to(dtype)


def phantom(size: tuple[int, int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A complex ``(H, W)`` textured ellipse with a smooth phase, and its bool support."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size[0]), torch.linspace(-1, 1, size[1]), indexing="ij")
    support = (yy / 0.8) ** 2 + (xx / 0.7) ** 2 < 1
    noise = torch.rand(1, 1, *size, generator=torch.Generator().manual_seed(seed))
    texture = torch.nn.functional.avg_pool2d(noise, 5, 1, 2)[0, 0]
    return (support * (0.5 + texture)) * torch.exp(1j * 0.3 * xx), support


def every_other_column(size: tuple[int, int]) -> torch.Tensor:
    """Classic SENSE R = 2 sampling: columns 0, 2, 4, … (well posed with the maps above)."""
    mask = torch.zeros(size, dtype=torch.bool)
    mask[:, ::2] = True
    return mask


#: name → factory(image_size, noise_sigma)
FACTORIES = {
    "single-random": lambda size, sigma=0.0: MRI(size, acceleration=4, seed=1, noise_sigma=sigma),
    "single-equispaced": lambda size, sigma=0.0: MRI(
        size, acceleration=4, mask_type="equispaced", seed=2, noise_sigma=sigma
    ),
    "single-poisson": lambda size, sigma=0.0: MRI(size, acceleration=3, mask_type="poisson", seed=3, noise_sigma=sigma),
    "single-explicit": lambda size, sigma=0.0: MRI(size, mask=random_mask(size, 2, seed=4), noise_sigma=sigma),
    "multi-random": lambda size, sigma=0.0: MRI(
        size, acceleration=2, seed=1, sensitivities=smooth_sensitivities(COILS, size), noise_sigma=sigma
    ),
    "multi-equispaced": lambda size, sigma=0.0: MRI(
        size, acceleration=4, mask_type="equispaced", sensitivities=smooth_sensitivities(COILS, size), noise_sigma=sigma
    ),
    "multi-poisson": lambda size, sigma=0.0: MRI(
        size, acceleration=4, mask_type="poisson", sensitivities=smooth_sensitivities(COILS, size), noise_sigma=sigma
    ),
    "multi-explicit": lambda size, sigma=0.0: MRI(
        size, mask=every_other_column(size), sensitivities=smooth_sensitivities(COILS, size), noise_sigma=sigma
    ),
}


@pytest.fixture(params=sorted(FACTORIES))
def named_op(request) -> tuple[str, MRI]:
    return request.param, FACTORIES[request.param](SIZE)


@pytest.fixture
def op(named_op) -> MRI:
    return named_op[1]


def crandn(*shape, dtype=torch.complex64, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def images(op: MRI, batch: int = 2, dtype=torch.complex64, seed: int = 0) -> torch.Tensor:
    channels = 1 if op.sensitivities is not None else 3
    return crandn(batch, channels, *SIZE, dtype=dtype, seed=seed)


def measurements(op: MRI, batch: int = 2, dtype=torch.complex64, seed: int = 1) -> torch.Tensor:
    channels = 1 if op.sensitivities is not None else 3
    return crandn(*op.measurement_shape(batch, channels), dtype=dtype, seed=seed)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --- Fourier transform -----------------------------------------------------------------
@pytest.mark.parametrize("size", [(8, 8), (7, 10)])
def test_fft2c_is_centred_orthonormal_and_inverted(size):
    x = crandn(2, 1, *size, dtype=torch.complex128)
    k = fft2c(x)
    expected = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x.numpy(), axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    assert np.allclose(k.numpy(), expected, atol=1e-12)
    assert torch.allclose(k.norm(), x.norm()) and torch.allclose(ifft2c(k), x, atol=1e-12)
    dc = fft2c(torch.ones(*size, dtype=torch.complex128))
    assert abs(dc[size[0] // 2, size[1] // 2] - math.sqrt(size[0] * size[1])) < 1e-9
    assert dc.abs().sum() - dc.abs().max() < 1e-9  # DC only, at (H//2, W//2)


# --- linear algebra --------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_adjointness(op, dtype):
    x, y = images(op, dtype=dtype), measurements(op, dtype=dtype)
    ax, aty = op.A(x), op.A_adjoint(y)
    assert ax.dtype == dtype and aty.dtype == dtype
    assert ax.shape == y.shape and aty.shape == x.shape
    lhs, rhs = torch.vdot(ax.flatten(), y.flatten()), torch.vdot(x.flatten(), aty.flatten())
    assert float((lhs - rhs).abs() / (ax.norm() * y.norm())) <= 1e-5


def test_measurements_are_zero_off_the_mask(op):
    y = op.A(images(op))
    assert float(y[..., ~op.mask].abs().max()) == 0.0
    assert float(y[..., op.mask].abs().min()) > 0.0


def test_real_images_are_read_as_complex(op):
    x = images(op).real
    assert torch.equal(op.A(x), op.A(x.to(torch.complex64)))
    assert op.A(x.double()).dtype == torch.complex128
    assert op.measure(x).dtype == torch.complex64 and op.A_dagger(op.A(x)).is_complex()


def test_single_coil_pseudo_inverse_is_exact():
    op = FACTORIES["single-random"](SIZE)
    y = measurements(op, dtype=torch.complex128) * op.mask  # any y zero outside the mask is in the range
    x = op.A_dagger(y)
    assert torch.allclose(op.A(x), y, atol=1e-12)
    assert torch.equal(x, ifft2c(y)) and torch.equal(x, op.A_adjoint(y))  # zero-filled inverse FFT
    assert torch.allclose(op.A_dagger(op.A(x)), x, atol=1e-12)  # A†A is a projection


def test_cg_sense_converges_and_fits_noise_free_data():
    """CG on AᴴA x = Aᴴy minimises ‖Ax − y‖ over growing Krylov spaces: that residual never rises
    (the normal-equation residual ‖AᴴAx − Aᴴy‖ need not fall at every step, only overall)."""
    size = (32, 32)
    truth, _ = phantom(size)
    maps = smooth_sensitivities(COILS, size)
    op = MRI(size, mask=every_other_column(size), sensitivities=maps, cg_iterations=60, cg_tol=1e-10)
    x_true = truth.to(torch.complex128)[None, None]
    y = op.A(x_true)
    b = op.A_adjoint(y)
    data, normal = [], []
    for iterations in range(1, 26):
        x = conjugate_gradient(op.AtA, b, iterations=iterations, tol=0.0)
        data.append(relative(op.A(x), y))
        normal.append(float((op.AtA(x) - b).norm() / b.norm()))
    assert all(later <= earlier * (1 + 1e-9) for earlier, later in zip(data, data[1:]))
    assert normal[-1] < 1e-6 * normal[0] and data[-1] < 1e-6
    x = op.A_dagger(y)
    assert relative(op.A(x), y) < 1e-8 and relative(x, x_true) < 1e-8  # 4 coils at R = 2: well posed
    y32 = op.A(x_true.to(torch.complex64))
    assert relative(op.A(op.A_dagger(y32)), y32) < 1e-4  # complex64 too


def test_project_makes_multicoil_data_consistent():
    op = FACTORIES["multi-explicit"](SIZE)
    y = op.A(images(op, batch=1, dtype=torch.complex128, seed=3))
    x = op.project(images(op, batch=1, dtype=torch.complex128, seed=4), y)
    assert relative(op.A(x), y) < 1e-5  # CG stops at ‖r‖ ≤ cg_tol·‖Aᴴy‖ = 10⁻⁶·‖Aᴴy‖
    assert torch.equal(op.project(x, y, weight=0.0), x)


def test_batch_and_channel_independence():
    op = FACTORIES["single-equispaced"](SIZE)
    x = images(op, batch=2)
    each = torch.cat([torch.cat([op.A(x[b : b + 1, c : c + 1]) for c in range(3)], 1) for b in range(2)])
    assert torch.allclose(op.A(x), each, atol=1e-6)
    multi = FACTORIES["multi-random"](SIZE)
    x = images(multi, batch=3)
    assert torch.allclose(multi.A(x), torch.cat([multi.A(x[b : b + 1]) for b in range(3)]), atol=1e-6)


def test_gradients_flow(op):
    x = images(op).requires_grad_()
    op.A(x).abs().square().sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_noise_is_complex_gaussian():
    op = MRI((64, 64), acceleration=1, noise_sigma=0.1)  # all of k-space
    x = torch.rand(4, 1, 64, 64, dtype=torch.float64)
    y1 = op.measure(x, generator=torch.Generator().manual_seed(3))
    y2 = op.measure(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(y1, y2) and not torch.equal(y1, op.measure(x, generator=torch.Generator().manual_seed(4)))
    noise = y1 - op.A(x)
    assert abs(float(noise.abs().square().mean()) - 0.01) < 0.001  # E|n|² = σ²
    for part in (noise.real, noise.imag):
        assert abs(float(part.std()) - 0.1 / math.sqrt(2)) < 0.005


# --- masks -----------------------------------------------------------------------------
@pytest.mark.parametrize("function", [random_mask, equispaced_mask])
@pytest.mark.parametrize("acceleration, fraction, centre", [(4, 0.08, 26), (8, 0.04, 13)])
def test_1d_masks_acceleration_and_centre(function, acceleration, fraction, centre):
    width = 320
    masks = [function((16, width), acceleration, seed=seed) for seed in range(20)]
    fractions = [float(m[0].float().mean()) for m in masks]
    assert abs(np.mean(fractions) - 1 / acceleration) <= 0.02
    assert all(abs(f - 1 / acceleration) <= 0.06 for f in fractions)  # a single random mask: ±3 std
    if function is equispaced_mask:
        assert all(abs(f - 1 / acceleration) <= 0.02 for f in fractions)
    start = (width - centre + 1) // 2
    assert start <= width // 2 < start + centre  # centred on DC
    for mask in masks:
        assert bool((mask == mask[0]).all())  # the same columns in every row
        assert bool(mask[0, start : start + centre].all())  # round(W·cf) fully sampled centre lines
    assert torch.equal(masks[0], function((16, width), acceleration, center_fraction=fraction, seed=0))  # the default


def test_equispaced_lines_are_evenly_spaced():
    mask = equispaced_mask((1, 320), 4, seed=0)[0]
    centre = set(range((320 - 26 + 1) // 2, (320 - 26 + 1) // 2 + 26))
    outer = [i for i in torch.nonzero(mask).flatten().tolist() if i not in centre]
    gaps = np.diff(outer)
    assert set(gaps[gaps < 20].tolist()) <= {5, 6}  # spacing a' = 4·294/(320 − 104) ≈ 5.4, rounded


@pytest.mark.parametrize("acceleration", [4, 8])
def test_poisson_mask_count_centre_and_density(acceleration):
    mask = poisson_mask((64, 80), acceleration, seed=1)
    assert int(mask.sum()) == round(64 * 80 / acceleration)
    rows, cols = round(64 * 0.32 / acceleration), round(80 * 0.32 / acceleration)
    r0, c0 = (64 - rows + 1) // 2, (80 - cols + 1) // 2
    assert bool(mask[r0 : r0 + rows, c0 : c0 + cols].all())
    inner = mask[16:48, 20:60].float().mean()
    outer = torch.cat([mask[:8].flatten(), mask[-8:].flatten()]).float().mean()
    assert inner > 2 * outer  # variable density: denser near the centre


@pytest.mark.parametrize("function", [random_mask, equispaced_mask, poisson_mask])
def test_masks_are_deterministic_by_seed(function):
    assert torch.equal(function((32, 64), 4, seed=7), function((32, 64), 4, seed=7))
    assert any(not torch.equal(function((32, 64), 4, seed=7), function((32, 64), 4, seed=s)) for s in range(1, 5))
    op = MRI((32, 64), acceleration=4, seed=7, mask_type=function.__name__.removesuffix("_mask"))
    assert torch.equal(op.mask, function((32, 64), 4, seed=7))


def test_load_mask_from_arrays_and_files(tmp_path):
    columns = np.zeros(SIZE[1], dtype=np.uint8)
    columns[::3] = 1
    mask = load_mask(columns, SIZE)
    assert mask.dtype == torch.bool and mask.shape == SIZE and bool((mask == mask[0]).all())
    np.save(tmp_path / "mask.npy", mask.numpy().astype(np.float32))
    torch.save(mask, tmp_path / "mask.pt")
    assert torch.equal(load_mask(tmp_path / "mask.npy", SIZE), mask)
    assert torch.equal(load_mask(str(tmp_path / "mask.pt"), SIZE), mask)
    assert torch.equal(MRI(SIZE, mask=tmp_path / "mask.npy").mask, mask)


# --- config ----------------------------------------------------------------------------
def test_config_round_trip(op):
    config = json.loads(json.dumps(op.config()))
    tensors = op.tensors()
    args = {k: v for k, v in config.items() if k != "kind"}
    rebuilt = MRI(**{**args, **tensors})
    assert OPERATORS["mri"] is MRI
    made = make_operator(config, tensors)
    x, y = images(op), measurements(op)
    for other in (rebuilt, made):
        assert type(other) is MRI and other.config() == op.config()
        assert torch.equal(other.A(x), op.A(x)) and torch.equal(other.A_adjoint(y), op.A_adjoint(y))


def test_explicit_tensors_and_resizing():
    multi, single = FACTORIES["multi-random"](SIZE), FACTORIES["single-random"](SIZE)
    assert multi.config()["sensitivities"] == "explicit" and set(multi.tensors()) == {"sensitivities"}
    assert FACTORIES["single-explicit"](SIZE).config()["mask"] == "explicit" and single.tensors() == {}
    assert single.config()["center_fraction"] == pytest.approx(0.08) and single.config()["mask_type"] == "random"
    resized = single.with_image_size((16, 40))
    assert resized.mask.shape == (16, 40) and torch.equal(resized.mask, random_mask((16, 40), 4, seed=1))
    assert torch.equal(multi.with_image_size(SIZE).sensitivities, multi.sensitivities)
    with pytest.raises(IDMError, match="sensitivities"):
        multi.with_image_size((16, 40))
    with pytest.raises(IDMError, match="mask"):
        FACTORIES["single-explicit"](SIZE).with_image_size((16, 40))
    with pytest.raises(IDMError, match="sensitivities"):
        MRI(**multi.config_args())


# --- errors ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: MRI(SIZE), "exactly one"),
        (lambda: MRI(SIZE, acceleration=4, mask=torch.ones(SIZE)), "exactly one"),
        (lambda: MRI(SIZE, acceleration=0.5), "acceleration"),
        (lambda: MRI(SIZE, acceleration="4"), "acceleration"),
        (lambda: MRI(SIZE, acceleration=4, center_fraction=0.5), "exceeds"),
        (lambda: MRI(SIZE, acceleration=4, center_fraction=-0.1), "center fraction"),
        (lambda: MRI(SIZE, acceleration=4, mask_type="radial"), "mask type"),
        (lambda: MRI(SIZE, acceleration=4, seed=1.5), "seed"),
        (lambda: MRI(SIZE, acceleration=4, cg_iterations=0), "CG iterations"),
        (lambda: MRI(SIZE, acceleration=4, cg_tol=-1.0), "CG tolerance"),
        (lambda: MRI(SIZE, mask=torch.ones(3, 3)), "shape"),
        (lambda: MRI(SIZE, mask=torch.full(SIZE, 0.5)), "0 and 1"),
        (lambda: MRI(SIZE, mask="explicit"), "make_operator"),
        (lambda: MRI(SIZE, mask="/nonexistent/mask.npy"), "does not exist"),
        (lambda: MRI(SIZE, acceleration=4, sensitivities=torch.ones(4, 8, 8)), "sensitivities"),
        (lambda: MRI(SIZE, acceleration=4, sensitivities=torch.full((2, *SIZE), float("nan"))), "NaN"),
        (lambda: MRI((4, 8, 8), acceleration=4), "2D"),
        (lambda: poisson_mask((8, 8, 8), 4), "2D"),
        (lambda: complex_to_channels(torch.rand(1, 1, 4, 4)), "complex"),
        (lambda: channels_to_complex(torch.rand(1, 3, 4, 4)), "2C"),
        (lambda: estimate_sensitivities(torch.rand(4, 32, 32)), "complex"),
        (lambda: estimate_sensitivities(crandn(4, 32, 32), calibration=40), "calibration"),
        (lambda: estimate_sensitivities(crandn(4, 32, 32) * random_mask((32, 32), 4, seed=0)), "not fully sampled"),
    ],
)
def test_bad_arguments(build, match):
    with pytest.raises(IDMError, match=match):
        build()


def test_wrong_shapes_and_dtypes():
    single, multi = FACTORIES["single-random"](SIZE), FACTORIES["multi-random"](SIZE)
    with pytest.raises(IDMError, match="domain"):
        single.A(crandn(1, 1, 7, 7))
    with pytest.raises(IDMError, match="image size"):
        single.measure(torch.rand(1, 1, SIZE[0] + 1, SIZE[1]))
    with pytest.raises(IDMError, match=r"\(B, 1, H, W\)"):
        multi.A(crandn(1, 2, *SIZE))
    with pytest.raises(IDMError, match=f"expected \\(B, {COILS}, "):
        multi.A_adjoint(crandn(1, COILS + 1, *SIZE))
    with pytest.raises(IDMError, match="measurements"):
        multi.A_dagger(crandn(COILS, *SIZE))
    with pytest.raises(IDMError, match="one channel"):
        multi.measurement_shape(1, 3)
    for dtype in (torch.int64, torch.float16, torch.bool):
        with pytest.raises(IDMError, match="complex64/complex128"):
            single.A(torch.zeros(1, 1, *SIZE, dtype=dtype))


# --- complex ↔ channels ----------------------------------------------------------------
def test_complex_channels_round_trip():
    x = crandn(2, 1, 6, 5)
    channels = complex_to_channels(x)
    assert channels.shape == (2, 2, 6, 5) and channels.dtype == torch.float32
    assert torch.equal(channels[:, 0], x[:, 0].real) and torch.equal(channels[:, 1], x[:, 0].imag)
    assert torch.equal(channels_to_complex(channels), x)
    many = crandn(2, 3, 4, 4, dtype=torch.complex128)
    assert torch.equal(channels_to_complex(complex_to_channels(many)), many)
    assert torch.equal(complex_to_channels(many)[:, 2], many[:, 1].real)  # [Re x₁, Im x₁, Re x₂, …]


# --- coil sensitivities ----------------------------------------------------------------
def test_espirit_reproduces_smooth_sensitivities():
    size = (64, 64)
    truth = smooth_sensitivities(6, size)
    image, support = phantom(size)
    kspace = fft2c(truth * image)
    estimate = estimate_sensitivities(kspace, calibration=24, kernel=6)
    assert estimate.shape == truth.shape and estimate.dtype == torch.complex64
    normalised = truth / truth.abs().square().sum(0).sqrt()  # ESPIRiT maps have Σ|S|² = 1
    normalised = normalised * normalised[0].conj() / normalised[0].abs()  # phase relative to coil 0
    error = (estimate - normalised).abs().square().sum(0).sqrt()[support]
    assert float(error.max()) < 0.05 and float(error.mean()) < 0.01
    rss = estimate.abs().square().sum(0)[support]
    assert torch.allclose(rss, torch.ones_like(rss), atol=1e-4)  # kept everywhere inside the object
    from_lines = estimate_sensitivities(kspace * random_mask(size, 2, 0.4, seed=0), calibration=(64, 24))
    assert float((from_lines - normalised).abs().square().sum(0).sqrt()[support].mean()) < 0.01


# --- real data -------------------------------------------------------------------------
def _real_kspace(shared_data, name: str, key: str) -> torch.Tensor:
    scipy_io = pytest.importorskip("scipy.io")
    path = shared_data / "mri" / "kspace_loraks_espirit" / name
    if not path.is_file():
        pytest.skip(f"real k-space not available: {path} is missing")
    data = scipy_io.loadmat(path)
    kspace = torch.from_numpy(np.ascontiguousarray(np.moveaxis(data[key], -1, 0))).to(torch.complex64)
    return kspace / kspace.abs().max(), data


def test_real_8coil_brain_cg_sense(shared_data):
    """ESPIRiT's brain_alias_8ch (320×256, 8 coils, columns 44…211 acquired; the FOV is smaller than
    the head, so one set of maps leaves ≈ 18 % of the fully sampled data unexplained)."""
    kspace, _ = _real_kspace(shared_data, "ESPIRiT_data/brain_alias_8ch.mat", "DATA")
    size = tuple(kspace.shape[1:])
    maps = estimate_sensitivities(kspace)  # 24 × 24 centre, 6 × 6 kernels
    assert float((maps.abs().sum(0) > 0).float().mean()) > 0.8
    acquired = kspace.abs().sum(dim=(0, 1)) > 0
    op = MRI(size, mask=random_mask(size, 4, seed=0) & acquired, sensitivities=maps, cg_iterations=20)
    y = kspace[None] * op.mask
    x = op.A_dagger(y)
    assert relative(op.A(x), y) < 0.1  # measured 0.072 at 20 iterations (zero-filled Aᴴy: 0.123)
    assert relative(op.A(x), y) < 0.8 * relative(op.A(op.A_adjoint(y)), y)


def test_real_4coil_mprage_sensitivities_match_the_reference(shared_data):
    """LORAKS' MPRAGE (256×256, 4 coils, fully sampled, with reference coil maps)."""
    kspace, data = _real_kspace(shared_data, "LORAKS_examples/MPRAGE_multi_channel.mat", "kData")
    reference = torch.from_numpy(np.ascontiguousarray(np.moveaxis(data["coil_sens"], -1, 0))).to(torch.complex64)
    maps = estimate_sensitivities(kspace)
    inside = (maps.abs().sum(0) > 0) & (reference.abs().sum(0) > 0)
    agreement = (maps.conj() * reference).sum(0).abs() / reference.abs().square().sum(0).sqrt().clamp_min(1e-12)
    assert float(agreement[inside].mean()) > 0.99  # |⟨Ŝ, S_ref/‖S_ref‖⟩|: equal up to a phase per pixel
    op = MRI(tuple(kspace.shape[1:]), acceleration=4, mask_type="poisson", sensitivities=maps)
    y = kspace[None] * op.mask
    assert relative(op.A(op.A_dagger(y)), y) < 0.05  # measured 0.032 (noise outside the kept maps)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(op):
    x, y = images(op), measurements(op)
    assert torch.allclose(op.A(x.cuda()).cpu(), op.A(x), atol=1e-5)
    assert torch.allclose(op.A_adjoint(y.cuda()).cpu(), op.A_adjoint(y), atol=1e-5)


def test_complex_parts_operator_is_linear_adjoint_and_shifts_the_measurements() -> None:
    """ComplexParts: A_u(u) = A(channels_to_complex(u)) with its adjoint, and measurements of v are
    A_u's measurements (y + A_u(1))/2 of u = (parts + 1)/2."""
    from idm.physics.mri import ComplexParts, complex_to_channels

    g = torch.Generator().manual_seed(0)
    op = MRI((12, 10), acceleration=2, center_fraction=0.2, seed=3)
    parts = ComplexParts(op)
    v = torch.complex(torch.rand(2, 1, 12, 10, generator=g, dtype=torch.float64) * 2 - 1,
                      torch.rand(2, 1, 12, 10, generator=g, dtype=torch.float64) * 2 - 1)
    u = (complex_to_channels(v) + 1) / 2
    y = op.A(v)
    torch.testing.assert_close(parts.A(u), parts.measurements(y))
    torch.testing.assert_close(parts.image(u), v)
    w = torch.randn(u.shape, generator=g, dtype=torch.float64)
    k = op.A(torch.complex(torch.randn(2, 1, 12, 10, generator=g, dtype=torch.float64),
                           torch.randn(2, 1, 12, 10, generator=g, dtype=torch.float64)))
    lhs = torch.vdot(parts.A(w).flatten(), k.flatten()).real
    assert abs(float(lhs - torch.dot(w.flatten(), parts.A_adjoint(k).flatten()))) < 1e-10 * float(lhs.abs() + 1)
    fitted = parts.project(torch.rand(u.shape, generator=g, dtype=torch.float64), parts.measurements(y))
    torch.testing.assert_close(op.A(parts.image(fitted)), y)
    assert parts.measurement_shape(2, 2) == op.measurement_shape(2, 1)
