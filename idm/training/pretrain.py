"""Pre-train the ε-prediction diffusion prior on random patches of an image folder.

    python -m train.pretrain_prior --data ../shared/data/natural/Train400 --out runs/prior --steps 10000
    idm pretrain ...                          (same options; also python -m idm.training.pretrain)
    accelerate launch -m train.pretrain_prior ...   (multi-GPU; --batch is the global batch;
                                                     -m idm.training.pretrain outside a checkout)

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

``--arch dncnn`` trains a Gaussian denoiser prior instead (:class:`~idm.priors.dncnn.DnCNN` with σ
as an input channel, used through :class:`~idm.priors.denoiser.DenoiserPrior`), from scratch or
fine-tuned from a denoiser checkpoint (``--init dncnn-6``): loss MSE between the network's noise
estimate and the noise, ``z = x + σ·n`` with σ uniform in [0, ``--sigma-max``] per patch. With
``--random-phase`` (MRI) each patch x becomes x·e^{iφ} with a random linear phase φ and the network
learns on its real and imaginary parts mapped to [0, 1] as (v + 1)/2 — the representation in
which ``pnp`` and the IDM network denoise complex images (:func:`idm.zeroshot.pnp.complex_denoiser`).
No sample grids (a denoiser trained for σ ≤ σ_max does not sample from pure noise).

``--evaluate CHECKPOINT --data DIR`` instead prints the one-step denoising PSNR of a checkpoint
(:func:`idm.priors.evaluate.evaluate_denoising`) on the images of ``DIR`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import IDMError
from .common import (
    EXPORT_DTYPES, LOG_FILE, Progress, RunSummary, add_run_control_arguments, add_run_folder_arguments,
    check_training_args, checked_state_path, command_line, data_row, export_directory, final_loss, hardware,
    load_run_state, mean_loss, new_accelerator, optimizer_step, patch_loader, resume_progress, resumed_batches,
    run_steps, save_training_state, script_main, script_parser, trajectory_args,
)
from .common import STATE_FILE  # noqa: F401  (re-exported: the run folder's training state)
from .common import warmup_cosine as lr_factor  # the LR schedule of pre-training

#: options that determine the training trajectory: a resumed run must repeat them
TRAJECTORY_OPTIONS = (
    "data", "steps", "batch", "patch", "lr", "warmup", "weight_decay", "grad_clip", "ema_decay",
    "base_channels", "channel_mults", "res_blocks", "attn", "dropout", "schedule", "mixed_precision", "seed",
    "arch", "init", "depth", "features", "sigma_max", "random_phase", "conditional", "accelerations",
    "prediction", "data_scale",
)
#: trajectory options added after the first runs, with the value those runs used (for --resume)
ADDED_OPTIONS = {"arch": "unet", "init": None, "depth": 17, "features": 64, "sigma_max": 0.2, "random_phase": False,
                 "conditional": None, "accelerations": (4.0, 8.0), "prediction": "eps",
                 "data_scale": 1.0}
#: prior architectures ``--arch`` trains
ARCHITECTURES = ("unet", "dncnn")
#: measurement-conditioned models ``--conditional`` trains (``mri``: MC-DDPM, :mod:`idm.medical.mcddpm`)
CONDITIONAL = ("mri",)
#: ``--conditional mri`` defaults: mask accelerations, and the scale of the diffused k-space
DEFAULT_ACCELERATIONS, DEFAULT_DATA_SCALE = (4.0, 8.0), 0.1


def _float_tuple(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


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
    add_run_folder_arguments(io)
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

    arch = parser.add_argument_group("architecture")
    arch.add_argument("--arch", choices=ARCHITECTURES, default="unet",
                      help="unet: ε-prediction diffusion U-Net (default); dncnn: Gaussian denoiser prior")
    arch.add_argument("--init", help="dncnn: a denoiser checkpoint to fine-tune (e.g. dncnn-6); default: from scratch")
    arch.add_argument("--depth", type=int, default=17, help="dncnn from scratch: conv layers (default 17)")
    arch.add_argument("--features", type=int, default=64, help="dncnn from scratch: feature channels (default 64)")
    arch.add_argument("--sigma-max", type=float, default=0.2,
                      help="dncnn: largest noise std trained for, on [0, 1] (default 0.2)")
    arch.add_argument("--random-phase", action="store_true",
                      help="dncnn: train on the real / imaginary parts of patches with a random linear phase "
                           "(MRI: complex images; with --evaluate, evaluate on such parts); --conditional mri: "
                           "train on complex patches with a random linear phase")
    arch.add_argument("--conditional", choices=CONDITIONAL,
                      help="mri: MC-DDPM, a U-Net diffusing the unsampled k-space of single-coil MRI, conditioned "
                           "on the zero-filled image (random 1D Cartesian masks per patch; idm.medical.mcddpm)")
    arch.add_argument("--accelerations", type=_float_tuple, metavar="A,B",
                      help="--conditional mri: accelerations of the random masks, one drawn per patch (default 4,8)")
    arch.add_argument("--prediction", choices=("eps", "x0"),
                      help="--conditional mri: the network predicts the clean unknown k-space (x0, default) or the "
                           "noise (eps; idm.medical.mcddpm)")
    arch.add_argument("--data-scale", type=float, metavar="C",
                      help="--conditional mri: the diffused unknown k-space is divided by C, about its RMS per "
                           "coordinate (default 0.1: brain slices at 4-8x)")

    net = parser.add_argument_group("U-Net size (--arch unet)")
    net.add_argument("--base-channels", type=int, default=32, help="channels at full resolution (default 32)")
    net.add_argument("--channel-mults", type=_int_tuple, default=(1, 2, 2, 2), help="per-level multipliers (default 1,2,2,2)")
    net.add_argument("--res-blocks", type=int, default=2, help="ResBlocks per level (default 2)")
    net.add_argument("--attn", type=_int_tuple, default=(2,), help="levels with self-attention, e.g. 2 or 2,3 or '' (default 2)")
    net.add_argument("--dropout", type=float, default=0.0, help="ResBlock dropout (default 0)")

    run = parser.add_argument_group("run control")
    run.add_argument("--sample-every", type=int, default=1000, help="steps between EMA sample grids, 0 = never")
    add_run_control_arguments(
        run, max_minutes_help="stop after this much wall time (saving the state and exporting the EMA weights so far)"
    )
    return parser


build_parser = partial(script_parser, "idm.training.pretrain")
main = script_main("idm.training.pretrain")


def run(args: argparse.Namespace) -> int:
    if args.evaluate:
        return _evaluate_only(args)
    return train(args)


# --- helpers ---------------------------------------------------------------------------------
def unet_config_from_args(args: argparse.Namespace):
    from ..medical.mcddpm import unet_config
    from ..priors import UNetConfig

    build = unet_config if args.conditional else UNetConfig
    return build(
        base_channels=args.base_channels,
        channel_mults=tuple(args.channel_mults),
        num_res_blocks=args.res_blocks,
        attention_levels=tuple(args.attn),
        dropout=args.dropout,
    )


def _evaluation_images(folder: str, args: argparse.Namespace) -> list[torch.Tensor]:
    """The images of ``folder``; with ``--random-phase`` the real and imaginary parts of each (a random
    linear phase seeded by ``--seed``: the representation such a denoiser is trained for)."""
    from ..data import ImageFolder

    folder_images = ImageFolder(folder)
    images = [folder_images[i][1] for i in range(len(folder_images))]
    if args.random_phase:
        generator = torch.Generator().manual_seed(args.seed)
        images = [part for im in images for part in random_phase_parts(im[None].float(), generator)]
    return images


def _evaluate_only(args: argparse.Namespace) -> int:
    from ..priors import load_prior
    from ..priors.evaluate import evaluate_denoising

    if not args.data:
        raise IDMError("--evaluate needs --data: a folder of test images")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prior = load_prior(args.evaluate, device=device)
    print(json.dumps(evaluate_denoising(prior, _evaluation_images(args.data, args)), indent=2))
    return 0


def _own_options(args: argparse.Namespace) -> tuple[str, ...]:
    """The trajectory options that apply to ``--arch`` (for the command quoted in the card)."""
    unet = ("base_channels", "channel_mults", "res_blocks", "attn", "dropout")
    conditional = ("conditional", "accelerations", "prediction", "data_scale") if args.conditional is None else ()
    if args.arch == "unet":
        skip = ("arch", "init", "depth", "features", "sigma_max") + (("random_phase",) if not args.conditional else ())
    else:
        skip = unet + (("depth", "features") if args.init is not None else ())
    skip += conditional
    return tuple(name for name in TRAJECTORY_OPTIONS if name not in skip)


def _validate(args: argparse.Namespace, world: int) -> None:
    check_training_args(args, world)
    if not 0.0 <= args.ema_decay < 1.0:
        raise IDMError(f"--ema-decay must lie in [0, 1), got {args.ema_decay}")
    if args.arch == "unet" and (args.init is not None or (args.random_phase and not args.conditional)):
        raise IDMError("--init and --random-phase apply to --arch dncnn (--random-phase also to --conditional mri)")
    given = [flag for flag, value in (("--prediction", args.prediction), ("--data-scale", args.data_scale),
                                      ("--accelerations", args.accelerations)) if value is not None]
    if given and not args.conditional:
        raise IDMError(f"{' and '.join(given)} apply to --conditional mri only")
    conditional = args.conditional is not None  # the defaults (the unconditional prior: eps, no scaling)
    args.prediction = args.prediction or ("x0" if conditional else "eps")
    args.data_scale = args.data_scale if args.data_scale is not None else (DEFAULT_DATA_SCALE if conditional else 1.0)
    args.accelerations = tuple(args.accelerations or DEFAULT_ACCELERATIONS)
    if not (math.isfinite(args.data_scale) and args.data_scale > 0):
        raise IDMError(f"--data-scale must be a positive number, got {args.data_scale}")
    if not all(math.isfinite(a) and a > 1 for a in args.accelerations):
        raise IDMError(f"--accelerations must be numbers > 1, got {','.join(f'{a:g}' for a in args.accelerations)}")
    if args.conditional and args.arch != "unet":
        raise IDMError("--conditional trains a U-Net: drop --arch dncnn")

    if args.arch == "dncnn" and not 0.0 < args.sigma_max <= 1.0:
        raise IDMError(f"--sigma-max must lie in (0, 1], got {args.sigma_max}")


def build_denoiser(args: argparse.Namespace):
    """``--arch dncnn``: the DnCNN to train (a copy of ``--init``'s, or fresh of ``--depth`` / ``--features``,
    σ input, ``--sigma-max``) and a description of where it came from."""
    from ..priors import load_prior
    from ..priors.denoiser import DenoiserPrior
    from ..priors.dncnn import DnCNN, DnCNNConfig

    if args.init is None:
        config = DnCNNConfig(depth=args.depth, features=args.features, sigma_input=True, sigma_max=args.sigma_max)
        return DnCNN(config), "from scratch"
    prior = load_prior(args.init)
    if not isinstance(prior, DenoiserPrior) or not isinstance(prior.denoiser, DnCNN):
        raise IDMError(f"--init {args.init} is not a DnCNN denoiser checkpoint")
    if not prior.denoiser.config.sigma_input:
        raise IDMError(f"--init {args.init} is a blind DnCNN; fine-tuning needs one that takes σ as input")
    net = DnCNN(replace(prior.denoiser.config, sigma_max=args.sigma_max))
    net.load_state_dict(prior.denoiser.state_dict())
    return net, f"fine-tuned from `{args.init}`"


def random_phase(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``x`` (B, 1, H, W) real → the complex x·e^{iφ}, φ = c + a·u + b·v (u, v ∈ [-1, 1] the pixel
    coordinates; c uniform in [−π, π), a, b uniform in [−π/2, π/2] per patch)."""
    b, _, h, w = x.shape
    coeff = torch.rand(3, b, 1, 1, 1, generator=generator, device=x.device, dtype=x.dtype)
    u = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype)
    v = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype)[:, None]
    phase = math.pi * (2 * coeff[0] - 1) + 0.5 * math.pi * ((2 * coeff[1] - 1) * u + (2 * coeff[2] - 1) * v)
    return torch.polar(x, phase)


