"""``idm bench memory --model hagan``: peak training-iteration memory of HA-GAN against a full-resolution
3D GAN of the same generator widths, per output size (:mod:`idm.generative.hagan`).

One row per (model, size, sub-volume, factor). ``peak_bytes`` is :func:`idm.bench.accounting.peak_memory_bytes`
of one whole training iteration, as :mod:`idm.bench.memory` measures an IDM step: tensor memory allocated
above what was allocated when it began (weights and the real batch are allocated before and excluded; the
parameter gradients the iteration creates are included). The iteration is

* ``hagan``: ``L_D`` backward (discriminators), ``L_G`` backward (generator), ``L_{E^H}`` and ``L_{E^G}``
  backward (encoders) — the four steps of :mod:`idm.training.hagan`, each into its own parameters;
* ``full``: the same generator (trunk + head) on the whole volume at once and one discriminator of
  ``D^H``'s architecture on the whole volume: ``L_D`` backward, then ``L_G`` backward.

The full GAN is measured only where it fits: on CUDA an out-of-memory error ends it (the row says so); on the
CPU a size is skipped when the previous size's peak × 8 exceeds ``--budget-gib`` (each doubling of the side
is 8× the voxels). ``seconds_per_step``: the fastest of ``--repeats`` unprofiled iterations after the
profiled one. Results: docs/hagan.md.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import IDMError
from ..io.atomic import save_figure
from .accounting import peak_memory_bytes, time_call

TABLE_HEADER = (f"{'model':<10} {'size':>5} {'sub':>5} {'factor':>6} {'low':>5} {'batch':>5} {'peak MiB':>12} "
                f"{'s/step':>10}  note")


def add_hagan_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``--model hagan`` (``--size``, ``--batch``, ``--device``, ``--repeats``, ``--seed``,
    ``--threads``, ``--json``, ``--plot`` are shared with the IDM study)."""
    group = parser.add_argument_group("--model hagan")
    group.add_argument("--factor", type=int, nargs="+", default=[4, 8], metavar="S",
                       help="HA-GAN factors s between the low and high resolution (default 4 8; 4 is the paper's)")
    group.add_argument("--sub", type=int, nargs="+", default=[32], metavar="PX",
                       help="cubic high-resolution sub-volume sides (default 32; clipped to the size)")
    group.add_argument("--top-width", type=int, default=4, help="generator width at full resolution (default 4)")
    group.add_argument("--max-width", type=int, default=64, help="largest generator width (default 64)")
    group.add_argument("--latent-dim", type=int, default=128, help="latent size (default 128)")
    group.add_argument("--budget-gib", type=float, default=4.0,
                       help="CPU: skip the full GAN at a size whose predicted peak exceeds this (default 4)")


def _config(size: int, sub: int, factor: int, args: argparse.Namespace) -> Any:
    from ..generative.hagan import HAGANConfig

    return HAGANConfig(shape=(size,) * 3, factor=factor, sub_shape=(min(sub, size),) * 3,
                       latent_dim=args.latent_dim, top_width=args.top_width, max_width=args.max_width)


def hagan_iteration(config: Any, device: torch.device, batch: int, seed: int) -> tuple[list[torch.nn.Module], Callable[[], None]]:
    """The modules and one training iteration (no optimizer step) of HA-GAN of ``config``."""
    from ..generative.hagan import (HAGAN, Discriminators, discriminator_loss, encoder_global_loss,
                                    encoder_high_loss, generator_loss)

    torch.manual_seed(seed)
    model, disc = HAGAN(config).to(device).train(), Discriminators(config).to(device).train()
    gen = torch.Generator().manual_seed(seed)
    real = (torch.rand((batch, 1, *config.shape), generator=gen) * 2 - 1).to(device)
    z = torch.randn((batch, config.latent_dim), generator=gen).to(device)
    start = model.sample_position(gen)
    parts = {"d": list(disc.parameters()), "g": list(model.generator.parameters()),
             "eh": list(model.encoder_high.parameters()), "eg": list(model.encoder_global.parameters())}

    def iteration() -> None:
        discriminator_loss(model, disc, real, z, start).backward(inputs=parts["d"])
        generator_loss(model, disc, z, start).backward(inputs=parts["g"])
        encoder_high_loss(model, real, start).backward(inputs=parts["eh"])
        encoder_global_loss(model, real, start).backward(inputs=parts["eg"])

    return [model, disc], iteration


