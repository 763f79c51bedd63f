"""``unrolled``: a learned compressed-sensing baseline in the ISTA-Net⁺ family (Zhang & Ghanem, CVPR 2018).

The network unrolls K iterations of proximal gradient descent; every phase k has its own step
size ρ_k, soft threshold θ_k and a small CNN proximal map (ISTA-Net⁺, Zhang & Ghanem 2018)::

    x₀ = A†y
    r_k = x_{k−1} − ρ_k · Aᵀ(A x_{k−1} − y)                       gradient step
    x_k = r_k + G(F̃(soft(F(D(r_k)), θ_k)))                        learned proximal step (residual)

with ``D``: conv 3×3 C→N, ``F``/``F̃``: conv–ReLU–conv N→N, ``G``: conv 3×3 N→C. It is trained
from scratch, with the same loop as IDM (``idm finetune --arch unrolled``), on Train400 patches with
a freshly permuted block-CS operator per batch; it works with any operator of the common interface
(the gradient step only uses ``A`` and ``Aᵀ``). Checkpoints ``unrolled-cs{NN}`` are picked by ratio.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import IDMError, check_keys, check_ratio
from ..io.checkpoint import (
    check_trained_operator, load_checkpoint, load_unique_state_dict, read_checkpoint_config, resolve_checkpoint,
    save_checkpoint, shipped_checkpoint, unique_state_dict,
)
from ..physics.base import LinearOperator
from ..registry import register_method
from ._common import on_device

ARCHITECTURE = "unrolled"


@dataclass(frozen=True)
class UnrolledConfig:
    """Architecture of :class:`UnrolledNet`: ``phases`` K, feature ``channels`` N, image ``image_channels`` C."""

    phases: int = 9
    channels: int = 32
    image_channels: int = 1

    def __post_init__(self) -> None:
        for name in ("phases", "channels", "image_channels"):
            if int(getattr(self, name)) < 1:
                raise IDMError(f"unrolled network: {name} must be >= 1, got {getattr(self, name)}")

    #: any image size works (3×3 convolutions with zero padding)
    size_multiple = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UnrolledConfig":
        check_keys(d, (f.name for f in fields(cls)), "unrolled config")
        return cls(**d)


def _conv(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


class Phase(nn.Module):
    """One ISTA-Net⁺ phase: gradient step on ‖Ax − y‖²/2, then a residual learned proximal map."""

    def __init__(self, image_channels: int, channels: int) -> None:
        super().__init__()
        self.rho = nn.Parameter(torch.tensor(0.5))
        self.theta = nn.Parameter(torch.tensor(0.01))
        self.embed = _conv(image_channels, channels)                        # D
        self.forward_transform = nn.Sequential(_conv(channels, channels), nn.ReLU(), _conv(channels, channels))   # F
        self.backward_transform = nn.Sequential(_conv(channels, channels), nn.ReLU(), _conv(channels, channels))  # F̃
        self.project = _conv(channels, image_channels)                       # G

    def forward(self, x: torch.Tensor, y: torch.Tensor, op: LinearOperator) -> torch.Tensor:
        r = x - self.rho * op.crop(op.A_adjoint(op.A(op.pad(x)) - y))
        z = self.forward_transform(self.embed(r))
        z = torch.sign(z) * F.relu(z.abs() - self.theta)
        return r + self.project(self.backward_transform(z))


class UnrolledNet(nn.Module):
    """``(y, op) → x``: measurements ``op.measurement_shape(B, C)`` → estimate ``(B, C, *op.domain_size)``
    on [0, 1] (not clipped). The phases work on the image (``op.crop`` of the domain, as in
    training, where the two coincide); the domain's padding, zero in every measured signal, is
    returned as zeros (``op.pad``), so ``op.crop(net(y, op))`` is the image estimate."""

    def __init__(self, config: UnrolledConfig | None = None) -> None:
        super().__init__()
        self.config = config or UnrolledConfig()
        self.phases = nn.ModuleList(Phase(self.config.image_channels, self.config.channels)
                                    for _ in range(self.config.phases))

    def forward(self, y: torch.Tensor, op: LinearOperator) -> torch.Tensor:
        if y.shape[1] != self.config.image_channels:
            raise IDMError(f"unrolled network expects {self.config.image_channels} channel(s), got {y.shape[1]}")
        x = op.crop(op.A_dagger(y))
        for phase in self.phases:
            x = phase(x, y, op)
        return op.pad(x)  # the phases estimate the image; the domain's padding is zero by construction

    # --- the interface shared with IDMNet for training and checkpoints --------------------------
    def set_levels(self, levels: str) -> "UnrolledNet":
        """No invertibility here (a small network): any ``levels`` is accepted and changes nothing."""
        return self

    def unique_state_dict(self) -> dict[str, torch.Tensor]:
        return unique_state_dict(self)

    def load_unique_state_dict(self, tensors: dict[str, torch.Tensor], source: str = "state") -> None:
        load_unique_state_dict(self, tensors, source=source, what="the unrolled network")

    def save(self, directory: str | os.PathLike[str], card: str, *, ratio: float, operator: str = "blockcs",
             block_size: int | None = 32, extra: dict[str, Any] | None = None,
             dtype: torch.dtype | None = torch.float16) -> Path:
        """Write a checkpoint directory (weights as ``dtype``; None keeps fp32)."""
        config = {**(extra or {}), "architecture": ARCHITECTURE, "operator": operator, "ratio": check_ratio(ratio),
                  "block_size": block_size, "unrolled": self.config.to_dict()}
        return save_checkpoint(directory, self.unique_state_dict(), config, card, dtype=dtype)


def load_unrolled(name_or_path: str | os.PathLike[str], *, device: str | torch.device = "cpu",
                  ratio: float | None = None) -> tuple[UnrolledNet, dict[str, Any]]:
    """Load an unrolled checkpoint → ``(network in eval mode, config)``; ``ratio`` must match if given."""
    path = resolve_checkpoint(name_or_path)
    if read_checkpoint_config(path).get("architecture") != ARCHITECTURE:
        raise IDMError(f"{path} is not an unrolled checkpoint")
    expect: dict[str, Any] = {"architecture": ARCHITECTURE}
    if ratio is not None:
        expect["ratio"] = check_ratio(ratio)
    tensors, config = load_checkpoint(path, expect=expect, dtype=torch.float32)
    try:
        net = UnrolledNet(UnrolledConfig.from_dict(config["unrolled"]))
    except (KeyError, TypeError) as exc:
        raise IDMError(f"unrolled checkpoint config is incomplete or malformed: {exc}") from None
    net.load_unique_state_dict(tensors, source=f"checkpoint {path}")
    return net.to(device).eval(), config


@register_method("unrolled", "learned unrolled proximal-gradient network (ISTA-Net+ family), trained per ratio",
                 checkpoint_kind="unrolled")
def build(
    *,
    checkpoint: str | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = False,
    ratio: float | None = None,
    **options: Any,
):
    """``reconstruct(y, op)`` → estimate ``(B, C, *op.domain_size)``. Without ``checkpoint`` the
    shipped ``unrolled-cs{NN}`` of ``ratio`` is used; deterministic (``seed`` unused); no options."""
    if options:
        raise IDMError(f"method 'unrolled' has no option(s) {', '.join(sorted(options))}")
    name = shipped_checkpoint("unrolled", ratio, "idm finetune --arch unrolled") if checkpoint is None else checkpoint
    net, config = load_unrolled(name, device=device, ratio=ratio)

    def solve(y: torch.Tensor, op: LinearOperator) -> torch.Tensor:
        check_trained_operator(name, config, op)
        with torch.no_grad():
            return net(y.float(), op)

    return on_device(device, solve)

