"""Registration training (exact resume, export, errors), ``idm register`` and ``idm bench registration``
on tiny runs; the classical baseline; the data preparation (skipped without ../shared)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from idm.cli import main as idm_main
from idm.medical.registration import random_field, warp
from idm.training.registration import main as train_main

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY = ["--batch", "2", "--features", "8,8", "--base-channels", "8", "--channel-mults", "1,2", "--warmup", "2",
        "--no-progress", "--threads", "1"]


def _slices(folder: Path, size: int = 32) -> Path:
    """Two 'sources' of smooth random slices at three depths (<source>_z<depth>.npy)."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for source in ("a", "b"):
        for z in (10, 11, 12):
            x = torch.nn.functional.interpolate(torch.rand(1, 1, size // 4, size // 4, generator=g), size=(size, size),
                                                mode="bilinear", align_corners=True)
            np.save(folder / f"{source}_z{z}.npy", x[0, 0].numpy())
    return folder


def _pairs(folder: Path, size: int = 32) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    moving = torch.nn.functional.interpolate(torch.rand(1, 1, 8, 8, generator=g), size=(size, size), mode="bilinear",
                                             align_corners=True)
    field = random_field((size, size), amplitude=1.0, generator=g)
    np.save(folder / "p_moving.npy", moving[0, 0].numpy())
    np.save(folder / "p_fixed.npy", warp(moving, field)[0, 0].numpy())
    np.save(folder / "p_field.npy", field[0].numpy())
    np.save(folder / "q_moving.npy", moving[0, 0].numpy())
    np.save(folder / "q_fixed.npy", moving[0, 0].flip(-1).numpy())
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reg")
    data, val = _slices(root / "slices"), _pairs(root / "pairs")
    out = {}
    for arch in ("ddm", "voxelmorph"):
        run = root / arch
        assert train_main(["--data", str(data), "--val", str(val), "--arch", arch, "--out", str(run), "--steps", "4",
                           *TINY]) == 0
        out[arch] = run / "checkpoint"
    return {"data": data, "val": val, **out}


@pytest.mark.parametrize("arch", ["ddm", "voxelmorph"])
def test_training_resumes_exactly(arch: str, tmp_path: Path, trained) -> None:
    from safetensors.torch import load_file

    common = ["--data", str(trained["data"]), "--arch", arch, "--steps", "4", *TINY]
    assert train_main([*common, "--out", str(tmp_path / "straight")]) == 0
    assert train_main([*common, "--out", str(tmp_path / "split"), "--stop-after", "2"]) == 0
    assert not (tmp_path / "split" / "checkpoint").exists()
    assert train_main([*common, "--out", str(tmp_path / "split"), "--resume"]) == 0
    a = load_file(str(tmp_path / "straight" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
              for run in ("straight", "split")]
    assert losses[0] == losses[1] and len(losses[0]) == 4


def test_checkpoint_card_reports_the_held_out_pairs(trained) -> None:
    config = json.loads((trained["ddm"] / "config.json").read_text())
    assert config["architecture"] == "registration" and config["registration"]["architecture"] == "ddm"
    assert set(config["validation"]) == {"ncc", "epe", "folding_percent"}
    card = (trained["ddm"] / "README.md").read_text()
    assert "Measured (held-out pairs)" in card and "steps x batch" in card


def test_init_continues_a_checkpoint(trained, tmp_path: Path, capsys) -> None:
    from safetensors.torch import load_file

    common = ["--data", str(trained["data"]), "--steps", "2", *TINY]
    run = tmp_path / "continued"
    assert train_main([*common, "--init", str(trained["ddm"]), "--lr", "1e-12", "--out", str(run)]) == 0
    before = load_file(str(trained["ddm"] / "model.safetensors"))
    after = load_file(str(run / "checkpoint" / "model.safetensors"))  # lr 1e-12: the init's weights, in fp16
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    config = json.loads((run / "checkpoint" / "config.json").read_text())["training"]
    assert config["init"] == str(trained["ddm"]) and config["init_steps_before"] == 4 and config["steps"] == 2
    assert config["init_commands"] == [json.loads((trained["ddm"] / "config.json").read_text())["training"]["command"]]
    again = tmp_path / "again"  # a chain of two: both earlier commands, 6 steps before
    assert train_main([*common, "--init", str(run / "checkpoint"), "--out", str(again)]) == 0
    twice = json.loads((again / "checkpoint" / "config.json").read_text())["training"]
    assert twice["init_steps_before"] == 6 and twice["init_commands"] == [*config["init_commands"], config["command"]]
    card = (again / "checkpoint" / "README.md").read_text()
    assert "Continued from" in card and all(command in card for command in twice["init_commands"])
    capsys.readouterr()
    assert train_main([*common, "--init", str(trained["ddm"]), "--features", "8,16", "--out", str(tmp_path / "b")]) == 2
    assert "features [8, 8] (the run asks for [8, 16])" in capsys.readouterr().err
    assert train_main([*common, "--init", str(trained["ddm"]), "--arch", "voxelmorph", "--out", str(tmp_path / "c")]) == 2
    assert train_main([*common, "--init", str(tmp_path / "nothing"), "--out", str(tmp_path / "d")]) == 2
    assert not (tmp_path / "b").exists() or not (tmp_path / "b" / "checkpoint").exists()


def test_augmented_inter_subject_pairs_are_both_warped_and_seeded(tmp_path: Path) -> None:
    """--augment: an inter-subject pair's two images each go through their own random smooth field (so neither
    is a training slice any more), deterministically in (seed, i); without it the pairs are the slices."""
    from idm.training.registration import PairSampler, load_slices

    names, slices = load_slices(_slices(tmp_path / "s"))
    plain = PairSampler(names, slices, length=8, seed=3, synthetic=0.0, amplitude=2.0)
    augmented = PairSampler(names, slices, length=8, seed=3, synthetic=0.0, amplitude=2.0, augment=2.0)
    flat = slices.flatten(1)

    def is_a_slice(x: torch.Tensor) -> bool:
        candidates = torch.cat([flat, slices.flip(-1).flatten(1)])
        return bool(((candidates - x.flatten()).abs().amax(1) < 1e-6).any())

    for i in range(8):
        pair, again = augmented[i], augmented[i]
        assert torch.equal(pair, again) and pair.shape == (2, 32, 32)
        assert all(is_a_slice(x) for x in plain[i])
        assert not any(is_a_slice(x) for x in pair)
    assert train_main(["--data", str(tmp_path / "s"), "--out", str(tmp_path / "r"), "--steps", "2", "--augment", "-1",
                       *TINY]) == 2


def test_training_errors(tmp_path: Path) -> None:
    data = _slices(tmp_path / "s", size=30)  # not a multiple of the networks' 4
    assert train_main(["--data", str(data), "--out", str(tmp_path / "r"), "--steps", "2", *TINY]) == 2
    good = _slices(tmp_path / "g")
    assert train_main(["--data", str(good), "--out", str(tmp_path / "r3"), "--steps", "2", "--global-ncc", "-1",
                       *TINY]) == 2
    lonely = tmp_path / "one"
    lonely.mkdir()
    np.save(lonely / "a_z1.npy", np.zeros((32, 32), np.float32))
    assert train_main(["--data", str(lonely), "--out", str(tmp_path / "r2"), "--steps", "2", *TINY]) == 2
    assert train_main(["--data", str(data), "--out", str(tmp_path / "r3"), "--steps", "2", "--synthetic", "2",
                       *TINY]) == 2


def test_register_cli_writes_warp_field_and_frames(trained, tmp_path: Path, capsys) -> None:
    val = trained["val"]
    out = tmp_path / "warped.png"
    code = idm_main(["register", str(val / "p_moving.npy"), str(val / "p_fixed.npy"), "-o", str(out),
                     "--field", str(tmp_path / "field.npy"), "--frames", "4", "--checkpoint", str(trained["ddm"])])
    assert code == 0 and out.is_file()
    assert np.load(tmp_path / "field.npy").shape == (2, 32, 32)
    assert sorted(p.name for p in (tmp_path / "warped_frames").iterdir()) == [f"frame_0{k}.png" for k in range(4)]
    assert (tmp_path / "warped_frames.gif").is_file() and (tmp_path / "warped_frames.png").is_file()
    assert "NCC" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--frames", "1"], "--frames"),
    (["--passes", "0"], "--passes"),
    (["--field", "field.png"], "--field"),
    (["-o", "out.txt"], "output must be"),
])
def test_register_cli_errors(trained, tmp_path: Path, capsys, argv, message) -> None:
    val = trained["val"]
    base = ["register", str(val / "p_moving.npy"), str(val / "p_fixed.npy"), "--checkpoint", str(trained["ddm"])]
    args = base + (argv if "-o" in argv else ["-o", str(tmp_path / "w.npy"), *argv])
    assert idm_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "w.npy").exists()


