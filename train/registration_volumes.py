"""Brain volumes and held-out pairs for learned 3-D registration (issue 23: DiffuseMorph in 3-D, the same
code as the 2-D slices).

    python -m train.registration_volumes --data ../shared/data --out runs/data/reg3d

The three T1 brain templates of ``brain_3d_templates`` — Colin27 (``ch2``), MNI152 (``mni``), ICBM152 2009a
(``icbm``) — on the common 2 mm MNI grid of :mod:`train.registration_slices` (same resampling and scaling
by the 99.5th percentile), reduced to **4 mm** (2 × 2 × 2 block means of the grid padded to even sizes:
46 × 55 × 46), stored as ``(z, row, column)`` with every axial plane in the slices' display orientation
(anterior up) and centred on a ``48 × 64 × 48`` zero canvas (multiples of 16, the networks' size
multiple): float32 ``.npy`` on [0, 1].

* ``train/ch2.npy``, ``train/mni.npy``: the training volumes. Training pairs (:class:`idm.training.registration
  .PairSampler`) are the two against each other and each against itself under a random smooth field.
* ``test/<name>_moving.npy``, ``_fixed.npy`` (``_field.npy``, ``(3, 48, 64, 48)`` voxels, for synthetic
  pairs): ICBM152 is **held out** — inter-subject ``icbm→ch2``, ``icbm→mni``, ``ch2→icbm``, ``mni→icbm``
  (4 pairs) and ICBM152 against itself under 3 seeded random fields of known truth (amplitude 2 voxels
  = 8 mm, 5³ control points).

``OUT/manifest.json`` lists every file. OUT is written in a temporary sibling and renamed at the end.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from idm.errors import IDMError
from idm.io.atomic import atomic_directory

from .registration_slices import TEMPLATES, data_script, pad, synthetic_pair, template_volume

TOOL = "train.registration_volumes"
SHAPE = (48, 64, 48)
TRAIN, HELD_OUT = ("ch2", "mni"), "icbm"
TEST_PAIRS = (("icbm", "ch2"), ("icbm", "mni"), ("ch2", "icbm"), ("mni", "icbm"))
#: amplitude (voxels at 4 mm), control grid and seeds of the synthetic test fields
FIELD_AMPLITUDE, FIELD_CONTROL, FIELD_SEEDS = 2.0, 5, (0, 1, 2)


def reduce(volume: np.ndarray) -> np.ndarray:
    """A 2 mm template ``(x, y, z)`` → 4 mm ``(z, row, column)`` (display orientation) on the ``SHAPE`` canvas."""
    even = np.pad(volume, [(0, s % 2) for s in volume.shape])
    small = even.reshape(even.shape[0] // 2, 2, even.shape[1] // 2, 2, even.shape[2] // 2, 2).mean((1, 3, 5))
    return pad(np.stack([np.rot90(small[:, :, z]) for z in range(small.shape[2])]), SHAPE)


def export(data: Path, out: Path) -> dict:
    volumes = {}
    for name, rel in TEMPLATES.items():
        if not (data / rel).is_file():
            raise IDMError(f"template not found: {data / rel}")
        volumes[name] = reduce(template_volume(data / rel))
    manifest: dict = {"tool": TOOL, "shape": SHAPE, "spacing_mm": 4.0, "held_out": HELD_OUT, "train": [], "test": []}
    with atomic_directory(out) as tmp:
        (tmp / "train").mkdir()
        (tmp / "test").mkdir()
        for name in TRAIN:
            np.save(tmp / "train" / f"{name}.npy", volumes[name])
            manifest["train"].append({"file": f"{name}.npy", "source": TEMPLATES[name]})
        for moving, fixed in TEST_PAIRS:
            stem = f"{moving}-{fixed}"
            np.save(tmp / "test" / f"{stem}_moving.npy", volumes[moving])
            np.save(tmp / "test" / f"{stem}_fixed.npy", volumes[fixed])
            manifest["test"].append({"name": stem, "kind": "inter-subject"})
        for seed in FIELD_SEEDS:
            stem = f"{HELD_OUT}-synthetic{seed}"
            fixed, field = synthetic_pair(volumes[HELD_OUT], seed, FIELD_AMPLITUDE, FIELD_CONTROL)
            for part, array in (("moving", volumes[HELD_OUT]), ("fixed", fixed), ("field", field)):
                np.save(tmp / "test" / f"{stem}_{part}.npy", array)
            manifest["test"].append({"name": stem, "kind": "synthetic", "seed": seed})
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


main = data_script(TOOL, __doc__, "runs/data/reg3d", export, "volumes")


if __name__ == "__main__":
    sys.exit(main())
