"""``idm bench memory``: training-step memory and time of a T-step sampler, four memory modes.

Modes (same network and same numbers in every mode, only the way gradients are obtained differs):

* ``vanilla`` — plain autograd through all T steps and the whole U-Net;
* ``checkpoint`` — :func:`torch.utils.checkpoint.checkpoint` around each sampling step;
* ``invertible-steps`` — level 1 only: the steps form a reversible sequence, the U-Net inside a
  step is run with plain autograd when the step is recomputed;
* ``invertible`` — both levels: reversible steps and the reversible U-Net (shape-changing layers
  checkpointed).

A row's ``peak_bytes`` is :func:`idm.bench.accounting.peak_memory_bytes` of one training step
(forward + loss + backward) — tensor memory allocated during the step above what was allocated
when it started; weights, optimiser state and the batch are allocated before and excluded, the
parameter gradients the step creates are included (identical in every mode). ``seconds_per_step``
is the fastest of ``repeats`` unprofiled steps, measured after the profiled one (the warm-up).

The network is always the real :class:`~idm.network.IDMNet` (block CS at 10 %, L1 loss against
the batch), built for each case with T = the case's steps either from a prior (``--prior``: a
prior checkpoint, a denoiser, a local diffusers folder or an ``hf:`` id) or, without a checkpoint,
around an untrained U-Net of a preset size (``--unet-config``: how memory scales with the U-Net).
The weights are put in ``memory_format`` (default channels-last) in every mode, see
:func:`measure_case`. Measured tables and what remains at the peak: ``docs/memory.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..errors import IDMError
from ..invertible import set_memory_mode
from ..invertible.diffusers import PRUNE_PRESETS
from ..io.atomic import atomic_write, save_figure
from ..priors.unet import UNetConfig
from .accounting import peak_memory_bytes, time_call

BENCH_MODES: tuple[str, ...] = ("vanilla", "checkpoint", "invertible-steps", "invertible")

#: U-Net presets for the benchmark (``"prior"`` = the default :class:`UNetConfig`)
UNET_PRESETS: dict[str, UNetConfig] = {
    "tiny": UNetConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(1,), groups=4),
    "small": UNetConfig(base_channels=32, channel_mults=(1, 2, 2, 2), num_res_blocks=2, attention_levels=(2,)),
    "prior": UNetConfig(),
}


@dataclass(frozen=True)
class MemoryCase:
    """One benchmark configuration: memory ``mode``, sampler ``steps`` T, image ``size``, ``batch``."""

    mode: str
    steps: int
    size: int
    batch: int


@dataclass
class TrainingSetup:
    """What a factory returns: the ``model`` (its parameters get gradients) and ``loss()``, which
    runs the forward pass on a batch allocated by the factory and returns a scalar loss."""

    model: nn.Module
    loss: Callable[[], torch.Tensor]


ModelFactory = Callable[[MemoryCase, torch.device], TrainingSetup]


def apply_mode(model: nn.Module, sampler: nn.Module, mode: str) -> None:
    """Configure ``model`` (containing the level-1 ``sampler``) for benchmark ``mode``."""
    if mode not in BENCH_MODES:
        raise IDMError(f"unknown memory mode {mode!r}; choose from {', '.join(BENCH_MODES)}")
    set_memory_mode(model, "reversible" if mode == "invertible" else "plain")
    sampler.memory_mode = {"vanilla": "plain", "checkpoint": "checkpoint"}.get(mode, "reversible")


def idm_factory(source: Any, *, seed: int = 0, ratio: float = 0.1, prune: dict[str, Any] | None = None) -> ModelFactory:
    """Factory of IDM fine-tuning steps (:class:`~idm.network.IDMNet` with T = the case's steps;
    scrambled block CS at ``ratio``, L1 loss), i.e. what ``idm finetune`` trains.

    ``source``: a :class:`~idm.priors.unet.UNetConfig` (an untrained U-Net of that shape, the
    default architecture otherwise), a prior loaded by :func:`~idm.network.load_idm_prior`, or its
    source (a prior checkpoint, a local diffusers folder or an explicit ``hf:`` id), loaded here
    once for all cases."""
    from ..network import IDMConfig, IDMNet, load_idm_prior
    from ..physics import BlockCS

    if isinstance(source, (str, os.PathLike)):
        source = load_idm_prior(source)

    def build(case: MemoryCase, device: torch.device) -> TrainingSetup:
        torch.manual_seed(seed)
        if isinstance(source, UNetConfig):
            model = IDMNet(None, IDMConfig(unet=source, steps=case.steps))
        else:
            model = IDMNet.from_prior(source, prune=prune, steps=case.steps)
        model = model.to(device).train()
        apply_mode(model, model.sampler, case.mode)
        generator = torch.Generator().manual_seed(seed)
        x = torch.rand((case.batch, model.config.channels, case.size, case.size), generator=generator).to(device)
        op = BlockCS((case.size, case.size), ratio, block_size=min(32, case.size), seed=seed)
        y = op.A(x)

        def loss() -> torch.Tensor:
            return (model(y, op) - x).abs().mean()

        return TrainingSetup(model, loss)

    return build


#: ``--memory-format`` name → torch memory format of the network's weights (activations follow)
MEMORY_FORMATS: dict[str, torch.memory_format] = {
    "channels_last": torch.channels_last,
    "contiguous": torch.contiguous_format,
}


def measure_case(case: MemoryCase, factory: ModelFactory, device: torch.device, repeats: int = 1,
                 memory_format: str = "channels_last") -> dict[str, Any]:
    """One benchmark row: ``{"mode", "steps", "size", "batch", "peak_bytes", "seconds_per_step"}``.

    ``memory_format`` applies to the network's 4-D weights; convolutions then produce activations in
    that format. ``channels_last`` is oneDNN's native layout on CPU: with NCHW (``contiguous``)
    tensors every convolution backward reorders its input and gradients into temporary buffers the
    size of those maps (docs/memory.md).
    """
    if memory_format not in MEMORY_FORMATS:
        raise IDMError(f"unknown memory format {memory_format!r}; choose from {', '.join(MEMORY_FORMATS)}")
    setup = factory(case, device)
    setup.model.to(memory_format=MEMORY_FORMATS[memory_format])

    def train_step() -> None:
        setup.model.zero_grad(set_to_none=True)
        setup.loss().backward()

    setup.model.zero_grad(set_to_none=True)
    peak = peak_memory_bytes(lambda: setup.loss().backward(), device)
    seconds = time_call(train_step, device, repeats)
    del setup
    gc.collect()
    return {**asdict(case), "peak_bytes": int(peak), "seconds_per_step": float(seconds)}


def run_memory_bench(
    *,
    steps: Iterable[int],
    sizes: Iterable[int],
    modes: Iterable[str],
    batch: int,
    device: torch.device | str,
    factory: ModelFactory,
    repeats: int = 1,
    memory_format: str = "channels_last",
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Measure every (size, steps, mode); returns ``{"device": str, "rows": [...]}`` (the issue's shape; the
    memory format is printed in the table's header line, not stored)."""
    device = torch.device(device)
    modes = list(modes)
    for mode in modes:
        if mode not in BENCH_MODES:
            raise IDMError(f"unknown memory mode {mode!r}; choose from {', '.join(BENCH_MODES)}")
    rows = []
    for size in sizes:
        for t in steps:
            for mode in modes:
                row = measure_case(MemoryCase(mode, int(t), int(size), int(batch)), factory, device, repeats,
                                   memory_format)
                rows.append(row)
                if progress is not None:
                    progress(row)
    return {"device": str(device), "rows": rows}


