"""``norm_silu_conv``: ``conv(silu(group_norm(x)))`` that keeps only ``x`` for backward.

Plain autograd keeps two input-sized maps for backward: the GroupNorm output (SiLU's input) and
the SiLU output (the conv's input). :class:`_NormSiLUConv` keeps only ``x`` (plus the per-group
mean and reciprocal std), recomputes the normalisation in backward and orders the work so that at
most three input-sized maps are alive at once:

1. ``a = silu(group_norm(x))`` (in place on the normalised map); conv backward → ``∂a`` and the
   conv's weight and bias gradients; ``a`` is freed;
2. ``n = group_norm(x)`` again; ``∂n = silu'(n) ⊙ ∂a`` written into ``∂a``; ``n`` is freed;
3. GroupNorm backward → ``∂x`` and the GroupNorm weight and bias gradients.

Plain autograd through the same three layers, inside a checkpointed layer's recomputation, holds
``x``, ``n``, ``a``, ``∂a`` and the output of SiLU's backward at once (five maps; the peak of the
invertible U-Net lies in such a block, docs/memory.md).
The values are the same ops' (gradients equal plain autograd to rounding; tested in float64).

It is used by :class:`~idm.priors.unet.ResBlock` when its ``memory_mode`` is not ``"plain"`` and
autocast is off (under autocast the plain path runs, so the autocast casting rules stay PyTorch's).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _group_norm_layout(t: torch.Tensor) -> torch.Tensor:
    """The layout ``torch.group_norm`` hands its kernels: as suggested on CPU (NCHW or channels-last,
    no copy), NCHW-contiguous elsewhere."""
    if t.device.type == "cpu" and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return t
    return t.contiguous()


def _normalise(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int, eps: float):
    b, c = x.shape[:2]
    return torch.native_group_norm(_group_norm_layout(x), weight, bias, b, c, x[0, 0].numel(), groups, eps)


class _NormSiLUConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x, norm_weight, norm_bias, conv_weight, conv_bias, groups: int, eps: float, padding):
        n, mean, rstd = _normalise(x, norm_weight, norm_bias, groups, eps)
        out = F.conv2d(F.silu(n, inplace=True), conv_weight, conv_bias, padding=padding)
        ctx.groups, ctx.eps, ctx.padding = groups, eps, padding
        ctx.has_conv_bias = conv_bias is not None
        ctx.save_for_backward(x, mean, rstd, norm_weight, norm_bias, conv_weight)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor):
        x, mean, rstd, norm_weight, norm_bias, conv_weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        a = F.silu(_normalise(x, norm_weight, norm_bias, ctx.groups, ctx.eps)[0], inplace=True)
        grad_a, grad_cw, grad_cb = torch.ops.aten.convolution_backward(
            grad_out.to(a.dtype), a, conv_weight, [conv_weight.shape[0]] if ctx.has_conv_bias else None,
            [1, 1], list(ctx.padding), [1, 1], False, [0, 0], 1, [True, needs[3], needs[4] and ctx.has_conv_bias],
        )
        del a
        n = _normalise(x, norm_weight, norm_bias, ctx.groups, ctx.eps)[0]
        grad_n = torch.ops.aten.silu_backward.grad_input(grad_a, n, grad_input=grad_a)
        del n
        b, c = x.shape[:2]
        grad_x, grad_nw, grad_nb = torch.ops.aten.native_group_norm_backward(
            _group_norm_layout(grad_n), _group_norm_layout(x), mean, rstd, norm_weight, b, c, x[0, 0].numel(), ctx.groups,
            [needs[0], needs[1] and norm_weight is not None, needs[2] and norm_bias is not None],
        )
        return grad_x, grad_nw, grad_nb, grad_cw, grad_cb, None, None, None


def norm_silu_conv(x: torch.Tensor, norm: nn.GroupNorm, conv: nn.Conv2d, *, lean: bool = True) -> torch.Tensor:
    """``conv(silu(norm(x)))`` for ``x`` ``(B, C, H, W)``, keeping only ``x`` for backward (module doc).

    ``lean=False`` runs plain autograd. ``conv`` must be a stride-1, dilation-1, ungrouped 2-D
    convolution with numeric zero padding (the ResBlock's 3×3 conv); other convolutions, autocast
    and calls without grad run plainly.
    """
    lean = (
        lean
        and torch.is_grad_enabled()
        and not torch.is_autocast_enabled(x.device.type)
        and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
        and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
    )
    if not lean:
        return conv(F.silu(norm(x)))
    return _NormSiLUConv.apply(
        x, norm.weight, norm.bias, conv.weight, conv.bias, norm.num_groups, norm.eps, tuple(conv.padding)
    )
