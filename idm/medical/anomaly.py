"""Anomaly detection with a diffusion prior and a noise-aware classifier (Wolleb et al., "Diffusion
models for medical anomaly detection", MICCAI 2022).

A scan is the four BraTS contrasts as channels ``(4, H, W)`` on [0, 1] (:data:`CONTRASTS`). With a DDPM
on such scans (``model(x, t) -> ε`` on [-1, 1]) and a classifier ``p(c | x_t, t)`` trained on noised scans
(c = 0 healthy, 1 diseased):

1. **encode** deterministically (DDIM inversion, η = 0) from x₀ to the level L over ``steps`` respaced
   steps: ``x_t' = √ᾱ' x̂₀ + √(1 − ᾱ') ε`` with ``ε = model(x_t, t)``, t < t';
2. **decode** back with DDIM (η = 0), each ε shifted towards "healthy" by the classifier's gradient::

       ε̂ = ε − s √(1 − ᾱ_t) ∇_{x_t} log p(healthy | x_t, t)

   (``s = 0`` gives the plain reconstruction: the baseline);
3. the **anomaly map** is ``Σ_c |x − x̂|`` over the contrasts, thresholded by Otsu's method
   (scikit-image ``threshold_otsu``).

:func:`dice` and :func:`pixel_auroc` score a map against a tumour mask.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import IDMError
from ..priors.schedule import NoiseSchedule, ddim_step, from_model_range, to_model_range, x0_from_eps
from ..priors.unet import Downsample, ResBlock, group_norm, timestep_features
from ..zeroshot.common import EpsModel, abar_at, timestep_pairs

#: the contrasts of a scan, in channel order
CONTRASTS = ("t1", "t1ce", "t2", "flair")
#: class indices of the classifier
HEALTHY, DISEASED = 0, 1


# --- scans ---------------------------------------------------------------------------------------
def check_scan(scan: torch.Tensor, what: str = "scan") -> torch.Tensor:
    """``scan`` as float32 ``(4, H, W)`` on [0, 1] (:func:`idm.data.check_image`); one-line :class:`IDMError` otherwise."""
    from ..data import check_image

    if scan.ndim != 3 or scan.shape[0] != len(CONTRASTS):
        raise IDMError(f"{what} must hold the {len(CONTRASTS)} contrasts {', '.join(CONTRASTS)} as (4, H, W), "
                       f"got shape {tuple(scan.shape)}")
    return check_image(scan, what).float().clamp(0, 1)


def read_scan(path: str | Path) -> torch.Tensor:
    """A scan ``(4, H, W)`` on [0, 1]: a folder holding one 2-D NIfTI per contrast (BraTS names,
    ``*_t1_*``, ``*_t1ce_*``, ``*_t2_*``, ``*_flair_*``) or a ``(4, H, W)`` ``.npy`` array."""
    from ..io.medical import read_volume, single_slice

    path = Path(path)
    if path.suffix.lower() == ".npy":
        from ..data.images import read_npy

        array = read_npy(path, "scan")
        if array.dtype.kind not in "fiu":
            raise IDMError(f"scan {path} holds {array.dtype} values; a scan is real")
        return check_scan(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)), f"scan {path}")
    if not path.is_dir():
        raise IDMError(f"a scan is a folder of the four contrast NIfTIs or a (4, H, W) .npy: {path} is neither")
    images = []
    for contrast in CONTRASTS:
        found = [p for p in sorted(path.iterdir()) if p.name.lower().endswith((".nii", ".nii.gz"))
                 and re.search(rf"_{contrast}_", p.name.lower())]
        if len(found) != 1:
            raise IDMError(f"scan folder {path} needs exactly one *_{contrast}_*.nii[.gz], found {len(found)}")
        images.append(single_slice(read_volume(found[0]).data, found[0], f"contrast {contrast}"))
    if len({tuple(image.shape) for image in images}) != 1:
        raise IDMError(f"the contrasts in {path} must be slices of one size, got {[tuple(i.shape) for i in images]}")
    return check_scan(torch.stack(images).float(), f"scan {path}")


def read_mask(path: str | Path) -> torch.Tensor:
    """A tumour mask ``(H, W)`` bool: a label map (NIfTI or ``.npy``) whose non-zero labels are tumour."""
    from ..io.medical import read_volume, single_slice

    return single_slice(read_volume(path).data, path, "label map") != 0


# --- the noise-aware classifier ------------------------------------------------------------------
class NoiseAwareClassifier(nn.Module):
    """``p(c | x_t, t)``: logits ``(B, 2)`` for a noised scan ``x_t`` ``(B, C, H, W)`` on the prior's
    scale at timesteps ``t`` (B,) — the encoder half of a U-Net (ResBlocks with the timestep embedding,
    stride-2 downsampling per level) and global average pooling; any H, W."""

    def __init__(self, in_channels: int = len(CONTRASTS), base_channels: int = 32,
                 channel_mults: tuple[int, ...] = (1, 2, 2, 4), groups: int = 8) -> None:
        super().__init__()
        self.config = {"in_channels": int(in_channels), "base_channels": int(base_channels),
                       "channel_mults": [int(m) for m in channel_mults], "groups": int(groups)}
        emb = 4 * base_channels
        self.base_channels = base_channels
        self.time_embed = nn.Sequential(nn.Linear(base_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.stem = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        blocks, channels = [], base_channels
        for level, mult in enumerate(channel_mults):
            blocks.append(ResBlock(channels, base_channels * mult, emb, groups=groups))
            channels = base_channels * mult
            if level + 1 < len(channel_mults):
                blocks.append(Downsample(channels))
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Sequential(group_norm(channels, groups), nn.SiLU())
        self.out = nn.Linear(channels, 2)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(timestep_features(t, self.base_channels))
        h = self.stem(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(self.head(h).mean(dim=(2, 3)))


# --- encode, guided decode -----------------------------------------------------------------------
def check_settings(level: int, steps: int, scale: float, num_steps: int = 1000) -> None:
    """One-line :class:`IDMError` unless 0 < ``level`` < ``num_steps`` (the schedule's), ``steps`` ≥ 1 and ``scale`` ≥ 0."""
    if not 0 < level < num_steps or steps < 1 or scale < 0:
        raise IDMError(f"the encoding level must lie in (0, {num_steps}), the steps be >= 1 and the scale >= 0; "
                       f"got {level}, {steps}, {scale:g}")



def ddim_encode(model: EpsModel, x0: torch.Tensor, schedule: NoiseSchedule, level: int, steps: int,
                progress: bool = False) -> torch.Tensor:
    """Deterministic DDIM inversion of ``x0`` (prior range) from t = 0 up to ``level`` over the
    respaced timesteps of ``timestep_pairs(schedule, steps, t_max=level)`` walked backwards → x_level."""
    pairs = timestep_pairs(schedule, steps, t_max=level)[::-1]  # (t, t_next) with t_next < t: walk t_next → t
    x = x0
    for t, t_prev in tqdm(pairs, disable=not progress, desc="encode", leave=False):
        here = max(t_prev, 0)
        abar_here, abar_next = abar_at(schedule, t_prev), abar_at(schedule, t)
        eps = model(x, torch.full((x.shape[0],), here, dtype=torch.long, device=x.device))
        estimate = x0 if t_prev < 0 else x0_from_eps(x, eps, abar_here)
        x = ddim_step(estimate, eps, abar_next)
    return x


def guided_decode(model: EpsModel, classifier: nn.Module | None, x: torch.Tensor, schedule: NoiseSchedule,
                  level: int, steps: int, scale: float, progress: bool = False) -> torch.Tensor:
    """DDIM (η = 0) from ``x`` at ``level`` down to x̂₀ (prior range, not clipped: with ``scale = 0`` this
    walk is the exact reverse of :func:`ddim_encode`), ε shifted by ``scale`` times the classifier's
    gradient towards healthy (module docstring); ``scale = 0`` or no classifier: unguided."""
    x0 = x
    for t, t_next in tqdm(timestep_pairs(schedule, steps, t_max=level), disable=not progress, desc="decode",
                          leave=False):
        abar, abar_next = abar_at(schedule, t), abar_at(schedule, t_next)
        timesteps = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        eps = model(x, timesteps)
        if classifier is not None and scale > 0:
            with torch.enable_grad():
                leaf = x.detach().requires_grad_(True)
                log_p = F.log_softmax(classifier(leaf, timesteps), dim=1)[:, HEALTHY].sum()
                (grad,) = torch.autograd.grad(log_p, leaf)
            eps = eps - scale * (1 - abar) ** 0.5 * grad
        x0 = x0_from_eps(x, eps, abar)
        x = ddim_step(x0, eps, abar_next)
    return x0


def anomaly_map(model: EpsModel, classifier: nn.Module | None, scan: torch.Tensor, schedule: NoiseSchedule, *,
                level: int = 500, steps: int = 25, scale: float = 100.0, size_multiple: int = 1,
                progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(map (B, H, W), healthy x̂ (B, 4, H, W) on [0, 1])`` for scans ``(B, 4, H, W)`` on [0, 1]:
    encode to ``level``, decode guided by ``scale`` (module docstring), ``Σ_c |x − x̂|``. The state is
    padded at the bottom / right to ``size_multiple`` (replicated edges) and cropped back."""
    from ..physics.canvas import Canvas

    check_settings(level, steps, scale, schedule.num_steps)
    canvas = Canvas.to_multiple(tuple(scan.shape[-2:]), size_multiple)
    x0 = to_model_range(canvas.pad(scan, mode="replicate"))
    latent = ddim_encode(model, x0, schedule, level, steps, progress)
    healthy = from_model_range(canvas.crop(guided_decode(model, classifier, latent, schedule, level, steps, scale,
                                                         progress))).clamp(0, 1)
    return (scan - healthy).abs().sum(1), healthy


# --- scores --------------------------------------------------------------------------------------
def otsu_mask(values: torch.Tensor) -> torch.Tensor:
    """``values > threshold_otsu(values)`` (scikit-image), same shape, bool."""
    from skimage.filters import threshold_otsu

    array = values.detach().cpu().double().numpy()
    if float(array.max()) == float(array.min()):
        return torch.zeros(values.shape, dtype=torch.bool)
    return torch.from_numpy(array > threshold_otsu(array))


def dice(prediction: torch.Tensor, truth: torch.Tensor) -> float:
    """``2 |P ∩ T| / (|P| + |T|)`` of two bool masks (1 when both are empty)."""
    total = int(prediction.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int((prediction & truth).sum()) / total


def pixel_auroc(scores: torch.Tensor, truth: torch.Tensor) -> float:
    """Area under the ROC curve of per-pixel ``scores`` for the bool mask ``truth`` (Mann–Whitney U with
    average ranks for ties); NaN when either class is empty."""
    from ..metrics import average_ranks

    flat, positive = scores.detach().flatten().double().cpu(), truth.flatten().bool().cpu()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = average_ranks(flat)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