def test_register_cli_mismatched_sizes(trained, tmp_path: Path, capsys) -> None:
    np.save(tmp_path / "small.npy", np.zeros((16, 16), np.float32))
    assert idm_main(["register", str(trained["val"] / "p_moving.npy"), str(tmp_path / "small.npy"), "-o",
                     str(tmp_path / "w.npy"), "--checkpoint", str(trained["ddm"])]) == 2
    assert "fixed image" in capsys.readouterr().err


def test_bench_registration(trained, tmp_path: Path, capsys) -> None:
    pytest.importorskip("SimpleITK")
    out = tmp_path / "reg.json"
    assert idm_main(["bench", "registration", "--data", str(trained["val"]), "--checkpoints", str(trained["ddm"]),
                     str(trained["voxelmorph"]), "--repeats", "1", "--json", str(out),
                     "--figure", str(tmp_path / "reg.png")]) == 0
    result = json.loads(out.read_text())
    methods = [row["method"] for row in result["rows"]]
    assert methods == ["identity (no registration)", f"ddm ({trained['ddm']})", f"ddm ({trained['ddm']}) x2",
                       f"voxelmorph ({trained['voxelmorph']})", f"voxelmorph ({trained['voxelmorph']}) x2", "demons"]
    assert "gamma" in result["rows"][2] and "gamma" not in result["rows"][3]  # one curve per DiffuseMorph row
    ddm = result["rows"][1]
    assert ddm["gamma"]["pairs"] == 2 and len(ddm["gamma"]["ncc"][0]) == 11
    assert len(ddm["gamma"]["local_ncc"][1]) == 11 and 0 <= ddm["gamma"]["monotone_pairs_local"] <= 2
    identical = [curve[0] for curve in ddm["gamma"]["ncc"]]  # γ = 0 is the identity: the unregistered NCC
    assert identical == pytest.approx([image["ncc"] for image in result["rows"][0]["images"]], abs=1e-5)
    assert all(key in ddm for key in ("ncc", "epe", "folding_percent", "seconds", "seconds_256"))
    assert (tmp_path / "reg.png").is_file()


