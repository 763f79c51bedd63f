"""Installation: the wheel carries the library and the shipped checkpoints (not the ``train/``
scripts) and works outside the checkout; the ``idm`` command imports only what the subcommand
being run needs."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: the package data shipped from the top-level checkpoints/ folder
SHIPPED = sorted(p.name for p in (ROOT / "checkpoints").iterdir() if (p / "config.json").is_file())


def _clean_environment(**extra: str) -> dict[str, str]:
    """The environment of a child interpreter that must not see the checkout (no PYTHONPATH, no
    extra checkpoint folder), one thread."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "IDM_CHECKPOINT_DIR")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _run(args: list[str], cwd: Path, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=_clean_environment(**env), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{args}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


# --- the command line imports lazily ------------------------------------------------------------
HEAVY = ("matplotlib", "accelerate", "idm.training")

HELP_SNIPPET = """
import contextlib, io, json, sys
from idm.cli import build_parser, main

def help_of(argv):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            main(argv)
        except SystemExit:
            pass
    return out.getvalue()

build_parser()
top = help_of(["--help"])
after_top = sorted(m for m in ("torch", *HEAVY) if m in sys.modules)
measure = help_of(["measure", "--help"])
after_measure = sorted(m for m in HEAVY if m in sys.modules)
print(json.dumps({"top": top, "after_top": after_top, "measure": measure, "after_measure": after_measure}))
"""


def test_idm_help_and_measure_help_import_no_heavy_module() -> None:
    """``idm --help`` imports neither torch nor matplotlib, accelerate or the training code (about
    0.1 s); ``idm measure --help`` imports torch but none of the others."""
    code = f"HEAVY = {HEAVY!r}\n" + HELP_SNIPPET
    result = json.loads(_run([sys.executable, "-c", code], cwd=ROOT).stdout)
    assert "finetune" in result["top"] and "measure" in result["top"]
    assert result["after_top"] == []
    assert "--ratio" in result["measure"]
    assert result["after_measure"] == []


def test_the_listed_help_is_each_subcommand_own() -> None:
    """:data:`idm.cli.SUBCOMMANDS` holds the help text ``idm --help`` shows without importing the
    modules; a subcommand's own parser must show the same text."""
    import argparse

    from idm.cli import SUBCOMMANDS, build_parser

    for name, (_, help_text) in SUBCOMMANDS.items():
        parser = build_parser(name)
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        shown = {choice.dest: choice.help for choice in action._choices_actions}
        assert shown[name] == help_text, name
        assert action.choices[name]._actions[1:], f"idm {name} got no options"  # more than -h


def test_pyproject_lists_every_package_and_ships_checkpoints_not_train() -> None:
    """``[tool.setuptools] packages`` is written out (it maps the top-level ``checkpoints/`` to the
    package data ``idm.checkpoints``): it must name every package folder under ``idm/``."""
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "idm").rglob("__init__.py")
             if "__pycache__" not in p.parts}
    assert set(config["packages"]) == found | {"idm.checkpoints"}
    assert config["package-dir"] == {"idm.checkpoints": "checkpoints"}
    assert not any(p == "train" or p.startswith("train.") for p in config["packages"])


# --- a real, non-editable installation -------------------------------------------------------------
RECONSTRUCT_SNIPPET = """
import importlib.metadata, json, sys
from pathlib import Path

import torch
import idm
from idm.data import sample_images
from idm.io.checkpoint import checkpoint_search_dirs, resolve_checkpoint
from idm.metrics import psnr
from idm.physics import BlockCS

x = sample_images(64)["camera"][None]
op = BlockCS(x.shape[2:], ratio=0.3, seed=0)
x_hat = op.crop(idm.reconstruct(op.measure(x), op, method="idm"))
tv = op.crop(idm.reconstruct(op.measure(x), op, method="tv"))
dist = importlib.metadata.distribution("idm")
print(json.dumps({
    "idm": idm.__file__,
    "training": __import__("idm.training.finetune").training.finetune.__file__,
    "checkpoint": str(resolve_checkpoint("idm-multi")),
    "search": [str(d) for d in checkpoint_search_dirs()],
    "shape": list(x_hat.shape),
    "psnr": float(psnr(x_hat, x)), "psnr_tv": float(psnr(tv, x)),
    "files": [str(f) for f in dist.files],
    "top_level": (dist.read_text("top_level.txt") or "").split(),
}))
"""


