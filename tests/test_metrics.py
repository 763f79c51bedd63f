"""Tests for idm.metrics against known values, scikit-image and piq."""

from __future__ import annotations

import math

import numpy as np
import piq
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from idm.errors import IDMError
from idm.metrics import psnr, ssim, ssim_skimage


def pair(batch: int = 2, size: int = 32, noise: float = 0.05, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ref = torch.rand(batch, 1, size, size, generator=generator)
    x = (ref + noise * torch.randn(ref.shape, generator=generator)).clamp(0, 1)
    return x, ref


def test_psnr_of_a_known_mse():
    ref = torch.zeros(1, 1, 16, 16, dtype=torch.float64)  # float64 input is used as is
    x = torch.full_like(ref, 10 / 255)  # error of 10 grey levels: MSE = 100 on the 8-bit scale
    assert psnr(x, ref).item() == pytest.approx(10 * math.log10(255**2 / 100), abs=1e-9)
    half = ref.clone()
    half[..., :8, :] = 1.0  # MSE = 255²/2 → PSNR = 10·log10(2)
    assert psnr(half, ref).item() == pytest.approx(10 * math.log10(2), abs=1e-9)


def test_identical_images_give_inf_psnr_and_unit_ssim():
    x = torch.rand(3, 1, 24, 24)
    assert torch.isinf(psnr(x, x.clone())).all()
    torch.testing.assert_close(ssim(x, x.clone()), torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(ssim_skimage(x, x.clone()), torch.ones(3, dtype=torch.float64), atol=1e-12, rtol=0)


def test_psnr_matches_skimage_and_piq_per_image():
    x, ref = pair(batch=3)
    values = psnr(x, ref)
    assert values.shape == (3,) and values.dtype == torch.float64
    for i in range(3):
        expected = peak_signal_noise_ratio(ref[i, 0].double().numpy() * 255, x[i, 0].double().numpy() * 255, data_range=255)
        assert values[i].item() == pytest.approx(expected, abs=1e-4)
    torch.testing.assert_close(values.float(), piq.psnr(x * 255, ref * 255, data_range=255, reduction="none"), atol=1e-3, rtol=0)


def test_ssim_skimage_matches_structural_similarity_defaults():
    x, ref = pair(batch=2, size=40, noise=0.1, seed=1)
    values = ssim_skimage(x, ref)
    assert values.shape == (2,)
    for i in range(2):
        expected = structural_similarity(x[i, 0].double().numpy() * 255, ref[i, 0].double().numpy() * 255, data_range=255)
        assert values[i].item() == pytest.approx(expected, abs=1e-10)
    assert (values < 1).all() and (values > 0).all()


def test_ssim_is_piq_gaussian_ssim_and_differs_from_skimage_convention():
    x, ref = pair(batch=2, size=40, noise=0.1, seed=2)
    values = ssim(x, ref)
    torch.testing.assert_close(values, piq.ssim(x, ref, data_range=1.0, reduction="none", downsample=False))
    expected = [
        structural_similarity(
            x[i, 0].double().numpy(), ref[i, 0].double().numpy(), data_range=1.0,
            gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
        )
        for i in range(2)
    ]  # the Gaussian convention; skimage averages over a slightly different (cropped) region
    np.testing.assert_allclose(values.numpy(), expected, atol=0.02)
    assert not torch.allclose(values.double(), ssim_skimage(x, ref), atol=1e-3)


def test_ssim_is_differentiable():
    x, ref = pair(batch=1, size=16)
    x = x.clone().requires_grad_(True)
    ssim(x, ref).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_single_images_and_clipping():
    x, ref = pair(batch=1, size=20)
    assert psnr(x[0], ref[0]).shape == (1,)
    assert ssim_skimage(x[0], ref[0]).item() == pytest.approx(ssim_skimage(x, ref).item())
    over = ref.clone()
    over[..., 0, 0] = 1.7  # clipped to 1 before comparison
    clipped = ref.clone()
    clipped[..., 0, 0] = 1.0
    assert psnr(over, ref).item() == pytest.approx(psnr(clipped, ref).item())


def test_metric_errors():
    x, ref = pair(batch=1, size=16)
    with pytest.raises(IDMError, match="differs from reference shape"):
        psnr(x, ref[..., :8])
    with pytest.raises(IDMError, match="NaN or inf"):
        psnr(torch.full_like(ref, float("nan")), ref)
    with pytest.raises(IDMError, match="shape"):
        ssim(x[0, 0], ref[0, 0])
    with pytest.raises(IDMError, match="at least 7×7"):
        ssim_skimage(x[..., :6, :], ref[..., :6, :])
    with pytest.raises(IDMError, match="at least 11×11"):
        ssim(x[..., :10, :10], ref[..., :10, :10])
    with pytest.raises(IDMError, match="floating-point"):
        psnr((x * 255).to(torch.uint8), (ref * 255).to(torch.uint8))