def random_phase_parts(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``x`` (B, 1, H, W) on [0, 1] → (2B, 1, H, W): the real and imaginary parts of :func:`random_phase`
    ``(x)``, mapped to [0, 1] as (v + 1)/2."""
    z = random_phase(x, generator)
    return torch.cat((z.real, z.imag)).add(1.0).mul(0.5)


def conditional_mri_loss(model: torch.nn.Module, x: torch.Tensor, generator: torch.Generator,
                         args: argparse.Namespace, schedule: Any, size_multiple: int) -> torch.Tensor:
    """``--conditional mri``: :func:`idm.medical.mcddpm.diffusion_loss` of the patches ``x`` (B, 1, p, p)
    (complex with a random linear phase under ``--random-phase``), each measured with a fastMRI random
    1D mask of an acceleration drawn from ``--accelerations`` (default centre fraction)."""
    from ..medical.mcddpm import diffusion_loss
    from ..physics.mri import random_mask

    z = random_phase(x, generator) if args.random_phase else x.to(torch.complex64)
    picks = torch.randint(0, len(args.accelerations), (x.shape[0],), generator=generator, device=x.device).tolist()
    seeds = torch.randint(0, 2**31 - 1, (x.shape[0],), generator=generator, device=x.device).tolist()
    masks = torch.stack([random_mask(tuple(x.shape[-2:]), args.accelerations[i], seed=seed)
                         for i, seed in zip(picks, seeds)])[:, None].to(x.device)
    return diffusion_loss(model, z, masks, schedule, generator, size_multiple, args.prediction, args.data_scale)


def denoiser_loss(model: torch.nn.Module, x: torch.Tensor, generator: torch.Generator,
                  args: argparse.Namespace) -> torch.Tensor:
    """MSE between the DnCNN's noise estimate of ``x + σ·n`` and ``σ·n``, σ ~ U[0, --sigma-max] per patch."""
    if args.random_phase:
        x = random_phase_parts(x, generator)
    sigma = args.sigma_max * torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype)
    noise = sigma[:, None, None, None] * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    z = x + noise
    return F.mse_loss((z - model(z, sigma)).float(), noise.float())  # through forward: DDP-wrapped models sync


