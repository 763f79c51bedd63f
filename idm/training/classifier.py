"""Train the noise-aware healthy / diseased classifier of the anomaly detector (Wolleb et al., MICCAI 2022).

    python -m idm.training.classifier --scans DIR/scans --masks DIR/masks --out runs/classifier --steps 2000

``--scans`` holds four-contrast scans ``(4, H, W)`` ``.npy`` on [0, 1] and ``--masks`` a tumour mask
``(H, W)`` ``.npy`` (1 = tumour) of the same name for each scan used (scans without a mask are skipped;
``python -m train.anomaly_scans`` writes both). Each step draws ``--batch`` random ``--patch`` patches
(one of the 8 flips / rotations; mask and scan cropped together, :class:`~idm.data.RandomPatches`); a
patch is *diseased* (1) when at least ``--min-tumour`` of its pixels are tumour and *healthy* (0) when
none are (patches in between are left out of the loss). With ``t`` uniform over the schedule and
``x_t = √ᾱ_t (2x − 1) + √(1 − ᾱ_t) n`` the loss is the class-balanced cross-entropy of
:class:`~idm.medical.anomaly.NoiseAwareClassifier` ``(x_t, t)``. AdamW, warm-up then cosine. The run
folder gets ``state.safetensors`` every ``--save-every`` steps (``--resume`` continues exactly: the
patches of step s and its noise depend only on ``--seed`` and s), ``log.jsonl`` and, at the end, the
weights as a checkpoint (``--export``, default ``RUNDIR/checkpoint``: safetensors, config, model card).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import IDMError
from .common import (Progress, RunSummary, add_run_control_arguments, add_run_folder_arguments, checked_state_path,
                     command_line, export_directory, final_loss, hardware, load_run_state, mean_loss, new_accelerator,
                     optimizer_step, patch_loader, resume_progress, resumed_batches, run_steps, script_main,
                     save_training_state, trajectory_args, warmup_cosine)

MODULE = "idm.training.classifier"
STATE_FILE, LOG_FILE = "state.safetensors", "log.jsonl"
#: options that fix the training trajectory (checked on --resume)
TRAJECTORY_OPTIONS = ("scans", "masks", "steps", "batch", "patch", "lr", "warmup", "weight_decay", "grad_clip",
                      "min_tumour", "schedule", "seed", "base_channels", "channel_mults")
ARCHITECTURE = "noise-aware-classifier"


def _int_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    io = parser.add_argument_group("data and run folder")
    io.add_argument("--scans", required=True, help="folder of (4, H, W) .npy scans on [0, 1]")
    io.add_argument("--masks", required=True, help="folder of (H, W) .npy tumour masks named as the scans")
    io.add_argument("--out", default="runs/classifier", help="run folder (default runs/classifier)")
    add_run_folder_arguments(io)
    tr = parser.add_argument_group("training")
    tr.add_argument("--steps", type=int, default=2000, help="optimizer steps (default 2000)")
    tr.add_argument("--batch", type=int, default=16, help="patches per step (default 16)")
    tr.add_argument("--patch", type=int, default=64, help="square patch size (default 64)")
    tr.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default 3e-4)")
    tr.add_argument("--warmup", type=int, default=100, help="linear warm-up steps (default 100)")
    tr.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default 0.05)")
    tr.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip, 0 = off (default 1)")
    tr.add_argument("--min-tumour", type=float, default=0.02,
                    help="least tumour fraction of a diseased patch (default 0.02; 0 < f <= 1)")
    tr.add_argument("--schedule", choices=("linear", "cosine"), default="linear", help="noise schedule (1000 steps)")
    tr.add_argument("--seed", type=int, default=0, help="seed of initialisation, patches and noise (default 0)")
    tr.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no", help="accelerate mixed precision")
    net = parser.add_argument_group("classifier size")
    net.add_argument("--base-channels", type=int, default=32, help="channels at full resolution (default 32)")
    net.add_argument("--channel-mults", type=_int_tuple, default=(1, 2, 2, 4), help="per-level multipliers (default 1,2,2,4)")
    add_run_control_arguments(parser.add_argument_group("run control"),
                              max_minutes_help="stop, save and export after this many minutes")
    return parser


def load_pairs(scans: str | Path, masks: str | Path) -> list[torch.Tensor]:
    """Every scan with a mask as one ``(5, H, W)`` tensor: the 4 contrasts and the mask (0 / 1)."""
    from ..data.images import load_array, read_npy
    from ..medical.anomaly import check_scan

    scan_dir, mask_dir = Path(scans), Path(masks)
    for folder in (scan_dir, mask_dir):
        if not folder.is_dir():
            raise IDMError(f"folder not found: {folder}")
    pairs = []
    for path in sorted(scan_dir.glob("*.npy")):
        mask_path = mask_dir / path.name
        if not mask_path.is_file():
            continue
        scan = check_scan(load_array(path), f"scan {path}")
        mask = torch.from_numpy(read_npy(mask_path, "mask").astype("float32"))
        if mask.shape != scan.shape[1:]:
            raise IDMError(f"mask {mask_path} is {tuple(mask.shape)}, its scan {tuple(scan.shape[1:])}")
        pairs.append(torch.cat([scan, (mask > 0).float()[None]]))
    if not pairs:
        raise IDMError(f"no scans in {scan_dir} with a mask of the same name in {mask_dir}")
    return pairs


def labels(masks: torch.Tensor, min_tumour: float) -> torch.Tensor:
    """Per patch ``(B, H, W)`` masks → 1 diseased (tumour fraction ≥ ``min_tumour``), 0 healthy (none),
    −1 in between (ignored)."""
    fraction = masks.flatten(1).mean(1)
    out = torch.full_like(fraction, -1, dtype=torch.long)
    out[fraction == 0] = 0
    out[fraction >= min_tumour] = 1
    return out


def balanced_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with each present class weighted to half of the loss (``target`` −1: ignored)."""
    kept = target >= 0
    if not bool(kept.any()):
        return logits.sum() * 0.0
    losses = F.cross_entropy(logits[kept], target[kept], reduction="none")
    classes = target[kept]
    weights = torch.stack([(classes == c).float() / (classes == c).float().sum().clamp_min(1) for c in (0, 1)]).sum(0)
    return (losses * weights).sum() / weights.sum()


