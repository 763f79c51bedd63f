"""Level 2: the prior's U-Net in reversible form (:func:`convert_unet` → :class:`ReversibleUNet`).

Every stage of :class:`idm.priors.unet.UNet` (``down[l]``, ``middle``, ``up[k]``) is split into
maximal runs of consecutive shape-preserving bodies; each run becomes a
:class:`~idm.invertible.sequence.ReversibleSequence` (duplicate → couplings → merge), every other
layer (channel-changing ResBlocks, Down/Upsample, ``input_conv``, ``out``) is a
:class:`CheckpointedBody` (non-reentrant activation checkpointing unless ``memory_mode == "plain"``).
A resample followed directly by a checkpointed layer (the next stage's channel-changing first
ResBlock) runs with it as one checkpointed segment, so the resample's output is not stored
(:func:`run_links`).

Shape-preserving bodies are: ResBlocks with equal in/out channels, AttentionBlocks, caller-supplied
injectors, and — the one non-obvious case — the first ResBlock of an up stage, whose input is
``cat(h, skip)``: as a function ``h ↦ ResBlock(cat(h, skip), emb)`` with the skip passed as a
context tensor it preserves the shape of ``h`` whenever ``h`` already has the stage's channel count
(true for every up stage but the finest one in the default ``(1, 2, 2, 2)`` U-Net). This puts
almost every activation of the U-Net inside reversible runs.

Time conditioning is frozen: the embedding of the constant timestep ``t_constant`` is computed
once at conversion and stored as the buffer ``emb`` ``(1, emb_dim)``; the time-embedding MLP is not
part of the converted network (IDM gives the U-Net no timestep).

Injectors: ``convert_unet(unet, injectors=factory)`` calls ``factory(site)`` for every block of
every stage (:class:`InjectionSite`: stage name, block position, channels, resolution level); a
returned module is inserted right after that block and called as ``injector(h, context)`` with the
``context`` given to :meth:`ReversibleUNet.forward` — it must preserve the shape of ``h``
``(B, channels, H / 2**level, W / 2**level)``. Stage names are ``"down0"…``, ``"middle"``, ``"up0"…``
(the index into ``unet.down`` / ``unet.up``, so ``"up0"`` is the coarsest up stage).

The converted network shares its blocks with ``unet`` (no copy). It does not equal the original
at initialisation unless ``v_init = 0`` (see :mod:`idm.invertible.coupling`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..priors.unet import UNet, UNetStage
from .sequence import MemoryMode, ReversibleSequence, check_memory_mode

BodyKind = Literal["block", "skip_block", "injector", "plain"]


@dataclass(frozen=True)
class InjectionSite:
    """Where an injector would go: after block ``position`` of stage ``stage``.

    ``channels``: feature channels there; ``level``: resolution level, features are
    ``(B, channels, H / 2**level, W / 2**level)`` for a U-Net input of size ``(H, W)``.
    """

    stage: str
    position: int
    channels: int
    level: int


InjectorFactory = Callable[[InjectionSite], "nn.Module | None"]


class UNetBody(nn.Module):
    """A U-Net layer as a body ``(h, state) -> h'``, where ``state = {"emb", "skip", "user"}``.

    ``kind``: ``"block"`` → ``module(h, emb)``; ``"skip_block"`` → ``module(cat(h, skip), emb)``;
    ``"injector"`` → ``module(h, user_context)``; ``"plain"`` → ``module(h)``.
    """

    def __init__(self, module: nn.Module, kind: BodyKind) -> None:
        super().__init__()
        self.module = module
        self.kind = kind

    def forward(self, h: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        if self.kind == "block":
            return self.module(h, state["emb"])
        if self.kind == "skip_block":
            return self.module(torch.cat([h, state["skip"]], dim=1), state["emb"])
        if self.kind == "injector":
            return self.module(h, state["user"])
        return self.module(h)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


class CheckpointedBody(UNetBody):
    """A shape-changing :class:`UNetBody`, checkpointed (non-reentrant) unless ``memory_mode == "plain"``."""

    def __init__(self, module: nn.Module, kind: BodyKind, memory_mode: MemoryMode = "reversible") -> None:
        super().__init__(module, kind)
        self.memory_mode: str = check_memory_mode(memory_mode)

    def forward(self, h: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        if self.memory_mode != "plain" and torch.is_grad_enabled():
            return checkpoint(super().forward, h, state, use_reentrant=False)
        return super().forward(h, state)


#: a shape-changing layer and the state it is called with
Link = tuple[CheckpointedBody, dict[str, Any]]


def _run_plain_links(h: torch.Tensor, links: list[Link]) -> torch.Tensor:
    for body, state in links:
        h = body(h, state)
    return h


def run_links(links: list[Link], h: torch.Tensor) -> torch.Tensor:
    """Consecutive shape-changing layers (e.g. an Upsample and the channel-changing ResBlock after
    it) as one checkpointed segment, each layer also checkpointed inside it.

    Only the segment's input is kept for backward (for the finest Upsample: its 64-channel input at
    half resolution, which the reversible run before it keeps anyway), not the intermediate
    (its full-resolution output, the next layer's input): the outer recomputation produces it, the
    next layer consumes it without saving it, and the inner checkpoint of the first layer
    recomputes what that layer's backward needs only once the next layer's backward is done.
    """
    if len(links) > 1 and links[0][0].memory_mode != "plain" and torch.is_grad_enabled():
        return checkpoint(_run_plain_links, h, links, use_reentrant=False)
    return _run_plain_links(h, links)


class ReversibleStage(nn.Module):
    """A converted :class:`~idm.priors.unet.UNetStage`: ``segments`` (sequences / checkpointed bodies), ``resample``."""

    def __init__(self, segments: list[nn.Module], resample: CheckpointedBody | None, *, level: int, takes_skip: bool):
        super().__init__()
        self.segments = nn.ModuleList(segments)
        self.resample = resample
        self.level = level
        self.takes_skip = takes_skip

    def run_blocks(self, h: torch.Tensor, state: dict[str, Any], lead: list[Link] | None = None) -> torch.Tensor:
        """Run the segments on ``h``; ``lead``: shape-changing layers to run first (the previous
        stage's resample), merged with this stage's leading checkpointed body (see :func:`run_links`)."""
        links, segments = list(lead or []), list(self.segments)
        if segments and isinstance(segments[0], CheckpointedBody):
            links.append((segments.pop(0), state))
        h = run_links(links, h)
        for segment in segments:
            h = segment(h, state)
        return h

    def sequences(self) -> list[ReversibleSequence]:
        return [s for s in self.segments if isinstance(s, ReversibleSequence)]


class ReversibleUNet(nn.Module):
    """The U-Net in reversible form: ``forward(x, context=None) -> eps``, ``(B, C, H, W)`` both.

    Shares its blocks with ``unet``; see the module docstring. ``context`` (any pytree of tensors
    and other objects) is handed unchanged to every injector; its tensors receive gradients.

    Args:
        unet: the prior's U-Net.
        t_constant: timestep whose embedding is frozen into the converted network.
        injectors: ``factory(site) -> module | None`` inserting shape-preserving modules.
        v_init, s_init, m_init: initial coupling / duplication / merge scalars of every run.
        memory_mode: ``"reversible"`` (default), ``"checkpoint"`` or ``"plain"``.
    """

    def __init__(
        self,
        unet: UNet,
        *,
        t_constant: float = 0.0,
        injectors: InjectorFactory | None = None,
        v_init: float = 0.5,
        s_init: float = 1.0,
        m_init: float = 0.0,
        memory_mode: MemoryMode = "reversible",
    ) -> None:
        super().__init__()
        if not isinstance(unet, UNet):
            raise TypeError(f"convert_unet expects idm.priors.unet.UNet, got {type(unet).__name__}")
        check_memory_mode(memory_mode)
        self.config = unet.config
        self.t_constant = float(t_constant)
        with torch.no_grad():
            t = torch.full((1,), self.t_constant, device=unet.input_conv.weight.device)
            self.register_buffer("emb", unet.embed_time(t).detach().clone())
        seq_kw = dict(v_init=v_init, s_init=s_init, m_init=m_init, memory_mode=memory_mode)
        self.input_conv = CheckpointedBody(unet.input_conv, "plain", memory_mode)
        self.down = nn.ModuleList(
            _convert_stage(stage, f"down{i}", injectors, seq_kw) for i, stage in enumerate(unet.down)
        )
        self.middle = _convert_stage(unet.middle, "middle", injectors, seq_kw)
        self.up = nn.ModuleList(_convert_stage(stage, f"up{i}", injectors, seq_kw) for i, stage in enumerate(unet.up))
        self.out = CheckpointedBody(unet.out, "plain", memory_mode)
        self.memory_mode: str = memory_mode
        weight = unet.input_conv.weight
        self.to(device=weight.device, dtype=weight.dtype)  # the new scalars v, s, m

    def stages(self) -> dict[str, ReversibleStage]:
        """Stages by name, in execution order."""
        named = {f"down{i}": s for i, s in enumerate(self.down)}
        named["middle"] = self.middle
        named.update({f"up{i}": s for i, s in enumerate(self.up)})
        return named

    def sequences(self) -> list[ReversibleSequence]:
        return [seq for stage in self.stages().values() for seq in stage.sequences()]

    def forward(self, x: torch.Tensor, context: Any = None) -> torch.Tensor:
        self.config.check_input(x)
        state: dict[str, Any] = {"emb": self.emb, "skip": None, "user": context}
        h = self.input_conv(x, state)
        skips = []
        lead: list[Link] = []  # a stage's resample runs together with the next stage's first layer
        for stage in self.down:
            h = stage.run_blocks(h, state, lead)
            skips.append(h)
            lead = [] if stage.resample is None else [(stage.resample, state)]
        h = self.middle.run_blocks(h, state, lead)
        lead = []
        for stage in self.up:
            h = stage.run_blocks(h, {**state, "skip": skips.pop()}, lead)
            lead = [] if stage.resample is None else [(stage.resample, state)]
        return self.out(run_links(lead, h), state)


def _convert_stage(
    stage: UNetStage, name: str, injectors: InjectorFactory | None, seq_kw: dict[str, Any]
) -> ReversibleStage:
    items: list[tuple[UNetBody, bool]] = []
    channels = 0
    for position, block in enumerate(stage.blocks):
        if position == 0 and stage.takes_skip:
            out_ch = block.out_ch
            items.append((UNetBody(block, "skip_block"), block.in_ch - out_ch == out_ch))
        else:
            items.append((UNetBody(block, "block"), bool(block.preserves_shape)))
        channels = getattr(block, "out_ch", channels)
        if injectors is not None:
            injector = injectors(InjectionSite(name, position, channels, stage.level))
            if injector is not None:
                items.append((UNetBody(injector, "injector"), True))
    segments: list[nn.Module] = []
    run: list[UNetBody] = []
    for body, preserves in items:
        if preserves:
            run.append(body)
            continue
        if run:
            segments.append(ReversibleSequence(run, **seq_kw))
            run = []
        segments.append(CheckpointedBody(body.module, body.kind, seq_kw["memory_mode"]))
    if run:
        segments.append(ReversibleSequence(run, **seq_kw))
    resample = None if stage.resample is None else CheckpointedBody(stage.resample, "block", seq_kw["memory_mode"])
    return ReversibleStage(segments, resample, level=stage.level, takes_skip=stage.takes_skip)


#: ``convert_unet(unet, **options)``: the reversible form of ``unet``, i.e. :class:`ReversibleUNet`
#: under the name the rest of idm uses.
convert_unet = ReversibleUNet
