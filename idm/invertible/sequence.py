"""Reversible sequences of couplings: store only the output, recompute inputs by inversion.

:class:`ReversibleSequence` duplicates its input into two streams ``(x, s·x)``, runs a chain of
:class:`~idm.invertible.coupling.Coupling` s and merges ``y₁ + m·y₂`` (learnable ``s``, ``m``;
see the coupling module for why this cannot equal the original chain exactly at initialisation).
Its ``memory_mode`` selects how gradients are obtained — all three give the same values:

* ``"plain"``: ordinary autograd (every intermediate activation of every body is kept);
* ``"checkpoint"``: :func:`torch.utils.checkpoint.checkpoint` (non-reentrant) per coupling, which
  keeps each coupling's two input streams;
* ``"reversible"``: :class:`_ReversibleFunction` keeps only the merged output and ``y₂`` (and
  references to the context tensors). In backward it recovers ``y₁ = out − m·y₂`` and walks the
  couplings in reverse: ``x₁ = y₂``; re-runs ``f(x₁)`` with grad enabled (same RNG and autocast
  state as in forward); back-propagates ``(1 − v)·dy₁`` through it w.r.t. ``x₁``, the body's
  parameters and the context tensors; recovers ``x₂ = (y₁ − (1 − v)·f(x₁)) / v``. The duplication
  ``(x, s·x)`` happens inside the Function, so the sequence's input is not stored either.

**Nesting.** A body may itself contain reversible sequences (level 2 inside level 1). In the
outer forward (run without grad) the inner sequences run plainly and store nothing; in the outer
backward the recomputation runs with grad, so inner sequences store only their outputs, and the
outer backward call runs their backward (which calls the engine again — PyTorch supports such
re-entrant backward calls). Parameter gradients are *returned* by the Function (parameters are
explicit inputs; inside, the engine accumulates them into detached aliases substituted with
:func:`torch.func.functional_call`), never written to the real ``.grad`` behind autograd's back,
so ``loss.backward()``, ``torch.autograd.grad(loss, params)`` and nesting all see correct values.

**Context.** ``forward(x, context)`` passes ``context`` (any pytree: dict / tuple / list of tensors
and other objects such as ints or operator objects) to every body as ``body(h, context)``. Its
tensor leaves become explicit inputs of the Function, so gradients w.r.t. them (e.g. a learnable
schedule ``ᾱ`` computed outside, or a skip connection) are returned correctly. Other leaves
(modules, operators, frozen dataclasses) are passed through as opaque objects: tensors inside them
get no gradient, so a dataclass leaf holding a tensor that requires grad is refused. The parameters
a body uses must be reachable from ``body.parameters()`` or be tensors in ``context``; anything else
would silently get no gradient in reversible mode (the exactness tests compare with ``"plain"``).

The backward runs ``f`` once per coupling (with grad, its detached value serves the inversion),
keeps nothing of coupling k while working on k − 1, and accumulates parameter gradients in place.

Measured memory of both levels (what remains at the peak, what reduced it) and why this module
does not use ``memcnn.InvertibleModuleWrapper``: ``docs/memory.md`` (``python -m idm.bench.memcnn_check``
reproduces the memcnn comparison).
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import checkpoint

from .coupling import Coupling

MemoryMode = Literal["plain", "checkpoint", "reversible"]
MEMORY_MODES: tuple[str, ...] = ("plain", "checkpoint", "reversible")

#: |v| below this cannot be inverted in a useful way
MIN_ABS_V = 1e-6


def check_memory_mode(mode: str) -> str:
    if mode not in MEMORY_MODES:
        raise ValueError(f"memory mode must be one of {', '.join(MEMORY_MODES)}, got {mode!r}")
    return mode


# --- RNG and autocast state -------------------------------------------------------------


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _restored_rng(device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None] | None):
    """Context manager running with ``state`` restored, leaving the surrounding RNG untouched."""
    if state is None:
        return nullcontext()
    return _RestoredRng(device, state)


class _RestoredRng:
    def __init__(self, device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        self.device, self.state = device, state
        self.fork = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])

    def __enter__(self) -> None:
        self.fork.__enter__()
        torch.set_rng_state(self.state[0])
        if self.state[1] is not None:
            torch.cuda.set_rng_state(self.state[1], self.device)

    def __exit__(self, *exc: Any) -> None:
        self.fork.__exit__(*exc)


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


# --- the Function -----------------------------------------------------------------------


@dataclass
class _Run:
    """Everything the Function needs besides its tensor inputs (built per call)."""

    couplings: list[Coupling]
    s: nn.Parameter  # duplication scale
    m: nn.Parameter  # merge scale
    params: list[torch.Tensor]  # unique parameters of all bodies (as the bodies saw them in forward)
    param_names: list[list[tuple[str, int]]]  # per coupling: (name in body, index into ``params``)
    context_spec: pytree.TreeSpec
    context_leaves: list[Any]  # non-tensor leaves; tensor slots hold None
    tensor_slots: list[int]  # positions of tensor leaves in ``context_leaves``
    preserve_rng_state: bool
    rng_states: list[Any] = field(default_factory=list)

    def context(self, tensors: Sequence[torch.Tensor]) -> Any:
        leaves = list(self.context_leaves)
        for slot, tensor in zip(self.tensor_slots, tensors):
            leaves[slot] = tensor
        return pytree.tree_unflatten(leaves, self.context_spec)


class _ReversibleFunction(torch.autograd.Function):
    """``(run, x, s, m, *vs, *params, *context_tensors) -> y₁ + m·y₂``; stores only ``(y₁ + m·y₂, y₂)``.

    Backward recovers ``y₁ = out − m·y₂`` (exact for ``m = 0``, else to rounding), then inverts the
    couplings one by one. Gradients of parameters and context tensors are accumulated by the
    autograd engine into fresh leaf aliases (``p.detach().requires_grad_()``, substituted into the
    body with :func:`torch.func.functional_call`), parameter by parameter as they are produced and
    in place across couplings, so parameters shared by all couplings (the U-Net shared by all
    sampling steps) never need a second full-size gradient buffer; the aliases' ``.grad`` are
    returned as the gradients of the inputs, never written to the real parameters' ``.grad``.
    """

    @staticmethod
    def forward(ctx: Any, run: _Run, x: torch.Tensor, s: torch.Tensor, m: torch.Tensor, *tensors: torch.Tensor):
        k, p = len(run.couplings), len(run.params)
        vs, context_tensors = tensors[:k], tensors[k + p :]
        if float(torch.stack([v.detach().abs().float() for v in vs]).min()) < MIN_ABS_V:
            raise ValueError("a reversible coupling has v = 0, which cannot be inverted; use memory_mode='plain'")
        context = run.context(context_tensors)
        x1, x2 = x, s.to(x.dtype) * x
        for coupling in run.couplings:
            run.rng_states.append(_rng_state(x.device) if run.preserve_rng_state else None)
            x1, x2 = coupling(x1, x2, context)
        out = x1 + m.to(x1.dtype) * x2
        del x1
        ctx.run = run
        ctx.device = x.device
        ctx.autocast = _autocast_state(x.device.type)
        ctx.save_for_backward(out, x2, *context_tensors)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor):
        run: _Run = ctx.run
        out, y2, *saved_context = ctx.saved_tensors
        k = len(run.couplings)
        merge = run.m.detach().to(out.dtype)
        y1, y2 = out.detach() - merge * y2, y2.detach()
        dy1, dy2 = grad_out, merge * grad_out
        grad_m = (grad_out * y2).sum()
        context_tensors = [t.detach().requires_grad_(t.requires_grad) for t in saved_context]
        context = run.context(context_tensors)
        aliases = [p.detach().requires_grad_(p.requires_grad) for p in run.params]
        grad_vs: list[torch.Tensor | None] = [None] * k
        enabled, dtype = ctx.autocast
        autocast = torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled)
        for i in reversed(range(k)):
            coupling = run.couplings[i]
            v = coupling.v.detach()
            x1 = y2.requires_grad_(True)
            substitutes = {name: aliases[j] for name, j in run.param_names[i] if aliases[j].requires_grad}
            with torch.enable_grad(), autocast, _restored_rng(ctx.device, run.rng_states[i]):
                f = torch.func.functional_call(coupling.body, substitutes, (x1, context))
            leaves = [x1, *substitutes.values(), *(t for t in context_tensors if t.requires_grad)]
            if f.requires_grad:  # else f depends on nothing that needs a gradient
                torch.autograd.backward(f, ((1 - v) * dy1).to(f.dtype), inputs=leaves)
            with torch.no_grad():  # few full-size temporaries: this is where the peak memory is
                f = f.detach().to(y1.dtype)
                grad_vs[i] = ((dy1 * (y1 - f)).sum() / v).to(v.dtype)  # Σ dy₁ ⊙ (x₂ − f)
                x2 = y1 - (1 - v) * f
                del f, y1
                x2.div_(v)
                dx1 = dy2 if x1.grad is None else x1.grad.add_(dy2)  # x1.grad is owned (fresh leaf)
                dx2 = v * dy1
            y1, y2, dy1, dy2 = x1.detach(), x2, dx1, dx2
            del x1, x2, dx1, dx2
        # y1 is now the sequence input x, y2 ≈ s·x, (dy1, dy2) the stream gradients
        needs = ctx.needs_input_grad
        scale = run.s.detach()
        grad_x = dy1 + scale.to(dy2.dtype) * dy2 if needs[1] else None
        grad_s = (dy2 * y1).sum().to(scale.dtype) if needs[2] else None
        return (
            None,
            grad_x,
            grad_s,
            grad_m.to(run.m.dtype) if needs[3] else None,
            *grad_vs,
            *(a.grad for a in aliases),
            *(t.grad for t in context_tensors),
        )


def _refuse_hidden_grad_tensors(leaves: list[Any]) -> None:
    """Raise if a dataclass leaf of the context holds a tensor that requires grad (it would get none)."""
    for leaf in leaves:
        if dataclasses.is_dataclass(leaf) and not isinstance(leaf, type):
            for item in dataclasses.fields(leaf):
                value = getattr(leaf, item.name)
                if isinstance(value, torch.Tensor) and value.requires_grad:
                    raise ValueError(
                        f"context object {type(leaf).__name__}.{item.name} is a tensor that requires grad inside an "
                        "opaque object; pass it as a direct context entry (dict/tuple/list) so it gets its gradient"
                    )


# --- the module -------------------------------------------------------------------------


class ReversibleSequence(nn.Module):
    """Duplicate → couplings over ``bodies`` → merge; ``(B, ...) -> (B, ...)`` (same shape).

    Args:
        bodies: shape-preserving modules called as ``body(h, context)``.
        v_init: initial coupling scalar ``v`` of every coupling (IDM: 0.5).
        s_init: initial duplication scale, streams ``(x, s·x)`` (IDM: 1).
        m_init: initial merge scale, output ``y₁ + m·y₂`` (IDM: 0).
        memory_mode: ``"reversible"`` (default), ``"checkpoint"`` or ``"plain"`` (see module doc).
        preserve_rng_state: replay the forward RNG state when recomputing (needed for dropout).
    """

    def __init__(
        self,
        bodies: Iterable[nn.Module],
        *,
        v_init: float = 0.5,
        s_init: float = 1.0,
        m_init: float = 0.0,
        memory_mode: MemoryMode = "reversible",
        preserve_rng_state: bool = True,
    ) -> None:
        super().__init__()
        self.couplings = nn.ModuleList(Coupling(body, v_init) for body in bodies)
        if len(self.couplings) == 0:
            raise ValueError("a reversible sequence needs at least one body")
        self.s = nn.Parameter(torch.tensor(float(s_init)))
        self.m = nn.Parameter(torch.tensor(float(m_init)))
        self.memory_mode: str = check_memory_mode(memory_mode)
        self.preserve_rng_state = preserve_rng_state

    @property
    def bodies(self) -> list[nn.Module]:
        return [c.body for c in self.couplings]

    def forward(self, x: torch.Tensor, context: Any = None) -> torch.Tensor:
        if check_memory_mode(self.memory_mode) == "reversible" and torch.is_grad_enabled():
            return self._reversible(x, context)
        y1, y2 = self.forward_streams(x, context)
        return torch.addcmul(y1, self.m.to(y1.dtype), y2)  # y₁ + m·y₂

    def forward_streams(self, x: torch.Tensor, context: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The two output streams ``(y₁, y₂)`` before the merge (plain or checkpointed autograd)."""
        mode = check_memory_mode(self.memory_mode)
        s = self.s.to(x.dtype)
        x1, x2 = x, s * x
        use_checkpoint = mode == "checkpoint" and torch.is_grad_enabled()
        for coupling in self.couplings:
            if use_checkpoint:
                x1, x2 = checkpoint(
                    coupling, x1, x2, context, use_reentrant=False, preserve_rng_state=self.preserve_rng_state
                )
            else:
                x1, x2 = coupling(x1, x2, context)
        return x1, x2

    def _reversible(self, x: torch.Tensor, context: Any) -> torch.Tensor:
        params: list[torch.Tensor] = []
        position: dict[int, int] = {}
        param_names: list[list[tuple[str, int]]] = []
        for coupling in self.couplings:
            names = []
            for name, param in coupling.body.named_parameters():
                if id(param) not in position:
                    position[id(param)] = len(params)
                    params.append(param)
                names.append((name, position[id(param)]))
            param_names.append(names)
        leaves, spec = pytree.tree_flatten(context)
        slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        _refuse_hidden_grad_tensors(leaves)
        tensors = [leaves[i] for i in slots]
        for i in slots:
            leaves[i] = None
        run = _Run(list(self.couplings), self.s, self.m, params, param_names, spec, leaves, slots, self.preserve_rng_state)
        vs = [c.v for c in self.couplings]
        return _ReversibleFunction.apply(run, x, self.s, self.m, *vs, *params, *tensors)

    # --- diagnostics ---------------------------------------------------------------------

    @torch.no_grad()
    def inversion_error(self, x: torch.Tensor, context: Any = None) -> float:
        """Max |recomputed − true| over every coupling input when inverting from the output."""
        s = self.s.to(x.dtype)
        streams = [(x, s * x)]
        for coupling in self.couplings:
            streams.append(coupling(*streams[-1], context))
        y1, y2 = streams[-1]
        error = 0.0
        for coupling, (x1, x2) in zip(reversed(self.couplings), reversed(streams[:-1])):
            y1, y2 = coupling.inverse(y1, y2, context)
            error = max(error, float((y1 - x1).abs().max()), float((y2 - x2).abs().max()))
        return error

    def extra_repr(self) -> str:
        return f"memory_mode={self.memory_mode!r}"


