"""Shared test fixtures and factories (tiny U-Nets and priors; import the factories with
``from conftest import ...``)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from idm.priors import NoiseSchedule, Prior, UNet, UNetConfig

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` of the checkout; tests that need real data skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not available: {SHARED_DATA} is missing")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is fastest (and avoids oversubscribing shared cores).

    Use per module with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_unet_config(**changes) -> UNetConfig:
    """A U-Net config small enough for CPU tests: 8 base channels, two levels, attention on level 1;
    ``changes`` override single fields (e.g. ``num_res_blocks=2``)."""
    tiny = UNetConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(1,), groups=4, num_heads=2)
    return replace(tiny, **changes)


def tiny_prior(config: UNetConfig, seed: int) -> Prior:
    """A random prior (linear schedule) built after ``torch.manual_seed(seed)``; its zero-initialised
    output conv gets N(0, 0.05²) weights, so ε is not identically zero."""
    torch.manual_seed(seed)
    unet = UNet(config)
    with torch.no_grad():
        for p in unet.out.parameters():
            p.normal_(0, 0.05)
    return Prior(unet, NoiseSchedule())


def blockcs_training_losses(net: torch.nn.Module, x: torch.Tensor, steps: int, lr: float = 3e-3) -> list[float]:
    """L1 losses of ``steps`` Adam steps of ``net(y, op)`` on images ``x`` (B, 1, 32, 32), block CS
    at 25 % with B = 8, the permutation redrawn each step (as ``idm finetune`` does)."""
    from idm.physics import BlockCS

    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    base = BlockCS((32, 32), 0.25, block_size=8)
    losses = []
    for step in range(steps):
        op = base.redraw(step)
        loss = (net(op.A(x), op) - x).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses
