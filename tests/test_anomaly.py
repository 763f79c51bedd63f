"""Anomaly detection pieces (``idm.medical.anomaly``): scan reading and its errors, the noise-aware
classifier (any size; its loss falls on a tiny set), DDIM encoding that inverts decoding, the
classifier guidance, and the scores (Dice, pixel AUROC, Otsu)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from idm.errors import IDMError
from idm.medical.anomaly import (CONTRASTS, HEALTHY, NoiseAwareClassifier, anomaly_map, ddim_encode, dice,
                                 guided_decode, otsu_mask, pixel_auroc, read_scan)
from idm.priors.schedule import NoiseSchedule

pytestmark = pytest.mark.usefixtures("one_thread")


def scans(n: int, lesion: bool, size: int = 24, seed: int = 0) -> torch.Tensor:
    """Toy 4-contrast scans: smooth discs, with a bright square in t2 / flair when ``lesion``."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    disc = ((x**2 + y**2) < 0.7).float()
    out = disc * (0.3 + 0.1 * torch.rand(n, 4, 1, 1, generator=g)) + 0.02 * torch.rand(n, 4, size, size, generator=g)
    if lesion:
        for k in range(n):
            r, c = (int(v) for v in torch.randint(6, size - 10, (2,), generator=g))
            out[k, 2:, r : r + 5, c : c + 5] = 0.9
    return out.clamp(0, 1)


def test_read_scan_from_nifti_contrasts_and_npy(tmp_path: Path) -> None:
    from idm.io.medical import write_nifti

    scan = scans(1, True)[0]
    folder = tmp_path / "case"
    folder.mkdir()
    for k, contrast in enumerate(CONTRASTS):
        write_nifti(folder / f"brats_x_{contrast}_080_w.nii.gz", scan[k].numpy())
    torch.testing.assert_close(read_scan(folder), scan)
    np.save(tmp_path / "scan.npy", scan.numpy())
    torch.testing.assert_close(read_scan(tmp_path / "scan.npy"), scan)


@pytest.mark.parametrize("array, message", [
    (np.zeros((3, 8, 8), np.float32), "4 contrasts"),
    (np.full((4, 8, 8), np.nan, np.float32), "NaN"),
    (np.full((4, 8, 8), 7.0, np.float32), r"\[0, 1\]"),
])
def test_bad_scans_give_one_line_errors(tmp_path: Path, array: np.ndarray, message: str) -> None:
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(IDMError, match=message):
        read_scan(tmp_path / "bad.npy")


def test_a_scan_folder_needs_every_contrast(tmp_path: Path) -> None:
    from idm.io.medical import write_nifti

    write_nifti(tmp_path / "brats_x_t1_080_w.nii.gz", np.zeros((8, 8), np.float32))
    with pytest.raises(IDMError, match="t1ce"):
        read_scan(tmp_path)


def test_classifier_takes_any_size_and_learns_a_tiny_set() -> None:
    torch.manual_seed(0)
    net = NoiseAwareClassifier(base_channels=8, channel_mults=(1, 2), groups=4)
    assert net(torch.rand(2, 4, 23, 17), torch.tensor([0, 999])).shape == (2, 2)
    x = torch.cat([scans(4, False), scans(4, True, seed=1)]) * 2 - 1
    labels = torch.tensor([0] * 4 + [1] * 4)
    t = torch.full((8,), 20)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(net(x, t), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]


def gaussian_model(mean: torch.Tensor, std: float, schedule: NoiseSchedule):
    """The exact ε of data x₀ ~ N(mean, std² I) (prior range): ``√(1 − ᾱ)(x − √ᾱ mean) / (ᾱ std² + 1 − ᾱ)``."""
    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = schedule.alphas_cumprod[t].view(-1, 1, 1, 1).to(x.dtype)
        return (1 - abar).sqrt() * (x - abar.sqrt() * mean) / (abar * std**2 + 1 - abar)
    return eps


