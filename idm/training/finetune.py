"""Fine-tune the IDM network end to end (or train the ``unrolled`` baseline) for scrambled block CS at one ratio.

    python -m train.finetune --init prior-gray --ratio 0.1 --data ../shared/data/natural/Train400 \\
        --val ../shared/data/natural/Set12 --out runs/idm-cs10 --steps 20000 --batch 8 --patch 128
    idm finetune ...                               (same options; also python -m idm.training.finetune)
    accelerate launch -m train.finetune ...        (multi-GPU / multi-CPU; --batch is the global batch;
                                                    -m idm.training.finetune outside a checkout)

``--init`` is a prior checkpoint (the network starts as the prior's T-step sampler), a denoiser checkpoint (e.g. ``dncnn-6``)
or an IDM checkpoint trained at another ratio (its weights and architecture are reused). With
``--arch unrolled`` the same loop trains the learned baseline :mod:`idm.baselines.unrolled` from
scratch (``--phases``, ``--channels``), or from an unrolled checkpoint at another ratio. Loss: L1
between the network's final output and the patch. Each step measures its global batch with one
:class:`~idm.physics.BlockCS` whose pixel permutation is redrawn (seed = f(seed, step)); Φ is the
fixed matrix of ``--matrix-seed`` (the one evaluation uses). Adam; the LR is halved at 20/40/60/80 %
of ``--steps`` (``--lr-schedule step``, the paper's schedule) or follows a cosine to 10 % after a
linear warm-up. The run folder gets:

* ``state.safetensors`` every ``--save-every`` steps (atomic): model, optimizer, LR scheduler, grad
  scaler, step, wall time, RNG states; ``--resume`` continues exactly (patches are indexed by
  position, permutations seeded by step). Each save also checks that all processes hold identical
  parameters;
* ``log.jsonl`` (``{"step", "loss", "lr"}`` per step) and ``val.jsonl`` (``{"step", "psnr", "ssim"}``
  every ``--val-every`` steps: mean over ``--val`` images measured with permutation seeds 0, 1, …,
  scored like :func:`idm.evaluation.evaluate` — PSNR peak 255 and scikit-image SSIM on the crop);
* at the end, a compact checkpoint (``--export``, default ``RUNDIR/checkpoint``; fp16 weights,
  config, model card with command, steps, batch, hardware, wall time and validation PSNR/SSIM).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import IDMError, check_ratio
from ..invertible.diffusers import PRUNE_PRESETS
from ..physics._args import count_for_ratio
from .common import (
    EXPORT_DTYPES, LOG_FILE, Progress, RunLog, RunSummary, add_run_control_arguments, add_run_folder_arguments,
    check_training_args, checked_state_path, command_line, data_row, export_directory, final_loss, hardware,
    load_run_state, mean_loss, new_accelerator, optimizer_step, patch_loader, resume_progress, resumed_batches,
    save_training_state, script_main, script_parser, time_is_up, trajectory_args, warmup_cosine,
)

VAL_FILE = "val.jsonl"
#: options that determine the training trajectory: a resumed run must repeat them
TRAJECTORY_OPTIONS = (
    "arch", "init", "prior", "prune", "phases", "channels", "ratio", "block_size", "matrix_seed", "data", "steps", "batch", "patch", "lr", "lr_schedule",
    "warmup", "grad_clip", "sampling_steps", "unshuffle", "schedule_init", "alpha_init", "coupling_v", "mixed_precision",
    "seed", "ratio_range", "start", "sigma_max", "sigma_min",
)
#: IDM-only network options (``--arch unrolled`` rejects them)
IDM_OPTIONS = ("sampling_steps", "unshuffle", "schedule_init", "alpha_init", "coupling_v", "start", "sigma_max", "sigma_min")
#: the paper halves the LR at epochs 10/20/30/40 of 50
STEP_MILESTONES = (0.2, 0.4, 0.6, 0.8)
#: trainable reconstruction networks (``--arch``)
ARCHITECTURES = ("idm", "unrolled")


def _ratio_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ratios, got {text!r}") from None


def _ratio_pair(text: str) -> tuple[float, float]:
    values = _ratio_list(text)
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH (two ratios), got {text!r}")
    return values[0], values[1]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the fine-tuning options to ``parser`` (shared by ``idm finetune``)."""
    io = parser.add_argument_group("initialisation, data and run folder")
    io.add_argument("--arch", choices=ARCHITECTURES, default="idm",
                    help="idm: fine-tune the IDM network (default); unrolled: train the ISTA-Net+ baseline")
    io.add_argument("--init", help="idm: a prior checkpoint (name or folder, default prior-gray) or an IDM checkpoint "
                                   "at another ratio; unrolled: an unrolled checkpoint at another ratio (default: "
                                   "from scratch)")
    io.add_argument("--prior", help="idm: the prior to start from — a prior checkpoint, a local diffusers folder "
                                    "(UNet2DModel or Stable-Diffusion-style UNet2DConditionModel, model or pipeline "
                                    "folder) or an explicit hub id hf:ORG/NAME (the only case that downloads)")
    io.add_argument("--prune", choices=tuple(PRUNE_PRESETS),
                    help="diffusers --prior: none, or paper (cross-attention, middle block and two deepest stages "
                         "removed); default paper for UNet2DConditionModel, none for UNet2DModel")
    io.add_argument("--data", help="folder of training images (e.g. Train400)")
    io.add_argument("--val", help="folder of validation images (e.g. Set12 or BSD68)")
    io.add_argument("--val-limit", type=int, help="only the first N validation images")
    io.add_argument("--out", help="run folder (default runs/idm-csNN)")
    add_run_folder_arguments(io)

    cs = parser.add_argument_group("measurement (scrambled block CS)")
    ratio = cs.add_mutually_exclusive_group(required=True)
    ratio.add_argument("--ratio", type=float, help="sampling ratio in (0, 1]")
    ratio.add_argument("--ratio-range", type=_ratio_pair, metavar="LOW,HIGH",
                       help="one network for every ratio in [LOW, HIGH] (e.g. 0.05,0.6): each step draws its ratio "
                            "uniformly (seeded by the step); validation at --val-ratios")
    cs.add_argument("--val-ratios", type=_ratio_list, default=(0.1, 0.3, 0.5), metavar="R1,R2,...",
                    help="with --ratio-range: the ratios validated (default 0.1,0.3,0.5)")
    cs.add_argument("--block-size", type=int, default=32, help="block size B (default 32)")
    cs.add_argument("--matrix-seed", type=int, default=0, help="seed of the sampling matrix Φ (default 0, as evaluation)")

    tr = parser.add_argument_group("training")
    tr.add_argument("--steps", type=int, default=20000, help="total optimizer steps (default 20000)")
    tr.add_argument("--batch", type=int, default=8, help="global batch size (default 8)")
    tr.add_argument("--patch", type=int, default=128, help="square patch size, a multiple of the block size (default 128); under scrambled block CS, "
                         "networks trained on small patches generalise badly to whole images (README)")
    tr.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4, Adam)")
    tr.add_argument("--lr-schedule", choices=("step", "cosine"), default="step",
                    help="step: halve at 20/40/60/80%% of --steps (paper); cosine: to 10%% after --warmup")
    tr.add_argument("--warmup", type=int, default=0, help="linear LR warm-up steps (default 0)")
    tr.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip, 0 = off (default 1)")
    tr.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no", help="accelerate mixed precision")
    tr.add_argument("--levels", choices=("both", "steps", "none"), default="both",
                    help="IDM invertibility levels (memory only; same result): both (default), steps, none")
    tr.add_argument("--seed", type=int, default=0, help="seed of initialisation, patches and permutations (default 0)")

    net = parser.add_argument_group("network (with a prior --init; an IDM --init keeps its own)")
    net.add_argument("--sampling-steps", type=int, help="sampling steps T (default 3)")
    net.add_argument("--unshuffle", type=int, choices=(1, 2), help="pixel-unshuffle factor of the U-Net input (default 2)")
    net.add_argument("--schedule-init", choices=("paper", "prior", "sigma"),
                     help="initial ᾱ: paper (every α = --alpha-init), prior (its respaced ᾱ) or sigma (noise std from "
                          "--sigma-max to --sigma-min; default for a denoiser prior, paper otherwise)")
    net.add_argument("--sigma-max", type=float, help="--schedule-init sigma: image-scale noise std of step T (default 0.1)")
    net.add_argument("--sigma-min", type=float, help="--schedule-init sigma: noise std of step 1 (default 0.01)")
    net.add_argument("--start", choices=("adjoint", "tv", "pnp"),
                     help="initial estimate the sampler starts from: adjoint (A†y, default), tv or pnp (each costs "
                          "its own run time at every call)")
    net.add_argument("--alpha-init", type=float, help="with --schedule-init paper: the initial α of every step, in (0, 1) "
                     "(ᾱ_t = α^t; default 0.5, the paper's)")
    net.add_argument("--coupling-v", type=float, help="initial v of every reversible coupling, in (0, 1) "
                     "(default 0.5, IDM's; smaller starts closer to the plain sampler)")
    net.add_argument("--phases", type=int, help="unrolled from scratch: phases K (default 9)")
    net.add_argument("--channels", type=int, help="unrolled from scratch: feature channels (default 32)")

    run = parser.add_argument_group("run control")
    run.add_argument("--val-every", type=int, default=1000, help="steps between validations, 0 = only at the end")
    add_run_control_arguments(run, max_minutes_help="stop (saving the state) after this much wall time")
    return parser


