"""The checkpoints shipped in ``checkpoints/``: each loads by name, matches its name's ratio, carries a
model card with its provenance, and reconstructs a sample image far better than A†y. One case per
folder found, so a new checkpoint is covered when added."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from idm.data.samples import sample_images
from idm.metrics import psnr
from idm.physics import BlockCS
from idm.registry import get_method

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
#: (folder name, method family, sampling ratio) of every shipped reconstructor, e.g. ("idm-cs10", "idm", 0.1)
RECONSTRUCTORS = sorted(
    (m[0], m[1], int(m[2]) / 100)
    for m in (re.fullmatch(r"(idm|unrolled)-cs(\d+)", p.name) for p in CHECKPOINTS.iterdir()) if m
)
#: multi-ratio IDM checkpoints (``idm-<anything>`` with a ratio range) and the ratios each is tested at
MULTI_RATIO = sorted(
    (p.name, json.loads((p / "config.json").read_text())["ratio_range"]) for p in CHECKPOINTS.iterdir()
    if p.name.startswith("idm-") and (p / "config.json").is_file()
    and json.loads((p / "config.json").read_text()).get("ratio_range") is not None
)
#: converted denoisers (not trained by us): provenance and licence instead of a training record
DENOISERS = sorted(p.name for p in CHECKPOINTS.iterdir() if p.name.startswith("dncnn-"))
#: what every model card states (issue: data, command, steps, batch, hardware, wall time, metrics)
CARD_FIELDS = ("Train400", "Command", "steps x batch", "hardware", "wall time", "BSD68", "Set12")


def test_the_shipped_reconstructors_are_found() -> None:
    assert {"unrolled-cs10", "unrolled-cs30", "unrolled-cs50"} <= {name for name, _, _ in RECONSTRUCTORS}


@pytest.mark.parametrize(("name", "family", "ratio"), RECONSTRUCTORS)
def test_shipped_checkpoint_config_and_card(name: str, family: str, ratio: float) -> None:
    config = json.loads((CHECKPOINTS / name / "config.json").read_text())
    assert config["architecture"] == family
    assert config["ratio"] == pytest.approx(ratio)
    assert config["block_size"] == 32 and config["operator"] == "blockcs"
    card = (CHECKPOINTS / name / "README.md").read_text()
    missing = [field for field in CARD_FIELDS if field not in card]
    assert not missing, f"model card of {name} lacks {missing}"
    weights = CHECKPOINTS / name / "model.safetensors"
    assert weights.stat().st_size < 10 * 2**20  # compact (fp16)


@pytest.mark.parametrize(("name", "family", "ratio"), RECONSTRUCTORS)
def test_shipped_checkpoint_reconstructs_a_sample_image(name: str, family: str, ratio: float) -> None:
    x = sample_images(64)["camera"][None]  # (1, 1, 64, 64) in [0, 1]
    op = BlockCS((64, 64), ratio, seed=3)
    y = op.A(x)
    reconstruct = get_method(family).build(ratio=ratio)  # picks the shipped checkpoint by ratio
    estimate = reconstruct(y, op)
    assert estimate.shape == x.shape and bool(torch.isfinite(estimate).all())
    baseline = float(psnr(op.A_dagger(y).clamp(0, 1), x)[0])
    assert float(psnr(estimate.clamp(0, 1), x)[0]) > baseline + 5


@pytest.mark.parametrize(("name", "band"), MULTI_RATIO)
def test_shipped_multi_ratio_checkpoint(name: str, band: list[float]) -> None:
    config = json.loads((CHECKPOINTS / name / "config.json").read_text())
    assert config["ratio"] is None and config["block_size"] == 32 and config["operator"] == "blockcs"
    card = (CHECKPOINTS / name / "README.md").read_text()
    missing = [field for field in CARD_FIELDS if field not in card]
    assert not missing, f"model card of {name} lacks {missing}"
    assert (CHECKPOINTS / name / "model.safetensors").stat().st_size < 10 * 2**20
    x = sample_images(64)["camera"][None]
    for ratio in (band[0], 0.2, band[1]):
        op = BlockCS((64, 64), ratio, seed=3)
        y = op.A(x)
        estimate = get_method("idm").build(checkpoint=name, ratio=ratio)(y, op)
        assert float(psnr(estimate.clamp(0, 1), x)[0]) > float(psnr(op.A_dagger(y).clamp(0, 1), x)[0]) + 5


@pytest.mark.parametrize("name", DENOISERS)
def test_shipped_denoiser_card(name: str) -> None:
    config = json.loads((CHECKPOINTS / name / "config.json").read_text())
    assert config["architecture"] == "dncnn" and config["provenance"]["license"] == "BSD-3-Clause"
    assert {"Set12", "BSD68"} <= set(config["denoising_psnr"])
    card = (CHECKPOINTS / name / "README.md").read_text()
    for field in ("Provenance", "BSD-3-Clause", "Redistribution and use", "Set12", "BSD68", "sha256"):
        assert field in card, f"model card of {name} lacks {field!r}"


#: IDM checkpoints for MRI / CT (no sampling ratio): ``idm-mri``, ``idm-ct``
MEDICAL = sorted(p.name for p in CHECKPOINTS.iterdir() if p.name in ("idm-mri", "idm-ct"))
#: what their model cards state (data, commands, steps, hardware, wall time, held-out metrics)
MEDICAL_CARD_FIELDS = ("train.medical_slices", "Command", "steps x batch", "hardware", "wall time", "## Measured",
                       "held-out", "not")


def test_the_medical_checkpoints_are_found() -> None:
    assert MEDICAL == ["idm-ct", "idm-mri"]


@pytest.mark.parametrize("name", MEDICAL)
def test_shipped_medical_checkpoint_card_and_reconstruction(name: str) -> None:
    from idm.evaluation import magnitude_scores, operator_factory

    config = json.loads((CHECKPOINTS / name / "config.json").read_text())
    kind = name.removeprefix("idm-")
    assert config["architecture"] == "idm" and config["operator"] == kind and config["ratio"] is None
    assert config["idm"]["complex"] == (kind == "mri") and "trained_operator" in config
    card = (CHECKPOINTS / name / "README.md").read_text()
    missing = [field for field in MEDICAL_CARD_FIELDS if field.lower() not in card.lower()]
    assert not missing, f"model card of {name} lacks {missing}"
    assert (CHECKPOINTS / name / "model.safetensors").stat().st_size < 10 * 2**20
    x = sample_images(64)["camera"][None]
    op = operator_factory(kind, **({"acceleration": 4} if kind == "mri" else {"views": 23}))((64, 64), 3)
    y = op.A(x)
    with torch.no_grad():
        estimate = get_method("idm").build()(y, op)  # picks idm-<kind> from the operator
        baseline = op.A_dagger(y) if kind == "mri" else op.fbp(y)
    assert estimate.shape == x.shape and estimate.is_complex() == (kind == "mri")
    gain = float(magnitude_scores(estimate, x)[0][0]) - float(magnitude_scores(baseline, x)[0][0])
    assert gain > (1.0 if kind == "mri" else 4.0), f"{name}: only {gain:.2f} dB above the direct inverse"


#: denoiser priors trained here on medical slices (``idm pretrain --arch dncnn``), ``pnp``'s MRI / CT default
MEDICAL_PRIORS = ("prior-ct", "prior-mri")


@pytest.mark.parametrize("name", MEDICAL_PRIORS)
def test_shipped_medical_prior_card_and_pnp_default(name: str) -> None:
    from idm.evaluation import operator_factory

    config = json.loads((CHECKPOINTS / name / "config.json").read_text())
    assert config["architecture"] == "dncnn" and config["training"]["init"] == "dncnn-6"
    assert {"sigma15", "sigma25", "sigma50"} <= set(config["denoising"])
    card = (CHECKPOINTS / name / "README.md").read_text()
    missing = [field for field in MEDICAL_CARD_FIELDS if field.lower() not in card.lower()]
    assert not missing, f"model card of {name} lacks {missing}"
    assert (CHECKPOINTS / name / "model.safetensors").stat().st_size < 2**20
    kind = name.removeprefix("prior-")
    x = sample_images(32)["camera"][None]
    op = operator_factory(kind, **({"acceleration": 4} if kind == "mri" else {"views": 12}))((32, 32), 1)
    y = op.A(x)
    default = get_method("pnp").build(iterations=2)(y, op)  # picks prior-<kind> from the operator
    torch.testing.assert_close(default, get_method("pnp").build(checkpoint=name, iterations=2)(y, op))
    assert not torch.equal(default, get_method("pnp").build(checkpoint="dncnn-17", iterations=2)(y, op))


def test_shipped_mcddpm_card_and_reconstruction() -> None:
    """``mcddpm-mri`` (``idm pretrain --conditional mri``), the default of the method ``mcddpm``."""
    from idm.evaluation import operator_factory

    config = json.loads((CHECKPOINTS / "mcddpm-mri" / "config.json").read_text())
    assert config["architecture"] == "mcddpm" and config["prediction"] == "x0" and config["data_scale"] == 0.1
    assert config["accelerations"] == [4.0, 8.0] and len(config["validation"]) == 2
    card = (CHECKPOINTS / "mcddpm-mri" / "README.md").read_text()
    fields = ("Command", "steps x batch", "hardware", "wall time", "Validation", "## Measured", "held-out")
    missing = [field for field in fields if field.lower() not in card.lower()]
    assert not missing, f"model card of mcddpm-mri lacks {missing}"
    assert (CHECKPOINTS / "mcddpm-mri" / "model.safetensors").stat().st_size < 4 * 2**20
    x = sample_images(32)["camera"][None]
    op = operator_factory("mri", acceleration=4)((32, 32), 0)
    y = op.A(x)
    posterior = get_method("mcddpm").build(samples=2, steps=3).with_uncertainty(y, op)
    assert float((op.A(posterior.x) - y).abs().max()) <= 1e-4 * float(y.abs().max())
    assert posterior.std.shape == x.shape and float(posterior.std.max()) > 0


def test_shipped_anomaly_checkpoints_cards_and_defaults() -> None:
    """``ddpm-brats4`` + ``classifier-brats4``, the defaults of ``idm anomaly``: cards say the data size and
    the measured use, both load by name, and they map a small scan (few steps) to a finite, non-negative map."""
    from idm.cli import build_parser
    from idm.medical.anomaly import anomaly_map
    from idm.priors.prior import load_prior
    from idm.training.classifier import load_classifier

    for name in ("ddpm-brats4", "classifier-brats4"):
        card = (CHECKPOINTS / name / "README.md").read_text()
        missing = [field for field in ("Command", "hardware", "wall time", "one", "held-out", "Dice", "AUROC")
                   if field.lower() not in card.lower()]
        assert not missing, f"model card of {name} lacks {missing}"
        assert (CHECKPOINTS / name / "model.safetensors").stat().st_size < 4 * 2**20
    args = build_parser("anomaly").parse_args(["anomaly", "scan.npy", "-o", "map.npy"])
    assert (args.prior, args.classifier) == ("ddpm-brats4", "classifier-brats4")
    prior, classifier = load_prior(args.prior), load_classifier(args.classifier)
    assert prior.channels == 4
    scan = torch.rand(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        amap, _ = anomaly_map(prior, classifier, scan, prior.schedule, level=100, steps=2, scale=100.0,
                              size_multiple=prior.size_multiple, progress=False)
    assert amap.shape == (1, 32, 32) and bool(torch.isfinite(amap).all()) and float(amap.min()) >= 0


def test_shipped_t2_prior_card_and_translation_default() -> None:
    """``prior-t2``, the default of ``idm translate`` / ``idm bench translation``: the card says the data
    size and the held-out measure; it loads by name and translates a small brain-like image by default."""
    from idm.cli import build_parser
    from idm.medical.translate import translate
    from idm.priors.prior import load_prior

    card = (CHECKPOINTS / "prior-t2" / "README.md").read_text()
    missing = [field for field in ("Command", "hardware", "wall time", "31 slices", "held-out", "SSIM", "histogram")
               if field.lower() not in card.lower()]
    assert not missing, f"model card of prior-t2 lacks {missing}"
    assert (CHECKPOINTS / "prior-t2" / "model.safetensors").stat().st_size < 3 * 2**20
    args = build_parser("translate").parse_args(["translate", "t1.npy", "-o", "t2.npy"])
    assert args.prior == "prior-t2" and args.init == "contrast"
    prior = load_prior("prior-t2")
    y, x = torch.meshgrid(torch.linspace(-1, 1, 40), torch.linspace(-1, 1, 36), indexing="ij")
    source = ((x**2 + y**2) < 0.6).float() * (0.4 + 0.4 * (x**2 + y**2 > 0.1).float() + 0.1 * torch.cos(6 * x))
    out = translate(source, prior, seed=0)
    assert out.shape == source.shape and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("name", ["ddm-brain", "vm-brain"])
def test_shipped_registration_checkpoints(name: str) -> None:
    """``ddm-brain`` (default of ``idm register``) and its VoxelMorph-style baseline ``vm-brain``: cards say
    the data and the held-out measure, both load by name, γ = 0 is the identity and the full warp
    undoes a seeded smooth deformation of a sample image better than no registration."""
    from idm.cli import build_parser
    from idm.medical.registration import ncc, random_field, register, warp
    from idm.training.registration import load_registration

    card = (CHECKPOINTS / name / "README.md").read_text()
    missing = [field for field in ("Command", "hardware", "wall time", "three brains", "held-out", "NCC")
               if field.lower() not in card.lower()]
    assert not missing, f"model card of {name} lacks {missing}"
    assert (CHECKPOINTS / name / "model.safetensors").stat().st_size < 2**20
    assert build_parser("register").parse_args(["register", "m.png", "f.png", "-o", "w.png"]).checkpoint == "ddm-brain"
    assert build_parser("bench").parse_args(["bench", "registration", "--data", "d"]).checkpoints == ["ddm-brain",
                                                                                                      "vm-brain"]
    moving = sample_images(size=128)["camera"][None]
    fixed = warp(moving, random_field((128, 128), amplitude=3.0, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        warped, fields = register(load_registration(name), moving, fixed, gammas=[0.0, 1.0])
    assert torch.equal(fields[0], torch.zeros_like(fields[0]))
    assert float(ncc(warped[1], fixed)) > float(ncc(moving, fixed)) + 0.05


@pytest.mark.parametrize("name", ["ddm-brain3d", "vm-brain3d"])
def test_shipped_3d_registration_checkpoints(name: str) -> None:
    """The 3-D networks (4 mm brain volumes): cards say the data and the held-out measure, they load by name
    as 3-D networks, γ = 0 is the identity and the full warp undoes a seeded smooth deformation of a
    smooth random volume better than no registration."""
    from idm.medical.registration import ncc, random_field, register, warp
    from idm.training.registration import load_registration

    card = (CHECKPOINTS / name / "README.md").read_text()
    missing = [field for field in ("Command", "hardware", "wall time", "two brains", "ICBM152", "held-out", "NCC")
               if field.lower() not in card.lower()]
    assert not missing, f"model card of {name} lacks {missing}"
    assert (CHECKPOINTS / name / "model.safetensors").stat().st_size < 3 * 2**20
    model = load_registration(name)
    assert model.config.ndim == 3
    g = torch.Generator().manual_seed(0)
    moving = torch.nn.functional.interpolate(torch.rand(1, 1, 6, 8, 6, generator=g), size=(48, 64, 48),
                                             mode="trilinear", align_corners=True)
    fixed = warp(moving, random_field((48, 64, 48), amplitude=2.0, generator=g))
    with torch.no_grad():
        warped, fields = register(model, moving, fixed, gammas=[0.0, 1.0])
    assert torch.equal(fields[0], torch.zeros_like(fields[0]))
    assert float(ncc(warped[1], fixed)) > float(ncc(moving, fixed))


def test_shipped_hagan_ct(tmp_path: Path) -> None:
    """``hagan-ct`` (default of ``idm generate`` / ``idm encode``): the card says how little data it saw and
    what was measured, it loads by name, the chunked volume equals the one-slab volume, and
    ``idm generate`` writes a NIfTI volume in HU with its mid-plane figure."""
    from idm.cli import build_parser
    from idm.cli import main as idm_main
    from idm.io.medical import read_volume
    from idm.training.hagan import load_hagan

    card = (CHECKPOINTS / "hagan-ct" / "README.md").read_text()
    missing = [field for field in ("Very little data", "Command", "hardware", "wall time", "held-out",
                                   "histogram distance", "PSNR") if field.lower() not in card.lower()]
    assert not missing, f"model card of hagan-ct lacks {missing}"
    assert (CHECKPOINTS / "hagan-ct" / "model.safetensors").stat().st_size < 8 * 2**20
    assert build_parser("generate").parse_args(["generate", "-o", "d"]).checkpoint == "hagan-ct"
    assert build_parser("encode").parse_args(["encode", "v.nii.gz", "-o", "d"]).checkpoint == "hagan-ct"
    model = load_hagan("hagan-ct")
    assert model.config.modality == "CT" and model.config.shape == (128, 128, 128)
    z = model.sample_latent(1, torch.Generator().manual_seed(0))
    volume = model.generate(z, chunk=model.config.low_shape[0])
    assert volume.shape == (1, 1, 128, 128, 128) and bool(torch.isfinite(volume).all())
    assert float(volume.std()) > 0.05  # not a flat volume
    assert torch.allclose(model.generate(z), volume, atol=1e-5)
    assert idm_main(["generate", "-n", "1", "-o", str(tmp_path)]) == 0
    image = read_volume(tmp_path / "sample_000.nii.gz")
    assert tuple(image.data.shape) == (128, 128, 128) and -1000 <= float(image.data.min())
    assert (tmp_path / "sample_000.png").is_file()


def test_shipped_hagan_brain(tmp_path: Path) -> None:
    """``hagan-brain`` (HA-GAN on two T1 brain templates): the card says how little data it saw, it loads by
    name as an MRI model on [0, 1], and a generated volume is finite, not flat, and equal chunked or not."""
    from idm.training.hagan import load_hagan

    card = (CHECKPOINTS / "hagan-brain" / "README.md").read_text()
    missing = [field for field in ("Very little data", "Command", "hardware", "wall time", "held-out",
                                   "histogram distance", "PSNR") if field.lower() not in card.lower()]
    assert not missing, f"model card of hagan-brain lacks {missing}"
    assert (CHECKPOINTS / "hagan-brain" / "model.safetensors").stat().st_size < 8 * 2**20
    model = load_hagan("hagan-brain")
    assert model.config.modality == "MRI" and model.config.shape == (128, 128, 128)
    z = model.sample_latent(1, torch.Generator().manual_seed(0))
    volume = model.generate(z)
    assert volume.shape == (1, 1, 128, 128, 128) and bool(torch.isfinite(volume).all())
    assert 0.0 <= float(volume.min()) and float(volume.max()) <= 1.0 and float(volume.std()) > 0.05
    assert torch.allclose(model.generate(z, chunk=model.config.low_shape[0]), volume, atol=1e-5)