def test_encoding_inverts_decoding() -> None:
    """With the exact ε of Gaussian data, deterministic DDIM is the probability-flow ODE: encoding to L and
    unguided decoding return x₀ up to the discretisation error, which shrinks with the step count."""
    schedule = NoiseSchedule()
    mean = scans(1, False) * 2 - 1
    model = gaussian_model(mean, 0.5, schedule)
    x0 = mean + 0.5 * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    errors = []
    for steps in (20, 200):
        latent = ddim_encode(model, x0, schedule, level=400, steps=steps)
        assert float((latent - x0).abs().mean()) > 0.1  # it moved
        errors.append(float((guided_decode(model, None, latent, schedule, 400, steps, 0.0) - x0).abs().max()))
    assert errors[1] < 0.03 and errors[1] < errors[0] / 5  # first order in the step size


def test_guidance_moves_the_result_towards_healthy() -> None:
    torch.manual_seed(1)
    schedule = NoiseSchedule()
    net = NoiseAwareClassifier(base_channels=8, channel_mults=(1, 2), groups=4).eval()
    scan = scans(1, True, seed=2)
    model = gaussian_model(scan * 2 - 1, 0.1, schedule)
    plain, _ = anomaly_map(model, net, scan, schedule, level=300, steps=5, scale=0.0)
    guided_map, healthy = anomaly_map(model, net, scan, schedule, level=300, steps=5, scale=50.0)
    t0 = torch.zeros(1, dtype=torch.long)
    p = lambda x: float(torch.softmax(net(x * 2 - 1, t0), 1)[0, HEALTHY])  # noqa: E731
    assert p(healthy) > p(scan) and not torch.allclose(plain, guided_map)
    assert guided_map.shape == (1, 24, 24)


def test_scores_on_known_masks() -> None:
    truth = torch.zeros(6, 6, dtype=torch.bool)
    truth[:2] = True
    assert dice(truth, truth) == 1.0 and dice(~truth, truth) == 0.0
    scores = truth.double() + 0.01 * torch.arange(36.0).view(6, 6)
    assert pixel_auroc(scores, truth) == 1.0 and pixel_auroc(-scores, truth) == 0.0
    assert pixel_auroc(torch.ones(6, 6), truth) == 0.5
    assert torch.equal(otsu_mask(scores), truth)


def test_real_brats_scans_split_by_subject(shared_data: Path, tmp_path: Path) -> None:
    """train: subjects 001 (labelled) and 040 (scan only); test: subject 006 slices 081 / 082 with labels;
    006 slice 080 (the test slices' neighbour) is left out."""
    from train.anomaly_scans import export

    manifest = export(shared_data, tmp_path / "brats4", "test")
    by_split = {s: sorted(Path(r["scan"]).stem for r in manifest["files"] if r["split"] == s) for s in ("train", "test")}
    assert by_split["test"] == ["brats_006_081", "brats_006_082"]
    assert all(name.startswith(("brats_001_", "brats_040_")) for name in by_split["train"]) and len(by_split["train"]) == 7
    assert list(manifest["left_out"]) == ["brats_006_080"]
    scan = np.load(tmp_path / "brats4" / "test" / "scans" / "brats_006_081.npy")
    mask = np.load(tmp_path / "brats4" / "test" / "masks" / "brats_006_081.npy")
    assert scan.shape == (4, 240, 240) and mask.shape == (240, 240) and 0 < mask.mean() < 0.2


