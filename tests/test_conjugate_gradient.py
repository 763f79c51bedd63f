"""``idm.physics.conjugate_gradient``: batch-wise CG for symmetric positive (semi-)definite systems."""

from __future__ import annotations

import pytest
import torch

from idm.physics import conjugate_gradient

pytestmark = pytest.mark.usefixtures("one_thread")


def spd(batch: int, n: int, condition: float = 10.0, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """``(batch, n, n)`` symmetric positive definite matrices with eigenvalues in [1, condition]."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, generator=generator, dtype=torch.float64))
    eigenvalues = torch.linspace(1.0, condition, n, dtype=torch.float64).expand(batch, n)
    return (q @ torch.diag_embed(eigenvalues) @ q.transpose(-1, -2)).to(dtype)


def matvec(matrix: torch.Tensor):
    """``x (B, n) → matrix @ x`` per batch entry."""
    return lambda x: (matrix @ x.unsqueeze(-1)).squeeze(-1)


def test_solves_an_spd_system_to_tolerance_and_matches_linalg_solve() -> None:
    matrix = spd(1, 30)
    b = torch.randn(1, 30, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = conjugate_gradient(matvec(matrix), b, iterations=200, tol=1e-10)
    assert float((matvec(matrix)(x) - b).norm()) <= 1e-10
    torch.testing.assert_close(x, torch.linalg.solve(matrix, b), rtol=0, atol=1e-10)


def test_converges_in_at_most_n_iterations_on_a_well_conditioned_system() -> None:
    """CG is exact after n steps in exact arithmetic; in float64 on a condition-10 system, close to it."""
    matrix = spd(1, 12, condition=10.0, seed=3)
    b = torch.randn(1, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x = conjugate_gradient(matvec(matrix), b, iterations=12, tol=0.0)
    torch.testing.assert_close(x, torch.linalg.solve(matrix, b), rtol=0, atol=1e-9)


def test_batch_entries_are_solved_independently() -> None:
    """Each batch entry has its own step sizes: easy and hard systems together equal each alone."""
    matrices = torch.cat([spd(1, 20, condition=2.0, seed=5), spd(1, 20, condition=500.0, seed=6)])
    b = torch.randn(2, 20, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    together = conjugate_gradient(matvec(matrices), b, iterations=300, tol=1e-12)
    torch.testing.assert_close(together, torch.linalg.solve(matrices, b), rtol=0, atol=1e-9)
    for i in range(2):
        alone = conjugate_gradient(matvec(matrices[i:i + 1]), b[i:i + 1], iterations=300, tol=1e-12)
        torch.testing.assert_close(together[i:i + 1], alone, rtol=0, atol=1e-9)


def test_image_shaped_unknowns_and_float32() -> None:
    """The unknown may have any shape ``(B, ...)`` (here images); sums run over all but the batch axis."""
    weights = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(8)) + 0.5  # diagonal SPD operator
    b = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    x = conjugate_gradient(lambda v: weights * v, b, iterations=100, tol=1e-6)
    assert x.shape == b.shape and x.dtype == torch.float32
    torch.testing.assert_close(x, b / weights, rtol=1e-4, atol=1e-5)


def test_hermitian_complex_system() -> None:
    generator = torch.Generator().manual_seed(10)
    n = 10
    g = torch.complex(torch.randn(n, n, generator=generator, dtype=torch.float64),
                      torch.randn(n, n, generator=generator, dtype=torch.float64))
    matrix = (g @ g.conj().T + n * torch.eye(n, dtype=torch.complex128)).unsqueeze(0)
    b = torch.complex(torch.randn(1, n, generator=generator, dtype=torch.float64),
                      torch.randn(1, n, generator=generator, dtype=torch.float64))
    x = conjugate_gradient(matvec(matrix), b, iterations=100, tol=1e-12)
    torch.testing.assert_close(x, torch.linalg.solve(matrix, b), rtol=0, atol=1e-10)


def test_zero_right_hand_side_gives_zero_without_nans() -> None:
    matrix = spd(2, 6)
    b = torch.zeros(2, 6, dtype=torch.float64)
    calls = []

    def apply(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return matvec(matrix)(x)

    x = conjugate_gradient(apply, b, iterations=50)
    assert torch.equal(x, torch.zeros_like(b))
    assert not calls  # converged before any work: the residual is already zero


def test_converged_items_stop_so_results_do_not_depend_on_the_batch() -> None:
    """An item that reaches ``tol`` stays put while the others iterate: in float32 (where more CG
    steps past convergence drift) each item's result equals its result alone."""
    matrices = torch.cat([spd(1, 8, condition=2.0, seed=15), spd(1, 8, condition=1e3, seed=16)]).float()
    b = torch.randn(2, 8, generator=torch.Generator().manual_seed(17))
    together = conjugate_gradient(matvec(matrices), b, iterations=40, tol=1e-5)
    for i in range(2):
        alone = conjugate_gradient(matvec(matrices[i : i + 1]), b[i : i + 1], iterations=40, tol=1e-5)
        torch.testing.assert_close(together[i : i + 1], alone, rtol=1e-6, atol=1e-6)


def test_a_zero_entry_in_a_batch_stays_zero() -> None:
    matrix = spd(2, 6, seed=11)
    b = torch.stack([torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)])
    x = conjugate_gradient(matvec(matrix), b, iterations=50, tol=1e-12)
    assert torch.isfinite(x).all() and torch.equal(x[0], torch.zeros(6, dtype=torch.float64))
    torch.testing.assert_close(x[1:], torch.linalg.solve(matrix[1:], b[1:]), rtol=0, atol=1e-10)


