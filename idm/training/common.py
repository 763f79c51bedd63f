"""What the training entry points (:mod:`idm.training.pretrain`, :mod:`idm.training.finetune`,
:mod:`idm.training.classifier`, ...) share.

Each trains on random patches of images or volumes with :mod:`accelerate`, in a run folder
holding ``state.safetensors`` (saved every ``--save-every`` steps; ``--resume`` continues bit for bit)
and ``log.jsonl`` (one line per step), and ends by exporting a checkpoint with a model card. Exact
resumption rests on three things kept here: the data of step ``s`` are a function of ``s``
(:class:`StepBatches` over position-indexed patches), the RNG states are saved with the model, and
log lines written after the last saved state are dropped on resume (:func:`truncate_log`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import platform
import random
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from ..errors import IDMError
from ..runtime import keep_freed_memory

STATE_FILE = "state.safetensors"
LOG_FILE = "log.jsonl"
#: ``--export-dtype`` → storage dtype of the exported weights (None: as trained, fp32)
EXPORT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}


# --- command line ----------------------------------------------------------------------------
def add_run_folder_arguments(group: argparse._ArgumentGroup) -> None:
    """``--resume``, ``--export`` and ``--export-dtype`` (the run folder itself, ``--out``, has per-script defaults)."""
    group.add_argument("--resume", action="store_true", help="continue the run in --out from its state.safetensors")
    group.add_argument("--export", help="checkpoint directory for the final weights (default RUNDIR/checkpoint)")
    group.add_argument("--export-dtype", choices=tuple(EXPORT_DTYPES), default="fp16", help="weight storage dtype")


def add_run_control_arguments(group: argparse._ArgumentGroup, *, max_minutes_help: str) -> None:
    """``--save-every``, ``--stop-after``, ``--max-minutes``, ``--threads``, ``--workers``, ``--no-progress``."""
    group.add_argument("--save-every", type=int, default=500, help="steps between training-state saves (default 500)")
    group.add_argument("--stop-after", type=int, help="stop (saving the state) after this many steps in this invocation")
    group.add_argument("--max-minutes", type=float, help=max_minutes_help)
    group.add_argument("--threads", type=int, help="torch CPU threads")
    group.add_argument("--workers", type=int, default=0, help="data-loader worker processes (default 0)")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_script(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int],
               argv: list[str] | None) -> int:
    """Parse ``argv`` and ``run`` it (after ``--threads``); an :class:`IDMError` prints one line and
    gives exit status 2."""
    args = parser.parse_args(argv)
    keep_freed_memory()
    try:
        return with_threads(run)(args)
    except IDMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def with_threads(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``run`` preceded by ``torch.set_num_threads(args.threads)`` when ``--threads`` is given."""

    def threaded(args: argparse.Namespace) -> int:
        if getattr(args, "threads", None):
            torch.set_num_threads(args.threads)
        return run(args)

    return threaded


def script_parser(module: str) -> argparse.ArgumentParser:
    """The ``python -m MODULE`` parser of a training script: its ``add_arguments`` and the first line
    of its docstring."""
    script = importlib.import_module(module)
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=(script.__doc__ or "").splitlines()[0])
    return script.add_arguments(parser)


def script_main(module: str) -> Callable[..., int]:
    """``main(argv=None) -> exit status`` of the training script ``module`` (its ``run`` on
    :func:`script_parser`'s arguments)."""

    def main(argv: list[str] | None = None) -> int:
        return run_script(script_parser(module), importlib.import_module(module).run, argv)

    return main


