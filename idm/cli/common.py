"""Argument groups and helpers shared by the ``idm`` subcommands."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import IDMError, check_ratio
from ..io.atomic import atomic_write
from ..registry import METHODS, MethodInfo

if TYPE_CHECKING:
    import torch

    from ..evaluation import OperatorFactory

#: defaults of ``--block-size`` and ``--matrix-seed`` (those of :class:`idm.physics.BlockCS` and training)
DEFAULT_BLOCK_SIZE = 32
DEFAULT_MATRIX_SEED = 0


#: the operators ``--operator`` offers (default blockcs)
OPERATOR_CHOICES = ("blockcs", "inpainting", "superres", "mri", "ct")
#: operator-specific options: argparse dest → (flag, the operators it applies to)
OPERATOR_OPTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "ratio": ("--ratio", ("blockcs", "inpainting")),
    "block_size": ("--block-size", ("blockcs",)),
    "matrix_seed": ("--matrix-seed", ("blockcs",)),
    "factor": ("--factor", ("superres",)),
    "acceleration": ("--acceleration", ("mri",)),
    "center": ("--center", ("mri",)),
    "mask": ("--mask", ("mri",)),
    "mask_file": ("--mask-file", ("mri",)),
    "coils": ("--coils", ("mri",)),
    "sensitivities": ("--sensitivities", ("mri",)),
    "views": ("--views", ("ct",)),
    "angles": ("--angles", ("ct",)),
    "detectors": ("--detectors", ("ct",)),
}
#: defaults of the operator options that have one
DEFAULT_FACTOR = 4
DEFAULT_ACCELERATION = 4.0
DEFAULT_VIEWS = 180
MASK_CHOICES = ("random", "equispaced", "poisson")


def add_measurement_args(parser: argparse.ArgumentParser, *, ratio_required: bool = False, seed: bool = True) -> None:
    """The ``--operator`` option and each operator's own options (all default None so that
    :func:`check_operator_options` can tell which were given). ``ratio_required`` is accepted for
    compatibility: ``--ratio`` is checked when the operator needs it (blockcs, inpainting).
    ``seed=False`` leaves ``--seed`` to the caller (a parser that already has one)."""
    group = parser.add_argument_group("measurement (forward operator)")
    group.add_argument("--operator", choices=OPERATOR_CHOICES,
                       help="forward operator (default blockcs: scrambled block compressed sensing)")
    group.add_argument("--ratio", type=float, help="blockcs / inpainting: sampling ratio (kept pixels) in (0, 1]")
    group.add_argument("--block-size", type=int, help=f"blockcs: block size B (default {DEFAULT_BLOCK_SIZE})")
    group.add_argument("--matrix-seed", type=int,
                       help=f"blockcs: seed of the sampling matrix Φ (default {DEFAULT_MATRIX_SEED}; a learned method's "
                            "checkpoint must have been trained with the same)")
    group.add_argument("--factor", type=int, help=f"superres: downsampling factor (default {DEFAULT_FACTOR})")
    group.add_argument("--acceleration", type=float,
                       help=f"mri: acceleration R >= 1, 1/R of k-space sampled (default {DEFAULT_ACCELERATION:g})")
    group.add_argument("--center", type=float, metavar="FRACTION",
                       help="mri: fully sampled centre fraction (default 0.32 / acceleration, fastMRI's)")
    group.add_argument("--mask", metavar="TYPE|FILE",
                       help="mri: mask type random (default), equispaced, poisson (2D variable density), or a 0/1 "
                            "mask file (.npy, .pt, .mat; (H, W) or (W,) columns)")
    group.add_argument("--mask-file", metavar="FILE", help="mri: a 0/1 mask file (same as --mask FILE)")
    group.add_argument("--coils", type=int,
                       help="mri: number of coils; without --sensitivities, smooth synthetic coil maps are simulated")
    group.add_argument("--sensitivities", metavar="FILE",
                       help="mri: coil sensitivities (Ncoil, H, W) complex (.npy, .pt; .mat (H, W, Ncoil)); raw "
                            "multi-coil k-space without it gets ESPIRiT maps estimated from its centre")
    group.add_argument("--views", type=int, help=f"ct: number of evenly spaced views (default {DEFAULT_VIEWS})")
    group.add_argument("--angles", metavar="LOW,HIGH",
                       help="ct: angular range of the views in degrees (default 0,180; a smaller wedge is limited angle)")
    group.add_argument("--detectors", type=int, help="ct: detector cells (default ceil(√2·max(H, W)))")
    if seed:
        group.add_argument("--seed", type=int, default=0,
                           help="seed of the permutation / mask (seed + i for the i-th image of idm eval) and noise "
                                "(default 0)")
    group.add_argument("--noise", type=float, default=0.0, metavar="SIGMA",
                       help="std of additive Gaussian measurement noise, on the [0, 1] image scale")


def operator_kind(args: argparse.Namespace) -> str:
    """``--operator`` (default blockcs)."""
    return getattr(args, "operator", None) or "blockcs"


def given_operator_options(args: argparse.Namespace) -> list[str]:
    """The argparse dests of the operator options given on the command line."""
    return [dest for dest in OPERATOR_OPTIONS if getattr(args, dest, None) is not None]


def check_operator_options(args: argparse.Namespace, kind: str | None = None) -> str:
    """The operator kind; :class:`IDMError` ``--views applies to --operator ct only`` for the first
    given option that ``kind`` (default ``--operator``) does not use."""
    kind = kind or operator_kind(args)
    for dest in given_operator_options(args):
        flag, users = OPERATOR_OPTIONS[dest]
        if kind not in users:
            raise IDMError(f"{flag} applies to --operator {' or '.join(users)} only")
    return kind


def checked_ratio(args: argparse.Namespace) -> float:
    """The checked ``--ratio`` of simulated measurements; fills in the defaults of ``--block-size``
    and ``--matrix-seed`` (left None by the parser so that :func:`check_file_settings` can tell
    whether they were given)."""
    if args.ratio is None:
        raise IDMError("--ratio is required to simulate measurements")
    if args.block_size is None:
        args.block_size = DEFAULT_BLOCK_SIZE
    if args.matrix_seed is None:
        args.matrix_seed = DEFAULT_MATRIX_SEED
    if args.block_size < 1:
        raise IDMError(f"block size must be >= 1, got {args.block_size}")
    return check_ratio(args.ratio)


def parse_range(text: str) -> tuple[float, float]:
    """``"LOW,HIGH"`` → ``(LOW, HIGH)`` degrees (checked by the CT operator)."""
    parts = [part.strip() for part in str(text).split(",")]
    try:
        low, high = (float(part) for part in parts)
    except ValueError:
        raise IDMError(f"--angles takes LOW,HIGH in degrees (e.g. 0,90), got {text!r}") from None
    if not (0.0 <= low < high <= 180.0):
        raise IDMError(f"--angles must satisfy 0 <= LOW < HIGH <= 180 degrees, got {text!r}")
    return low, high


def load_sensitivities(path: str | Path) -> "torch.Tensor":
    """Coil sensitivities ``(Nc, H, W)`` complex64 from ``.npy`` / ``.pt`` / ``.pth`` (``(Nc, H, W)``) or a
    ``.mat`` holding one array (MATLAB ``(H, W, Nc)``, moved to ``(Nc, H, W)``)."""
    import numpy as np
    import torch

    path = Path(path)
    if not path.is_file():
        raise IDMError(f"sensitivity file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            array = torch.from_numpy(np.load(path))
        elif suffix in (".pt", ".pth"):
            array = torch.as_tensor(torch.load(path, map_location="cpu", weights_only=True))
        elif suffix == ".mat":
            import scipy.io

            arrays = [v for k, v in scipy.io.loadmat(path).items() if not k.startswith("__")]
            if len(arrays) != 1:
                raise IDMError(f"sensitivity file {path} must hold exactly one array, found {len(arrays)}")
            array = torch.from_numpy(np.moveaxis(np.asarray(arrays[0]), -1, 0) if arrays[0].ndim == 3 else arrays[0])
        else:
            raise IDMError(f"sensitivity file {path}: use .npy, .pt/.pth or .mat")
    except IDMError:
        raise
    except Exception as error:  # corrupt file
        raise IDMError(f"cannot read the sensitivity file {path}: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise IDMError(f"sensitivity file {path} holds shape {tuple(array.shape)}; expected (Ncoil, H, W)")
    return array


def synthetic_sensitivities(coils: int, image_size: tuple[int, int]) -> "torch.Tensor":
    """Smooth simulated coil maps ``(coils, H, W)`` complex64 with ``Σ_c |S_c|² = 1``: coil ``c`` sits
    on a circle around the image at angle ``2πc/coils``, magnitude ``exp(−d²/(2·(0.6·R)²))`` of the
    distance ``d`` to it (``R`` the image's half-diagonal), phase linear in that angle (a birdcage-like
    arrangement; for simulation only)."""
    import torch

    if coils < 1:
        raise IDMError(f"--coils must be >= 1, got {coils}")
    height, width = image_size
    rows = torch.arange(height, dtype=torch.float64) - height / 2
    cols = torch.arange(width, dtype=torch.float64) - width / 2
    radius = 0.5 * math.hypot(height, width)
    maps = []
    for c in range(coils):
        angle = 2 * math.pi * c / coils
        centre_r, centre_c = radius * math.sin(angle), radius * math.cos(angle)
        distance2 = (rows[:, None] - centre_r).square() + (cols[None, :] - centre_c).square()
        magnitude = torch.exp(-distance2 / (2 * (0.6 * radius) ** 2))
        maps.append(magnitude * torch.exp(1j * torch.tensor(angle, dtype=torch.float64)))
    maps = torch.stack(maps)
    maps = maps / maps.abs().square().sum(0, keepdim=True).sqrt()
    return maps.to(torch.complex64)


def mri_mask_source(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """``(mask type, mask file)`` from ``--mask`` / ``--mask-file`` (at most one file)."""
    mask, mask_file = args.mask, args.mask_file
    if mask is not None and mask not in MASK_CHOICES:
        if mask_file is not None:
            raise IDMError("give the mask file once: --mask FILE or --mask-file FILE")
        mask, mask_file = None, mask
    if mask is not None and mask_file is not None:
        raise IDMError(f"--mask {mask} and --mask-file exclude each other (a mask file is the whole mask)")
    if mask_file is not None:
        for dest in ("acceleration", "center"):
            if getattr(args, dest) is not None:
                raise IDMError(f"{OPERATOR_OPTIONS[dest][0]} does not apply with a mask file (the file is the mask)")
    return mask, mask_file


def operator_options(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """``(kind, options of idm.evaluation.operator_factory)`` from the command line, checked; fills in
    the defaults (``args.block_size`` / ``args.matrix_seed`` too, for block CS)."""
    kind = check_operator_options(args)
    if args.noise is not None and not (math.isfinite(args.noise) and args.noise >= 0):
        raise IDMError(f"--noise must be a finite number >= 0, got {args.noise}")
    if kind == "blockcs":
        ratio = checked_ratio(args)
        return kind, {"ratio": ratio, "block_size": args.block_size, "matrix_seed": args.matrix_seed}
    if kind == "inpainting":
        return kind, {"ratio": checked_ratio(args)}
    if kind == "superres":
        factor = DEFAULT_FACTOR if args.factor is None else args.factor
        if factor < 1:
            raise IDMError(f"--factor must be >= 1, got {factor}")
        return kind, {"factor": factor}
    if kind == "mri":
        mask_type, mask_file = mri_mask_source(args)
        options: dict[str, Any] = {}
        if mask_file is not None:
            if not Path(mask_file).is_file():
                raise IDMError(f"MRI mask file {mask_file!r} does not exist")
            options["mask"] = mask_file  # loaded (and checked against the image size) by MRI
        else:
            acceleration = DEFAULT_ACCELERATION if args.acceleration is None else args.acceleration
            if not (math.isfinite(acceleration) and acceleration >= 1):
                raise IDMError(f"--acceleration must be a number >= 1, got {acceleration:g}")
            options.update(acceleration=acceleration, center_fraction=args.center, mask_type=mask_type or "random")
        if args.sensitivities is not None:
            sens = load_sensitivities(args.sensitivities)
            if args.coils is not None and args.coils != sens.shape[0]:
                raise IDMError(f"--coils {args.coils} contradicts the {sens.shape[0]} coils of {args.sensitivities}")
            options["sensitivities"] = sens
        elif args.coils is not None and args.coils > 1:
            coils = args.coils
            options["sensitivities"] = lambda size: synthetic_sensitivities(coils, size)
        elif args.coils is not None and args.coils < 1:
            raise IDMError(f"--coils must be >= 1, got {args.coils}")
        return kind, options
    # ct
    views = DEFAULT_VIEWS if args.views is None else args.views
    if views < 1:
        raise IDMError(f"--views must be >= 1, got {views}")
    if args.detectors is not None and args.detectors < 1:
        raise IDMError(f"--detectors must be >= 1, got {args.detectors}")
    options = {"views": views, "detectors": args.detectors}
    if args.angles is not None:
        options["angle_range"] = parse_range(args.angles)
    return kind, options


def operator_factory_from_args(args: argparse.Namespace) -> tuple[str, "OperatorFactory"]:
    """``(kind, factory)``: THE place where the ``idm`` subcommands build simulated operators from
    ``--operator`` and its options (:func:`idm.evaluation.operator_factory`; the index-th image of
    ``idm eval`` gets seed ``--seed + index``, ``idm measure`` / ``reconstruct`` use index 0)."""
    from ..evaluation import operator_factory

    kind, options = operator_options(args)
    return kind, operator_factory(kind, seed=args.seed, noise_sigma=args.noise, **options)


def add_method_args(parser: argparse.ArgumentParser, default: str | None = "tv") -> None:
    parser.add_argument("--method", default=default, help=f"reconstruction method (default {default}); see --list-methods")
    parser.add_argument("--checkpoint", help="checkpoint folder or shipped name, for learned methods")
    parser.add_argument("--prior", metavar="PATH",
                        help="diffusion prior of the zero-shot methods (ddnm, ddnm+, dps, diffuserecon): a prior checkpoint "
                             "folder or name, a local diffusers UNet2DModel folder, or hf:ORG/NAME[/SUBFOLDER]")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="option of the method's factory, e.g. iterations=20 (repeatable; VALUE is read as "
                             "an int, a float, true/false or else a string)")


#: factory arguments the commands set themselves, not ``--option``
RESERVED_OPTIONS = ("seed", "ratio", "checkpoint", "device", "progress")


def method_options(items: list[str]) -> dict:
    """``["KEY=VALUE", ...]`` → ``{KEY: parsed VALUE}`` (see :func:`idm.bench.methods.parse_value`)."""
    from ..bench.methods import parse_value

    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise IDMError(f"malformed --option {item!r} (expected KEY=VALUE)")
        if key.strip() in RESERVED_OPTIONS:
            raise IDMError(f"--option {key.strip()} is set by the command itself (--{key.strip()} or the measurement)")
        options[key.strip()] = parse_value(value)
    return options



def method_checkpoint(args: argparse.Namespace, method: MethodInfo) -> str | None:
    """The ``checkpoint`` to build ``method`` with, from ``--checkpoint`` or ``--prior`` (at most one;
    ``--prior`` only for methods whose checkpoint is a diffusion prior)."""
    if args.prior is None:
        return args.checkpoint
    if args.checkpoint is not None:
        raise IDMError("give either --prior or --checkpoint, not both")
    if method.checkpoint_kind != "prior":
        users = ", ".join(name for name in METHODS.names() if METHODS.get(name).checkpoint_kind == "prior")
        takes = "no checkpoint" if method.checkpoint_kind is None else "--checkpoint"
        raise IDMError(f"--prior is for the methods built on a diffusion prior ({users}); method {method.name!r} takes {takes}")
    return args.prior


def check_file_settings(args: argparse.Namespace, path: str | Path, config: dict) -> None:
    """:class:`IDMError` if an operator option contradicts the measurement file ``path`` (the file
    decides; a contradicting option would otherwise be ignored silently): ``--operator`` other than
    the file's kind; for block CS ``--ratio``, ``--block-size`` or ``--matrix-seed`` different from
    the stored ones; any other operator option (it has no effect on a file)."""
    kind = config.get("kind")
    if getattr(args, "operator", None) is not None and args.operator != kind:
        raise IDMError(f"--operator {args.operator} contradicts the measurement file {path}, which was measured "
                       f"with operator {kind}; drop --operator (the file decides)")
    checked = ("ratio", "block_size", "matrix_seed") if kind == "blockcs" else ()
    for option, key in (("--ratio", "ratio"), ("--block-size", "block_size"), ("--matrix-seed", "matrix_seed")):
        if key not in checked:
            continue
        given = getattr(args, key)
        if given is None:
            continue
        stored = config.get(key)
        same = stored is not None and (abs(float(given) - float(stored)) <= 1e-6 if key == "ratio" else given == stored)
        if not same:
            raise IDMError(f"{option} {given} contradicts the measurement file {path}, which was measured with "
                           f"{key.replace('_', ' ')} {stored}; drop {option} (the file decides)")
    for dest in given_operator_options(args):
        if dest not in checked:
            flag = OPERATOR_OPTIONS[dest][0]
            raise IDMError(f"{flag} does not apply to the measurement file {path} (operator {kind}, stored in the "
                           f"file); drop {flag}")
    if getattr(args, "noise", 0.0):
        raise IDMError(f"--noise does not apply to the measurement file {path} (its measurements are already noisy "
                       f"or not); drop --noise")


def image_of(x: "torch.Tensor") -> "torch.Tensor":
    """What is written as an image: the magnitude of a complex (MRI) result, a real one as is."""
    return x.abs() if x.is_complex() else x


def load_truth(path: str | Path, kind: str) -> "torch.Tensor":
    """An input image ``(1, H, W)``: an image file (gray [0, 1], :func:`idm.data.load_image`) or, for
    ``mri`` / ``ct``, a 2-D ``.npy`` array (``mri``: real magnitude in [0, 1] or complex; ``ct``: real
    in [0, 1])."""
    import numpy as np
    import torch

    from ..data import check_image, load_image
    from ..data.images import read_npy

    path = Path(path)
    if path.suffix.lower() != ".npy" or kind not in ("mri", "ct"):
        return load_image(path)
    array = read_npy(path, "image")
    if array.ndim != 2 or array.dtype.kind not in "fc" + "iu":
        raise IDMError(f"{path} holds {array.dtype} {array.shape}; an image is a 2-D (H, W) real or complex array")
    if np.iscomplexobj(array):
        if kind != "mri":
            raise IDMError(f"{path} is complex; only --operator mri takes complex images")
        x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.complex64))[None]
        if not bool(torch.isfinite(torch.view_as_real(x)).all()):
            raise IDMError(f"image {path} contains NaN or inf values")
        return x
    return check_image(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None], name=f"image {path}")


#: output suffixes that keep the raw values (complex for MRI) instead of an 8-bit image
RAW_SUFFIXES = (".npy", ".nii", ".nii.gz")


def read_slice(path: str | Path, what: str) -> "torch.Tensor":
    """A real 2-D image ``(1, H, W)`` on [0, 1] from an image file, a ``.npy`` array or a 2-D NIfTI file
    (``idm translate``, ``idm register``, their benchmarks); ``what`` names it in errors."""
    from ..data import check_image

    path = Path(path)
    if path.name.lower().endswith((".nii", ".nii.gz")):
        from ..io.medical import read_volume, single_slice

        image = single_slice(read_volume(path).data, path, what)[None]
    else:
        image = load_truth(path, "mri" if path.suffix.lower() == ".npy" else "image")
    if image.is_complex():
        raise IDMError(f"{what} {path} is complex; a real magnitude image is expected")
    return check_image(image.float(), name=f"{what} {path}")


def is_raw_output(path: Path) -> bool:
    """Whether ``path`` is written with raw values (:data:`RAW_SUFFIXES`)."""
    return path.name.lower().endswith(RAW_SUFFIXES)


def check_output_path(path: str | Path) -> Path:
    """``path`` as a :class:`Path` if :func:`write_result` can write it (an image file, ``.npy`` or NIfTI);
    else :class:`IDMError` — checked before any work, so a bad name fails fast."""
    from ..data.images import IMAGE_SUFFIXES

    path = Path(path)
    if not (is_raw_output(path) or path.suffix.lower() in IMAGE_SUFFIXES):
        raise IDMError(f"output must be an image file, .npy or .nii[.gz], got {path}")
    return path


def write_result(path: Path, x: "torch.Tensor") -> None:
    """Write one reconstruction ``(C, H, W)``: ``.npy`` and NIfTI (``.nii``, ``.nii.gz``; the extra
    ``medical``) keep the raw values (complex for MRI; one channel as an (H, W) array), image formats
    get :func:`image_of` clipped to [0, 1] (8 bits, :func:`idm.data.save_image`)."""
    import numpy as np

    from ..data import save_image
    from ..io.atomic import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    values = x.detach().cpu().squeeze(0).numpy() if is_raw_output(path) else None
    if path.suffix.lower() == ".npy":
        with atomic_path(path) as temp:
            with open(temp, "wb") as handle:
                np.save(handle, values)
        return
    if values is not None:
        from ..io.medical import write_nifti

        write_nifti(path, values)
        return
    save_image(path, image_of(x).clamp(0, 1))


def write_json(path: str | Path, payload: dict) -> None:
    with atomic_write(path, mode="w") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")


def output_paths(output: str, names: list[str]) -> list[Path]:
    """One PNG path per image: ``output`` itself for one image (an image file or ``.npy``), else
    ``output/<name>.png``."""
    out = Path(output)
    if len(names) == 1 and out.suffix:
        return [out]
    if out.suffix:
        raise IDMError(f"{len(names)} images to write: give an output folder, not the file {out}")
    return [out / f"{Path(name).stem}.png" for name in names]
