"""Peak memory of one call (e.g. a training step) above what was allocated before it started.

:func:`peak_memory_bytes` measures, on every device, *tensor memory allocated by PyTorch's
allocator during the call, at its highest point, minus what was allocated when the call began*:

* **CUDA**: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
  ``memory_allocated`` at the start (caching-allocator blocks in use, not reserved memory).
* **CPU**: PyTorch's CPU allocator reports every allocation and free to the profiler when
  :class:`torch.profiler.profile` runs with ``profile_memory=True``. The ``[memory]`` events of the
  trace (``Bytes`` > 0 allocation, < 0 free), summed in time order from the start of the call,
  give the net tensor bytes allocated since the start; the peak is their maximum. This counts
  *transient* memory too — the recomputation inside a reversible or checkpointed backward — unlike
  counting bytes saved for backward (``saved_tensors_hooks``), which a custom Function that saves
  nothing would report as ~0. Not counted: memory the call frees that was allocated before it
  (the result is "above the start", never below 0), allocations outside PyTorch's allocator
  (oneDNN scratch buffers, Python objects, the profiler itself), and allocator/RSS overheads.
  The profiler slows the call down, so time it separately (:func:`time_call`).

Parameter gradients created by the call (``.grad`` was ``None`` before) are part of its peak.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device | str) -> int:
    """Peak tensor bytes allocated during ``fn()`` above the amount allocated when it began (see module doc)."""
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - start)
    if device.type != "cpu":
        raise ValueError(f"memory accounting supports cpu and cuda devices, got {device}")
    return _cpu_peak_bytes(fn)


def _cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # kineto prints profiler start/stop lines otherwise
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory(prefix="idm-memory-") as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path, encoding="utf-8") as handle:
            trace = json.load(handle)
    return peak_from_trace(trace)


def peak_from_trace(trace: dict[str, Any]) -> int:
    """Max over time of the running sum of CPU ``[memory]`` event bytes in a chrome trace."""
    events = [
        e
        for e in trace.get("traceEvents", [])
        if e.get("name") == "[memory]" and int(e.get("args", {}).get("Device Type", 0)) == 0
    ]
    events.sort(key=lambda e: float(e.get("ts", 0.0)))
    current = peak = 0
    for event in events:
        current += int(event["args"].get("Bytes", 0))
        peak = max(peak, current)
    return peak


def time_call(fn: Callable[[], Any], device: torch.device | str, repeats: int = 1) -> float:
    """Fastest wall-clock seconds of ``fn()`` over ``repeats`` calls (device synchronised).

    The minimum, not the mean: other processes on a shared machine only ever add time.
    """
    device = torch.device(device)
    best = float("inf")
    for _ in range(max(1, repeats)):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def resident_bytes() -> int | None:
    """Resident set size of this process (``/proc/self/statm``; None where there is no ``/proc``)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            pages = int(handle.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes(fn: Callable[[], Any], interval: float = 0.01) -> tuple[Any, int | None]:
    """``(fn(), peak)``: the highest resident set size of the process sampled every ``interval`` s while
    ``fn`` ran (a background thread; PyTorch's kernels release the GIL), above the size when it began —
    everything the call touched (tensors, oneDNN buffers, allocator slack), not only tensors as
    :func:`peak_memory_bytes`. None where the resident size cannot be read. Memory freed before the call
    is first handed back to the system (glibc's ``malloc_trim``), else the call could reuse it unseen."""
    import ctypes
    import ctypes.util
    import gc
    import threading

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the start may include reusable free memory
        pass
    start = resident_bytes()
    if start is None:
        return fn(), None
    peak, done = [start], threading.Event()

    def sample() -> None:
        while not done.wait(interval):
            peak[0] = max(peak[0], resident_bytes() or 0)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn()
    finally:
        done.set()
        thread.join()
    peak[0] = max(peak[0], resident_bytes() or 0)
    return result, peak[0] - start