build_parser = partial(script_parser, "idm.training.finetune")
main = script_main("idm.training.finetune")


def run(args: argparse.Namespace) -> int:
    return train(args)


# --- helpers ---------------------------------------------------------------------------------
def lr_factor(step: int, schedule: str, warmup: int, total: int) -> float:
    """LR multiplier at ``step``: linear warm-up, then ``step`` halvings or a cosine to 10 %."""
    if schedule == "cosine":
        return warmup_cosine(step, warmup, total)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 ** sum(step >= round(m * total) for m in STEP_MILESTONES)


def permutation_seed(seed: int, step: int) -> int:
    """Seed of the pixel permutation of training step ``step`` (shared by all processes)."""
    return (seed * 1_000_003 + step) % (2**63 - 1) + 10_000  # evaluation uses seeds 0, 1, …


def _validate_args(args: argparse.Namespace, world: int) -> None:
    check_training_args(args, world, positive=("block_size",))
    if args.ratio_range is not None:
        low, high = (check_ratio(r) for r in args.ratio_range)
        if not low < high:
            raise IDMError(f"--ratio-range needs LOW < HIGH, got {low:g} {high:g}")
        args.ratio_range = [low, high]
        args.val_ratios = [check_ratio(r) for r in args.val_ratios]
    else:
        args.ratio = check_ratio(args.ratio)
    if args.val_every < 0:
        raise IDMError(f"--val-every must be >= 0, got {args.val_every}")
    if args.patch % args.block_size:
        raise IDMError(f"--patch {args.patch} must be a multiple of --block-size {args.block_size}")
    if args.ratio_range is not None and args.arch != "idm":
        raise IDMError("--ratio-range trains one IDM network for many ratios; --arch unrolled needs --ratio")
    idm_only = IDM_OPTIONS if args.arch == "unrolled" else ("phases", "channels")
    given = [f"--{name.replace('_', '-')}" for name in idm_only if getattr(args, name) is not None]
    if given:
        raise IDMError(f"{', '.join(given)} do(es) not apply to --arch {args.arch}")
    if args.alpha_init is not None and args.schedule_init == "prior":
        raise IDMError("--alpha-init sets the paper schedule (ᾱ_t = α^t); it does not apply with --schedule-init prior")
    if args.prior is not None and (args.arch != "idm" or args.init is not None):
        raise IDMError("--prior starts an IDM network from a prior: use it with --arch idm and without --init")
    if args.prune is not None and args.prior is None:
        raise IDMError("--prune applies to a diffusers --prior only")
    if args.arch == "idm" and args.init is None and args.prior is None:
        args.init = "prior-gray"
    if args.out is None:
        args.out = f"runs/{args.arch}-{run_label(args)}"