# --- training --------------------------------------------------------------------------------
def train(args: argparse.Namespace) -> int:
    from accelerate.utils import set_seed
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from ..data import ImageFolder
    from ..data.images import ARRAY_SUFFIX, IMAGE_SUFFIXES
    from ..medical.mcddpm import MCDDPM
    from ..priors import NoiseSchedule, Prior, UNet, to_model_range
    from ..priors.denoiser import DenoiserPrior

    accelerator = new_accelerator(args.mixed_precision)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    _validate(args, world)
    run_dir = Path(args.out)
    state_path = checked_state_path(run_dir, args.resume)

    set_seed(args.seed)
    schedule = NoiseSchedule(args.schedule)
    images = ImageFolder(args.data, suffixes=(*IMAGE_SUFFIXES, ARRAY_SUFFIX))
    channels = int(images[0][1].shape[0])
    if channels != 1 and (args.arch != "unet" or args.conditional):
        raise IDMError(f"{images.paths[0].name} has {channels} channels; only the plain U-Net prior (--arch unet, "
                       "no --conditional) trains on multi-channel arrays")
    if args.arch == "dncnn":
        model, origin = build_denoiser(args)
    else:
        unet_config = replace(unet_config_from_args(args), in_channels=channels, out_channels=channels) \
            if channels != 1 else unet_config_from_args(args)
        model, origin = UNet(unet_config), "from scratch"
        if args.patch % unet_config.size_multiple:
            raise IDMError(f"--patch {args.patch} must be divisible by {unet_config.size_multiple} for this U-Net")
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema_decay), use_buffers=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, args.warmup, args.steps))

    progress = Progress(command=command_line("train.pretrain_prior", args, (*_own_options(args), "out")))
    if args.resume:
        state = load_run_state(state_path, args, TRAJECTORY_OPTIONS, added=ADDED_OPTIONS)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        progress = resume_progress(state, accelerator, optimizer, scheduler, logs=[run_dir / LOG_FILE])
    model, optimizer = accelerator.prepare(model, optimizer)
    ema.to(device)

    loader = patch_loader(images, args, progress.step, accelerator)
    noise_gen = torch.Generator(device=device)

    model.train()

    def step_fn(batch: torch.Tensor, step: int) -> dict[str, Any]:
        batch = batch.to(device, non_blocking=True)
        noise_gen.manual_seed((args.seed * 1_000_003 + step) * world + rank)
        if args.arch == "dncnn":
            loss = denoiser_loss(model, batch, noise_gen, args)
        elif args.conditional:
            loss = conditional_mri_loss(model, batch, noise_gen, args, schedule, unet_config.size_multiple)
        else:
            x0 = to_model_range(batch)
            t = torch.randint(0, schedule.num_steps, (x0.shape[0],), generator=noise_gen, device=device)
            noise = torch.randn(x0.shape, generator=noise_gen, device=device)
            loss = F.mse_loss(model(schedule.q_sample(x0, t, noise), t).float(), noise)
        lr = optimizer_step(accelerator, model, optimizer, scheduler, loss, args.grad_clip)
        ema.update_parameters(accelerator.unwrap_model(model))
        done = step + 1
        if (args.arch == "unet" and not args.conditional and args.sample_every and done % args.sample_every == 0
                and accelerator.is_main_process):
            _write_samples(Prior(ema.module, schedule), run_dir / "samples" / f"step_{done:07d}.png", args)
        return {"loss": mean_loss(accelerator, loss, done), "lr": lr}

    def save(step: int, wall: float) -> None:
        save_training_state(state_path, accelerator, progress, step=step, wall_time=wall,
                            args=trajectory_args(args, TRAJECTORY_OPTIONS), optimizer=optimizer,
                            scheduler=scheduler, model=accelerator.unwrap_model(model).state_dict(),
                            ema=ema.state_dict())

    end = run_steps(args, accelerator, progress, resumed_batches(loader, progress.rng), step_fn, save,
                    log_path=run_dir / LOG_FILE, desc="pretrain")
    if not end.ready_to_export(args, accelerator, when_out_of_time=True):
        return 0
    step = end.step
    if accelerator.is_main_process:  # finished, or out of --max-minutes: export the EMA weights so far
        summary = RunSummary(progress.command, hardware(world, device), end.wall_time, progress.resumes,
                             final_loss(run_dir / LOG_FILE))
        export_dir = export_directory(args)
        if args.arch == "dncnn":
            export_denoiser(DenoiserPrior(ema.module, schedule), export_dir, args, summary, num_images=len(images),
                            steps_done=step, origin=origin)
        elif args.conditional:
            model_out = MCDDPM(ema.module, schedule, prediction=args.prediction, data_scale=args.data_scale)
            export_conditional(model_out, export_dir, args, summary, num_images=len(images), steps_done=step,
                               device=device)
        else:
            export(Prior(ema.module, schedule), export_dir, args, summary, num_images=len(images), steps_done=step)
        accelerator.print(f"exported EMA weights after {step} steps to {export_dir}")
    accelerator.wait_for_everyone()
    return 0


