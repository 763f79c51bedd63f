"""Are the SynDiff sample T1 / T2 slices pairs? Brain-mask Dice of T1 slice i with every T2 slice j.

    python docs/results/translation/syndiff_pairing.py [../shared/data]

Prints, per index i, the Dice with T2 slice i and the best-matching T2 index. Co-registered pairs would
have their best match on the diagonal with Dice near 1; these do not (docs/translation.md).
"""

import sys
from pathlib import Path

import h5py
import numpy as np

root = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data") / "mri/multicontrast_syndiff_T1T2"
t1, t2 = (np.array(h5py.File(root / f"{c}.mat", "r")["data_fs"]) > 0.05 for c in ("T1", "T2"))
dice = np.array([[2 * (a & b).sum() / (a.sum() + b.sum()) for b in t2] for a in t1])
best = dice.argmax(1)
for i in range(len(t1)):
    print(f"T1 {i:2d}: Dice with T2 {i:2d} = {dice[i, i]:.2f}; best T2 {best[i]:2d} (Dice {dice[i, best[i]]:.2f})")
print(f"best match on the diagonal for {int((best == np.arange(len(t1))).sum())} of {len(t1)} slices")
