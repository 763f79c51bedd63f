"""Zero-shot solvers on a tiny random prior: DDNM consistency, DDNM+ reduction, DPS guidance, options."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from idm.errors import IDMError
from idm.physics import MRI, BlockCS, Denoising, Inpainting, SuperResolution
from idm.priors import NoiseSchedule, load_prior
from idm.registry import METHODS, get_method
from idm.physics import Canvas
from idm.zeroshot import jump_indices, noise_aware_weights, operator_canvas, sample_dps, timestep_pairs

from conftest import tiny_prior, tiny_unet_config

#: size_multiple 4, so the odd test images below need the padded canvas
TINY = tiny_unet_config(channel_mults=(1, 2, 2), attention_levels=(2,))
SIZE = (19, 21)
METHOD_NAMES = ("ddnm", "ddnm+", "dps", "diffuserecon")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prior_dir(tmp_path_factory) -> str:
    """A tiny random prior saved as a checkpoint (its zero-initialised output layer randomised)."""
    directory = tmp_path_factory.mktemp("zeroshot") / "prior"
    tiny_prior(TINY, seed=3).save(directory, "# tiny test prior", dtype=None)
    return str(directory)


def images(batch: int = 2, size: tuple[int, int] = SIZE) -> torch.Tensor:
    """Smooth random images in [0, 1]."""
    x = torch.rand(batch, 1, 5, 5, generator=torch.Generator().manual_seed(batch))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


OPERATORS = {
    "blockcs": lambda sigma=0.0: BlockCS(SIZE, 0.3, block_size=8, seed=1, noise_sigma=sigma),
    "inpainting": lambda sigma=0.0: Inpainting(SIZE, ratio=0.4, seed=2, noise_sigma=sigma),
    "superres": lambda sigma=0.0: SuperResolution(SIZE, 2, noise_sigma=sigma),
    "denoising": lambda sigma=0.0: Denoising(SIZE, noise_sigma=sigma),
}


def measure(op, x: torch.Tensor) -> torch.Tensor:
    return op.measure(x, generator=torch.Generator().manual_seed(7))


def build(name: str, prior_dir: str, **options):
    return get_method(name).build(checkpoint=prior_dir, **options)


# --- shared pieces -------------------------------------------------------------------------------
def test_timestep_pairs_descend_to_the_clean_image() -> None:
    schedule = NoiseSchedule()
    pairs = timestep_pairs(schedule, 5)
    assert [t for t, _ in pairs] == schedule.respaced(5)[::-1]
    assert pairs[0][0] == 999 and pairs[-1] == (0, -1)
    assert all(t_next < t for t, t_next in pairs) and len(pairs) == 5


def test_time_travel_jumps_back_and_repeats() -> None:
    n, length, repeat = 7, 2, 3
    order = jump_indices(n, length, repeat)
    assert order[0] == n - 1 and order[-1] == -1
    moves = [b - a for a, b in zip(order, order[1:])]
    assert set(moves) == {-1, 1}
    starts = range(0, n - length, length)  # jump points 0, 2, 4
    assert moves.count(1) == len(starts) * (repeat - 1) * length
    assert moves.count(-1) == n + moves.count(1)  # every index left upwards is denoised again
    assert jump_indices(n) == list(range(n - 1, -2, -1))
    with pytest.raises(IDMError, match="time travel"):
        jump_indices(n, 0, 1)


def test_canvas_pads_to_the_multiple_and_crops_back() -> None:
    canvas = operator_canvas(Inpainting(SIZE, ratio=0.5), 4)
    assert canvas.size == (20, 24) and canvas.inner == SIZE
    x, inner = torch.randn(2, 1, 20, 24), torch.randn(2, 1, *SIZE)
    pasted = canvas.paste(x, inner)
    assert torch.equal(canvas.crop(pasted), inner)
    assert torch.equal(pasted[..., 19:, :], x[..., 19:, :]) and torch.equal(pasted[..., :, 21:], x[..., :, 21:])
    padded = canvas.pad(inner)
    assert padded.shape[-2:] == (20, 24) and torch.equal(canvas.crop(padded), inner)
    assert not padded[..., 19:, :].any() and not padded[..., :, 21:].any()  # zeros by default
    mirrored = canvas.pad(inner, mode="reflect")
    torch.testing.assert_close(mirrored[..., 19, :21], inner[..., 17, :])  # row 19 mirrors row 17 about row 18


def test_canvas_refuses_wrong_sizes() -> None:
    canvas = operator_canvas(Inpainting(SIZE, ratio=0.5), 4)
    with pytest.raises(IDMError, match="spatial size"):
        canvas.pad(torch.zeros(1, 1, 20, 24))
    with pytest.raises(IDMError, match="spatial size"):
        canvas.crop(torch.zeros(1, 1, *SIZE))
    with pytest.raises(IDMError, match="cannot hold"):
        Canvas((8, 8), (4, 8))


def test_noise_aware_weights() -> None:
    assert noise_aware_weights(0.6, 0.8, 0.0) == (1.0, 0.8)
    lam, gamma = noise_aware_weights(0.6, 0.8, 0.5)  # σ ≥ aσ_y: full correction, less fresh noise
    assert lam == 1.0 and math.isclose(gamma**2, 0.8**2 - 0.3**2)
    lam, gamma = noise_aware_weights(0.9, 0.1, 0.5)  # σ < aσ_y: partial correction, no noise
    assert math.isclose(lam, 0.1 / 0.45) and gamma == 0.0


# --- DDNM / DDNM+ --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["blockcs", "inpainting", "superres"])
def test_ddnm_output_satisfies_the_measurements(prior_dir: str, kind: str) -> None:
    op = OPERATORS[kind]()
    y = measure(op, images())
    x = build("ddnm", prior_dir, steps=4)(y, op)
    assert x.shape == (2, 1, *op.domain_size)
    torch.testing.assert_close(op.A(x), y, atol=1e-4, rtol=0)


def test_ddnm_plus_equals_ddnm_without_noise(prior_dir: str) -> None:
    op = OPERATORS["blockcs"]()
    y = measure(op, images())
    plain = build("ddnm", prior_dir, steps=5, seed=4)(y, op)
    plus = build("ddnm+", prior_dir, steps=5, seed=4)(y, op)
    assert torch.equal(plain, plus)


def test_ddnm_plus_uses_the_noise_level_and_time_travel(prior_dir: str) -> None:
    op = OPERATORS["blockcs"](0.1)
    y = measure(op, images())
    plain = build("ddnm", prior_dir, steps=5)(y, op)
    plus = build("ddnm+", prior_dir, steps=5)(y, op)
    travel = build("ddnm+", prior_dir, steps=5, travel_length=2, travel_repeat=2)(y, op)
    assert not torch.allclose(plain, plus) and not torch.allclose(plus, travel)
    # noisy y: the last steps shrink the correction, so DDNM+ does not reproduce the noise exactly
    torch.testing.assert_close(op.A(plain), y, atol=1e-4, rtol=0)
    assert float((op.A(plus) - y).abs().max()) > 1e-3


# --- DPS -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["blockcs", "inpainting"])
def test_dps_guidance_lowers_the_data_misfit(prior_dir: str, kind: str) -> None:
    op = OPERATORS[kind]()
    y = measure(op, images(1))
    with torch.no_grad():  # as the CLI and the benchmark call it: DPS enables gradients itself
        free = build("dps", prior_dir, steps=20, zeta=0.0)(y, op)
        guided = build("dps", prior_dir, steps=20, zeta=1.0)(y, op)
    misfit_free, misfit_guided = float((op.A(free) - y).norm()), float((op.A(guided) - y).norm())
    assert misfit_guided < 0.8 * misfit_free


def test_dps_misfit_falls_from_its_start(prior_dir: str) -> None:
    prior = load_prior(prior_dir)
    prior.unet.requires_grad_(False)
    op = OPERATORS["blockcs"]()
    y = measure(op, images(1))
    seen: list[float] = []
    x = sample_dps(prior, y, op, prior.schedule, steps=20, zeta=1.0, size_multiple=4,
                   generator=torch.Generator().manual_seed(0), callback=lambda s: seen.append(float(s["misfit"][0])))
    assert len(seen) == 20
    final = 2 * float((op.A(x) - y).norm())  # the misfit is measured on the prior's [-1, 1] scale
    assert final < 0.5 * seen[0]
    assert all(p.grad is None for p in prior.unet.parameters())


# --- every method ----------------------------------------------------------------------------------
def test_methods_are_registered() -> None:
    assert set(METHOD_NAMES) <= set(METHODS.names())
    assert all(METHODS.get(name).needs_checkpoint for name in METHOD_NAMES)


@pytest.mark.parametrize("kind", sorted(OPERATORS))
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_every_method_on_every_operator_is_seeded(prior_dir: str, name: str, kind: str) -> None:
    op = OPERATORS[kind](0.05 if kind == "denoising" else 0.0)
    y = measure(op, images())
    first = build(name, prior_dir, steps=3, seed=1, ratio=0.3)(y, op)
    again = build(name, prior_dir, steps=3, seed=1)(y, op)
    other = build(name, prior_dir, steps=3, seed=2)(y, op)
    assert first.shape == (2, 1, *op.domain_size) and bool(torch.isfinite(first).all())
    assert torch.equal(first, again)
    if name in ("ddnm", "diffuserecon") and kind == "denoising":  # A = I has no null space: both return y
        torch.testing.assert_close(first, y, atol=1e-5, rtol=0)
    else:
        assert not torch.allclose(first, other)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_bad_options_are_rejected(prior_dir: str, name: str) -> None:
    with pytest.raises(IDMError, match="no option"):
        build(name, prior_dir, temperature=1.0)
    with pytest.raises(IDMError, match="steps must be of type int"):
        build(name, prior_dir, steps="5")
    with pytest.raises(IDMError, match="steps"):
        build(name, prior_dir, steps=0)
    with pytest.raises(IDMError, match="exceed"):
        build(name, prior_dir, steps=1001)
    with pytest.raises(IDMError, match="not found"):
        get_method(name).build(checkpoint=prior_dir + "-missing")


def test_option_ranges(prior_dir: str) -> None:
    with pytest.raises(IDMError, match="eta"):
        build("ddnm", prior_dir, eta=1.5)
    with pytest.raises(IDMError, match="zeta"):
        build("dps", prior_dir, zeta=-1.0)
    with pytest.raises(IDMError, match="travel_length"):
        build("ddnm", prior_dir, travel_length=2)  # time travel is a DDNM+ option
    with pytest.raises(IDMError, match="clip must be of type bool"):
        build("dps", prior_dir, clip=1)


def test_bad_measurements_are_rejected(prior_dir: str) -> None:
    op = OPERATORS["inpainting"]()
    reconstruct = build("ddnm", prior_dir, steps=2)
    y = measure(op, images(1))
    with pytest.raises(IDMError, match="channel"):
        reconstruct(y.repeat(1, 2, 1, 1), op)
    with pytest.raises(IDMError, match="NaN"):
        reconstruct(torch.full_like(y, float("nan")), op)
    with pytest.raises(IDMError, match="do not match"):
        reconstruct(y[..., :-1], op)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_complex_mri_measurements_give_complex_images(prior_dir: str, name: str) -> None:
    """MRI k-space: the solvers run on [Re, Im] through the 1-channel prior and return complex
    images; DDNM's fit the measurements exactly, DPS's guidance lowers the misfit."""
    op = MRI(SIZE, acceleration=2, center_fraction=0.2, seed=0)
    x = torch.complex(images(), 0.3 * images().flip(-1) - 0.1)
    y = op.A(x)
    with torch.no_grad():
        out = build(name, prior_dir, steps=6)(y, op)
    assert out.dtype == torch.complex64 and out.shape == (2, 1, *SIZE)
    if name == "dps":
        with torch.no_grad():
            free = build(name, prior_dir, steps=6, zeta=0.0)(y, op)
        assert float((op.A(out) - y).norm()) < float((op.A(free) - y).norm())
    else:
        torch.testing.assert_close(op.A(out), y, atol=1e-4, rtol=0)
    with pytest.raises(IDMError, match="NaN"):
        build(name, prior_dir, steps=2)(torch.full_like(y, float("nan")), op)


# --- DiffuseRecon ----------------------------------------------------------------------------------
def test_diffuserecon_fits_the_measured_kspace_and_gives_an_uncertainty(prior_dir: str) -> None:
    """The final output equals the measurement on the sampled k-space locations; the std is the
    magnitude's across K samples (0 for K = 1); a seed fixes everything."""
    op = MRI(SIZE, acceleration=2, center_fraction=0.2, seed=0)
    x = torch.complex(images(), 0.3 * images().flip(-1) - 0.1)
    y = op.A(x)
    method = build("diffuserecon", prior_dir, samples=3, steps=4, refine=2)
    post = method.with_uncertainty(y, op)
    assert post.x.dtype == torch.complex64 and post.x.shape == (2, 1, *SIZE) and post.std.shape == (2, 1, *SIZE)
    assert float((op.A(post.x) - y).abs().max()) <= 1e-5 * float(y.abs().max())
    assert float(post.std.min()) >= 0 and float(post.std.max()) > 0
    torch.testing.assert_close(method(y, op), post.x)  # the plain call returns the reconstruction
    again = build("diffuserecon", prior_dir, samples=3, steps=4, refine=2).with_uncertainty(y, op)
    assert torch.equal(again.x, post.x) and torch.equal(again.std, post.std)
    other = build("diffuserecon", prior_dir, samples=3, steps=4, refine=2, seed=5).with_uncertainty(y, op)
    assert not torch.equal(other.x, post.x)
    single = build("diffuserecon", prior_dir, samples=1, steps=4, refine=0).with_uncertainty(y, op)
    assert not single.std.any()
    with pytest.raises(IDMError, match="gives no uncertainty"):
        build("ddnm", prior_dir, steps=2).with_uncertainty(y, op)
    with pytest.raises(IDMError, match="samples must lie in"):
        build("diffuserecon", prior_dir, samples=0)
    with pytest.raises(IDMError, match="do not match"):  # k-space of another shape than the mask's
        method.with_uncertainty(y[..., :-1], op)