def format_row(row: dict[str, Any]) -> str:
    return (
        f"{row['mode']:<17} {row['steps']:>5} {row['size']:>5} {row['batch']:>5} "
        f"{row['peak_bytes'] / 2**20:>12.2f} {row['seconds_per_step']:>10.3f}"
    )


TABLE_HEADER = f"{'mode':<17} {'steps':>5} {'size':>5} {'batch':>5} {'peak MiB':>12} {'s/step':>10}"


def format_summary(rows: list[dict[str, Any]]) -> list[str]:
    """Per (size, steps): memory saving and time ratio of each mode relative to ``vanilla``."""
    lines = []
    vanilla = {(r["size"], r["steps"], r["batch"]): r for r in rows if r["mode"] == "vanilla"}
    for row in rows:
        ref = vanilla.get((row["size"], row["steps"], row["batch"]))
        if ref is None or row is ref or ref["peak_bytes"] == 0:
            continue
        saving = 1 - row["peak_bytes"] / ref["peak_bytes"]
        speed = row["seconds_per_step"] / ref["seconds_per_step"] if ref["seconds_per_step"] > 0 else float("nan")
        lines.append(
            f"size {row['size']} T={row['steps']} {row['mode']}: {100 * saving:.1f}% less memory, "
            f"{speed:.2f}x the time of vanilla"
        )
    return lines