def _write_samples(prior: Any, path: Path, args: argparse.Namespace) -> None:
    from ..cli.sample import write_grid

    was_training = prior.unet.training
    images = prior.sample(16, args.patch, steps=50, sampler="ddim", seed=args.seed)
    prior.unet.train(was_training)
    channels = images.shape[1]  # several channels (e.g. MRI contrasts): one row of channels per sample
    write_grid(images.reshape(-1, 1, *images.shape[2:]), path, nrow=channels if channels > 1 else None)


def _record_training(prior: Any, args: argparse.Namespace, summary: RunSummary, num_images: int, steps_done: int,
                     denoising: dict[str, Any] | None, **extra: Any) -> None:
    """Put the run's training record (and the denoising table, if any) into the checkpoint config."""
    training = {
        "data": str(args.data), "num_images": num_images, "patch": args.patch, "steps": steps_done,
        "planned_steps": args.steps, "batch": args.batch, "lr": args.lr, "warmup": args.warmup,
        "ema_decay": args.ema_decay, **extra, "mixed_precision": args.mixed_precision, "seed": args.seed,
        **summary.fields(), "weights": "EMA", "storage_dtype": args.export_dtype,
    }
    prior.extra = {**prior.extra, "training": training, **({"denoising": denoising} if denoising else {})}


