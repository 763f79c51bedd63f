"""The checkpoints shipped in ``checkpoints/``: each loads by name, matches its name's ratio, carries a
model card with its provenance, and reconstructs a sample image far better than A†y. One case per
folder found, so a new checkpoint is covered when added."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from idm.data.samples import sample_images
from idm.metrics import psnr
from idm.physics import BlockCS
from idm.registry import get_method

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
#: (folder name, method family, sampling ratio) of every shipped reconstructor, e.g. ("idm-cs10", "idm", 0.1)
RECONSTRUCTORS = sorted(
    (m[0], m[1], int(m[2]) / 100)
    for m in (re.fullmatch(r"(idm|unrolled)-cs(\d+)", p.name) for p in CHECKPOINTS.iterdir()) if m
)
#: what every model card states (issue: data, command, steps, batch, hardware, wall time, metrics)
CARD_FIELDS = ("Train400", "Command", "steps x batch", "hardware", "wall time", "BSD68", "Set12")


def test_the_shipped_reconstructors_are_found() -> None:
    assert {"unrolled-cs10", "unrolled-cs30", "unrolled-cs50"} <= {name for name, _, _ in RECONSTRUCTORS}


@pytest.mark.parametrize(("name", "family", "ratio"), RECONSTRUCTORS)
def test_shipped_checkpoint_config_and_card(name: str, family: str, ratio: float) -> None:
    config = json.loads((CHECKPOINTS / name / "config.json").read_text())
    assert config["architecture"] == family
    assert config["ratio"] == pytest.approx(ratio)
    assert config["block_size"] == 32 and config["operator"] == "blockcs"
    card = (CHECKPOINTS / name / "README.md").read_text()
    missing = [field for field in CARD_FIELDS if field not in card]
    assert not missing, f"model card of {name} lacks {missing}"
    weights = CHECKPOINTS / name / "model.safetensors"
    assert weights.stat().st_size < 10 * 2**20  # compact (fp16)


@pytest.mark.parametrize(("name", "family", "ratio"), RECONSTRUCTORS)
def test_shipped_checkpoint_reconstructs_a_sample_image(name: str, family: str, ratio: float) -> None:
    x = sample_images(64)["camera"][None]  # (1, 1, 64, 64) in [0, 1]
    op = BlockCS((64, 64), ratio, seed=3)
    y = op.A(x)
    reconstruct = get_method(family).build(ratio=ratio)  # picks the shipped checkpoint by ratio
    estimate = reconstruct(y, op)
    assert estimate.shape == x.shape and bool(torch.isfinite(estimate).all())
    baseline = float(psnr(op.A_dagger(y).clamp(0, 1), x)[0])
    assert float(psnr(estimate.clamp(0, 1), x)[0]) > baseline + 5