def run_label(args: argparse.Namespace) -> str:
    """``csNN`` for one ratio, ``csLL-HH`` for a ratio range."""
    if args.ratio_range is not None:
        return f"cs{round(args.ratio_range[0] * 100)}-{round(args.ratio_range[1] * 100)}"
    return f"cs{round(args.ratio * 100)}"


def step_ratio(args: argparse.Namespace, step: int) -> float:
    """The sampling ratio of training step ``step``: ``--ratio``, or uniform in ``--ratio-range`` (seeded by step)."""
    if args.ratio_range is None:
        return args.ratio
    u = float(torch.rand((), generator=torch.Generator().manual_seed(permutation_seed(args.seed + 7919, step))))
    low, high = args.ratio_range
    return low + (high - low) * u


def build_network(args: argparse.Namespace):
    """The network to train from ``--arch``/``--init`` and its provenance ``{"init", "init_kind", ...}``."""
    from ..baselines.unrolled import UnrolledConfig, UnrolledNet, load_unrolled
    from ..io.checkpoint import read_checkpoint_config, resolve_checkpoint
    from ..network import load_idm
    from ..priors.hub import is_diffusers_folder, is_hub_id

    if args.arch == "unrolled" and args.init is None:
        sizes = {k: v for k, v in (("phases", args.phases), ("channels", args.channels)) if v is not None}
        return UnrolledNet(UnrolledConfig(**sizes)), {"init": None, "init_kind": "scratch"}
    source = args.prior if args.prior is not None else args.init
    is_diffusers = args.arch == "idm" and (is_hub_id(source) or is_diffusers_folder(source))
    path = None if is_diffusers else resolve_checkpoint(source)
    architecture = None if is_diffusers else read_checkpoint_config(path).get("architecture")
    if args.prior is not None and not is_diffusers and architecture not in ("unet", "dncnn"):
        raise IDMError(f"--prior {args.prior} is not a prior (architecture {architecture!r}); use --init for IDM checkpoints")
    if args.arch == "unrolled":
        if architecture != "unrolled":
            raise IDMError(f"--arch unrolled: --init {args.init} is not an unrolled checkpoint ({architecture!r})")
        net, config = load_unrolled(path)
        if any(v is not None and v != getattr(net.config, k) for k, v in (("phases", args.phases),
                                                                            ("channels", args.channels))):
            raise IDMError(f"--init {args.init} is an unrolled checkpoint; --phases/--channels cannot change it")
        return net, {"init": str(args.init), "init_kind": "unrolled", "init_ratio": config.get("ratio")}
    changes = {k: v for k, v in (("steps", args.sampling_steps), ("unshuffle", args.unshuffle),
                                 ("schedule_init", args.schedule_init), ("alpha_init", args.alpha_init),
                                 ("coupling_v", args.coupling_v), ("start", args.start),
                                 ("sigma_max", args.sigma_max), ("sigma_min", args.sigma_min))
               if v is not None}
    if is_diffusers or architecture in ("unet", "dncnn"):
        from ..invertible.diffusers import prune_preset
        from ..network import idm_from_prior

        net = idm_from_prior(source, prune=prune_preset(args.prune), levels=args.levels, **changes)
        kind = "diffusers" if is_diffusers else ("denoiser" if architecture == "dncnn" else "prior")
        return net, {"init": str(source), "init_kind": kind}
    if architecture == "idm":
        net, config = load_idm(path, levels=args.levels)
        differing = {k: v for k, v in changes.items() if getattr(net.config, k) != v}
        if differing:
            raise IDMError(
                f"--init {args.init} is an IDM checkpoint; its architecture cannot be changed "
                f"({', '.join(f'{k}={v}' for k, v in differing.items())})"
            )
        return net, {"init": str(args.init), "init_kind": "idm", "init_ratio": config.get("ratio")}
    raise IDMError(f"--init {args.init}: not a prior or IDM checkpoint (architecture {architecture!r})")


