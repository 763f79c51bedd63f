"""Diffusers U-Nets (``UNet2DModel``, Stable-Diffusion-style ``UNet2DConditionModel``) in reversible form.

Two steps, both explicit (no globals, no replaced ``forward`` methods):

1. :func:`prune_diffusers_unet` returns a pruned **copy** that diffusers' own ``forward`` still runs
   (the reference the converted network is tested against). :class:`PruneOptions`:

   * ``cross_attention`` — every transformer block loses ``attn2``/``norm2`` (IDM has no text
     condition); required for ``UNet2DConditionModel``, whose converted network then needs no
     ``encoder_hidden_states``;
   * ``middle`` — the middle block is removed;
   * ``deepest = k`` — the k deepest down stages and the k coarsest up stages are removed. The
     last kept down stage then loses its downsampler (its output would feed a removed stage), and
     the first ResNet block of the first kept up stage, which expected the removed stage's channel
     count ``P`` on its input ``h``, keeps the weights of its first ``C_h`` input channels (``C_h``:
     the channels ``h`` now has) and of all skip channels (GroupNorm affine parameters likewise) —
     a deterministic start that fine-tuning adapts.

   The IDM paper prunes SD v1.5 with all three (``PruneOptions.paper()``: cross-attention, middle
   block, two deepest stages); ``UNet2DModel`` defaults to no pruning.
2. :func:`diffusers_layout` describes the (pruned) model as a :class:`~idm.invertible.layout.UNetLayout`
   with the time embedding frozen at a constant timestep; :func:`~idm.invertible.convert_unet` makes it
   reversible: ResNet blocks with equal in/out channels (and skip-consuming ones whose ``h`` already
   has the output channels), self-attention and transformer blocks become couplings, the rest is
   checkpointed. Every ResNet/attention output of a down stage, its downsampler's output and
   ``conv_in``'s output are skips, consumed one per up-stage ResNet block, as in diffusers.

Class conditioning, additional (SDXL-style) embeddings, Fourier time embeddings and skip-connection
blocks (``SkipDownBlock2D``) are refused with a clear error.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from ..errors import IDMError, check_keys
from .layout import Layer, UNetLayout

SUPPORTED_CLASSES = ("UNet2DModel", "UNet2DConditionModel")


@dataclass(frozen=True)
class PruneOptions:
    """What :func:`prune_diffusers_unet` removes (see the module docstring)."""

    cross_attention: bool = True
    middle: bool = False
    deepest: int = 0

    def __post_init__(self) -> None:
        if int(self.deepest) < 0:
            raise IDMError(f"prune: deepest must be >= 0, got {self.deepest}")

    @classmethod
    def paper(cls) -> "PruneOptions":
        """IDM's pruning of Stable Diffusion v1.5: cross-attention, middle block, two deepest stages."""
        return cls(cross_attention=True, middle=True, deepest=2)

    @classmethod
    def default_for(cls, class_name: str) -> "PruneOptions":
        return cls.paper() if class_name == "UNet2DConditionModel" else cls()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PruneOptions":
        check_keys(d, (f.name for f in fields(cls)), "prune options")
        return cls(**d)


#: ``--prune`` choices of the command line
PRUNE_PRESETS: dict[str, PruneOptions] = {"none": PruneOptions(), "paper": PruneOptions.paper()}


def prune_preset(name: str | None) -> dict[str, Any] | None:
    """The :class:`PruneOptions` fields of preset ``name`` (None: the model class's default)."""
    return None if name is None else PRUNE_PRESETS[name].to_dict()


def class_name(model: nn.Module) -> str:
    name = type(model).__name__
    if name not in SUPPORTED_CLASSES:
        raise IDMError(f"unsupported diffusers model {name}; supported: {', '.join(SUPPORTED_CLASSES)}")
    return name


def _check_supported(model: nn.Module) -> None:
    config = model.config
    if getattr(model, "class_embedding", None) is not None:
        raise IDMError("diffusers U-Nets with class conditioning are not supported")
    if config.get("addition_embed_type") or config.get("encoder_hid_dim_type"):
        raise IDMError("diffusers U-Nets with additional embeddings (SDXL-style) are not supported")
    if config.get("time_embedding_type", "positional") not in ("positional", "learned"):
        raise IDMError(f"diffusers U-Nets with {config['time_embedding_type']} time embeddings are not supported")
    if config.get("center_input_sample"):
        raise IDMError("diffusers U-Nets with center_input_sample are not supported")
    blocks = [*model.down_blocks, *model.up_blocks]
    if any(hasattr(b, "skip_conv") for b in blocks):
        raise IDMError("diffusers U-Nets with skip-connection blocks (SkipDownBlock2D) are not supported")


