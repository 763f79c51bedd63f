"""The two-stream reversible coupling that makes any shape-preserving function invertible.

For a body ``f`` with ``f(x, context).shape == x.shape`` and a learnable scalar ``v`` (IDM / MEFT)::

    forward   y₁ = (1 − v)·f(x₁) + v·x₂,    y₂ = x₁
    inverse   x₁ = y₂,                      x₂ = (y₁ − (1 − v)·f(y₂)) / v

Backward through one coupling, given ``(dy₁, dy₂)``::

    dx₁ = dy₂ + J_f(x₁)ᵀ ((1 − v)·dy₁)     dx₂ = v·dy₁
    dv  = Σ dy₁ ⊙ (x₂ − f(x₁))             dθ  = J_θᵀ ((1 − v)·dy₁)   (θ: f's parameters / context)

**Conditioning.** Inversion divides by ``v``: an error δ in ``y₁`` becomes δ/v in ``x₂``, and
going back through a chain it is multiplied by about ``(1 − v)/v · Lip(f)`` per coupling. ``v = 0.5``
(IDM's choice) makes that factor ``Lip(f)``; small ``v`` makes inversion unstable, ``v = 0`` makes
it impossible (the reversible backward refuses it).

**Equality with the original network at initialisation — what is and is not possible.** A chain
of couplings on the duplicated input ``(x, s·x)``, merged as ``y₁ + m·y₂``, has first stream
``a_k = (1 − v_k)·f_k(a_{k−1}) + v_k·a_{k−2}`` (``a_0 = x``, ``a_{−1} = s·x``), because the second
stream of coupling k is always the first stream of coupling k−1. The original chain is
``f_k(a_{k−1})``; they agree for every input only if ``v_k·(a_{k−2} − f_k(a_{k−1})) = 0``, i.e.
``v_k = 0``. More generally no closed-form two-stream coupling of a non-injective ``f`` can output
``f(x₁)`` exactly on one stream and still be invertible, since ``f(x₁)`` has lost information about
``x₁`` that the other stream, which must also carry ``x₂``, cannot hold. So:

* with ``v = 0`` the converted network equals the original exactly (tested) but cannot be inverted;
* with IDM's initialisation (``v = 0.5``, ``s = 1``, ``m = 0``, as in the official code) the converted
  network is a *different* network at initialisation: for residual bodies ``f(h) = h + r(h)`` and
  ``s = 1`` the first coupling gives ``h + (1 − v)·r(h)``, i.e. the residual branches are damped and
  mixed with earlier activations. End-to-end fine-tuning then adapts it. ``m = 0`` makes the output
  the first stream; ``s`` and ``m`` are learnable.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _owns_storage(f: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether ``f`` shares no memory with ``others`` (then it may be overwritten in place)."""
    pointer = f.untyped_storage().data_ptr()
    return all(pointer != o.untyped_storage().data_ptr() for o in others)


def call_body(body: nn.Module, x: torch.Tensor, context: Any) -> torch.Tensor:
    """``body(x, context)`` checked to preserve the shape of ``x``."""
    out = body(x, context)
    if out.shape != x.shape:
        raise ValueError(
            f"reversible coupling body {type(body).__name__} changed the shape {tuple(x.shape)} -> {tuple(out.shape)}; "
            "only shape-preserving functions can be coupled"
        )
    return out


class Coupling(nn.Module):
    """``(x₁, x₂) -> ((1 − v)·f(x₁, context) + v·x₂, x₁)`` with learnable scalar ``v``.

    ``body`` is called as ``body(x, context)`` and must return a tensor of the shape of ``x``. The
    streams keep the dtype of ``x₂`` (``f``'s output is cast to it), so under autocast the body runs
    in low precision while the streams, and hence inversion, stay in the input precision.
    """

    def __init__(self, body: nn.Module, v_init: float = 0.5) -> None:
        super().__init__()
        self.body = body
        self.v = nn.Parameter(torch.tensor(float(v_init)))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, context: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        f = call_body(self.body, x1, context).to(x2.dtype)
        v = self.v.to(f.dtype)
        if not torch.is_grad_enabled() and _owns_storage(f, x1, x2):
            return f.lerp_(x2, v), x1  # inference: (1 − v)·f + v·x₂ into f's buffer (no new allocation)
        return torch.lerp(f, x2, v), x1  # (1 − v)·f + v·x₂ in one pass over memory

    def inverse(self, y1: torch.Tensor, y2: torch.Tensor, context: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs ``(x₁, x₂)`` recovered from outputs ``(y₁, y₂)``: ``x₁ = y₂``, ``x₂ = (y₁ − (1 − v)·f(y₂)) / v``."""
        f = call_body(self.body, y2, context).to(y1.dtype)
        return y2, (y1 - (1 - self.v) * f) / self.v

    def extra_repr(self) -> str:
        return f"v={float(self.v.detach()):.4g}"
