"""Image-quality metrics with the compressed-sensing literature's conventions.

Inputs are gray images in [0, 1] (the luminance Y of 8-bit images), shape ``(B, C, H, W)`` or
``(C, H, W)``; both are clipped to [0, 1] first. Every function returns one value per image,
shape ``(B,)``.

* :func:`psnr` — PSNR with peak 255 on the 8-bit scale, ``10·log10(255² / MSE)`` with the MSE of
  the ×255 images (identical to peak 1 on [0, 1] data), computed in float64; identical images
  give ``inf``. Same values as ``skimage.metrics.peak_signal_noise_ratio(data_range=255)``.
  (``piq.psnr`` is not used: it adds 1e-8 to the MSE, capping PSNR at 80 dB.)
* :func:`ssim_skimage` — **the SSIM reported in tables** (``idm eval``'s ``ssim`` column):
  scikit-image ``structural_similarity`` with its defaults (7×7 uniform window, sample
  covariance) and ``data_range=255`` on ×255 images, as in the published CS tables (IDM paper).
  Runs on the CPU in float64, not differentiable.
* :func:`ssim` — Wang et al.'s SSIM with an 11×11 Gaussian window (σ = 1.5) via ``piq.ssim``
  (``data_range=1``, no downsampling, so images of every size are treated alike). Differentiable
  and on any device; use it for validation during training or as a loss. Its values differ
  slightly from :func:`ssim_skimage`.
"""

from __future__ import annotations

import piq
import torch

from .errors import IDMError

#: smallest image side accepted by :func:`ssim_skimage` (its 7×7 window)
SKIMAGE_WINDOW = 7
#: smallest image side accepted by :func:`ssim` (its 11×11 window)
GAUSSIAN_WINDOW = 11


def _prepare(
    x: torch.Tensor, ref: torch.Tensor, min_side: int = 1, metric: str = "metric"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both images as ``(B, C, H, W)``, clipped to [0, 1]; :class:`IDMError` on bad input."""
    for name, t in (("image", x), ("reference", ref)):
        if not isinstance(t, torch.Tensor):
            raise IDMError(f"{metric}: {name} must be a tensor, got {type(t).__name__}")
        if t.ndim not in (3, 4):
            raise IDMError(f"{metric}: {name} must have shape (B, C, H, W) or (C, H, W), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise IDMError(f"{metric}: {name} must be a real floating-point tensor in [0, 1], got dtype {t.dtype}")
    if x.shape != ref.shape:
        raise IDMError(f"{metric}: image shape {tuple(x.shape)} differs from reference shape {tuple(ref.shape)}")
    if x.numel() == 0:
        raise IDMError(f"{metric}: empty images of shape {tuple(x.shape)}")
    if min(x.shape[-2:]) < min_side:
        raise IDMError(
            f"{metric} needs images of at least {min_side}×{min_side} pixels (its window), got {tuple(x.shape[-2:])}"
        )
    for name, t in (("image", x), ("reference", ref)):
        if not bool(torch.isfinite(t).all()):
            raise IDMError(f"{metric}: {name} contains NaN or inf values")
    if x.ndim == 3:
        x, ref = x[None], ref[None]
    return x.clamp(0, 1), ref.clamp(0, 1)


def psnr(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """PSNR in dB with peak 255 on the 8-bit scale, per image: ``(B,)`` float64 (``inf`` if equal)."""
    x, ref = _prepare(x, ref, metric="psnr")
    device = "cpu" if x.device.type == "mps" else x.device  # MPS has no float64
    diff = (x.to(device, torch.float64) - ref.to(device, torch.float64)) * 255.0
    mse = diff.square().mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(255.0**2 / mse)


def ssim(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Gaussian-window SSIM (11×11, σ = 1.5, ``piq.ssim``, data_range 1) per image: ``(B,)``."""
    x, ref = _prepare(x, ref, GAUSSIAN_WINDOW, metric="ssim")
    if x.dtype not in (torch.float32, torch.float64):
        x, ref = x.float(), ref.float()
    return piq.ssim(x, ref, data_range=1.0, reduction="none", downsample=False)


def ssim_skimage(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """SSIM of the published CS tables: scikit-image ``structural_similarity`` (7×7 uniform
    window) with data_range 255 on ×255 images, per image: ``(B,)`` float64 on the CPU."""
    from skimage.metrics import structural_similarity

    x, ref = _prepare(x, ref, SKIMAGE_WINDOW, metric="ssim_skimage")
    images = x.detach().cpu().double().numpy() * 255.0
    refs = ref.detach().cpu().double().numpy() * 255.0
    channel_axis = 0 if images.shape[1] > 1 else None
    values = [
        structural_similarity(
            image if channel_axis is not None else image[0],
            reference if channel_axis is not None else reference[0],
            data_range=255.0,
            channel_axis=channel_axis,
        )
        for image, reference in zip(images, refs)
    ]
    return torch.tensor(values, dtype=torch.float64)


def nmi_skimage(x: torch.Tensor, ref: torch.Tensor, bins: int = 100) -> torch.Tensor:
    """Normalised mutual information of each image with its reference: scikit-image
    ``normalized_mutual_information`` (Studholme's ``(H(X) + H(Y)) / H(X, Y)``, on [1, 2]; 2 for
    images that determine each other) with ``bins`` histogram bins on [0, 1] data, per image: ``(B,)``
    float64 on the CPU (the translation bench's "MI" column)."""
    from skimage.metrics import normalized_mutual_information

    x, ref = _prepare(x, ref, 1, metric="nmi_skimage")
    images, refs = x.detach().cpu().double().numpy(), ref.detach().cpu().double().numpy()
    return torch.tensor([normalized_mutual_information(image, reference, bins=bins)
                         for image, reference in zip(images, refs)], dtype=torch.float64)


# --- uncertainty ---------------------------------------------------------------------------------
def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, ties sharing their average rank (float64)."""
    _, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    return ((ends - counts + 1 + ends) / 2)[inverse]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two equally sized tensors (flattened; average ranks for ties,
    as ``scipy.stats.spearmanr``); NaN when either is constant."""
    if a.numel() != b.numel() or a.numel() < 2:
        raise IDMError(f"spearman needs two tensors of the same size >= 2, got {a.numel()} and {b.numel()}")
    ra, rb = average_ranks(a.flatten().double()), average_ranks(b.flatten().double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denominator if denominator > 0 else float("nan")


def calibration_curve(std: torch.Tensor, error: torch.Tensor, bins: int = 10) -> list[dict[str, float]]:
    """Pixels binned by predicted std (``bins`` quantile bins): per bin the mean std, the RMSE of
    ``error`` and the pixel count — a calibrated uncertainty has RMSE ≈ std in every bin."""
    s, e = std.flatten().double(), error.flatten().double()
    if s.numel() != e.numel() or bins < 1:
        raise IDMError(f"calibration needs equally sized std and error and bins >= 1, got {s.numel()}, {e.numel()}, {bins}")
    order = torch.argsort(s)
    rows = []
    for chunk in torch.tensor_split(order, bins):
        if chunk.numel():
            rows.append({"std": float(s[chunk].mean()), "rmse": float(e[chunk].square().mean().sqrt()),
                         "pixels": int(chunk.numel())})
    return rows
