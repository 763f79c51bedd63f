"""DiffusionMBIR (``idm.zeroshot.mbir``, method ``mbir``): the z-TV ADMM step, chunking, seeding, shapes."""

from __future__ import annotations

import pytest
import torch

from idm.physics import ParallelBeamCT
from idm.registry import METHODS
from idm.physics.volume import admm_step, z_diff, z_diff_adjoint, ztv_objective

from conftest import tiny_prior, tiny_unet_config

pytestmark = pytest.mark.usefixtures("one_thread")


def volume(depth: int = 5, size: int = 16) -> torch.Tensor:
    """A smooth-in-z phantom volume (D, 1, H, W) on [0, 1]."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    slices = [((1 - xx**2 - yy**2) * (0.8 + 0.05 * k)).clamp(0, 1) for k in range(depth)]
    return torch.stack(slices)[:, None]


def test_z_difference_adjoint() -> None:
    x, v = torch.randn(5, 1, 4, 4, dtype=torch.float64), torch.randn(4, 1, 4, 4, dtype=torch.float64)
    torch.testing.assert_close((z_diff(x) * v).sum(), (x * z_diff_adjoint(v)).sum())


def test_admm_steps_decrease_the_objective() -> None:
    op = ParallelBeamCT((16, 16), views=6)
    truth = volume()
    y = op.A(truth)
    lam, rho = 0.04, 10.0
    x = torch.zeros_like(truth)
    z = torch.zeros_like(z_diff(x))
    u = torch.zeros_like(z)
    values = [ztv_objective(x, y, op, lam)]
    for _ in range(5):
        x, z, u = admm_step(x, y, op, z, u, lam, rho, iterations=5)
        values.append(ztv_objective(x, y, op, lam))
    assert values[1] < values[0] and values[-1] < 0.05 * values[0]


@pytest.fixture(scope="module")
def prior_dir(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("mbir") / "prior"
    tiny_prior(tiny_unet_config(), seed=2).save(directory, "# tiny", dtype=None)
    return str(directory)


def test_mbir_reconstructs_a_volume_chunk_free_and_seeded(prior_dir: str) -> None:
    op = ParallelBeamCT((16, 16), views=6)
    y = op.A(volume())
    build = METHODS.get("mbir").build
    whole = build(checkpoint=prior_dir, steps=3, chunk=8, seed=1)(y, op)
    chunked = build(checkpoint=prior_dir, steps=3, chunk=2, seed=1)(y, op)
    assert whole.shape == (5, 1, 16, 16) and torch.isfinite(whole).all()
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-4)
    assert torch.equal(build(checkpoint=prior_dir, steps=3, seed=1)(y, op), whole)
    assert not torch.equal(build(checkpoint=prior_dir, steps=3, seed=2)(y, op), whole)


def test_reconstruct_passes_method_options(prior_dir: str) -> None:
    import idm
    from idm.errors import IDMError

    op = ParallelBeamCT((16, 16), views=6)
    y = op.A(volume(depth=3))
    assert idm.reconstruct(y, op, method="mbir", checkpoint=prior_dir, steps=2).shape == (3, 1, 16, 16)
    with pytest.raises(IDMError, match="no option"):
        idm.reconstruct(y, op, method="mbir", checkpoint=prior_dir, stepz=2)


def test_mbir_on_complex_mri_slices(prior_dir: str) -> None:
    from idm.physics import MRI

    op = MRI((16, 16), acceleration=4, seed=0)
    x = volume(depth=3).to(torch.complex64)
    out = METHODS.get("mbir").build(checkpoint=prior_dir, steps=3, lam=0.005, rho=0.01)(op.A(x), op)
    assert out.shape == (3, 1, 16, 16) and out.is_complex() and torch.isfinite(torch.view_as_real(out)).all()


def test_admm_without_z_term_on_mri_stays_the_data_consistency_step() -> None:
    """λ = 0, ρ at its floor on masked Fourier measurements: the x-update's normal operator is
    numerically the projection AᵀA, exact after one CG step; float32 CG must stop there (rounding
    level / null-space direction) instead of stepping arbitrarily far along the null space."""
    from idm.physics import MRI
    from idm.physics.mri import ComplexParts

    generator = torch.Generator().manual_seed(0)
    op = ComplexParts(MRI((64, 64), acceleration=8, mask_type="poisson", seed=1))
    truth = torch.rand(6, 2, 64, 64, generator=generator)
    y = op.A(truth)
    x = truth + 0.1 * torch.randn(truth.shape, generator=generator)
    z = torch.zeros_like(z_diff(x))
    out, _, _ = admm_step(x, y, op, z, torch.zeros_like(z), 0.0, 1e-9, 10)
    assert float(out.norm()) < 1.01 * float(x.norm())
    assert float((op.A(out) - y).abs().norm()) < 1e-3 * float(y.abs().norm())


def test_mbir_defaults_follow_the_operator() -> None:
    """λ, ρ per modality and more CG steps for a limited-angle wedge (evenly spaced or explicit angles)."""
    from idm.physics import MRI, ParallelBeamCT
    from idm.zeroshot.mbir import CG_ITERATIONS, mbir_defaults

    full, wedge = ParallelBeamCT((16, 16), views=8), ParallelBeamCT((16, 16), views=8, angle_range=(0, 90))
    explicit = ParallelBeamCT((16, 16), angles=[0, 31, 59, 90, 121, 151])  # uneven, but all round
    explicit_wedge = ParallelBeamCT((16, 16), angles=[0, 15, 30, 45, 60, 75, 90])
    assert 175 < explicit.coverage < 180 and explicit_wedge.coverage == 105.0
    assert mbir_defaults(full)["cg_iterations"] == mbir_defaults(explicit)["cg_iterations"] == CG_ITERATIONS["full"]
    assert mbir_defaults(wedge)["cg_iterations"] == mbir_defaults(explicit_wedge)["cg_iterations"] \
        == CG_ITERATIONS["limited"] > CG_ITERATIONS["full"]
    mri = MRI((16, 16), acceleration=4, seed=0)
    assert (mbir_defaults(mri)["lam"], mbir_defaults(mri)["rho"]) != (mbir_defaults(full)["lam"], mbir_defaults(full)["rho"])
