"""LMI-guided translation (``idm.medical.translate``, ``idm translate``, ``idm bench translation``):
SDEdit as the unguided special case, seeding, any size, the guidance raising LMI, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from idm.cli import main
from idm.errors import IDMError
from idm.medical.lmi import LocalMutualInformation
from idm.medical.translate import (contrast_candidates, contrast_map, foreground, histogram_match, interior,
                                   prior_energy, sample_translation, translate)
from idm.priors.samplers import sample_ddim
from idm.priors.schedule import to_model_range

from conftest import tiny_prior, tiny_unet_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prior():
    return tiny_prior(tiny_unet_config(), seed=3)


@pytest.fixture(scope="module")
def prior_dir(prior, tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("translate") / "prior"
    prior.save(directory, "# tiny test prior", dtype=None)
    return str(directory)


def brain_like(height: int = 24, width: int = 20, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    disc = ((x**2 + y**2) < 0.7).float() * (0.5 + 0.3 * torch.cos(5 * x) * torch.sin(4 * y))
    return (disc + 0.05 * torch.rand(height, width, generator=g)).clamp(0, 1)[None, None]


def test_without_guidance_it_is_sdedit_the_priors_ddim_from_the_noised_source(prior) -> None:
    source = brain_like()
    ours = sample_translation(prior, source, prior.schedule, steps=6, start=0.5, scale=0.0, init="source",
                              generator=torch.Generator().manual_seed(4))
    first = round(0.5 * (prior.schedule.num_steps - 1))
    abar = float(prior.schedule.alphas_cumprod[first])
    noise = torch.randn(source.shape, generator=torch.Generator().manual_seed(4))
    x_t = abar**0.5 * to_model_range(source) + (1 - abar) ** 0.5 * noise
    reference = (sample_ddim(prior, x_t, prior.schedule, 6, t_start=first) + 1) / 2
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_translation_is_seeded_and_keeps_any_size(prior) -> None:
    source = brain_like(23, 17)  # odd sizes: the state is padded to the U-Net's multiple
    a = translate(source, prior, seed=1, steps=3, scale=0.05, eta=1.0)
    b = translate(source, prior, seed=1, steps=3, scale=0.05, eta=1.0)
    c = translate(source, prior, seed=2, steps=3, scale=0.05, eta=1.0)
    assert a.shape == source.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    assert translate(source[0, 0], prior, seed=1, steps=3).shape == (23, 17)


def test_the_guidance_step_climbs_the_local_mutual_information(prior) -> None:
    """One normalised LMI step on x̂₀ (the canvas, prior range) raises LMI with the source; a guided
    run differs from the unguided one."""
    from idm.medical.translate import lmi_ascent
    from idm.physics.canvas import Canvas

    source = brain_like(30, 22)
    canvas = Canvas.to_multiple((30, 22), 4)
    x0 = torch.rand((1, 1, *canvas.size), generator=torch.Generator().manual_seed(0)) - 0.5
    lmi = LocalMutualInformation()
    before = float(lmi(source, (canvas.crop(x0) + 1) / 2).mean())
    after = float(lmi(source, (canvas.crop(lmi_ascent(x0, source, canvas, lmi, 0.002)) + 1) / 2).mean())
    assert after > before + 0.01
    plain = translate(source, prior, seed=0, steps=3, start=0.8, scale=0.0)
    assert not torch.equal(plain, translate(source, prior, seed=0, steps=3, start=0.8, scale=0.01))


@pytest.mark.parametrize("source, options, message", [
    (torch.rand(1, 2, 8, 8), {}, "channel"),
    (torch.full((1, 1, 8, 8), float("nan")), {}, "NaN"),
    (torch.rand(1, 1, 8, 8) * 3, {}, r"\[0, 1\]"),
    (torch.rand(2, 1, 1, 8, 8), {}, "shape"),
    (torch.rand(1, 1, 0, 8), {}, "empty"),
    (torch.rand(1, 1, 8, 8), {"eta": 2.0}, "eta"),
    (torch.rand(1, 1, 8, 8), {"start": 0.0}, "start"),
    (torch.rand(1, 1, 8, 8), {"scale": -1.0}, "scale"),
    (torch.rand(1, 1, 8, 8), {"strength": 1.0}, "no option"),
    (torch.rand(1, 1, 8, 8), {"init": "noise"}, "init"),
])
def test_bad_translation_inputs_give_one_line_errors(prior, source, options, message) -> None:
    with pytest.raises(IDMError, match=message):
        translate(source, prior, steps=2, **options)


def test_cli_translates_a_slice_and_scores_it(prior_dir: str, tmp_path: Path, capsys) -> None:
    source, truth = tmp_path / "t1.npy", tmp_path / "t2.npy"
    np.save(source, brain_like(20, 16)[0, 0].numpy())
    np.save(truth, (1 - brain_like(20, 16))[0, 0].numpy())
    out = tmp_path / "out" / "t2-hat.npy"
    assert main(["translate", str(source), "--prior", prior_dir, "-o", str(out), "--truth", str(truth),
                 "--steps", "2", "--no-progress"]) == 0
    report = capsys.readouterr().out
    assert "PSNR" in report and "MI" in report and np.load(out).shape == (20, 16)


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "steps"),
    (["-o", "OUT.txt"], "output must be"),
    (["--truth", "SMALL"], "truth"),
])
def test_cli_rejects_bad_translation_requests(prior_dir: str, tmp_path: Path, argv, message, capsys) -> None:
    source = tmp_path / "t1.npy"
    np.save(source, brain_like(20, 16)[0, 0].numpy())
    np.save(tmp_path / "small.npy", np.zeros((8, 8), dtype=np.float32))
    argv = [str(tmp_path / "small.npy") if a == "SMALL" else str(tmp_path / a) if a == "OUT.txt" else a for a in argv]
    output = [] if "-o" in argv else ["-o", str(tmp_path / "never.png")]
    assert main(["translate", str(source), "--prior", prior_dir, *output, *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "never.png").exists()


def test_translation_bench_scores_every_method(prior_dir: str, tmp_path: Path, capsys) -> None:
    data, reference = tmp_path / "pairs", tmp_path / "reference"
    data.mkdir(), reference.mkdir()
    for k in range(2):
        np.save(data / f"case_{k}_t1_w.npy", brain_like(20, 16, seed=k)[0, 0].numpy())
        np.save(data / f"case_{k}_t2_w.npy", (1 - brain_like(20, 16, seed=k))[0, 0].numpy())
    np.save(data / "case_0_t1ce_w.npy", brain_like(20, 16)[0, 0].numpy())  # another contrast: not a source
    from idm.data import save_image

    save_image(reference / "a.png", 1 - brain_like(20, 16, seed=5)[0])
    out = tmp_path / "bench.json"
    assert main(["bench", "translation", "--data", str(data), "--reference", str(reference), "--prior", prior_dir,
                 "--steps", "2", "--json", str(out), "--figure", str(tmp_path / "f.png")]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["translate", "sdedit", "unguided", "contrast", "histogram"]
    assert all(len(r["images"]) == 2 and {"psnr", "ssim", "mi"} <= set(r) for r in rows)
    assert (tmp_path / "f.png").stat().st_size > 0
    assert main(["bench", "translation", "--data", str(data), "--prior", prior_dir, "--methods", "histogram"]) == 2
    assert "--reference" in capsys.readouterr().err
    assert main(["bench", "translation", "--data", str(data), "--methods", "sdedit", "--prior", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.startswith("error:")



def test_translation_bench_without_reference_matches_translate_on_the_priors_own_histogram(prior, prior_dir: str,
                                                                                          tmp_path: Path) -> None:
    """Without --reference the bench draws the prior's reference samples once per size and shares them;
    the scores are those of ``translate`` drawing them itself."""
    from idm.metrics import psnr

    data = tmp_path / "pairs"
    data.mkdir()
    for k in range(2):
        np.save(data / f"case_{k}_t1_w.npy", brain_like(20, 16, seed=k)[0, 0].numpy())
        np.save(data / f"case_{k}_t2_w.npy", (1 - brain_like(20, 16, seed=k))[0, 0].numpy())
    out = tmp_path / "bench.json"
    assert main(["bench", "translation", "--data", str(data), "--prior", prior_dir, "--steps", "2",
                 "--methods", "translate", "contrast", "--json", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    for k, image in enumerate(rows["translate"]["images"]):
        own = translate(brain_like(20, 16, seed=k)[0], prior, steps=2, seed=0).clamp(0, 1)
        expected = float(psnr(own[None], (1 - brain_like(20, 16, seed=k))[0][None])[0])
        assert image["psnr"] == pytest.approx(expected, abs=1e-4)

# --- the contrast map ------------------------------------------------------------------------------
class DiracPrior:
    """The exact ε-predictor of a prior whose every image is ``mode`` (B, 1, H, W) on [0, 1]:
    ε̂ = (x_t − √ᾱ_t · mode) / √(1 − ᾱ_t); its denoising loss is 0 at ``mode`` only."""

    def __init__(self, mode: torch.Tensor, schedule) -> None:
        self.mode, self.schedule = to_model_range(mode), schedule

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = self.schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
        mode = torch.nn.functional.pad(self.mode, (0, x.shape[-1] - self.mode.shape[-1], 0, x.shape[-2] - self.mode.shape[-2]),
                                       value=-1.0)
        return (x - abar.sqrt() * mode) / (1 - abar).sqrt()


def test_contrast_candidates_reorder_the_tissue_classes_and_match_the_histogram() -> None:
    source = brain_like(30, 26)[0, 0]
    reference = np.linspace(0.1, 0.9, 500)
    labels, candidates = contrast_candidates(source, reference, classes=3)
    assert len(labels) == len(set(labels)) == 12 and candidates.shape == (12, 1, 30, 26)
    inside = torch.from_numpy(foreground(source.numpy()))
    assert torch.all(candidates[:, 0][:, ~inside] == 0)  # the background stays black
    plain, inverted = candidates[labels.index("0-1-2+"), 0], candidates[labels.index("2-1-0-"), 0]
    torch.testing.assert_close(plain, histogram_match(source, reference))
    values, up, down = source[inside], plain[inside], inverted[inside]
    order = torch.argsort(values)
    assert torch.all(torch.diff(up[order]) >= 0) and torch.all(torch.diff(down[order]) <= 0)
    with pytest.raises(IDMError, match="distinct"):
        contrast_candidates(torch.full((8, 8), 0.5), reference)


def test_prior_energy_is_lowest_where_the_prior_puts_its_mass(prior) -> None:
    mode = 1 - brain_like(20, 16)
    dirac = DiracPrior(mode, prior.schedule)
    images = torch.cat([mode, brain_like(20, 16), torch.rand(1, 1, 20, 16)])
    energy = prior_energy(dirac, images, prior.schedule, size_multiple=8, generator=torch.Generator().manual_seed(0))
    assert energy.shape == (3,) and float(energy[0]) < 1e-8 < float(energy[1:].min())
    again = prior_energy(dirac, images, prior.schedule, size_multiple=8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(energy, again)
    # a mask scores only its pixels: where the image equals the mode there, the energy is 0
    wrong_outside = mode.clone()
    wrong_outside[..., :, :8] = 0.3
    mask = torch.zeros(20, 16, dtype=torch.bool)
    mask[:, 8:] = True
    masked = prior_energy(dirac, wrong_outside, prior.schedule, size_multiple=8, mask=mask,
                          generator=torch.Generator().manual_seed(0))
    assert float(masked[0]) < 1e-8 < float(prior_energy(dirac, wrong_outside, prior.schedule, size_multiple=8)[0])
    with pytest.raises(IDMError, match="mask"):
        prior_energy(dirac, images, prior.schedule, size_multiple=8, mask=torch.zeros(20, 16))


def test_foreground_fills_holes_but_not_the_background() -> None:
    image = np.full((2, 1, 12, 12), 0.03)  # a noise floor below FOREGROUND_FLOOR
    image[:, :, 2:10, 2:10] = 0.5
    image[:, :, 5, 5] = 0.0  # a clipped pixel inside the brain
    image[1, :, 2:10, 2] = 0.0  # a notch open to the background stays background
    inside = foreground(image)
    assert inside.shape == image.shape and bool(inside[0, 0, 5, 5]) and bool(inside[1, 0, 5, 5])
    assert int(inside[0].sum()) == 64 and int(inside[1].sum()) == 56 and not inside[..., 0, :].any()
    with pytest.raises(IDMError, match="2-D"):
        foreground(np.ones(5))


def test_interior_is_the_eroded_foreground_with_fallbacks() -> None:
    image = torch.zeros(21, 21)
    image[2:19, 2:19] = 0.5
    inner = interior(image, radius=4)
    assert inner.dtype == torch.bool and int(inner.sum()) == 9 * 9 and bool(inner[10, 10]) and not bool(inner[5, 10])
    small = torch.zeros(21, 21)
    small[10, 10] = 0.5
    assert interior(small, radius=4).sum() == 1  # erosion leaves nothing: the foreground itself
    assert bool(interior(torch.zeros(5, 5)).all())  # no foreground: every pixel


def test_contrast_map_takes_the_candidate_the_prior_prefers(prior) -> None:
    source = brain_like(30, 26)
    reference = np.linspace(0.1, 0.9, 500)
    labels, candidates = contrast_candidates(source[0, 0], reference)
    for label in ("2-1-0-", "1-0-2+"):
        dirac = DiracPrior(candidates[labels.index(label)][None], prior.schedule)
        mapped, chosen = contrast_map(dirac, source, reference, prior.schedule, size_multiple=8,
                                      generator=torch.Generator().manual_seed(0))
        assert chosen == [label]
        torch.testing.assert_close(mapped[0], candidates[labels.index(label)])
    with pytest.raises(IDMError, match="one-channel"):
        contrast_map(dirac, torch.rand(1, 2, 8, 8), reference, prior.schedule)


def test_contrast_start_is_seeded_and_needs_a_reference(prior) -> None:
    source = brain_like(23, 17)
    reference = np.linspace(0.1, 0.9, 500)
    a = translate(source, prior, seed=1, steps=2, start=0.2, init="contrast", reference=reference)
    b = translate(source, prior, seed=1, steps=2, start=0.2, init="contrast", reference=reference)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(a, translate(source, prior, seed=1, steps=2, start=0.2))
    assert translate(source, prior, seed=1, steps=2, init="contrast").shape == source.shape  # the prior's own histogram
    with pytest.raises(IDMError, match="reference"):
        sample_translation(prior, source, prior.schedule, steps=2, init="contrast")


def test_cli_translates_from_the_contrast_map(prior_dir: str, tmp_path: Path, capsys) -> None:
    from idm.data import save_image

    source, reference = tmp_path / "t1.npy", tmp_path / "ref"
    reference.mkdir()
    save_image(reference / "a.png", 1 - brain_like(20, 16, seed=5)[0])
    np.save(source, brain_like(20, 16)[0, 0].numpy())
    out = tmp_path / "t2-hat.npy"
    assert main(["translate", str(source), "--prior", prior_dir, "-o", str(out), "--init", "contrast",
                 "--reference", str(reference), "--steps", "2", "--start", "0.1", "--no-progress"]) == 0
    assert np.load(out).shape == (20, 16)
    assert main(["translate", str(source), "--prior", prior_dir, "-o", str(out), "--init", "contrast",
                 "--reference", str(tmp_path / "missing"), "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith("error: no reference images")