def test_classifier_training_resumes_exactly_and_exports(tmp_path: Path, capsys) -> None:
    """The classifier trainer: an interrupted run resumed gives the same weights as an uninterrupted one;
    the export loads back; bad options give one-line errors."""
    from idm.io.checkpoint import load_state
    from idm.training.classifier import load_classifier, main as train_main

    scans_dir, masks_dir = tmp_path / "scans", tmp_path / "masks"
    scans_dir.mkdir(), masks_dir.mkdir()
    for k in range(3):
        scan = scans(1, True, size=32, seed=k)[0]
        np.save(scans_dir / f"s{k}.npy", scan.numpy())
        np.save(masks_dir / f"s{k}.npy", (scan[3] > 0.8).numpy().astype(np.uint8))
    base = ["--scans", str(scans_dir), "--masks", str(masks_dir), "--steps", "4", "--batch", "4", "--patch", "16",
            "--base-channels", "8", "--channel-mults", "1,2", "--save-every", "2", "--warmup", "1", "--no-progress",
            "--threads", "1"]
    assert train_main([*base, "--out", str(tmp_path / "full")]) == 0
    assert train_main([*base, "--out", str(tmp_path / "split"), "--stop-after", "2"]) == 0
    assert train_main([*base, "--out", str(tmp_path / "split"), "--resume"]) == 0
    full, split = (load_state(tmp_path / run / "state.safetensors")["model"] for run in ("full", "split"))
    assert all(torch.equal(full[k], split[k]) for k in full)
    net = load_classifier(tmp_path / "full" / "checkpoint")
    assert net(torch.rand(1, 4, 20, 28), torch.tensor([5])).shape == (1, 2)
    assert train_main([*base, "--out", str(tmp_path / "bad"), "--min-tumour", "0"]) == 2
    assert train_main([*base, "--out", str(tmp_path / "bad"), "--masks", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error:") for line in err)


def test_anomaly_cli_writes_a_map_and_scores_it(tmp_path: Path, capsys) -> None:
    """``idm anomaly`` with a tiny 4-channel prior and classifier: map, Otsu segmentation, Dice / AUROC;
    a scan of the wrong contrast count is a one-line error and writes nothing."""
    from conftest import tiny_prior, tiny_unet_config
    from idm.cli import main
    from idm.training.classifier import ARCHITECTURE
    from idm.io.checkpoint import save_checkpoint

    prior = tiny_prior(tiny_unet_config(in_channels=4, out_channels=4), seed=0)
    prior.save(tmp_path / "prior", "# tiny", dtype=None)
    net = NoiseAwareClassifier(base_channels=8, channel_mults=(1, 2), groups=4)
    save_checkpoint(tmp_path / "cls", net.state_dict(), {"architecture": ARCHITECTURE, "classifier": net.config}, "# tiny")
    scan = scans(1, True, size=20, seed=3)[0]
    np.save(tmp_path / "scan.npy", scan.numpy())
    np.save(tmp_path / "truth.npy", (scan[3] > 0.8).numpy().astype(np.uint8))
    argv = ["anomaly", str(tmp_path / "scan.npy"), "--prior", str(tmp_path / "prior"), "--classifier", str(tmp_path / "cls"),
            "--level", "100", "--steps", "3", "--scale", "10", "--no-progress"]
    assert main([*argv, "-o", str(tmp_path / "map.npy"), "--segmentation", str(tmp_path / "seg.png"),
                 "--truth", str(tmp_path / "truth.npy")]) == 0
    assert "Dice" in capsys.readouterr().out and np.load(tmp_path / "map.npy").shape == (20, 20)
    np.save(tmp_path / "three.npy", scan[:3].numpy())
    argv[1] = str(tmp_path / "three.npy")
    assert main([*argv, "-o", str(tmp_path / "never.npy")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "4 contrasts" in err and not (tmp_path / "never.npy").exists()


def test_anomaly_bench_compares_scales(tmp_path: Path) -> None:
    from conftest import tiny_prior, tiny_unet_config
    from idm.cli import main
    from idm.io.checkpoint import save_checkpoint
    from idm.training.classifier import ARCHITECTURE

    prior = tiny_prior(tiny_unet_config(in_channels=4, out_channels=4), seed=0)
    prior.save(tmp_path / "prior", "# tiny", dtype=None)
    net = NoiseAwareClassifier(base_channels=8, channel_mults=(1, 2), groups=4)
    save_checkpoint(tmp_path / "cls", net.state_dict(), {"architecture": ARCHITECTURE, "classifier": net.config}, "# tiny")
    (tmp_path / "data" / "scans").mkdir(parents=True), (tmp_path / "data" / "masks").mkdir()
    for k in range(2):
        scan = scans(1, True, size=20, seed=k)[0]
        np.save(tmp_path / "data" / "scans" / f"c{k}.npy", scan.numpy())
        np.save(tmp_path / "data" / "masks" / f"c{k}.npy", (scan[3] > 0.8).numpy().astype(np.uint8))
    out = tmp_path / "a.json"
    assert main(["bench", "anomaly", "--data", str(tmp_path / "data"), "--prior", str(tmp_path / "prior"),
                 "--classifier", str(tmp_path / "cls"), "--scales", "0", "5", "--level", "50", "--steps", "2",
                 "--json", str(out), "--figure", str(tmp_path / "f.png")]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["scale"] for r in rows] == [0.0, 5.0] and all(len(r["images"]) == 2 for r in rows)
    assert (tmp_path / "f.png").stat().st_size > 0