def run(args: argparse.Namespace) -> int:
    from accelerate.utils import set_seed

    from ..medical.anomaly import NoiseAwareClassifier
    from ..priors import NoiseSchedule, to_model_range

    accelerator = new_accelerator(args.mixed_precision)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    for name in ("steps", "batch", "patch", "save_every", "base_channels"):
        if getattr(args, name) < 1:
            raise IDMError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.batch % world or args.lr <= 0:
        raise IDMError(f"--batch must split over the {world} processes and --lr be positive")
    if not 0 < args.min_tumour <= 1:
        raise IDMError(f"--min-tumour must lie in (0, 1], got {args.min_tumour}")
    run_dir = Path(args.out)
    state_path = checked_state_path(run_dir, args.resume)
    images = load_pairs(args.scans, args.masks)
    set_seed(args.seed)
    schedule = NoiseSchedule(args.schedule)
    model = NoiseAwareClassifier(base_channels=args.base_channels, channel_mults=args.channel_mults)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, args.warmup, args.steps))
    progress = Progress(command=command_line(MODULE, args, (*TRAJECTORY_OPTIONS, "out")))
    if args.resume:
        state = load_run_state(state_path, args, TRAJECTORY_OPTIONS)
        model.load_state_dict(state["model"])
        progress = resume_progress(state, accelerator, optimizer, scheduler, logs=[run_dir / LOG_FILE])
    model, optimizer = accelerator.prepare(model, optimizer)
    loader = patch_loader(images, args, progress.step, accelerator)
    noise_gen = torch.Generator(device=device)
    model.train()

    def step_fn(batch: torch.Tensor, step: int) -> dict[str, Any]:
        batch = batch.to(device)
        noise_gen.manual_seed((args.seed * 1_000_003 + step) * world + rank)
        x0, target = to_model_range(batch[:, :4]), labels(batch[:, 4], args.min_tumour)
        t = torch.randint(0, schedule.num_steps, (x0.shape[0],), generator=noise_gen, device=device)
        x_t = schedule.q_sample(x0, t, torch.randn(x0.shape, generator=noise_gen, device=device))
        loss = balanced_loss(model(x_t, t).float(), target)
        lr = optimizer_step(accelerator, model, optimizer, scheduler, loss, args.grad_clip)
        return {"loss": mean_loss(accelerator, loss, step + 1), "lr": lr,
                "diseased": int((target == 1).sum()), "healthy": int((target == 0).sum())}

    def save(step: int, wall: float) -> None:
        save_training_state(state_path, accelerator, progress, step=step, wall_time=wall,
                            args=trajectory_args(args, TRAJECTORY_OPTIONS), optimizer=optimizer,
                            scheduler=scheduler, model=accelerator.unwrap_model(model).state_dict())

    end = run_steps(args, accelerator, progress, resumed_batches(loader, progress.rng), step_fn, save,
                    log_path=run_dir / LOG_FILE, desc="classifier")
    if not end.ready_to_export(args, accelerator, when_out_of_time=True):
        return 0
    if accelerator.is_main_process:
        summary = RunSummary(progress.command, hardware(world, device), end.wall_time, progress.resumes,
                             final_loss(run_dir / LOG_FILE))
        export(accelerator.unwrap_model(model), export_directory(args), args, summary, len(images), end.step)
        accelerator.print(f"exported the classifier after {end.step} steps to {export_directory(args)}")
    return 0


