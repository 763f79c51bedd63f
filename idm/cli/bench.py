"""``idm bench <name>``: benchmarks. Each lives in its own module ``idm.bench.<name>`` defining
``add_arguments(parser)`` and ``run_cli(args) -> int``; this command only dispatches."""

from __future__ import annotations

import argparse

import importlib

#: benchmark name → (module, one-line help)
BENCHES: dict[str, tuple[str, str]] = {
    "anomaly": ("idm.bench.anomaly", "classifier-guided anomaly detection: Dice and pixel AUROC against the unguided baseline"),
    "hagan": ("idm.bench.hagan", "HA-GAN generated volumes against real ones (intensity, mid-plane histograms) and encoder PSNR"),
    "memory": ("idm.bench.memory", "training-step memory and time of a T-step sampler per memory mode"),
    "quality": ("idm.bench.quality", "reconstruction quality of the methods"),
    "registration": ("idm.bench.registration", "deformable registration: DiffuseMorph vs VoxelMorph-style vs demons (NCC, EPE, folding, s)"),
    "speed": ("idm.bench.speed", "reconstruction speed of the methods"),
    "translation": ("idm.bench.translation", "cross-modality translation (T1 → T2) against the real paired target"),
    "uncertainty": ("idm.bench.uncertainty", "does a method's per-pixel std point at its errors (Spearman, calibration)"),
}


def add_parser(subparsers: argparse._SubParsersAction, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("bench", help=help_text)
    benches = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name, (module_name, bench_help) in BENCHES.items():
        module = importlib.import_module(module_name)
        sub = benches.add_parser(name, help=bench_help, description=(module.__doc__ or "").splitlines()[0] or None)
        module.add_arguments(sub)
        sub.set_defaults(func=module.run_cli)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:  # only reached if no benchmark was chosen
    raise SystemExit("choose a benchmark, e.g. idm bench memory --help")