def export(prior: Any, directory: Path, args: argparse.Namespace, summary: RunSummary, *, num_images: int,
           steps_done: int) -> Path:
    """Write the EMA prior as a checkpoint directory with a model card."""
    from ..priors import load_prior
    from ..priors.evaluate import evaluate_denoising
    from ..priors.unet import count_parameters

    denoising = evaluate_denoising(prior, _evaluation_images(args.eval_data, args)) if args.eval_data else None
    _record_training(prior, args, summary, num_images, steps_done, denoising)
    cfg = prior.unet.config
    lines = [
        "# idm diffusion prior (ε-prediction U-Net)",
        "",
        f"{'Gray-scale' if cfg.in_channels == 1 else f'{cfg.in_channels}-channel'} DDPM prior; images on [0, 1] are mapped to [-1, 1] (`2x - 1`). "
        f"{count_parameters(prior.unet) / 1e6:.2f} M parameters, EMA weights (decay {args.ema_decay}) "
        f"stored as {args.export_dtype}. Load with `idm.priors.load_prior(path)`.",
        "",
        "| | |", "|---|---|",
        f"| architecture | U-Net: base {cfg.base_channels} ch, mults {list(cfg.channel_mults)}, "
        f"{cfg.num_res_blocks} ResBlocks/level, attention at levels {list(cfg.attention_levels)} |",
        f"| noise schedule | {prior.schedule.kind}, {prior.schedule.num_steps} steps |",
        data_row(args, num_images),
        f"| steps x batch | {steps_done} x {args.batch}"
        + (f" (stopped by the time budget; {args.steps} planned)" if steps_done < args.steps else "") + " |",
        f"| optimizer | AdamW lr {args.lr:g}, warm-up {args.warmup}, cosine to 10 %, grad clip {args.grad_clip:g} |",
        f"| mixed precision | {args.mixed_precision} |",
        *summary.card_rows(),
        *summary.command_lines(),
    ]
    if denoising:
        lines += ["", f"One-step denoising PSNR on `{args.eval_data}` (x̂₀ from x_t at matched noise level):", "",
                  "| σ (of 255) | t | input PSNR | x̂₀ PSNR |", "|---|---|---|---|"]
        lines += [f"| {k[5:]} | {v['t']} | {v['input_psnr']:.2f} | {v['psnr']:.2f} |" for k, v in denoising.items()]
        lines += ["", "Reproduce this table (loads the stored weights):", "", "```bash",
                  f"idm pretrain --evaluate {directory} --data {args.eval_data}", "```"]
    lines += ["", f"Samples (DDIM, 50 steps, seed {args.seed}, {args.patch}×{args.patch}), drawn from the stored weights:", "",
              "![samples](samples.png)", "",
              f"`idm sample --checkpoint {directory} --n 16 --steps 50 --size {args.patch} --seed {args.seed} -o grid.png`"]
    saved = prior.save(directory, "\n".join(lines) + "\n", dtype=EXPORT_DTYPES[args.export_dtype])
    # drawn from the stored (e.g. fp16) weights, so the card's `idm sample` command redraws exactly this grid
    _write_samples(load_prior(saved), saved / "samples.png", args)
    return saved


