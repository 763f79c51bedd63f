"""Local-wise mutual information (LMI): MIDiffusion's guidance (Wang, Yang et al., 2023).

For every pixel ``p`` of a source ``s`` and a target ``t`` (same size, values on [0, 1]), the 3×3
source patch ``a = s[p + N]`` (``N`` the 3×3 neighbourhood) is compared with the nine target patches
``b_d = t[p + d + N]``, ``d ∈ {−1, 0, 1}²``. For each pair, Gaussian kernel density estimates on
``bins`` centres ``c_j = j / (bins − 1)``, with the soft assignment of a value ``v``

    w(v)_j = exp(−(v − c_j)² / 2σ²) / Σ_i exp(−(v − c_i)² / 2σ²)      (σ = ``width`` · bin spacing)

give ``p_a = ⅑ Σ_k w(a_k)``, ``p_b = ⅑ Σ_k w(b_k)`` and the joint ``p_ab = ⅑ Σ_k w(a_k) w(b_k)ᵀ`` (the
marginals of ``p_ab`` are exactly ``p_a`` and ``p_b``); with ``H(p) = −Σ p log(p + 1e-10)``,

    I = H_a + H_b − H_ab,        NMI = 2 I / (H_a + H_b),        LMI(p) = max_d NMI(a, b_d).

The kernel trades smoothness for fidelity: in the hard-histogram limit (``width`` → 0) an image against
itself scores 1, the bound, wherever its patch spans several bins; wide kernels favour high-contrast
targets (an image squared can outscore the image). The default ``width`` 0.3 keeps an image's map
against itself above its map against noise, a blurred, gamma-distorted or mirrored copy
(tests/test_lmi.py). A constant source patch carries no information: its joint density is the product of the marginals, so
I = 0 and its NMI is 0 (with a zero gradient; such pixels, e.g. the background of a scan, are skipped). Borders repeat the edge pixels (the shifted patches reach two pixels outside). The map is
differentiable in both images: the maximum passes the gradient of the best shift, so the nine shifts
are scored without a graph and only the best one's NMI is recomputed with it (memory and backward cost
of one shift, ``(B·H·W, bins, bins)``).

Shapes: ``(B, C, H, W)`` → ``(B, C, H, W)``, each channel on its own; any size, batched.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import IDMError

#: added inside the logarithm of the entropies and to the NMI's denominator
EPS = 1e-10


def soft_assignment(values: torch.Tensor, bins: int, width: float) -> torch.Tensor:
    """``values (...)`` on [0, 1] → Gaussian-kernel weights ``(..., bins)`` summing to 1 (module docstring)."""
    centres = torch.linspace(0.0, 1.0, bins, dtype=values.dtype, device=values.device)
    sigma = width / (bins - 1)
    return torch.softmax(-0.5 * ((values.unsqueeze(-1) - centres) / sigma) ** 2, dim=-1)


def entropy(p: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``−Σ p log(p + ε)`` over ``dims``."""
    return -(p * torch.log(p + EPS)).sum(dims)


#: the nine shifts d of the target patch
SHIFTS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def _patch_values(padded: torch.Tensor, dy: int, dx: int, height: int, width: int) -> torch.Tensor:
    """From images ``(N, H + 4, W + 4)`` padded by 2, the 9 values of the 3×3 patch at ``p + (dy, dx)``
    for every pixel ``p``: ``(N·H·W, 9)``."""
    rows = [padded[:, 1 + dy + ky : 1 + dy + ky + height, 1 + dx + kx : 1 + dx + kx + width]
            for ky in range(3) for kx in range(3)]
    return torch.stack(rows, dim=3).reshape(-1, 9)


def _nmi(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """NMI of patch pairs: weights ``(P, 9, K)`` each → ``(P,)``."""
    p_a, p_b = source.mean(1), target.mean(1)
    joint = torch.bmm(source.transpose(1, 2), target) / source.shape[1]  # (P, K, K)
    h_a, h_b = entropy(p_a, (1,)), entropy(p_b, (1,))
    mutual = h_a + h_b - entropy(joint, (1, 2))
    return 2 * mutual / (h_a + h_b + EPS)


class LocalMutualInformation(nn.Module):
    """LMI map (module docstring). ``bins`` kernel centres on [0, 1] (MIDiffusion: 27), ``width``: the
    kernel's standard deviation in bin spacings."""

    def __init__(self, bins: int = 27, width: float = 0.3) -> None:
        super().__init__()
        if int(bins) != bins or bins < 2:
            raise IDMError(f"LMI needs at least 2 bins, got {bins!r}")
        if not width > 0:
            raise IDMError(f"LMI kernel width must be > 0, got {width!r}")
        self.bins, self.width = int(bins), float(width)

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``source``, ``target`` ``(B, C, H, W)`` on [0, 1] (clipped) → LMI ``(B, C, H, W)`` on [0, 1]."""
        if source.ndim != 4 or source.shape != target.shape:
            raise IDMError(f"LMI compares images of one shape (B, C, H, W), got {tuple(source.shape)} "
                           f"and {tuple(target.shape)}")
        if not (torch.isfinite(source).all() and torch.isfinite(target).all()):
            raise IDMError("LMI needs finite images (NaN or inf found)")
        b, c, h, w = source.shape
        flat = lambda x: x.clamp(0, 1).reshape(b * c, 1, h, w)  # noqa: E731
        padded_s = F.pad(flat(source), (2, 2, 2, 2), mode="replicate")[:, 0]
        padded_t = F.pad(flat(target), (2, 2, 2, 2), mode="replicate")[:, 0]
        weights = lambda values: soft_assignment(values, self.bins, self.width)  # noqa: E731
        patches = _patch_values(padded_s, 0, 0, h, w)
        # a constant source patch has I = 0 against any target and a zero gradient: only the others are scored
        keep = (patches.amax(1) > patches.amin(1)).nonzero()[:, 0]
        a = weights(patches[keep])
        out = patches.new_zeros(patches.shape[0])
        with torch.no_grad():  # every shift's NMI; the gradient needs only the best one's
            values = torch.stack([_patch_values(padded_t, dy, dx, h, w)[keep] for dy, dx in SHIFTS])  # (9, P', 9)
            scores = torch.stack([_nmi(a, weights(shifted)) for shifted in values])
            best = scores.argmax(0)
        if not (torch.is_grad_enabled() and (source.requires_grad or target.requires_grad)):
            return out.index_copy(0, keep, scores.gather(0, best[None])[0]).reshape(b, c, h, w)
        values = torch.stack([_patch_values(padded_t, dy, dx, h, w)[keep] for dy, dx in SHIFTS])  # with the graph
        chosen = values[best, torch.arange(best.numel(), device=best.device)]
        return out.index_copy(0, keep, _nmi(a, weights(chosen))).reshape(b, c, h, w)

    def extra_repr(self) -> str:
        return f"bins={self.bins}, width={self.width}"
