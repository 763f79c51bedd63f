"""Script: fine-tune the IDM network (or train the unrolled baseline); see :mod:`idm.training.finetune`.

    python -m train.finetune --init prior-gray --ratio 0.1 --data DIR --out runs/idm-cs10 ...
    python train/finetune.py ...                   (the same)
    accelerate launch -m train.finetune ...        (multi-GPU / multi-CPU)

The code lives in the library (``idm finetune`` and ``python -m idm.training.finetune`` take the
same options in any installation); this file keeps the checkout's ``train/`` entry point.
"""

import sys

from idm.training.finetune import main

if __name__ == "__main__":
    sys.exit(main())