def test_iteration_limit() -> None:
    """``iterations`` bounds the work: 0 returns the start x = 0, 1 is one exact line search along b
    (steepest descent), and the A-norm error never grows with more iterations."""
    matrix = spd(1, 40, condition=1e4, seed=12)
    b = torch.randn(1, 40, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    apply = matvec(matrix)
    calls = []

    def counted(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return apply(x)

    assert torch.equal(conjugate_gradient(counted, b, iterations=0), torch.zeros_like(b)) and not calls
    one = conjugate_gradient(counted, b, iterations=1)
    assert len(calls) == 1
    step = (b * b).sum() / (b * apply(b)).sum()
    torch.testing.assert_close(one, step * b, rtol=1e-12, atol=0)

    truth = torch.linalg.solve(matrix, b)

    def energy_error(x: torch.Tensor) -> float:
        e = x - truth
        return float((e * apply(e)).sum())

    errors = [energy_error(conjugate_gradient(apply, b, iterations=k, tol=0.0)) for k in (1, 2, 5, 10, 20)]
    assert all(later <= earlier * (1 + 1e-9) for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] < 0.5 * errors[0]
    # an ill-conditioned system is not solved in 5 iterations: the limit is honoured, not exceeded
    assert float((apply(conjugate_gradient(apply, b, iterations=5)) - b).norm()) > 1e-6


def test_a_singular_float32_system_does_not_blow_up() -> None:
    """Masked unitary Fourier measurements plus a difference penalty along the batch-free axis share
    a null space; float32 CG stalls at the rounding level and then diverges. The solver stops and
    returns its smallest-residual iterate (the first few iterations' accuracy), never the blow-up."""
    generator = torch.Generator().manual_seed(14)
    mask = torch.rand(8, 32, 32, generator=generator) < 0.125

    def apply(v: torch.Tensor) -> torch.Tensor:
        v = v.reshape(8, 32, 32)
        data = torch.fft.ifft2(mask * torch.fft.fft2(v, norm="ortho"), norm="ortho").real
        dz = v[1:] - v[:-1]
        penalty = torch.zeros_like(v)
        penalty[1:] += dz
        penalty[:-1] -= dz
        return (data + 0.1 * penalty).reshape(1, -1)

    b = apply(torch.rand(1, 8 * 32 * 32, generator=generator))
    x = conjugate_gradient(apply, b, iterations=200, tol=0.0)
    assert torch.isfinite(x).all()
    assert float((apply(x) - b).norm()) < 1e-2 * float(b.norm())

