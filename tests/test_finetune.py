"""End-to-end fine-tuning (``idm.training.finetune``: ``idm finetune``, the script ``train.finetune``): export,
exact resume, re-init, DDP."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from idm.cli import main as idm_main
from idm.data import save_image
from idm.io.checkpoint import load_state, read_checkpoint_config
from idm.network import load_idm
from idm.physics import BlockCS
from idm.priors import NoiseSchedule, Prior, UNet, UNetConfig
from idm.registry import get_method
from idm.training.finetune import build_network, build_parser, lr_factor, main

ROOT = Path(__file__).resolve().parents[1]
TINY = UNetConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(1,), groups=4, num_heads=2)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # --threads 1 below sets it process-wide


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny prior checkpoint, 3 training images (48×48) and 2 validation images (44×36)."""
    root = tmp_path_factory.mktemp("finetune")
    generator = torch.Generator().manual_seed(0)
    Prior(UNet(TINY), NoiseSchedule()).save(root / "prior", "# tiny prior")
    for i in range(3):
        image = F.interpolate(torch.rand(1, 1, 12, 12, generator=generator), size=(48, 48), mode="bilinear")
        save_image(root / "data" / f"train{i}.png", image[0].clamp(0, 1))
    for i in range(2):
        image = F.interpolate(torch.rand(1, 1, 11, 9, generator=generator), size=(44, 36), mode="bilinear")
        save_image(root / "val" / f"val{i}.png", image[0].clamp(0, 1))
    return root