def test_demons_recovers_a_smooth_deformation() -> None:
    pytest.importorskip("SimpleITK")
    from idm.medical.registration import demons, endpoint_error, ncc

    g = torch.Generator().manual_seed(0)
    moving = torch.nn.functional.interpolate(torch.rand(1, 1, 12, 12, generator=g), size=(64, 64), mode="bicubic",
                                             align_corners=True).clamp(0, 1)
    truth = random_field((64, 64), amplitude=1.5, generator=g)
    fixed = warp(moving, truth)
    field = demons(moving, fixed)
    assert float(ncc(warp(moving, field), fixed)) > float(ncc(moving, fixed))
    assert float(endpoint_error(field, truth)) < 0.5 * float(endpoint_error(torch.zeros_like(truth), truth))


@pytest.mark.skipif(not (SHARED / "mri" / "brain_3d_templates").is_dir(), reason="needs ../shared/data (brain templates)")
@pytest.mark.slow
def test_registration_slices_split(tmp_path: Path) -> None:
    from train.registration_slices import HELD_OUT_Z, main

    assert main(["--data", str(SHARED), "--out", str(tmp_path / "reg")]) == 0
    manifest = json.loads((tmp_path / "reg" / "manifest.json").read_text())
    assert not any(item.get("z") in HELD_OUT_Z for item in manifest["train"])
    assert len(manifest["test"]) == 22
    assert np.load(tmp_path / "reg" / "train" / manifest["train"][0]["file"]).shape == (128, 128)


def test_demons_registers_volumes_with_our_axis_order() -> None:
    """3-D demons: a shift along the depth axis comes back in channel 0 (our axis order, not SimpleITK's
    x, y, z), and a smooth volume deformation is undone better than by no registration."""
    pytest.importorskip("SimpleITK")
    from idm.medical.registration import demons, endpoint_error, ncc

    g = torch.Generator().manual_seed(0)
    moving = torch.nn.functional.interpolate(torch.rand(1, 1, 5, 6, 5, generator=g), size=(20, 24, 20),
                                             mode="trilinear", align_corners=True)
    shift = torch.zeros(1, 3, 20, 24, 20)
    shift[:, 0] = 1.0
    field = demons(moving, warp(moving, shift), iterations=60, levels=1)
    inner = field[:, :, 4:-4, 4:-4, 4:-4].mean(dim=(2, 3, 4))[0]
    assert float(inner[0]) > 0.5 and float(inner[1:].abs().max()) < 0.25
    truth = random_field((20, 24, 20), amplitude=1.0, control=3, generator=g)
    fixed = warp(moving, truth)
    field = demons(moving, fixed, iterations=60, levels=2)
    assert float(ncc(warp(moving, field), fixed)) > float(ncc(moving, fixed))
    assert float(endpoint_error(field, truth)) < float(endpoint_error(torch.zeros_like(truth), truth))