class ReversibleSampler(ReversibleSequence):
    """Level 1: a T-step sampler as one reversible sequence, ``x_T -> x_0``.

    ``steps[i]`` is the i-th sampling step (in execution order), a module called as
    ``step(x, context)`` that returns the next iterate (same shape) and owns its per-step
    parameters; shared modules (the U-Net) may be registered in several steps. The input is
    duplicated ``(x, s·x)``, each step is a coupling, and the output is merged ``y₁ + m·y₂``.
    """

    def __init__(self, steps: Iterable[nn.Module], **kwargs: Any) -> None:
        super().__init__(steps, **kwargs)

    @property
    def steps(self) -> list[nn.Module]:
        return self.bodies


# --- utilities over module trees --------------------------------------------------------


def set_memory_mode(module: nn.Module, mode: MemoryMode) -> nn.Module:
    """Set ``memory_mode`` of every module in ``module``'s tree that has one; returns ``module``.

    Reversible sequences use it as documented above; modules with shape-changing layers (e.g.
    :class:`~idm.invertible.convert.ReversibleUNet`) checkpoint those layers unless ``"plain"``.
    """
    check_memory_mode(mode)
    for sub in module.modules():
        if hasattr(sub, "memory_mode"):
            sub.memory_mode = mode
    return module


@torch.no_grad()
def inversion_error(module: nn.Module, *args: Any, **kwargs: Any) -> float:
    """Max abs drift of inputs recomputed by inversion vs the true inputs, over all sequences.

    Runs ``module(*args, **kwargs)`` once without grad; every :class:`ReversibleSequence` in
    ``module``'s tree (nested ones included, each with the input it actually receives) is inverted
    from its output and compared with its forward inputs, coupling by coupling.
    """
    errors: list[float] = [0.0]

    def hook(seq: nn.Module, hook_args: tuple, hook_kwargs: dict, output: Any) -> None:
        x = hook_args[0] if hook_args else hook_kwargs["x"]
        context = hook_args[1] if len(hook_args) > 1 else hook_kwargs.get("context")
        errors.append(seq.inversion_error(x, context))

    handles = [
        sub.register_forward_hook(hook, with_kwargs=True)
        for sub in module.modules()
        if isinstance(sub, ReversibleSequence)
    ]
    try:
        module(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return max(errors)
