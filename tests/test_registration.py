"""Deformable registration (idm.medical.registration): the spatial transformer, the measures, the
networks (DiffuseMorph and the VoxelMorph-style baseline) and their errors."""

from __future__ import annotations

import pytest
import torch

from idm.errors import IDMError
from idm.medical.registration import (FieldNet, Registration, RegistrationConfig, compose, endpoint_error,
                                      folding_fraction, jacobian_determinant, local_ncc, ncc, random_field, register,
                                      smoothness, training_loss, warp)


def _image(size=(32, 32), seed=0) -> torch.Tensor:
    """A smooth random image (2-D) or volume (3-D) of ``size``, ``(1, 1, *size)``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 1, *[max(s // 4, 2) for s in size], generator=g)
    mode = "bilinear" if len(size) == 2 else "trilinear"
    return torch.nn.functional.interpolate(x, size=size, mode=mode, align_corners=True)


@pytest.mark.parametrize("shape", [(2, 1, 17, 23), (1, 1, 6, 9, 11)])
def test_identity_field_leaves_the_image_unchanged(shape) -> None:
    image = torch.rand(shape)
    field = torch.zeros(shape[0], len(shape) - 2, *shape[2:])
    assert torch.allclose(warp(image, field), image, atol=1e-6)


@pytest.mark.parametrize("axis", [0, 1])
def test_a_known_shift_is_applied_by_the_spatial_transformer(axis) -> None:
    image = torch.rand(1, 1, 20, 24)
    field = torch.zeros(1, 2, 20, 24)
    field[:, axis] = 3.0  # sample 3 pixels further along the axis
    out = warp(image, field)
    expected = image[:, :, 3:, :] if axis == 0 else image[:, :, :, 3:]
    got = out[:, :, :-3, :] if axis == 0 else out[:, :, :, :-3]
    assert torch.allclose(got, expected, atol=1e-5)


def test_a_known_shift_in_3d() -> None:
    image = torch.rand(1, 1, 8, 9, 10)
    field = torch.zeros(1, 3, 8, 9, 10)
    field[:, 0] = 2.0
    assert torch.allclose(warp(image, field)[:, :, :-2], image[:, :, 2:], atol=1e-5)


def test_compose_of_two_shifts_is_their_sum() -> None:
    a, b = torch.zeros(1, 2, 16, 16), torch.zeros(1, 2, 16, 16)
    a[:, 0], b[:, 1] = 1.5, -2.0
    assert torch.allclose(compose(a, b)[:, :, 4:-4, 4:-4], (a + b)[:, :, 4:-4, 4:-4], atol=1e-5)


def test_jacobian_and_folding_on_constructed_fields() -> None:
    size = 16
    grid = torch.arange(size, dtype=torch.float32)
    stretch = torch.zeros(1, 2, size, size)
    stretch[:, 0] = 0.5 * grid[:, None]  # u_0 = x_0 / 2: det = 1.5 everywhere
    assert torch.allclose(jacobian_determinant(stretch), torch.full((1, size, size), 1.5), atol=1e-5)
    assert float(folding_fraction(stretch)) == 0.0
    flip = torch.zeros(1, 2, size, size)
    flip[:, 0, :, : size // 4] = -2.0 * grid[:, None]  # x_0 ↦ −x_0 on a quarter of the columns: det = −1 there
    assert float(folding_fraction(flip)) == pytest.approx(0.25)
    mask = torch.zeros(1, size, size, dtype=torch.bool)
    mask[:, :, size // 2:] = True
    assert float(folding_fraction(flip, mask)) == 0.0


def test_measures() -> None:
    a = _image()
    assert float(ncc(a, a)) == pytest.approx(1.0, abs=1e-6) and float(ncc(a, 1 - a)) == pytest.approx(-1.0, abs=1e-6)
    assert float(local_ncc(a, 2 * a + 1)) > 0.98 and float(local_ncc(a, _image(seed=1))) < 0.6
    u, v = torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 8)
    v[:, 0], v[:, 1] = 3.0, 4.0
    assert float(endpoint_error(u, v)) == pytest.approx(5.0)
    assert float(smoothness(v)) == 0.0 and float(smoothness(random_field((16, 16), amplitude=2.0))) > 0


def test_random_field_is_seeded_and_smooth() -> None:
    a = random_field((32, 32), amplitude=1.0, generator=torch.Generator().manual_seed(1))
    b = random_field((32, 32), amplitude=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (1, 2, 32, 32)
    assert float(folding_fraction(a)) == 0.0


def _perturbed(architecture: str, code_channels: int = 1, ndim: int = 2) -> Registration:
    torch.manual_seed(0)
    model = Registration(RegistrationConfig(architecture=architecture, features=(8, 8), base_channels=8,
                                            channel_mults=(1, 2), code_channels=code_channels, ndim=ndim)).eval()
    with torch.no_grad():  # make the outputs (zero-initialised heads) visibly non-zero
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


@pytest.mark.parametrize("size", [(20, 28), (6, 10, 7)])
@pytest.mark.parametrize("passes", [1, 2])
@pytest.mark.parametrize(("architecture", "code_channels"), [("ddm", 1), ("ddm", 4), ("voxelmorph", 1)])
def test_gamma_zero_is_the_identity_and_registration_is_deterministic(architecture, code_channels, passes, size) -> None:
    """Slices and volumes (the same code, ndim = 3): γ = 0 is exactly the identity, seeded runs repeat."""
    model = _perturbed(architecture, code_channels, ndim=len(size))
    moving, fixed = _image(size, 0), _image(size, 1)  # not multiples of the network's: padded
    warped, fields = register(model, moving, fixed, gammas=[0.0, 0.5, 1.0], passes=passes)
    assert torch.equal(fields[0], torch.zeros_like(fields[0])) and torch.allclose(warped[0], moving, atol=1e-6)
    assert fields[2].shape == (1, len(size), *size) and float(fields[2].abs().max()) > 0
    again = register(model, moving, fixed, gammas=[0.0, 0.5, 1.0], passes=passes)[1]
    assert all(torch.equal(x, y) for x, y in zip(fields, again))


@pytest.mark.parametrize("architecture", ["ddm", "voxelmorph"])
def test_a_cascade_composes_the_passes(architecture) -> None:
    """passes = 2: the second pass registers the once-warped image, and the result is the composition
    u₁ ∘ u₂ (u(x) = u₂(x) + u₁(x + u₂(x))); warping by it equals warping twice, up to interpolation."""
    model = _perturbed(architecture)
    moving, fixed = _image((32, 32), 0), _image((32, 32), 1)
    first = register(model, moving, fixed, passes=1)[1][0]
    second = register(model, warp(moving, first), fixed, passes=1)[1][0]
    cascade = register(model, moving, fixed, passes=2)[1][0]
    assert torch.allclose(cascade, compose(first, second), atol=1e-5)
    assert not torch.allclose(cascade, first, atol=1e-3)
    twice = warp(warp(moving, first), second)
    assert float((warp(moving, cascade) - twice).abs().mean()) < 0.02
    with pytest.raises(IDMError, match="passes"):
        register(model, moving, fixed, passes=0)


def test_training_reduces_the_loss_on_a_shifted_pair() -> None:
    torch.manual_seed(0)
    model = Registration(RegistrationConfig(architecture="voxelmorph", features=(8, 8)))
    moving = _image((32, 32))
    fixed = warp(moving, random_field((32, 32), amplitude=2.0, generator=torch.Generator().manual_seed(0)))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss, parts = training_loss(model, moving, fixed, weight=1.0, smooth=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.02 and set(parts) == {"ncc", "smooth"}


def test_ddm_loss_has_the_noise_term_and_is_seeded() -> None:
    torch.manual_seed(0)
    model = Registration(RegistrationConfig(features=(8, 8), base_channels=8, channel_mults=(1, 2)))
    m, f = _image((16, 16)), _image((16, 16), 1)
    a = training_loss(model, m, f, weight=20.0, smooth=1.0, generator=torch.Generator().manual_seed(3))
    b = training_loss(model, m, f, weight=20.0, smooth=1.0, generator=torch.Generator().manual_seed(3))
    assert set(a[1]) == {"eps", "ncc", "smooth"} and torch.equal(a[0], b[0])


def test_global_ncc_term_adds_the_global_similarity() -> None:
    """β > 0 adds −λβ·NCC(M∘φ, F) (global) to the loss and reports it; β = 0 is the paper's loss unchanged."""
    torch.manual_seed(0)
    model = Registration(RegistrationConfig(architecture="voxelmorph", features=(8, 8)))
    m, f = _image((16, 16)), _image((16, 16), 1)
    plain, parts = training_loss(model, m, f, weight=20.0, smooth=1.0)
    zero, _ = training_loss(model, m, f, weight=20.0, smooth=1.0, global_ncc=0.0)
    both, with_global = training_loss(model, m, f, weight=20.0, smooth=1.0, global_ncc=0.5)
    assert "global_ncc" not in parts and torch.equal(plain, zero)
    assert with_global["global_ncc"] == pytest.approx(float(ncc(warp(m, model(m, f)), f)), abs=1e-5)
    assert float(both) == pytest.approx(float(plain) - 20.0 * 0.5 * with_global["global_ncc"], abs=1e-4)