def write_json(path: str | Path, result: dict[str, Any]) -> None:
    with atomic_write(path, mode="w") as handle:
        json.dump(result, handle, indent=2)
        handle.write("\n")


_PLOT_STYLES: dict[str, dict[str, Any]] = {
    "vanilla": {"marker": "o"},
    "checkpoint": {"marker": "s", "linestyle": "--", "markersize": 8, "markerfacecolor": "none"},
    "invertible-steps": {"marker": "^", "linestyle": ":"},
    "invertible": {"marker": "o"},
}


def write_plot(path: str | Path, result: dict[str, Any]) -> None:
    """PNG of peak memory (MiB) vs steps, one line per mode (one panel per image size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    sizes = sorted({r["size"] for r in rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for mode in BENCH_MODES:
            points = sorted((r["steps"], r["peak_bytes"] / 2**20) for r in rows if r["mode"] == mode and r["size"] == size)
            if points:  # checkpoint and invertible-steps often coincide: distinct line styles
                ax.plot(*zip(*points), label=mode, **_PLOT_STYLES.get(mode, {}))
        ax.set_xlabel("sampling steps T")
        ax.set_ylabel("peak training-step memory (MiB)")
        ax.set_title(f"{size}x{size}, {result['device']}")
        ax.grid(True, alpha=0.3)
        ax.legend()
    save_figure(fig, path, dpi=100)


def resolve_unet_config(name: str) -> UNetConfig:
    """A preset name (:data:`UNET_PRESETS`) or a JSON file holding a ``UNetConfig`` dict."""
    if name in UNET_PRESETS:
        return UNET_PRESETS[name]
    path = Path(name)
    if path.suffix == ".json":
        try:
            return UNetConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError as error:
            raise IDMError(f"U-Net config {path} is not valid JSON: {error}") from None
    raise IDMError(f"unknown U-Net config {name!r}; use one of {', '.join(UNET_PRESETS)} or a .json file")


# --- command line (``idm bench memory``) --------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=("idm", "hagan"), default="idm",
                        help="idm (default): the IDM network per memory mode; hagan: HA-GAN against a full-resolution "
                        "3D GAN per volume size (idm.bench.memory_hagan, its options below)")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8], metavar="T",
                        help="sampler step counts T (default 1 2 3 4 6 8)")
    parser.add_argument("--size", type=int, nargs="+", metavar="PX",
                        help="square image sides in pixels (default 128; --model hagan: cubic volume sides, "
                        "default 32 64 128 256)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument("--modes", nargs="+", default=list(BENCH_MODES), choices=BENCH_MODES, metavar="MODE",
                        help=f"memory modes (default all: {' '.join(BENCH_MODES)})")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument("--prior", help="train the IDM network (block CS 10%%, T = --steps) built from this prior — "
                        "a prior or denoiser checkpoint (e.g. prior-gray, dncnn-17), a local diffusers folder "
                        "(UNet2DModel or SD-style UNet2DConditionModel) or an explicit hf:ORG/NAME")
    parser.add_argument("--unet-config", default="small",
                        help=f"without --prior: the IDM network around an untrained U-Net of this preset "
                        f"({', '.join(UNET_PRESETS)}) or a JSON file of UNetConfig (default small, the shipped prior's shape)")
    parser.add_argument("--prune", choices=tuple(PRUNE_PRESETS),
                        help="diffusers --prior: pruning (default paper for UNet2DConditionModel, none for UNet2DModel)")
    parser.add_argument("--memory-format", default="channels_last", choices=tuple(MEMORY_FORMATS),
                        help="layout of weights and activations, the same in every mode (default channels_last, "
                        "oneDNN's native CPU layout; contiguous = NCHW)")
    parser.add_argument("--repeats", type=int, default=1, help="timed steps per configuration, the fastest is reported (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and batch (default 0)")
    parser.add_argument("--threads", type=int, help="CPU intra-op threads (default: torch's choice); 1 gives "
                        "stable timings on a loaded machine")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="write a PNG plot of memory vs steps")
    from .memory_hagan import add_hagan_arguments

    add_hagan_arguments(parser)


def write_outputs(args: argparse.Namespace, result: dict[str, Any], summary: list[str],
                  plot: Callable[[str | Path, dict[str, Any]], None]) -> int:
    """Print the ``summary`` lines of a memory study, write ``--json`` and ``--plot`` (with ``plot``); 0."""
    for line in summary:
        print(line)
    if args.json:
        write_json(args.json, result)
        print(f"results written to {args.json}")
    if args.plot:
        plot(args.plot, result)
        print(f"plot written to {args.plot}")
    return 0


def checked_device(args: argparse.Namespace) -> torch.device:
    """The memory study's ``--device`` (cpu or cuda, one-line :class:`IDMError` otherwise), after checking
    ``--plot`` (a .png) and applying ``--threads``; shared by ``--model idm`` and ``--model hagan``."""
    if args.plot and Path(args.plot).suffix.lower() != ".png":
        raise IDMError(f"--plot must name a .png file, got {args.plot}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise IDMError(f"unknown device {args.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise IDMError("--device cuda requested but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise IDMError(f"memory accounting supports cpu and cuda devices, got {args.device!r}")
    apply_threads(args)
    return device


def apply_threads(args: argparse.Namespace) -> None:
    """``torch.set_num_threads(args.threads)`` when ``--threads`` is given (one-line :class:`IDMError` below 1);
    shared by the memory and HA-GAN benches."""
    if args.threads is not None:
        if args.threads < 1:
            raise IDMError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)


def run_cli(args: argparse.Namespace) -> int:
    if args.model == "hagan":
        from .memory_hagan import run_cli as run_hagan

        return run_hagan(args)
    args.size = args.size or [128]
    if min(args.steps) < 1:
        raise IDMError(f"--steps must be >= 1, got {min(args.steps)}")
    if args.batch < 1 or args.repeats < 1:
        raise IDMError("--batch and --repeats must be >= 1")
    if args.prune is not None and args.prior is None:
        raise IDMError("--prune applies to a diffusers --prior only")
    if args.prior is not None:
        from ..invertible.diffusers import prune_preset
        from ..network import IDMNet, load_idm_prior

        prior, prune = load_idm_prior(args.prior), prune_preset(args.prune)
        probe = IDMNet.from_prior(prior, prune=prune, steps=1)
        multiple, params = probe.config.size_multiple, sum(p.numel() for p in probe.parameters())
        what = f"IDM network from {args.prior}"
        factory = idm_factory(prior, seed=args.seed, prune=prune)
        del probe
    else:
        from ..network import IDMConfig, IDMNet

        config = resolve_unet_config(args.unet_config)
        probe = IDMNet(None, IDMConfig(unet=config, steps=1))
        multiple, params = probe.config.size_multiple, sum(p.numel() for p in probe.parameters())
        what = f"IDM network around an untrained {args.unet_config} U-Net"
        factory = idm_factory(config, seed=args.seed)
        del probe
    bad = [s for s in args.size if s < 1 or s % multiple]
    if bad:
        raise IDMError(f"--size {bad[0]} must be a positive multiple of {multiple} for this network")
    device = checked_device(args)
    print(f"{what}: {params / 1e6:.2f}M parameters; device {device} "
          f"({torch.get_num_threads()} threads, {args.memory_format}); "
          "peak = tensor bytes allocated by one forward+backward above the start "
          "(parameter gradients included, same in every mode)")
    print(TABLE_HEADER)
    result = run_memory_bench(
        steps=args.steps, sizes=args.size, modes=args.modes, batch=args.batch, device=device,
        factory=factory, repeats=args.repeats, memory_format=args.memory_format,
        progress=lambda row: print(format_row(row), flush=True),
    )
    return write_outputs(args, result, format_summary(result["rows"]), write_plot)
