"""``idm bench memory``: memory accounting, flatness in T, JSON/plot outputs, CLI errors."""

from __future__ import annotations

import json
import re

import pytest
import torch

from idm.bench.accounting import peak_from_trace, peak_memory_bytes
from idm.bench.memory import BENCH_MODES, UNET_PRESETS, MemoryCase, idm_factory, run_memory_bench
from idm.cli import main
from idm.errors import IDMError


pytestmark = pytest.mark.usefixtures("one_thread")


def test_cpu_peak_counts_transient_allocations():
    base = torch.randn(500, 500)  # allocated before: not counted

    def step() -> torch.Tensor:
        a = torch.empty(1_000_000, dtype=torch.uint8)  # 1 MB
        b = torch.empty(3_000_000, dtype=torch.uint8)  # +3 MB -> peak 4 MB
        del a, b
        kept = torch.empty(2_000_000, dtype=torch.uint8)  # 2 MB, alive at the end
        return kept + base.sum().to(torch.uint8)

    peak = peak_memory_bytes(step, "cpu")
    assert 4_000_000 <= peak <= 4_100_000


def test_peak_from_trace_uses_time_order_and_ignores_other_devices():
    def event(ts: float, nbytes: int, device_type: int = 0) -> dict:
        return {"name": "[memory]", "ts": ts, "args": {"Bytes": nbytes, "Device Type": device_type}}

    trace = {"traceEvents": [event(3, -5), event(1, 10), event(2, 7), event(2.5, 100, device_type=1), event(4, 1)]}
    assert peak_from_trace(trace) == 17


def test_all_modes_compute_the_same_loss():
    factory = idm_factory(UNET_PRESETS["tiny"])
    losses = []
    for mode in BENCH_MODES:
        setup = factory(MemoryCase(mode, 2, 16, 1), torch.device("cpu"))
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():  # same perturbation in every mode, so the U-Net output is not zero
            for param in setup.model.parameters():
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
        losses.append(float(setup.loss().detach()))
    assert min(losses) > 0
    assert max(losses) - min(losses) <= 1e-6 * max(losses)


@pytest.mark.parametrize("memory_format", ["channels_last", "contiguous"])
def test_invertible_memory_stores_no_activations_per_step_and_vanilla_does(memory_format):
    """From T = 1 to 4 the invertible network's peak grows only by per-step bytes that do not depend
    on the image size (each step's injector weights and their gradients), while vanilla stores every
    step's activations: its growth scales with the number of pixels (4× from 32² to 64²)."""
    result = run_memory_bench(
        steps=[1, 4], sizes=[32, 64], modes=["vanilla", "invertible"], batch=1, device="cpu",
        factory=idm_factory(UNET_PRESETS["tiny"]), memory_format=memory_format,
    )
    peak = {(r["mode"], r["steps"], r["size"]): r["peak_bytes"] for r in result["rows"]}

    def growth(mode: str, size: int) -> int:
        return peak[(mode, 4, size)] - peak[(mode, 1, size)]

    assert growth("vanilla", 64) >= 3.0 * growth("vanilla", 32) > 0
    assert growth("invertible", 64) <= 1.25 * growth("invertible", 32)
    assert growth("invertible", 64) < growth("vanilla", 64) / 10
    assert peak[("invertible", 4, 64)] < peak[("vanilla", 4, 64)] / 2


def test_unknown_memory_format_is_refused():
    with pytest.raises(IDMError, match="memory format"):
        run_memory_bench(steps=[1], sizes=[8], modes=["vanilla"], batch=1, device="cpu",
                         factory=idm_factory(UNET_PRESETS["tiny"]), memory_format="nchw")


def test_bench_memory_cli_writes_json_and_plot(tmp_path, capsys):
    out_json, out_png = tmp_path / "mem.json", tmp_path / "mem.png"
    code = main([
        "bench", "memory", "--steps", "1", "2", "--size", "8", "--unet-config", "tiny",
        "--modes", "vanilla", "invertible-steps", "--json", str(out_json), "--plot", str(out_png),
    ])
    assert code == 0
    result = json.loads(out_json.read_text())
    assert set(result) == {"device", "rows"} and result["device"] == "cpu"
    assert len(result["rows"]) == 4
    for row in result["rows"]:
        assert set(row) == {"mode", "steps", "size", "batch", "peak_bytes", "seconds_per_step"}
        assert row["mode"] in ("vanilla", "invertible-steps") and row["size"] == 8 and row["batch"] == 1
        assert isinstance(row["peak_bytes"], int) and row["peak_bytes"] > 0
        assert isinstance(row["seconds_per_step"], float) and row["seconds_per_step"] > 0
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "invertible-steps" in printed and "peak MiB" in printed
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--size", "7"], r"error: --size 7 must be a positive multiple of \d+ for this network"),
        (["--unet-config", "huge"], r"error: unknown U-Net config 'huge'; use one of tiny, small, prior or a \.json file"),
        (["--plot", "memory.pdf"], r"error: --plot must name a \.png file, got memory\.pdf"),
        (["--steps", "0"], r"error: --steps must be >= 1, got 0"),
        (["--batch", "0"], r"error: --batch and --repeats must be >= 1"),
        pytest.param(["--device", "cuda:0"], r"error: --device cuda requested but CUDA is not available",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here"),
                     id="no-cuda"),
    ],
)
def test_bench_memory_cli_rejects_bad_arguments(extra, message, capsys, tmp_path):
    """Each bad argument: exit status 2 and exactly its one-line message (a regular expression matching
    the whole of stderr), before any work or output."""
    args = ["bench", "memory", "--steps", "1", "--size", "8", "--unet-config", "tiny", "--modes", "vanilla"]
    code = main([*args, *extra, "--json", str(tmp_path / "never.json")])
    assert code == 2
    out, err = capsys.readouterr()
    assert len(err.splitlines()) == 1 and re.fullmatch(message, err.strip()), err
    assert out == ""
    assert not (tmp_path / "never.json").exists()
