"""Does ``memcnn.InvertibleModuleWrapper`` do what the two-level IDM design needs? Measured here.

``python -m idm.bench.memcnn_check`` prints the findings quoted in :mod:`idm.invertible.sequence`:

1. one level: peak training memory of a chain of ``depth`` IDM couplings of conv bodies, plain
   autograd vs memcnn (``keep_input=False``) vs :class:`~idm.invertible.ReversibleSequence`;
2. nesting: a memcnn coupling whose body runs an inner memcnn chain — does backward work?
3. context: a body reading a tensor that is not an input of the wrapper (a skip connection, ``Aᵀy``,
   a learnable schedule) — does that tensor get its gradient?
4. autocast (CPU bf16): in which dtype do the wrapped bodies run?
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ..invertible import ReversibleSequence
from .accounting import peak_memory_bytes


class _ConvBody(nn.Module):
    """``h -> h + conv(silu(conv(h))) * scale`` (shape-preserving), optionally adding a context tensor."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, h: torch.Tensor, context: Any = None) -> torch.Tensor:
        out = h + 0.1 * self.conv2(torch.nn.functional.silu(self.conv1(h)))
        return out if context is None else out + context


class _IDMCoupling(nn.Module):
    """The IDM coupling in memcnn's interface: ``forward(x1, x2)`` / ``inverse(y1, y2)``.

    ``context`` is a tensor captured at construction (memcnn has no other way to pass it).
    """

    def __init__(self, body: nn.Module, context: torch.Tensor | None = None, v: float = 0.5, copy_y2: bool = False):
        super().__init__()
        self.body = body
        self.context = context
        self.v = nn.Parameter(torch.tensor(v))
        self.copy_y2 = copy_y2

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # under memcnn y₂ must not share storage with x₁: memcnn frees its inputs' storage after forward
        return (1 - self.v) * self.body(x1, self.context) + self.v * x2, x1.clone() if self.copy_y2 else x1

    def inverse(self, y1: torch.Tensor, y2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return y2, (y1 - (1 - self.v) * self.body(y2, self.context)) / self.v


def _memcnn_chain(bodies: list[nn.Module], context: torch.Tensor | None = None) -> nn.ModuleList:
    import memcnn

    return nn.ModuleList(
        memcnn.InvertibleModuleWrapper(
            _IDMCoupling(body, context, copy_y2=True), keep_input=False, keep_input_inverse=False
        )
        for body in bodies
    )


def _run_chain(chain: nn.ModuleList, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    for block in chain:
        x1, x2 = block(x1, x2)
    return x1, x2


def one_level_memory(depths: tuple[int, ...] = (2, 4, 8), shape: tuple[int, ...] = (2, 16, 64, 64)) -> list[dict[str, Any]]:
    """Peak bytes of forward+backward for plain / memcnn / ours, per chain depth."""
    rows = []
    for depth in depths:
        torch.manual_seed(0)
        bodies = [_ConvBody(shape[1]) for _ in range(depth)]
        row: dict[str, Any] = {"depth": depth, "activation_bytes": 4 * int(torch.tensor(shape).prod())}

        def plain() -> None:
            x = torch.randn(shape, requires_grad=True)
            y1, y2 = _run_chain(nn.ModuleList(_IDMCoupling(b) for b in bodies), x, x * 1.0)
            (y1.sum() + y2.sum()).backward()

        def with_memcnn() -> None:
            x1 = torch.randn(shape, requires_grad=True)
            x2 = torch.randn(shape, requires_grad=True)
            y1, y2 = _run_chain(_memcnn_chain(bodies), x1, x2)
            (y1.sum() + y2.sum()).backward()

        def ours() -> None:
            x = torch.randn(shape, requires_grad=True)
            seq = ReversibleSequence([_Adapter(b) for b in bodies])
            seq(x).sum().backward()

        for name, fn in (("plain", plain), ("memcnn", with_memcnn), ("ours", ours)):
            row[name] = peak_memory_bytes(fn, "cpu")
        rows.append(row)
    return rows


class _Adapter(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, h: torch.Tensor, context: Any = None) -> torch.Tensor:
        return self.body(h)


def nesting() -> str:
    """Backward through an outer memcnn coupling whose body contains an inner memcnn chain."""

    class Inner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.chain = _memcnn_chain([_ConvBody(4), _ConvBody(4)])

        def forward(self, h: torch.Tensor, context: Any = None) -> torch.Tensor:
            # clones: the inner wrappers free their inputs' storage, and h is still needed outside
            y1, y2 = _run_chain(self.chain, h.clone(), h.clone())
            return y1 + 0.0 * y2

    torch.manual_seed(0)
    outer = _memcnn_chain([Inner(), Inner()])
    x1, x2 = torch.randn(1, 4, 8, 8, requires_grad=True), torch.randn(1, 4, 8, 8, requires_grad=True)
    try:
        y1, y2 = _run_chain(outer, x1, x2)
        (y1.sum() + y2.sum()).backward()
    except RuntimeError as error:
        return f"fails: {str(error).splitlines()[0]}"
    return "works"


def context_gradient() -> dict[str, float]:
    """Gradient norm of a captured context tensor: plain autograd vs memcnn."""
    torch.manual_seed(0)
    bodies = [_ConvBody(4), _ConvBody(4)]
    out = {}
    for name in ("plain", "memcnn"):
        context = torch.randn(1, 4, 8, 8, requires_grad=True)
        x1, x2 = torch.randn(1, 4, 8, 8, requires_grad=True), torch.randn(1, 4, 8, 8, requires_grad=True)
        if name == "plain":
            chain = nn.ModuleList(_IDMCoupling(b, context) for b in bodies)
        else:
            chain = _memcnn_chain(bodies, context)
        y1, y2 = _run_chain(chain, x1, x2)
        (y1.sum() + y2.sum()).backward()
        out[name] = 0.0 if context.grad is None else float(context.grad.norm())
    return out


def cpu_autocast_dtype() -> str:
    """dtype of a wrapped body's output under CPU bf16 autocast."""
    seen: list[torch.dtype] = []

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, h: torch.Tensor, context: Any = None) -> torch.Tensor:
            out = self.conv(h)
            seen.append(out.dtype)
            return out.float()

    chain = _memcnn_chain([Probe()])
    x1, x2 = torch.randn(1, 4, 8, 8, requires_grad=True), torch.randn(1, 4, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _run_chain(chain, x1, x2)
    return str(seen[0])


def run_checks() -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # memcnn uses deprecated torch.cuda.amp / storage APIs
        return {
            "one_level": one_level_memory(),
            "nesting": nesting(),
            "context_gradient": context_gradient(),
            "cpu_autocast_body_dtype": cpu_autocast_dtype(),
        }


def main() -> None:
    import memcnn

    result = run_checks()
    print(f"memcnn {memcnn.__version__}, torch {torch.__version__}")
    print("one level, peak bytes of a training step (activation = bytes of one feature map):")
    print(f"{'depth':>5} {'activation':>11} {'plain':>11} {'memcnn':>11} {'ours':>11}")
    for row in result["one_level"]:
        print(f"{row['depth']:>5} {row['activation_bytes']:>11} {row['plain']:>11} {row['memcnn']:>11} {row['ours']:>11}")
    print(f"nesting: {result['nesting']}")
    print(f"context tensor gradient norm: {result['context_gradient']}")
    print(f"body dtype under CPU bf16 autocast: {result['cpu_autocast_body_dtype']}")


if __name__ == "__main__":
    main()
