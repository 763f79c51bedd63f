"""Pre-train the ε-prediction diffusion prior on random patches of an image folder.

    python -m train.pretrain_prior --data ../shared/data/natural/Train400 --out runs/prior --steps 10000
    idm pretrain ...                          (same options)
    accelerate launch -m train.pretrain_prior ...   (multi-GPU; --batch is the global batch)

Loss: MSE between the U-Net's ε estimate and the noise, ``x_t = q_sample(2 x - 1, t, noise)`` with
``t`` uniform over the schedule. AdamW, linear warm-up then cosine decay to 10 % of ``--lr``, EMA of
the weights (``torch.optim.swa_utils.AveragedModel``). The run folder gets:

* ``state.safetensors`` every ``--save-every`` steps (atomic): model, EMA, optimizer, LR scheduler,
  step, cumulative wall time and RNG states; ``--resume`` continues exactly where it stopped (the
  data are a deterministic function of the step: patches indexed by position, and the noise / ``t``
  of step ``s`` come from a generator seeded with (seed, s, rank));
* ``log.jsonl``: one line ``{"step", "loss", "lr", "wall_s"}`` per step (``wall_s``: cumulative seconds);
* ``samples/step_XXXXXXX.png``: a grid of EMA samples (DDIM, 50 steps) every ``--sample-every``;
* at the end (or when ``--max-minutes`` runs out), the EMA weights as a checkpoint directory
  (``--export``, default ``RUNDIR/checkpoint``) stored as fp16 / bf16, with config and a model card.
  ``--stop-after N`` stops after N steps of this invocation without exporting (chunked runs).

``--evaluate CHECKPOINT --data DIR`` instead prints the one-step denoising PSNR of a checkpoint
(:func:`idm.priors.evaluate.evaluate_denoising`) on the images of ``DIR`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from idm.errors import IDMError

STATE_FILE = "state.safetensors"
LOG_FILE = "log.jsonl"
#: options that determine the training trajectory: a resumed run must repeat them
TRAJECTORY_OPTIONS = (
    "data", "steps", "batch", "patch", "lr", "warmup", "weight_decay", "grad_clip", "ema_decay",
    "base_channels", "channel_mults", "res_blocks", "attn", "dropout", "schedule", "mixed_precision", "seed",
)


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the pre-training options to ``parser`` (shared by ``idm pretrain``)."""
    io = parser.add_argument_group("data and run folder")
    io.add_argument("--data", help="folder of training images (or, with --evaluate, of test images)")
    io.add_argument("--out", default="runs/prior", help="run folder (state, log, samples; default runs/prior)")
    io.add_argument("--resume", action="store_true", help="continue the run in --out from its state.safetensors")
    io.add_argument("--export", help="checkpoint directory for the final EMA weights (default RUNDIR/checkpoint)")
    io.add_argument("--export-dtype", choices=("fp16", "bf16", "fp32"), default="fp16", help="weight storage dtype")
    io.add_argument("--eval-data", help="image folder for the denoising PSNR in the model card (optional)")
    io.add_argument("--evaluate", metavar="CHECKPOINT", help="only evaluate CHECKPOINT on --data and print JSON")

    tr = parser.add_argument_group("training")
    tr.add_argument("--steps", type=int, default=10000, help="total optimizer steps (default 10000)")
    tr.add_argument("--batch", type=int, default=16, help="global batch size (default 16)")
    tr.add_argument("--patch", type=int, default=64, help="square patch size (default 64)")
    tr.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default 2e-4)")
    tr.add_argument("--warmup", type=int, default=200, help="linear LR warm-up steps (default 200)")
    tr.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    tr.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip, 0 = off (default 1)")
    tr.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay per step (default 0.999)")
    tr.add_argument("--schedule", choices=("linear", "cosine"), default="linear", help="noise schedule (1000 steps)")
    tr.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no", help="accelerate mixed precision (GPU; on CPU accelerate trains in fp32)")
    tr.add_argument("--seed", type=int, default=0, help="seed of initialisation, patches and noise (default 0)")

    net = parser.add_argument_group("U-Net size")
    net.add_argument("--base-channels", type=int, default=32, help="channels at full resolution (default 32)")
    net.add_argument("--channel-mults", type=_int_tuple, default=(1, 2, 2, 2), help="per-level multipliers (default 1,2,2,2)")
    net.add_argument("--res-blocks", type=int, default=2, help="ResBlocks per level (default 2)")
    net.add_argument("--attn", type=_int_tuple, default=(2,), help="levels with self-attention, e.g. 2 or 2,3 or '' (default 2)")
    net.add_argument("--dropout", type=float, default=0.0, help="ResBlock dropout (default 0)")

    run = parser.add_argument_group("run control")
    run.add_argument("--sample-every", type=int, default=1000, help="steps between EMA sample grids, 0 = never")
    run.add_argument("--save-every", type=int, default=500, help="steps between training-state saves (default 500)")
    run.add_argument("--stop-after", type=int, help="stop (saving the state) after this many steps in this invocation")
    run.add_argument("--max-minutes", type=float, help="stop after this much wall time (saving the state and exporting the EMA weights so far)")
    run.add_argument("--threads", type=int, help="torch CPU threads")
    run.add_argument("--workers", type=int, default=0, help="data-loader worker processes (default 0)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.pretrain_prior", description=__doc__.splitlines()[0])
    return add_arguments(parser)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except IDMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.evaluate:
        return _evaluate_only(args)
    return train(args)


