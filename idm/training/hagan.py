"""Train HA-GAN (:mod:`idm.generative.hagan`, Sun et al., JBHI 2022) on whole volumes.

    python -m train.hagan --data runs/data/hagan64/ct/train --val runs/data/hagan64/ct/val --out runs/hagan-ct

``--data`` holds volumes ``(D, H, W)`` ``.npy`` on [0, 1], all of one shape (``python -m train.hagan_volumes``
writes them); ``--val`` the held-out volume(s) on which the card reports the encoder's reconstruction PSNR.
Each step ``s`` draws ``--batch`` volumes (volume and a left-right flip a function of ``--seed`` and the
position only), the latents ``z ~ N(0, I)`` and one sub-volume position ``p`` (from a generator seeded by
``--seed`` and ``s``), and takes the paper's four steps in turn, each with its own Adam (β = (0, 0.999)) on
its own parameters: the discriminators on ``L_D``, the generator on ``L_G``, ``E^H`` on ``L_{E^H}``, ``E^G``
on ``L_{E^G}`` — the encoders every ``--encoder-every`` steps only (default 1, the paper's; they never
feed back into the GAN, whose gradients do not reach them, so updating them less often only makes the
GAN's steps cheaper: at 128³ on one CPU core the two encoder steps cost 3.5 s of a 5.5 s iteration). The
log line's ``loss`` is ``L_D + L_G``, with ``d``, ``g`` and (on encoder steps) ``eh``, ``eg`` beside it.
Constant learning rates (``--lr-g``, ``--lr-d``, ``--lr-e``; the paper's 1e-4 / 4e-4 / 1e-4 by default). The run folder gets
``state.safetensors`` every ``--save-every`` steps (``--resume`` continues exactly, :func:`run_steps`),
``log.jsonl`` and at the end the checkpoint (``--export``, default ``RUNDIR/checkpoint``): generator and
encoders (not the discriminators), config and a card with the measured generation statistics
(:func:`evaluate`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import IDMError
from .common import (Progress, RunSummary, add_run_control_arguments, add_run_folder_arguments, checked_state_path,
                     command_line, export_directory, final_loss, hardware, load_run_state, mean_loss, new_accelerator,
                     resume_progress, resumed_batches, run_steps, save_training_state, script_main, step_loader,
                     trajectory_args)

MODULE = "train.hagan"
LOG_FILE = "log.jsonl"
ARCHITECTURE = "hagan"
#: options that fix the training trajectory (checked on --resume)
TRAJECTORY_OPTIONS = ("data", "steps", "batch", "lr_g", "lr_d", "lr_e", "encoder_every", "factor", "sub",
                      "latent_dim", "top_width", "max_width", "d_width", "seed")


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    io = parser.add_argument_group("data and run folder")
    io.add_argument("--data", required=True, help="folder of (D, H, W) .npy training volumes on [0, 1], one shape")
    io.add_argument("--val", help="held-out volume(s) (.npy file or folder): the card's encoder PSNR")
    io.add_argument("--modality", default="CT", help="what the volumes are (CT: [-1000, 1000] HU on [0, 1]; default CT)")
    io.add_argument("--spacing", type=float, default=3.0, help="voxel spacing of the volumes in mm (default 3)")
    io.add_argument("--out", default="runs/hagan", help="run folder (default runs/hagan)")
    add_run_folder_arguments(io)
    tr = parser.add_argument_group("training")
    tr.add_argument("--steps", type=int, default=2000, help="iterations (default 2000)")
    tr.add_argument("--batch", type=int, default=1, help="volumes per iteration (default 1)")
    tr.add_argument("--lr-g", type=float, default=1e-4, help="generator learning rate (default 1e-4, the paper's)")
    tr.add_argument("--lr-d", type=float, default=4e-4, help="discriminators' learning rate (default 4e-4)")
    tr.add_argument("--lr-e", type=float, default=1e-4, help="encoders' learning rate (default 1e-4)")
    tr.add_argument("--encoder-every", type=int, default=1,
                    help="update the encoders E^H, E^G every this many steps (default 1, the paper's)")
    tr.add_argument("--seed", type=int, default=0, help="seed of initialisation, volumes, latents, positions")
    tr.add_argument("--eval-samples", type=int, default=8, help="generated volumes the card's statistics use (default 8)")
    net = parser.add_argument_group("network (idm.generative.hagan.HAGANConfig)")
    net.add_argument("--factor", type=int, default=4, help="s: low resolution = shape / s (default 4, the paper's)")
    net.add_argument("--sub", type=_int_tuple, help="sub-volume D,H,W in voxels (default the paper's slab: D/8 x H x W)")
    net.add_argument("--latent-dim", type=int, default=128, help="latent size (default 128)")
    net.add_argument("--top-width", type=int, default=4, help="generator width at full resolution (default 4)")
    net.add_argument("--max-width", type=int, default=64, help="largest width (default 64)")
    net.add_argument("--d-width", type=int, default=8, help="first discriminator width (default 8)")
    add_run_control_arguments(parser.add_argument_group("run control"),
                              max_minutes_help="stop, save and export after this many minutes")
    return parser


class VolumeItems(torch.utils.data.Dataset):
    """Position-indexed training volumes ``(1, D, H, W)``: item ``i`` is volume ``k`` (uniform), flipped
    left-right half of the time, both drawn from ``(seed, i)`` only."""

    def __init__(self, volumes: torch.Tensor, *, length: int, seed: int) -> None:
        self.volumes, self.length, self.seed = volumes, length, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, i])
        volume = self.volumes[int(rng.integers(len(self.volumes)))]
        return volume.flip(-1) if rng.random() < 0.5 else volume


class Group:
    """Several optimizers (or LR schedulers) saved and restored as one (``state_dict`` / ``load_state_dict``)."""

    def __init__(self, **members: Any) -> None:
        self.members = members

    def state_dict(self) -> dict[str, Any]:
        return {name: member.state_dict() for name, member in self.members.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, member in self.members.items():
            member.load_state_dict(state[name])


def build_config(args: argparse.Namespace, shape: tuple[int, ...]) -> Any:
    from ..generative.hagan import HAGANConfig

    return HAGANConfig(shape=tuple(shape), factor=args.factor, sub_shape=args.sub, latent_dim=args.latent_dim,
                       top_width=args.top_width, max_width=args.max_width, d_width=args.d_width,
                       modality=args.modality, spacing=(args.spacing,) * 3)


def run(args: argparse.Namespace) -> int:
    from accelerate.utils import set_seed

    from ..data import load_volumes
    from ..generative.hagan import (HAGAN, Discriminators, discriminator_loss, encoder_global_loss, encoder_high_loss,
                                    generator_loss, to_model_range)

    accelerator = new_accelerator("no")
    device = accelerator.device
    if accelerator.num_processes > 1:
        raise IDMError("HA-GAN training runs in one process")
    for name in ("steps", "batch", "save_every", "eval_samples", "encoder_every"):
        if getattr(args, name) < 1:
            raise IDMError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.lr_g, args.lr_d, args.lr_e) <= 0 or args.spacing <= 0:
        raise IDMError("--lr-g, --lr-d, --lr-e and --spacing must be positive")
    run_dir = Path(args.out)
    state_path = checked_state_path(run_dir, args.resume)
    names, volumes = load_volumes(args.data)
    val = load_volumes(args.val) if args.val else None
    config = build_config(args, tuple(volumes.shape[2:]))
    if val is not None and tuple(val[1].shape[2:]) != config.shape:
        raise IDMError(f"--val volumes are {tuple(val[1].shape[2:])}, the training volumes {config.shape}")
    set_seed(args.seed)
    model, disc = HAGAN(config).to(device), Discriminators(config).to(device)
    params = {"d": list(disc.parameters()), "g": list(model.generator.parameters()),
              "eh": list(model.encoder_high.parameters()), "eg": list(model.encoder_global.parameters())}
    lrs = {"d": args.lr_d, "g": args.lr_g, "eh": args.lr_e, "eg": args.lr_e}
    optimizers = {k: torch.optim.Adam(p, lr=lrs[k], betas=(0.0, 0.999)) for k, p in params.items()}
    optimizer = Group(**optimizers)
    scheduler = Group(**{k: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0) for k, o in optimizers.items()})
    progress = Progress(command=command_line(MODULE, args, (*TRAJECTORY_OPTIONS, "val", "modality", "spacing", "out")))
    if args.resume:
        state = load_run_state(state_path, args, TRAJECTORY_OPTIONS)
        model.load_state_dict(state["model"])
        disc.load_state_dict(state["disc"])
        progress = resume_progress(state, accelerator, optimizer, scheduler, logs=[run_dir / LOG_FILE])
    items = VolumeItems(volumes, length=args.steps * args.batch, seed=args.seed)
    loader = step_loader(items, args, progress.step, accelerator)
    noise = torch.Generator()
    model.train()
    disc.train()

    def update(name: str, loss: torch.Tensor) -> None:
        optimizers[name].zero_grad(set_to_none=True)
        loss.backward(inputs=params[name])
        optimizers[name].step()

    def step_fn(batch: torch.Tensor, step: int) -> dict[str, Any]:
        real = to_model_range(batch.to(device))
        noise.manual_seed(args.seed * 1_000_003 + step)
        z = torch.randn((real.shape[0], config.latent_dim), generator=noise).to(device)
        start = model.sample_position(noise)
        losses = [("d", lambda: discriminator_loss(model, disc, real, z, start)),
                  ("g", lambda: generator_loss(model, disc, z, start))]
        if step % args.encoder_every == 0:
            losses += [("eh", lambda: encoder_high_loss(model, real, start)),
                       ("eg", lambda: encoder_global_loss(model, real, start))]
        parts = {}
        for name, loss_fn in losses:
            loss = loss_fn()
            update(name, loss)
            parts[name] = mean_loss(accelerator, loss, step + 1)
        for member in scheduler.members.values():
            member.step()
        return {"loss": parts["d"] + parts["g"], "lr": args.lr_g, **parts, "position": list(start)}

    def save(step: int, wall: float) -> None:
        save_training_state(state_path, accelerator, progress, step=step, wall_time=wall,
                            args=trajectory_args(args, TRAJECTORY_OPTIONS), optimizer=optimizer,
                            scheduler=scheduler, model=model.state_dict(), disc=disc.state_dict())

    end = run_steps(args, accelerator, progress, resumed_batches(loader, progress.rng), step_fn, save,
                    log_path=run_dir / LOG_FILE, desc="hagan",
                    shown=lambda: {})
    if not end.ready_to_export(args, accelerator, when_out_of_time=True):
        return 0
    model.eval()
    metrics = evaluate(model, volumes, val, samples=args.eval_samples, seed=args.seed)
    summary = RunSummary(progress.command, hardware(1, device), end.wall_time, progress.resumes,
                         final_loss(run_dir / LOG_FILE))
    export(model, export_directory(args), args, summary, names, end.step, metrics)
    print(f"exported HA-GAN after {end.step} steps to {export_directory(args)}: "
          + json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict)}))
    return 0


def sample_volumes(model: Any, samples: int, seed: int) -> torch.Tensor:
    """``samples`` generated volumes ``(samples, 1, D, H, W)`` on [0, 1] (CPU), latents seeded by
    ``seed + 12345``, generated one at a time: what :func:`evaluate` scores."""
    device = next(model.parameters()).device
    z = model.sample_latent(samples, torch.Generator().manual_seed(seed + 12345)).to(device)
    return torch.cat([model.generate(z[i:i + 1]).cpu() for i in range(samples)])


def evaluate(model: Any, real: torch.Tensor, val: tuple[list[str], torch.Tensor] | None, *, samples: int,
             seed: int, generated: torch.Tensor | None = None) -> dict[str, Any]:
    """Generation statistics against the real volumes ``real`` ``(N, 1, D, H, W)`` on [0, 1]: intensity mean
    / std of ``samples`` generated volumes (latents seeded by ``seed + 12345``), of the real ones and of the
    held-out ones, the mid-plane histogram distance
    (:func:`~idm.generative.hagan.mid_slice_histogram_distance`) generated vs real — and, for scale, held-out
    vs training volumes — and the encoder's reconstruction PSNR on each held-out volume (and on the first
    training volume). ``generated``: the :func:`sample_volumes` of ``samples`` and ``seed`` when already drawn."""
    from ..generative.hagan import intensity_stats, mid_slice_histogram_distance, psnr

    device = next(model.parameters()).device
    generated = sample_volumes(model, samples, seed) if generated is None else generated
    out: dict[str, Any] = {
        "samples": samples,
        "generated": intensity_stats(generated), "real": intensity_stats(real),
        "mid_slice_histogram_distance": mid_slice_histogram_distance(generated, real),
        "train_recon_psnr_db": psnr(model.reconstruct(real[:1].to(device))[1].cpu(), real[:1]),
    }
    if val is not None:
        names, held = val
        out["heldout"] = intensity_stats(held)
        out["val_to_train_histogram_distance"] = mid_slice_histogram_distance(held, real)
        out["heldout_recon_psnr_db"] = {name: psnr(model.reconstruct(v[None].to(device))[1].cpu(), v[None])
                                        for name, v in zip(names, held)}
    return out


def export(model: Any, directory: Path, args: argparse.Namespace, summary: RunSummary, names: list[str],
           steps_done: int, metrics: dict[str, Any]) -> Path:
    """Generator and encoders as a checkpoint: safetensors weights, config (with ``metrics``) and model card."""
    from ..io.checkpoint import save_checkpoint
    from .common import EXPORT_DTYPES

    c = model.config
    config = {"architecture": ARCHITECTURE, "hagan": c.to_dict(), "value_range": [0, 1], "metrics": metrics,
              "training": {**summary.fields(), "steps": steps_done, "batch": args.batch, "data": str(args.data),
                           "val": str(args.val) if args.val else None, "volumes": names, "seed": args.seed,
                           "lr": {"g": args.lr_g, "d": args.lr_d, "e": args.lr_e},
                           "encoder_every": args.encoder_every}}
    held = metrics.get("heldout_recon_psnr_db", {})
    g, r, h = metrics["generated"], metrics["real"], metrics.get("heldout")
    card = "\n".join([
        f"# hagan: HA-GAN, whole {c.modality} volumes {'×'.join(map(str, c.shape))} at {c.spacing[0]:g} mm", "",
        f"`idm.generative.hagan.HAGAN` (Sun et al., JBHI 2022): latent ({c.latent_dim}) → whole volume "
        f"{'×'.join(map(str, c.shape))} on [0, 1]{' (CT: [−1000, 1000] HU)' if c.modality.upper() == 'CT' else ''}, low resolution "
        f"{'×'.join(map(str, c.low_shape))} (s = {c.factor}), trained on one {'×'.join(map(str, c.sub_shape))} "
        "sub-volume per iteration; `idm generate`, `idm encode`.", "",
        f"**Very little data**: {len(names)} training volumes ({', '.join(names)}) — crops of "
        f"{len({n.rsplit('_', 1)[0] for n in names})} scans; {steps_done} iterations of batch {args.batch}. "
        "The generated volumes are a demonstration of the method and of its memory, not a model of anatomy.", "",
        "| | |", "|---|---|",
        f"| data | `{args.data}` ({len(names)} volumes), left-right flips |",
        f"| steps x batch | {steps_done} x {args.batch} |",
        f"| learning rates G / D / E | {args.lr_g:g} / {args.lr_d:g} / {args.lr_e:g} (Adam, β = (0, 0.999)); encoders every {args.encoder_every} step(s) |",
        *summary.card_rows(), *summary.command_lines(), "",
        f"## Measured ({metrics['samples']} generated volumes, seed {args.seed})", "",
        "| | generated | real (training) | held-out |", "|---|---|---|---|",
        *[f"| intensity {key} | {g[key]:.4f} | {r[key]:.4f} | {h[key]:.4f} |" if h else
          f"| intensity {key} | {g[key]:.4f} | {r[key]:.4f} | — |" for key in ("mean", "std")],
        f"| mid-plane histogram distance to the real volumes (W1 on [0, 1]) | {metrics['mid_slice_histogram_distance']:.4f} "
        "| 0 | " + (f"{metrics['val_to_train_histogram_distance']:.4f} |"
                   if "val_to_train_histogram_distance" in metrics else "— |"),
        f"| encoder reconstruction PSNR, first training volume | | {metrics['train_recon_psnr_db']:.2f} dB | |",
        *[f"| encoder reconstruction PSNR, held-out `{name}` | | | {value:.2f} dB |" for name, value in held.items()],
    ])
    return save_checkpoint(directory, model.state_dict(), config, card, dtype=EXPORT_DTYPES[args.export_dtype])


def load_hagan(source: str | Path, device: str | torch.device = "cpu") -> Any:
    """An HA-GAN checkpoint (:func:`export`; a folder or a shipped name such as ``hagan-ct``) as an eval-mode
    :class:`~idm.generative.hagan.HAGAN`."""
    from ..generative.hagan import HAGAN, HAGANConfig
    from ..io.checkpoint import load_model

    return load_model(source, ARCHITECTURE, lambda config: HAGAN(HAGANConfig.from_dict(config["hagan"])), device)


main = script_main("idm.training.hagan")


if __name__ == "__main__":
    sys.exit(main())
