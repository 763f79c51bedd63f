"""Export 2-D slices of the medical data (MRI, CT) as training / validation PNGs and test arrays.

    python -m train.medical_slices --modality mri|ct|t2 --split train|val|test --data ../shared/data \\
        --out DIR [--min-foreground F]

DIR gets one file per slice and ``manifest.json``: for every file its source (path relative to
--data), slice axis and index, normalisation, split, shape (H, W) and foreground fraction; and the
source list, the slices dropped and files excluded (with the reason), and the checks made. train
and val slices are **16-bit grayscale PNGs** (round(x · 65535) of x in [0, 1], Pillow mode "I;16"),
which ``idm.data.images.load_image`` reads back as (1, H, W) float32 in [0, 1] -- checked for every
file (error <= 0.5 / 65535). test slices are float32 (H, W) ``.npy`` in [0, 1], unquantised, what
``idm eval --data`` reads. DIR is built in a temporary sibling folder renamed at the end, so a
failure leaves nothing half-written; an existing DIR is replaced only when it is empty or an
earlier export (holds manifest.json). Every image must be at least 96 x 96 (else an error).

Selection (paths relative to --data; F = --min-foreground, default 0.15):

MRI -- every slice is divided by its own 99.9th percentile and clipped to [0, 1] (test: by its max).
  train  BraTS2020 slices mri/brats2020_slices/Diffusion-based-Segmentation/training/*/ and
         mri/brats2020_slices/diffusion-anomaly/testing/*/: contrasts t1, t1ce, t2, flair (no seg
         label maps), 240 x 240. SynDiff mri/multicontrast_syndiff_T1T2/{T1,T2}.mat (dataset
         data_fs): 25 paired slices each, 256 x 152. Axial, coronal and sagittal slices, every 4th,
         of the 3-D templates mri/brain_3d_templates/antspy/{ch2,mni}.nii.gz and
         mri/brain_3d_templates/nilearn/*.nii.gz, kept when at least F of the pixels exceed 5 % of
         the volume's max; turned upright (rows flipped: anterior resp. superior at the top).
         Leak guard: a BraTS slice of a subject that has val slices is dropped. This drops both
         diffusion-anomaly slices: they are brats_train_006 slices 081 and 082, next to the val slice
         brats_train_006 080 (recorded under "excluded" in the manifest).
  val    BraTS mri/brats2020_slices/Diffusion-based-Segmentation/testing/*/ (the four contrasts).
  test   fastMRI knee magnitudes mri/fastmri_knee_scoremri/real/retrospective/00{1,2,3}.npy and the
         complex image mri/fastmri_knee_scoremri/single-coil/001.npy (kept complex64, its phase
         included), each divided by its max magnitude: knee-retro-00N.npy, knee-singlecoil-001.npy,
         320 x 320 (idm eval scores magnitudes).

T2 (the target-modality prior of ``idm translate``; every slice / its 99.9th percentile, clipped) --
  train  the BraTS2020 t2 slices of subject 001 (training/, 6 slices, 240 x 240) and the 25 SynDiff T2
         slices (256 x 152). The SynDiff T1 / T2 files are not slice pairs (same index, other levels),
         so they cannot score a translation.
  val    subject 001's co-registered t1 / t2 slices (its t2 is training data, its t1 is not): where
         translate's settings are chosen.
  test   the co-registered t1 / t2 slices of the other BraTS subjects (006 slices 080-082, 040 slice
         087; testing/ folders): held out of the T2 prior; the translation bench's source / truth pairs.

CT -- Hounsfield units windowed [-1000, 1000] HU -> [0, 1] (idm.io.medical.hu_window); axial slices
in read_volume's NIfTI orientation (row 0 posterior, column 0 the patient's left; DICOM slices,
stored the radiological way, are flipped in both axes to match).
  train  ct/totalsegmentator/{aorta,pulmonary}_report_ct_cropped/ct_cropped.nii.gz (read as CT):
         the axial slices with at least F of the pixels above -500 HU; every slice of the DICOM series
         ct/totalsegmentator/example_ct_dicom/ (20 x 512 x 512, JPEG 2000) and
         ct/pydicom_data/693_UNCR.dcm (512 x 512 head).
  val    slices z = 20 and 90 of ct/totalsegmentator/example_ct.nii.gz (101 x 122).
  test   slices z = 40, 56, 75 of example_ct as float32 .npy, sliceZZZ.npy = hu_window(v.data[z])
         (the slices of docs/medical.md).
  example_ct.nii.gz is held out, and so is example_ct_sm.nii.gz: it is the same scan (its array
  equals slices 82-111 of example_ct; checked on every CT train export, recorded in the manifest).
  The other CT sources are other patients: 3-D normalised cross-correlation with example_ct
  <= 0.27 at 3 mm, and the DICOM series shows a different body.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from idm.data.images import load_image
from idm.errors import IDMError
from idm.io.atomic import atomic_directory
from idm.io.medical import CT_WINDOW, MedicalImage, hu_window, read_volume
from idm.training.common import run_script

TOOL = "train.medical_slices"
MIN_SIZE = 96  # smallest height / width of an exported slice
PERCENTILE = 99.9  # MRI: each slice / its 99.9th percentile, clipped
TEMPLATE_STEP = 4  # every 4th slice of a 3-D MRI template
MRI_FOREGROUND = 0.05  # MRI foreground: above 5 % of the volume's max
CT_FOREGROUND_HU = -500.0  # CT foreground (body): above -500 HU
HELD_OUT = {"ct/totalsegmentator/example_ct.nii.gz": "held out: the CT val / test volume",
            "ct/totalsegmentator/example_ct_sm.nii.gz": "held out: a part of the same scan as example_ct"}
_BRATS_SUBJECT = re.compile(r"brats_train_(\d+)_")


@dataclass(frozen=True)
class Source:
    """Files under the data root and how they become slices.

    Attributes:
        pattern: glob relative to the data root (files sorted by name; none found is an error).
        name: output file stem, a format string with the fields ``stem`` (file name less
            ``.nii.gz`` / suffix), ``parent`` (its folder's name), ``axis`` and ``index``.
        views: ``"image"`` (a 2-D file: one slice), ``"stack"`` (every slice along axis 0 of a
            ``(N, H, W)`` array), ``"axial"`` (slices along axis 0 of a volume) or ``"3d"`` (axial,
            coronal and sagittal slices, every :data:`TEMPLATE_STEP`-th, rows flipped: upright).
        norm: ``"percentile"`` (/ 99.9th percentile, clipped), ``"max"`` (magnitude / max) or ``"hu"``.
        only: regular expression the file name must contain (``None``: every file).
        key, modality: passed to :func:`idm.io.medical.read_volume`.
        indices: only these slices along axis 0 (``"stack"`` / ``"axial"``).
        foreground: keep only slices whose foreground fraction is at least --min-foreground.
    """

    pattern: str
    name: str
    views: str = "image"
    norm: str = "percentile"
    only: str | None = None
    key: str | None = None
    modality: str | None = None
    indices: tuple[int, ...] | None = None
    foreground: bool = False


_BRATS = "mri/brats2020_slices"
_CONTRASTS = r"_(t1|t1ce|t2|flair)_\d+"
_TEMPLATE = dict(name="{stem}-{axis}-{index:03d}", views="3d", foreground=True)
_EXAMPLE_CT = "ct/totalsegmentator/example_ct.nii.gz"

#: (modality, split) -> the sources of that split
SOURCES: dict[tuple[str, str], tuple[Source, ...]] = {
    ("mri", "train"): (
        Source(f"{_BRATS}/Diffusion-based-Segmentation/training/*/*.nii.gz", "{stem}", only=_CONTRASTS),
        Source(f"{_BRATS}/diffusion-anomaly/testing/*/*.nii.gz", "{stem}", only=_CONTRASTS),
        Source("mri/multicontrast_syndiff_T1T2/T[12].mat", "syndiff-{stem}-{index:02d}", views="stack", key="data_fs"),
        Source("mri/brain_3d_templates/antspy/ch2.nii.gz", **_TEMPLATE),
        Source("mri/brain_3d_templates/antspy/mni.nii.gz", **_TEMPLATE),
        Source("mri/brain_3d_templates/nilearn/*.nii.gz", **_TEMPLATE),
    ),
    ("mri", "val"): (Source(f"{_BRATS}/Diffusion-based-Segmentation/testing/*/*.nii.gz", "{stem}", only=_CONTRASTS),),
    ("mri", "test"): (
        Source("mri/fastmri_knee_scoremri/real/retrospective/00[123].npy", "knee-retro-{stem}", norm="max"),
        Source("mri/fastmri_knee_scoremri/single-coil/001.npy", "knee-singlecoil-{stem}", norm="max"),
    ),
    ("ct", "train"): (
        Source("ct/totalsegmentator/*_report_ct_cropped/ct_cropped.nii.gz", "{parent}-{index:03d}", views="axial",
               norm="hu", modality="CT", foreground=True),
        Source("ct/totalsegmentator/example_ct_dicom", "{stem}-{index:03d}", views="axial", norm="hu", modality="CT"),
        Source("ct/pydicom_data/693_UNCR.dcm", "{stem}", norm="hu", modality="CT"),
    ),
    ("t2", "train"): (
        Source(f"{_BRATS}/Diffusion-based-Segmentation/training/*/*.nii.gz", "{stem}", only=r"_t2_\d+"),
        Source("mri/multicontrast_syndiff_T1T2/T2.mat", "syndiff-{stem}-{index:02d}", views="stack", key="data_fs"),
    ),
    ("t2", "val"): (Source(f"{_BRATS}/Diffusion-based-Segmentation/training/*/*.nii.gz", "{stem}", only=r"_t[12]_\d+"),),
    ("t2", "test"): (
        Source(f"{_BRATS}/Diffusion-based-Segmentation/testing/*/*.nii.gz", "{stem}", only=r"_t[12]_\d+"),
        Source(f"{_BRATS}/diffusion-anomaly/testing/*/*.nii.gz", "{stem}", only=r"_t[12]_\d+"),
    ),
    ("ct", "val"): (Source(_EXAMPLE_CT, "slice{index:03d}", views="axial", norm="hu", modality="CT",
                           indices=(20, 90)),),
    ("ct", "test"): (Source(_EXAMPLE_CT, "slice{index:03d}", views="axial", norm="hu", modality="CT",
                            indices=(40, 56, 75)),),
}

NORMALISATION = {
    "mri": f"train / val: each slice / its own {PERCENTILE}th percentile, clipped to [0, 1]; "
           "test: / its max magnitude (the complex single-coil slice keeps its phase)",
    "t2": f"each slice / its own {PERCENTILE}th percentile, clipped to [0, 1] (train and the test pairs)",
    "ct": f"hu_window: clip((HU - ({CT_WINDOW[0]:g})) / {CT_WINDOW[1] - CT_WINDOW[0]:g}, 0, 1)",
}


@dataclass
class Slice:
    """One exported slice: ``image`` float32 ``(H, W)`` in [0, 1] and its manifest ``record``."""

    name: str
    image: np.ndarray
    record: dict[str, Any]


# --- slicing and normalisation ----------------------------------------------------------------
def _stem(path: Path) -> str:
    return path.name[: -len(".nii.gz")] if path.name.endswith(".nii.gz") else path.stem


def views(image: MedicalImage, source: Source) -> Iterator[tuple[str | None, int | None, torch.Tensor]]:
    """``(axis, index, slice)`` of an image read by ``read_volume``: each slice ``(H, W)``, real or
    complex, unnormalised; DICOM data are first flipped into the NIfTI orientation."""
    x = image.data
    if str(image.meta.get("format", "")).startswith("dicom"):
        x = x.flip(-2, -1)
    want = 2 if source.views == "image" else 3
    if x.ndim != want:
        raise IDMError(f"{source.pattern}: expected a {want}-D image for views={source.views!r}, got shape "
                       f"{tuple(x.shape)}")
    if source.views == "image":
        yield None, None, x
    elif source.views in ("stack", "axial"):
        for i in source.indices if source.indices is not None else range(x.shape[0]):
            if not 0 <= i < x.shape[0]:
                raise IDMError(f"{source.pattern}: slice {i} out of range (0 ... {x.shape[0] - 1})")
            yield source.views, i, x[i]
    elif source.views == "3d":
        for dim, axis in enumerate(("axial", "coronal", "sagittal")):
            for i in range(0, x.shape[dim], TEMPLATE_STEP):
                yield axis, i, x.select(dim, i).flip(0)
    else:
        raise IDMError(f"unknown views {source.views!r} (image, stack, axial, 3d)")


def foreground(x: torch.Tensor, norm: str, volume_max: float) -> float:
    """Fraction of body pixels of a raw slice: CT above -500 HU, else above 5 % of ``volume_max``."""
    if norm == "hu":
        return float((x > CT_FOREGROUND_HU).float().mean())
    return float((x.abs() > MRI_FOREGROUND * volume_max).float().mean())


def normalise(x: torch.Tensor, norm: str) -> tuple[np.ndarray, dict[str, Any]]:
    """A raw slice ``(H, W)`` -> float32 ``(H, W)`` in [0, 1] (``percentile``: of the magnitude) or, for
    ``max``, the slice divided by its largest magnitude (a complex slice stays complex64: the phase is
    kept for the test arrays), and the record of the normalisation (``scale``: the divisor)."""
    if norm == "hu":
        return hu_window(x).numpy().astype(np.float32), {"method": "hu_window", "window_hu": list(CT_WINDOW)}
    magnitude = x.abs().double().numpy()
    if norm == "percentile":
        scale, record = float(np.percentile(magnitude, PERCENTILE)), {"method": f"/ p{PERCENTILE:g}, clip [0, 1]"}
    elif norm == "max":
        scale, record = float(magnitude.max()), {"method": "magnitude / max"}
    else:
        raise IDMError(f"unknown normalisation {norm!r} (percentile, max, hu)")
    if not (np.isfinite(scale) and scale > 0):
        raise IDMError(f"cannot normalise an empty or non-finite slice ({norm} scale {scale:g})")
    if norm == "max" and x.is_complex():
        return (x.numpy() / scale).astype(np.complex64), {"method": "complex / max magnitude", "scale": scale}
    return np.clip(magnitude / scale, 0.0, 1.0).astype(np.float32), {**record, "scale": scale}


# --- selection -------------------------------------------------------------------------------------
def _glob(root: Path, source: Source) -> list[Path]:
    return sorted(p for p in root.glob(source.pattern) if not source.only or re.search(source.only, p.name))


def _files(root: Path, source: Source) -> list[Path]:
    found = _glob(root, source)
    if not found:
        raise IDMError(f"no files match {source.pattern}{f' ({source.only})' if source.only else ''} under {root}")
    return found


def _subject(path: str) -> str | None:
    match = _BRATS_SUBJECT.search(Path(path).name)
    return match.group(1) if match else None


def exclusions(modality: str, root: Path) -> dict[str, str]:
    """Train files to leave out (relative path -> reason): the held-out CT volumes, and BraTS files
    of subjects that have val slices."""
    excluded = dict(HELD_OUT) if modality == "ct" else {}
    if modality == "mri":
        val = {_subject(str(p)) for s in SOURCES[("mri", "val")] for p in _glob(root, s)} - {None}
        for s in SOURCES[("mri", "train")]:
            for path in _glob(root, s):
                if _subject(str(path)) in val:
                    excluded[path.relative_to(root).as_posix()] = f"BraTS subject {_subject(str(path))} has val slices"
    return excluded


def held_out_check(root: Path) -> dict[str, Any]:
    """Where example_ct_sm lies inside example_ct (both must exist; else ``{}``)."""
    big_path, small_path = (root / p for p in HELD_OUT)
    if not (big_path.is_file() and small_path.is_file()):
        return {}
    big, small = (read_volume(p, modality="CT").data for p in (big_path, small_path))
    offset = next((k for k in range(big.shape[0] - small.shape[0] + 1)
                   if big.shape[1:] == small.shape[1:] and torch.equal(big[k:k + small.shape[0]], small)), None)
    found = f"equal to example_ct slices {offset}-{offset + small.shape[0] - 1}" if offset is not None \
        else "not an exact sub-volume of example_ct"
    return {"example_ct_sm": f"{found} (excluded either way)"}


def collect(modality: str, split: str, root: Path, min_foreground: float, info: dict[str, Any],
            sources: Sequence[Source] | None = None) -> Iterator[Slice]:
    """The slices of one split, read one source file at a time. Fills ``info`` with ``sources``
    (per file read: slices kept and dropped), ``excluded`` (train: :func:`exclusions`) and ``checks``."""
    sources = SOURCES[(modality, split)] if sources is None else sources
    excluded = exclusions(modality, root) if split == "train" else {}
    info.update(sources=[], excluded=dict(excluded),
                checks=held_out_check(root) if (modality, split) == ("ct", "train") else {})
    for source in sources:
        for path in _files(root, source):
            rel = path.relative_to(root).as_posix()
            if rel in excluded:
                continue
            image = read_volume(path, key=source.key, modality=source.modality)
            volume_max = float(image.data.abs().max()) if source.norm != "hu" else 0.0
            kept = dropped = 0
            for axis, index, raw in views(image, source):
                fraction = foreground(raw, source.norm, volume_max)
                if source.foreground and fraction < min_foreground:
                    dropped += 1
                    continue
                try:
                    pixels, norm = normalise(raw, source.norm)
                except IDMError as error:
                    raise IDMError(f"{rel} slice {axis} {index}: {error}") from None
                name = source.name.format(stem=_stem(path), parent=path.parent.name, axis=axis, index=index)
                kept += 1
                yield Slice(name, pixels, {"source": rel, "axis": axis, "index": index, "normalisation": norm,
                                           "split": split, "foreground": round(fraction, 4)})
            info["sources"].append({"source": rel, "slices": kept, "dropped_low_foreground": dropped})


# --- writing ---------------------------------------------------------------------------------------
def write_png16(path: Path, image: np.ndarray) -> None:
    """Write ``image`` ``(H, W)`` in [0, 1] as a 16-bit grayscale PNG: round(x * 65535), mode "I;16"."""
    png = Image.fromarray(np.round(np.clip(image, 0.0, 1.0) * 65535.0).astype(np.uint16))
    if png.mode != "I;16":
        raise IDMError(f"Pillow made a {png.mode!r} image from uint16 pixels, expected 'I;16'")
    png.save(path, format="PNG")


def _check_round_trip(path: Path, image: np.ndarray) -> None:
    """:class:`IDMError` unless ``load_image(path)`` is ``image`` as (1, H, W) within 0.5 / 65535."""
    back = load_image(path)
    same_shape = back.shape[1:] == image.shape
    error = float((back[0].double() - torch.from_numpy(image).double()).abs().max()) if same_shape else None
    if error is None or error > 0.5 / 65535 + 1e-6:
        raise IDMError(f"{path.name} does not read back as written (shape {tuple(back.shape)}, error {error})")


def export(slices: Iterator[Slice], out: str | Path, header: dict[str, Any], info: dict[str, Any],
           test: bool) -> dict[str, Any]:
    """Write ``slices`` into ``out`` (PNG, or ``.npy`` when ``test``) with ``manifest.json``
    (``header`` + ``info`` + per-file records), all or nothing; returns the manifest."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "manifest.json").is_file())):
        raise IDMError(f"--out {out} exists and is not an earlier export (no manifest.json); choose a new folder")
    records: list[dict[str, Any]] = []
    with atomic_directory(out) as temp:
        for s in slices:
            if s.image.ndim != 2 or min(s.image.shape) < MIN_SIZE:
                raise IDMError(f"{s.record['source']}: slice {s.name} is {'x'.join(map(str, s.image.shape))}, "
                               f"smaller than {MIN_SIZE}x{MIN_SIZE}")
            values = np.abs(s.image) if np.iscomplexobj(s.image) else s.image
            if not (np.isfinite(values).all() and 0.0 <= values.min() and values.max() <= 1.0 + 1e-6):
                raise IDMError(f"{s.record['source']}: slice {s.name} is not in [0, 1]")
            file = f"{s.name}.npy" if test else f"{s.name}.png"
            if (temp / file).exists():
                raise IDMError(f"two slices are named {file} (from {s.record['source']})")
            if test:
                np.save(temp / file, s.image if np.iscomplexobj(s.image) else s.image.astype(np.float32))
            else:
                write_png16(temp / file, s.image)
                _check_round_trip(temp / file, s.image)
            records.append({"file": file, **s.record, "shape": list(s.image.shape)})
        if not records:
            raise IDMError(f"no slices selected for {header['modality']} {header['split']}")
        sizes = Counter("x".join(map(str, r["shape"])) for r in records)
        manifest = {**header, "count": len(records), "sizes": dict(sorted(sizes.items())), **info, "files": records}
        (temp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def export_split(modality: str, split: str, data: str | Path, out: str | Path, *, min_foreground: float = 0.15,
                 sources: Sequence[Source] | None = None, command: str = "") -> dict[str, Any]:
    """Export one split (see the module docstring) of the data root ``data`` into ``out``; ``sources``
    replaces the split's :data:`SOURCES`. Returns the manifest."""
    if (modality, split) not in SOURCES:
        raise IDMError(f"unknown modality / split {modality} / {split} (mri|ct|t2: train|val|test)")
    if not 0.0 <= min_foreground < 1.0:
        raise IDMError(f"--min-foreground must lie in [0, 1), got {min_foreground:g}")
    root = Path(data)
    if not root.is_dir():
        raise IDMError(f"data folder not found: {root}")
    test = split == "test"
    used = SOURCES[(modality, split)] if sources is None else tuple(sources)
    header = {"tool": TOOL, "command": command, "modality": modality, "split": split, "data": str(data),
              "format": "float32 .npy (H, W) in [0, 1]" if test else "16-bit grayscale PNG, round(x * 65535)",
              "normalisation": NORMALISATION[modality], "min_foreground": min_foreground,
              "selection": [asdict(s) for s in used]}
    info: dict[str, Any] = {}
    return export(collect(modality, split, root, min_foreground, info, used), out, header, info, test)


# --- command line ----------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--modality", required=True, choices=("mri", "ct", "t2"))
    parser.add_argument("--split", required=True, choices=("train", "val", "test"))
    parser.add_argument("--data", required=True, help="the data root (../shared/data)")
    parser.add_argument("--out", required=True, help="output folder (replaced as a whole)")
    parser.add_argument("--min-foreground", type=float, default=0.15,
                        help="least foreground fraction of a kept template / CT volume slice (default 0.15)")
    return parser


def run(args: argparse.Namespace) -> int:
    command = (f"python -m {TOOL} --modality {args.modality} --split {args.split} --data {args.data} "
               f"--out {args.out} --min-foreground {args.min_foreground:g}")
    manifest = export_split(args.modality, args.split, args.data, args.out, min_foreground=args.min_foreground,
                            command=command)
    sizes = ", ".join(f"{n} x {size}" for size, n in manifest["sizes"].items())
    print(f"wrote {manifest['count']} slices to {args.out} ({sizes}); "
          f"{len(manifest['excluded'])} files excluded (see manifest.json)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {TOOL}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    return run_script(add_arguments(parser), run, argv)


if __name__ == "__main__":
    sys.exit(main())
