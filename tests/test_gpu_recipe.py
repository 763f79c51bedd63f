"""``train.gpu_recipe``: the toy recipe end to end on the CPU (pre-training, probe, three chained IDM
stages, evaluations, results.json), packing for the device tool, the export of a run stopped by
time, the plan and bad arguments."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from idm.data import save_image
from idm.io.checkpoint import read_checkpoint_config
from idm.network import load_idm
from idm.priors import load_prior
from train import gpu_recipe
from train.gpu_recipe import PRIOR_STAGE, STAGES, ProcessResult, main

ROOT = Path(__file__).resolve().parents[1]
IDM_STAGES = [s for s in STAGES if s.kind == "finetune" and s.ratio is not None]  # one ratio each
MULTI_STAGES = [s for s in STAGES if s.kind == "finetune" and s.ratio is None]  # --ratio-range


def _environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """4 training and 2 validation images, 64×64, smooth random fields."""
    root = tmp_path_factory.mktemp("recipe-images")
    generator = torch.Generator().manual_seed(0)
    for folder, count in (("train", 4), ("val", 2)):
        for i in range(count):
            image = F.interpolate(torch.rand(1, 1, 10, 10, generator=generator), size=(64, 64), mode="bilinear")
            save_image(root / folder / f"{folder}{i}.png", image[0].clamp(0, 1))
    return root


@pytest.fixture(scope="module")
def toy_run(images: Path, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, float]:
    root = tmp_path_factory.mktemp("recipe-run")
    out, work = root / "out", root / "work"
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "train.gpu_recipe", "--toy", "--data", str(images / "train"), "--val",
         str(images / "val"), "--out", str(out), "--work", str(work)],
        cwd=ROOT, env=_environment(), capture_output=True, text=True, timeout=600,
    )
    return out, proc, time.monotonic() - started


def test_toy_recipe_trains_evaluates_and_writes_results(toy_run) -> None:
    out, proc, seconds = toy_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "complete", results["errors"]
    assert results["errors"] == []
    assert (out / "recipe.log").read_text().count("exit status 0") >= 9  # 4 stages, probe, 3 idm + 3 tv evals
    assert [s["name"] for s in results["stages"]] == [s.name for s in STAGES]
    assert all(s["status"] == "done" for s in results["stages"])
    assert sum(results["time_shares"].values()) == pytest.approx(1.0)
    assert results["probe"]["steps"] >= 1 and results["probe"]["rate_steps_per_s"] > 0
    assert set(results["checkpoints"]) == {s.name for s in STAGES}
    assert seconds < 240  # the toy recipe is meant to take about a minute

    prior_entry = results["checkpoints"][PRIOR_STAGE]
    assert prior_entry["kind"] == "prior" and prior_entry["steps"] >= 1 and prior_entry["train_wall_s"] > 0
    prior = load_prior(out / prior_entry["path"])
    assert prior.unet.config.base_channels == gpu_recipe.PRETRAIN_OPTIONS["toy"]["base-channels"]
    assert prior_entry["denoising"]  # --eval-data: denoising PSNR in the card

    for stage in MULTI_STAGES:  # one network for a ratio range, scored at each of its ratios
        entry = results["checkpoints"][stage.name]
        assert entry["ratio"] is None and sorted(entry["scores"]) == sorted(f"{r:g}" for r in stage.eval_ratios)
        for row in entry["scores"].values():
            assert 0 < row["psnr"] < 100 and 0 < row["tv_psnr"] < 100
        net, config = load_idm(out / entry["path"], ratio=0.2)  # a ratio inside the range, never evaluated
        assert config["ratio_range"] == [0.05, 0.6] and net.config.denoiser is not None
    for stage in IDM_STAGES:
        entry = results["checkpoints"][stage.name]
        for key in ("ratio", "psnr", "ssim", "tv_psnr", "tv_ssim", "train_wall_s", "steps", "planned_steps",
                    "init", "path", "gain_over_tv_db"):
            assert entry[key] is not None, (stage.name, key)
        assert entry["ratio"] == stage.ratio and entry["steps"] == entry["planned_steps"] >= 1
        assert 0 < entry["psnr"] < 100 and -1 <= entry["ssim"] <= 1 and 0 < entry["tv_psnr"] < 100
        assert entry["val_images"] == 2 and entry["stopped_by_time"] is False
        # idm eval scores the stored weights; the fine-tuning validation scored the fp32 ones
        assert entry["psnr"] == pytest.approx(entry["training_validation"]["psnr"], abs=0.1)
        path = out / entry["path"]
        assert {"model.safetensors", "config.json", "README.md"} <= {p.name for p in path.iterdir()}
        net, config = load_idm(path, ratio=stage.ratio)
        assert config["training"]["steps"] == entry["steps"]
        card = (path / "README.md").read_text()  # the card: training (train.finetune), then the recipe's scores
        assert card.count(gpu_recipe.CARD_MARKER) == 1 and f"{entry['psnr']:.2f} dB" in card
        assert f"{entry['tv_psnr']:.2f} dB" in card
        assert sum(p.numel() for p in net.unique_state_dict().values()) == entry["parameters"]
    # the chain: cs10 from the recipe's prior, cs30 from cs10, cs50 from cs30
    assert read_checkpoint_config(out / "checkpoints" / "idm-cs10")["training"]["init_kind"] == "prior"
    assert results["checkpoints"]["idm-cs30"]["init"] == "the IDM checkpoint of stage idm-cs10 of this run"
    assert read_checkpoint_config(out / "checkpoints" / "idm-cs50")["training"]["init_ratio"] == 0.3


def test_checkpoints_pack_for_the_device_tool_and_unpack(toy_run, tmp_path: Path) -> None:
    out, proc, _ = toy_run
    assert proc.returncode == 0
    packed = tmp_path / "OUT"
    for stage in STAGES:
        gpu_recipe.pack_checkpoint(out / "checkpoints" / stage.name, packed / "checkpoints" / f"{stage.name}.tar.gz")
    (packed / "results.json").write_text("{}")
    report = gpu_recipe.transfer_report(packed)
    assert report["files"] == len(STAGES) + 1 and report["problems"] == []
    unpacked = gpu_recipe.unpack_checkpoints(packed / "checkpoints", tmp_path / "unpacked")
    assert sorted(p.name for p in unpacked) == sorted(s.name for s in STAGES)
    net, config = load_idm(tmp_path / "unpacked" / "idm-cs30", ratio=0.3)
    original, _ = load_idm(out / "checkpoints" / "idm-cs30")
    for key, value in original.unique_state_dict().items():
        assert torch.equal(value, net.unique_state_dict()[key])


def test_transfer_report_names_what_would_not_come_back(tmp_path: Path) -> None:
    for i in range(9):
        (tmp_path / f"f{i}").write_bytes(b"x")
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "file").write_bytes(b"x")
    problems = " ".join(gpu_recipe.transfer_report(tmp_path)["problems"])
    assert "10 files" in problems and "a/b/c/file" in problems


def test_a_finetune_run_stopped_by_time_is_exported_from_its_state(tmp_path: Path, images: Path) -> None:
    from conftest import tiny_prior, tiny_unet_config

    from idm.training import finetune

    tiny_prior(tiny_unet_config(), seed=0).save(tmp_path / "prior", "# tiny prior")
    argv = ["--prior", str(tmp_path / "prior"), "--ratio", "0.25", "--data", str(images / "train"),
            "--val", str(images / "val"), "--out", str(tmp_path / "run"), "--steps", "50", "--batch", "2",
            "--patch", "32", "--sampling-steps", "2", "--val-every", "0", "--threads", "1", "--no-progress",
            "--max-minutes", "0.00001"]
    threads = torch.get_num_threads()
    try:
        assert finetune.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    assert not (tmp_path / "run" / "checkpoint").exists()  # stopped by --max-minutes: no export
    export = gpu_recipe.export_finetune_state(argv, tmp_path / "export", planned_steps=50)
    net, config = load_idm(export, ratio=0.25)
    assert 1 <= config["training"]["steps"] < 50
    assert config["training"]["planned_steps"] == 50 and config["training"]["stopped_by"] == "time budget"
    assert config["validation"]["psnr"] > 0
    assert "Stopped by the time budget" in (export / "README.md").read_text()


def test_process_result_rates_exclude_start_up() -> None:
    result = ProcessResult(0, started=0.0, ended=13.0, samples=[(5.0, 1), (6.0, 2), (8.0, 12), (10.0, 22)])
    assert result.steady_rate() == pytest.approx(5.0)
    assert result.overhead() == pytest.approx(5.0 + 3.0)
    assert result.steps == 22 and result.ok
    assert ProcessResult(1, 0.0, 1.0).steady_rate() is None
    assert ProcessResult(0, 0.0, 3.0, samples=[(2.0, 1)]).steady_rate() == pytest.approx(0.5)


def test_option_helpers_and_loss_curve(tmp_path: Path) -> None:
    argv = gpu_recipe.options_to_argv({"batch": 4, "lr": 1e-3, "attn": ""})
    assert argv == ["--batch", "4", "--lr", "0.001", "--attn", ""]
    assert gpu_recipe.set_option(argv, "batch", 8)[:2] == ["--batch", "8"]
    assert gpu_recipe.get_option(gpu_recipe.set_option(argv, "mixed-precision", "no"), "mixed-precision") == "no"
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in range(1, 101)))
    curve = gpu_recipe.loss_curve(log, points=10)
    assert len(curve) == 10 and curve[0] == [10, 5.5] and curve[-1] == [100, 95.5]


def test_plan_prints_the_stages_and_runs_nothing(images: Path, tmp_path: Path, capsys) -> None:
    assert main(["--data", str(images / "train"), "--val", str(images / "val"), "--out", str(tmp_path / "out"),
                 "--work", str(tmp_path / "work"), "--plan"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in plan["stages"]] == [s.name for s in STAGES]
    assert sum(row["share"] for row in plan["stages"]) == pytest.approx(1.0)
    assert all(row["train_s"] > 0 for row in plan["stages"])
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


@pytest.mark.parametrize("extra, message", [
    (["--budget-minutes", "0"], "--budget-minutes must be positive"),
    (["--budget-minutes", "nan"], "--budget-minutes must be positive"),
    (["--stages", "idm-cs20"], "unknown stage"),
    (["--stages", "idm-cs10,idm-cs30"], "needs --idm-prior"),
    (["--idm-prior", "no-such-prior"], "--idm-prior"),
    (["--bogus"], "unrecognized arguments"),
])
def test_bad_arguments_give_one_error_line(images: Path, tmp_path: Path, capsys, extra, message) -> None:
    argv = ["--toy", "--data", str(images / "train"), "--val", str(images / "val"), "--out", str(tmp_path / "out"),
            "--work", str(tmp_path / "work"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "out").exists()


def test_bad_folders_and_used_out_exit_2(images: Path, tmp_path: Path) -> None:
    base = ["-m", "train.gpu_recipe", "--toy", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]
    cases = [
        (["--data", str(tmp_path / "missing"), "--val", str(images / "val")], "--data"),
        (["--data", str(images / "train"), "--val", str(tmp_path)], "no images"),
        (["--val", str(images / "val")], "--data"),  # required
    ]
    for extra, message in cases:
        proc = subprocess.run([sys.executable, *base, *extra], cwd=ROOT, env=_environment(), capture_output=True,
                              text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert lines[0].startswith("error: ") and message in lines[0]
    (tmp_path / "used" / "checkpoints").mkdir(parents=True)
    assert main(["--toy", "--data", str(images / "train"), "--val", str(images / "val"),
                 "--out", str(tmp_path / "used")]) == 2


def test_a_failing_stage_is_recorded_and_nothing_produced_exits_1(images: Path, tmp_path: Path) -> None:
    # a reconstructor checkpoint is not a prior: the probe and the stage fail (train.finetune exits 2)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "train.gpu_recipe", "--toy", "--data", str(images / "train"), "--val",
         str(images / "val"), "--out", str(out), "--work", str(tmp_path / "work"), "--stages", "idm-cs10",
         "--idm-prior", "unrolled-cs10"],
        cwd=ROOT, env=_environment(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "failed" and results["checkpoints"] == {}
    assert [(s["name"], s["status"]) for s in results["stages"]] == [("idm-cs10", "failed")]
    assert any("not a prior" in line for line in (out / "recipe.log").read_text().splitlines())
    assert any("probe" in e for e in results["errors"]) and any("idm-cs10" in e for e in results["errors"])
    assert results["tv"]["0.1"]["val"]["psnr"] > 0  # the reference still ran


def test_out_equal_to_the_device_tools_out_switches_packing_on(images: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("OUT", str(tmp_path / "device-out"))
    common = ["--data", str(images / "train"), "--val", str(images / "val"), "--work", str(tmp_path / "w"), "--plan"]
    args, stages = gpu_recipe.parse_args(["--out", str(tmp_path / "device-out"), *common])
    assert args.pack and [s.name for s in stages] == [s.name for s in STAGES]
    args, _ = gpu_recipe.parse_args(["--out", str(tmp_path / "elsewhere"), *common])
    assert not args.pack


def test_scores_of_a_multi_ratio_stage_are_kept_per_ratio(tmp_path: Path) -> None:
    import argparse

    stage = gpu_recipe.Stage("idm-range", "finetune", 1.0, init="prior", args=("--ratio-range", "0.05,0.6"),
                             ratios=(0.1, 0.5))
    assert gpu_recipe.Recipe.ratio_options(stage) == [] and stage.eval_ratios == (0.1, 0.5)
    args = argparse.Namespace(toy=True, out=str(tmp_path / "out"), work=str(tmp_path / "work"), budget_minutes=1.0,
                              val="val", test=None, data="data", pack=False, idm_prior=None, argv=[])
    recipe = gpu_recipe.Recipe(args, [stage])
    recipe.results = {"checkpoints": {"idm-range": {"kind": "idm", "ratio": None, "eval_ratios": [0.1, 0.5],
                                                    "evaluation": {"val@0.1": {"psnr": 25.0, "ssim": 0.7, "images": 12}}}},
                      "tv": {"0.1": {"val": {"psnr": 24.0, "ssim": 0.6}}}, "command": "python -m train.gpu_recipe --toy"}
    recipe.merge_scores()
    entry = recipe.results["checkpoints"]["idm-range"]
    assert entry["scores"]["0.1"]["gain_over_tv_db"] == pytest.approx(1.0)
    assert entry["scores"]["0.5"]["psnr"] is None and "psnr" not in entry  # no flat keys for several ratios
    assert not recipe.scored()
    entry["evaluation"]["val@0.5"] = {"psnr": 30.0, "ssim": 0.8, "images": 12}
    recipe.merge_scores()
    assert recipe.scored()
    assert "| 0.5 | `val` (12 images) | 30.00 dB / 0.8000 | n/a |" in recipe.card_section("idm-range", entry)
    for executor in recipe.executors.values():
        executor.shutdown()