def _transformer_blocks(model: nn.Module):
    for module in model.modules():
        if hasattr(module, "attn2") and hasattr(module, "attn1"):
            yield module


@torch.no_grad()
def _narrow_input(resnet: nn.Module, keep: list[int]) -> None:
    """Keep the input channels ``keep`` of a diffusers ResnetBlock2D (norm1, conv1, conv_shortcut)."""
    index = torch.tensor(keep, device=resnet.conv1.weight.device)
    norm = resnet.norm1
    if len(keep) % norm.num_groups:
        raise IDMError(f"pruning leaves {len(keep)} channels, not divisible by {norm.num_groups} groups")
    new_norm = nn.GroupNorm(norm.num_groups, len(keep), eps=norm.eps, affine=norm.affine)
    if norm.affine:
        new_norm.weight.copy_(norm.weight[index])
        new_norm.bias.copy_(norm.bias[index])
    resnet.norm1 = new_norm.to(norm.weight if norm.affine else resnet.conv1.weight)
    for name in ("conv1", "conv_shortcut"):
        conv = getattr(resnet, name)
        if conv is None:
            continue
        new = nn.Conv2d(len(keep), conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                        bias=conv.bias is not None).to(conv.weight)
        new.weight.copy_(conv.weight[:, index])
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
        setattr(resnet, name, new)
    resnet.in_channels = len(keep)


def prune_diffusers_unet(model: nn.Module, prune: PruneOptions) -> nn.Module:
    """A pruned deep copy of ``model`` (``model`` itself is not modified)."""
    name = class_name(model)
    _check_supported(model)
    pruned = copy.deepcopy(model)
    has_cross = any(getattr(b, "attn2", None) is not None for b in _transformer_blocks(pruned))
    if name == "UNet2DConditionModel" and has_cross and not prune.cross_attention:
        raise IDMError("a UNet2DConditionModel is converted without its text condition: prune cross_attention")
    if prune.cross_attention:
        for block in _transformer_blocks(pruned):
            block.attn2 = None
            if hasattr(block, "norm2"):
                block.norm2 = None
    if prune.middle:
        pruned.mid_block = None
    k = int(prune.deepest)
    if k:
        n = len(pruned.down_blocks)
        if k >= n:
            raise IDMError(f"prune: cannot remove {k} of the model's {n} stages")
        # channels h has at the first kept up stage, and that stage's expectation
        last_down = pruned.down_blocks[n - 1 - k]
        h_channels = last_down.resnets[-1].out_channels
        first_up = pruned.up_blocks[k]
        resnet = first_up.resnets[0]
        # that block consumed (and still consumes) the last kept down stage's last output
        skip_channels = h_channels
        expected_h = resnet.in_channels - skip_channels
        last_down.downsamplers = None
        pruned.down_blocks = nn.ModuleList(list(pruned.down_blocks)[: n - k])
        pruned.up_blocks = nn.ModuleList(list(pruned.up_blocks)[k:])
        if expected_h != h_channels:
            keep = list(range(h_channels)) + list(range(expected_h, expected_h + skip_channels))
            _narrow_input(resnet, keep)
    return pruned


class SelfAttention(nn.Module):
    """A diffusers attention or transformer module called as ``h -> h`` (no text condition)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.module(h, return_dict=False) if _is_transformer(self.module) else self.module(h)
        return out[0] if isinstance(out, tuple) else out


class OutputHead(nn.Module):
    """``conv_norm_out`` → ``conv_act`` → ``conv_out`` (the first two only if the model has them)."""

    def __init__(self, norm: nn.Module | None, act: nn.Module | None, conv: nn.Module) -> None:
        super().__init__()
        self.norm, self.act, self.conv = norm, act, conv

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            h = self.act(self.norm(h))
        return self.conv(h)


def _is_transformer(module: nn.Module) -> bool:
    return hasattr(module, "transformer_blocks")


def _is_resnet(module: nn.Module) -> bool:
    return hasattr(module, "conv1") and hasattr(module, "time_emb_proj")


def _resnet_preserves(resnet: nn.Module, skip: int = 0) -> bool:
    changes_size = bool(getattr(resnet, "up", False) or getattr(resnet, "down", False))
    return not changes_size and resnet.in_channels - skip == resnet.out_channels


@torch.no_grad()
def time_embedding(model: nn.Module, t: float) -> torch.Tensor:
    """The model's time embedding ``(1, D)`` at timestep ``t``."""
    weight = model.conv_in.weight
    timesteps = torch.full((1,), float(t), device=weight.device)
    if class_name(model) == "UNet2DConditionModel":
        t_emb = model.get_time_embed(sample=torch.empty(1, device=weight.device, dtype=weight.dtype), timestep=timesteps)
        return model.time_embedding(t_emb, None)
    t_emb = model.time_proj(timesteps).to(dtype=weight.dtype)
    return model.time_embedding(t_emb)


