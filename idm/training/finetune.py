"""Fine-tune the IDM network end to end (or train the ``unrolled`` baseline) for scrambled block CS, MRI or CT.

    python -m train.finetune --init prior-gray --ratio 0.1 --data ../shared/data/natural/Train400 \\
        --val ../shared/data/natural/Set12 --out runs/idm-cs10 --steps 20000 --batch 8 --patch 128
    idm finetune ...                               (same options; also python -m idm.training.finetune)
    accelerate launch -m train.finetune ...        (multi-GPU / multi-CPU; --batch is the global batch;
                                                    -m idm.training.finetune outside a checkout)

``--init`` is a prior checkpoint (the network starts as the prior's T-step sampler), a denoiser checkpoint (e.g. ``dncnn-6``)
or an IDM checkpoint trained at another ratio (its weights and architecture are reused). With
``--arch unrolled`` the same loop trains the learned baseline :mod:`idm.baselines.unrolled` from
scratch (``--phases``, ``--channels``), or from an unrolled checkpoint at another ratio. Loss: L1
between the network's final output and the patch (on the modulus for complex MRI images). Each step
measures its global batch with one operator of ``--operator`` (:mod:`idm.training.tasks`): a
:class:`~idm.physics.BlockCS` whose pixel permutation is redrawn (seed = f(seed, step); Φ is the
fixed matrix of ``--matrix-seed``, the one evaluation uses), an :class:`~idm.physics.MRI` mask
redrawn at an ``--acceleration`` drawn from its range, or a :class:`~idm.physics.ParallelBeamCT` with
a drawn view count (and ``--wedge``). MRI and CT data are slice folders written by
``python -m train.medical_slices`` (docs/medical.md). Adam; the LR is halved at 20/40/60/80 %
of ``--steps`` (``--lr-schedule step``, the paper's schedule) or follows a cosine to 10 % after a
linear warm-up. The run folder gets:

* ``state.safetensors`` every ``--save-every`` steps (atomic): model, optimizer, LR scheduler, grad
  scaler, step, wall time, RNG states; ``--resume`` continues exactly (patches are indexed by
  position, permutations seeded by step). Each save also checks that all processes hold identical
  parameters;
* ``log.jsonl`` (``{"step", "loss", "lr"}`` per step) and ``val.jsonl`` (``{"step", "psnr", "ssim"}``
  every ``--val-every`` steps, per ``--val-levels`` setting: mean over ``--val`` images measured with
  seeds 0, 1, …, scored by :func:`idm.evaluation.evaluate` — PSNR peak 255 and scikit-image SSIM on
  the crop; magnitudes for MRI);
* at the end, a compact checkpoint (``--export``, default ``RUNDIR/checkpoint``; fp16 weights,
  config, model card with command, steps, batch, hardware, wall time and validation PSNR/SSIM).
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path
from typing import Any

from dataclasses import replace

import torch

from ..errors import IDMError
from ..network.config import STARTS
from ..invertible.diffusers import PRUNE_PRESETS
from .tasks import LEVEL_NAMES, TASK_KINDS, StepOperators, check_task_args, checkpoint_fields, describe, run_label, validation_factory
from .common import (
    EXPORT_DTYPES, LOG_FILE, Progress, RunSummary, add_run_control_arguments, add_run_folder_arguments,
    check_training_args, checked_state_path, command_line, data_row, export_directory, final_loss, hardware,
    load_run_state, mean_loss, new_accelerator, optimizer_step, patch_loader, resume_progress, resumed_batches,
    run_steps, save_training_state, script_main, script_parser, trajectory_args, warmup_cosine,
)

VAL_FILE = "val.jsonl"
#: options that determine the training trajectory: a resumed run must repeat them
TRAJECTORY_OPTIONS = (
    "arch", "init", "prior", "prune", "phases", "channels", "ratio", "block_size", "matrix_seed", "data", "steps", "batch", "patch", "lr", "lr_schedule",
    "warmup", "grad_clip", "sampling_steps", "unshuffle", "schedule_init", "alpha_init", "coupling_v", "mixed_precision",
    "seed", "ratio_range", "start", "sigma_max", "sigma_min", "operator", "acceleration", "mask", "views",
    "dc_iterations", "wedge", "level_sampling", "passes", "ztv", "chunk_depth",
)
#: trajectory options added after the first runs, with the value those runs used (for --resume)
ADDED_OPTIONS = {"operator": "blockcs", "level_sampling": "uniform", "passes": None, "acceleration": None, "mask": None, "views": None, "dc_iterations": None, "wedge": None, "ztv": None, "chunk_depth": None}
#: IDM-only network options (``--arch unrolled`` rejects them)
IDM_OPTIONS = ("sampling_steps", "unshuffle", "schedule_init", "alpha_init", "coupling_v", "start", "sigma_max", "sigma_min",
               "dc_iterations", "passes", "ztv", "chunk_depth")
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
    io.add_argument("--data", help="folder of training images (e.g. Train400); with --chunk-depth a folder of volumes")
    io.add_argument("--chunk-depth", type=int, metavar="D",
                    help="train on volumes: --data holds NIfTI volumes (CT in HU, windowed; MRI divided by its "
                         "maximum) and each step is one chunk of D contiguous axial slices (a random --patch crop), "
                         "the batch of slices the network sees as one volume (--batch 1; use with --ztv)")
    io.add_argument("--val", help="folder of validation images (e.g. Set12 or BSD68)")
    io.add_argument("--val-limit", type=int, help="only the first N validation images")
    io.add_argument("--out", help="run folder (default runs/idm-csNN)")
    add_run_folder_arguments(io)

    cs = parser.add_argument_group("measurement (idm.training.tasks: one network for a range of settings)")
    cs.add_argument("--operator", choices=TASK_KINDS, default="blockcs",
                    help="blockcs (scrambled block CS, default), mri (single-coil Cartesian, complex images) or ct "
                         "(2D parallel beam)")
    ratio = cs.add_mutually_exclusive_group()
    ratio.add_argument("--ratio", type=float, help="blockcs: sampling ratio in (0, 1]")
    ratio.add_argument("--ratio-range", type=_ratio_pair, metavar="LOW,HIGH",
                       help="blockcs: one network for every ratio in [LOW, HIGH] (e.g. 0.05,0.6): each step draws its "
                            "ratio uniformly (seeded by the step)")
    cs.add_argument("--block-size", type=int, default=32, help="blockcs: block size B (default 32)")
    cs.add_argument("--matrix-seed", type=int, default=0,
                    help="blockcs: seed of the sampling matrix Φ (default 0, as evaluation)")
    cs.add_argument("--acceleration", type=_ratio_list, metavar="A|LOW,HIGH",
                    help="mri: acceleration, or a range drawn per step (e.g. 4,8)")
    cs.add_argument("--mask", choices=("random", "equispaced", "poisson"), help="mri: mask type (default random)")
    cs.add_argument("--views", type=_ratio_list, metavar="N|LOW,HIGH",
                    help="ct: views over 180°, or a range drawn per step (e.g. 18,60)")
    cs.add_argument("--wedge", type=_ratio_list, metavar="LOW,HIGH",
                    help="ct: also train limited angle: half of the steps use a wedge [0°, w), w uniform in "
                         "[LOW, HIGH] degrees (e.g. 90,150)")
    cs.add_argument("--level-sampling", choices=("uniform", "log"), default="uniform",
                    help="how a range's setting is drawn per step: uniformly (default) or log-uniformly "
                         "(more steps at low ratios / accelerations / view counts)")
    cs.add_argument("--val-levels", "--val-ratios", type=_ratio_list, metavar="V1,V2,...",
                    help="settings validated: ratios (blockcs range: default 0.1,0.3,0.5), accelerations or view "
                         "counts (default: the range's ends and middle)")

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
    net.add_argument("--start", choices=STARTS,
                     help="initial estimate the sampler starts from: adjoint (A†y, default), tv, pnp or fbp (CT; each costs "
                          "its own run time at every call)")
    net.add_argument("--dc-iterations", type=int,
                     help="CG steps of each data-consistency solve for operators with an iterative A† (ct: e.g. 3; "
                          "default: the operator's own A†, 50 steps for CT)")
    net.add_argument("--passes", type=int,
                     help="sampler passes, each restarted from the previous output (IDMConfig.passes; default 1, "
                          "or an IDM --init's own)")
    net.add_argument("--ztv", type=_ratio_pair, metavar="LAM,RHO",
                     help="couple the slices of a volume (the batch) by z-TV data consistency with (λ, ρ) in every step "
                          "(IDMConfig.ztv; e.g. 0.1,10 for CT)")
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


def _validate_args(args: argparse.Namespace, world: int) -> None:
    check_training_args(args, world, positive=("block_size",))
    check_task_args(args)
    if args.val_every < 0:
        raise IDMError(f"--val-every must be >= 0, got {args.val_every}")
    if args.arch != "idm" and (args.operator != "blockcs" or args.ratio_range is not None):
        raise IDMError("--arch unrolled trains for one block-CS --ratio; ranges and mri / ct need --arch idm")
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
    if args.ztv is not None and args.chunk_depth is None:
        raise IDMError("--ztv couples the slices of a volume: train on volume chunks (--chunk-depth D)")
    if args.chunk_depth is not None:
        if args.chunk_depth < 2:
            raise IDMError(f"--chunk-depth must be >= 2 slices, got {args.chunk_depth}")
        if args.batch != 1 or world != 1:
            raise IDMError("--chunk-depth trains on one chunk of slices per step: use --batch 1 in one process")
        if args.operator not in ("ct", "mri"):
            raise IDMError(f"--chunk-depth trains on CT or MRI volumes, not --operator {args.operator}")
    if args.arch == "idm" and args.init is None and args.prior is None:
        args.init = "prior-gray"
    if args.out is None:
        args.out = f"runs/{args.arch}-{run_label(args)}"


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
                                 ("dc_iterations", args.dc_iterations), ("passes", args.passes),
                                 ("ztv", args.ztv),
                                 ("sigma_max", args.sigma_max), ("sigma_min", args.sigma_min))
               if v is not None}
    complex_images = args.operator == "mri"
    if is_diffusers or architecture in ("unet", "dncnn"):
        from ..invertible.diffusers import prune_preset
        from ..network import idm_from_prior

        net = idm_from_prior(source, prune=prune_preset(args.prune), levels=args.levels, complex=complex_images,
                             **changes)
        kind = "diffusers" if is_diffusers else ("denoiser" if architecture == "dncnn" else "prior")
        return net, {"init": str(source), "init_kind": kind}
    if architecture == "idm":
        net, config = load_idm(path, levels=args.levels)
        if net.config.complex != complex_images:
            raise IDMError(f"--init {args.init} is an IDM network for {'complex' if net.config.complex else 'real'} "
                           f"images; --operator {args.operator} needs {'complex' if complex_images else 'real'} ones")
        for key in ("start", "dc_iterations", "passes", "ztv"):  # not part of the weights: they may change
            if key in changes:
                net.config = replace(net.config, **{key: changes.pop(key)})
        differing = {k: v for k, v in changes.items() if getattr(net.config, k) != v}
        if differing:
            raise IDMError(
                f"--init {args.init} is an IDM checkpoint; its architecture cannot be changed "
                f"({', '.join(f'{k}={v}' for k, v in differing.items())})"
            )
        return net, {"init": str(args.init), "init_kind": "idm", "init_ratio": config.get("ratio"),
                     "init_operator": config.get("operator", "blockcs")}
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
    """Mean PSNR/SSIM of ``net`` over ``images`` (scored as ``idm eval`` does, image ``i`` measured
    with seed ``i``); with several ``--val-levels`` per level (``"psnr@0.1"``, …) and their mean (``"psnr"``)."""
    from ..evaluation import evaluate

    per_level = {}
    for level in args.val_levels:
        result = evaluate("idm", images, validation_factory(args, level), ratio=None, device=str(device),
                          reconstruct=lambda y, op: net(y.to(device), op))
        per_level[level] = result.mean
    if len(per_level) == 1:
        return dict(next(iter(per_level.values())))
    out = {f"{key}@{v:g}": scores[key] for v, scores in per_level.items() for key in ("psnr", "ssim")}
    for key in ("psnr", "ssim"):
        out[key] = sum(scores[key] for scores in per_level.values()) / len(per_level)
    return out


# --- training --------------------------------------------------------------------------------
def train(args: argparse.Namespace) -> int:
    from accelerate.utils import gather_object, set_seed

    from ..data import ImageFolder

    accelerator = new_accelerator(args.mixed_precision)
    world, device = accelerator.num_processes, accelerator.device
    _validate_args(args, world)
    run_dir = Path(args.out)
    state_path = checked_state_path(run_dir, args.resume)

    set_seed(args.seed)
    state = None
    if args.resume:
        state = load_run_state(state_path, args, TRAJECTORY_OPTIONS, added=ADDED_OPTIONS)
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
    shown = ("val_levels",)
    blockcs_only = () if args.operator == "blockcs" else ("block_size", "matrix_seed")
    options = [name for name in TRAJECTORY_OPTIONS if name not in blockcs_only]
    command = command_line("train.finetune", args, (*options, *memory, "out", "val", "val_limit", *shown))
    progress = Progress(command=command)
    if state is not None:
        progress = resume_progress(state, accelerator, optimizer, scheduler,
                                   logs=[run_dir / LOG_FILE, run_dir / VAL_FILE])
    model, optimizer = accelerator.prepare(model, optimizer)
    net = accelerator.unwrap_model(model)

    train_images = ImageFolder(args.data) if args.chunk_depth is None else training_volumes(args.data, args.operator)
    loader = patch_loader(train_images, args, progress.step, accelerator, depth=args.chunk_depth)
    val_images = None
    if args.val and accelerator.is_main_process:
        folder = ImageFolder(args.val, limit=args.val_limit)
        val_images = [folder[i] for i in range(len(folder))]
    step_operator = StepOperators(args)

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

    last_val: dict[str, float] | None = None

    def step_fn(batch: torch.Tensor, step: int) -> dict[str, Any]:
        nonlocal last_val
        x = batch.to(device, non_blocking=True)
        if args.chunk_depth is not None:  # (1, D, P, P) → a volume of D slices (D, 1, P, P)
            x = x.transpose(0, 1)
        op = step_operator(step)
        loss = (model(op.A(x), op) - x).abs().float().mean()  # L1 (on the modulus for complex MRI images)
        lr = optimizer_step(accelerator, model, optimizer, scheduler, loss, args.grad_clip)
        done = step + 1
        value = mean_loss(accelerator, loss, done)
        if args.val_every and done % args.val_every == 0 and done < args.steps:
            if accelerator.is_main_process:
                last_val = run_validation(done)
            accelerator.wait_for_everyone()
        return {"loss": value, "lr": lr}

    end = run_steps(args, accelerator, progress, resumed_batches(loader, progress.rng), step_fn, checkpoint_state,
                    log_path=run_dir / LOG_FILE, desc=f"{args.arch} {run_label(args)}",
                    shown=lambda: {"val_psnr": f"{last_val['psnr']:.2f}"} if last_val else {})
    if not end.ready_to_export(args, accelerator, when_out_of_time=False):
        return 0
    step = end.step
    if accelerator.is_main_process:
        scores = run_validation(step)
        summary = RunSummary(progress.command, hardware(world, device), end.wall_time, progress.resumes,
                             final_loss(run_dir / LOG_FILE))
        export_dir = export_directory(args)
        export(net, export_dir, args, summary, num_images=len(train_images), provenance=provenance, validation=scores)
        accelerator.print(f"exported the trained network to {export_dir}"
                          + (f" (validation PSNR {scores['psnr']:.2f} dB, SSIM {scores['ssim']:.4f})" if scores else ""))
    accelerator.wait_for_everyone()
    return 0


def training_volumes(folder: str, operator: str) -> list[torch.Tensor]:
    """The volumes ``(D, H, W)`` on [0, 1] of the NIfTI files in ``folder`` (or the one file
    ``folder``), read and scaled as every volume is (:func:`idm.evaluation.read_scaled_volume`)."""
    from ..evaluation import read_scaled_volume

    root = Path(folder)
    paths = [root] if root.is_file() else sorted(p for p in root.glob("*") if p.name.lower().endswith((".nii", ".nii.gz")))
    if not paths:
        raise IDMError(f"--chunk-depth: no NIfTI volumes in {folder}")
    return [read_scaled_volume(str(path), operator, require_affine=False)[0][:, 0].abs().float() for path in paths]


def export(net: Any, directory: Path, args: argparse.Namespace, summary: RunSummary, *, num_images: int,
           provenance: dict[str, Any], validation: dict[str, float] | None) -> Path:
    """Write the trained network as a compact checkpoint directory with a model card."""
    cfg = net.config
    val_name = f"{args.val}" + (f" (first {args.val_limit})" if args.val_limit else "") if args.val else None
    training = {
        **provenance, "data": str(args.data), "num_images": num_images, "patch": args.patch, "steps": args.steps,
        "batch": args.batch, "lr": args.lr, "lr_schedule": args.lr_schedule, "arch": args.arch,
        **({"levels": args.levels} if args.arch == "idm" else {}),
        "mixed_precision": args.mixed_precision, "seed": args.seed, "operator": args.operator,
        **summary.fields(), "storage_dtype": args.export_dtype,
    }
    extra: dict[str, Any] = {"training": training, **({"matrix_seed": args.matrix_seed} if args.operator == "blockcs" else {})}
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
            f"T = {cfg.steps}{f' × {cfg.passes} passes' if cfg.passes > 1 else ''}, unshuffle {cfg.unshuffle}, {cfg.describe_backbone()}, "
            f"injectors {'on' if cfg.injectors else 'off'}, learned ᾱ {alphas}")
        init = f"{provenance.get('init_kind')} `{provenance.get('init')}`"
    measurement = describe(args)
    lines = [
        f"# idm {title} — {measurement}",
        "",
        f"{summary_line} {params / 1e6:.2f} M parameters stored as {args.export_dtype}. Use with {use}.",
        "",
        "| | |", "|---|---|",
        f"| measurement | {measurement} |",
        f"| initialisation | {init} |",
        f"| network | {network} |",
        data_row(args, num_images),
        f"| steps x batch | {args.steps} x {args.batch} |",
        f"| optimizer | Adam lr {args.lr:g}, schedule {args.lr_schedule}, grad clip {args.grad_clip:g}, L1 loss |",
        (f"| invertibility / mixed precision | {args.levels} / {args.mixed_precision} |" if args.arch == "idm"
         else f"| mixed precision | {args.mixed_precision} |"),
        *summary.card_rows(),
    ]
    level = LEVEL_NAMES[args.operator]
    if validation and len(args.val_levels) > 1:
        for v in args.val_levels:
            lines.append(f"| validation on `{val_name}` at {level} {v:g} | PSNR {validation[f'psnr@{v:g}']:.2f} dB, "
                         f"SSIM {validation[f'ssim@{v:g}']:.4f} |")
    elif validation:
        lines.append(f"| validation on `{val_name}` | PSNR {validation['psnr']:.2f} dB, SSIM {validation['ssim']:.4f} |")
    lines += summary.command_lines()
    fields = checkpoint_fields(args)
    extra.update(fields.pop("extra", {}))
    return net.save(directory, "\n".join(lines) + "\n", **fields, extra=extra, dtype=EXPORT_DTYPES[args.export_dtype])


if __name__ == "__main__":
    sys.exit(main())
