"""One-call GPU recipe: pre-train a larger diffusion prior, fine-tune IDM for block CS at 10/30/50 %
and evaluate everything, inside a fixed time budget on one GPU (docs/gpu-recipe.md).

    python -m train.gpu_recipe --data data_cache/Train400 --val data_cache/Set12 --out "$OUT" --pack
    python -m train.gpu_recipe --data DIR --val DIR --out runs/toy --toy        (CPU, about a minute)
    python -m train.gpu_recipe ... --plan                                       (print the plan only)

The stages of :data:`STAGES` run one after the other through the ordinary training scripts
(``python -m train.pretrain_prior``, ``python -m train.finetune``), each with its share of the time
left (``--max-minutes``), and each exports a checkpoint (safetensors, config.json, model card) to
``OUT/checkpoints/<name>/`` (with ``--pack``: ``OUT/checkpoints/<name>.tar.gz``, so that the device
tool, which brings back at most 8 files, returns all of them). Every IDM checkpoint is then scored
with ``python -m idm eval`` on ``--val`` (and ``--test``) at its ratio, next to ``tv``; the scores, the
steps and the wall times go to ``OUT/results.json`` (rewritten after every event, so it is valid
whenever the run stops) and everything printed to ``OUT/recipe.log``.

Time: the budget (``--budget-minutes``, default 9) ends at a fixed deadline. Before each stage the time
left, less a reserve for the last evaluation and the expected start-up/export cost of each stage still
to run, is split between the remaining stages in proportion to their ``share`` (time a stage does not
use passes on to the next). Pre-training plans its steps from an optimistic rate and is stopped by
``--max-minutes`` (it then exports its EMA weights itself). Fine-tuning is planned from a measured rate:
a short probe run (thrown away) times the first fine-tuning configuration, later stages use the rate
of the previous one, so that each stage finishes its LR schedule; should one still be stopped by time,
the recipe exports its last saved state and says so in the model card. A stage that fails in mixed
precision before its first step is retried once in fp32. A stage that fails does not stop the others
(an IDM stage whose ``init`` stage failed starts from the prior); the exit status is 0 when at least
one checkpoint was produced, 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as _dt
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]


# --- the recipe: stages and hyper-parameters --------------------------------------------------
@dataclass(frozen=True)
class Stage:
    """One training run of the recipe."""

    name: str  # checkpoint name: OUT/checkpoints/<name>
    kind: str  # "pretrain" (train.pretrain_prior) or "finetune" (train.finetune)
    share: float  # share of the training time
    ratio: float | None = None  # finetune: block-CS sampling ratio (None: --ratio-range etc. in args)
    init: str | None = None  # finetune: "prior" (--idm-prior) or an earlier stage (its IDM checkpoint)
    args: tuple[str, ...] = ()  # further options of the training script, e.g. ("--lr", "3e-4")
    ratios: tuple[float, ...] = ()  # finetune: ratios to evaluate at (default: (ratio,))

    @property
    def eval_ratios(self) -> tuple[float, ...]:
        return self.ratios or ((self.ratio,) if self.ratio is not None else ())


PRIOR_STAGE = "prior-gray-48"
#: name, kind, time share, ratio, initialisation. An IDM stage whose init stage produced nothing
#: (failed, or not selected with --stages) starts from the prior instead. A network for a range of
#: ratios (train.finetune --ratio-range) is one line, e.g.
#: ``Stage("idm-cs5-60", "finetune", 0.6, init="prior", args=("--ratio-range", "0.05,0.6"), ratios=(0.1, 0.3, 0.5))``
#: ``init`` may also name a shipped denoiser (``dncnn-6``, ``dncnn-17``): the stage then starts from it
#: with :data:`DENOISER_OPTIONS` — the CPU-measured winner (docs/denoiser-priors.md), trained longer here.
STAGES: tuple[Stage, ...] = (
    Stage(PRIOR_STAGE, "pretrain", 0.25),
    Stage("idm-multi", "finetune", 0.45, init="dncnn-6", args=("--ratio-range", "0.05,0.6"), ratios=(0.1, 0.3, 0.5)),
    Stage("idm-cs10", "finetune", 0.10, ratio=0.1, init="prior"),
    Stage("idm-cs30", "finetune", 0.10, ratio=0.3, init="idm-cs10"),
    Stage("idm-cs50", "finetune", 0.10, ratio=0.5, init="idm-cs30"),
)
#: shipped denoisers a stage may start from (``Stage.init``)
DENOISER_INITS = ("dncnn-6", "dncnn-17")

#: options of ``train.pretrain_prior`` (``gpu``: one H100/H200; ``toy``: CPU smoke run). Base 48 (3.8 M
#: parameters, 2.2× the shipped prior) keeps each IDM checkpoint (4.8 M, fp16) under the 10 MiB that
#: tests/test_shipped.py allows a shipped checkpoint and all four under the device tool's 64 MiB.
#: 64² patches: the export draws its 16-sample grid (DDIM, 50 steps, at the patch size) on the CPU,
#: about 4× longer at 128².
PRETRAIN_OPTIONS: dict[str, dict[str, Any]] = {
    "gpu": {"batch": 128, "patch": 64, "lr": 3e-4, "warmup": 100, "ema-decay": 0.995, "base-channels": 48,
            "channel-mults": "1,2,2,2", "res-blocks": 2, "attn": "2", "mixed-precision": "bf16", "workers": 2},
    "toy": {"batch": 4, "patch": 32, "lr": 1e-3, "warmup": 2, "ema-decay": 0.9, "base-channels": 8,
            "channel-mults": "1,2", "res-blocks": 1, "attn": "", "mixed-precision": "no", "threads": 1},
}
#: options of ``train.finetune`` for every IDM stage
FINETUNE_OPTIONS: dict[str, dict[str, Any]] = {
    "gpu": {"batch": 32, "patch": 160, "lr": 5e-4, "lr-schedule": "cosine", "warmup": 50, "levels": "none",
            "mixed-precision": "bf16", "workers": 2},
    "toy": {"batch": 2, "patch": 32, "lr": 1e-3, "lr-schedule": "cosine", "warmup": 1, "levels": "none",
            "mixed-precision": "no", "threads": 1},
}
#: further ``train.finetune`` options when a stage starts from a prior (an IDM --init keeps its own)
FROM_PRIOR_OPTIONS: dict[str, dict[str, Any]] = {
    "gpu": {"coupling-v": 0.1},
    "toy": {"coupling-v": 0.1, "sampling-steps": 2},
}
#: further ``train.finetune`` options when a stage starts from a shipped denoiser (the CPU recipe of
#: the shipped idm-multi: tv start, T = 4, nearly plain couplings)
DENOISER_OPTIONS: dict[str, dict[str, Any]] = {
    "gpu": {"coupling-v": 0.001, "start": "tv", "sampling-steps": 4},
    "toy": {"coupling-v": 0.001, "start": "tv", "sampling-steps": 2},
}


@dataclass(frozen=True)
class Timing:
    """How the recipe plans its time (seconds unless named otherwise)."""

    budget_minutes: float  # default --budget-minutes
    final_reserve: float  # kept at the end for the last evaluation and packing
    startup: dict[str, float]  # expected start-up + export cost of a stage, until measured
    rate_guess: dict[str, float]  # steps/s before measuring (pretrain: optimistic, see module doc)
    steps: dict[str, tuple[int, int]]  # (min, max) planned steps
    probe_minutes: float  # loop time of the fine-tuning probe
    min_stage: float  # a stage with less training time than this is skipped
    safety: float  # fine-tuning plans rate × time × safety steps
    cap: float  # ... and gets --max-minutes = time × cap
    eval_limit: int | None  # images per evaluation (None: all)
    eval_threads: int  # OMP threads of an evaluation on the CPU
    poll: float  # seconds between looks at a running process


TIMINGS = {
    "gpu": Timing(budget_minutes=9.0, final_reserve=45.0, startup={"pretrain": 40.0, "finetune": 20.0},
                  rate_guess={"pretrain": 40.0, "finetune": 10.0},
                  steps={"pretrain": (200, 200_000), "finetune": (100, 200_000)}, probe_minutes=0.25,
                  min_stage=15.0, safety=0.9, cap=1.3, eval_limit=None, eval_threads=6, poll=0.5),
    "toy": Timing(budget_minutes=5.0, final_reserve=10.0, startup={"pretrain": 10.0, "finetune": 8.0},
                  rate_guess={"pretrain": 5.0, "finetune": 5.0},
                  steps={"pretrain": (3, 6), "finetune": (2, 4)}, probe_minutes=0.005,
                  min_stage=0.5, safety=0.9, cap=1.3, eval_limit=2, eval_threads=1, poll=0.2),
}

#: what the training and evaluation scripts import that a bare GPU machine may lack
REQUIRED_MODULES = ("torch", "accelerate", "safetensors", "skimage", "piq", "PIL", "tqdm")
#: a tqdm progress-bar line (``idm eval`` draws one), kept out of the log
PROGRESS_BAR = re.compile(r"\d+%\|")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
#: what the device tool brings back from $OUT (docs/gpu-recipe.md)
TRANSFER_LIMITS = {"files": 8, "file_mib": 16, "total_mib": 64}
#: largest weights file tests/test_shipped.py accepts in checkpoints/
SHIP_LIMIT_MIB = 10
#: starts the section of a model card that the recipe (re)writes with its evaluation results
CARD_MARKER = "<!-- train.gpu_recipe: measured -->"


class UsageError(Exception):
    """A bad argument: one line ``error: ...`` and exit status 2."""


class Interrupted(Exception):
    """SIGTERM/SIGINT: stop the children, write the results, exit."""


# --- small helpers ----------------------------------------------------------------------------
def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def options_to_argv(options: dict[str, Any]) -> list[str]:
    """``{"batch": 4, "attn": ""}`` → ``["--batch", "4", "--attn", ""]``."""
    argv: list[str] = []
    for key, value in options.items():
        argv += [f"--{key}", _fmt(value)]
    return argv


def set_option(argv: list[str], key: str, value: Any) -> list[str]:
    """``argv`` with option ``--key`` set to ``value`` (replaced, or appended)."""
    flag, out = f"--{key}", list(argv)
    if flag in out:
        out[out.index(flag) + 1] = _fmt(value)
    else:
        out += [flag, _fmt(value)]
    return out


def get_option(argv: list[str], key: str) -> str | None:
    flag = f"--{key}"
    return argv[argv.index(flag) + 1] if flag in argv and argv.index(flag) + 1 < len(argv) else None


def clamp(value: float, low: int, high: int) -> int:
    return int(max(low, min(high, math.floor(value))))


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def count_images(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def parameter_count(checkpoint: Path) -> int | None:
    """Number of stored parameters of a checkpoint directory (from the safetensors header; no torch)."""
    try:
        with open(checkpoint / "model.safetensors", "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    except (OSError, ValueError, KeyError, TypeError):  # informative only
        return None


def loss_curve(log_path: Path, points: int = 40) -> list[list[float]]:
    """``[[step, mean loss], ...]``: ``log.jsonl`` averaged over at most ``points`` equal windows."""
    if not log_path.exists():
        return []
    entries = []
    for line in log_path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
            entries.append((int(entry["step"]), float(entry["loss"])))
        except (ValueError, KeyError, TypeError):
            continue
    if not entries:
        return []
    size = max(1, math.ceil(len(entries) / points))
    curve = []
    for i in range(0, len(entries), size):
        chunk = entries[i:i + size]
        curve.append([chunk[-1][0], round(sum(v for _, v in chunk) / len(chunk), 5)])
    return curve


def pack_checkpoint(directory: Path, archive: Path) -> Path:
    """Write ``directory`` as ``archive`` (``.tar.gz``, entries under ``<directory name>/``), atomically."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_name(archive.name + ".tmp")
    with tarfile.open(tmp, "w:gz", compresslevel=1) as tar:
        tar.add(directory, arcname=directory.name)
    os.replace(tmp, archive)
    return archive


