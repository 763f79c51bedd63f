"""ε-prediction U-Net for the diffusion prior.

``UNet(config)(x, t) -> eps``: ``x`` is a noisy image ``(B, C, H, W)`` on the model range [-1, 1]
(see :mod:`idm.priors.schedule`), ``t`` a ``(B,)`` tensor of (integer or float) timesteps in
[0, 1000); the output has the shape of ``x``. ``H`` and ``W`` must be divisible by
``2 ** (len(channel_mults) - 1)``. With ``config.dims = 3`` the same network is built from 3-D layers
and takes volumes ``(B, C, D, H, W)`` (every spatial size a multiple); the invertible conversion and
the lean ResBlock path are 2-D.

Structure (built for the invertible conversion in :mod:`idm.invertible`)::

    input_conv                         conv 3x3, in_channels -> ch_0            (shape-changing)
    down[l]   for level l = 0..L-1     UNetStage: blocks, then skip_l = h, then resample
    middle                             UNetStage: ResBlock, AttentionBlock, ResBlock (all shape-preserving)
    up[k]     for k = 0..L-1           UNetStage of level l = L-1-k: h = cat(h, skip_l) first, then blocks,
                                       then resample (Upsample) unless l == 0
    out                                GroupNorm + SiLU + conv 3x3 (zero-init), ch_0 -> out_channels

with ``ch_l = base_channels * channel_mults[l]`` and ``L = len(channel_mults)``. There is **one
skip connection per resolution level** (the output of the down stage's blocks, taken before its
Downsample), consumed by the *first* block of the up stage of the same level. Hence:

* down stage ``l``: ``num_res_blocks`` ResBlocks (each followed by an AttentionBlock if
  ``l in attention_levels``); the first ResBlock maps ``ch_{l-1} -> ch_l`` (``ch_{-1} = ch_0``) and
  is shape-changing iff the channel counts differ, all later blocks are shape-preserving; then a
  ``Downsample`` (stride-2 conv, shape-changing) for ``l < L-1``.
* middle: ``ResBlock, AttentionBlock, ResBlock`` at ``ch_{L-1}``, all shape-preserving.
* up stage of level ``l``: the input is ``cat(h, skip_l)`` with ``c_in + ch_l`` channels, where
  ``c_in = ch_{L-1}`` for the deepest level and ``ch_{l+1}`` otherwise; the first ResBlock maps it
  to ``ch_l`` (always shape-changing); the remaining ``num_res_blocks - 1`` ResBlocks and all
  AttentionBlocks are shape-preserving; then an ``Upsample`` (nearest x2 + conv 3x3 keeping the
  channels, shape-changing) for ``l > 0``.

Every block (ResBlock, AttentionBlock, Downsample, Upsample) is called as ``block(h, emb)`` and has
a ``preserves_shape`` attribute; :func:`split_runs` groups a stage's blocks into maximal runs of
consecutive shape-preserving blocks and single shape-changing blocks.

Time conditioning: ``emb = unet.embed_time(t)`` (sinusoidal features + MLP, ``(B, emb_dim)``,
``emb_dim = 4 * base_channels``); ``unet(x, emb=emb)`` reuses a precomputed (e.g. constant) embedding.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..errors import IDMError, check_keys
from .lean import norm_silu_conv


@dataclass(frozen=True)
class UNetConfig:
    """Architecture hyper-parameters of :class:`UNet`.

    ``attention_levels`` are **stage indices** (0 = full resolution, ``L-1`` = coarsest), not
    feature-map sizes, so a network trained on patches behaves the same on any image size.
    ``groups`` is the GroupNorm group count, clamped per layer to the largest divisor of the channel
    count; ``num_heads`` is clamped likewise.
    """

    in_channels: int = 1
    out_channels: int = 1
    base_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (2,)
    dropout: float = 0.0
    groups: int = 32
    num_heads: int = 4
    dims: int = 2  # spatial dimensions: 2 (images) or 3 (volumes)

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mults", tuple(int(m) for m in self.channel_mults))
        object.__setattr__(self, "attention_levels", tuple(int(a) for a in self.attention_levels))
        if min(self.in_channels, self.out_channels, self.base_channels, self.groups, self.num_heads) < 1:
            raise IDMError(f"U-Net channel/group/head counts must be positive: {self}")
        if not self.channel_mults or min(self.channel_mults) < 1:
            raise IDMError(f"U-Net channel_mults must be a non-empty tuple of positive ints, got {self.channel_mults}")
        if self.num_res_blocks < 1:
            raise IDMError(f"U-Net num_res_blocks must be >= 1, got {self.num_res_blocks}")
        bad = [a for a in self.attention_levels if not 0 <= a < len(self.channel_mults)]
        if bad:
            raise IDMError(f"U-Net attention_levels {bad} outside 0..{len(self.channel_mults) - 1}")
        if not 0.0 <= self.dropout < 1.0:
            raise IDMError(f"U-Net dropout must lie in [0, 1), got {self.dropout}")
        if self.dims not in (2, 3):
            raise IDMError(f"U-Net dims must be 2 or 3, got {self.dims}")

    @property
    def levels(self) -> int:
        return len(self.channel_mults)

    @property
    def size_multiple(self) -> int:
        """Image height and width must be multiples of this."""
        return 2 ** (len(self.channel_mults) - 1)

    @property
    def emb_dim(self) -> int:
        return 4 * self.base_channels

    def check_input(self, x: torch.Tensor) -> None:
        """Raise :class:`IDMError` unless ``x`` is ``(B, in_channels, H, W)`` (``dims = 3``: ``(B, in_channels, D,
        H, W)``) with every spatial size a multiple of ``size_multiple``."""
        if x.ndim != 2 + self.dims or x.shape[1] != self.in_channels:
            axes = "H, W" if self.dims == 2 else "D, H, W"
            raise IDMError(f"U-Net expects input (B, {self.in_channels}, {axes}), got {tuple(x.shape)}")
        m = self.size_multiple
        if any(size % m for size in x.shape[2:]):
            raise IDMError(f"U-Net input size {tuple(x.shape[2:])} must be divisible by {m}; pad the image first")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channel_mults"] = list(self.channel_mults)
        d["attention_levels"] = list(self.attention_levels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UNetConfig":
        """Inverse of :meth:`to_dict` (lists become tuples in ``__post_init__``); unknown keys raise."""
        check_keys(d, (f.name for f in fields(cls)), "U-Net config")
        return cls(**d)


def _groups(channels: int, groups: int) -> int:
    """Largest divisor of ``channels`` that is ``<= groups``."""
    return max(g for g in range(1, min(groups, channels) + 1) if channels % g == 0)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(_groups(channels, groups), channels, eps=1e-6)


def conv_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """``nn.Conv2d`` (``dims = 2``) or ``nn.Conv3d`` (``dims = 3``) with the given arguments."""
    return (nn.Conv2d, nn.Conv3d)[dims - 2](*args, **kwargs)


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of timesteps ``t`` (B,) → (B, dim), float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    feats = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        feats = F.pad(feats, (0, 1))
    return feats


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + projected time embedding, GroupNorm-SiLU-dropout-conv (zero-init), + skip.

    ``(B, in_ch, H, W), (B, emb_dim) -> (B, out_ch, H, W)``; the skip is a 1x1 conv iff channels change.

    ``memory_mode`` (set by :func:`idm.invertible.set_memory_mode`): ``"plain"`` (default) runs plain
    autograd; any other mode computes the first GroupNorm-SiLU-conv with
    :func:`~idm.priors.lean.norm_silu_conv`, which keeps only the block input for backward. The skip
    is computed first, so that in backward its input gradient is produced after the residual
    branch's (not held while that branch's backward runs). Values are the same in every mode.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, *, dropout: float = 0.0, groups: int = 32,
                 dims: int = 2) -> None:
        super().__init__()
        self.in_ch, self.out_ch = in_ch, out_ch
        self.norm1 = group_norm(in_ch, groups)
        self.conv1 = conv_nd(dims, in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = group_norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv_nd(dims, out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Identity() if in_ch == out_ch else conv_nd(dims, in_ch, out_ch, 1)
        self.memory_mode = "plain"

    @property
    def preserves_shape(self) -> bool:
        return self.in_ch == self.out_ch

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        s = self.skip(h)
        r = norm_silu_conv(h, self.norm1, self.conv1, lean=self.memory_mode != "plain")
        e = self.emb_proj(F.silu(emb)).to(r.dtype)
        r = r + e.reshape(*e.shape, *[1] * (r.ndim - 2))
        r = self.conv2(self.dropout(F.silu(self.norm2(r))))
        return s + r


class AttentionBlock(nn.Module):
    """GroupNorm + multi-head self-attention over the H*W positions + residual (out proj zero-init).

    ``(B, ch, H, W) -> (B, ch, H, W)``; ``emb`` is accepted and ignored.
    """

    preserves_shape = True

    def __init__(self, ch: int, *, num_heads: int = 4, groups: int = 32, dims: int = 2) -> None:
        super().__init__()
        self.num_heads = _groups(ch, num_heads)
        self.norm = group_norm(ch, groups)
        self.qkv = conv_nd(dims, ch, 3 * ch, 1)
        self.proj = conv_nd(dims, ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        qkv = rearrange(self.qkv(self.norm(h)).flatten(2), "b (k heads d) n -> k b heads n d", k=3, heads=self.num_heads)
        # contiguous q, k, v: SDPA then uses its fused (flash) kernel, which does not materialise the
        # (HW x HW) attention matrix (less memory and faster on CPU)
        q, k, v = (t.contiguous() for t in qkv)  # (B, heads, HW, c/heads)
        a = F.scaled_dot_product_attention(q, k, v)
        return h + self.proj(rearrange(a, "b heads n d -> b (heads d) n").reshape(h.shape))


class Downsample(nn.Module):
    """Stride-2 conv 3x3: ``(B, ch, H, W) -> (B, ch, H/2, W/2)``."""

    preserves_shape = False

    def __init__(self, ch: int, dims: int = 2) -> None:
        super().__init__()
        self.conv = conv_nd(dims, ch, ch, 3, stride=2, padding=1)

    def forward(self, h: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(h)


class Upsample(nn.Module):
    """Nearest x2 + conv 3x3: ``(B, ch, H, W) -> (B, ch, 2H, 2W)``."""

    preserves_shape = False

    def __init__(self, ch: int, dims: int = 2) -> None:
        super().__init__()
        self.conv = conv_nd(dims, ch, ch, 3, padding=1)

    def forward(self, h: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))


class UNetStage(nn.Module):
    """One resolution level: ``blocks`` (ResBlock / AttentionBlock) then optional ``resample``.

    ``takes_skip``: the stage input is ``cat(h, skip)`` along channels (up stages only).
    ``level``: resolution level (0 = full resolution).
    """

    def __init__(self, blocks: Iterable[nn.Module], resample: nn.Module | None, *, level: int, takes_skip: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.resample = resample
        self.level = level
        self.takes_skip = takes_skip

    def run_blocks(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = block(h, emb)
        return h


def split_runs(blocks: Iterable[nn.Module]) -> list[list[nn.Module]]:
    """Group ``blocks`` in order into maximal runs of shape-preserving blocks and single others.

    Every returned list either holds only blocks with ``preserves_shape`` True, or exactly one
    block with ``preserves_shape`` False; concatenated, the lists give ``blocks`` back.
    """
    runs: list[list[nn.Module]] = []
    for block in blocks:
        if block.preserves_shape and runs and runs[-1][0].preserves_shape:
            runs[-1].append(block)
        else:
            runs.append([block])
    return runs


class UNet(nn.Module):
    """ε-prediction U-Net (see module docstring for the exact structure)."""

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        cfg = config or UNetConfig()
        self.config = cfg
        g, emb_dim, drop = cfg.groups, cfg.emb_dim, cfg.dropout
        chans = [cfg.base_channels * m for m in cfg.channel_mults]
        L = cfg.levels

        self.time_embed = nn.Sequential(
            nn.Linear(cfg.base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        dims = cfg.dims
        self.input_conv = conv_nd(dims, cfg.in_channels, chans[0], 3, padding=1)

        def res(i: int, o: int) -> ResBlock:
            return ResBlock(i, o, emb_dim, dropout=drop, groups=g, dims=dims)

        def attn(c: int) -> AttentionBlock:
            return AttentionBlock(c, num_heads=cfg.num_heads, groups=g, dims=dims)

        self.down = nn.ModuleList()
        ch = chans[0]
        for level, out_ch in enumerate(chans):
            blocks: list[nn.Module] = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(res(ch, out_ch))
                ch = out_ch
                if level in cfg.attention_levels:
                    blocks.append(attn(ch))
            resample = Downsample(ch, dims) if level < L - 1 else None
            self.down.append(UNetStage(blocks, resample, level=level, takes_skip=False))

        self.middle = UNetStage([res(ch, ch), attn(ch), res(ch, ch)], None, level=L - 1, takes_skip=False)

        self.up = nn.ModuleList()
        for level in reversed(range(L)):
            out_ch = chans[level]
            blocks = []
            for i in range(cfg.num_res_blocks):
                blocks.append(res(ch + out_ch if i == 0 else out_ch, out_ch))
                ch = out_ch
                if level in cfg.attention_levels:
                    blocks.append(attn(ch))
            resample = Upsample(ch, dims) if level > 0 else None
            self.up.append(UNetStage(blocks, resample, level=level, takes_skip=True))

        self.out = nn.Sequential(group_norm(ch, g), nn.SiLU(), conv_nd(dims, ch, cfg.out_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def stages(self) -> list[UNetStage]:
        """All stages in execution order: down (fine → coarse), middle, up (coarse → fine)."""
        return [*self.down, self.middle, *self.up]

    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        """Timesteps ``(B,)`` (int or float, in [0, 1000)) → embedding ``(B, emb_dim)``."""
        if t.ndim != 1:
            raise IDMError(f"timesteps must have shape (B,), got {tuple(t.shape)}")
        feats = timestep_features(t, self.config.base_channels)
        return self.time_embed(feats.to(self.time_embed[0].weight.dtype))

    def check_input(self, x: torch.Tensor) -> None:
        """Raise :class:`IDMError` unless ``x`` fits this U-Net (see :meth:`UNetConfig.check_input`)."""
        self.config.check_input(x)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor | float | int | None = None, *, emb: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x`` (B, C, H, W) on [-1, 1]-ish, timesteps ``t`` (B,) or scalar, or ``emb`` (B or 1, emb_dim) → ε."""
        self.check_input(x)
        if emb is None:
            if t is None:
                raise IDMError("U-Net needs timesteps t or a precomputed embedding emb")
            t = torch.as_tensor(t, device=x.device)
            if t.ndim == 0:
                t = t.expand(x.shape[0])
            emb = self.embed_time(t)
        h = self.input_conv(x)
        skips = []
        for stage in self.down:
            h = stage.run_blocks(h, emb)
            skips.append(h)
            if stage.resample is not None:
                h = stage.resample(h, emb)
        h = self.middle.run_blocks(h, emb)
        for stage in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            h = stage.run_blocks(h, emb)
            if stage.resample is not None:
                h = stage.resample(h, emb)
        return self.out(h)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