def export_denoiser(prior: Any, directory: Path, args: argparse.Namespace, summary: RunSummary, *, num_images: int,
                    steps_done: int, origin: str) -> Path:
    """``--arch dncnn``: write the EMA denoiser as a ``dncnn`` checkpoint directory with a model card."""
    from ..priors.evaluate import evaluate_denoising
    from ..priors.unet import count_parameters

    denoising = evaluate_denoising(prior, _evaluation_images(args.eval_data, args)) if args.eval_data else None
    _record_training(prior, args, summary, num_images, steps_done, denoising,
                     init=args.init, sigma_max=args.sigma_max, random_phase=args.random_phase)
    cfg = prior.denoiser.config
    what = ("the real and imaginary parts, mapped to [0, 1] as (v + 1)/2, of patches times a random linear "
            "phase (for complex MRI images: `pnp` and the IDM network denoise Re and Im this way)"
            if args.random_phase else "image patches on [0, 1]")
    lines = [
        "# idm denoiser prior (DnCNN, σ input)",
        "",
        f"Gaussian denoiser D(z, σ) {origin}, trained on {what} with noise std σ uniform in "
        f"[0, {args.sigma_max:g}]; {count_parameters(prior.denoiser) / 1e6:.2f} M parameters, EMA weights "
        f"(decay {args.ema_decay}) stored as {args.export_dtype}. A prior like any other: "
        "`idm.priors.load_prior(path)` (`pnp`, `ddnm`, `dps`, `idm finetune --prior`).",
        "",
        "| | |", "|---|---|",
        f"| architecture | DnCNN, {cfg.depth} layers, {cfg.features} ch, σ as input channel |",
        f"| initialisation | {origin} |",
        data_row(args, num_images),
        f"| steps x batch | {steps_done} x {args.batch}{' (x 2 parts)' if args.random_phase else ''}"
        + (f" (stopped by the time budget; {args.steps} planned)" if steps_done < args.steps else "") + " |",
        f"| optimizer | AdamW lr {args.lr:g}, warm-up {args.warmup}, cosine to 10 %, grad clip {args.grad_clip:g} |",
        *summary.card_rows(),
        *summary.command_lines(),
    ]
    if denoising:
        on = ("the real and imaginary parts (random linear phase, seed "
              f"{args.seed}) of the images of `{args.eval_data}`" if args.random_phase else f"`{args.eval_data}`")
        lines += ["", f"Denoising PSNR on {on} (white noise of std σ/255 on [0, 1], "
                  "through the prior interface: x̂₀ at the matching diffusion step):", "",
                  "| σ (of 255) | input PSNR | denoised PSNR |", "|---|---|---|"]
        lines += [f"| {k[5:]} | {v['input_psnr']:.2f} | {v['psnr']:.2f} |" for k, v in denoising.items()]
        lines += ["", "Reproduce this table (loads the stored weights):", "", "```bash",
                  f"idm pretrain --evaluate {directory} --data {args.eval_data}"
                  + (f" --random-phase --seed {args.seed}" if args.random_phase else ""), "```"]
    return prior.save(directory, "\n".join(lines) + "\n", dtype=EXPORT_DTYPES[args.export_dtype])


