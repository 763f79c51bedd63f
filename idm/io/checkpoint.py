"""Model checkpoints and training states, stored as safetensors + JSON (never pickle).

A *checkpoint* is a directory::

    <name>/model.safetensors   the weights
    <name>/config.json         what the weights are for ("format": "idm-checkpoint-v1", ratio, ...)
    <name>/README.md           the model card

written atomically as a whole (:func:`idm.io.atomic.atomic_directory`). A *training state*
(:func:`save_state` / :func:`load_state`) is a single safetensors file holding an arbitrary nested
structure (model / EMA / optimizer / scheduler state dicts, step counters, RNG states) exactly.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from ..errors import IDMError
from .atomic import atomic_directory, atomic_path
from .tensorfile import cpu_tensors, read_safetensors

CHECKPOINT_FORMAT = "idm-checkpoint-v1"
STATE_FORMAT = "idm-state-v1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
#: environment variable naming extra folders (``os.pathsep``-separated) searched for checkpoints
CHECKPOINT_DIR_ENV = "IDM_CHECKPOINT_DIR"


# --- checkpoints ---------------------------------------------------------------------------
def save_checkpoint(
    directory: str | os.PathLike[str],
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    card: str,
    *,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a checkpoint directory atomically and return its path.

    Args:
        directory: the checkpoint directory (replaced as a whole if it exists).
        tensors: the weights, e.g. ``model.state_dict()``.
        config: JSON-serialisable description (architecture, ratio, ...); ``"format"`` is added.
        card: the model card (Markdown) saved as ``README.md``.
        dtype: storage dtype for floating-point tensors (e.g. ``torch.float16``); others unchanged.
    """
    directory = Path(directory)
    stored = cpu_tensors(tensors, dtype)
    config_text = json.dumps({**config, "format": CHECKPOINT_FORMAT}, indent=2, sort_keys=True) + "\n"
    with atomic_directory(directory) as temp:
        save_file(stored, str(temp / WEIGHTS_FILE), metadata={"format": "pt"})
        (temp / CONFIG_FILE).write_text(config_text, encoding="utf-8")
        (temp / CARD_FILE).write_text(card if card.endswith("\n") else card + "\n", encoding="utf-8")
    return directory


def _same_value(expected: Any, actual: Any) -> bool:
    """Equality for config values: numbers with a small tolerance, containers element-wise."""
    if isinstance(expected, bool) or isinstance(actual, bool):
        return expected is actual or (type(expected) is type(actual) and expected == actual)
    if isinstance(expected, (int, float)) and isinstance(actual, (int, float)):
        return math.isclose(float(expected), float(actual), rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple)):
        return len(expected) == len(actual) and all(_same_value(e, a) for e, a in zip(expected, actual))
    if isinstance(expected, dict) and isinstance(actual, dict):
        return expected.keys() == actual.keys() and all(_same_value(v, actual[k]) for k, v in expected.items())
    return expected == actual


def _mismatch_message(directory: Path, key: str, expected: Any, actual: Any) -> str:
    if key == "ratio":
        return f"checkpoint {directory} was trained for ratio {actual:g}, not {expected:g}"
    if key == "architecture":
        return f"architecture mismatch: expected {expected!r}, checkpoint {directory} has {actual!r}"
    return f"checkpoint {directory} has {key}={actual!r}, expected {expected!r}"


