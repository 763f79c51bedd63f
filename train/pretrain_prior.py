"""Script: pre-train the diffusion prior; see :mod:`idm.training.pretrain`.

    python -m train.pretrain_prior --data DIR --out runs/prior --steps 10000 ...
    python train/pretrain_prior.py ...              (the same)
    accelerate launch -m train.pretrain_prior ...   (multi-GPU)

The code lives in the library (``idm pretrain`` and ``python -m idm.training.pretrain`` take the
same options in any installation); this file keeps the checkout's ``train/`` entry point.
"""

import sys

from idm.training.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
