"""``idm reconstruct``: decode a measurement file, raw MRI k-space or a raw CT sinogram, or simulate
measuring an image and decode it.

Inputs (exactly one):

* a measurement file of ``idm measure`` (``.safetensors``): the file decides the operator;
* ``--kspace FILE [--key K] [--slice S] [--shift]``: Cartesian k-space read with
  :func:`idm.io.medical.read_kspace`; the operator is :class:`idm.physics.MRI` with the explicit
  mask of the sampled positions (nonzero in some coil) and, for multi-coil data, the coil
  sensitivities of ``--sensitivities FILE`` or ESPIRiT maps estimated from the fully sampled
  k-space centre (:func:`idm.physics.mri.estimate_sensitivities`);
* ``--sinogram FILE [--row R] [--bin K]``: DXchange / TomoPy projections read with
  :func:`idm.io.medical.read_sinogram` (dark/white-field corrected, −log); detector row ``R``
  (default the middle one) is reconstructed with ``ParallelBeamCT(angles=theta,
  detectors=D)`` on a D × D image (``--bin K`` averages K adjacent detector cells first: a
  (D/K)² image, K² times fewer pixels);
* an image (``--operator`` and its options simulate the measurement; PSNR/SSIM are reported);
* a NIfTI volume (``.nii``, ``.nii.gz``) with ``--operator ct`` or ``mri``: every axial slice is measured
  by the same 2D operator and the volume reconstructed as one batch of slices (``mbir`` couples them,
  as do ``tv`` and ``idm`` with ``--option volume=true``: 3D TV, z-TV consistency; the other methods
  treat them one by one), with a progress bar; CT volumes in HU (values outside [0, 1]) are windowed by
  :func:`idm.io.medical.hu_window`, MRI volumes divided by their largest magnitude; ``-o`` must be
  NIfTI and gets the reconstruction on that [0, 1] scale with the input's affine; PSNR / SSIM are reported
  on the axial, coronal and sagittal planes (:func:`idm.evaluation.plane_scores`). A volume must be
  3-D, finite and oriented (an affine: NIfTI sform or qform code set), else one ``error:`` line.

Output: the image file(s) ``-o`` (PNG/TIFF/..., 8 bits): complex (MRI) results are written as
their magnitude; results of simulated or measured images clipped to [0, 1] (their scale);
results of raw data, which have no [0, 1] scale, as ``max(x, 0) / max x`` (MRI: ``|x| / max|x|``).
``-o FILE.npy`` or ``FILE.nii[.gz]`` writes the unclipped result instead (complex for MRI).
``--uncertainty FILE`` (methods that give one: ``diffuserecon``, ``mcddpm``, ``idm`` on 1D Cartesian MRI) writes the per-pixel standard
deviation beside it, raw in ``.npy`` / NIfTI, as ``std / max std`` in image formats.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import IDMError
from ..io.measurement import build_operator, load_measurement
from ..metrics import psnr, ssim_skimage
from ..registry import METHODS, require_uncertainty
from .common import (OPERATOR_OPTIONS, add_measurement_args, add_method_args, check_file_settings,
                     given_operator_options, image_of, is_raw_output, load_sensitivities, load_truth,
                     method_checkpoint, method_options,
                     operator_factory_from_args, output_paths, write_result)

#: largest side of the ESPIRiT calibration region taken from the fully sampled k-space centre
CALIBRATION = 24
#: ESPIRiT kernel size
KERNEL = 6


def add_parser(subparsers: argparse._SubParsersAction, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "reconstruct",
        help=help_text,
    )
    parser.add_argument("input", nargs="?",
                        help="measurement file from `idm measure`, or an image to measure with --operator first")
    parser.add_argument("-o", "--output",
                        help="output image (PNG, TIFF, ...; .npy: the unclipped values) or folder, for several images")
    add_method_args(parser)
    add_measurement_args(parser)
    raw = parser.add_argument_group("raw data (instead of INPUT)")
    raw.add_argument("--kspace", metavar="FILE", help="raw Cartesian MRI k-space (fastMRI .h5, .mat, .npy/.npz)")
    raw.add_argument("--key", help="--kspace: the variable / dataset holding the k-space")
    raw.add_argument("--slice", type=int, help="--kspace: the slice of a multi-slice file")
    raw.add_argument("--shift", action="store_true", help="--kspace: the file stores uncentred k-space (DC at 0, 0)")
    raw.add_argument("--sinogram", metavar="FILE", help="raw parallel-beam projections (DXchange / TomoPy HDF5)")
    raw.add_argument("--row", type=int, help="--sinogram: the detector row (slice) to reconstruct (default the middle)")
    raw.add_argument("--bin", type=int, metavar="K", help="--sinogram: average K adjacent detector cells (default 1)")
    raw.add_argument("--rotation-center", metavar="C|auto|middle",
                     help="--sinogram: detector position (cells, from 0) of the rotation axis; auto (default): "
                          "estimated from two views 180° apart when the file has them, else the middle D // 2")
    parser.add_argument("--uncertainty", metavar="FILE",
                        help="also write the per-pixel std (diffuserecon, mcddpm, idm): .npy / .nii[.gz] raw, image formats as std / max std")
    parser.add_argument("--list-methods", action="store_true", help="list the available methods and exit")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.list_methods:
        for name in METHODS.names():
            print(f"{name:10s} {METHODS.get(name).description}")
        return 0
    sources = [name for name, value in (("INPUT", args.input), ("--kspace", args.kspace),
                                        ("--sinogram", args.sinogram)) if value is not None]
    if len(sources) > 1:
        raise IDMError(f"give one input: {' and '.join(sources)} exclude each other")
    if not sources or not args.output:
        raise IDMError("give an input (measurement file, image, --kspace or --sinogram) and -o OUTPUT")
    _check_raw_options(args)
    method = METHODS.get(args.method)  # fail on an unknown method before any work
    checkpoint = method_checkpoint(args, method)
    truth, raw = None, False
    if args.kspace is not None:
        op, y, names = kspace_problem(args)
        raw = True
    elif args.sinogram is not None:
        op, y, names = sinogram_problem(args)
        raw = True
    elif str(args.input).lower().endswith((".nii", ".nii.gz")):
        return reconstruct_volume(args, method, checkpoint)
    elif Path(args.input).suffix.lower() == ".safetensors":
        meas = load_measurement(args.input)
        check_file_settings(args, args.input, meas.operator_config)
        op = build_operator(meas)
        y, names = meas.y, meas.names or [Path(args.input).stem]
    else:
        kind, factory = operator_factory_from_args(args)
        truth = load_truth(args.input, kind).unsqueeze(0)
        op = factory(tuple(truth.shape[2:]), 0)
        y = op.measure(truth, generator=torch.Generator().manual_seed(args.seed))
        names = [args.input]
    paths = output_paths(args.output, names)
    std_paths = output_paths(args.uncertainty, names) if args.uncertainty else None
    if std_paths is not None and {p.resolve() for p in std_paths} & {p.resolve() for p in paths}:
        raise IDMError("--uncertainty would overwrite the reconstruction -o: give another file or folder")
    ratio = op.config().get("ratio")
    reconstruct = method.build(checkpoint=checkpoint, device=args.device, seed=args.seed, ratio=ratio,
                               **method_options(args.option))
    if std_paths is not None:
        require_uncertainty(args.method, reconstruct)
    start = time.perf_counter()
    with torch.no_grad():
        if std_paths is not None:
            posterior = reconstruct.with_uncertainty(y.to(args.device), op)
            x, std = op.crop(posterior.x).cpu(), op.crop(posterior.std).cpu()
        else:
            x = op.crop(reconstruct(y.to(args.device), op)).cpu()
    seconds = time.perf_counter() - start
    check_finite_result(args.method, x)
    for image, path in zip(x, paths):
        write_result(path, normalised(image) if raw and not is_raw_output(path) else image)
    for image, path in zip(std if std_paths is not None else [], std_paths or []):
        write_result(path, image if is_raw_output(path) else normalised(image))
    report = f"{args.method}: {len(paths)} image(s) in {seconds:.2f} s → {paths[0] if len(paths) == 1 else Path(args.output)}"
    if truth is not None:
        if x.is_complex() or truth.is_complex():
            from ..evaluation import magnitude_scores

            value, ssim_value, _ = magnitude_scores(x, truth)
            report += f" (magnitude PSNR {float(value[0]):.2f} dB, SSIM {float(ssim_value[0]):.4f})"
        else:
            clipped = x.clamp(0, 1)
            report += f" (PSNR {float(psnr(clipped, truth)[0]):.2f} dB, SSIM {float(ssim_skimage(clipped, truth)[0]):.4f})"
    print(report)
    return 0


def reconstruct_volume(args: argparse.Namespace, method: Any, checkpoint: str | None) -> int:
    """The NIfTI-volume input of the module docstring."""
    from ..evaluation import plane_scores, volume_problem
    from ..io.medical import write_nifti

    kind, factory = operator_factory_from_args(args)
    if kind not in ("ct", "mri"):
        raise IDMError(f"a NIfTI volume is measured slice by slice with --operator ct or mri, not {kind}")
    if not str(args.output).lower().endswith((".nii", ".nii.gz")):
        raise IDMError(f"a volume is written as NIfTI: give -o FILE.nii[.gz], not {args.output}")
    if args.uncertainty:
        raise IDMError("--uncertainty applies to image inputs, not to volumes")
    problem = volume_problem(args.input, kind, factory, seed=args.seed)
    x, op = problem.truth, problem.op
    reconstruct = method.build(checkpoint=checkpoint, device=args.device, seed=args.seed, progress=True,
                               ratio=op.config().get("ratio"), **method_options(args.option))
    start = time.perf_counter()
    with torch.no_grad():  # a volume takes minutes: the method's progress bar (stderr) shows the ETA
        estimate = op.crop(reconstruct(problem.y.to(args.device), op)).cpu()
    seconds = time.perf_counter() - start
    check_finite_result(args.method, estimate)
    write_nifti(args.output, estimate[:, 0].numpy(), affine=problem.affine)
    scores = plane_scores(estimate, x)
    planes = ", ".join(f"{plane} {s['psnr']:.2f}" + (f" / {s['ssim']:.4f}" if "ssim" in s else "")
                       for plane, s in scores.items())
    print(f"{args.method}: {x.shape[0]} slices of {x.shape[2]}×{x.shape[3]} in {seconds:.2f} s → {args.output} "
          f"(PSNR / SSIM: {planes})")
    return 0


def check_finite_result(method: str, x: torch.Tensor) -> None:
    """:class:`IDMError` unless every value of the reconstruction ``x`` is finite (complex: both parts)."""
    if not bool(torch.isfinite(x).all()):
        raise IDMError(f"{method} produced NaN or inf values")


def normalised(x: torch.Tensor) -> torch.Tensor:
    """A raw-data result on [0, 1] for writing: ``max(x, 0) / max x`` (complex: ``|x| / max|x|``)."""
    image = image_of(x).clamp_min(0)
    peak = float(image.max())
    return image / peak if peak > 0 else image


def _check_raw_options(args: argparse.Namespace) -> None:
    """One-line errors for options that do not apply to the chosen input."""
    for flag, dest, needs in (("--key", "key", "kspace"), ("--slice", "slice", "kspace"),
                              ("--row", "row", "sinogram"), ("--bin", "bin", "sinogram"),
                              ("--rotation-center", "rotation_center", "sinogram")):
        if getattr(args, dest) is not None and getattr(args, needs) is None:
            raise IDMError(f"{flag} applies to --{needs} only")
    if args.shift and args.kspace is None:
        raise IDMError("--shift applies to --kspace only")
    if args.kspace is None and args.sinogram is None:
        return
    source, kind, allowed = (("--kspace", "mri", ("coils", "sensitivities")) if args.kspace is not None
                             else ("--sinogram", "ct", ()))
    if args.operator is not None and args.operator != kind:
        raise IDMError(f"--operator {args.operator} contradicts {source} (raw data of --operator {kind})")
    for dest in given_operator_options(args):
        if dest not in allowed:
            flag, users = OPERATOR_OPTIONS[dest]
            if kind not in users:
                raise IDMError(f"{flag} applies to --operator {' or '.join(users)} only")
            raise IDMError(f"{flag} does not apply to {source}: the file decides it")
    if args.noise:
        raise IDMError(f"--noise does not apply to {source} (measured data)")


def kspace_problem(args: argparse.Namespace):
    """``(MRI operator, y (1, Nc, H, W), names)`` of raw k-space."""
    from ..io.medical import read_kspace
    from ..physics import MRI
    from ..physics.mri import estimate_sensitivities

    kspace = read_kspace(args.kspace, key=args.key, slice=args.slice, shift=args.shift)
    coils, height, width = kspace.shape
    if args.coils is not None and args.coils != coils:
        raise IDMError(f"--coils {args.coils} contradicts {args.kspace}, which holds {coils} coil(s)")
    if not bool(torch.isfinite(torch.view_as_real(kspace)).all()):
        raise IDMError(f"{args.kspace} holds NaN or inf k-space values")
    mask = (kspace != 0).any(0)
    if not bool(mask.any()):
        raise IDMError(f"{args.kspace} holds only zeros")
    sensitivities = None
    if args.sensitivities is not None:
        sensitivities = load_sensitivities(args.sensitivities)
        if tuple(sensitivities.shape) != (coils, height, width):
            raise IDMError(f"sensitivities of shape {tuple(sensitivities.shape)} from {args.sensitivities} do not match "
                           f"the k-space {tuple(kspace.shape)} of {args.kspace}")
    elif coils > 1:
        calibration = calibration_region(mask)
        if calibration is None:
            raise IDMError(f"the centre of {args.kspace} is not fully sampled over more than {KERNEL}×{KERNEL} "
                           f"samples, too little to estimate coil sensitivities (ESPIRiT); give --sensitivities FILE")
        sensitivities = estimate_sensitivities(kspace, calibration=calibration, kernel=KERNEL)
    op = MRI((height, width), mask=mask, sensitivities=sensitivities)
    return op, (kspace * mask)[None], [Path(args.kspace).stem]


def calibration_region(mask: torch.Tensor) -> tuple[int, int] | None:
    """The largest centred block (rows, cols), each side at most :data:`CALIBRATION`, fully sampled in
    ``mask`` (placed as :func:`estimate_sensitivities` places it), or None if smaller than the kernel."""
    height, width = mask.shape

    def block(rows: int, cols: int) -> bool:
        r0, c0 = height // 2 - rows // 2, width // 2 - cols // 2
        return bool(mask[r0 : r0 + rows, c0 : c0 + cols].all())

    best = None
    for rows in range(min(CALIBRATION, height), KERNEL, -1):
        cols = next((c for c in range(min(CALIBRATION, width), KERNEL, -1) if block(rows, c)), None)
        if cols is not None and (best is None or rows * cols > best[0] * best[1]):
            best = (rows, cols)
    if best is None or 2 * KERNEL - 1 > min(height, width):
        return None
    return best


def sinogram_problem(args: argparse.Namespace):
    """``(CT operator, y (1, 1, views, D), names)`` of one detector row of a raw sinogram."""
    from ..io.medical import read_sinogram
    from ..physics import ParallelBeamCT

    row = args.row if args.row is not None else _middle_row(args.sinogram)
    sinogram = read_sinogram(args.sinogram, rows=row)
    binning = 1 if args.bin is None else args.bin
    data, centre = centred_sinogram(sinogram.data.double(), sinogram.angles, binning, args.rotation_center)
    data = data[:, 0, :]  # (views, D)
    print(f"{args.sinogram}: row {row}, {data.shape[0]} views, {sinogram.data.shape[2]} detectors, rotation axis at "
          f"detector {centre:.1f} (moved to the middle{f' after binning by {binning}' if binning > 1 else ''})")
    detectors = data.shape[1]
    angles = sinogram.angles.tolist()
    op = ParallelBeamCT((detectors, detectors), angles=angles, detectors=detectors)
    name = f"{Path(args.sinogram).stem}_row{row}"
    return op, data.float()[None, None].contiguous(), [name]


def centred_sinogram(data: torch.Tensor, angles: torch.Tensor, binning: int = 1,
                     option: str | None = None) -> tuple[torch.Tensor, float]:
    """Raw sinogram rows ``(views, rows, D)`` → ``(sinogram, axis)``: ``binning`` adjacent detector cells
    averaged (the middle ``D // binning · binning`` cells), then the rotation axis — found on the middle
    row by :func:`rotation_centre` (``option``: auto, middle or a position in unbinned cells) — moved
    to the middle cell by :func:`recentred`; ``axis`` is its position in the unbinned detector cells."""
    if binning < 1:
        raise IDMError(f"--bin must be >= 1, got {binning}")
    detectors, first = data.shape[-1], 0
    if binning > 1:
        cells = detectors // binning
        if cells < 2:
            raise IDMError(f"--bin {binning} leaves fewer than 2 of the {detectors} detector cells")
        first = (detectors - cells * binning) // 2
        data = data[..., first : first + cells * binning].reshape(*data.shape[:-1], cells, binning).mean(-1)
    if option not in (None, "auto", "middle"):  # a position in unbinned cells → binned cells
        position = rotation_centre(option, torch.zeros(1, detectors), angles)  # parsed and range-checked
        option = str(min(max((position - first - (binning - 1) / 2) / binning, 0.0), data.shape[-1] - 1))
    axis = rotation_centre(option, data[:, data.shape[1] // 2], angles)
    data = torch.stack([recentred(data[:, row], axis) for row in range(data.shape[1])], dim=1)
    return data, first + axis * binning + (binning - 1) / 2


def rotation_centre(option: str | None, data: torch.Tensor, angles: torch.Tensor) -> float:
    """The detector position of the rotation axis: a number, ``middle`` (D // 2) or ``auto`` (default):
    the shift that best matches the first view with the mirrored view nearest 180° from it (least
    squares over integer shifts within ±D/4), or the middle when no view lies within one view
    spacing of θ₀ + 180°."""
    detectors = data.shape[1]
    if option not in (None, "auto"):
        if option == "middle":
            return float(detectors // 2)
        try:
            centre = float(option)
        except ValueError:
            raise IDMError(f"--rotation-center takes a detector position, auto or middle, got {option!r}") from None
        if not 0 <= centre <= detectors - 1:
            raise IDMError(f"--rotation-center {option} lies outside the {detectors} detector cells")
        return centre
    angles = angles.double()
    spacing = float((angles[1:] - angles[:-1]).abs().median()) if angles.numel() > 1 else 180.0
    target = float(angles[0]) + 180.0
    opposite = int((angles - target).abs().argmin())
    if abs(float(angles[opposite]) - target) > 1.01 * spacing or opposite == 0:
        return float(detectors // 2)
    first, mirrored = data[0], data[opposite].flip(0)
    limit, margin = detectors // 4, detectors // 4
    errors = []
    for shift in range(-limit, limit + 1):
        moved = torch.roll(mirrored, shift)
        errors.append(float((moved - first)[margin : detectors - margin].square().sum()))
    shift = int(torch.tensor(errors).argmin()) - limit
    # mirrored[j] = p180[D-1-j] = p0(2c - (D-1-j)); rolled by shift it matches p0 when 2c = D - 1 + shift
    return (detectors - 1 + shift) / 2


def recentred(data: torch.Tensor, centre: float) -> torch.Tensor:
    """The sinogram ``(views, D)`` shifted (linear interpolation, 0 outside) so that the rotation axis
    at detector ``centre`` lands on the operator's axis, detector D // 2."""
    detectors = data.shape[1]
    offset = centre - detectors // 2
    if abs(offset) < 1e-9:
        return data
    source = torch.arange(detectors, dtype=torch.float64) + offset  # new[j] = old[j + offset]
    low = source.floor().long()
    weight = source - low
    def take(index: torch.Tensor) -> torch.Tensor:
        inside = (index >= 0) & (index < detectors)
        return data[:, index.clamp(0, detectors - 1)] * inside
    return take(low) * (1 - weight) + take(low + 1) * weight


def _middle_row(path: str) -> int:
    """The middle detector row of a DXchange file (0 if its shape cannot be read: read_sinogram then
    reports the problem)."""
    try:
        import h5py

        with h5py.File(path, "r") as handle:
            return int(handle["exchange/data"].shape[1]) // 2
    except Exception:
        return 0