def read_checkpoint_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint directory (validated, weights not read)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise IDMError(f"checkpoint not found: {directory}")
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise IDMError(f"not an idm checkpoint: {directory} has no {CONFIG_FILE}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise IDMError(f"corrupt checkpoint config {config_path}: {error}") from None
    if not isinstance(config, dict) or config.get("format") != CHECKPOINT_FORMAT:
        found = config.get("format") if isinstance(config, dict) else None
        raise IDMError(f"not an idm checkpoint: {config_path} has format {found!r}, expected {CHECKPOINT_FORMAT!r}")
    return config


def load_checkpoint(
    directory: str | os.PathLike[str],
    *,
    expect: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`: ``(tensors, config)``.

    Args:
        directory: the checkpoint directory.
        expect: config entries the checkpoint must have, e.g. ``{"ratio": 0.1, "architecture":
            "idm"}`` (numbers compared with a relative tolerance of 1e-6); a difference raises
            :class:`IDMError` naming it.
        device: where the tensors are placed.
        dtype: dtype of the floating-point tensors returned (others keep theirs).
    """
    directory = Path(directory)
    config = read_checkpoint_config(directory)
    for key, expected in (expect or {}).items():
        if key not in config:
            raise IDMError(f"checkpoint {directory} does not record {key!r} (expected {expected!r})")
        if not _same_value(expected, config[key]):
            raise IDMError(_mismatch_message(directory, key, expected, config[key]))
    tensors, _ = read_safetensors(directory / WEIGHTS_FILE, "checkpoint")
    out = {
        key: tensor.to(device=device, dtype=dtype) if tensor.is_floating_point() else tensor.to(device)
        for key, tensor in tensors.items()
    }
    return out, config


def load_model(source: str | os.PathLike[str], architecture: str, build: Any,
               device: str | torch.device = "cpu") -> torch.nn.Module:
    """The network of the checkpoint ``source`` (a folder or a shipped name, :func:`resolve_checkpoint`)
    whose config records ``architecture``: ``build(config)`` makes the empty module, the weights are
    loaded (fp32) and it is returned on ``device`` in eval mode."""
    tensors, config = load_checkpoint(resolve_checkpoint(source), expect={"architecture": architecture}, device=device)
    model = build(config)
    model.load_state_dict(tensors)
    return model.to(device).eval()


def checkpoint_search_dirs() -> list[Path]:
    """Folders searched, in this order, for checkpoints named by a bare name such as ``"idm-multi"``:

    1. the folders listed in ``$IDM_CHECKPOINT_DIR`` (``os.pathsep``-separated; listed even if missing);
    2. the shipped checkpoints installed with the package: the package data ``idm/checkpoints``
       (found with :mod:`importlib.resources`) of a wheel, an sdist, ``pip install .`` or
       ``pip install git+...``;
    3. when ``idm`` is imported from a source checkout (editable install, ``PYTHONPATH``), the
       checkout's top-level ``checkpoints/`` folder, next to ``idm/`` and ``pyproject.toml``.
    """
    from importlib import resources

    dirs = [Path(p).expanduser() for p in os.environ.get(CHECKPOINT_DIR_ENV, "").split(os.pathsep) if p]
    package = resources.files("idm")  # a Path unless idm is imported from a zip (then neither applies)
    if isinstance(package, Path):
        if (package / "checkpoints").is_dir():  # 2. (an editable install has none here: 3. finds them)
            dirs.append(package / "checkpoints")
        checkout = package.resolve().parent  # 3. (pyproject.toml: a checkout, not site-packages)
        if (checkout / "pyproject.toml").is_file() and (checkout / "checkpoints").is_dir():
            dirs.append(checkout / "checkpoints")
    unique: list[Path] = []
    for folder in dirs:
        if folder not in unique:
            unique.append(folder)
    return unique


def available_checkpoints() -> list[str]:
    """Names of the checkpoint directories found in :func:`checkpoint_search_dirs`."""
    names: set[str] = set()
    for folder in checkpoint_search_dirs():
        if folder.is_dir():
            names.update(p.name for p in folder.iterdir() if (p / CONFIG_FILE).is_file())
    return sorted(names)


def resolve_checkpoint(name_or_path: str | os.PathLike[str]) -> Path:
    """Path of a checkpoint given as an existing path or as a bare name such as ``"prior-gray"``.

    A bare name is looked up in the folders of :func:`checkpoint_search_dirs` (``$IDM_CHECKPOINT_DIR``,
    then the shipped checkpoints); :class:`IDMError` lists the available names, the folders searched
    and where to put checkpoints when nothing is found.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    text = str(name_or_path)
    if os.sep not in text and "/" not in text:
        for folder in checkpoint_search_dirs():
            candidate = folder / text
            if candidate.exists():
                return candidate
        available = ", ".join(available_checkpoints()) or "none"
        searched = ", ".join(str(d) for d in checkpoint_search_dirs()) or "no folder"
        raise IDMError(f"checkpoint {text!r} not found (available: {available}; searched {searched}); "
                       f"put the checkpoint folder {text}/ (config.json, model.safetensors) in a folder named by "
                       f"the environment variable {CHECKPOINT_DIR_ENV}, or pass its path")
    raise IDMError(f"checkpoint not found: {path}")


#: tolerance of ratio comparisons (a ratio is rows / B², so equal ratios agree far closer than this)
RATIO_TOLERANCE = 1e-6


def in_ratio_range(ratio: float, band: list[float] | tuple[float, float]) -> bool:
    """Whether ``ratio`` lies in the ``[low, high]`` ``ratio_range`` of a multi-ratio checkpoint."""
    return float(band[0]) - RATIO_TOLERANCE <= float(ratio) <= float(band[1]) + RATIO_TOLERANCE


def shipped_checkpoint(family: str, ratio: float | None, train_hint: str) -> str:
    """Name of the checkpoint for sampling ``ratio``: ``{family}-cs{NN}`` (e.g. ``idm-cs10`` for 0.1)
    if there is one, else a multi-ratio ``{family}-*`` checkpoint whose ``ratio_range`` holds the
    ratio; :class:`IDMError` naming ``train_hint`` (how to train one) otherwise."""
    from ..errors import check_ratio

    if ratio is None:
        raise IDMError(f"method {family!r} needs the sampling ratio (to pick a shipped checkpoint) or --checkpoint")
    name = f"{family}-cs{round(check_ratio(ratio) * 100)}"
    try:
        resolve_checkpoint(name)
    except IDMError:
        pass
    else:
        return name
    for multi in available_checkpoints():  # a multi-ratio checkpoint of the family whose range holds the ratio
        if not multi.startswith(f"{family}-"):
            continue
        band = read_checkpoint_config(resolve_checkpoint(multi)).get("ratio_range")
        if band is not None and in_ratio_range(ratio, band):
            return multi
    raise IDMError(f"no shipped {family} checkpoint for ratio {float(ratio):g}; pass --checkpoint or train "
                   f"one with {train_hint} --ratio {float(ratio):g}")


#: operator parameters that change A and are fixed by training, per operator kind, with the value
#: assumed for a checkpoint that does not record one (written before the parameter was stored)
TRAINED_OPERATOR_PARAMETERS: dict[str, dict[str, Any]] = {
    "blockcs": {"block_size": 32, "matrix_seed": 0},
}
_PARAMETER_WORDS = {"block_size": ("block size", "--block-size"), "matrix_seed": ("matrix seed", "--matrix-seed")}


def check_trained_operator(name: str | os.PathLike[str], config: dict[str, Any], op: Any) -> None:
    """:class:`IDMError` unless the operator ``op`` measures as the checkpoint ``name`` (with
    ``config``) was trained to invert: a one-line message naming the checkpoint, the trained and
    the measured value of the first parameter that differs.

    Checked, in this order: the operator kind (``config["operator"]``, default ``"blockcs"``);
    for block CS the block size B and the matrix seed (both fix Φ, the q × B² matrix, and a network
    trained on one Φ silently fails on another); the sampling ratio (``config["ratio"]``, or for a
    multi-ratio checkpoint any ratio in its ``ratio_range``). MRI and CT checkpoints: the kind only
    (their ``trained_operator`` range is recorded, not enforced: the network's data consistency is
    exact for any mask, coil set or view count, so a real scan's own sampling can be reconstructed).

    Not checked: the permutation ``seed`` (training redraws the pixel permutation every step,
    ``step_operator`` in ``idm finetune``, so a checkpoint serves every permutation), the noise level and
    the image size. A checkpoint written before ``block_size`` / ``matrix_seed`` were recorded (key
    missing, or ``null``) is taken to use the values every checkpoint was trained with then, the
    defaults ``block_size=32`` and ``matrix_seed=0`` (:data:`TRAINED_OPERATOR_PARAMETERS`).
    """
    trained_kind = config.get("operator", "blockcs")
    if op.kind != trained_kind:
        raise IDMError(f"checkpoint {name} was trained for {trained_kind} measurements, got {op.kind}")
    measured_config = op.config()
    for key, default in TRAINED_OPERATOR_PARAMETERS.get(op.kind, {}).items():
        trained = default if config.get(key) is None else config[key]
        measured = measured_config.get(key)
        if measured != trained:
            words, option = _PARAMETER_WORDS.get(key, (key, f"--{key.replace('_', '-')}"))
            raise IDMError(f"checkpoint {name} was trained with {words} {trained}, the measurements have "
                           f"{words} {measured} (measure with {option} {trained})")
    if trained_kind in ("mri", "ct"):  # masks / view counts outside the trained range still work (exact data consistency)
        return
    measured = measured_config.get("ratio")
    if config.get("ratio_range") is not None:
        low, high = (float(r) for r in config["ratio_range"])
        if measured is None or not in_ratio_range(measured, (low, high)):
            raise IDMError(f"checkpoint {name} was trained for ratios in [{low:g}, {high:g}], "
                           f"the measurements have ratio {measured}")
        return
    if config.get("ratio") is None:
        raise IDMError(f"checkpoint {name} records neither the ratio nor the ratio range it was trained for")
    trained_ratio = float(config["ratio"])
    if measured is None or abs(float(measured) - trained_ratio) > RATIO_TOLERANCE:
        raise IDMError(f"checkpoint {name} was trained for ratio {trained_ratio:g}, the measurements have ratio {measured}")


def unique_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state dict with each tensor once (a module shared by several parents, such as
    IDM's U-Net used by every step, appears under its first name only), detached."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out[key] = tensor.detach()
    return out


def load_unique_state_dict(module: torch.nn.Module, tensors: dict[str, torch.Tensor], *, source: str,
                           what: str) -> None:
    """Load a :func:`unique_state_dict` into ``module``; :class:`IDMError` naming ``source`` and
    ``what`` (e.g. "the IDM network") on missing, unexpected or mis-shaped tensors."""
    full = module.state_dict(keep_vars=True)
    first: dict[int, str] = {}
    canonical = {key: first.setdefault(id(t), key) for key, t in full.items()}
    expected = set(first.values())
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise IDMError(
            f"{source} does not match {what} (missing {len(missing)} tensors e.g. {missing[:2]}, "
            f"unexpected {len(unexpected)} e.g. {unexpected[:2]})"
        )
    for key in expected:
        if tuple(tensors[key].shape) != tuple(full[key].shape):
            raise IDMError(f"{source}: tensor {key} has shape {tuple(tensors[key].shape)}, "
                           f"{what} expects {tuple(full[key].shape)}")
    module.load_state_dict({key: tensors[canonical[key]] for key in full})

# --- training states -----------------------------------------------------------------------
def _child(path: str, name: object) -> str:
    """Path-like name of an entry: ``model/conv.weight``, ``optimizer/state/0/exp_avg``."""
    return f"{path}/{name}" if path else str(name)


class _Flattener:
    """Turns a nested structure into a JSON skeleton plus a flat dict of tensors."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def _key(self, path: str) -> str:
        key = path or "root"
        count = 1
        while key in self.tensors:
            count += 1
            key = f"{path or 'root'}#{count}"
        return key

    def encode(self, value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            key = self._key(path)
            self.tensors[key] = value.detach().to("cpu").contiguous()
            return {"tensor": key}
        if isinstance(value, (np.ndarray, np.generic)):
            array = np.asarray(value)
            if array.dtype.hasobject:
                raise TypeError(f"cannot store numpy object array at {path or 'root'}")
            key = self._key(path)
            raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
            self.tensors[key] = torch.from_numpy(raw.copy())
            return {
                "ndarray": key,
                "dtype": array.dtype.str,
                "shape": list(array.shape),
                "scalar": isinstance(value, np.generic),
            }
        # Python scalars after numpy (np.float64 subclasses float and is kept as numpy above);
        # subclasses such as IntEnum are stored as their base type.
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, str):
            return str(value)
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return float(value)
        if isinstance(value, dict):
            items = value.items()
            return {"dict": [[self.encode(k, _child(path, "<key>")), self.encode(v, _child(path, k))] for k, v in items]}
        if isinstance(value, list):
            return {"list": [self.encode(v, _child(path, i)) for i, v in enumerate(value)]}
        if isinstance(value, tuple):
            return {"tuple": [self.encode(v, _child(path, i)) for i, v in enumerate(value)]}
        raise TypeError(f"cannot store a {type(value).__name__} at {path or 'root'} in a training state")


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, dict):
        if "tensor" in node:
            return tensors[node["tensor"]]
        if "ndarray" in node:
            raw = tensors[node["ndarray"]].numpy().tobytes()
            array = np.frombuffer(raw, dtype=np.dtype(node["dtype"])).reshape(node["shape"]).copy()
            return array[()] if node["scalar"] else array
        if "dict" in node:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in node["dict"]}
        if "list" in node:
            return [_decode(v, tensors) for v in node["list"]]
        if "tuple" in node:
            return tuple(_decode(v, tensors) for v in node["tuple"])
    raise ValueError(f"unknown node {node!r}")


def save_state(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Write a nested training state exactly, as one safetensors file (atomically).

    ``state`` may nest dicts (any hashable JSON-like keys: str, int, float, bool, None, tuples),
    lists and tuples of tensors, numpy arrays and scalars, ints, floats (incl. nan/inf), strings,
    bools and None. Tensors are stored on the CPU under path-like keys; the structure is kept as
    JSON in the file's metadata, so :func:`load_state` returns the same types (int dict keys,
    tuples, ...), as needed by ``optimizer.load_state_dict`` and the RNG ``setstate`` functions.
    """
    flattener = _Flattener()
    skeleton = flattener.encode(state, "")
    tensors = cpu_tensors(flattener.tensors)
    metadata = {"format": STATE_FORMAT, "skeleton": json.dumps(skeleton)}
    path = Path(path)
    with atomic_path(path) as temp:
        save_file(tensors, str(temp), metadata=metadata)
    return path


def load_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a training state written by :func:`save_state` (tensors on the CPU)."""
    path = Path(path)
    tensors, metadata = read_safetensors(path, "training state")
    if metadata.get("format") != STATE_FORMAT or "skeleton" not in metadata:
        raise IDMError(f"not an idm training state: {path} (format {metadata.get('format')!r})")
    try:
        return _decode(json.loads(metadata["skeleton"]), tensors)
    except (KeyError, ValueError, TypeError) as error:
        raise IDMError(f"corrupt training state file {path}: {error}") from None
