"""``idm bench quality --operator ct3d | mri3d``: methods on a whole volume, scored plane by plane.

The NIfTI volume ``--data`` (its axial slices ``--slices START:STOP``, default all) is measured slice
by slice (:func:`idm.evaluation.volume_problem`):

* ``ct3d``: parallel-beam CT of every axial slice, ``--views`` evenly spaced views (one case per
  number given, default 23) over ``--angles`` (default 0,180; e.g. ``--views 60 --angles 0,90`` for a
  90° limited angle), CT volumes in HU windowed to [0, 1];
* ``ct3d`` on raw projections (``--data`` a DXchange / TomoPy HDF5 file, e.g. the tooth micro-CT):
  every detector row is a slice (:func:`sinogram_problems`): the truth is the full-angle FBP of the
  measured sinogram, and each case keeps ``--views`` of its views, evenly spread over [0°, 180°) —
  real measurements, subsampled, not simulated ones;
* ``mri3d``: single-coil MRI with one 2D ``--mask`` (default ``poisson``: variable-density random
  samples) at each of ``--accelerations``, the same for every axial slice — with the readout along z
  this is 3D Cartesian compressed sensing undersampled along the two phase-encode axes (y, x): the
  unitary 1D Fourier transform along the fully sampled readout maps the 3D k-space to these
  per-slice 2D k-spaces, so both measure the same thing; the volume is divided by its largest value.

Every method gets the whole volume as one batch of slices (``mbir`` and ``idm`` run their networks on
chunks of it); default methods: ``fbp`` (CT) or ``pinv`` (MRI, zero-filled), ``tv`` run as 3D TV
(option ``volume=true``, unless ``--option tv.volume=false``), ``mbir`` twice — as configured, and
slice-wise (the same sampler without the z term, :func:`variants`; ``--no-slice-wise`` leaves it out)
— and for CT the shipped few-step ``idm`` (``idm-ct``; ``--option idm.volume=true`` couples its steps
by z-TV). Rows: PSNR (peak 1)
and SSIM per plane (:func:`idm.evaluation.plane_scores`: mean over the axial, coronal or sagittal
slices), seconds, and the peak resident memory above the start of the call
(:func:`idm.bench.accounting.peak_resident_bytes`)::

    {"operator": "ct3d", "volume": path, "slices": [start, stop], "shape": [D, H, W],
     "rows": [{"case", "method", "label", "options", "axial": {"psnr", "ssim"}, "coronal": ...,
               "sagittal": ..., "seconds", "peak_bytes"}]}

``--figure``: the middle axial, coronal and sagittal slice of the truth and of every method, per case.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import IDMError
from ..evaluation import PLANES, VolumeProblem, measure_volume, operator_factory, plane_scores, read_scaled_volume
from ..io.atomic import save_figure
from ..cli.reconstruct import check_finite_result
from ..zeroshot.mbir import mbir_defaults
from .accounting import peak_memory_bytes, peak_resident_bytes
from .methods import MethodChoice, build_method, choose_methods
from .quality import IMAGE_DEFAULTS

#: default methods per volume operator
VOLUME_METHODS: dict[str, tuple[str, ...]] = {"ct3d": ("fbp", "tv", "mbir", "idm"), "mri3d": ("pinv", "tv", "mbir")}


@dataclass
class VolumeRow:
    """One method on one case: its label, options, scores per plane, seconds, peak memory and the
    middle slice of each plane (for the figure)."""

    case: str
    method: str
    label: str
    options: dict[str, Any]
    scores: dict[str, dict[str, float]]
    seconds: float
    peak_bytes: int | None
    planes: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"case": self.case, "method": self.method, "label": self.label, "options": self.options,
                **self.scores, "seconds": self.seconds, "peak_bytes": self.peak_bytes}


def parse_slices(text: str | None) -> tuple[int, int] | None:
    """``"START:STOP"`` → ``(start, stop)`` (None stays None)."""
    if text is None:
        return None
    try:
        start, stop = (int(part) for part in text.split(":"))
    except ValueError:
        raise IDMError(f"--slices takes START:STOP (axial slice indices, e.g. 40:48), got {text!r}") from None
    return start, stop


def sinogram_problems(path: str, views: list[int], binning: int = 1) -> dict[str, VolumeProblem]:
    """Cases of real projections: the sinogram of ``path`` (:func:`idm.io.medical.read_sinogram`;
    ``binning`` adjacent detector cells averaged, the rotation axis found on the middle row and moved
    to the middle cell: :func:`idm.cli.reconstruct.centred_sinogram`), the truth its full-angle FBP on
    the D × D grid scaled so that its 99.9th percentile is 0.9 (clipped to [0, 1]; the measurements are
    scaled alike), and per number of views the ``ParallelBeamCT`` of the views nearest to
    ``k · 180° / n`` with their measured data."""
    from ..cli.reconstruct import centred_sinogram
    from ..io.medical import read_sinogram
    from ..physics import ParallelBeamCT

    sinogram = read_sinogram(path)
    angles = sinogram.angles.double()
    data, _ = centred_sinogram(sinogram.data.double(), angles, binning)  # (views, rows, D)
    detectors = data.shape[2]
    y_full = data.permute(1, 0, 2)[:, None].float().contiguous()  # (rows, 1, views, D)
    full = ParallelBeamCT((detectors, detectors), angles=angles.tolist(), detectors=detectors)
    reference = full.crop(full.fbp(y_full))
    scale = 0.9 / float(torch.quantile(reference.flatten()[:: max(1, reference.numel() // 2**22)], 0.999))
    truth = (reference * scale).clamp(0, 1)
    problems = {}
    for count in views:
        targets = torch.arange(count, dtype=torch.float64) * 180.0 / count + float(angles.min())
        index = (angles[None, :] - targets[:, None]).abs().argmin(dim=1).unique()
        op = ParallelBeamCT((detectors, detectors), angles=angles[index].tolist(), detectors=detectors)
        problems[f"{index.numel()} of {angles.numel()} measured views"] = VolumeProblem(
            truth, op, (y_full[:, :, index] * scale).contiguous())
    return problems


def middle_planes(volume: torch.Tensor) -> dict[str, torch.Tensor]:
    """The middle slice ``(rows, cols)`` of each plane of a ``(D, 1, H, W)`` volume (magnitude if
    complex), turned for display: anterior up on the axial slice, superior up on the others."""
    volume = (volume.abs() if volume.is_complex() else volume).float()[:, 0]
    d, h, w = volume.shape
    return {"axial": volume[d // 2].flip(0), "coronal": volume[:, h // 2, :].flip(0),
            "sagittal": volume[:, :, w // 2].flip(0)}


def variants(choice: MethodChoice, slice_wise: bool, op: Any) -> list[tuple[str, dict[str, Any]]]:
    """``(label, options)`` runs of one method: ``tv`` as 3D TV unless told otherwise; ``mbir`` with its
    λ, ρ for ``op`` filled in (:func:`~idm.zeroshot.mbir.mbir_defaults`, as the method does) and, with
    ``slice_wise``, once more without the z term (``lam=0`` and ``rho`` at its floor 1e-9: the x-update
    is then the plain data-consistency step, so nothing couples the slices)."""
    options = dict(choice.options)
    if choice.name == "tv":
        options.setdefault("volume", True)
        return [("tv (3D)" if options["volume"] else "tv (slice-wise)", options)]
    if choice.name != "mbir":
        return [(choice.name, options)]
    options = {**mbir_defaults(op), **options}
    runs = [("mbir", options)]
    if slice_wise:
        runs.append(("mbir without z-TV (slice-wise 2D)", {**options, "lam": 0.0, "rho": 1e-9}))
    return runs


def run_case(case: str, problem: VolumeProblem, methods: list[MethodChoice], *, device: str = "cpu", seed: int = 0,
             slice_wise: bool = True) -> list[VolumeRow]:
    """Every method (and its :func:`variants`) on one measured volume (module docstring)."""
    rows = []
    for choice in methods:
        for label, options in variants(choice, slice_wise, problem.op):
            reconstruct = build_method(MethodChoice(choice.name, choice.checkpoint, options, choice.explicit),
                                       device=device, seed=seed, ratio=problem.op.config().get("ratio"), progress=True)
            if reconstruct is None:
                continue
            y, op = problem.y.to(device), problem.op

            def call() -> tuple[torch.Tensor, float]:
                start = time.perf_counter()
                with torch.no_grad():
                    result = op.crop(reconstruct(y, op)).cpu()
                return result, time.perf_counter() - start

            if torch.device(device).type == "cuda":
                estimate, seconds = call()
                peak = peak_memory_bytes(call, device)  # a second run: the allocator's peak on the GPU
            else:
                (estimate, seconds), peak = peak_resident_bytes(call)
            check_finite_result(f"{label} on {case}", estimate)
            row = VolumeRow(case, choice.name, label, options, plane_scores(estimate, problem.truth), seconds, peak,
                            middle_planes(estimate))
            print(f"  {case}: {label}: " + ", ".join(f"{p} {s['psnr']:.2f}" for p, s in row.scores.items())
                  + f" dB, {seconds:.1f} s", flush=True)
            rows.append(row)
    return rows


def table(rows: list[VolumeRow]) -> str:
    width = max([len("method"), *(len(r.label) for r in rows)])
    case_width = max([len("case"), *(len(r.case) for r in rows)])
    head = "  ".join(f"{p:>15}" for p in PLANES)
    lines = [f"{'case':<{case_width}}  {'method':<{width}}  {head}  {'s/volume':>8}  {'peak MB':>7}",
             f"{'':<{case_width}}  {'':<{width}}  " + "  ".join(f"{'PSNR / SSIM':>15}" for _ in PLANES)]
    for r in rows:
        cells = "  ".join(f"{r.scores[p]['psnr']:7.2f} / " + (f"{r.scores[p]['ssim']:.3f}" if "ssim" in r.scores[p]
                                                             else "  —  ") for p in PLANES)
        peak = "" if r.peak_bytes is None else f"{r.peak_bytes / 2**20:7.0f}"
        lines.append(f"{r.case:<{case_width}}  {r.label:<{width}}  {cells}  {r.seconds:8.1f}  {peak:>7}")
    return "\n".join(lines)


def write_figure(path: str | Path, truths: dict[str, dict[str, torch.Tensor]], rows: list[VolumeRow]) -> None:
    """Rows: the truth, then every method; columns: the three planes of every case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r.label for r in rows))
    cases = list(truths)
    cols = 3 * len(cases)
    fig, axes = plt.subplots(1 + len(labels), cols, figsize=(2.1 * cols, 2.1 * (1 + len(labels))), squeeze=False)
    for c, case in enumerate(cases):
        here = {r.label: r for r in rows if r.case == case}
        for p, plane in enumerate(PLANES):
            col = 3 * c + p
            for line, label in enumerate(["ground truth", *labels]):
                ax = axes[line][col]
                ax.set_xticks([]), ax.set_yticks([])
                row = here.get(label)
                image = truths[case][plane] if line == 0 else (row.planes[plane] if row is not None else None)
                if image is None:
                    ax.axis("off")
                    continue
                ax.imshow(image.clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1, aspect="auto")
                if line == 0:
                    ax.set_title(f"{case}\n{plane}" if p == 1 else plane, fontsize=8)
                else:
                    ax.set_xlabel(f"{row.scores[plane]['psnr']:.2f} dB", fontsize=8)
                if col == 0:
                    ax.set_ylabel(label, fontsize=8)
    save_figure(fig, path, dpi=80)