# --- helpers ---------------------------------------------------------------------------------
def unet_config_from_args(args: argparse.Namespace):
    from idm.priors import UNetConfig

    return UNetConfig(
        base_channels=args.base_channels,
        channel_mults=tuple(args.channel_mults),
        num_res_blocks=args.res_blocks,
        attention_levels=tuple(args.attn),
        dropout=args.dropout,
    )


def lr_factor(step: int, warmup: int, total: int, final: float = 0.1) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine from 1 to ``final`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))


def command_line(args: argparse.Namespace) -> str:
    """An explicit command reproducing this run (every trajectory option spelled out)."""
    parts = ["python", "-m", "train.pretrain_prior"]
    for name in (*TRAJECTORY_OPTIONS, "out"):
        value = getattr(args, name)
        if isinstance(value, (tuple, list)):
            value = ",".join(str(v) for v in value)
        parts += [f"--{name.replace('_', '-')}", str(value)]
    return shlex.join(parts)


def hardware(num_processes: int, device: torch.device) -> str:
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


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def _patch_tensor(item: Any) -> torch.Tensor:
    """A patch from the dataset: a tensor, or ``(name, tensor)``."""
    return item[-1] if isinstance(item, (tuple, list)) else item


def _collate(items: list[Any]) -> torch.Tensor:
    return torch.stack([_patch_tensor(item) for item in items])


def _evaluation_images(folder: str) -> list[torch.Tensor]:
    from idm.data import ImageFolder

    images = ImageFolder(folder)
    return [images[i][1] for i in range(len(images))]


def _evaluate_only(args: argparse.Namespace) -> int:
    from idm.priors import load_prior
    from idm.priors.evaluate import evaluate_denoising

    if not args.data:
        raise IDMError("--evaluate needs --data: a folder of test images")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prior = load_prior(args.evaluate, device=device)
    print(json.dumps(evaluate_denoising(prior, _evaluation_images(args.data)), indent=2))
    return 0


def _check_resume(args: argparse.Namespace, stored: dict[str, Any]) -> None:
    for name in TRAJECTORY_OPTIONS:
        given, saved = getattr(args, name), stored.get(name)
        if isinstance(given, tuple):
            given = list(given)
        if isinstance(saved, tuple):
            saved = list(saved)
        if given != saved:
            raise IDMError(
                f"--resume: --{name.replace('_', '-')} is {given!r} but the run in {args.out} used {saved!r}; "
                "repeat the original options"
            )


def _trajectory_args(args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for name in TRAJECTORY_OPTIONS:
        value = getattr(args, name)
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


def _validate(args: argparse.Namespace, world: int) -> None:
    if not args.data:
        raise IDMError("--data is required: a folder of training images")
    for name in ("steps", "batch", "patch", "save_every"):
        if getattr(args, name) < 1:
            raise IDMError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.batch % world:
        raise IDMError(f"--batch {args.batch} is not divisible by the {world} processes")
    if not 0.0 <= args.ema_decay < 1.0:
        raise IDMError(f"--ema-decay must lie in [0, 1), got {args.ema_decay}")
    if args.lr <= 0:
        raise IDMError(f"--lr must be positive, got {args.lr}")


# --- training --------------------------------------------------------------------------------
def train(args: argparse.Namespace) -> int:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import broadcast_object_list, gather_object, set_seed
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    from tqdm.auto import tqdm

    from idm.data import ImageFolder, RandomPatches
    from idm.io.checkpoint import load_state, save_state
    from idm.priors import NoiseSchedule, Prior, UNet, to_model_range

    # AcceleratorState is a per-process singleton fixed by the first Accelerator; reset its mixed-precision
    # part (not the distributed setup) so several runs can follow each other in one process.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    _validate(args, world)
    run_dir = Path(args.out)
    state_path = run_dir / STATE_FILE
    if state_path.exists() and not args.resume:
        raise IDMError(f"{state_path} exists: pass --resume to continue that run, or choose another --out")
    if args.resume and not state_path.exists():
        raise IDMError(f"--resume: no training state {state_path}")

    set_seed(args.seed)
    unet_config = unet_config_from_args(args)
    schedule = NoiseSchedule(args.schedule)
    model = UNet(unet_config)
    if args.patch % unet_config.size_multiple:
        raise IDMError(f"--patch {args.patch} must be divisible by {unet_config.size_multiple} for this U-Net")
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema_decay), use_buffers=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, args.warmup, args.steps))

    start_step, wall_before, command, resumes, rng_state = 0, 0.0, command_line(args), 0, None
    if args.resume:
        state = load_state(state_path)
        _check_resume(args, state["args"])
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step, wall_before = int(state["step"]), float(state["wall_time"])
        command, resumes = state["command"], int(state["resumes"]) + 1
        if accelerator.scaler is not None and state.get("scaler"):
            accelerator.scaler.load_state_dict(state["scaler"])
        rng_state = state["rng"][min(rank, len(state["rng"]) - 1)]
        if accelerator.is_main_process:
            _truncate_log(run_dir / LOG_FILE, start_step)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema.to(device)

    images = ImageFolder(args.data)
    patches = RandomPatches(images, args.patch, length=args.steps * args.batch, seed=args.seed)
    per_process = args.batch // world
    loader = torch.utils.data.DataLoader(
        patches,
        batch_sampler=StepBatches(start_step, args.steps, per_process, rank, world),
        collate_fn=_collate,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
    )
    noise_gen = torch.Generator(device=device)

    def checkpoint_state(step: int, wall: float) -> None:
        accelerator.wait_for_everyone()
        rng = gather_object([_rng_state()]) if world > 1 else [_rng_state()]
        if accelerator.is_main_process:
            save_state(state_path, {
                "step": step,
                "wall_time": wall,
                "command": command,
                "resumes": resumes,
                "args": _trajectory_args(args),
                "model": accelerator.unwrap_model(model).state_dict(),
                "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else {},
                "rng": rng,
            })

    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    stop = args.steps if args.stop_after is None else min(args.steps, start_step + args.stop_after)
    bar = tqdm(total=args.steps, initial=start_step, disable=args.no_progress or not accelerator.is_main_process,
               desc="pretrain", dynamic_ncols=True)
    shown_loss, step, out_of_time = None, start_step, False
    model.train()
    log = open(run_dir / LOG_FILE, "a", encoding="utf-8") if accelerator.is_main_process else None
    batches = iter(loader)  # draws from the global RNG: restore the saved RNG states after it
    if rng_state is not None:
        _set_rng_state(rng_state)
    try:
        for batch in batches:
            if step >= stop:
                break
            x0 = to_model_range(batch.to(device, non_blocking=True))
            noise_gen.manual_seed((args.seed * 1_000_003 + step) * world + rank)
            t = torch.randint(0, schedule.num_steps, (x0.shape[0],), generator=noise_gen, device=device)
            noise = torch.randn(x0.shape, generator=noise_gen, device=device)
            x_t = schedule.q_sample(x0, t, noise)
            loss = F.mse_loss(model(x_t, t).float(), noise)
            accelerator.backward(loss)
            if args.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), args.grad_clip)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update_parameters(accelerator.unwrap_model(model))
            step += 1

            value = float(accelerator.reduce(loss.detach(), reduction="mean")) if world > 1 else float(loss.detach())
            if not math.isfinite(value):
                raise IDMError(f"training diverged: loss is {value} at step {step}; lower --lr or use fp32")
            shown_loss = value if shown_loss is None else 0.98 * shown_loss + 0.02 * value
            wall = wall_before + time.monotonic() - t0
            if log is not None:
                log.write(json.dumps({"step": step, "loss": value, "lr": lr, "wall_s": round(wall, 3)}) + "\n")
                log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{shown_loss:.4f}", lr=f"{lr:.2e}")

            out_of_time = args.max_minutes is not None and time.monotonic() - t0 >= 60 * args.max_minutes
            if world > 1 and args.max_minutes is not None:  # all processes must stop at the same step
                out_of_time = bool(broadcast_object_list([out_of_time])[0])
            if step % args.save_every == 0 or step == stop or out_of_time:
                checkpoint_state(step, wall)
            if args.sample_every and step % args.sample_every == 0 and accelerator.is_main_process:
                _write_samples(Prior(ema.module, schedule), run_dir / "samples" / f"step_{step:07d}.png", args)
            if out_of_time:
                break
    finally:
        bar.close()
        if log is not None:
            log.close()

    if step < args.steps:
        accelerator.print(f"stopped at step {step}/{args.steps}; continue with the same command plus --resume")
        if not out_of_time:
            return 0
    if accelerator.is_main_process:  # finished, or out of --max-minutes: export the EMA weights so far
        wall = wall_before + time.monotonic() - t0
        export_dir = Path(args.export) if args.export else run_dir / "checkpoint"
        export(Prior(ema.module, schedule), export_dir, args, command=command, wall_time=wall,
               hardware_text=hardware(world, device), resumes=resumes, log_path=run_dir / LOG_FILE,
               num_images=len(images), steps_done=step)
        accelerator.print(f"exported EMA weights after {step} steps to {export_dir}")
    accelerator.wait_for_everyone()
    return 0


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines after ``step`` (written by an interrupted run after its last saved state)."""
    if not path.exists():
        return
    from idm.io.atomic import atomic_write

    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    with atomic_write(path, mode="w") as handle:
        handle.write("".join(line + "\n" for line in kept))


def _write_samples(prior: Any, path: Path, args: argparse.Namespace) -> None:
    from idm.cli.sample import write_grid

    was_training = prior.unet.training
    images = prior.sample(16, args.patch, steps=50, sampler="ddim", seed=args.seed)
    prior.unet.train(was_training)
    write_grid(images, path)


def _final_loss(log_path: Path, last: int = 200) -> float | None:
    if not log_path.exists():
        return None
    losses = [json.loads(line)["loss"] for line in log_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return sum(losses[-last:]) / len(losses[-last:]) if losses else None


def export(prior: Any, directory: Path, args: argparse.Namespace, *, command: str, wall_time: float,
           hardware_text: str, resumes: int, log_path: Path, num_images: int, steps_done: int) -> Path:
    """Write the EMA prior as a checkpoint directory with a model card."""
    from idm.priors.evaluate import evaluate_denoising
    from idm.priors.unet import count_parameters

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[args.export_dtype]
    final_loss = _final_loss(log_path)
    denoising = evaluate_denoising(prior, _evaluation_images(args.eval_data)) if args.eval_data else None
    training = {
        "data": str(args.data), "num_images": num_images, "patch": args.patch, "steps": steps_done,
        "planned_steps": args.steps,
        "batch": args.batch, "lr": args.lr, "warmup": args.warmup, "ema_decay": args.ema_decay,
        "mixed_precision": args.mixed_precision, "seed": args.seed, "command": command,
        "hardware": hardware_text, "wall_time_s": round(wall_time, 1), "resumes": resumes,
        "final_loss": final_loss, "weights": "EMA", "storage_dtype": args.export_dtype,
    }
    prior.extra = {**prior.extra, "training": training, **({"denoising": denoising} if denoising else {})}
    cfg = prior.unet.config
    lines = [
        "# idm diffusion prior (ε-prediction U-Net)",
        "",
        f"Gray-scale DDPM prior; images on [0, 1] are mapped to [-1, 1] (`2x - 1`). "
        f"{count_parameters(prior.unet) / 1e6:.2f} M parameters, EMA weights (decay {args.ema_decay}) "
        f"stored as {args.export_dtype}. Load with `idm.priors.load_prior(path)`.",
        "",
        "| | |", "|---|---|",
        f"| architecture | U-Net: base {cfg.base_channels} ch, mults {list(cfg.channel_mults)}, "
        f"{cfg.num_res_blocks} ResBlocks/level, attention at levels {list(cfg.attention_levels)} |",
        f"| noise schedule | {prior.schedule.kind}, {prior.schedule.num_steps} steps |",
        f"| data | `{args.data}` ({num_images} images), random {args.patch}x{args.patch} patches, 8 flips/rotations |",
        f"| steps x batch | {steps_done} x {args.batch}"
        + (f" (stopped by the time budget; {args.steps} planned)" if steps_done < args.steps else "") + " |",
        f"| optimizer | AdamW lr {args.lr:g}, warm-up {args.warmup}, cosine to 10 %, grad clip {args.grad_clip:g} |",
        f"| mixed precision | {args.mixed_precision} |",
        f"| hardware | {hardware_text} |",
        f"| wall time | {wall_time / 60:.1f} min ({resumes} resumes) |",
        f"| final loss (mean of last 200 steps) | {final_loss:.4f} |" if final_loss is not None else "| final loss | n/a |",
        "",
        "Command:", "", "```", command, "```",
    ]
    if denoising:
        lines += ["", f"One-step denoising PSNR on `{args.eval_data}` (x̂₀ from x_t at matched noise level):", "",
                  "| σ (of 255) | t | input PSNR | x̂₀ PSNR |", "|---|---|---|---|"]
        lines += [f"| {k[5:]} | {v['t']} | {v['input_psnr']:.2f} | {v['psnr']:.2f} |" for k, v in denoising.items()]
    return prior.save(directory, "\n".join(lines) + "\n", dtype=dtype)


if __name__ == "__main__":
    sys.exit(main())