def empty_network(arch: str, config: dict[str, Any]):
    """An untrained network of architecture ``arch`` with the hyper-parameters ``config`` (``net.config.to_dict()``)."""
    from ..baselines.unrolled import UnrolledConfig, UnrolledNet
    from ..network import IDMConfig, IDMNet

    if arch == "unrolled":
        return UnrolledNet(UnrolledConfig.from_dict(config))
    return IDMNet(None, IDMConfig.from_dict(config))


def parameter_checksum(model: torch.nn.Module) -> torch.Tensor:
    """``(2,)`` float64: sum and sum of squares of all parameters (to compare processes)."""
    values = [p.detach().double() for p in model.parameters()]
    return torch.stack([sum(v.sum() for v in values), sum((v * v).sum() for v in values)])


@torch.no_grad()
def validate(net: Any, images: list[tuple[str, torch.Tensor]], args: argparse.Namespace,
             device: torch.device) -> dict[str, float]:
    """Mean PSNR/SSIM of ``net`` over ``images``, each measured with permutation seed = its index;
    with ``--ratio-range`` per validation ratio (``"psnr@0.1"``, …) and their mean (``"psnr"``)."""
    if args.ratio_range is not None:
        per_ratio = {r: validate_at(net, images, args, device, r) for r in args.val_ratios}
        out = {f"{key}@{r:g}": value for r, scores in per_ratio.items() for key, value in scores.items()}
        for key in ("psnr", "ssim"):
            out[key] = sum(scores[key] for scores in per_ratio.values()) / len(per_ratio)
        return out
    return validate_at(net, images, args, device, args.ratio)