def unpack_checkpoints(folder: Path, destination: Path) -> list[Path]:
    """Extract every ``*.tar.gz`` of ``folder`` into ``destination``; the checkpoint directories."""
    destination.mkdir(parents=True, exist_ok=True)
    found = []
    for archive in sorted(folder.glob("*.tar.gz")):
        with tarfile.open(archive, "r:gz") as tar:
            names = {Path(m.name).parts[0] for m in tar.getmembers()}
            if any(m.name.startswith(("/", "..")) or ".." in Path(m.name).parts for m in tar.getmembers()):
                raise ValueError(f"{archive}: unsafe member names")
            tar.extractall(destination)
        found += [destination / n for n in sorted(names)]
    return found


def transfer_report(out: Path) -> dict[str, Any]:
    """Files under ``out`` against what the device tool brings back (:data:`TRANSFER_LIMITS`)."""
    files = [p for p in out.rglob("*") if p.is_file() and not p.name.endswith(".tmp")]
    sizes = {str(p.relative_to(out)): p.stat().st_size for p in files}
    mib = 1024 * 1024
    problems = []
    if len(files) > TRANSFER_LIMITS["files"]:
        problems.append(f"{len(files)} files (at most {TRANSFER_LIMITS['files']} come back)")
    problems += [f"{name} is {size / mib:.1f} MiB (over {TRANSFER_LIMITS['file_mib']} MiB)"
                 for name, size in sizes.items() if size > TRANSFER_LIMITS["file_mib"] * mib]
    total = sum(sizes.values())
    if total > TRANSFER_LIMITS["total_mib"] * mib:
        problems.append(f"{total / mib:.1f} MiB in all (over {TRANSFER_LIMITS['total_mib']} MiB)")
    too_deep = [name for name in sizes if len(Path(name).parts) > 3]
    if too_deep:
        problems.append(f"deeper than 2 folders: {', '.join(too_deep)}")
    return {"files": len(files), "total_mib": round(total / mib, 2), "problems": problems}