def test_wheel_installs_and_reconstructs_outside_the_checkout(tmp_path: Path) -> None:
    """Build a wheel from (a copy of) the checkout, install it with ``pip install --no-deps`` into a
    fresh virtual environment (``--system-site-packages``, plus this venv's packages when the tests
    run in one: torch and the other dependencies come from this interpreter), and, from a folder
    outside the checkout, reconstruct with the shipped ``idm-multi`` checkpoint found as package
    data; no top-level ``train`` package is installed. About 15 s on 2 busy CPU cores (the wheel
    build and a few interpreter starts), so not marked slow."""
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "wheels", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
        "data_cache", "idm-demo", "out"))
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
          str(source)], cwd=tmp_path)
    (wheel,) = wheels.glob("idm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"idm", wheel.name.split("-py")[0] + ".dist-info"}
    for name in SHIPPED:
        assert f"idm/checkpoints/{name}/model.safetensors" in names and f"idm/checkpoints/{name}/config.json" in names

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    if sys.prefix != sys.base_prefix:  # run from a venv: its packages are not the "system" ones, add them
        site_packages = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
        (site_packages / "outer.pth").write_text("\n".join(site.getsitepackages()) + "\n", encoding="utf-8")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
          str(wheel)], cwd=tmp_path)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = json.loads(_run([str(python), "-c", textwrap.dedent(RECONSTRUCT_SNIPPET)], cwd=elsewhere).stdout)
    installed = Path(result["idm"]).parents[1]  # the venv's site-packages
    assert Path(result["idm"]).is_relative_to(venv) and not Path(result["idm"]).is_relative_to(ROOT)
    assert Path(result["training"]).is_relative_to(venv)
    assert Path(result["checkpoint"]) == installed / "idm" / "checkpoints" / "idm-multi"
    assert all(not Path(d).is_relative_to(ROOT) for d in result["search"])
    assert result["shape"] == [1, 1, 64, 64]
    assert result["psnr"] > result["psnr_tv"]  # the learned network really ran
    assert result["top_level"] == ["idm"]
    assert not any(f.split("/")[0] == "train" for f in result["files"])
    assert not (installed / "train").exists()

    idm_command = venv / "bin" / "idm"
    assert "finetune" in _run([str(idm_command), "--help"], cwd=elsewhere).stdout
    missing = subprocess.run([str(idm_command), "sample", "--checkpoint", "no-such-prior", "-o", "g.png"],
                             cwd=elsewhere, env=_clean_environment(), capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "IDM_CHECKPOINT_DIR" in missing.stderr


def test_the_checkout_finds_the_shipped_checkpoints() -> None:
    """Run from the checkout (editable install or ``PYTHONPATH``) a bare name resolves to the
    top-level ``checkpoints/`` folder (or the same checkpoints installed as package data)."""
    from idm.io.checkpoint import available_checkpoints, checkpoint_search_dirs, resolve_checkpoint

    assert set(SHIPPED) <= set(available_checkpoints())
    path = resolve_checkpoint("idm-multi")
    assert (path / "model.safetensors").is_file()
    import idm

    if Path(idm.__file__).resolve().is_relative_to(ROOT):
        assert ROOT / "checkpoints" in [d.resolve() for d in checkpoint_search_dirs()]


def test_a_missing_checkpoint_says_where_to_put_it(monkeypatch, tmp_path) -> None:
    from idm.errors import IDMError
    from idm.io.checkpoint import resolve_checkpoint

    monkeypatch.setenv("IDM_CHECKPOINT_DIR", str(tmp_path))
    with pytest.raises(IDMError, match=r"checkpoint 'no-such' not found .*environment variable IDM_CHECKPOINT_DIR"):
        resolve_checkpoint("no-such")
