"""A U-Net as a flat list of layers (:class:`UNetLayout`), the one input of :func:`~idm.invertible.convert_unet`.

Any U-Net — ours (:func:`unet_layout`) or a diffusers model (:mod:`idm.invertible.diffusers`) —
is described by the layers it runs, in order, each a :class:`Layer`: the module, how it is called
(``kind``), whether it preserves the shape of its input (so it can be a reversible coupling),
whether its output is kept as a skip connection (``push``) and where it sits (stage, position,
channels, resolution level, for injectors). Skips form a stack: a ``"skip_block"`` layer consumes
(pops) the most recent skip not yet consumed, as in every U-Net.

Kinds: ``"block"`` → ``module(h, emb)``; ``"skip_block"`` → ``module(cat(h, skip), emb)``;
``"plain"`` → ``module(h)``; ``"injector"`` → ``module(h, context)`` (inserted by the converter).
``emb`` is the frozen time embedding of the converted network (IDM gives the U-Net no timestep).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Literal

import torch
from torch import nn

from ..priors.unet import UNet

if TYPE_CHECKING:
    from ..priors.dncnn import DnCNN

LayerKind = Literal["block", "skip_block", "plain", "injector"]


@dataclass
class Layer:
    """One layer of a U-Net; ``channels``: output channels; features at ``(H, W) / 2**level``."""

    module: nn.Module
    kind: LayerKind
    preserves: bool
    stage: str
    position: int
    channels: int
    level: int
    push: bool = False
    #: is this the last block of its stage (injectors go there in IDM)
    last: bool = False
    #: is this a block that may be followed by an injector (not an input/output/resampling layer)
    site: bool = True


@dataclass
class UNetLayout:
    """A U-Net's layers in execution order, its frozen time embedding ``emb`` ``(1, D)`` (or None)
    of timestep ``t_constant``, input/output channels and the multiple its input sides must have."""

    layers: list[Layer]
    emb: torch.Tensor | None
    in_channels: int
    out_channels: int
    size_multiple: int
    check_input: Callable[[torch.Tensor], None] | None = field(default=None, repr=False)
    #: the timestep whose embedding ``emb`` is
    t_constant: float | None = None


def stage_layers(stage_name: str, blocks: list[tuple[nn.Module, LayerKind, bool, int]], level: int,
                 *, push_last: bool = False) -> list[Layer]:
    """Layers of one stage from ``(module, kind, preserves, channels)``; the last block is marked
    ``last`` (and pushes its output as a skip when ``push_last``)."""
    layers = [Layer(module, kind, preserves, stage_name, i, channels, level)
              for i, (module, kind, preserves, channels) in enumerate(blocks)]
    if layers:
        layers[-1].last = True
        layers[-1].push = push_last
    return layers


@torch.no_grad()
def unet_layout(unet: UNet, t_constant: float = 0.0) -> UNetLayout:
    """The layout of :class:`idm.priors.unet.UNet`: one skip per down stage (its output before the
    resample), consumed by the first ResBlock of the matching up stage."""
    if not isinstance(unet, UNet):
        raise TypeError(f"unet_layout expects idm.priors.unet.UNet, got {type(unet).__name__}")
    t = torch.full((1,), float(t_constant), device=unet.input_conv.weight.device)
    emb = unet.embed_time(t).detach().clone()
    base = unet.config.base_channels
    layers = [Layer(unet.input_conv, "plain", False, "input", 0, base, 0, site=False)]

    def resample(stage, name: str, channels: int) -> list[Layer]:
        if stage.resample is None:
            return []
        return [Layer(stage.resample, "block", False, name, len(stage.blocks), channels, stage.level, site=False)]

    channels = base
    for i, stage in enumerate(unet.down):
        blocks = []
        for block in stage.blocks:
            channels = getattr(block, "out_ch", channels)
            blocks.append((block, "block", bool(block.preserves_shape), channels))
        layers += stage_layers(f"down{i}", blocks, stage.level, push_last=True)
        layers += resample(stage, f"down{i}", channels)
    blocks = []
    for block in unet.middle.blocks:
        channels = getattr(block, "out_ch", channels)
        blocks.append((block, "block", bool(block.preserves_shape), channels))
    layers += stage_layers("middle", blocks, unet.middle.level)
    for i, stage in enumerate(unet.up):
        blocks = []
        for position, block in enumerate(stage.blocks):
            channels = getattr(block, "out_ch", channels)
            if position == 0 and stage.takes_skip:
                blocks.append((block, "skip_block", block.in_ch - block.out_ch == block.out_ch, channels))
            else:
                blocks.append((block, "block", bool(block.preserves_shape), channels))
        layers += stage_layers(f"up{i}", blocks, stage.level)
        layers += resample(stage, f"up{i}", channels)
    layers.append(Layer(unet.out, "plain", False, "output", 0, unet.config.out_channels, 0, site=False))
    return UNetLayout(layers, emb, unet.config.in_channels, unet.config.out_channels,
                      unet.config.size_multiple, unet.config.check_input, float(t_constant))


#: DnCNN middle layers are grouped in this many stages (an injector follows each stage's last layer)
DNCNN_STAGES = 3


def dncnn_layout(net: DnCNN, stages: int = DNCNN_STAGES) -> UNetLayout:
    """The layout of :class:`idm.priors.dncnn.DnCNN` as a (skip-free) "U-Net" at one resolution.

    Input: the network input (B, C(+1), H, W) (image, plus the σ map for σ-input variants, see
    :meth:`~idm.priors.dncnn.DnCNN.network_input`); output: the noise estimate n (B, C, H, W).
    The input conv + ReLU and the output conv change shape; every middle conv-ReLU preserves it.
    The middle layers are grouped in up to ``stages`` stages ``"body0"``, ``"body1"``, … of
    ⌈layers / stages⌉ layers each (15 → 3 × 5, 4 → 2 × 2); injectors go after each stage's last layer.
    """
    from ..priors.dncnn import DnCNN

    if not isinstance(net, DnCNN):
        raise TypeError(f"dncnn_layout expects idm.priors.dncnn.DnCNN, got {type(net).__name__}")
    cfg = net.config
    layers = [Layer(net.head, "plain", False, "input", 0, cfg.features, 0, site=False)]
    body = list(net.body)
    per_stage = max(1, -(-len(body) // stages))
    for s, first in enumerate(range(0, len(body), per_stage)):
        blocks = [(layer, "plain", True, cfg.features) for layer in body[first:first + per_stage]]
        layers += stage_layers(f"body{s}", blocks, 0)
    layers.append(Layer(net.output_conv, "plain", False, "output", 0, cfg.channels, 0, site=False))
    return UNetLayout(layers, None, cfg.in_channels, cfg.channels, 1)