def run_volume_cli(args: argparse.Namespace) -> int:
    """``idm bench quality --operator ct3d | mri3d`` (module docstring)."""
    from ..cli.common import parse_range, write_json

    slices = parse_slices(args.slices)
    if not Path(args.data).is_file():
        raise IDMError(f"--operator {args.operator} takes one volume file as --data, got {args.data}")
    image_only = ("crop", "limit", "per_image", "ratios", "block_size", "matrix_seed") + \
        (("accelerations",) if args.operator == "ct3d" else ())
    unused = [f"--{name.replace('_', '-')}" for name in image_only if getattr(args, name) != IMAGE_DEFAULTS[name]]
    if unused:
        raise IDMError(f"{', '.join(unused)} do(es) not apply to --operator {args.operator}")
    methods = choose_methods(args, VOLUME_METHODS[args.operator])
    if args.operator == "ct3d":
        if args.mask is not None:
            raise IDMError("--mask applies to --operator mri3d, not ct3d")
        views = [23] if args.views is None else list(args.views)
        if any(v < 1 for v in views):
            raise IDMError(f"--views must be >= 1, got {' '.join(map(str, views))}")
        angles = (0.0, 180.0) if args.angles is None else parse_range(args.angles)
        cases = {f"{v} views over {angles[0]:g}–{angles[1]:g}°":
                 operator_factory("ct", seed=args.seed, noise_sigma=args.noise, views=v, angle_range=angles)
                 for v in views}
        kind = "ct"
    else:
        if args.views is not None or args.angles is not None or args.bin is not None:
            raise IDMError("--views, --angles and --bin apply to --operator ct3d, not mri3d")
        for acceleration in args.accelerations:
            if not acceleration >= 1:
                raise IDMError(f"--accelerations must be numbers >= 1, got {acceleration:g}")
        mask = args.mask or "poisson"
        cases = {f"{a:g}x {mask}": operator_factory("mri", seed=args.seed, noise_sigma=args.noise, acceleration=a,
                                                     mask_type=mask)
                 for a in args.accelerations}
        kind = "mri"
    raw = kind == "ct" and str(args.data).lower().endswith((".h5", ".hdf5"))
    if raw:
        if args.angles is not None or slices is not None or args.noise:
            raise IDMError("--angles, --slices and --noise apply to volumes; raw projections are measured data "
                           "with all their rows and angles")
        problems = sinogram_problems(args.data, views, 1 if args.bin is None else args.bin)
    else:
        if args.bin is not None:
            raise IDMError("--bin applies to raw projections (--data FILE.h5), not to volumes")
        truth, _ = read_scaled_volume(args.data, kind, slices=slices, require_affine=False)  # read once
        problems = {case: measure_volume(truth, factory, seed=args.seed) for case, factory in cases.items()}
    rows, truths, shape = [], {}, None
    for case, problem in problems.items():
        shape = list(problem.truth[:, 0].shape)
        print(f"{args.data}: {shape[0]} slices of {shape[1]}×{shape[2]}, {case}", flush=True)
        truths[case] = middle_planes(problem.truth)
        rows += run_case(case, problem, methods, device=args.device, seed=args.seed,
                         slice_wise=not args.no_slice_wise)
    if not rows:
        raise IDMError("no method could be evaluated (all were skipped)")
    print(table(rows))
    if args.json:
        write_json(args.json, {"operator": args.operator, "volume": str(args.data),
                               "slices": list(slices or (0, shape[0])),
                               "shape": shape, "rows": [r.to_json() for r in rows]})
        print(f"results written to {args.json}")
    if args.figure:
        write_figure(args.figure, truths, rows)
        print(f"figure written to {args.figure}")
    return 0
