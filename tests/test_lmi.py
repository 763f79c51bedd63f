"""Local-wise mutual information (``idm.medical.lmi``): a brute-force NumPy reference of the same
definition, finite-difference gradients, self-similarity, bounds and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from idm.errors import IDMError
from idm.medical.lmi import LocalMutualInformation


def reference_lmi(source: np.ndarray, target: np.ndarray, bins: int = 27, width: float = 0.5) -> np.ndarray:
    """LMI of two (H, W) images by loops over pixels and shifts (the module docstring's equations)."""
    centres = np.linspace(0.0, 1.0, bins)
    sigma = width / (bins - 1)

    def weights(values: np.ndarray) -> np.ndarray:  # (9,) -> (9, bins), rows sum to 1
        logits = -0.5 * ((values[:, None] - centres[None, :]) / sigma) ** 2
        w = np.exp(logits - logits.max(1, keepdims=True))
        return w / w.sum(1, keepdims=True)

    def entropy(p: np.ndarray) -> float:
        return float(-(p * np.log(p + 1e-10)).sum())

    s = np.pad(np.clip(source, 0, 1), 2, mode="edge")
    t = np.pad(np.clip(target, 0, 1), 2, mode="edge")
    h, w = source.shape
    out = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            a = weights(s[i + 1 : i + 4, j + 1 : j + 4].ravel())
            best = -np.inf
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    b = weights(t[i + 1 + dy : i + 4 + dy, j + 1 + dx : j + 4 + dx].ravel())
                    p_a, p_b, joint = a.mean(0), b.mean(0), a.T @ b / 9
                    h_a, h_b = entropy(p_a), entropy(p_b)
                    best = max(best, 2 * (h_a + h_b - entropy(joint)) / (h_a + h_b + 1e-10))
            out[i, j] = best
    return out


@pytest.mark.parametrize("bins, width", [(27, 0.5), (12, 0.3)])
def test_lmi_matches_the_brute_force_reference(bins: int, width: float) -> None:
    g = torch.Generator().manual_seed(0)
    source = torch.rand(2, 1, 7, 9, generator=g, dtype=torch.float64)
    target = (source + 0.3 * torch.rand(2, 1, 7, 9, generator=g, dtype=torch.float64)).clamp(0, 1)
    target[1] = torch.rand(7, 9, generator=g, dtype=torch.float64)
    source[1, 0, :4, :4] = 0.25  # constant patches: NMI 0
    lmi = LocalMutualInformation(bins, width)(source, target)
    for k in range(2):
        expected = reference_lmi(source[k, 0].numpy(), target[k, 0].numpy(), bins, width)
        np.testing.assert_allclose(lmi[k, 0].numpy(), expected, atol=1e-5)


def test_lmi_gradient_matches_finite_differences() -> None:
    g = torch.Generator().manual_seed(1)
    source = torch.rand(1, 1, 5, 6, generator=g, dtype=torch.float64) * 0.8 + 0.1
    target = (torch.rand(1, 1, 5, 6, generator=g, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    source.requires_grad_()
    lmi = LocalMutualInformation(bins=9, width=0.6)
    assert torch.autograd.gradcheck(lambda s, t: lmi(s, t).sum(), (source, target), eps=1e-6, atol=1e-5)


def test_lmi_of_an_image_with_itself_is_maximal() -> None:
    """NMI is at most 1; an image scores higher against itself than against noise, a blurred or
    gamma-distorted copy or another image (mean over pixels), and with a narrow kernel (a hard
    histogram in the limit) its own map approaches 1 wherever the patch spans several bins."""
    g = torch.Generator().manual_seed(2)
    y, x = torch.meshgrid(torch.linspace(0, 1, 40), torch.linspace(0, 1, 48), indexing="ij")
    image = (0.5 + 0.25 * torch.sin(9 * x) * torch.cos(7 * y) + 0.2 * (x > 0.5)).clamp(0, 1)[None, None]
    others = {"noise": torch.rand(image.shape, generator=g), "blur": torch.nn.functional.avg_pool2d(image, 3, 1, 1),
              "gamma": image**2, "other": image.flip(-1)}
    lmi = LocalMutualInformation()
    own = lmi(image, image)
    assert float(own.max()) <= 1 + 1e-6 and float(own.min()) >= -1e-6
    for name, other in others.items():
        assert float(own.mean()) > float(lmi(image, other).mean()), name
    sharp = LocalMutualInformation(width=0.1)(image, image)
    assert float(sharp.mean()) > 0.85


def test_lmi_works_on_any_size_and_batches_independently() -> None:
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(3, 2, 11, 5, generator=g), torch.rand(3, 2, 11, 5, generator=g)
    lmi = LocalMutualInformation()
    whole = lmi(a, b)
    assert whole.shape == (3, 2, 11, 5)
    torch.testing.assert_close(whole[1:2, 1:2], lmi(a[1:2, 1:2], b[1:2, 1:2]))


@pytest.mark.parametrize("source, target, message", [
    (torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 9), "one shape"),
    (torch.rand(8, 8), torch.rand(8, 8), "one shape"),
    (torch.full((1, 1, 8, 8), float("nan")), torch.rand(1, 1, 8, 8), "finite"),
])
def test_lmi_rejects_bad_images(source: torch.Tensor, target: torch.Tensor, message: str) -> None:
    with pytest.raises(IDMError, match=message):
        LocalMutualInformation()(source, target)


def test_lmi_rejects_bad_settings() -> None:
    with pytest.raises(IDMError, match="bins"):
        LocalMutualInformation(bins=1)
    with pytest.raises(IDMError, match="width"):
        LocalMutualInformation(width=0.0)