def test_training_on_volumes_exports_a_3d_network(tmp_path: Path) -> None:
    """--ndim 3: volumes as data (every two an inter-subject pair, and synthetic warps), an exported
    checkpoint that registers volumes (γ = 0 the identity) and refuses slices; 2-D slices refused."""
    from idm.medical.registration import register
    from idm.training.registration import load_registration

    data, val = tmp_path / "volumes", tmp_path / "pairs"
    data.mkdir(), val.mkdir()
    g = torch.Generator().manual_seed(0)
    volumes = [torch.nn.functional.interpolate(torch.rand(1, 1, 4, 4, 4, generator=g), size=(16, 16, 16),
                                               mode="trilinear", align_corners=True) for _ in range(2)]
    for name, volume in zip("ab", volumes):
        np.save(data / f"{name}.npy", volume[0, 0].numpy())
    np.save(val / "p_moving.npy", volumes[0][0, 0].numpy())
    np.save(val / "p_fixed.npy", volumes[1][0, 0].numpy())
    for arch in ("ddm", "voxelmorph"):
        assert train_main(["--data", str(data), "--val", str(val), "--ndim", "3", "--arch", arch,
                           "--out", str(tmp_path / arch), "--steps", "2", *TINY]) == 0
        model = load_registration(tmp_path / arch / "checkpoint")
        assert model.config.ndim == 3 and "3-D brain registration" in (tmp_path / arch / "checkpoint" / "README.md").read_text()
        warped, fields = register(model, volumes[0], volumes[1], gammas=[0.0, 1.0])
        assert fields[1].shape == (1, 3, 16, 16, 16) and torch.equal(fields[0], torch.zeros_like(fields[0]))
    assert train_main(["--data", str(_slices(tmp_path / "slices")), "--ndim", "3", "--out", str(tmp_path / "bad"),
                       "--steps", "2", *TINY]) == 2
    # idm register on volumes: warped volume, (3, D, H, W) field, middle-plane frames; PNG output refused
    moving, fixed = data / "a.npy", data / "b.npy"
    out, field = tmp_path / "reg" / "warped.npy", tmp_path / "reg" / "field.npy"
    assert idm_main(["register", str(moving), str(fixed), "-o", str(out), "--field", str(field), "--frames", "3",
                     "--checkpoint", str(tmp_path / "ddm" / "checkpoint")]) == 0
    assert np.load(out).shape == (16, 16, 16) and np.load(field).shape == (3, 16, 16, 16)
    assert (tmp_path / "reg" / "warped_frames.gif").is_file()
    assert idm_main(["register", str(moving), str(fixed), "-o", str(tmp_path / "w.png"),
                     "--checkpoint", str(tmp_path / "ddm" / "checkpoint")]) == 2
    # idm bench registration on volumes: every method, the γ curve, a middle-plane figure, no 256² timing
    report = tmp_path / "bench.json"
    assert idm_main(["bench", "registration", "--data", str(val), "--checkpoints", str(tmp_path / "ddm" / "checkpoint"),
                     "--passes", "1", "--no-demons", "--json", str(report), "--figure", str(tmp_path / "b.png")]) == 0
    rows = json.loads(report.read_text())["rows"]
    assert rows[1]["gamma"]["pairs"] == 1 and "seconds" in rows[1] and "seconds_256" not in rows[1]
    assert (tmp_path / "b.png").is_file()


@pytest.mark.skipif(not (SHARED / "mri" / "brain_3d_templates").is_dir(), reason="needs ../shared/data (brain templates)")
@pytest.mark.slow
def test_registration_volumes_hold_out_icbm152(tmp_path: Path) -> None:
    from train.registration_volumes import HELD_OUT, SHAPE, main

    assert main(["--data", str(SHARED), "--out", str(tmp_path / "reg3d")]) == 0
    manifest = json.loads((tmp_path / "reg3d" / "manifest.json").read_text())
    assert HELD_OUT not in {item["file"].split(".")[0] for item in manifest["train"]} and len(manifest["test"]) == 7
    assert all(HELD_OUT in item["name"] for item in manifest["test"])
    assert np.load(tmp_path / "reg3d" / "train" / "ch2.npy").shape == SHAPE
    assert np.load(tmp_path / "reg3d" / "test" / "icbm-synthetic0_field.npy").shape == (3, *SHAPE)