def test_bad_inputs_give_one_line_errors() -> None:
    model = Registration(RegistrationConfig(architecture="voxelmorph", features=(8,)))
    with pytest.raises(IDMError, match="moving image is"):
        register(model, torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 20))
    with pytest.raises(IDMError, match=r"\(B, 1, H, W\)"):
        register(model, torch.rand(16, 16), torch.rand(16, 16))
    with pytest.raises(IDMError, match="NaN"):
        register(model, torch.full((1, 1, 8, 8), float("nan")), torch.rand(1, 1, 8, 8))
    with pytest.raises(IDMError, match="registers 2-D slices, got 3-D volumes"):
        register(model, torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8))
    volumes = Registration(RegistrationConfig(architecture="voxelmorph", features=(8,), ndim=3))
    with pytest.raises(IDMError, match="registers 3-D volumes, got 2-D slices"):
        register(volumes, torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))
    with pytest.raises(IDMError, match="2-D or 3-D"):
        RegistrationConfig(ndim=1)
    with pytest.raises(IDMError, match="displacement"):
        warp(torch.rand(1, 1, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(IDMError, match="architecture"):
        RegistrationConfig(architecture="syn")
    with pytest.raises(IDMError, match="code_channels"):
        RegistrationConfig(code_channels=0)
    with pytest.raises(IDMError, match="2-D or 3-D"):
        FieldNet(ndim=4)
