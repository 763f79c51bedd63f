"""Train a learned 2-D or 3-D registration: DiffuseMorph (``--arch ddm``) or the VoxelMorph-style baseline
(``--arch voxelmorph``), :mod:`idm.medical.registration`.

    python -m train.registration --data runs/data/reg/train --arch ddm --out runs/ddm-brain --steps 3000

``--data`` holds 2-D slices (``.npy`` / images on [0, 1], one size; ``python -m train.registration_slices``
writes them, named ``<source>_z<depth>.npy``) or, with ``--ndim 3``, volumes (``(D, H, W)`` ``.npy``, one
size; ``python -m train.registration_volumes``; every two volumes are an inter-subject pair). Pair ``i`` of the run (:class:`PairSampler`, a function of
``i`` and ``--seed`` only) is, with probability ``--synthetic``, a slice against itself warped by a random
smooth field (amplitude uniform in [0, ``--amplitude``] pixels), otherwise an **inter-subject** pair: the
slices of two different sources at the same depth (± 1) — with ``--augment A``, each of the two warped by its
own random smooth field up to ``A`` pixels (new anatomies from few brains); both images of a pair are flipped
left-right together half of the time. Loss: :func:`idm.medical.registration.training_loss` with
λ = ``--weight``, α = ``--smooth`` and β = ``--global-ncc`` (0: the paper's loss); Adam, warm-up then cosine.
The run folder gets ``state.safetensors`` every ``--save-every`` steps (``--resume`` continues exactly),
``log.jsonl`` and at the end the checkpoint (``--export``, default ``RUNDIR/checkpoint``), whose card reports
the held-out pairs of ``--val`` (NCC, endpoint error on the synthetic ones, folding) when given.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import IDMError
from .common import (Progress, RunSummary, add_run_control_arguments, add_run_folder_arguments, checked_state_path,
                     command_line, export_directory, final_loss, hardware, load_run_state, mean_loss, new_accelerator,
                     optimizer_step, resume_progress, resumed_batches, run_steps, save_training_state, script_main,
                     step_loader, trajectory_args, warmup_cosine)

MODULE = "idm.training.registration"
LOG_FILE = "log.jsonl"
ARCHITECTURE = "registration"
#: options that fix the training trajectory (checked on --resume)
TRAJECTORY_OPTIONS = ("data", "arch", "steps", "batch", "lr", "warmup", "grad_clip", "weight", "smooth", "synthetic",
                      "amplitude", "augment", "global_ncc", "seed", "features", "base_channels", "channel_mults",
                      "code_channels", "ndim", "init")
_DEPTH = re.compile(r"^(?P<source>.+?)_z(?P<z>\d+)$")


def _int_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    io = parser.add_argument_group("data and run folder")
    io.add_argument("--data", required=True,
                    help="folder of 2-D training slices on [0, 1] (<source>_z<depth>.npy), or of volumes with --ndim 3")
    io.add_argument("--ndim", type=int, choices=(2, 3), default=2, help="2: slices, 3: volumes (default 2)")
    io.add_argument("--val", help="held-out pairs (<name>_moving/_fixed[/_field].npy) reported on the card")
    io.add_argument("--out", default="runs/registration", help="run folder (default runs/registration)")
    io.add_argument("--init", help="continue training a registration checkpoint (name or folder; the size options "
                                   "must match it): new optimizer, warm-up and cosine over --steps")
    add_run_folder_arguments(io)
    tr = parser.add_argument_group("training")
    tr.add_argument("--arch", choices=("ddm", "voxelmorph"), default="ddm",
                    help="ddm: DiffuseMorph; voxelmorph: the field network alone (default ddm)")
    tr.add_argument("--steps", type=int, default=3000, help="optimizer steps (default 3000)")
    tr.add_argument("--batch", type=int, default=8, help="pairs per step (default 8)")
    tr.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    tr.add_argument("--warmup", type=int, default=100, help="linear warm-up steps (default 100)")
    tr.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip, 0 = off (default 1)")
    tr.add_argument("--weight", type=float, default=20.0, help="λ: weight of −NCC + α‖∇u‖² (default 20, the paper's)")
    tr.add_argument("--smooth", type=float, default=1.0, help="α: smoothness relative to NCC (default 1)")
    tr.add_argument("--synthetic", type=float, default=0.5, help="share of synthetic pairs (default 0.5)")
    tr.add_argument("--amplitude", type=float, default=5.0, help="largest synthetic field amplitude, pixels (default 5)")
    tr.add_argument("--global-ncc", type=float, default=0.0,
                    help="β: weight of the global NCC beside the local NCC9 in the loss (default 0: the paper's loss)")
    tr.add_argument("--augment", type=float, default=0.0,
                    help="warp both images of an inter-subject pair by their own random smooth fields up to this "
                    "many pixels: new anatomies from few brains (default 0: off)")
    tr.add_argument("--seed", type=int, default=0, help="seed of initialisation, pairs and noise (default 0)")
    tr.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no", help="accelerate mixed precision")
    net = parser.add_argument_group("network size")
    net.add_argument("--features", type=_int_tuple, default=(16, 32, 32, 32), help="field network widths (default 16,32,32,32)")
    net.add_argument("--base-channels", type=int, default=16, help="diffusion U-Net base channels (ddm; default 16)")
    net.add_argument("--code-channels", type=int, default=8,
                     help="ddm code channels: the noise estimate plus free channels (default 8; 1 = the paper's "
                     "single score channel, docs/registration.md)")
    net.add_argument("--channel-mults", type=_int_tuple, default=(1, 2, 2, 2), help="diffusion U-Net multipliers (default 1,2,2,2)")
    add_run_control_arguments(parser.add_argument_group("run control"),
                              max_minutes_help="stop, save and export after this many minutes")
    return parser


def load_slices(folder: str | Path, ndim: int = 2) -> tuple[list[str], torch.Tensor]:
    """The slices of ``folder`` (``.npy`` or images, gray on [0, 1], one size): names (stems) and ``(N, 1, H, W)``;
    ``ndim = 3``: the ``(D, H, W)`` ``.npy`` volumes of ``folder`` as ``(N, 1, D, H, W)``."""
    from ..data import ImageFolder, load_volumes
    from ..data.images import ARRAY_SUFFIX, IMAGE_SUFFIXES

    root = Path(folder)
    if ndim == 3:
        if not root.is_dir():
            raise IDMError(f"no .npy volumes in {root}")
        return load_volumes(root)
    items = list(ImageFolder(root, suffixes=(*IMAGE_SUFFIXES, ARRAY_SUFFIX)))
    names, stack = [name for name, _ in items], [image[:1] for _, image in items]
    sizes = {tuple(x.shape) for x in stack}
    if len(sizes) != 1:
        raise IDMError(f"the slices of {root} differ in size: {sorted(sizes)}")
    return names, torch.stack(stack)


class PairSampler(torch.utils.data.Dataset):
    """Position-indexed training pairs ``(2, H, W)`` = (moving, fixed) (module docstring): pair ``i`` depends
    only on ``(seed, i)``."""

    def __init__(self, names: list[str], slices: torch.Tensor, *, length: int, seed: int, synthetic: float,
                 amplitude: float, augment: float = 0.0) -> None:
        self.slices, self.length, self.seed = slices, length, seed
        self.synthetic, self.amplitude, self.augment = synthetic, amplitude, augment
        self.by_depth: dict[int, dict[str, int]] = {}
        for index, name in enumerate(names):
            match = _DEPTH.match(name)
            if match:
                self.by_depth.setdefault(int(match["z"]), {})[match["source"]] = index
            elif slices.ndim == 5:  # volumes: every two are a pair (one "depth")
                self.by_depth.setdefault(0, {})[name] = index
        self.partnered = [(z, source) for z, sources in sorted(self.by_depth.items()) if len(sources) > 1
                          for source in sorted(sources)]
        if synthetic < 1 and not self.partnered:
            raise IDMError("no inter-subject pairs: name slices <source>_z<depth> with two sources at a depth, "
                           "or train with --synthetic 1")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> torch.Tensor:
        from ..medical.registration import random_field, warp

        rng = np.random.default_rng([self.seed, i])

        def warped(image: torch.Tensor, amplitude: float, seed: int) -> torch.Tensor:  # through a seeded smooth field
            field = random_field(tuple(image.shape[1:]), amplitude=amplitude,
                                 generator=torch.Generator().manual_seed(seed))
            return warp(image[None], field)[0]

        if rng.random() < self.synthetic:
            moving = self.slices[int(rng.integers(len(self.slices)))]
            seed = int(rng.integers(2**62))
            fixed = warped(moving, float(rng.uniform(0, self.amplitude)), seed)
        else:
            z, source = self.partnered[int(rng.integers(len(self.partnered)))]
            moving = self.slices[self.by_depth[z][source]]
            near = [d for d in (z - 1, z, z + 1) if any(s != source for s in self.by_depth.get(d, {}))]
            depth = near[int(rng.integers(len(near)))]
            others = sorted(s for s in self.by_depth[depth] if s != source)
            fixed = self.slices[self.by_depth[depth][others[int(rng.integers(len(others)))]]]
            if self.augment > 0:  # each image of the pair through its own random smooth field
                moving = warped(moving, self.augment, int(rng.integers(2**62)))
                fixed = warped(fixed, self.augment, int(rng.integers(2**62)))
        pair = torch.cat([moving, fixed])
        return pair.flip(-1) if rng.random() < 0.5 else pair


def read_pairs(folder: str | Path) -> list[dict[str, Any]]:
    """Held-out pairs of ``folder``: ``{"name", "moving", "fixed"(, "field")}`` (``(1, 1, *S)``, field
    ``(1, n, *S)``, ``S`` 2-D or 3-D), from ``<name>_moving.npy`` / ``_fixed.npy`` / ``_field.npy``, sorted by name."""
    from ..data.images import read_npy

    root = Path(folder)
    if not root.is_dir():
        raise IDMError(f"folder not found: {root}")
    pairs = []
    for path in sorted(root.glob("*_moving.npy")):
        name = path.name[: -len("_moving.npy")]
        fixed_path, field_path = root / f"{name}_fixed.npy", root / f"{name}_field.npy"
        if not fixed_path.is_file():
            raise IDMError(f"{path.name} has no partner {fixed_path.name}")
        pair = {"name": name, "moving": torch.from_numpy(read_npy(path, "moving image").astype(np.float32))[None, None],
                "fixed": torch.from_numpy(read_npy(fixed_path, "fixed image").astype(np.float32))[None, None]}
        if field_path.is_file():
            pair["field"] = torch.from_numpy(read_npy(field_path, "field").astype(np.float32))[None]
        pairs.append(pair)
    if not pairs:
        raise IDMError(f"no *_moving.npy pairs in {root}")
    return pairs


def evaluate(model: Any, pairs: list[dict[str, Any]], passes: int | None = None) -> dict[str, float]:
    """Mean NCC (brain: moving or fixed > 0.05), endpoint error (synthetic pairs) and folding % of ``model``
    registering with ``passes`` network passes (default :data:`~idm.medical.registration.PASSES`)."""
    from ..medical.registration import PASSES, endpoint_error, folding_fraction, ncc, register

    scores: dict[str, list[float]] = {"ncc": [], "epe": [], "folding_percent": []}
    for pair in pairs:
        mask = (pair["moving"] > 0.05) | (pair["fixed"] > 0.05)
        warped, fields = register(model, pair["moving"], pair["fixed"], passes=passes or PASSES)
        scores["ncc"].append(float(ncc(warped[0], pair["fixed"], mask)))
        scores["folding_percent"].append(100 * float(folding_fraction(fields[0], mask)))
        if "field" in pair:
            scores["epe"].append(float(endpoint_error(fields[0], pair["field"], mask)))
    return {key: float(np.mean(values)) for key, values in scores.items() if values}


def init_checkpoint(source: str | None, config: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """``--init``: the weights (fp32 state dict) of the registration checkpoint ``source`` (a name or folder)
    and its ``training`` record, or ``None`` without one; its network must be the one ``config`` builds
    (one-line error naming the sizes that differ)."""
    if source is None:
        return None
    from ..io.checkpoint import load_checkpoint, resolve_checkpoint
    from ..medical.registration import RegistrationConfig

    tensors, record = load_checkpoint(resolve_checkpoint(source), expect={"architecture": ARCHITECTURE})
    theirs, ours = RegistrationConfig(**record["registration"]).to_dict(), config.to_dict()
    differing = [f"{key} {theirs[key]} (the run asks for {ours[key]})" for key in ours if theirs[key] != ours[key]]
    if differing:
        raise IDMError(f"--init {source} has {', '.join(differing)}: pass the checkpoint's sizes")
    return tensors, record.get("training", {})


def run(args: argparse.Namespace) -> int:
    from accelerate.utils import set_seed

    from ..medical.registration import Registration, RegistrationConfig, training_loss

    accelerator = new_accelerator(args.mixed_precision)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    for name in ("steps", "batch", "save_every", "base_channels"):
        if getattr(args, name) < 1:
            raise IDMError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.batch % world or args.lr <= 0:
        raise IDMError(f"--batch must split over the {world} processes and --lr be positive")
    nonnegative = (args.amplitude, args.augment, args.smooth, args.global_ncc)
    if not 0 <= args.synthetic <= 1 or min(nonnegative) < 0 or args.weight <= 0:
        raise IDMError("--synthetic must lie in [0, 1], --amplitude, --augment, --smooth and --global-ncc be >= 0 "
                       "and --weight > 0")
    run_dir = Path(args.out)
    state_path = checked_state_path(run_dir, args.resume)
    names, slices = load_slices(args.data, args.ndim)
    val_pairs = read_pairs(args.val) if args.val else None
    set_seed(args.seed)
    config = RegistrationConfig(architecture=args.arch, features=args.features, base_channels=args.base_channels,
                                channel_mults=args.channel_mults, code_channels=args.code_channels, ndim=args.ndim)
    model = Registration(config)
    init = init_checkpoint(args.init, config)
    if init is not None and not args.resume:  # a resumed run reads its own state below
        model.load_state_dict(init[0])
    if any(size % model.size_multiple for size in slices.shape[2:]):
        raise IDMError(f"training images {tuple(slices.shape[2:])} must be multiples of {model.size_multiple}")
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, args.warmup, args.steps))
    progress = Progress(command=command_line("train.registration", args, (*TRAJECTORY_OPTIONS, "val", "out")))
    if args.resume:
        older = {"code_channels": 1, "ndim": 2, "augment": 0.0, "global_ncc": 0.0, "init": None}  # added since
        state = load_run_state(state_path, args, TRAJECTORY_OPTIONS, added=older)
        model.load_state_dict(state["model"])
        progress = resume_progress(state, accelerator, optimizer, scheduler, logs=[run_dir / LOG_FILE])
    model, optimizer = accelerator.prepare(model, optimizer)
    pairs = PairSampler(names, slices, length=args.steps * args.batch, seed=args.seed, synthetic=args.synthetic,
                        amplitude=args.amplitude, augment=args.augment)
    loader = step_loader(pairs, args, progress.step, accelerator)
    noise_gen = torch.Generator()
    net = accelerator.unwrap_model(model)
    model.train()

    def step_fn(batch: torch.Tensor, step: int) -> dict[str, Any]:
        batch = batch.to(device)
        noise_gen.manual_seed((args.seed * 1_000_003 + step) * world + rank)
        loss, parts = training_loss(net, batch[:, :1], batch[:, 1:], weight=args.weight, smooth=args.smooth,
                                    global_ncc=args.global_ncc, generator=noise_gen)
        lr = optimizer_step(accelerator, model, optimizer, scheduler, loss, args.grad_clip)
        return {"loss": mean_loss(accelerator, loss, step + 1), "lr": lr, **parts}

    def save(step: int, wall: float) -> None:
        save_training_state(state_path, accelerator, progress, step=step, wall_time=wall,
                            args=trajectory_args(args, TRAJECTORY_OPTIONS), optimizer=optimizer,
                            scheduler=scheduler, model=net.state_dict())

    end = run_steps(args, accelerator, progress, resumed_batches(loader, progress.rng), step_fn, save,
                    log_path=run_dir / LOG_FILE, desc=args.arch)
    if not end.ready_to_export(args, accelerator, when_out_of_time=True):
        return 0
    if accelerator.is_main_process:
        net.eval()
        scores = evaluate(net, val_pairs) if val_pairs else None
        summary = RunSummary(progress.command, hardware(world, device), end.wall_time, progress.resumes,
                             final_loss(run_dir / LOG_FILE))
        export(net, export_directory(args), args, summary, len(names), end.step, scores,
               init_training=init[1] if init else None)
        accelerator.print(f"exported the {args.arch} network after {end.step} steps to {export_directory(args)}"
                          + (f" (held-out NCC {scores['ncc']:.4f})" if scores else ""))
    return 0


def export(model: Any, directory: Path, args: argparse.Namespace, summary: RunSummary, num_slices: int,
           steps_done: int, scores: dict[str, float] | None, init_training: dict[str, Any] | None = None) -> Path:
    """The registration network as a checkpoint: safetensors weights, config and model card; ``init_training``
    is the ``training`` record of the ``--init`` checkpoint this run continued."""
    from ..io.checkpoint import save_checkpoint
    from ..medical.registration import PASSES
    from .common import EXPORT_DTYPES

    title = "DiffuseMorph (diffusion code + field network)" if args.arch == "ddm" else "VoxelMorph-style field network"
    config = {"architecture": ARCHITECTURE, "registration": model.config.to_dict(), "value_range": [0, 1],
              "displacement_units": "pixels", "validation": scores,
              "training": {**summary.fields(), "steps": steps_done, "batch": args.batch, "data": str(args.data),
                           "num_slices": num_slices, "weight": args.weight, "smooth": args.smooth,
                           "synthetic": args.synthetic, "amplitude": args.amplitude, "augment": args.augment,
                           "global_ncc": args.global_ncc, "seed": args.seed}}
    before, before_wall, earlier = 0, 0.0, []
    if init_training is not None:  # the --init chain, oldest run first
        before = init_training["steps"] + init_training.get("init_steps_before", 0)
        before_wall = init_training["wall_time_s"] + init_training.get("init_wall_time_s_before", 0.0)
        earlier = [*init_training.get("init_commands", []), init_training["command"]]
        config["training"].update(init=str(args.init), init_steps_before=before, init_wall_time_s_before=before_wall,
                                  init_commands=earlier)
    measured = (["", "## Measured (held-out pairs)", "",
                 f"`{args.val}`, {PASSES} passes (`idm register`'s default): NCC {scores['ncc']:.4f}"
                 + (f", endpoint error {scores['epe']:.3f} px (synthetic pairs)" if "epe" in scores else "")
                 + f", folding {scores['folding_percent']:.3f} % of brain pixels; `idm bench registration` compares "
                 "it with the other methods (docs/registration.md)."] if scores else [])
    data = (f"{num_slices} slices (2 mm, 128²: three T1 brain templates at matched depths and 6 BraTS slices of one "
            "subject; `python -m train.registration_slices`)" if args.ndim == 2 else
            f"{num_slices} volumes (4 mm, 48 × 64 × 48: the Colin27 and MNI152 T1 templates, ICBM152 held out; "
            "`python -m train.registration_volumes`)")
    augmented = f", each image warped by its own random field up to {args.augment:g} px" if args.augment else ""
    global_term = f" − {args.global_ncc:g} NCC" if args.global_ncc else ""
    continued = (f" Continued from `{args.init}` ({before} steps in {len(earlier)} earlier run(s), "
                 f"{before_wall / 60:.1f} min): this run's {steps_done} steps used a new optimizer, warm-up and cosine; "
                 "the wall time below is this run's." if init_training is not None else "")
    chain = ["", "Earlier runs (`--init`), oldest first:", "", "```", *earlier, "```"] if earlier else []
    card = "\n".join([
        f"# {args.arch}: {args.ndim}-D brain registration, {title}", "",
        f"`idm.medical.registration.Registration` {model.config.to_dict()}: displacement (pixels) registering a "
        f"moving {'2-D slice' if args.ndim == 2 else '3-D volume'} to a fixed one (`idm register`). Trained on {data}, "
        f"{steps_done} × {args.batch} pairs ({args.synthetic:.0%} synthetic smooth warps up to {args.amplitude:g} px, "
        f"the rest inter-subject{augmented}). "
        f"Small data: {'three' if args.ndim == 2 else 'two'} brains.{continued}", "",
        "| | |", "|---|---|", f"| steps x batch | {steps_done} x {args.batch}"
        + (f" (+ {before} before, `--init`)" if before else "") + " |",
        f"| loss | L1 noise term (ddm) + {args.weight:g} (−NCC₉{global_term} + {args.smooth:g} ‖∇u‖²) |",
        *summary.card_rows(), *chain, *summary.command_lines(), *measured])
    return save_checkpoint(directory, model.state_dict(), config, card, dtype=EXPORT_DTYPES[args.export_dtype])


def load_registration(source: str | Path, device: str | torch.device = "cpu") -> Any:
    """A registration checkpoint (:func:`export`; a folder or a shipped name such as ``ddm-brain``) as an
    eval-mode :class:`~idm.medical.registration.Registration`."""
    from ..io.checkpoint import load_model
    from ..medical.registration import Registration, RegistrationConfig

    return load_model(source, ARCHITECTURE, lambda config: Registration(RegistrationConfig(**config["registration"])), device)


main = script_main(MODULE)


if __name__ == "__main__":
    sys.exit(main())
