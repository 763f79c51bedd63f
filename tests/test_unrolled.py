"""The learned ``unrolled`` baseline (ISTA-Net⁺ family): network, checkpoints, method, training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from idm.baselines.unrolled import UnrolledConfig, UnrolledNet, load_unrolled
from idm.data import save_image
from idm.errors import IDMError
from idm.io.checkpoint import read_checkpoint_config
from idm.physics import BlockCS, Inpainting, SuperResolution
from idm.registry import get_method
from idm.training.finetune import main as train_main

from conftest import blockcs_training_losses

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = UnrolledConfig(phases=3, channels=8)


def images(batch: int = 2, size: int = 32) -> torch.Tensor:
    x = torch.rand(batch, 1, size // 4, size // 4, generator=torch.Generator().manual_seed(0))
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


@pytest.mark.parametrize("op", [BlockCS((40, 40), 0.1, block_size=32), BlockCS((40, 36), 0.25, block_size=8),
                                Inpainting((40, 36), ratio=0.5), SuperResolution((40, 36), 2)],
                         ids=["blockcs-b32", "blockcs-b8", "inpainting", "superres"])
def test_any_operator_gives_an_image_of_its_domain(op) -> None:
    net = UnrolledNet(SMALL)
    x = torch.rand(2, 1, *op.image_size)
    with torch.no_grad():
        out = net(op.measure(x), op)
    assert out.shape == (2, 1, *op.domain_size) and torch.isfinite(out).all()
    if op.domain_size != op.image_size:  # block CS pads 40×40 → 64×64 (B = 32), 40×36 → 40×40 (B = 8)
        assert torch.equal(op.pad(op.crop(out)), out)  # the padding, zero in every signal, is estimated as zero
        assert op.crop(out).abs().sum() > 0


def test_one_phase_is_a_gradient_step_plus_a_learned_residual() -> None:
    torch.manual_seed(0)
    net = UnrolledNet(UnrolledConfig(phases=1, channels=4))
    phase = net.phases[0]
    with torch.no_grad():
        phase.project.weight.zero_()
        phase.project.bias.zero_()  # no proximal correction: x₁ = x₀ − ρ Aᵀ(A x₀ − y)
        phase.rho.fill_(0.7)
    op = Inpainting((16, 16), ratio=0.5, seed=1)
    x = torch.rand(1, 1, 16, 16)
    y = op.A(x)
    x0 = op.A_dagger(y)
    with torch.no_grad():
        assert torch.allclose(net(y, op), x0 - 0.7 * op.A_adjoint(op.A(x0) - y))


def test_loss_falls_in_a_few_steps() -> None:
    torch.manual_seed(0)
    losses = blockcs_training_losses(UnrolledNet(SMALL), images(4), steps=15)
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0]


def test_checkpoint_round_trip_and_method_picks_the_ratio(tmp_path: Path, monkeypatch) -> None:
    torch.manual_seed(0)
    net = UnrolledNet(SMALL)
    net.save(tmp_path / "unrolled-cs25", "# tiny", ratio=0.25, block_size=8, dtype=None)
    loaded, config = load_unrolled(tmp_path / "unrolled-cs25", ratio=0.25)
    assert config["unrolled"] == SMALL.to_dict()
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(IDMError, match="ratio"):
        load_unrolled(tmp_path / "unrolled-cs25", ratio=0.5)

    monkeypatch.setenv("IDM_CHECKPOINT_DIR", str(tmp_path))
    build = get_method("unrolled").build
    reconstruct = build(ratio=0.25)
    op = BlockCS((32, 32), 0.25, block_size=8)
    y = op.measure(images(1))
    with torch.no_grad():
        assert torch.equal(reconstruct(y, op), net(y, op))
    with pytest.raises(IDMError, match="no shipped unrolled checkpoint for ratio 0.2"):
        build(ratio=0.2)
    with pytest.raises(IDMError, match="trained for ratio 0.25"):
        reconstruct(BlockCS((32, 32), 0.5, block_size=8).measure(images(1)), BlockCS((32, 32), 0.5, block_size=8))
    with pytest.raises(IDMError, match="no option"):
        build(ratio=0.25, steps=3)
    assert get_method("unrolled").checkpoint_kind == "unrolled"


def test_load_refuses_a_mismatched_state() -> None:
    with pytest.raises(IDMError, match="does not match the unrolled network"):
        UnrolledNet(SMALL).load_unique_state_dict({"x": torch.zeros(1)})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("unrolled-data")
    for i in range(3):
        save_image(root / f"{i}.png", images(1, 48)[0])
    return root


def train_args(data: Path, out: Path, *extra: str, ratio: float = 0.25) -> list[str]:
    return ["--arch", "unrolled", "--ratio", str(ratio), "--data", str(data), "--val", str(data), "--out", str(out),
            "--steps", "2", "--batch", "2", "--patch", "32", "--block-size", "8", "--phases", "2", "--channels", "4",
            "--val-every", "0", "--threads", "1", "--no-progress", *extra]


def test_training_exports_a_checkpoint_and_continues_at_another_ratio(data: Path, tmp_path: Path, capsys) -> None:
    assert train_main(train_args(data, tmp_path / "cs25")) == 0
    checkpoint = tmp_path / "cs25" / "checkpoint"
    config = read_checkpoint_config(checkpoint)
    assert config["architecture"] == "unrolled" and config["training"]["init_kind"] == "scratch"
    card = (checkpoint / "README.md").read_text()
    assert "ISTA-Net+" in card and "--arch unrolled" in card and "--levels" not in card
    assert len((tmp_path / "cs25" / "log.jsonl").read_text().splitlines()) == 2

    args = train_args(data, tmp_path / "cs50", ratio=0.5)
    for option in ("--phases", "--channels"):  # an unrolled --init keeps its architecture
        index = args.index(option)
        del args[index:index + 2]
    assert train_main([*args, "--init", str(checkpoint)]) == 0
    config = read_checkpoint_config(tmp_path / "cs50" / "checkpoint")
    assert config["ratio"] == 0.5 and config["training"]["init_ratio"] == 0.25

    assert train_main([*train_args(data, tmp_path / "bad"), "--sampling-steps", "2"]) == 2
    assert "--sampling-steps" in capsys.readouterr().err
    assert train_main([*args, "--init", "prior-gray", "--out", str(tmp_path / "bad2")]) == 2
    assert "not an unrolled checkpoint" in capsys.readouterr().err
    assert json.loads((tmp_path / "cs25" / "log.jsonl").read_text().splitlines()[0])["step"] == 1
