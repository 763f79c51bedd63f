"""Brain slices and held-out pairs for learned registration (issue 23: DiffuseMorph against VoxelMorph
and a classical registration).

    python -m train.registration_slices --data ../shared/data --out runs/data/reg

Sources (``../shared/data/mri``):

* the three T1 brain templates of ``brain_3d_templates`` — Colin27 (``ch2``), MNI152 (``mni``) and ICBM152
  2009a (``icbm``) — resampled with their affines onto one 2 mm grid of MNI space (x −90…90, y −126…90,
  z −72…108 mm: 91 × 109 × 91, linear interpolation), so that axial slice ``z`` of one template and of
  another show matched depth: **inter-subject pairs**;
* the BraTS T1 slices (``brats2020_slices``, 240² at 1 mm) reduced to 120² (2 mm, area average).

Every slice is scaled by the 99.5th percentile of its volume (its own, for BraTS) to [0, 1], padded to
128 × 128 (centred) and written as float32 ``(128, 128)`` ``.npy``:

* ``train/<source>_z<zz>.npy``: template slices with z in 10…80 **outside 40…59**, and the BraTS slices of
  subject 001. Training pairs are drawn from these (inter-subject at matched depth, and each slice against
  itself under a random smooth deformation: :class:`idm.training.registration.PairSampler`).
* ``test/<name>_moving.npy``, ``<name>_fixed.npy`` (and ``<name>_field.npy``, ``(2, 128, 128)`` pixels, for
  synthetic pairs): held-out depths z = 46, 50, 54 — inter-subject ``ch2→mni``, ``icbm→mni``, ``ch2→icbm``
  (9 pairs) and each template's slice against itself warped by a seeded random field of known truth
  (9 pairs, fixed = moving ∘ (id + field)) — and the BraTS T1 slices of subjects 006 and 040 under seeded
  fields (4 pairs). Slices z = 40…59 are never trained on.

``OUT/manifest.json`` lists every file. OUT is written in a temporary sibling and renamed at the end.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

from idm.errors import IDMError
from idm.io.atomic import atomic_directory
from idm.training.common import run_script

TOOL = "train.registration_slices"
TEMPLATES = {"ch2": "mri/brain_3d_templates/antspy/ch2.nii.gz", "mni": "mri/brain_3d_templates/antspy/mni.nii.gz",
             "icbm": "mri/brain_3d_templates/nilearn/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"}
BRATS = "mri/brats2020_slices"
#: the common 2 mm grid of MNI space (shape, origin in mm)
GRID_SHAPE, GRID_ORIGIN, SPACING = (91, 109, 91), (-90.0, -126.0, -72.0), 2.0
SIZE = 128
TRAIN_Z, HELD_OUT_Z, TEST_Z = range(10, 81), range(40, 60), (46, 50, 54)
TEST_PAIRS = (("ch2", "mni"), ("icbm", "mni"), ("ch2", "icbm"))
BRATS_SPLIT = {"001": "train", "006": "test", "040": "test"}
#: amplitude (pixels at 128²) and control grid of the synthetic test fields
FIELD_AMPLITUDE, FIELD_CONTROL = 4.0, 5
_BRATS_T1 = re.compile(r"brats_train_(\d+)_t1_(\d+)_w\.nii")


def pad(image: np.ndarray, shape: tuple[int, ...] = (SIZE, SIZE)) -> np.ndarray:
    """``image`` centred on a zero float32 canvas of ``shape`` (default ``SIZE × SIZE``; volumes too)."""
    if image.ndim != len(shape) or any(n > s for n, s in zip(image.shape, shape)):
        raise IDMError(f"an image of {image.shape} does not fit {shape}")
    out = np.zeros(shape, np.float32)
    corner = [(s - n) // 2 for n, s in zip(image.shape, shape)]
    out[tuple(slice(c, c + n) for c, n in zip(corner, image.shape))] = image
    return out


def template_volume(path: Path) -> np.ndarray:
    """A template on the common grid, scaled by its 99.5th percentile and clipped to [0, 1]."""
    import nibabel as nib
    from nibabel.processing import resample_from_to

    image = nib.load(str(path))
    affine = np.diag([SPACING, SPACING, SPACING, 1.0])
    affine[:3, 3] = GRID_ORIGIN
    data = np.asarray(resample_from_to(image, (GRID_SHAPE, affine), order=1).dataobj, dtype=np.float32)
    return np.clip(data / np.percentile(data[data > 0], 99.5), 0, 1)


def axial(volume: np.ndarray, z: int) -> np.ndarray:
    """Axial slice ``z`` (RAS grid) turned to radiological display (anterior up), padded."""
    return pad(np.rot90(volume[:, :, z]).copy())


def brats_slices(root: Path) -> list[tuple[str, str, np.ndarray]]:
    """``(subject, slice, image 128²)`` of every BraTS T1 slice (2 mm, scaled, padded)."""
    from idm.io.medical import read_volume, single_slice

    out = []
    for path in sorted((root / BRATS).rglob("*.nii*")):
        match = _BRATS_T1.search(path.name)
        if not match:
            continue
        image = single_slice(read_volume(path).data, path).numpy()
        if image.shape != (240, 240):
            raise IDMError(f"{path} is {image.shape}, expected a 240 x 240 slice")
        small = image.reshape(120, 2, 120, 2).mean((1, 3))
        out.append((*match.groups(), pad(np.clip(small / np.percentile(small[small > 0], 99.5), 0, 1))))
    return out


def synthetic_pair(moving: np.ndarray, seed: int, amplitude: float = FIELD_AMPLITUDE,
                   control: int = FIELD_CONTROL) -> tuple[np.ndarray, np.ndarray]:
    """``(fixed, field)``: ``moving`` (a slice or a volume) warped by a seeded random smooth field
    (``fixed = moving ∘ (id + field)``)."""
    import torch

    from idm.medical.registration import random_field, warp

    field = random_field(moving.shape, amplitude=amplitude, control=control,
                         generator=torch.Generator().manual_seed(seed))
    fixed = warp(torch.from_numpy(moving)[None, None], field)[0, 0]
    return fixed.numpy(), field[0].numpy()


def export(data: Path, out: Path) -> dict:
    volumes = {}
    for name, rel in TEMPLATES.items():
        if not (data / rel).is_file():
            raise IDMError(f"template not found: {data / rel}")
        volumes[name] = template_volume(data / rel)
    manifest: dict = {"tool": TOOL, "grid": {"shape": GRID_SHAPE, "origin_mm": GRID_ORIGIN, "spacing_mm": SPACING},
                      "held_out_z": [HELD_OUT_Z.start, HELD_OUT_Z.stop - 1], "train": [], "test": []}
    with atomic_directory(out) as tmp:
        (tmp / "train").mkdir()
        (tmp / "test").mkdir()
        for name, volume in volumes.items():
            for z in TRAIN_Z:
                if z in HELD_OUT_Z:
                    continue
                np.save(tmp / "train" / f"{name}_z{z:02d}.npy", axial(volume, z))
                manifest["train"].append({"file": f"{name}_z{z:02d}.npy", "source": TEMPLATES[name], "z": z})
        seed = 0
        for z in TEST_Z:
            for moving, fixed in TEST_PAIRS:
                stem = f"{moving}-{fixed}_z{z:02d}"
                np.save(tmp / "test" / f"{stem}_moving.npy", axial(volumes[moving], z))
                np.save(tmp / "test" / f"{stem}_fixed.npy", axial(volumes[fixed], z))
                manifest["test"].append({"name": stem, "kind": "inter-subject", "z": z})
            for name, volume in volumes.items():
                stem = f"{name}-synthetic_z{z:02d}"
                moving = axial(volume, z)
                fixed, field = synthetic_pair(moving, seed)
                seed += 1
                for part, array in (("moving", moving), ("fixed", fixed), ("field", field)):
                    np.save(tmp / "test" / f"{stem}_{part}.npy", array)
                manifest["test"].append({"name": stem, "kind": "synthetic", "z": z, "seed": seed - 1})
        for subject, index, image in brats_slices(data):
            split = BRATS_SPLIT.get(subject)
            if split == "train":
                np.save(tmp / "train" / f"brats{subject}_s{index}.npy", image)
                manifest["train"].append({"file": f"brats{subject}_s{index}.npy", "source": BRATS, "subject": subject})
            elif split == "test":
                stem = f"brats{subject}-synthetic_s{index}"
                fixed, field = synthetic_pair(image, seed)
                seed += 1
                for part, array in (("moving", image), ("fixed", fixed), ("field", field)):
                    np.save(tmp / "test" / f"{stem}_{part}.npy", array)
                manifest["test"].append({"name": stem, "kind": "synthetic", "subject": subject, "seed": seed - 1})
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def data_script(tool: str, doc: str, default_out: str, export_fn, unit: str):
    """The ``main(argv)`` of a registration data tool: ``--data``, ``--out``, ``export_fn(data, out)`` → manifest."""

    def run(args: argparse.Namespace) -> int:
        manifest = export_fn(Path(args.data), Path(args.out))
        print(f"{len(manifest['train'])} training {unit}, {len(manifest['test'])} test pairs → {args.out}")
        return 0

    def main(argv: list[str] | None = None) -> int:
        parser = argparse.ArgumentParser(prog=f"python -m {tool}", description=doc,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--data", default="../shared/data", help="the shared data folder (default ../shared/data)")
        parser.add_argument("--out", default=default_out, help=f"output folder (default {default_out})")
        return run_script(parser, run, argv)

    return main


main = data_script(TOOL, __doc__, "runs/data/reg", export, "slices")


if __name__ == "__main__":
    sys.exit(main())
