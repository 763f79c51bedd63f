"""The README's five-line Python usage keeps working."""

from __future__ import annotations

import re
from pathlib import Path

import idm
from idm.data import sample_images
from idm.metrics import psnr
from idm.physics import BlockCS

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    x, x_hat = namespace["x"], namespace["x_hat"]
    assert x_hat.shape == x.shape == (1, 1, 256, 256)
    assert float(psnr(x_hat.clamp(0, 1), x)[0]) > 24.0


def test_reconstruct_matches_the_registered_method():
    x = sample_images(64)["camera"][None]
    op = BlockCS(x.shape[2:], ratio=0.5, seed=1)
    y = op.measure(x)
    assert (idm.reconstruct(y, op, method="pinv") - op.A_dagger(y)).abs().max() == 0
