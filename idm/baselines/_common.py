"""Argument handling shared by the classic baselines."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import IDMError
from ..physics import LinearOperator

Solve = Callable[[torch.Tensor, LinearOperator], torch.Tensor]


def reject_extra(method: str, checkpoint: Any, extra: dict[str, Any]) -> None:
    """Baselines have no weights and only the options they document.

    ``ratio`` (passed to every method by the CLI and the benchmark) is accepted and ignored:
    the operator handed to ``reconstruct(y, op)`` carries it.
    """
    if checkpoint is not None:
        raise IDMError(f"method {method!r} takes no checkpoint, got {checkpoint!r}")
    extra = {name: value for name, value in extra.items() if name != "ratio"}
    if extra:
        raise IDMError(f"method {method!r} has no option(s) {', '.join(sorted(extra))}")


def on_device(device: str | torch.device, solve: Solve) -> Solve:
    """Wrap ``solve(y, op)``: check ``y``'s shape, run on ``device``, return on ``y``'s device."""
    device = torch.device(device)

    def reconstruct(y: torch.Tensor, op: LinearOperator) -> torch.Tensor:
        op.check_measurements(y)
        return solve(y.to(device), op).to(y.device)

    return reconstruct