def full_iteration(config: Any, device: torch.device, batch: int, seed: int) -> tuple[list[torch.nn.Module], Callable[[], None]]:
    """The modules and one training iteration of the full-resolution GAN with HA-GAN's generator widths."""
    from ..generative.hagan import HAGAN, Discriminator, full_gan_losses

    torch.manual_seed(seed)
    model = HAGAN(config).to(device).train()
    disc = Discriminator(config.shape, config.d_width, config.max_width, positional=True).to(device).train()
    gen = torch.Generator().manual_seed(seed)
    real = (torch.rand((batch, 1, *config.shape), generator=gen) * 2 - 1).to(device)
    z = torch.randn((batch, config.latent_dim), generator=gen).to(device)
    d_params, g_params = list(disc.parameters()), list(model.generator.parameters())

    def iteration() -> None:
        d_loss, g_loss = full_gan_losses(model, disc, real, z)
        d_loss.backward(inputs=d_params)
        del d_loss
        g_loss.backward(inputs=g_params)

    return [model, disc], iteration


def measure(build: Callable[..., Any], config: Any, device: torch.device, batch: int, seed: int,
            repeats: int) -> tuple[int, float]:
    """``(peak_bytes, seconds)`` of one iteration built by ``build``."""
    modules, iteration = build(config, device, batch, seed)

    def step() -> None:
        for module in modules:
            module.zero_grad(set_to_none=True)
        iteration()

    for module in modules:
        module.zero_grad(set_to_none=True)
    peak = peak_memory_bytes(iteration, device)
    seconds = time_call(step, device, repeats)
    modules.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return int(peak), float(seconds)


def format_row(row: dict[str, Any]) -> str:
    peak = f"{row['peak_bytes'] / 2**20:>12.2f}" if row["peak_bytes"] is not None else f"{'—':>12}"
    seconds = f"{row['seconds_per_step']:>10.3f}" if row["seconds_per_step"] is not None else f"{'—':>10}"
    return (f"{row['model']:<10} {row['size']:>5} {row['sub'] or '—':>5} {row['factor'] or '—':>6} "
            f"{row['low'] or '—':>5} {row['batch']:>5} {peak} {seconds}  {row.get('note', '')}")


