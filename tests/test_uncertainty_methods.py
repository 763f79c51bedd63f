"""Uncertainty beyond ``diffuserecon``: IDM's line-withholding std (``idm.network.method``,
:func:`idm.physics.mri.withhold_lines`) and the MRI side-by-side ``idm bench quality --operator mri``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from idm.cli import main
from idm.errors import IDMError
from idm.medical.mcddpm import MCDDPM, unet_config
from idm.physics import MRI, ParallelBeamCT
from idm.physics.mri import random_mask, withhold_lines
from idm.priors import UNet
from idm.registry import METHODS

from conftest import tiny_prior, tiny_unet_config

pytestmark = pytest.mark.usefixtures("one_thread")


def phantom(size: int = 32, seed: int = 0) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    magnitude = (1 - (xx**2 + 1.3 * yy**2)).clamp_min(0) + 0.2 * torch.cos(4 * xx + seed)
    return torch.polar(magnitude.abs(), 0.4 * yy)[None, None]


def test_withhold_lines_keeps_the_centre_and_draws_a_subset() -> None:
    mask = random_mask((12, 64), 4, seed=2)
    generator = torch.Generator().manual_seed(0)
    sub = withhold_lines(mask, 0.5, generator)
    assert bool((sub <= mask).all()) and bool((sub == sub[:1]).all())  # a subset, still 1D Cartesian
    assert int(sub[0].sum()) < int(mask[0].sum())
    centre = 32
    low = centre
    while mask[0, low - 1]:
        low -= 1
    assert bool(sub[0, low:centre + 1].all())  # the fully sampled centre run stays
    assert torch.equal(withhold_lines(mask, 1.0, generator), mask)
    with pytest.raises(IDMError, match="1D Cartesian"):
        withhold_lines(torch.rand(8, 8) > 0.5, 0.8, generator)
    with pytest.raises(IDMError, match=r"\(0, 1\]"):
        withhold_lines(mask, 0.0, generator)


def test_idm_uncertainty_is_seeded_and_reconstructs_from_all_lines() -> None:
    op = MRI((32, 32), acceleration=4, seed=1)
    y = op.A(phantom())
    method = METHODS.get("idm").build(samples=3, keep=0.7, seed=4)
    posterior = method.with_uncertainty(y, op)
    torch.testing.assert_close(posterior.x, method(y, op))  # the reconstruction uses every line
    assert posterior.std.shape == (1, 1, 32, 32) and float(posterior.std.max()) > 0
    again = METHODS.get("idm").build(samples=3, keep=0.7, seed=4).with_uncertainty(y, op)
    other = METHODS.get("idm").build(samples=3, keep=0.7, seed=5).with_uncertainty(y, op)
    assert torch.equal(posterior.std, again.std) and not torch.equal(posterior.std, other.std)
    ct = ParallelBeamCT((32, 32), views=10)
    with pytest.raises(IDMError, match="k-space lines"):
        method.with_uncertainty(ct.A(torch.rand(1, 1, 32, 32)), ct)
    with pytest.raises(IDMError, match="samples"):
        METHODS.get("idm").build(samples=1)


@pytest.fixture(scope="module")
def mri_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mri")
    np.save(folder / "a.npy", phantom(32, 0)[0, 0].numpy())
    magnitude = phantom(32, 1).abs()[0, 0].numpy()
    Image.fromarray((magnitude / magnitude.max() * 65535).astype(np.uint16)).save(folder / "b.png")
    return folder


def test_bench_quality_mri_side_by_side(mri_dir: Path, tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    unet = UNet(unet_config(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_levels=()))
    MCDDPM(unet).save(tmp_path / "mcddpm", "# tiny\n", dtype=None)
    tiny_prior(tiny_unet_config(), seed=1).save(tmp_path / "prior", "# tiny\n", dtype=None)
    code = main(["bench", "quality", "--operator", "mri", "--data", str(mri_dir), "--accelerations", "4", "8",
                 "--methods", "pinv", "ddnm", "mcddpm", "idm", "--checkpoint", f"mcddpm={tmp_path / 'mcddpm'}",
                 "--prior", str(tmp_path / "prior"), "--option", "ddnm.steps=2",
                 "--option", "mcddpm.samples=2", "--option", "mcddpm.steps=2", "--option", "idm.samples=2",
                 "--json", str(tmp_path / "q.json"), "--figure", str(tmp_path / "q.png")])
    assert code == 0, capsys.readouterr().err
    payload = json.loads((tmp_path / "q.json").read_text())
    assert payload["operator"] == "mri"
    rows = {(r["method"], r["acceleration"]): r for r in payload["rows"]}
    assert set(rows) == {(m, a) for m in ("pinv", "ddnm", "mcddpm", "idm") for a in (4.0, 8.0)}
    assert rows[("pinv", 4.0)]["spearman"] is None and rows[("ddnm", 8.0)]["spearman"] is None
    assert all(rows[(m, a)]["spearman"] is not None for m in ("mcddpm", "idm") for a in (4.0, 8.0))
    assert rows[("pinv", 4.0)]["psnr"] > rows[("pinv", 8.0)]["psnr"]
    with Image.open(tmp_path / "q.png") as figure:
        assert figure.size[0] > 300 and figure.size[1] > 600  # 3 rows per acceleration
    assert main(["bench", "quality", "--operator", "mri", "--data", str(mri_dir), "--accelerations", "0.5",
                 "--methods", "pinv"]) == 2
    assert "--accelerations" in capsys.readouterr().err
