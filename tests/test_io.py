"""Tests for idm.io: atomic writes, checkpoints, training states and measurement files."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from idm.errors import IDMError
from idm.io import (
    Measurement,
    atomic_directory,
    atomic_write,
    build_operator,
    load_checkpoint,
    load_measurement,
    load_state,
    resolve_checkpoint,
    save_checkpoint,
    save_measurement,
    save_state,
)


class Boom(RuntimeError):
    pass


# --- atomic writes -------------------------------------------------------------------------
def test_atomic_write_writes_and_replaces(tmp_path):
    path = tmp_path / "sub" / "out.txt"
    with atomic_write(path, "w") as handle:
        handle.write("first")
    with atomic_write(path, "w") as handle:
        handle.write("second")
    assert path.read_text() == "second"
    assert [p.name for p in path.parent.iterdir()] == ["out.txt"]


def test_atomic_write_leaves_nothing_when_the_writer_raises(tmp_path):
    path = tmp_path / "out.bin"
    with pytest.raises(Boom):
        with atomic_write(path) as handle:
            handle.write(b"partial")
            raise Boom
    assert list(tmp_path.iterdir()) == []
    path.write_bytes(b"old")
    with pytest.raises(Boom):
        with atomic_write(path) as handle:
            handle.write(b"new but partial")
            raise Boom
    assert path.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [path]


def test_atomic_directory_replaces_whole_directory(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    with atomic_directory(target) as temp:
        assert temp != target and temp.parent == tmp_path
        (temp / "new.txt").write_text("new")
        assert (target / "stale.txt").exists()  # nothing visible until the end
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_atomic_directory_keeps_the_old_directory_when_the_writer_raises(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "model.txt").write_text("old")
    with pytest.raises(Boom):
        with atomic_directory(target) as temp:
            (temp / "model.txt").write_text("half")
            raise Boom
    assert (target / "model.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    with pytest.raises(Boom):
        with atomic_directory(tmp_path / "fresh") as temp:
            raise Boom
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


# --- checkpoints ---------------------------------------------------------------------------
def weights() -> dict[str, torch.Tensor]:
    return {
        "conv.weight": torch.randn(4, 2, 3, 3),
        "conv.bias": torch.randn(4),
        "steps": torch.arange(3),
        "view": torch.randn(5, 5)[1:3],  # a view into a larger storage
    }


def test_checkpoint_round_trip(tmp_path):
    tensors = weights()
    tensors["alias"] = tensors["conv.bias"]  # tied weights share memory
    config = {"architecture": "idm", "ratio": 0.1, "block_size": 32}
    path = save_checkpoint(tmp_path / "ck", tensors, config, "# Model card\nTrained on nothing.")
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    stored = json.loads((path / "config.json").read_text())
    assert stored == {**config, "format": "idm-checkpoint-v1"}
    assert (path / "README.md").read_text().startswith("# Model card")
    loaded, loaded_config = load_checkpoint(path, expect={"ratio": 0.1, "architecture": "idm"})
    assert loaded_config == stored
    assert loaded.keys() == tensors.keys()
    for key, value in tensors.items():
        assert torch.equal(loaded[key], value), key
        assert loaded[key].dtype == value.dtype


def test_checkpoint_fp16_storage_and_dtype_on_load(tmp_path):
    tensors = weights()
    path = save_checkpoint(tmp_path / "half", tensors, {"architecture": "unet"}, "card", dtype=torch.float16)
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as handle:
        assert handle.get_tensor("conv.weight").dtype == torch.float16
        assert handle.get_tensor("steps").dtype == torch.int64  # integers untouched
    loaded, _ = load_checkpoint(path)
    assert loaded["conv.weight"].dtype == torch.float32
    torch.testing.assert_close(loaded["conv.weight"], tensors["conv.weight"], atol=2e-3, rtol=1e-3)
    assert torch.equal(loaded["steps"], tensors["steps"])
    as_half, _ = load_checkpoint(path, dtype=torch.float16)
    assert as_half["conv.bias"].dtype == torch.float16


def test_checkpoint_mismatch_errors(tmp_path):
    path = save_checkpoint(tmp_path / "ck", weights(), {"architecture": "idm", "ratio": 0.1, "steps": 3}, "card")
    load_checkpoint(path, expect={"ratio": 0.1 + 1e-12, "steps": 3.0})  # within tolerance
    with pytest.raises(IDMError, match=r"was trained for ratio 0.1, not 0.3"):
        load_checkpoint(path, expect={"ratio": 0.3})
    with pytest.raises(IDMError, match=r"architecture mismatch: expected 'unet', checkpoint .* has 'idm'"):
        load_checkpoint(path, expect={"architecture": "unet"})
    with pytest.raises(IDMError, match=r"has steps=3, expected 5"):
        load_checkpoint(path, expect={"steps": 5})
    with pytest.raises(IDMError, match=r"does not record 'channels'"):
        load_checkpoint(path, expect={"channels": 1})


def test_checkpoint_missing_and_corrupt(tmp_path):
    with pytest.raises(IDMError, match="checkpoint not found: .*nothing"):
        load_checkpoint(tmp_path / "nothing")
    path = save_checkpoint(tmp_path / "ck", weights(), {"architecture": "idm"}, "card")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) - 10])
    with pytest.raises(IDMError, match="corrupt checkpoint file .*model.safetensors"):
        load_checkpoint(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(IDMError, match="checkpoint not found: .*model.safetensors"):
        load_checkpoint(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(IDMError, match="corrupt checkpoint config"):
        load_checkpoint(path)
    (path / "config.json").write_text(json.dumps({"architecture": "idm"}))
    with pytest.raises(IDMError, match="not an idm checkpoint"):
        load_checkpoint(path)


def test_resolve_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "store" / "prior-gray", weights(), {"architecture": "unet"}, "card")
    monkeypatch.setenv("IDM_CHECKPOINT_DIR", str(tmp_path / "store"))
    assert resolve_checkpoint("prior-gray") == tmp_path / "store" / "prior-gray"
    assert resolve_checkpoint(tmp_path / "store" / "prior-gray") == tmp_path / "store" / "prior-gray"
    with pytest.raises(IDMError, match=r"checkpoint 'prior-rgb' not found \(available: .*prior-gray"):
        resolve_checkpoint("prior-rgb")
    with pytest.raises(IDMError, match="checkpoint not found: .*missing/dir"):
        resolve_checkpoint(str(tmp_path / "missing" / "dir"))


# --- training states -----------------------------------------------------------------------
def assert_same(a, b, where="root"):
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), where
        for (ka, va), kb in zip(a.items(), b.keys()):
            assert type(ka) is type(kb), f"{where}: key {ka!r}"
            assert_same(va, b[kb], f"{where}/{ka}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (va, vb) in enumerate(zip(a, b)):
            assert_same(va, vb, f"{where}/{i}")
    elif isinstance(a, float) and a != a:
        assert b != b, where
    else:
        assert a == b, where


def test_state_round_trip_is_exact(tmp_path):
    random.seed(5)
    np.random.seed(5)
    state = {
        "step": 1234,
        "lr": 1e-4 / 3,
        "flags": [True, False, None],
        "name": "run / with: symbols",
        "special": [float("inf"), float("-inf"), float("nan")],
        "big": 2**100,
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state(),
        "numpy_generator": np.random.default_rng(3).bit_generator.state,
        "numpy_scalar": np.float32(0.25),
        "torch_rng": torch.get_rng_state(),
        "mixed_keys": {0: "int", "0": "str", 1.5: "float", (1, 2): "tuple", None: "none", True: "bool"},
        "tensors": {"half": torch.randn(3).half(), "bool": torch.tensor([True, False]), "empty": torch.zeros(0, 4),
                    "scalar": torch.tensor(2.5), "complex": torch.randn(2, dtype=torch.complex64)},
        "nested": ({"a": [torch.ones(2), (3, "x")]},),
        "empty": {"list": [], "dict": {}, "tuple": ()},
    }
    save_state(tmp_path / "state.safetensors", state)
    loaded = load_state(tmp_path / "state.safetensors")
    assert_same(state, loaded)
    random.setstate(loaded["python_rng"])
    np.random.set_state(loaded["numpy_rng"])
    expected_py, expected_np = random.random(), np.random.rand()
    random.setstate(state["python_rng"])
    np.random.set_state(state["numpy_rng"])
    assert (random.random(), np.random.rand()) == (expected_py, expected_np)


def test_state_round_trip_of_a_model_and_adam_optimizer(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.8, 0.95))
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[2, 4], gamma=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()
        optimizer.step()
        scheduler.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": 3}
    save_state(tmp_path / "train.safetensors", state)
    loaded = load_state(tmp_path / "train.safetensors")
    assert_same(state["optimizer"], loaded["optimizer"])

    fresh_model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    fresh_optimizer = torch.optim.Adam(fresh_model.parameters(), lr=1.0)
    fresh_scheduler = torch.optim.lr_scheduler.MultiStepLR(fresh_optimizer, milestones=[9], gamma=0.1)
    fresh_model.load_state_dict(loaded["model"])
    fresh_optimizer.load_state_dict(loaded["optimizer"])
    fresh_scheduler.load_state_dict(loaded["scheduler"])
    assert_same(optimizer.state_dict(), fresh_optimizer.state_dict())
    # both continue identically
    batch = torch.randn(8, 4)
    for m, o in ((model, optimizer), (fresh_model, fresh_optimizer)):
        o.zero_grad()
        m(batch).square().mean().backward()
        o.step()
    for a, b in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(a, b)


def test_state_errors(tmp_path):
    with pytest.raises(IDMError, match="training state not found"):
        load_state(tmp_path / "missing.safetensors")
    save_state(tmp_path / "s.safetensors", {"x": torch.ones(100)})
    data = (tmp_path / "s.safetensors").read_bytes()
    (tmp_path / "s.safetensors").write_bytes(data[:-50])
    with pytest.raises(IDMError, match="corrupt training state file"):
        load_state(tmp_path / "s.safetensors")
    save_file({"x": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(IDMError, match="not an idm training state"):
        load_state(tmp_path / "plain.safetensors")
    with pytest.raises(TypeError, match="cannot store a object at bad in a training state"):
        save_state(tmp_path / "bad.safetensors", {"bad": object()})
    assert not (tmp_path / "bad.safetensors").exists()


# --- measurement files ---------------------------------------------------------------------
def blockcs_operator():
    from idm.physics import BlockCS

    return BlockCS((40, 36), ratio=0.25, block_size=8, seed=3, matrix_seed=1)


def test_measurement_round_trip_blockcs(tmp_path):
    op = blockcs_operator()
    x = torch.rand(2, 1, 40, 36)
    y = op.measure(x)
    path = save_measurement(tmp_path / "m.safetensors", y, op, names=["a", "b"], extra={"source": "test"})
    meas = load_measurement(path)
    assert isinstance(meas, Measurement)
    assert torch.equal(meas.y, y)
    assert meas.operator_config == op.config() and meas.names == ["a", "b"] and meas.extra == {"source": "test"}
    rebuilt = build_operator(meas)
    assert rebuilt.config() == op.config()
    assert torch.equal(rebuilt.A(op.pad(x)), op.A(op.pad(x)))


def test_measurement_round_trip_with_operator_tensors(tmp_path):
    from idm.physics import Inpainting

    mask = torch.rand(12, 10) > 0.5
    op = Inpainting((12, 10), mask=mask)
    y = op.measure(torch.rand(1, 1, 12, 10))
    meas = load_measurement(save_measurement(tmp_path / "m.safetensors", y, op))
    assert meas.names == ["0"] and set(meas.operator_tensors) == {"mask"}
    assert torch.equal(meas.operator_tensors["mask"], mask)
    assert torch.equal(build_operator(meas).mask, mask)


def test_measurement_errors(tmp_path):
    op = blockcs_operator()
    y = op.measure(torch.rand(1, 1, 40, 36))
    with pytest.raises(IDMError, match="measurement not found"):
        load_measurement(tmp_path / "none.safetensors")
    with pytest.raises(IDMError, match="2 names given for a batch of 1"):
        save_measurement(tmp_path / "m.safetensors", y, op, names=["a", "b"])
    assert not (tmp_path / "m.safetensors").exists()
    path = save_measurement(tmp_path / "m.safetensors", y, op)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-7])
    with pytest.raises(IDMError, match="corrupt measurement file"):
        load_measurement(tmp_path / "cut.safetensors")
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(IDMError, match="corrupt measurement file"):
        load_measurement(tmp_path / "text.safetensors")
    save_file({"y": y}, str(tmp_path / "foreign.safetensors"), metadata={"format": "pt"})
    with pytest.raises(IDMError, match="not an idm measurement file"):
        load_measurement(tmp_path / "foreign.safetensors")
    metadata = {"format": "idm-measurement-v1", "operator": json.dumps(op.config()), "names": "[]", "extra": "{}"}
    save_file({"x": y}, str(tmp_path / "no_y.safetensors"), metadata=metadata)
    with pytest.raises(IDMError, match="holds no measurements 'y'"):
        load_measurement(tmp_path / "no_y.safetensors")
    save_file({"y": y}, str(tmp_path / "no_op.safetensors"), metadata={**metadata, "operator": "{oops", "names": '["a"]'})
    with pytest.raises(IDMError, match="corrupt 'operator' metadata"):
        load_measurement(tmp_path / "no_op.safetensors")
    # y of the wrong shape for its operator: caught when the operator is rebuilt
    other = blockcs_operator().with_image_size((16, 16))
    save_file({"y": y}, str(tmp_path / "shape.safetensors"), metadata={**metadata, "operator": json.dumps(other.config()), "names": '["a"]'})
    meas = load_measurement(tmp_path / "shape.safetensors")
    with pytest.raises(IDMError, match="do not match the operator"):
        build_operator(meas)
    bad_kind = Measurement(y=y, operator_config={"kind": "warp-drive"})
    with pytest.raises(IDMError, match="warp-drive"):
        build_operator(bad_kind)


def test_shipped_checkpoints_resolve_by_name_wherever_they_are_installed():
    """A shipped checkpoint resolves by its bare name to a checkpoint folder of that name (source
    tree or package data: where it lives is not pinned here)."""
    from idm.io.checkpoint import available_checkpoints, read_checkpoint_config

    path = resolve_checkpoint("prior-gray")
    assert path.name == "prior-gray" and (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert read_checkpoint_config(path)["architecture"] == "unet"
    assert "prior-gray" in available_checkpoints()


def test_checkpoint_dir_env_is_searched_first(tmp_path, monkeypatch):
    """``$IDM_CHECKPOINT_DIR`` (several folders, ``os.pathsep``-separated) comes before the shipped
    checkpoints: a folder there shadows a shipped one of the same name."""
    import os

    from idm.io.checkpoint import available_checkpoints, checkpoint_search_dirs

    first, second = tmp_path / "first", tmp_path / "second"
    save_checkpoint(second / "prior-gray", weights(), {"architecture": "mine"}, "card")
    save_checkpoint(second / "only-here", weights(), {"architecture": "mine"}, "card")
    monkeypatch.setenv("IDM_CHECKPOINT_DIR", os.pathsep.join([str(first), str(second)]))
    assert checkpoint_search_dirs()[:2] == [first, second]
    assert resolve_checkpoint("prior-gray") == second / "prior-gray"
    assert resolve_checkpoint("only-here") == second / "only-here"
    assert {"prior-gray", "only-here"} <= set(available_checkpoints())