def run_hagan_bench(*, sizes: list[int], subs: list[int], factors: list[int], batch: int, device: torch.device,
                    args: argparse.Namespace, progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every (size, factor, sub) of HA-GAN and the full GAN at each size (until it no longer fits):
    ``{"device", "model": "hagan", "rows": [...]}``."""
    rows: list[dict[str, Any]] = []
    full_stopped: str | None = None
    last_full: tuple[int, int] | None = None

    def add(row: dict[str, Any]) -> None:
        rows.append(row)
        if progress is not None:
            progress(row)

    for size in sizes:
        for factor in factors:
            for sub in subs:
                config = _config(size, sub, factor, args)
                peak, seconds = measure(hagan_iteration, config, device, batch, args.seed, args.repeats)
                add({"model": f"hagan-s{factor}", "size": size, "sub": config.sub_shape[0], "factor": factor,
                     "low": config.low_shape[0], "batch": batch, "peak_bytes": peak, "seconds_per_step": seconds})
        config = _config(size, size, factors[0], args)  # same generator widths (its trunk + head: all levels)
        row: dict[str, Any] = {"model": "full", "size": size, "sub": None, "factor": None, "low": None, "batch": batch,
                               "peak_bytes": None, "seconds_per_step": None}
        if full_stopped is not None:
            row["note"] = full_stopped
        elif device.type == "cpu" and last_full is not None and \
                last_full[1] * (size / last_full[0]) ** 3 > args.budget_gib * 2**30:
            predicted = last_full[1] * (size / last_full[0]) ** 3 / 2**30
            full_stopped = row["note"] = (f"not run: predicted {predicted:.1f} GiB > --budget-gib {args.budget_gib:g} "
                                          f"(from {last_full[0]}³ × 8 per doubling)")
        else:
            try:
                row["peak_bytes"], row["seconds_per_step"] = measure(full_iteration, config, device, batch,
                                                                     args.seed, args.repeats)
                last_full = (size, row["peak_bytes"])
            except torch.cuda.OutOfMemoryError:
                gc.collect()
                torch.cuda.empty_cache()
                full_stopped = row["note"] = f"out of memory on {device}"
        add(row)
    return {"device": str(device), "model": "hagan", "rows": rows,
            "widths": {"top_width": args.top_width, "max_width": args.max_width, "latent_dim": args.latent_dim}}


def format_summary(rows: list[dict[str, Any]]) -> list[str]:
    """HA-GAN's largest size against the full GAN at each measured size, and where the full GAN stopped."""
    lines = []
    full = {r["size"]: r["peak_bytes"] for r in rows if r["model"] == "full" and r["peak_bytes"] is not None}
    stopped = [r for r in rows if r["model"] == "full" and r["peak_bytes"] is None]
    if stopped:
        lines.append(f"full GAN stops at {stopped[0]['size']}³: {stopped[0].get('note', '')}")
    for model in sorted({r["model"] for r in rows if r["model"] != "full"}):
        mine = [r for r in rows if r["model"] == model]
        top = max(mine, key=lambda r: (r["size"], -r["sub"]))
        fits = [s for s, b in sorted(full.items()) if top["peak_bytes"] <= b]
        lines.append(f"{model} at {top['size']}³ (sub {top['sub']}³): {top['peak_bytes'] / 2**20:.1f} MiB"
                     + (f" <= the full GAN at {fits[0]}³ ({full[fits[0]] / 2**20:.1f} MiB)" if fits else
                        " > the full GAN at every measured size"))
    return lines


def write_plot(path: str | Path, result: dict[str, Any]) -> None:
    """PNG of peak memory (MiB, log scale) against the output side, one line per model / sub-volume."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    rows = [r for r in result["rows"] if r["peak_bytes"] is not None]
    for key in sorted({(r["model"], r["sub"]) for r in rows}, key=str):
        points = sorted((r["size"], r["peak_bytes"] / 2**20) for r in rows if (r["model"], r["sub"]) == key)
        label = key[0] if key[1] is None else f"{key[0]}, sub {key[1]}³"
        ax.plot(*zip(*points), marker="o", linestyle="-" if key[0] == "full" else "--", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    sizes = sorted({r["size"] for r in result["rows"]})
    ax.set_xticks(sizes, [f"{s}³" for s in sizes])
    ax.set_xlabel("output volume")
    ax.set_ylabel("peak training-iteration memory (MiB)")
    ax.set_title(f"HA-GAN vs full-resolution 3D GAN, {result['device']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=100)


def run_cli(args: argparse.Namespace) -> int:
    from .memory import checked_device, write_outputs

    sizes = args.size or [32, 64, 128, 256]
    if args.batch < 1 or args.repeats < 1:
        raise IDMError("--batch and --repeats must be >= 1")
    if min(args.sub) < 1 or args.budget_gib <= 0:
        raise IDMError("--sub must be >= 1 and --budget-gib > 0")
    for factor in args.factor:
        for size in sizes:
            for sub in args.sub:
                _config(size, sub, factor, args)  # one-line IDMError for a size / sub / factor that does not fit
    device = checked_device(args)
    print(f"HA-GAN vs full-resolution 3D GAN (generator widths min({args.max_width}, {args.top_width}·2^level), "
          f"latent {args.latent_dim}); device {device} ({torch.get_num_threads()} threads); peak = tensor bytes "
          "allocated by one training iteration above the start (parameter gradients included)")
    print(TABLE_HEADER)
    result = run_hagan_bench(sizes=sizes, subs=args.sub, factors=args.factor, batch=args.batch, device=device,
                             args=args, progress=lambda row: print(format_row(row), flush=True))
    return write_outputs(args, result, format_summary(result["rows"]), write_plot)


__all__ = ["add_hagan_arguments", "run_cli", "run_hagan_bench"]
