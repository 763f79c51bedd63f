"""Script: train the noise-aware healthy / diseased classifier; see :mod:`idm.training.classifier`.

    python -m train.anomaly_classifier --scans runs/data/brats4/train/scans --masks runs/data/brats4/train/masks \\
        --out runs/classifier --steps 2000
"""

import sys

from idm.training.classifier import main

if __name__ == "__main__":
    sys.exit(main())
