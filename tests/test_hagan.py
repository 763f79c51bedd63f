"""HA-GAN (idm.generative.hagan): sub-volume placement and the position input, full-volume inference equal to
the stitched sub-volumes, falling losses on tiny volumes, the trainer (exact resume, export, checkpoint round
trip), ``idm generate`` / ``idm encode``, ``idm bench memory --model hagan``, one-line errors; the data
preparation (skipped without ../shared)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from idm.cli import main as idm_main
from idm.errors import IDMError
from idm.generative.hagan import (HAGAN, Discriminators, HAGANConfig, discriminator_loss, encoder_global_loss,
                                  encoder_high_loss, generator_loss, head_halo, mid_slice_histogram_distance)

pytestmark = pytest.mark.usefixtures("one_thread")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY = dict(latent_dim=16, top_width=4, max_width=16, d_width=4)
TRAIN_TINY = ["--latent-dim", "16", "--top-width", "2", "--max-width", "8", "--d-width", "4", "--factor", "2",
              "--batch", "1", "--no-progress", "--threads", "1", "--eval-samples", "2", "--spacing", "4"]


def _model(shape=(16, 16, 16), factor=2, sub=(4, 8, 16), seed=0) -> HAGAN:
    torch.manual_seed(seed)
    return HAGAN(HAGANConfig(shape=shape, factor=factor, sub_shape=sub, **TINY))


def _volumes(folder: Path, n: int = 3, shape=(16, 16, 16)) -> Path:
    """Smooth random blobs on [0, 1] as .npy volumes."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    for i in range(n):
        x = torch.rand((1, 1, *(s // 4 for s in shape)), generator=g)
        x = torch.nn.functional.interpolate(x, size=shape, mode="trilinear", align_corners=False)[0, 0]
        np.save(folder / f"v{i}.npy", x.numpy().astype(np.float32))
    return folder


def test_sub_volume_placement_and_position_code() -> None:
    model = _model()
    real = torch.arange(16 ** 3, dtype=torch.float32).view(1, 1, 16, 16, 16)
    low, sub = model.real_views(real, (3, 0, 0))  # feature position 3 → voxels 6:10 (s = 2)
    assert torch.equal(sub, real[:, :, 6:10, 0:8, 0:16])
    assert low.shape == (1, 1, 8, 8, 8) and torch.allclose(low[0, 0, 0, 0, 0], real[0, 0, :2, :2, :2].mean())
    g = torch.Generator().manual_seed(0)
    starts = {model.sample_position(g) for _ in range(200)}
    assert {p[0] for p in starts} == set(range(0, 7)) and {p[1] for p in starts} == {0, 1, 2, 3, 4}
    assert {p[2] for p in starts} == {0}  # the sub-volume spans W: one position
    code = model.position_code((3, 2, 0), batch=2)
    assert code.shape == (2, 3) and torch.allclose(code[0], torch.tensor([3 / 6, 2 / 4, 0.0]))


def test_the_high_resolution_discriminator_sees_the_position() -> None:
    model, disc = _model(), Discriminators(_model().config)
    x = torch.rand(2, 1, 4, 8, 16)
    a = disc.high(x, model.position_code((0, 0, 0), 2))
    b = disc.high(x, model.position_code((6, 3, 0), 2))
    assert a.shape == (2,) and not torch.allclose(a, b)
    with pytest.raises(IDMError, match="position"):
        disc.high(x)


@pytest.mark.parametrize("shape,factor,sub", [((16, 16, 16), 2, (4, 8, 16)), ((16, 32, 24), 4, (8, 8, 8)),
                                               ((32, 16, 16), 4, (4, 16, 16))])
def test_full_volume_equals_the_stitched_sub_volumes(shape, factor, sub) -> None:
    model = _model(shape, factor, sub).eval()
    c = model.config
    with torch.no_grad():
        features = model.generator.features(torch.randn(2, c.latent_dim))
        whole = model.generator.full_unchunked(features)
        assert whole.shape == (2, 1, *shape)
        for chunk in (1, 3, c.low_shape[0]):
            assert torch.allclose(model.generator.full(features, chunk), whole, atol=1e-6)
        m, s = c.sub_features, factor
        stitched = torch.zeros_like(whole)
        for a in range(0, c.low_shape[0], m[0]):  # sub-volumes tiling the volume, as drawn in training
            for b in range(0, c.low_shape[1], m[1]):
                for d in range(0, c.low_shape[2], m[2]):
                    tile = model.generator.high(features, (a, b, d))
                    stitched[:, :, a * s:(a + m[0]) * s, b * s:(b + m[1]) * s, d * s:(d + m[2]) * s] = tile
        assert torch.allclose(stitched, whole, atol=1e-6)
        p = model.sample_position(torch.Generator().manual_seed(3))  # any position, not only the tiling
        ref = whole[:, :, p[0] * s:p[0] * s + c.sub_shape[0], p[1] * s:p[1] * s + c.sub_shape[1],
                    p[2] * s:p[2] * s + c.sub_shape[2]]
        assert torch.allclose(model.generator.high(features, p), ref, atol=1e-6)


def test_head_halo_is_the_receptive_field() -> None:
    assert head_halo(1) == (1, 1) and head_halo(2) == (1, 1) and head_halo(3)[0] >= 1


def test_losses_fall_on_a_tiny_volume_set(tmp_path: Path) -> None:
    from idm.data import load_volumes

    _, volumes = load_volumes(_volumes(tmp_path / "v"))
    real = volumes * 2 - 1
    model, disc = _model(), Discriminators(_model().config)
    params = {"d": list(disc.parameters()), "g": list(model.generator.parameters()),
              "eh": list(model.encoder_high.parameters()), "eg": list(model.encoder_global.parameters())}
    lrs = {"d": 4e-3, "g": 1e-3, "eh": 5e-3, "eg": 5e-3}  # the paper's D : G = 4 : 1, scaled up for 240 steps
    opts = {k: torch.optim.Adam(p, lr=lrs[k], betas=(0.0, 0.999)) for k, p in params.items()}
    g = torch.Generator().manual_seed(0)
    history: dict[str, list[float]] = {k: [] for k in params}
    for step in range(240):
        batch = real[step % 3:step % 3 + 1]
        z, start = torch.randn(1, 16, generator=g), model.sample_position(g)
        for name, fn in (("d", lambda: discriminator_loss(model, disc, batch, z, start)),
                         ("g", lambda: generator_loss(model, disc, z, start)),
                         ("eh", lambda: encoder_high_loss(model, batch, start)),
                         ("eg", lambda: encoder_global_loss(model, batch, start))):
            loss = fn()
            opts[name].zero_grad()
            loss.backward(inputs=params[name])
            opts[name].step()
            history[name].append(float(loss.detach()))
    first, last = ({k: float(np.mean(v[s])) for k, v in history.items()} for s in (slice(0, 20), slice(-20, None)))
    assert last["eh"] < 0.65 * first["eh"] and last["eg"] < 0.85 * first["eg"]
    assert last["d"] < first["d"] - 0.2  # the discriminators learn to tell the tiny set from the generator
    with torch.no_grad():  # and the generator answers: its volumes are not flat
        fake = model.generate(torch.randn(4, 16, generator=g))
    assert float(fake.std()) > 0.5 * float(volumes.std())


def test_config_errors_are_one_line() -> None:
    for kwargs, match in [(dict(shape=(18, 16, 16)), "divide the hierarchy"), (dict(factor=3), "power of 2"),
                          (dict(sub_shape=(5, 16, 16)), "multiples of the factor"),
                          (dict(sub_shape=(32, 16, 16)), "no larger"), (dict(shape=(16, 16)), "three"),
                          (dict(factor=16, levels=4), "must exceed")]:
        with pytest.raises(IDMError, match=match) as info:
            HAGANConfig(**{"shape": (16, 16, 16), "factor": 2, **kwargs})
        assert "\n" not in str(info.value)
    model = _model()
    with pytest.raises(IDMError, match="encodes volumes"):
        model.encode(torch.rand(1, 1, 16, 16, 8))
    with pytest.raises(IDMError, match="NaN"):
        model.encode(torch.full((1, 1, 16, 16, 16), float("nan")))
    with pytest.raises(IDMError, match="leaves the feature grid"):
        model.generator.high(model.generator.features(torch.randn(1, 16)), (7, 0, 0))


def test_histogram_distance() -> None:
    a = torch.rand(2, 1, 8, 8, 8)
    assert mid_slice_histogram_distance(a, a) == 0
    assert mid_slice_histogram_distance(torch.zeros(1, 8, 8, 8), torch.ones(1, 8, 8, 8)) == pytest.approx(1, abs=0.02)


# --- trainer, checkpoint, CLI ---------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    from idm.training.hagan import main as train_main

    root = tmp_path_factory.mktemp("hagan")
    data, val = _volumes(root / "train"), _volumes(root / "val", n=1)
    run = root / "run"
    args = ["--data", str(data), "--val", str(val), "--out", str(run), "--steps", "4", "--export-dtype", "fp32",
            *TRAIN_TINY]
    assert train_main(args) == 0
    return {"data": data, "val": val, "run": run, "checkpoint": run / "checkpoint", "args": args}


def test_training_resumes_exactly(trained, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from idm.training.hagan import main as train_main

    common = ["--data", str(trained["data"]), "--steps", "4", "--export-dtype", "fp32", *TRAIN_TINY]
    assert train_main([*common, "--out", str(tmp_path / "split"), "--stop-after", "2"]) == 0
    assert not (tmp_path / "split" / "checkpoint").exists()
    assert train_main([*common, "--out", str(tmp_path / "split"), "--resume"]) == 0
    straight = tmp_path / "straight"
    assert train_main([*common, "--out", str(straight)]) == 0
    a = load_file(str(straight / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs = [[json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
            for run in (straight, tmp_path / "split")]
    assert [x["loss"] for x in logs[0]] == [x["loss"] for x in logs[1]] and len(logs[0]) == 4
    assert set(logs[0][0]) >= {"d", "g", "eh", "eg", "position"}
    assert train_main([*common, "--out", str(straight)]) == 2  # state exists without --resume
    assert train_main([*common, "--out", str(tmp_path / "split"), "--resume", "--seed", "5"]) == 2


def test_checkpoint_round_trip_and_card(trained) -> None:
    from idm.data import load_volumes
    from idm.training.hagan import load_hagan

    model = load_hagan(trained["checkpoint"])
    config = json.loads((trained["checkpoint"] / "config.json").read_text())
    assert config["architecture"] == "hagan" and config["hagan"]["shape"] == [16, 16, 16]
    metrics = config["metrics"]
    assert {"generated", "real", "mid_slice_histogram_distance", "heldout_recon_psnr_db"} <= set(metrics)
    from safetensors.torch import load_file

    weights = load_file(str(trained["checkpoint"] / "model.safetensors"))
    state = model.state_dict()
    assert weights.keys() == state.keys() and all(torch.equal(weights[k], state[k]) for k in weights)
    z = model.sample_latent(2, torch.Generator().manual_seed(0))
    assert torch.equal(model.generate(z), load_hagan(trained["checkpoint"]).generate(z))
    _, val = load_volumes(trained["val"])
    latent, recon = model.reconstruct(val)
    assert latent.shape == (1, 16) and recon.shape == val.shape and 0 <= float(recon.min()) <= float(recon.max()) <= 1
    card = (trained["checkpoint"] / "README.md").read_text()
    assert "Very little data" in card and "held-out `v0`" in card and "steps x batch | 4 x 1" in card


def test_generate_and_encode_cli(trained, tmp_path: Path, capsys) -> None:
    from idm.io.medical import read_volume

    out = tmp_path / "gen"
    assert idm_main(["generate", "--checkpoint", str(trained["checkpoint"]), "-n", "2", "-o", str(out),
                     "--chunk", "1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["sample_000.nii.gz", "sample_000.png", "sample_001.nii.gz",
                                                     "sample_001.png", "samples.png"]
    image = read_volume(out / "sample_000.nii.gz")
    assert tuple(image.data.shape) == (16, 16, 16) and image.spacing == (4.0, 4.0, 4.0)
    assert -1000 <= float(image.data.min()) and float(image.data.max()) <= 1000  # CT: written in HU
    enc = tmp_path / "enc"
    assert idm_main(["encode", str(trained["val"] / "v0.npy"), "--checkpoint", str(trained["checkpoint"]),
                     "-o", str(enc)]) == 0
    assert "PSNR" in capsys.readouterr().out
    assert np.load(enc / "latent.npy").shape == (1, 16)
    assert (enc / "reconstruction.nii.gz").is_file() and (enc / "encode.png").is_file()
    # a NIfTI volume with a spacing is resampled and cropped to the model's grid
    assert idm_main(["encode", str(out / "sample_001.nii.gz"), "--checkpoint", str(trained["checkpoint"]),
                     "-o", str(tmp_path / "enc2")]) == 0


def test_cli_errors_are_one_line(trained, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((16, 16, 8), np.float32))
    cases = [["generate", "--checkpoint", str(trained["checkpoint"]), "-n", "0", "-o", str(tmp_path / "g")],
             ["generate", "--checkpoint", str(tmp_path / "missing"), "-o", str(tmp_path / "g")],
             ["encode", str(bad), "--checkpoint", str(trained["checkpoint"]), "-o", str(tmp_path / "e")],
             ["encode", str(tmp_path / "none.nii.gz"), "--checkpoint", str(trained["checkpoint"]), "-o", str(tmp_path / "e")],
             ["bench", "memory", "--model", "hagan", "--size", "24", "--threads", "1"]]
    for argv in cases:
        capsys.readouterr()
        assert idm_main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, (argv, err)
    assert not (tmp_path / "g").exists() and not (tmp_path / "e").exists()  # nothing half-written


def test_bench_memory_hagan(tmp_path: Path, capsys) -> None:
    out = tmp_path / "m.json"
    assert idm_main(["bench", "memory", "--model", "hagan", "--size", "16", "32", "--factor", "2", "--sub", "8",
                     "--top-width", "2", "--max-width", "8", "--latent-dim", "16", "--threads", "1",
                     "--json", str(out), "--plot", str(tmp_path / "m.png")]) == 0
    result = json.loads(out.read_text())
    rows = {(r["model"], r["size"]): r for r in result["rows"]}
    assert set(rows) == {("hagan-s2", 16), ("full", 16), ("hagan-s2", 32), ("full", 32)}
    assert all(r["peak_bytes"] > 0 and r["seconds_per_step"] > 0 for r in rows.values())
    assert rows[("hagan-s2", 32)]["sub"] == 8 and rows[("hagan-s2", 32)]["low"] == 16
    assert (tmp_path / "m.png").is_file() and "peak MiB" in capsys.readouterr().out


def test_bench_hagan_quality_table(trained, tmp_path: Path, capsys) -> None:
    out = tmp_path / "q.json"
    assert idm_main(["bench", "hagan", "--checkpoint", str(trained["checkpoint"]), "--data", str(trained["data"]),
                     "--val", str(trained["val"]), "-n", "2", "--threads", "1", "--json", str(out),
                     "--figure", str(tmp_path / "q.png")]) == 0
    text = capsys.readouterr().out
    assert "intensity std" in text and "held-out v0" in text
    result = json.loads(out.read_text())
    assert result["samples"] == 2 and set(result["heldout_recon_psnr_db"]) == {"v0"}
    assert {"generated", "real", "heldout", "mid_slice_histogram_distance"} <= set(result)
    assert (tmp_path / "q.png").is_file()
    # the table is the trainer's card numbers: same seed, same statistics
    card = json.loads((trained["checkpoint"] / "config.json").read_text())["metrics"]
    assert result["real"] == card["real"]
    bad = tmp_path / "bad"
    _volumes(bad, n=1, shape=(8, 8, 8))
    capsys.readouterr()
    assert idm_main(["bench", "hagan", "--checkpoint", str(trained["checkpoint"]), "--data", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "(8, 8, 8)" in err


def test_bench_memory_full_gan_stops_at_the_budget(tmp_path: Path) -> None:
    import argparse

    from idm.bench.memory_hagan import run_hagan_bench

    args = argparse.Namespace(top_width=2, max_width=8, latent_dim=16, seed=0, repeats=1, budget_gib=1e-4)
    result = run_hagan_bench(sizes=[16, 32], subs=[8], factors=[2], batch=1, device=torch.device("cpu"), args=args)
    full = [r for r in result["rows"] if r["model"] == "full"]
    assert full[0]["peak_bytes"] > 0 and full[1]["peak_bytes"] is None and "budget" in full[1]["note"]


def test_prepare_the_real_volumes(tmp_path: Path) -> None:
    if not SHARED.is_dir():
        pytest.skip(f"real data not available: {SHARED} is missing")
    from train.hagan_volumes import main

    assert main(["--data", str(SHARED), "--out", str(tmp_path), "--size", "16"]) == 0
    record = json.loads((tmp_path / "volumes.json").read_text())
    assert record["spacing_mm"] == 12.0
    roles = {(v["file"].split("/")[0], v["role"]) for v in record["volumes"]}
    assert roles == {("ct", "train"), ("ct", "val"), ("brain", "train"), ("brain", "val")}
    x = np.load(tmp_path / "ct" / "val" / "pulmonary_ct.npy")
    assert x.shape == (16, 16, 16) and 0 <= x.min() and x.max() <= 1