def export(model: Any, directory: Path, args: argparse.Namespace, summary: RunSummary, num_scans: int,
           steps_done: int) -> Path:
    """The classifier as a checkpoint: safetensors weights, config and model card."""
    from ..io.checkpoint import save_checkpoint
    from .common import EXPORT_DTYPES

    config = {"architecture": ARCHITECTURE, "classifier": model.config, "schedule": {"kind": args.schedule},
              "classes": ["healthy", "diseased"], "value_range": [0, 1],
              "training": {**summary.fields(), "steps": steps_done, "scans": str(args.scans), "masks": str(args.masks),
                           "num_scans": num_scans, "patch": args.patch, "batch": args.batch,
                           "min_tumour": args.min_tumour, "seed": args.seed}}
    card = "\n".join([
        "# noise-aware healthy / diseased classifier (anomaly detection)", "",
        f"`idm.medical.anomaly.NoiseAwareClassifier` {model.config}: logits (healthy, diseased) of a noised "
        f"four-contrast scan x_t at timestep t; trained on {num_scans} labelled scans, random "
        f"{args.patch}² patches (diseased: ≥ {args.min_tumour:g} tumour pixels, healthy: none), "
        f"{steps_done} × {args.batch} patches. Small data: say so wherever it is used.", "",
        "| | |", "|---|---|", *summary.card_rows(), *summary.command_lines()])
    return save_checkpoint(directory, model.state_dict(), config, card, dtype=EXPORT_DTYPES[args.export_dtype])


def load_classifier(source: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A classifier checkpoint (:func:`export`; a folder or a shipped name such as ``classifier-brats4``)
    as an eval-mode :class:`~idm.medical.anomaly.NoiseAwareClassifier`."""
    from ..io.checkpoint import load_model
    from ..medical.anomaly import NoiseAwareClassifier

    return load_model(source, ARCHITECTURE, lambda config: NoiseAwareClassifier(**config["classifier"]), device)


main = script_main(MODULE)


if __name__ == "__main__":
    sys.exit(main())