def add_script_subcommand(subparsers: argparse._SubParsersAction, name: str, module: str,
                          help_text: str) -> argparse.ArgumentParser:
    """Add ``idm NAME``: the options (``add_arguments``), description (docstring) and ``run`` of the
    training script ``module``, so that ``idm NAME ...`` and ``python -m MODULE ...`` are the same."""
    script = importlib.import_module(module)
    parser = subparsers.add_parser(name, help=help_text, description=script.__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    script.add_arguments(parser)
    parser.set_defaults(func=with_threads(script.run))
    return parser


def check_training_args(args: argparse.Namespace, world: int, positive: Sequence[str] = ()) -> None:
    """:class:`IDMError` unless ``--data`` is given, ``--steps/--batch/--patch/--save-every`` (and the
    options named in ``positive``) are >= 1, ``--batch`` splits over ``world`` processes and ``--lr`` > 0."""
    if not args.data:
        raise IDMError("--data is required: a folder of training images")
    for name in ("steps", "batch", "patch", "save_every", *positive):
        if getattr(args, name) < 1:
            raise IDMError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.batch % world:
        raise IDMError(f"--batch {args.batch} is not divisible by the {world} processes")
    if args.lr <= 0:
        raise IDMError(f"--lr must be positive, got {args.lr}")


def command_line(module: str, args: argparse.Namespace, names: Iterable[str]) -> str:
    """``python -m MODULE`` with the options ``names`` spelled out (those that are not None; tuples
    comma-separated, booleans as a bare flag when true): an explicit command reproducing the run."""
    parts = ["python", "-m", module]
    for name in names:
        value = getattr(args, name)
        if value is None or value is False:
            continue
        if value is True:
            parts.append(f"--{name.replace('_', '-')}")
            continue
        if isinstance(value, (tuple, list)):
            value = ",".join(str(v) for v in value)
        parts += [f"--{name.replace('_', '-')}", str(value)]
    return shlex.join(parts)


def trajectory_args(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The options ``names`` (those that determine the training trajectory) as stored in the state."""
    return {name: _listed(getattr(args, name)) for name in names}


def _listed(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def load_run_state(path: Path, args: argparse.Namespace, names: Iterable[str],
                   added: dict[str, Any] | None = None) -> dict[str, Any]:
    """The training state at ``path``; :class:`IDMError` if any option of ``names`` differs from it.
    ``added``: options introduced after a state was written, with the value such states used."""
    from ..io.checkpoint import load_state

    state = load_state(path)
    added = added or {}
    for name in names:
        given, saved = _listed(getattr(args, name)), _listed(state["args"].get(name, added.get(name)))
        if given != saved:
            raise IDMError(
                f"--resume: --{name.replace('_', '-')} is {given!r} but the run in {args.out} used {saved!r}; "
                "repeat the original options"
            )
    return state


# --- accelerator, hardware and RNG -----------------------------------------------------------
def new_accelerator(mixed_precision: str):
    """An :class:`accelerate.Accelerator` for one run.

    ``AcceleratorState`` is a per-process singleton fixed by the first Accelerator; its mixed-precision
    part (not the distributed setup) is reset first so that several runs can follow each other in one process.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mixed_precision)


def hardware(num_processes: int, device: torch.device) -> str:
    """``"N x <GPU name>"`` or ``"N x <CPU model> (K torch threads)"``, for model cards."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        name = f"{name} ({torch.get_num_threads()} torch threads)"
    return f"{num_processes} x {name}"


def capture_rng_states() -> dict[str, Any]:
    """This process's torch, numpy, Python (and CUDA, if any) RNG states."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_states(state: dict[str, Any]) -> None:
    """Set the RNG states of :func:`capture_rng_states` (CUDA ones only with the same GPU count)."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- data ------------------------------------------------------------------------------------
class StepBatches(torch.utils.data.Sampler):
    """Batch sampler: step ``s`` of process ``rank`` of ``world`` reads dataset indices
    ``(s * world + rank) * batch + [0, batch)``, for ``s`` in ``[start, stop)``."""

    def __init__(self, start: int, stop: int, batch: int, rank: int = 0, world: int = 1) -> None:
        self.start, self.stop, self.batch, self.rank, self.world = start, stop, batch, rank, world

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            first = (step * self.world + self.rank) * self.batch
            yield list(range(first, first + self.batch))


def collate_patches(items: list[Any]) -> torch.Tensor:
    """``(B, C, P, P)``: the patches of ``items`` (each a tensor or ``(name, tensor)``) stacked."""
    return torch.stack([item[-1] if isinstance(item, (tuple, list)) else item for item in items])


def patch_loader(images: Any, args: argparse.Namespace, start_step: int,
                 accelerator: Any, depth: int | None = None) -> torch.utils.data.DataLoader:
    """This process's batches for steps ``[start_step, --steps)``: its ``--batch // world`` share of each
    global batch of random ``--patch`` patches of ``images`` (``(B, C, P, P)`` in [0, 1]; patch ``i`` of
    the run is a function of ``i`` and ``--seed`` only); with ``depth``, chunks of ``depth`` contiguous
    slices of the volumes ``images`` (``(B, depth, P, P)``, :class:`~idm.data.RandomPatches`)."""
    from ..data import RandomPatches

    patches = RandomPatches(images, args.patch, length=args.steps * args.batch, seed=args.seed, depth=depth)
    return step_loader(patches, args, start_step, accelerator)


def step_loader(items: torch.utils.data.Dataset, args: argparse.Namespace, start_step: int,
                accelerator: Any) -> torch.utils.data.DataLoader:
    """This process's batches for steps ``[start_step, --steps)`` of a position-indexed dataset ``items``
    (item ``i`` a function of ``i`` and ``--seed``, ``--steps × --batch`` long): :class:`StepBatches`,
    stacked by :func:`collate_patches`."""
    world = accelerator.num_processes
    return torch.utils.data.DataLoader(
        items,
        batch_sampler=StepBatches(start_step, args.steps, args.batch // world, accelerator.process_index, world),
        collate_fn=collate_patches,
        num_workers=args.workers,
        pin_memory=accelerator.device.type == "cuda",
    )


def resumed_batches(loader: torch.utils.data.DataLoader, rng: dict[str, Any] | None) -> Iterator[torch.Tensor]:
    """``iter(loader)``, then the saved RNG states ``rng`` (if any) restored: creating the iterator draws
    from the global RNG, so the restore must come after it."""
    batches = iter(loader)
    if rng is not None:
        restore_rng_states(rng)
    return batches


# --- run folder and training state -----------------------------------------------------------
def checked_state_path(run_dir: Path, resume: bool) -> Path:
    """``run_dir/state.safetensors``; :class:`IDMError` if it exists without ``resume`` or is missing with it."""
    path = run_dir / STATE_FILE
    if path.exists() and not resume:
        raise IDMError(f"{path} exists: pass --resume to continue that run, or choose another --out")
    if resume and not path.exists():
        raise IDMError(f"--resume: no training state {path}")
    return path


@dataclass
class Progress:
    """What earlier invocations of a run did (nothing, for a fresh run)."""

    command: str  # the command of the first invocation
    step: int = 0  # optimizer steps done
    wall_time: float = 0.0  # seconds spent
    resumes: int = 0  # how often the run was resumed
    rng: dict[str, Any] | None = None  # this process's RNG states at ``step``


def resume_progress(state: dict[str, Any], accelerator: Any, optimizer: torch.optim.Optimizer,
                    scheduler: Any, logs: Sequence[Path]) -> Progress:
    """Load optimizer, LR scheduler and grad scaler from a saved ``state``, drop the lines of ``logs``
    after its step (main process) and return its progress (a resume more)."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if accelerator.scaler is not None and state.get("scaler"):
        accelerator.scaler.load_state_dict(state["scaler"])
    progress = Progress(command=state["command"], step=int(state["step"]), wall_time=float(state["wall_time"]),
                        resumes=int(state["resumes"]) + 1,
                        rng=state["rng"][min(accelerator.process_index, len(state["rng"]) - 1)])
    if accelerator.is_main_process:
        for log in logs:
            truncate_log(log, progress.step)
    return progress


def save_training_state(path: Path, accelerator: Any, progress: Progress, *, step: int, wall_time: float,
                        args: dict[str, Any], optimizer: torch.optim.Optimizer, scheduler: Any,
                        **parts: Any) -> None:
    """Write the state after ``step`` (main process; all processes must call it): progress, trajectory
    options ``args``, ``parts`` (model weights, ...), optimizer, scheduler, grad scaler and the RNG
    states of every process."""
    from accelerate.utils import gather_object

    from ..io.checkpoint import save_state

    accelerator.wait_for_everyone()
    rng = gather_object([capture_rng_states()]) if accelerator.num_processes > 1 else [capture_rng_states()]
    if accelerator.is_main_process:
        save_state(path, {
            "step": step,
            "wall_time": wall_time,
            "command": progress.command,
            "resumes": progress.resumes,
            "args": args,
            **parts,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else {},
            "rng": rng,
        })


# --- the training loop -----------------------------------------------------------------------
def warmup_cosine(step: int, warmup: int, total: int, final: float = 0.1) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine from 1 to ``final`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))


def optimizer_step(accelerator: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                   loss: torch.Tensor, grad_clip: float) -> float:
    """Back-propagate ``loss``, clip the gradient norm to ``grad_clip`` (0: no clipping), step optimizer
    and scheduler; return the learning rate the step used."""
    accelerator.backward(loss)
    if grad_clip > 0:
        accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return lr


def mean_loss(accelerator: Any, loss: torch.Tensor, step: int) -> float:
    """``loss`` averaged over the processes; :class:`IDMError` if it is not finite."""
    if accelerator.num_processes > 1:
        value = float(accelerator.reduce(loss.detach(), reduction="mean"))
    else:
        value = float(loss.detach())
    if not math.isfinite(value):
        raise IDMError(f"training diverged: loss is {value} at step {step}; lower --lr or use fp32")
    return value


@dataclass(frozen=True)
class LoopEnd:
    """Where :func:`run_steps` stopped."""

    step: int  # optimizer steps done, over all invocations
    out_of_time: bool  # stopped by --max-minutes
    wall_time: float  # seconds, over all invocations

    def ready_to_export(self, args: argparse.Namespace, accelerator: Any, *, when_out_of_time: bool) -> bool:
        """Whether the run should export now: it reached ``--steps``, or (``when_out_of_time``) ran out of
        ``--max-minutes``; otherwise say how to continue."""
        if self.step < args.steps:
            accelerator.print(f"stopped at step {self.step}/{args.steps}; continue with the same command plus --resume")
        return self.step >= args.steps or (when_out_of_time and self.out_of_time)


def run_steps(args: argparse.Namespace, accelerator: Any, progress: Progress, batches: Iterable[Any],
              step_fn: Callable[[Any, int], dict[str, Any]], save: Callable[[int, float], None], *,
              log_path: Path, desc: str, shown: Callable[[], dict[str, str]] | None = None) -> LoopEnd:
    """The training loop every trainer shares (pre-training, fine-tuning, classifier, registration, HA-GAN).

    From ``progress.step`` up to ``--steps`` (at most ``--stop-after`` steps in this invocation), for each
    batch of ``batches`` (batch ``s`` must depend only on ``s``: :func:`patch_loader` + :func:`resumed_batches`):
    ``entry = step_fn(batch, s)`` does optimizer step ``s`` (0-based) and returns its log entry (``"loss"``,
    ``"lr"``, anything else); the line ``{"step": s + 1, **entry, "wall_s": ...}`` goes to ``log_path`` and
    the progress bar (with ``shown()`` beside the loss). ``save(step, wall_time)`` writes the training
    state (:func:`save_training_state`; every process calls it) every ``--save-every`` steps, after the
    last step of this invocation and when ``--max-minutes`` are up, which ends the loop.
    """
    t0 = time.monotonic()
    stop = args.steps if args.stop_after is None else min(args.steps, progress.step + args.stop_after)
    step, out_of_time, world = progress.step, False, accelerator.num_processes
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with RunLog(log_path, main=accelerator.is_main_process, total=args.steps, initial=progress.step,
                desc=desc, show=not args.no_progress) as log:
        for batch in batches:
            if step >= stop:
                break
            entry = step_fn(batch, step)
            step += 1
            wall = progress.wall_time + time.monotonic() - t0
            log.record({"step": step, **entry, "wall_s": round(wall, 3)}, **(shown() if shown else {}))
            out_of_time = time_is_up(t0, args.max_minutes, world)
            if step % args.save_every == 0 or step == stop or out_of_time:
                save(step, wall)
            if out_of_time:
                break
    return LoopEnd(step, out_of_time, progress.wall_time + time.monotonic() - t0)


def time_is_up(started: float, max_minutes: float | None, world: int) -> bool:
    """Whether ``max_minutes`` have passed since ``time.monotonic()`` was ``started`` (never if None);
    with several processes the main process decides, so that all stop at the same step."""
    if max_minutes is None:
        return False
    up = time.monotonic() - started >= 60 * max_minutes
    if world > 1:
        from accelerate.utils import broadcast_object_list

        up = bool(broadcast_object_list([up])[0])
    return up


class RunLog:
    """``log.jsonl`` and the progress bar of a run (only the main process writes either); a context manager."""

    def __init__(self, path: Path, *, main: bool, total: int, initial: int, desc: str, show: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, disable=not show or not main, desc=desc, dynamic_ncols=True)
        self.file = open(path, "a", encoding="utf-8") if main else None
        self.smoothed_loss: float | None = None

    def record(self, entry: dict[str, Any], **shown: str) -> None:
        """Append ``entry`` (``{"step", "loss", "lr", ...}``) as a line and advance the bar, showing a
        smoothed loss, the LR and ``shown``."""
        loss = entry["loss"]
        self.smoothed_loss = loss if self.smoothed_loss is None else 0.98 * self.smoothed_loss + 0.02 * loss
        if self.file is not None:
            self.file.write(json.dumps(entry) + "\n")
            self.file.flush()
        self.bar.update(1)
        self.bar.set_postfix({"loss": f"{self.smoothed_loss:.4f}", "lr": f"{entry['lr']:.2e}", **shown})

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def truncate_log(path: Path, step: int) -> None:
    """Drop the JSON lines of ``path`` with ``"step"`` after ``step`` (written by an interrupted run
    after its last saved state)."""
    if not path.exists():
        return
    from ..io.atomic import atomic_write

    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    with atomic_write(path, mode="w") as handle:
        handle.write("".join(line + "\n" for line in kept))


def final_loss(log_path: Path, last: int = 200) -> float | None:
    """Mean loss of the last ``last`` lines of a ``log.jsonl`` (None without any)."""
    if not log_path.exists():
        return None
    losses = [json.loads(line)["loss"] for line in log_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return sum(losses[-last:]) / len(losses[-last:]) if losses else None


# --- export ----------------------------------------------------------------------------------
def export_directory(args: argparse.Namespace) -> Path:
    """``--export``, or ``RUNDIR/checkpoint``."""
    return Path(args.export) if args.export else Path(args.out) / "checkpoint"


@dataclass(frozen=True)
class RunSummary:
    """How a run went, as its checkpoint config and model card report it."""

    command: str
    hardware: str
    wall_time: float  # seconds, over all invocations
    resumes: int
    final_loss: float | None  # see :func:`final_loss`

    def fields(self) -> dict[str, Any]:
        """Entries for the ``training`` section of the checkpoint config."""
        return {"command": self.command, "hardware": self.hardware, "wall_time_s": round(self.wall_time, 1),
                "resumes": self.resumes, "final_loss": self.final_loss}

    def card_rows(self) -> list[str]:
        """Model-card table rows: hardware, wall time, final loss."""
        loss = (f"| final loss (mean of last 200 steps) | {self.final_loss:.4f} |" if self.final_loss is not None
                else "| final loss | n/a |")
        return [f"| hardware | {self.hardware} |",
                f"| wall time | {self.wall_time / 60:.1f} min ({self.resumes} resumes) |",
                loss]

    def command_lines(self) -> list[str]:
        """Model-card lines quoting the command."""
        return ["", "Command:", "", "```", self.command, "```"]


def data_row(args: argparse.Namespace, num_images: int) -> str:
    """Model-card table row describing the training patches."""
    return (f"| data | `{args.data}` ({num_images} images), random {args.patch}x{args.patch} patches, "
            "8 flips/rotations |")