@torch.no_grad()
def validate_at(net: Any, images: list[tuple[str, torch.Tensor]], args: argparse.Namespace,
                device: torch.device, ratio: float) -> dict[str, float]:
    """Mean PSNR/SSIM of ``net`` over ``images`` at one ``ratio``."""
    from ..evaluation import blockcs_factory
    from ..metrics import psnr, ssim_skimage

    make = blockcs_factory(ratio, seed=0, block_size=args.block_size)
    scores = []
    for index, (_, image) in enumerate(images):
        x = image.unsqueeze(0).to(device)
        op = make(tuple(image.shape[1:]), index)
        if args.matrix_seed:
            op = type(op)(**{**op.config_args(), "matrix_seed": args.matrix_seed})
        estimate = op.crop(net(op.measure(x), op)).clamp(0, 1)
        scores.append((float(psnr(estimate, x)[0]), float(ssim_skimage(estimate, x)[0])))
    return {"psnr": sum(s[0] for s in scores) / len(scores), "ssim": sum(s[1] for s in scores) / len(scores)}


# --- training --------------------------------------------------------------------------------
def train(args: argparse.Namespace) -> int:
    from accelerate.utils import gather_object, set_seed

    from ..data import ImageFolder
    from ..physics import BlockCS

    accelerator = new_accelerator(args.mixed_precision)
    world, device = accelerator.num_processes, accelerator.device
    _validate_args(args, world)
    run_dir = Path(args.out)
    state_path = checked_state_path(run_dir, args.resume)

    set_seed(args.seed)
    state = None
    if args.resume:
        state = load_run_state(state_path, args, TRAJECTORY_OPTIONS)
        model = empty_network(args.arch, state["net_config"]).set_levels(args.levels)
        model.load_unique_state_dict(state["model"], source=f"training state {state_path}")
        provenance = state["provenance"]
    else:
        model, provenance = build_network(args)
    model.train()
    size_multiple = model.config.size_multiple
    if args.patch % size_multiple:
        raise IDMError(f"--patch {args.patch} must be a multiple of {size_multiple} for this network")
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, args.lr_schedule, args.warmup, args.steps)
    )
    memory = ("levels",) if args.arch == "idm" else ()
    shown = ("val_ratios",) if args.ratio_range is not None else ()
    command = command_line("train.finetune", args, (*TRAJECTORY_OPTIONS, *memory, "out", "val", "val_limit", *shown))
    progress = Progress(command=command)
    if state is not None:
        progress = resume_progress(state, accelerator, optimizer, scheduler,
                                   logs=[run_dir / LOG_FILE, run_dir / VAL_FILE])
    model, optimizer = accelerator.prepare(model, optimizer)
    net = accelerator.unwrap_model(model)

    train_images = ImageFolder(args.data)
    loader = patch_loader(train_images, args, progress.step, accelerator)
    val_images = None
    if args.val and accelerator.is_main_process:
        folder = ImageFolder(args.val, limit=args.val_limit)
        val_images = [folder[i] for i in range(len(folder))]
    base_ops: dict[int, BlockCS] = {}  # one operator per number of measured rows (Φ and its pseudo-inverse)

    def step_operator(step: int) -> BlockCS:
        ratio = step_ratio(args, step)
        rows = count_for_ratio(ratio, args.block_size**2)  # the operator's own rule: ceil(ratio·B²)
        if rows not in base_ops:
            base_ops[rows] = BlockCS((args.patch, args.patch), rows / args.block_size**2, block_size=args.block_size,
                                     matrix_seed=args.matrix_seed)
        return base_ops[rows].redraw(permutation_seed(args.seed, step))

    def run_validation(step: int) -> dict[str, float] | None:
        """Validate a full-precision copy of the current weights (main process only)."""
        if val_images is None:
            return None
        copy = empty_network(args.arch, net.config.to_dict()).set_levels("none").to(device).eval()
        copy.load_unique_state_dict(net.unique_state_dict())
        scores = validate(copy, val_images, args, device)
        with open(run_dir / VAL_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **scores}) + "\n")
        return scores

    def checkpoint_state(step: int, wall: float) -> None:
        if world > 1:  # gather_object waits for every process
            sums = gather_object([parameter_checksum(net).tolist()])
            if any(s != sums[0] for s in sums):
                raise IDMError(f"processes hold different parameters at step {step}: {sums}")
        save_training_state(state_path, accelerator, progress, step=step, wall_time=wall,
                            args=trajectory_args(args, TRAJECTORY_OPTIONS), optimizer=optimizer, scheduler=scheduler,
                            provenance=provenance, net_config=net.config.to_dict(), model=net.unique_state_dict())

    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    stop = args.steps if args.stop_after is None else min(args.steps, progress.step + args.stop_after)
    step, last_val = progress.step, None
    with RunLog(run_dir / LOG_FILE, main=accelerator.is_main_process, total=args.steps, initial=progress.step,
                desc=f"{args.arch} {run_label(args)}", show=not args.no_progress) as log:
        for batch in resumed_batches(loader, progress.rng):
            if step >= stop:
                break
            x = batch.to(device, non_blocking=True)
            op = step_operator(step)
            y = op.A(x)
            loss = F.l1_loss(model(y, op).float(), x)
            lr = optimizer_step(accelerator, model, optimizer, scheduler, loss, args.grad_clip)
            step += 1

            value = mean_loss(accelerator, loss, step)
            if args.val_every and step % args.val_every == 0 and step < args.steps:
                if accelerator.is_main_process:
                    last_val = run_validation(step)
                accelerator.wait_for_everyone()
            log.record({"step": step, "loss": value, "lr": lr},
                       **({"val_psnr": f"{last_val['psnr']:.2f}"} if last_val else {}))

            wall = progress.wall_time + time.monotonic() - t0
            out_of_time = time_is_up(t0, args.max_minutes, world)
            if step % args.save_every == 0 or step == stop or out_of_time:
                checkpoint_state(step, wall)
            if out_of_time:
                break

    if step < args.steps:
        accelerator.print(f"stopped at step {step}/{args.steps}; continue with the same command plus --resume")
        return 0
    if accelerator.is_main_process:
        scores = run_validation(step)
        summary = RunSummary(progress.command, hardware(world, device), progress.wall_time + time.monotonic() - t0,
                             progress.resumes, final_loss(run_dir / LOG_FILE))
        export_dir = export_directory(args)
        export(net, export_dir, args, summary, num_images=len(train_images), provenance=provenance, validation=scores)
        accelerator.print(f"exported the trained network to {export_dir}"
                          + (f" (validation PSNR {scores['psnr']:.2f} dB, SSIM {scores['ssim']:.4f})" if scores else ""))
    accelerator.wait_for_everyone()
    return 0