def test_diffuserecon_on_a_real_operator(prior_dir: str) -> None:
    op = OPERATORS["inpainting"]()
    y = measure(op, images())
    for start_level in (0.0, 0.5):  # from pure noise, or from the diffused zero-filled image
        post = build("diffuserecon", prior_dir, samples=2, steps=3, refine=1, start_level=start_level).with_uncertainty(y, op)
        assert post.x.shape == post.std.shape == (2, 1, *op.domain_size)
        torch.testing.assert_close(op.A(post.x), y, atol=1e-4, rtol=0)


def test_reconstruct_cli_writes_the_uncertainty(prior_dir: str, tmp_path, capsys) -> None:
    """`idm reconstruct --method diffuserecon --uncertainty FILE` writes the std beside the image
    (raw in .npy / NIfTI); methods without one fail in one line and write nothing."""
    pytest.importorskip("nibabel")
    import nibabel
    import numpy as np

    from idm.cli import main
    from idm.data import save_image

    image = tmp_path / "x.png"
    save_image(image, images(1, (16, 16))[0])
    options = ["--operator", "mri", "--acceleration", "2", "--method", "diffuserecon", "--checkpoint", prior_dir,
               "--option", "samples=3", "--option", "steps=3", "--option", "refine=1"]
    code = main(["reconstruct", str(image), *options, "-o", str(tmp_path / "x.npy"), "--uncertainty", str(tmp_path / "std.nii.gz")])
    assert code == 0, capsys.readouterr().err
    x, std = np.load(tmp_path / "x.npy"), np.asarray(nibabel.load(tmp_path / "std.nii.gz").dataobj)
    assert x.shape == std.shape == (16, 16) and np.iscomplexobj(x) and std.min() >= 0 and std.max() > 0
    code = main(["reconstruct", str(image), *options, "-o", str(tmp_path / "y.png"), "--uncertainty", str(tmp_path / "std.png")])
    assert code == 0 and (tmp_path / "std.png").exists()
    capsys.readouterr()
    code = main(["reconstruct", str(image), "--operator", "mri", "--acceleration", "2", "--method", "tv", "-o", str(tmp_path / "t.png"),
                 "--uncertainty", str(tmp_path / "t-std.npy")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "gives no uncertainty" in err
    assert not (tmp_path / "t.png").exists() and not (tmp_path / "t-std.npy").exists()
    for extra, message in ((["-o", str(tmp_path / "s.npy"), "--uncertainty", str(tmp_path / "s.npy")], "would overwrite"),
                           (["-o", str(tmp_path / "s.npy"), "--option", "seed=3"], "--option seed is set by the command")):
        code = main(["reconstruct", str(image), *options, *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "s.npy").exists()


def test_bench_uncertainty_scores_the_std(prior_dir: str, tmp_path, capsys) -> None:
    """`idm bench uncertainty`: per-image Spearman(std, |error|), a pooled calibration curve, JSON and
    figure; a method without uncertainty fails in one line."""
    import json

    import numpy as np

    from idm.cli import main

    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        np.save(data / f"s{i}.npy", images(1, (16, 16))[0, 0].numpy() / (1 + i))
    base = ["bench", "uncertainty", "--data", str(data), "--operator", "mri", "--acceleration", "2",
            "--checkpoint", prior_dir, "--option", "samples=3", "--option", "steps=3", "--option", "refine=1"]
    assert main([*base, "--bins", "4", "--json", str(tmp_path / "u.json"), "--figure", str(tmp_path / "u.png")]) == 0
    result = json.loads((tmp_path / "u.json").read_text())
    assert [r["name"] for r in result["images"]] == ["s0", "s1"] and len(result["calibration"]) == 4
    assert all(-1 <= r["spearman"] <= 1 for r in result["images"]) and -1 <= result["spearman_pooled"] <= 1
    assert sum(r["pixels"] for r in result["calibration"]) == 2 * 16 * 16
    assert (tmp_path / "u.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main(["bench", "uncertainty", "--data", str(data), "--operator", "mri", "--acceleration", "2",
                 "--method", "tv", "--json", str(tmp_path / "never.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "gives no uncertainty" in err and not (tmp_path / "never.json").exists()


def test_spearman_and_calibration_curve() -> None:
    from idm.metrics import calibration_curve, spearman

    a = torch.tensor([1.0, 2.0, 2.0, 3.0, 5.0])
    assert spearman(a, a * 10) == pytest.approx(1.0) and spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a, torch.tensor([1.0, 3.0, 2.0, 4.0, 5.0])) == pytest.approx(0.9746794344808963)  # scipy's, with ties
    assert math.isnan(spearman(a, torch.ones(5)))
    curve = calibration_curve(torch.arange(6.0), torch.tensor([0.0, 0.0, 3.0, 3.0, 4.0, 4.0]), bins=3)
    assert [r["pixels"] for r in curve] == [2, 2, 2] and [r["rmse"] for r in curve] == [0.0, 3.0, 4.0]
    with pytest.raises(IDMError, match="same size"):
        spearman(a, a[:3])


def test_complex_parts_fold_keeps_real_and_imaginary_parts_apart() -> None:
    """Two-channel complex images through a two-channel model: the model sees [Re₁, Re₂] and
    [Im₁, Im₂] (not [Re₁, Im₁]), and its output goes back to the interleaved layout."""
    from idm.zeroshot.method import fold_parts

    x = torch.tensor([1.0, 10.0, 2.0, 20.0]).view(1, 4, 1, 1)  # [Re₁, Im₁, Re₂, Im₂]
    seen = []

    def model(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(z.flatten(1).tolist())
        return z * torch.tensor([1.0, 3.0]).view(1, 2, 1, 1)  # channel 2 of each part × 3

    out = fold_parts(model)(x, torch.zeros(1, dtype=torch.long))
    assert seen == [[[1.0, 2.0], [10.0, 20.0]]]
    assert out.flatten().tolist() == [1.0, 10.0, 6.0, 60.0]


def test_diffuserecon_starts_a_denoiser_prior_at_its_largest_sigma() -> None:
    """A Gaussian-denoiser prior cannot start from pure noise: start_level 0 means its sigma_max."""
    op = MRI((16, 16), acceleration=2, center_fraction=0.25, seed=0)
    y = op.A(torch.complex(images(1, (16, 16)), torch.zeros(1, 1, 16, 16)))
    options = {"samples": 2, "steps": 2, "refine": 0}
    default = build("diffuserecon", "dncnn-6", **options).with_uncertainty(y, op)
    explicit = build("diffuserecon", "dncnn-6", start_level=0.4, **options).with_uncertainty(y, op)  # 2 × σ_max 0.2
    assert torch.equal(default.x, explicit.x) and torch.equal(default.std, explicit.std)
