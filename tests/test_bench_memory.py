"""``idm bench memory``: memory accounting, flatness in T, JSON/plot outputs, CLI errors."""

from __future__ import annotations

import json

import pytest
import torch

from idm.bench.accounting import peak_from_trace, peak_memory_bytes
from idm.bench.memory import BENCH_MODES, UNET_PRESETS, MemoryCase, chain_factory, run_memory_bench
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
    factory = chain_factory(UNET_PRESETS["tiny"])
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
def test_invertible_memory_is_flat_in_steps_and_vanilla_grows(memory_format):
    result = run_memory_bench(
        steps=[1, 4], sizes=[32], modes=["vanilla", "invertible"], batch=1, device="cpu",
        factory=chain_factory(UNET_PRESETS["tiny"]), memory_format=memory_format,
    )
    peak = {(r["mode"], r["steps"]): r["peak_bytes"] for r in result["rows"]}
    assert peak[("invertible", 4)] <= 1.15 * peak[("invertible", 1)]
    assert peak[("vanilla", 4)] >= 2.0 * peak[("vanilla", 1)]
    assert peak[("invertible", 4)] < peak[("vanilla", 4)] / 2


def test_unknown_memory_format_is_refused():
    with pytest.raises(IDMError, match="memory format"):
        run_memory_bench(steps=[1], sizes=[8], modes=["vanilla"], batch=1, device="cpu",
                         factory=chain_factory(UNET_PRESETS["tiny"]), memory_format="nchw")


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
        (["--size", "7"], "multiple of 2"),
        (["--unet-config", "huge"], "unknown U-Net config"),
        (["--plot", "memory.pdf"], ".png"),
        (["--steps", "0"], "--steps"),
        (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--batch", "0"], ""),
    ],
)
def test_bench_memory_cli_rejects_bad_arguments(extra, message, capsys, tmp_path):
    args = ["bench", "memory", "--steps", "1", "--size", "8", "--unet-config", "tiny", "--modes", "vanilla"]
    code = main([*args, *extra, "--json", str(tmp_path / "never.json")])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "never.json").exists()
