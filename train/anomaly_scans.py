"""Export the BraTS2020 slices as four-contrast scans for anomaly detection (issue 22).

    python -m train.anomaly_scans --data ../shared/data --out runs/data/brats4

Every case folder under ``mri/brats2020_slices`` holds one 240 x 240 slice in four contrasts (t1, t1ce,
t2, flair; on [0, 1] as stored). Each becomes ``SPLIT/scans/<case>.npy``, float32 ``(4, H, W)`` in the
channel order of :data:`idm.medical.anomaly.CONTRASTS` (what ``idm pretrain`` trains a 4-channel DDPM
on), and, where a label map exists, ``SPLIT/masks/<case>.npy``, uint8 ``(H, W)``: 1 = tumour (any
non-zero label). Splits by subject:

* ``train``: subject 001 (slices 080-085, labelled: ``seg``) and subject 040 (slice 087, no label:
  scans only, for the DDPM);
* ``test``: subject 006, slices 081 and 082 (labels ``diffusion-anomaly/test_labels``) — never trained on;
* left out: subject 006 slice 080 (no label, and the neighbour of both test slices).

``OUT/manifest.json`` lists every file with its source. OUT is written in a temporary sibling and
renamed at the end (nothing half-written).
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
from idm.medical.anomaly import read_mask, read_scan
from idm.training.common import run_script

TOOL = "train.anomaly_scans"
BRATS = "mri/brats2020_slices"
#: subject → split; slices listed in LEFT_OUT are not exported
SPLITS = {"001": "train", "040": "train", "006": "test"}
LEFT_OUT = {("006", "080"): "no label, and the neighbour of the test slices 081 / 082"}
_NAME = re.compile(r"brats_train_(\d+)_t1_(\d+)")


def cases(root: Path) -> list[tuple[str, str, Path, Path | None]]:
    """``(subject, slice, case folder, label file or None)`` of every BraTS case folder under ``root``."""
    found = []
    for folder in sorted(p for p in (root / BRATS).glob("*/*/*") if p.is_dir()):
        t1 = [p for p in folder.iterdir() if _NAME.search(p.name)]
        if len(t1) != 1:
            continue
        subject, index = _NAME.search(t1[0].name).groups()
        seg = sorted(folder.glob("*_seg_*.nii*"))
        label = seg[0] if seg else root / BRATS / "diffusion-anomaly/test_labels" / f"{folder.name}-label.nii.gz"
        found.append((subject, index, folder, label if label.is_file() else None))
    if not found:
        raise IDMError(f"no BraTS case folders under {root / BRATS}")
    return found


def export(data: str | Path, out: str | Path, command: str) -> dict:
    root = Path(data)
    if not root.is_dir():
        raise IDMError(f"data folder not found: {root}")
    records, left_out = [], {}
    with atomic_directory(out) as temp:
        for subject, index, folder, label in cases(root):
            name = f"brats_{subject}_{index}"
            if (subject, index) in LEFT_OUT or subject not in SPLITS:
                left_out[name] = LEFT_OUT.get((subject, index), "subject outside the splits")
                continue
            split = SPLITS[subject]
            scan = read_scan(folder).numpy()
            (temp / split / "scans").mkdir(parents=True, exist_ok=True)
            np.save(temp / split / "scans" / f"{name}.npy", scan)
            record = {"split": split, "scan": f"{split}/scans/{name}.npy", "source": folder.relative_to(root).as_posix(),
                      "shape": list(scan.shape)}
            if label is not None:
                mask = read_mask(label).numpy().astype(np.uint8)
                (temp / split / "masks").mkdir(parents=True, exist_ok=True)
                np.save(temp / split / "masks" / f"{name}.npy", mask)
                record.update(mask=f"{split}/masks/{name}.npy", label=label.relative_to(root).as_posix(),
                              tumour_fraction=round(float(mask.mean()), 4))
            records.append(record)
        manifest = {"tool": TOOL, "command": command, "contrasts": ["t1", "t1ce", "t2", "flair"],
                    "files": records, "left_out": left_out}
        (temp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def run(args: argparse.Namespace) -> int:
    manifest = export(args.data, args.out, f"python -m {TOOL} --data {args.data} --out {args.out}")
    counts = {s: sum(r["split"] == s for r in manifest["files"]) for s in ("train", "test")}
    print(f"wrote {counts['train']} train and {counts['test']} test scans to {args.out} "
          f"({sum('mask' in r for r in manifest['files'])} with masks); {len(manifest['left_out'])} left out")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {TOOL}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the data root (../shared/data)")
    parser.add_argument("--out", required=True, help="output folder (replaced as a whole)")
    return run_script(parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