def export(net: Any, directory: Path, args: argparse.Namespace, summary: RunSummary, *, num_images: int,
           provenance: dict[str, Any], validation: dict[str, float] | None) -> Path:
    """Write the trained network as a compact checkpoint directory with a model card."""
    cfg = net.config
    val_name = f"{args.val}" + (f" (first {args.val_limit})" if args.val_limit else "") if args.val else None
    training = {
        **provenance, "data": str(args.data), "num_images": num_images, "patch": args.patch, "steps": args.steps,
        "batch": args.batch, "lr": args.lr, "lr_schedule": args.lr_schedule, "arch": args.arch,
        **({"levels": args.levels} if args.arch == "idm" else {}),
        "mixed_precision": args.mixed_precision, "seed": args.seed, "matrix_seed": args.matrix_seed,
        **summary.fields(), "storage_dtype": args.export_dtype,
    }
    extra: dict[str, Any] = {"training": training, "matrix_seed": args.matrix_seed}
    if validation:
        extra["validation"] = {"data": val_name, **validation}
    params = sum(p.numel() for p in net.parameters())
    if args.arch == "unrolled":
        title, summary_line, use, network = (
            "unrolled baseline (ISTA-Net+ family)",
            f"A learned {cfg.phases}-phase proximal-gradient network (ISTA-Net+, Zhang & Ghanem, CVPR 2018), "
            + ("trained from scratch." if provenance.get("init_kind") == "scratch"
               else f"trained further from `{provenance.get('init')}` (ratio {provenance.get('init_ratio')})."),
            "`idm reconstruct --method unrolled --checkpoint <this folder>`",
            f"{cfg.phases} phases, {cfg.channels} feature channels")
        init = f"{provenance.get('init_kind')}" + (f" `{provenance['init']}`" if provenance.get("init") else "")
    else:
        alphas = [round(float(a), 4) for a in net.abar().detach()[1:]]
        title, summary_line, use, network = (
            "IDM network",
            (f"The {cfg.steps}-step sampler of a Gaussian denoiser prior (started from `{cfg.start}`) fine-tuned end to "
             "end (IDM, Chen et al., TPAMI 2025)." if cfg.denoiser else
             f"The {cfg.steps}-step sampler of a diffusion prior fine-tuned end to end (IDM, Chen et al., TPAMI 2025)."),
            "`idm reconstruct --method idm --checkpoint <this folder>` or `idm.network.load_idm(path)`",
            f"T = {cfg.steps}, unshuffle {cfg.unshuffle}, {cfg.describe_backbone()}, "
            f"injectors {'on' if cfg.injectors else 'off'}, learned ᾱ {alphas}")
        init = f"{provenance.get('init_kind')} `{provenance.get('init')}`"
    ratio_text = (f"ratio {args.ratio:g}" if args.ratio_range is None else
                  f"every ratio in [{args.ratio_range[0]:g}, {args.ratio_range[1]:g}] (one network, ratio drawn per step)")
    lines = [
        f"# idm {title} — scrambled block CS, {ratio_text}",
        "",
        f"{summary_line} {params / 1e6:.2f} M parameters stored as {args.export_dtype}. Use with {use}.",
        "",
        "| | |", "|---|---|",
        f"| measurement | scrambled block CS, {ratio_text}, block {args.block_size}, Φ seed {args.matrix_seed} |",
        f"| initialisation | {init} |",
        f"| network | {network} |",
        data_row(args, num_images),
        f"| steps x batch | {args.steps} x {args.batch} |",
        f"| optimizer | Adam lr {args.lr:g}, schedule {args.lr_schedule}, grad clip {args.grad_clip:g}, L1 loss |",
        (f"| invertibility / mixed precision | {args.levels} / {args.mixed_precision} |" if args.arch == "idm"
         else f"| mixed precision | {args.mixed_precision} |"),
        *summary.card_rows(),
    ]
    if validation and args.ratio_range is not None:
        for r in args.val_ratios:
            lines.append(f"| validation on `{val_name}` at ratio {r:g} | PSNR {validation[f'psnr@{r:g}']:.2f} dB, "
                         f"SSIM {validation[f'ssim@{r:g}']:.4f} |")
    elif validation:
        lines.append(f"| validation on `{val_name}` | PSNR {validation['psnr']:.2f} dB, SSIM {validation['ssim']:.4f} |")
    lines += summary.command_lines()
    band = {"ratio_range": args.ratio_range} if args.ratio_range is not None else {}
    return net.save(directory, "\n".join(lines) + "\n", ratio=args.ratio if args.ratio_range is None else None,
                    operator="blockcs", **band,
                    block_size=args.block_size, extra=extra, dtype=EXPORT_DTYPES[args.export_dtype])


if __name__ == "__main__":
    sys.exit(main())
