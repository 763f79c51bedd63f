"""``pnp``: plug-and-play HQS with the shipped DnCNN-17 (tiny images, few iterations)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from idm.cli import main
from idm.data import save_image
from idm.errors import IDMError
from idm.physics import BlockCS
from idm.registry import get_method
from idm.zeroshot import data_consistency, operator_canvas, sample_pnp
from idm.zeroshot.pnp import data_weight, default_sigmas, noise_levels, pnp_options, prior_denoiser, resolve_sigmas

from conftest import tiny_prior, tiny_unet_config

pytestmark = pytest.mark.usefixtures("one_thread")

#: not a multiple of the 8-pixel blocks: the domain is padded to 32 × 32
SIZE = (30, 27)


def images(batch: int = 2, size: tuple[int, int] = SIZE) -> torch.Tensor:
    """Smooth random images in [0, 1]."""
    x = torch.rand(batch, 1, 6, 6, generator=torch.Generator().manual_seed(batch))
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False).clamp(0, 1)


def blockcs(sigma: float = 0.0) -> BlockCS:
    return BlockCS(SIZE, 0.3, block_size=8, seed=1, noise_sigma=sigma)


def misfit(x: torch.Tensor, y: torch.Tensor, op: BlockCS) -> torch.Tensor:
    return torch.linalg.vector_norm((op.A(x) - y).flatten(1), dim=1)


@pytest.fixture(scope="module")
def pnp():
    return get_method("pnp").build(checkpoint="dncnn-17", iterations=4)  # the default for block CS


def test_output_shape_is_the_operator_domain_and_close_to_the_truth(pnp) -> None:
    op, x = blockcs(), images()
    y = op.measure(x)
    out = pnp(y, op)
    assert out.shape == (2, 1, *op.domain_size) == (2, 1, 32, 32)
    assert torch.isfinite(out).all()
    start = op.A_dagger(y)
    error = (op.crop(out) - x).square().mean()
    assert error < (op.crop(start) - x).square().mean()


def test_lowers_the_data_misfit_of_its_start(pnp) -> None:
    from idm.baselines.tv import default_iterations, default_lambda, tv_reconstruct

    op, x = blockcs(), images()
    y = op.measure(x)
    tv = tv_reconstruct(op, y, default_lambda(op), default_iterations(op))
    out = pnp(y, op)
    assert (misfit(out, y, op) < 0.1 * misfit(tv, y, op)).all()  # noise-free: the exact projection
    # from a blank start too, and with noisy measurements (the damped step) the misfit still drops
    noisy = blockcs(0.05)
    y_noisy = noisy.measure(x, generator=torch.Generator().manual_seed(3))
    blank = torch.zeros(2, 1, *noisy.domain_size)
    est = sample_pnp(pnp.denoise, y_noisy, noisy, blank, noise_levels(3, 0.05, 0.02))
    assert (misfit(est, y_noisy, noisy) < 0.5 * misfit(blank, y_noisy, noisy)).all()


def test_deterministic(pnp) -> None:
    op = blockcs(0.02)
    y = op.measure(images(), generator=torch.Generator().manual_seed(5))
    assert torch.equal(pnp(y, op), pnp(y, op))
    adjoint = get_method("pnp").build(iterations=2, start="adjoint", sigma_max=0.2, seed=1)
    assert torch.equal(adjoint(y, op), get_method("pnp").build(iterations=2, start="adjoint", sigma_max=0.2, seed=2)(y, op))


def test_schedule_and_data_weight() -> None:
    levels = noise_levels(5, 0.2, 0.0125)
    assert levels[0] == pytest.approx(0.2) and levels[-1] == pytest.approx(0.0125)
    assert all(b / a == pytest.approx(0.5) for a, b in zip(levels, levels[1:]))
    assert noise_levels(1, 0.05, 0.01) == [0.05]
    assert data_weight(0.23, 0.0, 0.01) == 1.0  # noise-free: exact projection
    assert 0.0 < data_weight(0.23, 0.05, 0.01) < data_weight(0.23, 0.05, 0.1) < 1.0


def test_default_noise_levels_follow_the_ratio() -> None:
    low, high = BlockCS(SIZE, 0.3, block_size=8), BlockCS(SIZE, 0.5, block_size=8)
    assert default_sigmas(low) == (0.02, 0.01) and default_sigmas(high) == (0.015, 0.0075)
    assert resolve_sigmas(None, None, high) == (0.015, 0.0075)
    assert resolve_sigmas(0.05, 0.02, high) == (0.05, 0.02)
    assert resolve_sigmas(0.004, None, low) == (0.004, 0.004)  # a missing one keeps σ_min <= σ_max
    assert resolve_sigmas(None, 0.03, low) == (0.03, 0.03)
    assert pnp_options({})["sigma_max"] is None and pnp_options({"sigma_max": 1})["sigma_max"] == 1.0


def test_project_is_the_data_consistency_of_the_zeroshot_solvers() -> None:
    op, x = blockcs(), images()
    y = op.measure(x)
    guess = torch.rand(2, 1, *op.domain_size, generator=torch.Generator().manual_seed(1))
    canvas = operator_canvas(op, 1)
    _, image = data_consistency(guess * 2 - 1, y, op, canvas, 0.7)
    torch.testing.assert_close(image, op.project(guess, y, 0.7))
    assert misfit(op.project(guess, y), y, op).max() < 1e-4
    assert op.project(guess, y, 0.0) is guess


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"steps": 3}, "has no option"),
        ({"iterations": 0}, "iterations must lie in"),
        ({"iterations": 2.5}, "iterations must be of type int"),
        ({"sigma_max": -0.1}, "sigma_max must lie in"),
        ({"sigma_min": 0.1, "sigma_max": 0.05}, "must not exceed sigma_max"),
        ({"lam": float("nan")}, "lam must be of type float"),
        ({"start": "zeros"}, "start must be one of tv, adjoint"),
    ],
)
def test_bad_options(options, message) -> None:
    with pytest.raises(IDMError, match=message):
        pnp_options(options)
    with pytest.raises(IDMError, match=message):
        get_method("pnp").build(**options)


def test_sigma_beyond_the_denoisers_range_and_wrong_channels(pnp) -> None:
    with pytest.raises(IDMError, match="trained range"):
        get_method("pnp").build(sigma_max=0.3)
    op = blockcs()
    y = op.measure(images()).repeat(1, 3, 1, 1)
    with pytest.raises(IDMError, match="channel"):
        pnp(y, op)


def test_diffusion_prior_works_through_its_one_step_denoiser(tmp_path) -> None:
    directory = tmp_path / "prior"
    tiny_prior(tiny_unet_config(), seed=3).save(directory, "# tiny", dtype=None)
    method = get_method("pnp").build(checkpoint=str(directory), iterations=2, sigma_max=0.3, sigma_min=0.05)
    z = torch.rand(1, 1, 13, 10)
    assert prior_denoiser(method.prior)(z, 0.1).shape == z.shape  # padded to the U-Net's multiple, cropped back
    op = blockcs()
    y = op.measure(images(1))
    out = method(y, op)
    assert out.shape == (1, 1, 32, 32) and torch.equal(out, method(y, op))


def test_cli_lists_and_evaluates_pnp(tmp_path, capsys) -> None:
    assert main(["reconstruct", "--list-methods"]) == 0
    assert any(line.startswith("pnp ") for line in capsys.readouterr().out.splitlines())
    save_image(tmp_path / "a.png", images(1, (40, 40))[0])
    code = main(["eval", "--data", str(tmp_path), "--ratio", "0.5", "--block-size", "8", "--method", "pnp",
                 "--option", "iterations=2", "--option", "start=adjoint", "--option", "sigma_max=0.1"])
    out = capsys.readouterr().out
    assert code == 0 and "iterations=2" in out and "start='adjoint'" in out
    assert main(["eval", "--data", str(tmp_path), "--ratio", "0.5", "--method", "pnp", "--option", "iterations"]) == 2
    assert "malformed --option" in capsys.readouterr().err
    assert main(["eval", "--data", str(tmp_path), "--ratio", "0.5", "--method", "pnp", "--option", "iterations=0"]) == 2
    assert "iterations must lie in" in capsys.readouterr().err
