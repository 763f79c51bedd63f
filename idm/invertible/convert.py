"""Level 2: a U-Net in reversible form (:func:`convert_unet` → :class:`ReversibleUNet`).

The U-Net is given as a :class:`~idm.invertible.layout.UNetLayout` — its layers in execution order
(:func:`~idm.invertible.layout.unet_layout` for :class:`idm.priors.unet.UNet`,
:func:`~idm.invertible.diffusers.diffusers_layout` for diffusers models) — or as our ``UNet``
itself. The layers are split into maximal runs of consecutive shape-preserving layers; each run
becomes a :class:`~idm.invertible.sequence.ReversibleSequence` (duplicate → couplings → merge);
every other layer (channel-changing ResBlocks, down/upsamplers, input conv, output head) is a
:class:`CheckpointedBody` (non-reentrant activation checkpointing unless ``memory_mode == "plain"``).
Consecutive shape-changing layers (a resample and the channel-changing ResBlock after it) run as
one checkpointed segment, so the intermediate is not stored (:class:`CheckpointedChain`). A layer
whose output is a skip connection ends its run or chain (the skip is stored anyway; it is handed
to the layer that consumes it as a context tensor, which receives its gradient).

Shape-preserving layers are: ResBlocks with equal in/out channels, attention, caller-supplied
injectors, and — the one non-obvious case — a ResBlock consuming a skip, whose input is
``cat(h, skip)``: as a function ``h ↦ ResBlock(cat(h, skip), emb)`` with the skip as context it
preserves the shape of ``h`` whenever ``h`` already has the block's output channel count.

Time conditioning is frozen: the layout carries the embedding of one constant timestep ``emb``
``(1, D)``, stored as a buffer; the time-embedding MLP is not part of the converted network.

Injectors: ``convert_unet(unet, injectors=factory)`` calls ``factory(site)`` for every block
(:class:`InjectionSite`: stage name, block position, channels, resolution level, last-in-stage); a
returned module is inserted right after that block (taking over its skip output, if any) and called
as ``injector(h, context)`` with the ``context`` given to :meth:`ReversibleUNet.forward` — it must
preserve the shape of ``h`` ``(B, channels, H / 2**level, W / 2**level)``. Stage names of our U-Net
are ``"down0"…``, ``"middle"``, ``"up0"…`` (``"up0"`` is the coarsest up stage).

The converted network shares its layers with the U-Net (no copy). It does not equal the original
at initialisation unless ``v_init = 0`` (see :mod:`idm.invertible.coupling`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..priors.unet import UNet
from .layout import Layer, LayerKind, UNetLayout, unet_layout
from .sequence import MemoryMode, ReversibleSequence, check_memory_mode, set_memory_mode

#: how a body calls its module (see :class:`UNetBody`)
BodyKind = LayerKind


@dataclass(frozen=True)
class InjectionSite:
    """Where an injector would go: after block ``position`` of stage ``stage`` (``last``: the stage's last block).

    ``channels``: feature channels there; ``level``: resolution level, features are
    ``(B, channels, H / 2**level, W / 2**level)`` for a U-Net input of size ``(H, W)``.
    """

    stage: str
    position: int
    channels: int
    level: int
    last: bool = False


InjectorFactory = Callable[[InjectionSite], "nn.Module | None"]


class UNetBody(nn.Module):
    """A U-Net layer as a body ``(h, state) -> h'``, where ``state = {"emb", "skips", "user"}``.

    ``kind``: ``"block"`` → ``module(h, emb)``; ``"skip_block"`` → ``module(cat(h, skips[skip_id]), emb)``;
    ``"injector"`` → ``module(h, user_context)``; ``"plain"`` → ``module(h)``.
    """

    def __init__(self, module: nn.Module, kind: BodyKind, skip_id: int | None = None) -> None:
        super().__init__()
        self.module = module
        self.kind = kind
        self.skip_id = skip_id

    def forward(self, h: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        return self.call(self.module_input(h, state), state)

    def module_input(self, h: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """What the module receives as its first argument: ``cat(h, skip)`` for a ``"skip_block"``, else ``h``."""
        if self.kind == "skip_block":
            return torch.cat([h, state["skips"][self.skip_id]], dim=1)
        return h

    def call(self, x: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """The module on its input ``x`` (from :meth:`module_input`)."""
        if self.kind in ("block", "skip_block"):
            return self.module(x, state["emb"])
        if self.kind == "injector":
            return self.module(x, state["user"])
        return self.module(x)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}" + (f", skip_id={self.skip_id}" if self.skip_id is not None else "")


class CheckpointedBody(UNetBody):
    """A shape-changing :class:`UNetBody`, checkpointed (non-reentrant) unless ``memory_mode == "plain"``."""

    def __init__(self, module: nn.Module, kind: BodyKind, skip_id: int | None = None,
                 memory_mode: MemoryMode = "reversible") -> None:
        super().__init__(module, kind, skip_id)
        self.memory_mode: str = check_memory_mode(memory_mode)

    def forward(self, h: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        if self.memory_mode != "plain" and torch.is_grad_enabled():
            return checkpoint(super().forward, h, state, use_reentrant=False)
        return super().forward(h, state)


def _run_bodies(h: torch.Tensor, bodies: nn.ModuleList, state: dict[str, Any]) -> torch.Tensor:
    for body in bodies:
        h = body(h, state)
    return h


def _run_chain(h: torch.Tensor, bodies: nn.ModuleList, state: dict[str, Any]) -> torch.Tensor:
    """:class:`CheckpointedChain`'s recomputable function: every body but the last checkpointed on
    its own, the last one plain, its input released as soon as the module's input exists."""
    *first, last = bodies
    for body in first:
        h = body(h, state)
    x = last.module_input(h, state)
    del h  # a skip block's cat(h, skip) is a copy: h need not live while the block runs
    return last.call(x, state)


class CheckpointedChain(nn.Module):
    """Consecutive shape-changing layers (e.g. an Upsample and the channel-changing ResBlock after
    it) as one checkpointed segment.

    Only the segment's input is kept for backward, not the intermediate (e.g. the Upsample's
    full-resolution output, the next layer's input): the outer recomputation produces it and the
    next layer consumes it without saving it. Every layer but the last is also checkpointed inside
    the segment, so what its backward needs is recomputed only once the later layers' backward is
    done. The last layer runs plainly in the recomputation (its backward comes first, a second
    recomputation would only cost time), and for a skip block its input ``h`` is released once
    ``cat(h, skip)`` exists. This saves one recomputation of the largest block (time, not peak
    memory; docs/memory.md).
    """

    def __init__(self, bodies: list[CheckpointedBody], memory_mode: MemoryMode = "reversible") -> None:
        super().__init__()
        self.bodies = nn.ModuleList(bodies)
        self.memory_mode: str = check_memory_mode(memory_mode)

    def forward(self, h: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        if self.memory_mode != "plain" and torch.is_grad_enabled():
            return checkpoint(_run_chain, h, self.bodies, state, use_reentrant=False)
        return _run_bodies(h, self.bodies, state)


class ReversibleUNet(nn.Module):
    """A U-Net in reversible form: ``forward(x, context=None) -> eps``, ``(B, C_in, H, W)`` → ``(B, C_out, H, W)``.

    Shares its layers with the U-Net; see the module docstring. ``context`` (any pytree of tensors
    and other objects) is handed unchanged to every injector; its tensors receive gradients.

    Args:
        unet: :class:`idm.priors.unet.UNet` or a :class:`~idm.invertible.layout.UNetLayout`.
        t_constant: for a ``UNet``, the timestep whose embedding is frozen into the network (a
            layout brings its own ``emb``).
        injectors: ``factory(site) -> module | None`` inserting shape-preserving modules.
        v_init, s_init, m_init: initial coupling / duplication / merge scalars of every run.
        memory_mode: ``"reversible"`` (default), ``"checkpoint"`` or ``"plain"``.
    """

    def __init__(
        self,
        unet: UNet | UNetLayout,
        *,
        t_constant: float = 0.0,
        injectors: InjectorFactory | None = None,
        v_init: float = 0.5,
        s_init: float = 1.0,
        m_init: float = 0.0,
        memory_mode: MemoryMode = "reversible",
    ) -> None:
        super().__init__()
        if isinstance(unet, UNet):
            layout = unet_layout(unet, t_constant)
        elif isinstance(unet, UNetLayout):
            layout = unet
        else:
            raise TypeError(f"convert_unet expects idm.priors.unet.UNet or a UNetLayout, got {type(unet).__name__}")
        check_memory_mode(memory_mode)
        self.in_channels, self.out_channels = layout.in_channels, layout.out_channels
        self.size_multiple = layout.size_multiple
        self.t_constant = layout.t_constant
        self._check_input = layout.check_input
        self.register_buffer("emb", None if layout.emb is None else layout.emb.detach().clone())
        seq_kw = dict(v_init=v_init, s_init=s_init, m_init=m_init, memory_mode=memory_mode)
        segments, self.pops, self.pushes = _segments(layout.layers, injectors, seq_kw)
        self.segments = nn.ModuleList(segments)
        self.memory_mode: str = memory_mode
        weight = next(p for p in self.segments.parameters())
        self.to(device=weight.device, dtype=weight.dtype)  # the new scalars v, s, m
        set_memory_mode(self, memory_mode)  # also the layers' own (e.g. ResBlock's lean first conv)

    def sequences(self) -> list[ReversibleSequence]:
        return [s for s in self.segments if isinstance(s, ReversibleSequence)]

    def check_input(self, x: torch.Tensor) -> None:
        if self._check_input is not None:
            self._check_input(x)

    def forward(self, x: torch.Tensor, context: Any = None) -> torch.Tensor:
        self.check_input(x)
        skips: dict[int, torch.Tensor] = {}
        h = x
        for segment, pops, push in zip(self.segments, self.pops, self.pushes):
            state = {"emb": self.emb, "skips": {i: skips.pop(i) for i in pops}, "user": context}
            h = segment(h, state)
            if push is not None:
                skips[push] = h
        return h


def _segments(layers: list[Layer], injectors: InjectorFactory | None, seq_kw: dict[str, Any]
              ) -> tuple[list[nn.Module], list[tuple[int, ...]], list[int | None]]:
    """Segments (reversible runs, checkpointed bodies / chains), the skip ids each consumes and
    the skip id each produces (None: none)."""
    mode = seq_kw["memory_mode"]
    items: list[tuple[UNetBody, bool, bool]] = []  # body, preserves shape, pushes a skip
    for layer in layers:
        body = UNetBody(layer.module, layer.kind)
        injector = None
        if injectors is not None and layer.site:
            injector = injectors(InjectionSite(layer.stage, layer.position, layer.channels, layer.level, layer.last))
        items.append((body, layer.preserves, layer.push and injector is None))
        if injector is not None:
            items.append((UNetBody(injector, "injector"), True, layer.push))
    stack: list[int] = []
    segments: list[nn.Module] = []
    pops: list[tuple[int, ...]] = []
    pushes: list[int | None] = []
    group: list[UNetBody] = []
    group_preserves = False
    group_pops: list[int] = []

    def close(push: int | None) -> None:
        nonlocal group, group_pops
        if not group:
            return
        if group_preserves:
            segments.append(ReversibleSequence(group, **seq_kw))
        else:
            bodies = [CheckpointedBody(b.module, b.kind, b.skip_id, mode) for b in group]
            segments.append(bodies[0] if len(bodies) == 1 else CheckpointedChain(bodies, mode))
        pops.append(tuple(group_pops))
        pushes.append(push)
        group, group_pops = [], []

    for push_count, (body, preserves, push) in enumerate(items):
        if group and preserves != group_preserves:
            close(None)
        group_preserves = preserves
        if body.kind == "skip_block":
            if not stack:
                raise ValueError("U-Net layout consumes a skip connection that no earlier layer produced")
            body.skip_id = stack.pop()
            group_pops.append(body.skip_id)
        group.append(body)
        if push:
            stack.append(push_count)
            close(push_count)
    close(None)
    return segments, pops, pushes


#: ``convert_unet(unet, **options)``: the reversible form of ``unet``, i.e. :class:`ReversibleUNet`
#: under the name the rest of idm uses.
convert_unet = ReversibleUNet