#: sampler settings of the validation table in an MC-DDPM card (``idm eval --method mcddpm --option …``)
CARD_SAMPLING = {"samples": 4, "steps": 10}


def conditional_validation(directory: Path, folder: str, accelerations: tuple[float, ...], seed: int,
                           device: Any = "cpu") -> list[dict]:
    """Mean PSNR / SSIM of the stored MC-DDPM (:data:`CARD_SAMPLING`) and of the zero-filled image
    (``pinv``) on the MRI slices of ``folder``, per acceleration (masks seeded as ``idm eval --seed``)."""
    from ..cli.evaluate import truth_folder
    from ..evaluation import evaluate, operator_factory

    truths = truth_folder(folder, None, "mri")
    images = [truths[i] for i in range(len(truths))]
    rows = []
    for acceleration in accelerations:
        factory = operator_factory("mri", seed=seed, acceleration=acceleration)
        scores = {name: evaluate(name, images, factory, ratio=None, seed=seed, checkpoint=checkpoint, options=options,
                                 device=str(device)).mean
                  for name, checkpoint, options in (("mcddpm", str(directory), CARD_SAMPLING), ("pinv", None, None))}
        rows.append({"acceleration": acceleration, "images": len(images), **{
            f"{name}_{key}": value for name, mean in scores.items() for key, value in mean.items()}})
    return rows


