"""Forward operators: adjointness, pseudo-inverse, seeds, sizes, batching, configs, noise, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from idm.errors import IDMError
from idm.physics import (
    OPERATORS,
    BlockCS,
    Denoising,
    Inpainting,
    LinearOperator,
    ParallelBeamCT,
    SuperResolution,
    make_operator,
)

SIZE = (37, 50)


def checkerboard(size: tuple[int, int]) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(size[0]), torch.arange(size[1]), indexing="ij")
    return ((rows + cols) % 2).to(torch.float32)


#: name → factory(image_size, noise_sigma) ; every operator kind, several settings
FACTORIES = {
    "blockcs-b8": lambda size, sigma=0.0: BlockCS(size, ratio=0.25, block_size=8, seed=1, noise_sigma=sigma),
    "blockcs-b32": lambda size, sigma=0.0: BlockCS(size, ratio=0.1, seed=2, matrix_seed=3, noise_sigma=sigma),
    "blockcs-full": lambda size, sigma=0.0: BlockCS(size, ratio=1.0, block_size=4, noise_sigma=sigma),
    "inpainting-random": lambda size, sigma=0.0: Inpainting(size, ratio=0.4, seed=5, noise_sigma=sigma),
    "inpainting-explicit": lambda size, sigma=0.0: Inpainting(size, mask=checkerboard(size), noise_sigma=sigma),
    "superres-2": lambda size, sigma=0.0: SuperResolution(size, factor=2, noise_sigma=sigma),
    "superres-3": lambda size, sigma=0.0: SuperResolution(size, factor=3, noise_sigma=sigma),
    "denoising": lambda size, sigma=0.0: Denoising(size, noise_sigma=sigma),
    "ct-sparse": lambda size, sigma=0.0: ParallelBeamCT(size, views=23, noise_sigma=sigma),
}
#: operators whose A† is iterative (CG on the normal equations, stopped early): exact only to its tolerance
ITERATIVE_DAGGER = {"ct-sparse"}
#: operators whose range is the whole measurement space (A A† y = y for every y)
SURJECTIVE = {"blockcs-b8", "blockcs-b32", "blockcs-full", "superres-2", "superres-3", "denoising"}


@pytest.fixture(scope="module")
def operators() -> dict[str, LinearOperator]:
    """One operator per factory at ``SIZE``, built once per module (Φ's 1024×1024 SVD runs once)."""
    return {name: factory(SIZE) for name, factory in FACTORIES.items()}


@pytest.fixture(params=sorted(FACTORIES))
def named_op(request, operators) -> tuple[str, LinearOperator]:
    return request.param, operators[request.param]


@pytest.fixture
def op(named_op) -> LinearOperator:
    return named_op[1]


def image(op: LinearOperator, batch: int = 2, channels: int = 3, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, channels, *op.domain_size, generator=generator, dtype=dtype)


def measurements(op: LinearOperator, batch: int = 2, channels: int = 3, dtype=torch.float64, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(op.measurement_shape(batch, channels), generator=generator, dtype=dtype)


#: operators on complex images, tested with complex inner products in their own files
COMPLEX_KINDS = {"mri": "tests/test_mri.py"}


def test_every_kind_is_covered():
    assert {factory(SIZE).kind for factory in FACTORIES.values()} | set(COMPLEX_KINDS) == set(OPERATORS)


# --- linear algebra --------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_adjointness(op, dtype):
    x, y = image(op, dtype=dtype), measurements(op, dtype=dtype)
    ax, aty = op.A(x), op.A_adjoint(y)
    assert ax.dtype == dtype and aty.dtype == dtype
    assert ax.shape == op.measurement_shape(2, 3) and aty.shape == x.shape
    lhs, rhs = (ax * y).sum().double(), (x * aty).sum().double()
    scale = ax.double().norm() * y.double().norm()
    assert abs(lhs - rhs) / scale <= 1e-5


def test_pseudo_inverse_on_the_range(named_op):
    name, op = named_op
    if name in ITERATIVE_DAGGER:
        pytest.skip("A† is conjugate gradients stopped early (tests/test_ct.py checks its residual)")
    y = op.A(image(op))
    assert torch.allclose(op.A(op.A_dagger(y)), y, atol=1e-10)


def test_pseudo_inverse_everywhere(named_op):
    name, op = named_op
    if name not in SURJECTIVE:
        pytest.skip("inpainting measurements outside the mask are not in the range")
    y = measurements(op)
    assert torch.allclose(op.A(op.A_dagger(y)), y, atol=1e-10)


def test_pseudo_inverse_is_least_squares(named_op):
    """A†y is the minimum-norm least-squares solution: AᵀA A†y = Aᵀy and A†y ∈ range(Aᵀ)."""
    name, op = named_op
    if name in ITERATIVE_DAGGER:
        pytest.skip("A† is conjugate gradients stopped early (tests/test_ct.py checks the normal equations)")
    y = measurements(op)
    x = op.A_dagger(y)
    assert torch.allclose(op.AtA(x), op.A_adjoint(y), atol=1e-10)
    assert torch.allclose(op.A_dagger(op.A(x)), x, atol=1e-10)


def test_blockcs_rows_are_orthonormal(operators):
    op = operators["blockcs-b32"]
    phi = op.matrix
    assert phi.shape == (op.rows, 1024) and phi.dtype == torch.float64
    assert torch.allclose(phi @ phi.T, torch.eye(op.rows, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("ratio, rows", [(0.1, 103), (0.3, 308), (0.5, 512), (0.25, 256), (1.0, 1024), (1e-9, 1)])
def test_blockcs_number_of_rows(ratio, rows):
    assert BlockCS(SIZE, ratio).rows == rows  # ceil(ratio·1024), no float error (0.3·1024 = 307.2)


def test_blockcs_scrambles_over_the_whole_image(operators):
    """Each measurement mixes pixels from everywhere, not from one 32×32 block."""
    op = operators["blockcs-b32"].with_image_size((64, 64))
    x = torch.zeros(1, 1, 64, 64, dtype=torch.float64)
    x[..., :32, :32] = 1.0  # only the top-left block is non-zero
    y = op.A(x)
    assert (y.abs() > 1e-12).all()  # every block of measurements sees it


# --- seeds -----------------------------------------------------------------------------
def test_blockcs_seeds(operators):
    op = operators["blockcs-b8"]
    x = image(op)
    same = BlockCS(SIZE, ratio=0.25, block_size=8, seed=1)
    assert torch.equal(op.A(x), same.A(x))
    other_perm = BlockCS(SIZE, ratio=0.25, block_size=8, seed=2)
    other_matrix = BlockCS(SIZE, ratio=0.25, block_size=8, seed=1, matrix_seed=7)
    assert not torch.allclose(op.A(x), other_perm.A(x))
    assert not torch.allclose(op.matrix, other_matrix.matrix)
    assert torch.equal(op.permutation()[0], other_matrix.permutation()[0])


@pytest.mark.parametrize("name", ["blockcs-b8", "blockcs-b32"])
def test_blockcs_redraw_changes_the_permutation_only(operators, name):
    op = operators[name]
    x = image(op)
    redrawn = op.redraw(11)
    assert redrawn.seed == 11 and redrawn.config() == {**op.config(), "seed": 11}
    assert redrawn.matrix is op.matrix and redrawn.redraw(12).matrix is op.matrix  # shared, no new SVD
    assert not torch.equal(redrawn.permutation()[0], op.permutation()[0])
    assert not torch.allclose(redrawn.A(x), op.A(x))
    assert torch.equal(op.redraw(op.seed).A(x), op.A(x))
    if op.block_size == 8:  # a fresh operator with the new seed (a cheap 64×64 SVD)
        assert torch.equal(redrawn.A(x), BlockCS(SIZE, ratio=0.25, block_size=8, seed=11).A(x))


def test_blockcs_permutation_is_a_permutation(operators):
    op = operators["blockcs-b8"]
    perm, inverse = op.permutation()
    pixels = math.prod(op.domain_size)
    assert torch.equal(perm.sort().values, torch.arange(pixels))
    assert torch.equal(perm[inverse], torch.arange(pixels))


def test_inpainting_random_mask_seeds():
    a, b = Inpainting(SIZE, ratio=0.3, seed=1), Inpainting(SIZE, ratio=0.3, seed=1)
    c = Inpainting(SIZE, ratio=0.3, seed=2)
    assert torch.equal(a.mask, b.mask) and not torch.equal(a.mask, c.mask)
    assert int(a.mask.sum()) == math.ceil(0.3 * SIZE[0] * SIZE[1])


# --- sizes, padding, batching ----------------------------------------------------------
@pytest.mark.parametrize("size", [(37, 50), (64, 64), (1, 1), (33, 1), (5, 70)])
def test_arbitrary_image_sizes(op, size):
    sized = op.with_image_size(size) if not getattr(op, "explicit", False) else None
    if sized is None:
        sized = Inpainting(size, mask=checkerboard(size))
    x = torch.rand(2, 1, *size, dtype=torch.float64)
    padded = sized.pad(x)
    assert padded.shape == (2, 1, *sized.domain_size)
    assert all(d >= s for d, s in zip(sized.domain_size, size))
    assert torch.equal(sized.crop(padded), x)
    assert padded[..., size[0] :, :].abs().sum() == 0 and padded[..., :, size[1] :].abs().sum() == 0
    y = sized.measure(x)
    assert y.shape == sized.measurement_shape(2, 1)
    assert sized.A_dagger(y).shape == padded.shape


def test_blockcs_domain_is_a_multiple_of_the_block(operators):
    op = operators["blockcs-b32"]
    for size, domain in [((37, 50), (64, 64)), ((1, 1), (32, 32)), ((64, 65), (64, 96))]:
        sized = op.with_image_size(size)
        assert sized.domain_size == domain
        assert sized.matrix is op.matrix
        assert sized.measurement_shape(1, 1) == (1, 1, domain[0] * domain[1] // 1024, 103)


def test_superres_domain_and_pooling():
    op = SuperResolution((5, 7), factor=2)
    assert op.domain_size == (6, 8)
    x = torch.arange(48, dtype=torch.float64).reshape(1, 1, 6, 8)
    assert torch.allclose(op.A(x), torch.nn.functional.avg_pool2d(x, 2))
    assert torch.equal(op.A_dagger(op.A(x)), torch.nn.functional.interpolate(op.A(x), scale_factor=2, mode="nearest"))


def test_batch_and_channel_independence(op):
    x, y = image(op, batch=3, channels=2), measurements(op, batch=3, channels=2)
    each_x = torch.cat([torch.cat([op.A(x[b : b + 1, c : c + 1]) for c in range(2)], 1) for b in range(3)])
    each_y = torch.cat([torch.cat([op.A_adjoint(y[b : b + 1, c : c + 1]) for c in range(2)], 1) for b in range(3)])
    assert torch.allclose(op.A(x), each_x, atol=1e-12)
    assert torch.allclose(op.A_adjoint(y), each_y, atol=1e-12)


def test_gradients_flow(op):
    x = image(op, dtype=torch.float32).requires_grad_()
    op.A(x).square().sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


# --- config ----------------------------------------------------------------------------
def test_config_round_trip(op):
    config = json.loads(json.dumps(op.config()))
    tensors = op.tensors()
    rebuilt = make_operator(config, tensors)
    assert type(rebuilt) is type(op) and rebuilt.config() == op.config()
    x, y = image(op), measurements(op)
    assert torch.equal(rebuilt.A(x), op.A(x))
    assert torch.equal(rebuilt.A_adjoint(y), op.A_adjoint(y))


def test_explicit_mask_lives_in_tensors(operators):
    op = operators["inpainting-explicit"]
    assert op.config()["mask"] == "explicit"
    assert torch.equal(op.tensors()["mask"], checkerboard(SIZE).bool())
    with pytest.raises(IDMError, match="mask"):
        make_operator(op.config())
    with pytest.raises(IDMError, match="mask"):
        op.with_image_size((8, 8))
    assert FACTORIES["inpainting-random"](SIZE).tensors() == {}


def test_float32_and_device_caches_are_per_dtype(op):
    x64 = image(op)
    y32 = op.A(x64.float())
    assert y32.dtype == torch.float32
    y64 = op.A(x64)
    assert torch.linalg.vector_norm(y32.double() - y64) <= 1e-6 * torch.linalg.vector_norm(y64)  # float32 rounding


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(op):
    x = image(op)
    assert torch.allclose(op.A(x.cuda()).cpu(), op.A(x), atol=1e-10)
    y = measurements(op)
    assert torch.allclose(op.A_adjoint(y.cuda()).cpu(), op.A_adjoint(y), atol=1e-10)


# --- noise -----------------------------------------------------------------------------
def test_noiseless_measure_is_exact(op):
    x = torch.rand(2, 1, *SIZE, dtype=torch.float64)
    assert torch.equal(op.measure(x), op.A(op.pad(x)))


@pytest.mark.parametrize("name", ["blockcs-b8", "superres-2", "denoising"])
def test_noise_level_and_determinism(name):
    op = FACTORIES[name]((64, 64), 0.1)
    assert op.noise.sigma == 0.1 and make_operator(op.config()).noise.sigma == 0.1
    x = torch.rand(4, 1, 64, 64, dtype=torch.float64)
    y1 = op.measure(x, generator=torch.Generator().manual_seed(3))
    y2 = op.measure(x, generator=torch.Generator().manual_seed(3))
    y3 = op.measure(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    noise = y1 - op.A(x)
    assert abs(float(noise.std()) - 0.1) < 0.01 and abs(float(noise.mean())) < 0.01


# --- bad input -------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0, 1.5, float("nan"), -0.1, "abc"])
def test_bad_ratio(ratio):
    with pytest.raises(IDMError, match="ratio"):
        BlockCS(SIZE, ratio)
    with pytest.raises(IDMError, match="ratio"):
        Inpainting(SIZE, ratio=ratio)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: SuperResolution(SIZE, factor=0), "factor"),
        (lambda: SuperResolution(SIZE, factor=1.5), "factor"),
        (lambda: BlockCS(SIZE, 0.1, block_size=0), "block size"),
        (lambda: BlockCS((4, 4, 4), 0.1), "2D"),
        (lambda: BlockCS((0, 4), 0.1), "image size"),
        (lambda: Inpainting(SIZE, mask=torch.ones(3, 3)), "shape"),
        (lambda: Inpainting(SIZE, mask=torch.full(SIZE, 0.5)), "0 and 1"),
        (lambda: Inpainting(SIZE), "exactly one"),
        (lambda: Inpainting(SIZE, mask=torch.ones(SIZE), ratio=0.5), "exactly one"),
        (lambda: Denoising(SIZE, noise_sigma=-1.0), "sigma"),
        (lambda: make_operator({"kind": "radon", "image_size": [8, 8]}), "unknown operator kind"),
        (lambda: make_operator({"image_size": [8, 8]}), "kind"),
        (lambda: make_operator({"kind": "blockcs", "image_size": [8, 8]}), "ratio"),
        (lambda: make_operator({"kind": "superres", "image_size": [8, 8], "factor": 2, "zoom": 1}), "zoom"),
        (lambda: make_operator({"kind": "superres", "image_size": [8, 8], "factor": 2}, {"mask": torch.ones(8, 8)}), "mask"),
    ],
)
def test_bad_arguments(build, match):
    with pytest.raises(IDMError, match=match):
        build()


def test_wrong_shapes(op):
    with pytest.raises(IDMError, match="image size"):
        op.measure(torch.rand(1, 1, SIZE[0] + 1, SIZE[1]))
    with pytest.raises(IDMError, match="image size"):
        op.pad(torch.rand(*SIZE))
    with pytest.raises(IDMError, match="domain"):
        op.A(torch.rand(1, 1, 7, 7))
    wrong = list(op.measurement_shape(1, 1))
    wrong[-1] += 1
    with pytest.raises(IDMError, match="measurements"):
        op.A_adjoint(torch.rand(*wrong))
    with pytest.raises(IDMError, match="measurements"):
        op.A_dagger(torch.rand(op.measurement_shape(1, 1)[1:]))
