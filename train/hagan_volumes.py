"""Script: the HA-GAN training volumes — CT (TotalSegmentator test files) and T1 brain templates resampled to one
isotropic spacing and cropped / padded to a cube, on [0, 1], as ``.npy`` in a git-ignored folder.

    python -m train.hagan_volumes --size 64 --out runs/data/hagan

writes ``OUT/ct/train/*.npy``, ``OUT/ct/val/*.npy`` (the held-out volume), ``OUT/brain/{train,val}/*.npy``
and ``OUT/volumes.json`` (sources, spacing, crop centres). Spacing: ``192 / size`` mm (64³ → 3 mm, 128³ →
1.5 mm: a 192 mm field of view). CT is windowed to [−1000, 1000] HU (:func:`idm.io.medical.hu_window`),
brain T1 divided by its 99.5th percentile (:func:`idm.generative.hagan.normalise_intensity`). Larger volumes
give several crops along z (and the middle in y, x); smaller sides are padded with 0 (air / background).

Held out (never trained on; the encoder's reconstruction PSNR is measured on it): the CT
``pulmonary_report_ct_cropped`` and the brain ``mni_icbm152_t1_tal_nlin_sym_09a``. ``example_ct_sm`` is a
30-slice part of ``example_ct`` and is not used.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

#: (name, path under the data root, modality, role, crop centres along z as fractions)
SOURCES = (
    ("example_ct", "ct/totalsegmentator/example_ct.nii.gz", "CT", "train", (0.3, 0.5, 0.7)),
    ("aorta_ct", "ct/totalsegmentator/aorta_report_ct_cropped/ct_cropped.nii.gz", "CT", "train", (0.35, 0.65)),
    ("pulmonary_ct", "ct/totalsegmentator/pulmonary_report_ct_cropped/ct_cropped.nii.gz", "CT", "val", (0.5,)),
    ("colin27", "mri/brain_3d_templates/antspy/ch2.nii.gz", "T1", "train", (0.5,)),
    ("mni152", "mri/brain_3d_templates/antspy/mni.nii.gz", "T1", "train", (0.5,)),
    ("icbm152_2009a", "mri/brain_3d_templates/nilearn/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", "T1", "val",
     (0.5,)),
)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"),
                        help="the shared data folder (default ../shared/data)")
    parser.add_argument("--out", default="runs/data/hagan", help="output folder (default runs/data/hagan)")
    parser.add_argument("--size", type=int, default=64, help="cube side in voxels (default 64)")
    parser.add_argument("--fov", type=float, default=192.0, help="field of view in mm: spacing = fov / size (default 192)")
    return parser


def run(args: argparse.Namespace) -> int:
    from idm.errors import IDMError
    from idm.generative.hagan import prepare_volume
    from idm.io.medical import read_volume

    root, out = Path(args.data), Path(args.out)
    if not root.is_dir():
        raise IDMError(f"data folder not found: {root}")
    if args.size < 8 or args.fov <= 0:
        raise IDMError("--size must be >= 8 and --fov > 0")
    spacing = args.fov / args.size
    record = {"size": args.size, "spacing_mm": spacing, "volumes": []}
    for name, rel, modality, role, centres in SOURCES:
        image = read_volume(root / rel, modality="CT" if modality == "CT" else None)
        kind = "ct" if modality == "CT" else "brain"
        folder = out / kind / role
        folder.mkdir(parents=True, exist_ok=True)
        for i, centre in enumerate(centres):
            volume = prepare_volume(image.data, image.spacing, (spacing,) * 3, (args.size,) * 3, modality,
                                    center=(centre, 0.5, 0.5))
            stem = f"{name}_{i}" if len(centres) > 1 else name
            np.save(folder / f"{stem}.npy", volume.numpy().astype(np.float32))
            record["volumes"].append({"file": f"{kind}/{role}/{stem}.npy", "source": rel, "modality": modality,
                                      "role": role, "z_centre": centre, "source_spacing_mm": list(image.spacing),
                                      "source_shape": list(image.data.shape),
                                      "mean": round(float(volume.mean()), 4)})
            print(f"{kind}/{role}/{stem}.npy  from {rel} {tuple(image.data.shape)} @ {image.spacing} mm, "
                  f"mean {float(volume.mean()):.3f}")
        del image
    (out / "volumes.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    from idm.training.common import run_script

    parser = argparse.ArgumentParser(prog="python -m train.hagan_volumes", description=__doc__.splitlines()[0])
    return run_script(add_arguments(parser), run, argv)


if __name__ == "__main__":
    sys.exit(main())
