"""Script: train a learned 2-D registration (DiffuseMorph or the VoxelMorph-style baseline); see
:mod:`idm.training.registration`.

    python -m train.registration --data runs/data/reg/train --arch ddm --out runs/ddm-brain --steps 3000
"""

import sys

from idm.training.registration import main

if __name__ == "__main__":
    sys.exit(main())