def tiny_args(workspace: Path, out: Path, *extra: str, steps: int = 3, ratio: float = 0.25) -> list[str]:
    return [
        "--init", str(workspace / "prior"), "--ratio", str(ratio), "--data", str(workspace / "data"),
        "--out", str(out), "--steps", str(steps), "--batch", "2", "--patch", "32", "--block-size", "8",
        "--sampling-steps", "2", "--lr", "1e-3", "--val-every", "0", "--threads", "1", "--no-progress", *extra,
    ]


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def resumed_like_straight(args, tmp_path: Path) -> Path:
    """Run ``args(run_dir, *extra)`` straight through and as two invocations (``--stop-after 2``, then
    ``--resume``); assert their loss logs are equal; return the straight run's folder."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(args(straight)) == 0
    assert main(args(split, "--stop-after", "2")) == 0
    assert main(args(split, "--resume")) == 0
    assert losses(split) == losses(straight)
    return straight


@pytest.fixture(scope="module")
def exported(workspace: Path) -> Path:
    run = workspace / "run-export"
    args = tiny_args(workspace, run, "--val", str(workspace / "val"), "--val-every", "2", steps=4)
    assert main(args) == 0
    return run


def test_finetune_trains_validates_and_exports_a_loadable_checkpoint(workspace: Path, exported: Path) -> None:
    assert len(losses(exported)) == 4
    validations = [json.loads(line) for line in (exported / "val.jsonl").read_text().splitlines()]
    assert [v["step"] for v in validations] == [2, 4]
    assert all(0 < v["psnr"] < 100 and -1 <= v["ssim"] <= 1 for v in validations)
    checkpoint = exported / "checkpoint"
    config = read_checkpoint_config(checkpoint)
    assert config["architecture"] == "idm" and config["ratio"] == 0.25 and config["block_size"] == 8
    assert config["training"]["steps"] == 4 and config["training"]["batch"] == 2
    assert config["validation"]["psnr"] == pytest.approx(validations[-1]["psnr"])
    card = (checkpoint / "README.md").read_text()
    for needle in ("python -m train.finetune", "hardware", "wall time", "4 x 2", "PSNR"):
        assert needle in card
    from safetensors import safe_open

    with safe_open(str(checkpoint / "model.safetensors"), "pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.float16}
    # the trained weights differ from the prior's initial network, and the `idm` method loads them
    state = load_state(exported / "state.safetensors")
    assert not torch.equal(state["model"]["alpha"], torch.tensor([0.5, 0.5]))
    reconstruct = get_method("idm").build(checkpoint=str(checkpoint), ratio=0.25)
    op = BlockCS((44, 36), 0.25, block_size=8)
    x = torch.rand(1, 1, 44, 36)
    with torch.no_grad():
        assert reconstruct(op.measure(x), op).shape == (1, 1, 48, 40)


def test_resume_continues_exactly(workspace: Path) -> None:
    straight, split = workspace / "straight", workspace / "split"
    assert main(tiny_args(workspace, straight, "--save-every", "2", steps=4)) == 0
    assert main(tiny_args(workspace, split, "--save-every", "2", "--stop-after", "2", steps=4)) == 0
    assert len(losses(split)) == 2 and not (split / "checkpoint").exists()
    assert main(tiny_args(workspace, split, "--save-every", "2", "--resume", steps=4)) == 0
    assert losses(split) == losses(straight)  # the same next loss as uninterrupted, bit for bit
    a, b = load_state(straight / "state.safetensors"), load_state(split / "state.safetensors")
    assert a["step"] == b["step"] == 4 and b["resumes"] == 1
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key


def test_init_from_an_idm_checkpoint_at_another_ratio(workspace: Path, exported: Path) -> None:
    run = workspace / "from-idm"
    args = tiny_args(workspace, run, steps=1, ratio=0.5)
    args[args.index("--init") + 1] = str(exported / "checkpoint")
    assert main(args) == 0
    config = read_checkpoint_config(run / "checkpoint")
    assert config["ratio"] == 0.5
    assert config["training"]["init_kind"] == "idm" and config["training"]["init_ratio"] == 0.25
    # the network starts from the 25% checkpoint's weights (not from the prior)
    parsed = build_parser().parse_args(args)
    start, provenance = build_network(parsed)
    source, _ = load_idm(exported / "checkpoint")
    assert provenance["init_kind"] == "idm" and start.levels == "both"
    for (key, a), b in zip(start.unique_state_dict().items(), source.unique_state_dict().values()):
        assert torch.equal(a, b), key
    # the number of sampler passes is not part of the weights: it may change
    with_passes, _ = build_network(build_parser().parse_args([*args, "--passes", "2"]))
    assert with_passes.config.passes == 2 and start.config.passes == 1
    # the architecture of an IDM --init is fixed
    args[args.index("--sampling-steps") + 1] = "3"
    args[args.index("--out") + 1] = str(workspace / "from-idm-T3")
    assert main(args) == 2


def test_user_errors_exit_with_status_2(workspace: Path, capsys) -> None:
    run = workspace / "errors"
    assert idm_main(["finetune", *tiny_args(workspace, run, "--patch", "36", steps=1)]) == 2
    assert "multiple of --block-size" in capsys.readouterr().err
    assert main(tiny_args(workspace, run, steps=1)) == 0
    assert main(tiny_args(workspace, run, steps=1)) == 2  # state exists, no --resume
    assert "--resume" in capsys.readouterr().err
    assert main(tiny_args(workspace, run, "--resume", "--seed", "1", steps=1)) == 2
    assert "--seed" in capsys.readouterr().err
    assert main(tiny_args(workspace, workspace / "errors2", "--ratio", "0", steps=1)) == 2
    assert main(tiny_args(workspace, workspace / "errors3", "--init", str(workspace / "nope"), steps=1)) == 2
    assert "not found" in capsys.readouterr().err


def test_learning_rate_schedules() -> None:
    assert [lr_factor(s, "step", 0, 100) for s in (0, 19, 20, 40, 60, 80, 99)] == [1, 1, 0.5, 0.25, 0.125, 0.0625, 0.0625]
    assert lr_factor(0, "cosine", 10, 100) == pytest.approx(0.1)
    assert lr_factor(10, "cosine", 10, 100) == pytest.approx(1.0)
    assert lr_factor(100, "cosine", 10, 100) == pytest.approx(0.1)


def test_level_sampling_draws_from_the_range_uniformly_or_log_uniformly() -> None:
    import argparse

    from idm.training.tasks import step_level

    def draws(sampling: str) -> torch.Tensor:
        args = argparse.Namespace(operator="blockcs", ratio=None, ratio_range=[0.05, 0.6], seed=0, level_sampling=sampling)
        return torch.tensor([step_level(args, s) for s in range(2000)])

    uniform, log = draws("uniform"), draws("log")
    for values in (uniform, log):
        assert 0.05 <= float(values.min()) and float(values.max()) <= 0.6
    assert torch.equal(uniform, draws("uniform"))  # seeded by the step: --resume replays it
    share = {name: float((v < 0.15).double().mean()) for name, v in (("uniform", uniform), ("log", log))}
    assert share["uniform"] == pytest.approx(0.1 / 0.55, abs=0.03)
    assert share["log"] == pytest.approx(math.log(3) / math.log(12), abs=0.03)


def test_two_cpu_processes_stay_in_sync_and_match_one_process(workspace: Path) -> None:
    """DDP over gloo (torchrun + accelerate on CPU): ranks agree and equal a single process on the global batch.

    About 25 s (two fresh interpreters); not marked slow since it is the only proof of the distributed path.
    """
    if not shutil.which("torchrun", path=str(Path(sys.executable).parent)):
        pytest.skip("torchrun not installed next to the interpreter")
    torchrun = str(Path(sys.executable).parent / "torchrun")
    single, multi = workspace / "single", workspace / "ddp"
    assert main(tiny_args(workspace, single, steps=2)) == 0
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [torchrun, "--nproc_per_node", "2", "--master_port", "29531", "-m", "train.finetune",
               *tiny_args(workspace, multi, steps=2), "--save-every", "1"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    config = read_checkpoint_config(multi / "checkpoint")
    assert config["training"]["hardware"].startswith("2 x ")  # really two processes
    # every save checked that both ranks hold identical parameters (the run fails otherwise)
    assert len(losses(multi)) == 2  # one log, written by rank 0 only
    assert losses(multi) == pytest.approx(losses(single), rel=1e-5)
    a, b = load_state(single / "state.safetensors"), load_state(multi / "state.safetensors")
    for key, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][key], tensor, rtol=1e-4, atol=1e-5)


def test_coupling_v_option_sets_every_coupling(workspace: Path) -> None:
    parsed = build_parser().parse_args(tiny_args(workspace, workspace / "v", "--coupling-v", "0.2", steps=1))
    net, provenance = build_network(parsed)
    assert provenance["init_kind"] == "prior" and net.config.coupling_v == pytest.approx(0.2)
    vs = [c.v.item() for c in net.sampler.couplings] + [c.v.item() for s in net.unet.sequences() for c in s.couplings]
    assert vs and all(v == pytest.approx(0.2) for v in vs)
    assert main(tiny_args(workspace, workspace / "v-bad", "--coupling-v", "1.5", steps=1)) == 2


def test_alpha_init_option_sets_the_initial_schedule(workspace: Path, capsys) -> None:
    parsed = build_parser().parse_args(tiny_args(workspace, workspace / "a", "--alpha-init", "0.85", steps=1))
    net, _ = build_network(parsed)
    assert net.config.alpha_init == pytest.approx(0.85)
    torch.testing.assert_close(net.abar().detach().double(), torch.tensor([1.0, 0.85, 0.85**2], dtype=torch.float64))
    assert main(tiny_args(workspace, workspace / "a-bad", "--alpha-init", "1.0", steps=1)) == 2
    assert "alpha_init" in capsys.readouterr().err
    assert main(tiny_args(workspace, workspace / "a-prior", "--alpha-init", "0.8", "--schedule-init", "prior", steps=1)) == 2
    assert "--schedule-init prior" in capsys.readouterr().err
    unrolled = tiny_args(workspace, workspace / "a-unrolled", "--arch", "unrolled", "--alpha-init", "0.8", steps=1)
    at = unrolled.index("--sampling-steps")
    assert main(unrolled[2:at] + unrolled[at + 2:]) == 2  # no --init (scratch), no --sampling-steps
    assert "--alpha-init" in capsys.readouterr().err


# --- MRI and CT (idm.training.tasks) ---------------------------------------------------------------
@pytest.fixture(scope="module")
def denoiser_prior(tmp_path_factory) -> Path:
    """A tiny DnCNN denoiser checkpoint (the backbone medical IDM networks start from)."""
    from idm.priors.denoiser import DenoiserPrior
    from idm.priors.dncnn import DnCNN, DnCNNConfig

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("dncnn") / "tiny-dncnn"
    DenoiserPrior(DnCNN(DnCNNConfig(depth=4, features=8, sigma_input=True))).save(root, "# tiny", dtype=None)
    return root


@pytest.mark.parametrize("operator, options, trained", [
    ("mri", ["--acceleration", "2,4"], {"acceleration_range": [2.0, 4.0], "mask_type": "random"}),
    ("ct", ["--views", "6,12", "--wedge", "90,150", "--dc-iterations", "2", "--start", "fbp"],
     {"views_range": [6, 12], "angle_range": [0.0, 180.0], "wedge_range": [90.0, 150.0]}),
])
def test_medical_finetune_exports_a_checkpoint_the_idm_method_picks_and_resumes_exactly(
        workspace: Path, denoiser_prior: Path, tmp_path: Path, monkeypatch, operator: str, options: list[str],
        trained: dict) -> None:
    def args(out: Path, *extra: str) -> list[str]:
        return ["--operator", operator, *options, "--prior", str(denoiser_prior), "--data", str(workspace / "data"),
                "--val", str(workspace / "val"), "--out", str(out), "--steps", "4", "--batch", "2", "--patch", "32",
                "--sampling-steps", "2", "--levels", "none", "--val-every", "0", "--save-every", "2", "--threads", "1",
                "--no-progress", *extra]

    straight = resumed_like_straight(args, tmp_path)
    config = read_checkpoint_config(straight / "checkpoint")
    assert config["operator"] == operator and config["trained_operator"] == trained
    assert config["ratio"] is None and config["block_size"] is None and "matrix_seed" not in config
    assert set(config["validation"]) >= {"psnr", "ssim"} and len([k for k in config["validation"] if "@" in k]) == 6
    assert config["idm"]["complex"] == (operator == "mri")
    card = (straight / "checkpoint" / "README.md").read_text()
    assert f"--operator {operator}" in card and "--block-size" not in card
    # the `idm` method picks idm-<operator> for the operator's kind, without a ratio
    monkeypatch.setenv("IDM_CHECKPOINT_DIR", str(tmp_path))
    shutil.copytree(straight / "checkpoint", tmp_path / f"idm-{operator}")
    from idm.evaluation import operator_factory

    op = operator_factory(operator, **({"acceleration": 3} if operator == "mri" else {"views": 9}))((40, 36), 0)
    x = torch.rand(1, 1, 40, 36)
    with torch.no_grad():
        out = get_method("idm").build()(op.measure(x), op)
    assert out.shape == (1, 1, 40, 36) and out.is_complex() == (operator == "mri")


def test_medical_options_are_checked(workspace: Path, denoiser_prior: Path, tmp_path: Path, capsys) -> None:
    base = ["--prior", str(denoiser_prior), "--data", str(workspace / "data"), "--steps", "1", "--batch", "1",
            "--patch", "32", "--threads", "1", "--no-progress"]
    for extra, message in ((["--operator", "mri"], "needs --acceleration"),
                           (["--operator", "ct", "--views", "12,6"], "--views needs"),
                           (["--operator", "ct", "--views", "8", "--wedge", "90,180"], "--wedge needs"),
                           (["--operator", "mri", "--acceleration", "4", "--ratio", "0.1"], "--ratio do(es) not apply"),
                           (["--operator", "ct", "--views", "8", "--arch", "unrolled", "--init", "x"], "--arch unrolled"),
                           (["--ratio", "0.25", "--acceleration", "4"], "--acceleration do(es) not apply"),
                           (["--operator", "ct", "--views", "8", "--ztv", "0.1,10"], "--chunk-depth")):
        assert main([*base, *extra, "--out", str(tmp_path / "r")]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "r").exists()


def test_volume_chunk_finetune_with_ztv_resumes_exactly(denoiser_prior: Path, tmp_path: Path, capsys) -> None:
    """``--chunk-depth D --ztv LAM,RHO``: each step is one chunk of D contiguous slices of a training
    volume, reconstructed as one volume with z-TV data consistency through the reversible machinery
    (``--levels both``); the run resumes exactly and its checkpoint keeps the coupling."""
    nib = pytest.importorskip("nibabel")
    volumes = tmp_path / "volumes"
    volumes.mkdir()
    generator = np.random.default_rng(0)
    for k in range(2):
        hu = generator.uniform(-1000, 1000, size=(36, 36, 6 + k)).astype(np.float32)  # (x, y, z) on disk
        nib.save(nib.Nifti1Image(hu, np.eye(4)), str(volumes / f"ct{k}.nii.gz"))

    def args(out: Path, *extra: str) -> list[str]:
        return ["--operator", "ct", "--views", "6,12", "--dc-iterations", "2", "--prior", str(denoiser_prior),
                "--data", str(volumes), "--chunk-depth", "4", "--ztv", "0.1,10", "--out", str(out), "--steps", "4",
                "--batch", "1", "--patch", "32", "--sampling-steps", "2", "--levels", "both", "--val-every", "0",
                "--save-every", "2", "--threads", "1", "--no-progress", *extra]

    straight = resumed_like_straight(args, tmp_path)
    config = read_checkpoint_config(straight / "checkpoint")
    assert config["idm"]["ztv"] == [0.1, 10.0]
    card = (straight / "checkpoint" / "README.md").read_text()
    assert "--chunk-depth 4" in card and "--ztv" in card
    assert main(args(tmp_path / "bad", "--batch", "2")) == 2
    assert "--batch 1" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_idm_volume_option_couples_the_slices(denoiser_prior: Path, tmp_path: Path) -> None:
    """``idm`` with ``volume=true`` runs z-TV consistency over the batch: slices are no longer
    reconstructed independently; ``volume=false`` (default for a 2D checkpoint) keeps them apart."""
    from idm.network import idm_from_prior
    from idm.physics import ParallelBeamCT

    net = idm_from_prior(str(denoiser_prior), steps=2, levels="none", dc_iterations=3)
    net.save(tmp_path / "idm-ct", "# tiny", ratio=None, operator="ct")
    op = ParallelBeamCT((24, 24), views=40)  # well-posed: A†y is stable, batch and single agree closely
    x = torch.rand(4, 1, 24, 24, generator=torch.Generator().manual_seed(0))
    y = op.A(x)
    flat = get_method("idm").build(checkpoint=str(tmp_path / "idm-ct"))
    coupled = get_method("idm").build(checkpoint=str(tmp_path / "idm-ct"), volume=True, lam=0.2, rho=10.0)
    together, alone = flat(y, op), torch.cat([flat(y[i : i + 1], op) for i in range(4)])
    # apart up to rounding (float32 sums in another order, through the ill-conditioned CG of A†y)
    rounding = float((together - alone).abs().max())
    assert rounding < 1e-3 and float((coupled(y, op) - together).abs().max()) > 10 * rounding
    from idm.errors import IDMError

    with pytest.raises(IDMError, match="need volume=true"):
        get_method("idm").build(checkpoint=str(tmp_path / "idm-ct"), volume=False, lam=0.1)


def test_idm_chunk_splits_the_batch_without_changing_the_result(denoiser_prior: Path, tmp_path: Path) -> None:
    """``idm`` option ``chunk`` bounds the items per network call; items are independent, so the result
    matches one call up to float rounding; with z-TV coupling it is refused (the volume is one batch)."""
    from idm.errors import IDMError
    from idm.network import idm_from_prior
    from idm.physics import ParallelBeamCT

    net = idm_from_prior(str(denoiser_prior), steps=2, levels="none", dc_iterations=3)
    net.save(tmp_path / "idm-ct", "# tiny", ratio=None, operator="ct")
    op = ParallelBeamCT((24, 24), views=40)
    y = op.A(torch.rand(5, 1, 24, 24, generator=torch.Generator().manual_seed(1)))
    whole = get_method("idm").build(checkpoint=str(tmp_path / "idm-ct"), chunk=5)(y, op)
    pieces = get_method("idm").build(checkpoint=str(tmp_path / "idm-ct"), chunk=2)(y, op)
    # float32 rounding differs with the batch size and the CG of A†y amplifies it: A†y itself moves so much
    rounding = float((op.A_dagger(y) - torch.cat([op.A_dagger(y[i : i + 2]) for i in range(0, 5, 2)])).abs().max())
    assert pieces.shape == whole.shape and float((pieces - whole).abs().max()) <= 2 * rounding + 1e-5
    with pytest.raises(IDMError, match="volume=true"):
        get_method("idm").build(checkpoint=str(tmp_path / "idm-ct"), volume=True, chunk=2)
    with pytest.raises(IDMError, match="chunk"):
        get_method("idm").build(checkpoint=str(tmp_path / "idm-ct"), chunk=0)
