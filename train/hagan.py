"""Script: train HA-GAN on whole volumes; see :mod:`idm.training.hagan`.

    python -m train.hagan_volumes --size 64 --out runs/data/hagan64
    python -m train.hagan --data runs/data/hagan64/ct/train --val runs/data/hagan64/ct/val --out runs/hagan-ct
"""

import sys

from idm.training.hagan import main

if __name__ == "__main__":
    sys.exit(main())