def diffusers_layout(model: nn.Module, t_constant: float) -> UNetLayout:
    """The layout of a (pruned) diffusers U-Net with its time embedding frozen at ``t_constant``.

    Stage names ``"down{i}"``, ``"middle"``, ``"up{i}"`` index the (pruned) model's block lists.
    """
    _check_supported(model)
    emb = time_embedding(model, t_constant).detach().clone()
    layers = [Layer(model.conv_in, "plain", False, "input", 0, model.conv_in.out_channels, 0, push=True, site=False)]
    skips = [model.conv_in.out_channels]
    level, channels = 0, model.conv_in.out_channels

    def add(module: nn.Module, kind: str, preserves: bool, stage: str, **flags: bool) -> None:
        """Append a layer at the current channels and level; its position counts within its stage."""
        position = sum(layer.stage == stage for layer in layers)
        layers.append(Layer(module, kind, preserves, stage, position, channels, level, **flags))

    for i, block in enumerate(model.down_blocks):
        stage = f"down{i}"
        attentions = list(getattr(block, "attentions", None) or [])
        for j, resnet in enumerate(block.resnets):
            channels = resnet.out_channels
            add(resnet, "block", _resnet_preserves(resnet), stage)
            if j < len(attentions) and attentions[j] is not None:
                add(SelfAttention(attentions[j]), "plain", True, stage)
            layers[-1].push = True
            skips.append(channels)
        layers[-1].last = True
        for sampler in block.downsamplers or []:
            kind = "block" if _is_resnet(sampler) else "plain"
            add(sampler, kind, False, stage, site=False)
            level += 1
        if block.downsamplers is not None:
            layers[-1].push = True
            skips.append(channels)
    if model.mid_block is not None:
        mid = model.mid_block
        attentions = list(getattr(mid, "attentions", None) or [])
        modules: list[nn.Module] = [mid.resnets[0]]
        for attention, resnet in zip(attentions, mid.resnets[1:]):
            if attention is not None:
                modules.append(SelfAttention(attention))
            modules.append(resnet)
        for module in modules:
            resnet_like = _is_resnet(module)
            channels = module.out_channels if resnet_like else channels
            preserves = _resnet_preserves(module) if resnet_like else True
            add(module, "block" if resnet_like else "plain", preserves, "middle")
        layers[-1].last = True
    for i, block in enumerate(model.up_blocks):
        stage = f"up{i}"
        attentions = list(getattr(block, "attentions", None) or [])
        for j, resnet in enumerate(block.resnets):
            if not skips:
                raise IDMError("diffusers U-Net: an up block consumes more skips than the down path produced")
            skip = skips.pop()
            channels = resnet.out_channels
            add(resnet, "skip_block", _resnet_preserves(resnet, skip), stage)
            if j < len(attentions) and attentions[j] is not None:
                add(SelfAttention(attentions[j]), "plain", True, stage)
        layers[-1].last = True
        for sampler in block.upsamplers or []:
            kind = "block" if _is_resnet(sampler) else "plain"
            add(sampler, kind, False, stage, site=False)
            level -= 1
    if skips:
        raise IDMError(f"diffusers U-Net: {len(skips)} skip connection(s) of the down path are never consumed")
    head = OutputHead(model.conv_norm_out, getattr(model, "conv_act", None), model.conv_out)
    layers.append(Layer(head, "plain", False, "output", 0, model.conv_out.out_channels, 0, site=False))
    downsamplers = sum(block.downsamplers is not None for block in model.down_blocks)
    multiple = 2**downsamplers
    in_channels = model.conv_in.in_channels

    def check_input(x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != in_channels:
            raise IDMError(f"converted diffusers U-Net expects (B, {in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[-2] % multiple or x.shape[-1] % multiple:
            raise IDMError(f"converted diffusers U-Net: H, W must be divisible by {multiple}, got {tuple(x.shape[-2:])}")

    return UNetLayout(layers, emb, in_channels, model.conv_out.out_channels, multiple, check_input, float(t_constant))