def export_conditional(model: Any, directory: Path, args: argparse.Namespace, summary: RunSummary, *,
                       num_images: int, steps_done: int, device: Any = "cpu") -> Path:
    """``--conditional mri``: write the EMA MC-DDPM as an ``mcddpm`` checkpoint with a model card (and,
    with ``--eval-data``, its validation table measured from the stored weights)."""
    from ..priors.unet import count_parameters

    _record_training(model, args, summary, num_images, steps_done, None, random_phase=args.random_phase)
    model.extra["accelerations"] = list(args.accelerations)
    cfg = model.unet.config
    patches = ("complex patches with a random linear phase" if args.random_phase else "real image patches")
    lines = [
        "# idm MC-DDPM (measurement-conditioned k-space diffusion, single-coil MRI)",
        "",
        f"A DDPM over the unsampled k-space (Xie & Li, MICCAI 2022), conditioned on the zero-filled image, trained "
        f"on {patches} measured with random 1D Cartesian masks at {', '.join(f'{a:g}×' for a in args.accelerations)}. "
        f"{count_parameters(model.unet) / 1e6:.2f} M parameters, EMA weights (decay {args.ema_decay}) stored as "
        f"{args.export_dtype}. Use: `idm reconstruct --method mcddpm --checkpoint DIR --uncertainty std.npy ...`, "
        "`idm.medical.load_mcddpm(path)`.",
        "",
        "| | |", "|---|---|",
        f"| architecture | U-Net, [Re, Im] of state and zero-filled image in, [Re, Im] of "
        f"{'ε' if model.prediction == 'eps' else 'the clean unknown k-space (x₀-prediction)'} out: base "
        f"{cfg.base_channels} ch, mults {list(cfg.channel_mults)}, {cfg.num_res_blocks} ResBlocks/level, attention at "
        f"levels {list(cfg.attention_levels)} (and the middle) |",
        f"| noise schedule | {model.schedule.kind}, {model.schedule.num_steps} steps; diffused k-space divided by "
        f"{model.data_scale:g} |",
        data_row(args, num_images),
        f"| steps x batch | {steps_done} x {args.batch}"
        + (f" (stopped by the time budget; {args.steps} planned)" if steps_done < args.steps else "") + " |",
        f"| optimizer | AdamW lr {args.lr:g}, warm-up {args.warmup}, cosine to 10 %, grad clip {args.grad_clip:g} |",
        *summary.card_rows(),
        *summary.command_lines(),
    ]
    saved = model.save(directory, "\n".join(lines) + "\n", dtype=EXPORT_DTYPES[args.export_dtype])
    if args.eval_data:
        from ..io.checkpoint import load_checkpoint, save_checkpoint

        rows = conditional_validation(saved, args.eval_data, tuple(args.accelerations), args.seed, device)
        options = " ".join(f"--option {k}={v}" for k, v in CARD_SAMPLING.items())
        lines += ["", f"Validation on `{args.eval_data}` (mean over the slices, from the stored weights; K = "
                  f"{CARD_SAMPLING['samples']} samples of {CARD_SAMPLING['steps']} steps, masks seeded {args.seed}):", "",
                  "| acceleration | MC-DDPM PSNR / SSIM | zero-filled PSNR / SSIM | s per slice |", "|---|---|---|---|"]
        lines += [f"| {r['acceleration']:g}× | {r['mcddpm_psnr']:.2f} / {r['mcddpm_ssim']:.4f} | {r['pinv_psnr']:.2f} / "
                  f"{r['pinv_ssim']:.4f} | {r['mcddpm_seconds']:.1f} |" for r in rows]
        lines += ["", "```bash", *(f"idm eval --data {args.eval_data} --operator mri --acceleration {r['acceleration']:g} "
                                   f"--method mcddpm --checkpoint {directory} {options} --seed {args.seed}" for r in rows),
                  "```"]
        tensors, config = load_checkpoint(saved, device="cpu")  # fp16 / bf16 → fp32 → the same stored values
        save_checkpoint(saved, tensors, {**config, "validation": rows}, "\n".join(lines) + "\n",
                        dtype=EXPORT_DTYPES[args.export_dtype])
    return saved


if __name__ == "__main__":
    sys.exit(main())
