"""File formats: atomic writes, checkpoints, training states and measurement files.

Everything is safetensors + JSON (never pickle), and every output is written atomically.
"""

from .atomic import atomic_directory, atomic_path, atomic_write
from .checkpoint import (
    available_checkpoints,
    load_checkpoint,
    load_state,
    read_checkpoint_config,
    resolve_checkpoint,
    save_checkpoint,
    save_state,
)
from .measurement import Measurement, build_operator, load_measurement, save_measurement

__all__ = [
    "Measurement",
    "atomic_directory",
    "atomic_path",
    "atomic_write",
    "available_checkpoints",
    "build_operator",
    "load_checkpoint",
    "load_measurement",
    "load_state",
    "read_checkpoint_config",
    "resolve_checkpoint",
    "save_checkpoint",
    "save_measurement",
    "save_state",
]