def export_finetune_state(argv: list[str], export_dir: Path, *, planned_steps: int) -> Path:
    """Export the last saved training state of a ``train.finetune`` run that was stopped by time
    (``argv``: its options) the way ``train.finetune`` exports a finished run, with validation, and
    mark the checkpoint as stopped early (model card and ``config.json``)."""
    import torch

    from idm.data import ImageFolder
    from idm.io.checkpoint import load_state
    from idm.training import finetune
    from idm.training.common import LOG_FILE, STATE_FILE, RunSummary, final_loss, hardware

    args = finetune.build_parser().parse_args(argv)
    finetune._validate_args(args, 1)
    run_dir = Path(args.out)
    state = load_state(run_dir / STATE_FILE)
    done = int(state["step"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = finetune.empty_network(args.arch, state["net_config"])
    net.load_unique_state_dict(state["model"], source=f"training state {run_dir / STATE_FILE}")
    net = net.set_levels("none").to(device).eval()
    scores = None
    if args.val:
        folder = ImageFolder(args.val, limit=args.val_limit)
        scores = finetune.validate(net, [folder[i] for i in range(len(folder))], args, device)
    args.steps = done
    summary = RunSummary(state["command"], hardware(1, device), float(state["wall_time"]), int(state["resumes"]),
                         final_loss(run_dir / LOG_FILE))
    finetune.export(net, export_dir, args, summary, num_images=len(ImageFolder(args.data)),
                    provenance=state["provenance"], validation=scores)
    note = (f"\n**Stopped by the time budget** of `train.gpu_recipe` after {done} of {planned_steps} planned "
            f"steps: exported from the last saved training state; the LR schedule (planned over "
            f"{planned_steps} steps) did not finish.\n")
    with open(export_dir / "README.md", "a", encoding="utf-8") as handle:
        handle.write(note)
    config_path = export_dir / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.setdefault("training", {}).update({"planned_steps": planned_steps, "stopped_by": "time budget"})
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return export_dir


# --- processes ----------------------------------------------------------------------------------
class LineCounter:
    """Lines of a growing file (a run's ``log.jsonl``: one line per optimizer step), read incrementally."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.lines = path, 0, 0

    def count(self) -> int:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except OSError:
            return self.lines
        self.offset += len(data)
        self.lines += data.count(b"\n")
        return self.lines


@dataclass
class ProcessResult:
    returncode: int | None
    started: float
    ended: float
    killed: bool = False
    samples: list[tuple[float, int]] = field(default_factory=list)  # (time, steps seen) at each change

    @property
    def wall(self) -> float:
        return self.ended - self.started

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.killed

    @property
    def steps(self) -> int:
        return self.samples[-1][1] if self.samples else 0

    def steady_rate(self) -> float | None:
        """Steps per second after the first two steps (start-up and warm-up excluded)."""
        points = [(t, s) for t, s in self.samples if s >= 2]
        if len(points) >= 2 and points[-1][0] - points[0][0] > 0.5 and points[-1][1] > points[0][1]:
            return (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0])
        if self.samples:  # too few points: steps over the time since launch (start-up included: low)
            return self.samples[-1][1] / max(1e-3, self.samples[-1][0] - self.started)
        return None

    def overhead(self) -> float | None:
        """Seconds not spent stepping: from launch to the first step, from the last step to the exit."""
        if not self.samples or self.samples[0][1] == 0:
            return None
        return (self.samples[0][0] - self.started) + (self.ended - self.samples[-1][0])


# --- the recipe -----------------------------------------------------------------------------------
class Recipe:
    def __init__(self, args: argparse.Namespace, stages: list[Stage]) -> None:
        self.args = args
        self.mode = "toy" if args.toy else "gpu"
        self.timing = TIMINGS[self.mode]
        self.stages = stages
        self.out = Path(args.out)
        self.work = Path(args.work)
        self.started = time.monotonic()
        self.deadline = self.started + 60.0 * args.budget_minutes
        self.lock = threading.RLock()
        self.children: set[subprocess.Popen] = set()
        self.stopping = threading.Event()
        self.rates: dict[str, float] = {}
        self.overheads: dict[str, float] = dict(self.timing.startup)
        self.probe_pending = any(s.kind == "finetune" for s in stages)
        self.produced: dict[str, Path] = {}  # stage name → checkpoint directory (readable here)
        self.mixed_precision_fallback: dict[str, str] = {}
        self.device = "cpu" if args.toy else "cuda"
        self.log_file = None
        self.results: dict[str, Any] = {}
        self.executors = {
            "cpu": concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="eval-cpu"),
            "gpu": concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="eval-gpu"),
        }
        self.futures: list[concurrent.futures.Future] = []

    # -- logging and results --
    def open(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.log_file = open(self.out / "recipe.log", "a", encoding="utf-8", buffering=1)
        self.results = {
            "recipe": "train.gpu_recipe",
            "status": "running",
            "toy": self.args.toy,
            "command": " ".join(shlex.quote(a) for a in [sys.executable, "-m", "train.gpu_recipe", *self.args.argv]),
            "started_at": _now_iso(),
            "budget_minutes": self.args.budget_minutes,
            "wall_s": 0.0,
            "python": sys.version.split()[0],
            "hardware": None,
            "data": self.args.data, "val": self.args.val, "test": self.args.test,
            "idm_prior": self.args.idm_prior or f"stage {PRIOR_STAGE}",
            "pack": self.args.pack,
            "time_shares": {s.name: round(s.share / sum(t.share for t in self.stages), 4) for s in self.stages},
            "stages": [],
            "checkpoints": {},
            "tv": {},
            "errors": [],
            "warnings": [],
        }
        self.save_results()

    def log(self, message: str, prefix: str = "recipe") -> None:
        elapsed = time.monotonic() - self.started
        line = f"[{elapsed:7.1f}s] [{prefix}] {message}"
        with self.lock:
            print(line, flush=True)
            if self.log_file is not None and not self.log_file.closed:
                self.log_file.write(line + "\n")

    def error(self, message: str) -> None:
        self.log(f"ERROR: {message}")
        with self.lock:
            self.results["errors"].append(message)
        self.save_results()

    def warn(self, message: str) -> None:
        self.log(f"warning: {message}")
        with self.lock:
            self.results["warnings"].append(message)
        self.save_results()

    def save_results(self) -> None:
        """Rewrite results.json (atomically). Stage records are updated by the main thread while the
        evaluation threads save: a dict that changes size during serialisation is retried."""
        for _ in range(20):
            try:
                with self.lock:
                    self.results["wall_s"] = round(time.monotonic() - self.started, 1)
                    write_json_atomic(self.out / "results.json", self.results)
                return
            except RuntimeError:
                time.sleep(0.01)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    # -- processes --
    def _environment(self, threads: int | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
        env["PYTHONUNBUFFERED"] = "1"
        env["TQDM_DISABLE"] = "1"
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        return env

    def _pump(self, stream: Any, prefix: str) -> None:
        for line in stream:
            line = line.rstrip("\n").rsplit("\r", 1)[-1]
            if line.strip() and not PROGRESS_BAR.search(line):
                self.log(line, prefix)

    def _kill(self, proc: subprocess.Popen) -> None:
        """End ``proc`` and its process group (its data-loader workers): SIGTERM, then SIGKILL."""
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if proc.poll() is not None:
                return
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                return
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue

    def run_process(self, label: str, argv: list[str], *, kill_at: float, watch: Path | None = None,
                    threads: int | None = None) -> ProcessResult:
        """Run ``python -m ...argv`` with its output in the log; kill it at ``kill_at`` (monotonic)."""
        command = [sys.executable, *argv]
        self.log("$ " + " ".join(shlex.quote(a) for a in command), label)
        started = time.monotonic()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", bufsize=1, env=self._environment(threads), start_new_session=True)
        with self.lock:
            self.children.add(proc)
        reader = threading.Thread(target=self._pump, args=(proc.stdout, label), daemon=True)
        reader.start()
        counter = LineCounter(watch) if watch is not None else None
        result = ProcessResult(None, started, started)
        try:
            while True:
                returncode = proc.poll()
                if counter is not None:
                    steps = counter.count()
                    if steps and (not result.samples or steps != result.samples[-1][1]):
                        result.samples.append((time.monotonic(), steps))
                if returncode is not None:
                    break
                if time.monotonic() >= kill_at or self.stopping.is_set():
                    self.log("out of time: stopping the process" if not self.stopping.is_set() else "stopping", label)
                    result.killed = True
                    self._kill(proc)
                    break
                time.sleep(self.timing.poll)
        finally:
            if proc.poll() is None:
                self._kill(proc)
            result.returncode = proc.poll()
            result.ended = time.monotonic()
            reader.join(timeout=5)
            with self.lock:
                self.children.discard(proc)
        self.log(f"exit status {result.returncode}{' (killed)' if result.killed else ''} after {result.wall:.1f} s", label)
        return result

    def stop_children(self) -> None:
        self.stopping.set()
        with self.lock:
            children = list(self.children)
        for proc in children:
            self._kill(proc)

    # -- planning --
    def training_seconds(self, stage: Stage) -> float:
        """Training-loop seconds for ``stage``: its share of the time left after the reserves."""
        index = self.stages.index(stage)
        pending = self.stages[index:]
        reserve = self.timing.final_reserve + sum(self.overheads[s.kind] for s in pending)
        if self.probe_pending and stage.kind == "finetune":
            reserve += self.timing.probe_minutes * 60 + self.overheads["finetune"]
        available = self.left() - reserve
        return max(0.0, available * stage.share / sum(s.share for s in pending))

    def plan(self) -> list[dict[str, Any]]:
        """The stages with the time they would get now and the steps the guessed rates give."""
        rows, left, pending = [], self.left() - self.timing.final_reserve, list(self.stages)
        left -= sum(self.overheads[s.kind] for s in pending)
        if self.probe_pending:
            left -= self.timing.probe_minutes * 60 + self.overheads["finetune"]
        total = sum(s.share for s in pending)
        for stage in pending:
            seconds = max(0.0, left * stage.share / total)
            rate = self.timing.rate_guess[stage.kind]
            low, high = self.timing.steps[stage.kind]
            factor = 1.0 if stage.kind == "pretrain" else self.timing.safety
            rows.append({"name": stage.name, "kind": stage.kind, "ratio": stage.ratio, "init": stage.init,
                         "share": round(stage.share / total, 3), "train_s": round(seconds, 1),
                         "steps_at_guessed_rate": clamp(rate * seconds * factor, low, high)})
        return rows

    # -- stages --
    def prior_source(self) -> tuple[str, str]:
        """(the prior IDM stages start from, how it was chosen)."""
        if self.args.idm_prior:
            return self.args.idm_prior, "--idm-prior"
        if PRIOR_STAGE in self.produced:
            return str(self.produced[PRIOR_STAGE]), f"the prior of stage {PRIOR_STAGE} of this run"
        return "prior-gray", f"the shipped prior-gray: stage {PRIOR_STAGE} produced no checkpoint"

    def init_options(self, stage: Stage) -> tuple[list[str], str]:
        if stage.init in DENOISER_INITS:
            return (["--prior", stage.init, *options_to_argv(DENOISER_OPTIONS[self.mode])],
                    f"the shipped denoiser `{stage.init}`")
        if stage.init and stage.init != "prior":
            if stage.init in self.produced:
                return ["--init", str(self.produced[stage.init])], f"the IDM checkpoint of stage {stage.init} of this run"
            self.log(f"{stage.name}: stage {stage.init} produced no checkpoint; starting from the prior")
        source, how = self.prior_source()
        return ["--prior", source, *options_to_argv(FROM_PRIOR_OPTIONS[self.mode])], f"prior `{source}` ({how})"

    @staticmethod
    def ratio_options(stage: Stage) -> list[str]:
        return ["--ratio", _fmt(stage.ratio)] if stage.ratio is not None else []

    def export_dir(self, name: str) -> Path:
        return (self.work / "export" / name) if self.args.pack else (self.out / "checkpoints" / name)

    def stage_record(self, stage: Stage, **fields: Any) -> dict[str, Any]:
        record = {"name": stage.name, "kind": stage.kind, "ratio": stage.ratio, "status": "running", **fields}
        with self.lock:
            self.results["stages"].append(record)
        self.save_results()
        return record

    def kill_time(self, max_minutes: float, kind: str) -> float:
        hard = self.deadline - (2.0 if self.args.toy else 10.0)
        return min(hard, time.monotonic() + 60 * max_minutes + 3 * self.overheads[kind] + 30.0)

    def train_stage(self, stage: Stage) -> None:
        seconds = self.training_seconds(stage)
        if stage.kind == "finetune" and self.probe_pending:
            try:
                self.probe(stage)
            except Interrupted:
                raise
            except Exception as exc:  # noqa: BLE001 - plan with the guessed rate instead
                self.error(f"probe: {type(exc).__name__}: {exc}")
            seconds = self.training_seconds(stage)
        if seconds < self.timing.min_stage:
            self.stage_record(stage, status="skipped", error=f"out of time ({seconds:.0f} s of training left)")
            self.error(f"{stage.name}: skipped, out of time")
            return
        record = self.stage_record(stage, train_s_allotted=round(seconds, 1))
        try:
            if stage.kind == "pretrain":
                self.pretrain(stage, seconds, record)
            else:
                self.finetune(stage, seconds, record)
        except Interrupted:
            record["status"] = "interrupted"
            raise
        except Exception as exc:  # noqa: BLE001 - a failed stage must not stop the others
            record.update(status="failed", error=f"{type(exc).__name__}: {exc}")
            self.error(f"{stage.name}: {type(exc).__name__}: {exc}")
        finally:
            self.save_results()

    def _run_training(self, stage: Stage, module: str, argv: list[str], run_dir: Path, max_minutes: float,
                      record: dict[str, Any]) -> tuple[ProcessResult, list[str], Path]:
        """Run a training script; retry once in fp32 if mixed precision failed before any step.
        Returns the result, the options of the (last) run and its run folder."""
        result = self.run_process(stage.name, ["-m", module, *argv], kill_at=self.kill_time(max_minutes, stage.kind),
                                  watch=run_dir / "log.jsonl")
        precision = get_option(argv, "mixed-precision")
        if (not result.ok and result.steps == 0 and not result.killed and precision not in (None, "no")
                and self.left() > self.timing.final_reserve + self.overheads[stage.kind] + self.timing.min_stage):
            self.error(f"{stage.name}: failed before its first step in {precision}; retrying in fp32")
            self.mixed_precision_fallback[stage.kind] = "no"
            retry_dir = run_dir.with_name(run_dir.name + "-fp32")
            argv = set_option(set_option(argv, "mixed-precision", "no"), "out", retry_dir)
            spent = result.wall
            minutes = max(self.timing.min_stage / 60, max_minutes - spent / 60)
            argv = set_option(argv, "max-minutes", round(minutes, 4))
            record["retried_in_fp32"] = True
            result = self.run_process(stage.name, ["-m", module, *argv], kill_at=self.kill_time(minutes, stage.kind),
                                      watch=retry_dir / "log.jsonl")
            run_dir = retry_dir
        record["command"] = " ".join(shlex.quote(a) for a in ["python", "-m", module, *argv])
        record["run_dir"] = str(run_dir)
        return result, argv, run_dir

    def _common_run_options(self, kind: str) -> dict[str, Any]:
        options = dict(PRETRAIN_OPTIONS[self.mode] if kind == "pretrain" else FINETUNE_OPTIONS[self.mode])
        if kind in self.mixed_precision_fallback:
            options["mixed-precision"] = self.mixed_precision_fallback[kind]
        return options

    def pretrain(self, stage: Stage, seconds: float, record: dict[str, Any]) -> None:
        low, high = self.timing.steps["pretrain"]
        steps = clamp(self.timing.rate_guess["pretrain"] * seconds, low, high)
        run_dir, export_dir = self.work / "runs" / stage.name, self.export_dir(stage.name)
        max_minutes = round(seconds / 60, 4)
        argv = ["--data", self.args.data, "--out", str(run_dir), "--export", str(export_dir),
                "--eval-data", self.args.val, "--steps", str(steps),
                *options_to_argv(self._common_run_options("pretrain")),
                "--seed", "0", "--sample-every", "0", "--save-every", str(max(50, steps // 4)),
                "--max-minutes", str(max_minutes), "--no-progress", *stage.args]
        record.update(planned_steps=steps, max_minutes=max_minutes)
        result, argv, run_dir = self._run_training(stage, "train.pretrain_prior", argv, run_dir, max_minutes, record)
        self._finish_stage(stage, result, record, export_dir, run_dir)

    def probe(self, stage: Stage) -> None:
        """Time the first fine-tuning configuration (a throw-away run stopped by --max-minutes)."""
        self.probe_pending = False
        init, init_desc = self.init_options(stage)
        run_dir = self.work / "runs" / "probe"
        minutes = self.timing.probe_minutes
        low, high = self.timing.steps["finetune"]
        argv = [*init, *self.ratio_options(stage), "--data", self.args.data, "--out", str(run_dir),
                "--steps", str(max(high, 100_000)), *options_to_argv(self._common_run_options("finetune")),
                "--seed", "0", "--val-every", "0", "--save-every", "1000000", "--max-minutes", str(minutes),
                "--no-progress", *stage.args]
        record: dict[str, Any] = {"init": init_desc}
        result, argv, run_dir = self._run_training(Stage("probe", "finetune", 0.0, stage.ratio), "train.finetune",
                                                   argv, run_dir, minutes, record)
        rate, overhead = result.steady_rate(), result.overhead()
        info = {"steps": result.steps, "wall_s": round(result.wall, 1), "rate_steps_per_s": rate,
                "overhead_s": overhead, "returncode": result.returncode, "command": record.get("command"),
                "mixed_precision": get_option(argv, "mixed-precision")}
        with self.lock:
            self.results["probe"] = info
        if rate:
            self.rates["finetune"] = rate
            self.log(f"probe: {rate:.2f} fine-tuning steps/s (start-up + exit {overhead or 0:.1f} s)")
        else:
            self.error(f"probe: no rate measured (exit status {result.returncode}); "
                       f"planning with the guess {self.timing.rate_guess['finetune']} steps/s")
        if overhead:
            # the probe does not export or validate: keep some of the guess for that
            self.overheads["finetune"] = overhead + 0.25 * self.timing.startup["finetune"]
        shutil.rmtree(run_dir, ignore_errors=True)
        self.save_results()

    def finetune(self, stage: Stage, seconds: float, record: dict[str, Any]) -> None:
        init, init_desc = self.init_options(stage)
        rate = self.rates.get("finetune", self.timing.rate_guess["finetune"])
        low, high = self.timing.steps["finetune"]
        steps = clamp(rate * seconds * self.timing.safety, low, high)
        room = self.left() - self.timing.final_reserve - self.overheads["finetune"]
        max_minutes = round(max(self.timing.min_stage, min(seconds * self.timing.cap, room)) / 60, 4)
        run_dir, export_dir = self.work / "runs" / stage.name, self.export_dir(stage.name)
        argv = [*init, *self.ratio_options(stage), "--data", self.args.data, "--val", self.args.val,
                *(["--val-limit", str(self.timing.eval_limit)] if self.timing.eval_limit else []),
                "--out", str(run_dir), "--export", str(export_dir), "--steps", str(steps),
                *options_to_argv(self._common_run_options("finetune")),
                "--seed", "0", "--val-every", "0", "--save-every", str(max(25, int(rate * 45))),
                "--max-minutes", str(max_minutes), "--no-progress", *stage.args]
        record.update(init=init_desc, planned_steps=steps, max_minutes=max_minutes, planned_rate=round(rate, 3))
        result, argv, run_dir = self._run_training(stage, "train.finetune", argv, run_dir, max_minutes, record)
        if not (export_dir / "model.safetensors").exists() and (run_dir / "state.safetensors").exists():
            self.log(f"{stage.name}: stopped before the end of its schedule; exporting its last saved state")
            try:
                export_finetune_state(argv, export_dir, planned_steps=steps)
                record["stopped_by_time"] = True
            except Exception as exc:  # noqa: BLE001
                self.error(f"{stage.name}: exporting the saved state failed: {type(exc).__name__}: {exc}")
        self._finish_stage(stage, result, record, export_dir, run_dir)

    def _finish_stage(self, stage: Stage, result: ProcessResult, record: dict[str, Any], export_dir: Path,
                      run_dir: Path) -> None:
        rate, overhead = result.steady_rate(), result.overhead()
        record.update(returncode=result.returncode, killed=result.killed, wall_s=round(result.wall, 1),
                      steps_seen=result.steps, rate_steps_per_s=rate, overhead_s=overhead,
                      loss_curve=loss_curve(run_dir / "log.jsonl"))
        if rate and stage.kind == "finetune":
            self.rates["finetune"] = rate
        if overhead:
            self.overheads[stage.kind] = overhead
        if not (export_dir / "model.safetensors").exists():
            record.update(status="failed", error=record.get("error") or f"no checkpoint (exit status {result.returncode})")
            self.error(f"{stage.name}: produced no checkpoint")
            return
        config = json.loads((export_dir / "config.json").read_text(encoding="utf-8"))
        training = config.get("training", {})
        entry: dict[str, Any] = {
            "kind": "prior" if stage.kind == "pretrain" else "idm",
            "ratio": config.get("ratio"),
            "eval_ratios": list(stage.eval_ratios),
            "path": None,
            "parameters": parameter_count(export_dir),
            "steps": training.get("steps"),
            "planned_steps": training.get("planned_steps", record.get("planned_steps")),
            "batch": training.get("batch"),
            "patch": training.get("patch"),
            "mixed_precision": training.get("mixed_precision"),
            "train_wall_s": training.get("wall_time_s"),
            "stage_wall_s": round(result.wall, 1),
            "final_loss": training.get("final_loss"),
            "hardware": training.get("hardware"),
        }
        if stage.kind == "pretrain":
            entry["denoising"] = config.get("denoising")
        else:
            entry["init"] = record.get("init")
            entry["training_validation"] = config.get("validation")
            entry["stopped_by_time"] = bool(record.get("stopped_by_time"))
        size_mib = (export_dir / "model.safetensors").stat().st_size / 2**20
        entry["size_mib"] = round(size_mib, 2)
        with self.lock:
            if self.results.get("hardware") is None:
                self.results["hardware"] = training.get("hardware")
            self.produced[stage.name] = export_dir
            self.results["checkpoints"][stage.name] = entry
            record["status"] = "done"
            self.publish(stage.name)
        if size_mib >= SHIP_LIMIT_MIB:
            self.warn(f"{stage.name}: model.safetensors is {size_mib:.1f} MiB, over the {SHIP_LIMIT_MIB} MiB "
                      "tests/test_shipped.py allows a shipped checkpoint")
        if self.args.pack:
            for problem in transfer_report(self.out)["problems"]:
                self.error(f"device-tool transfer limit: {problem}")
        self.log(f"{stage.name}: checkpoint after {entry['steps']} steps, {entry['train_wall_s']} s of training")
        self.save_results()
        if stage.kind == "finetune":
            for role, folder in self.eval_folders():
                for ratio in stage.eval_ratios:
                    self.submit("gpu", self.evaluate, stage.name, "idm", ratio, role, folder, export_dir)

    def publish(self, name: str) -> None:
        """Write the evaluation section of checkpoint ``name``'s model card (once it has a score) and,
        with --pack, (re)write its archive. Call with the lock held."""
        entry, directory = self.results["checkpoints"][name], self.produced[name]
        section = self.card_section(name, entry)
        if section:
            card = directory / "README.md"
            text = card.read_text(encoding="utf-8")
            if CARD_MARKER in text:
                text = text[:text.index(CARD_MARKER)].rstrip() + "\n"
            card.write_text(text + "\n" + section, encoding="utf-8")
        if self.args.pack:
            archive = pack_checkpoint(directory, self.out / "checkpoints" / f"{name}.tar.gz")
            entry["path"] = str(archive.relative_to(self.out))
        else:
            entry["path"] = str(directory.relative_to(self.out)) if directory.is_relative_to(self.out) else str(directory)

    def card_section(self, name: str, entry: dict[str, Any]) -> str | None:
        """Markdown: the ``idm eval`` scores of an IDM checkpoint next to ``tv`` (None before any)."""
        evaluations = entry.get("evaluation", {})
        if entry.get("kind") != "idm" or not any("psnr" in v for v in evaluations.values()):
            return None
        rows = []
        for ratio in entry.get("eval_ratios", []):
            key = _fmt(ratio)
            for role, folder in self.eval_folders():
                own, tv = evaluations.get(f"{role}@{key}", {}), self.results["tv"].get(key, {}).get(role, {})
                if "psnr" not in own:
                    continue
                tv_cell = f"{tv['psnr']:.2f} dB / {tv['ssim']:.4f}" if "psnr" in tv else "n/a"
                rows.append(f"| {key} | `{folder}` ({own['images']} images) | {own['psnr']:.2f} dB / {own['ssim']:.4f} "
                            f"| {tv_cell} |")
        device = next((v.get("device") for v in evaluations.values() if "device" in v), "?")
        return "\n".join([
            CARD_MARKER, "",
            "## Measured by `train.gpu_recipe`", "",
            f"`python -m idm eval --ratio R --method idm --checkpoint <this folder> --device {device}` on the stored "
            f"weights (PSNR peak 255, scikit-image SSIM, permutation seeds 0, 1, …), beside `--method tv` on the same "
            f"images and seeds" + (f" (first {self.timing.eval_limit} images)" if self.timing.eval_limit else "") + ":", "",
            "| ratio | images | idm PSNR / SSIM | tv PSNR / SSIM |", "|---|---|---|---|", *rows, "",
            f"Stage `{name}` of the one-call recipe `{self.results['command'].split(' -m ', 1)[-1]}` "
            f"({'toy run, CPU' if self.args.toy else 'GPU'}; budget {self.args.budget_minutes:g} min for all stages); "
            f"initialisation: {entry.get('init')}.", "",
        ])

    # -- evaluation --
    def eval_folders(self) -> list[tuple[str, str]]:
        return [("val", self.args.val)] + ([("test", self.args.test)] if self.args.test else [])

    def submit(self, queue: str, fn: Callable[..., None], *args: Any) -> None:
        self.futures.append(self.executors[queue].submit(fn, *args))

    def evaluate(self, key: str, method: str, ratio: float, role: str, folder: str, checkpoint: Path | None) -> None:
        """``python -m idm eval`` of ``method`` (an IDM ``checkpoint`` or tv); record the mean scores."""
        label = f"eval {key} {_fmt(ratio)} {role}" if method == "idm" else f"eval tv {_fmt(ratio)} {role}"
        if self.stopping.is_set() or self.left() < 3.0:
            self.record_eval(method, key, ratio, role, {"error": "not run: out of time"})
            return
        out_json = self.work / "eval" / f"{key}-{method}-{role}-{_fmt(ratio)}.json"
        out_json.parent.mkdir(parents=True, exist_ok=True)
        device = self.device if method == "idm" else "cpu"
        argv = ["-m", "idm", "eval", "--data", folder, "--ratio", _fmt(ratio), "--method", method,
                "--json", str(out_json), "--device", device]
        if checkpoint is not None:
            argv += ["--checkpoint", str(checkpoint)]
        if self.timing.eval_limit:
            argv += ["--limit", str(self.timing.eval_limit)]
        try:
            result = self.run_process(label, argv, kill_at=self.deadline - 1.0,
                                      threads=self.timing.eval_threads if device == "cpu" else None)
            if result.ok and out_json.exists():
                data = json.loads(out_json.read_text(encoding="utf-8"))
                mean = data["mean"]
                scores = {"psnr": mean["psnr"], "ssim": mean["ssim"], "images": len(data.get("images", [])),
                          "seconds_per_image": mean.get("seconds"), "eval_wall_s": round(result.wall, 1),
                          "device": device}
            else:
                scores = {"error": f"idm eval exit status {result.returncode}" + (" (killed: out of time)" if result.killed else "")}
        except Exception as exc:  # noqa: BLE001
            scores = {"error": f"{type(exc).__name__}: {exc}"}
        self.record_eval(method, key, ratio, role, scores)

    def record_eval(self, method: str, key: str, ratio: float, role: str, scores: dict[str, Any]) -> None:
        with self.lock:
            if method == "tv":
                self.results["tv"].setdefault(_fmt(ratio), {})[role] = scores
            else:
                self.results["checkpoints"].setdefault(key, {}).setdefault("evaluation", {})[f"{role}@{_fmt(ratio)}"] = scores
            self.merge_scores()
            if "psnr" in scores:
                for name, entry in self.results["checkpoints"].items():
                    if name in self.produced and (name == key or (method == "tv" and ratio in entry.get("eval_ratios", []))):
                        try:
                            self.publish(name)
                        except OSError as exc:
                            self.log(f"could not update {name}: {exc}")
        if "error" in scores:
            self.error(f"evaluation {method} {key if method == 'idm' else _fmt(ratio)} on {role}: {scores['error']}")
        self.save_results()

    def merge_scores(self) -> None:
        """Per IDM checkpoint, ``scores[ratio]``: psnr/ssim (on --val, by idm eval), tv_psnr/tv_ssim,
        gain over tv, ``test`` (on --test); for a one-ratio checkpoint the same keys also flat."""
        for entry in self.results["checkpoints"].values():
            if entry.get("kind") != "idm":
                continue
            evaluations, per_ratio = entry.get("evaluation", {}), {}
            for ratio in entry.get("eval_ratios", []):
                key = _fmt(ratio)
                own, tv = evaluations.get(f"val@{key}", {}), self.results["tv"].get(key, {}).get("val", {})
                row = {"val_data": self.args.val, "psnr": own.get("psnr"), "ssim": own.get("ssim"),
                       "val_images": own.get("images"), "tv_psnr": tv.get("psnr"), "tv_ssim": tv.get("ssim")}
                row["gain_over_tv_db"] = (round(row["psnr"] - row["tv_psnr"], 3)
                                          if row["psnr"] is not None and row["tv_psnr"] is not None else None)
                if self.args.test:
                    own_t = evaluations.get(f"test@{key}", {})
                    tv_t = self.results["tv"].get(key, {}).get("test", {})
                    row["test"] = {"data": self.args.test, "psnr": own_t.get("psnr"), "ssim": own_t.get("ssim"),
                                   "images": own_t.get("images"), "tv_psnr": tv_t.get("psnr"), "tv_ssim": tv_t.get("ssim")}
                per_ratio[key] = row
            entry["scores"] = per_ratio
            if len(per_ratio) == 1:
                entry.update(next(iter(per_ratio.values())))

    def scored(self) -> bool:
        """Whether every IDM checkpoint has its --val score at every ratio."""
        return all(row.get("psnr") is not None for e in self.results["checkpoints"].values() if e.get("kind") == "idm"
                   for row in e.get("scores", {"?": {}}).values())

    # -- the whole run --
    def run(self) -> int:
        self.open()
        self.log(f"budget {self.args.budget_minutes:g} min, mode {self.mode}, stages "
                 + ", ".join(f"{s.name} ({s.share:g})" for s in self.stages))
        for row in self.plan():
            self.log(f"plan: {row}")
        try:
            for role, folder in self.eval_folders():  # tv on the CPU, beside training: --val first
                for ratio in dict.fromkeys(r for s in self.stages if s.kind == "finetune" for r in s.eval_ratios):
                    self.submit("cpu", self.evaluate, f"tv-{_fmt(ratio)}", "tv", ratio, role, folder, None)
            for stage in self.stages:
                if self.left() <= self.timing.final_reserve / 2:
                    self.stage_record(stage, status="skipped", error="out of time")
                    self.error(f"{stage.name}: skipped, out of time")
                    continue
                self.train_stage(stage)
            self.wait_for_evaluations()
            done = all(s["status"] == "done" for s in self.results["stages"])
            status = "complete" if done and self.scored() else "partial"  # errors (e.g. a cut tv run) are listed
        except Interrupted:
            self.error("interrupted: stopping")
            status = "interrupted"
            self.stop_children()
        finally:
            self.stop_children()  # only evaluations cut short by the budget are still running here
            for executor in self.executors.values():
                executor.shutdown(wait=True, cancel_futures=True)
        produced = [name for name in self.results["checkpoints"] if name in self.produced]
        with self.lock:
            self.results["status"] = status if produced else "failed"
            self.results["finished_at"] = _now_iso()
            if self.args.pack:
                self.results["transfer"] = transfer_report(self.out)
        self.save_results()
        self.summary()
        if self.log_file is not None:
            self.log_file.close()
        return 0 if produced else 1

    def wait_for_evaluations(self) -> None:
        pending = [f for f in self.futures if not f.done()]
        if pending:
            self.log(f"waiting for {len(pending)} evaluation(s)")
        for future in self.futures:
            try:
                future.result(timeout=max(0.0, self.left() - 0.5))
            except concurrent.futures.TimeoutError:
                break
        if any(not f.done() for f in self.futures):
            self.error("the budget ran out before every evaluation finished")
            self.stop_children()

    def summary(self) -> None:
        self.log(f"status {self.results['status']} after {time.monotonic() - self.started:.0f} s "
                 f"(budget {self.args.budget_minutes:g} min); results in {self.out / 'results.json'}")
        for name, entry in self.results["checkpoints"].items():
            if entry.get("kind") == "prior":
                self.log(f"{name:16s} prior  {entry.get('steps')} steps x {entry.get('batch')}, "
                         f"{entry.get('train_wall_s')} s, loss {entry.get('final_loss')}")
            elif entry.get("kind") == "idm":
                for ratio, row in entry.get("scores", {}).items():
                    psnr, tv = row.get("psnr"), row.get("tv_psnr")
                    self.log(f"{name:16s} ratio {ratio}: {entry.get('steps')} steps x {entry.get('batch')}, "
                             f"{entry.get('train_wall_s')} s; val PSNR {psnr if psnr is None else f'{psnr:.2f}'} dB "
                             f"(tv {tv if tv is None else f'{tv:.2f}'} dB)")


# --- command line -----------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit status 2
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m train.gpu_recipe", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder of training images (e.g. data_cache/Train400)")
    parser.add_argument("--val", required=True, help="folder of validation images (e.g. data_cache/Set12)")
    parser.add_argument("--test", help="a further evaluation folder (e.g. data_cache/BSD68), optional")
    parser.add_argument("--out", required=True, help="results folder (\"$OUT\" on the device tool)")
    parser.add_argument("--work", help="run folders, states and eval JSON (default runs/gpu-recipe-<time>)")
    parser.add_argument("--budget-minutes", type=float, help="wall-clock budget of the whole recipe (default 9; toy 5)")
    parser.add_argument("--toy", action="store_true", help="toy sizes on the CPU (about a minute): the tests")
    parser.add_argument("--pack", action="store_true",
                        help="write each checkpoint as OUT/checkpoints/<name>.tar.gz (the device tool returns at most 8 "
                             "files; on by itself when --out is $OUT)")
    parser.add_argument("--idm-prior", help="prior the IDM stages start from: a checkpoint name or folder "
                                           f"(default: the one stage {PRIOR_STAGE} trains; prior-gray if it fails)")
    parser.add_argument("--stages", help="comma-separated stage names to run (default all: "
                                         + ",".join(s.name for s in STAGES) + ")")
    parser.add_argument("--plan", action="store_true", help="print the stages and time plan, run nothing")
    return parser


def _check_folder(value: str | None, flag: str) -> None:
    if value is None:
        return
    path = Path(value)
    if not path.is_dir():
        raise UsageError(f"{flag} {value}: not a folder")
    if count_images(path) == 0:
        raise UsageError(f"{flag} {value}: no images (png, jpg, tif, bmp)")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[Stage]]:
    args = build_parser().parse_args(argv)
    args.argv = list(argv)
    if args.budget_minutes is None:
        args.budget_minutes = TIMINGS["toy" if args.toy else "gpu"].budget_minutes
    if not math.isfinite(args.budget_minutes) or args.budget_minutes <= 0:
        raise UsageError(f"--budget-minutes must be positive, got {args.budget_minutes:g}")
    if args.budget_minutes > 600:
        raise UsageError(f"--budget-minutes {args.budget_minutes:g} is over 10 hours")
    _check_folder(args.data, "--data")
    _check_folder(args.val, "--val")
    _check_folder(args.test, "--test")
    names = [s.name for s in STAGES]
    if args.stages is not None:
        chosen = [n.strip() for n in args.stages.split(",") if n.strip()]
        unknown = [n for n in chosen if n not in names]
        if unknown or not chosen:
            raise UsageError(f"--stages: unknown stage(s) {', '.join(unknown) or '(none given)'}; stages: {', '.join(names)}")
        stages = [s for s in STAGES if s.name in chosen]
    else:
        stages = list(STAGES)
    if any(s.kind == "finetune" for s in stages) and PRIOR_STAGE not in {s.name for s in stages} and not args.idm_prior:
        raise UsageError(f"--stages without {PRIOR_STAGE} needs --idm-prior (e.g. prior-gray)")
    if args.idm_prior and not args.idm_prior.startswith("hf:"):
        from idm.errors import IDMError
        from idm.io.checkpoint import resolve_checkpoint

        try:
            resolve_checkpoint(args.idm_prior)
        except IDMError as exc:
            raise UsageError(f"--idm-prior: {exc}") from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {args.out}: not a folder")
    if out.is_dir() and ((out / "results.json").exists() or (out / "checkpoints").exists()):
        raise UsageError(f"--out {args.out} already holds results: choose an empty folder")
    if not args.pack and os.environ.get("OUT") and out.resolve() == Path(os.environ["OUT"]).resolve():
        args.pack = True  # --out "$OUT" on the device tool, which brings back at most 8 files
    if args.work is None:
        args.work = str(Path("runs") / f"gpu-recipe-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    work = Path(args.work)
    if work.exists() and (not work.is_dir() or any(work.iterdir())):
        raise UsageError(f"--work {args.work} exists and is not empty")
    if not args.plan:
        missing = [m for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]
        if missing:
            raise UsageError(f"missing Python package(s) {', '.join(missing)}: install them, or carry them as "
                             "wheels on the device machine (docs/gpu-recipe.md)")
        if not args.toy:
            import torch

            if not torch.cuda.is_available():
                raise UsageError("no CUDA device: the full recipe needs a GPU (use --toy on the CPU)")
    return args, stages


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, stages = parse_args(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    recipe = Recipe(args, stages)
    if args.plan:
        print(json.dumps({"mode": recipe.mode, "budget_minutes": args.budget_minutes,
                          "stages": recipe.plan(),
                          "pretrain": PRETRAIN_OPTIONS[recipe.mode], "finetune": FINETUNE_OPTIONS[recipe.mode],
                          "from_prior": FROM_PRIOR_OPTIONS[recipe.mode]}, indent=2))
        return 0

    def interrupt(signum: int, frame: Any) -> None:
        raise Interrupted(signal.Signals(signum).name)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)
        signal.signal(signal.SIGINT, interrupt)
    return recipe.run()


if __name__ == "__main__":
    sys.exit(main())
