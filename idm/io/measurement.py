"""The measurement file: compressed measurements plus everything needed to reconstruct them.

One safetensors file (the "codec" output of ``idm measure``)::

    y            the measurements, shape operator.measurement_shape(B, C); complex (MRI k-space,
                 complex64) is stored as such: safetensors holds complex dtypes natively
    op.<name>    the operator's own tensors (sampling masks, trajectories, ...), if any
    metadata:    format   = "idm-measurement-v1"
                 operator = JSON of operator.config()   (kind, image_size, ratio, seed, ...)
                 names    = JSON list of B image names
                 extra    = JSON dict of anything else (source files, original sizes, ...)

:func:`build_operator` rebuilds the operator with :func:`idm.physics.make_operator` and checks
that ``y`` has the shape that operator produces.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from ..errors import IDMError
from .atomic import atomic_path
from .tensorfile import cpu_tensors, read_safetensors

if TYPE_CHECKING:
    from ..physics.base import LinearOperator

MEASUREMENT_FORMAT = "idm-measurement-v1"
_OP_PREFIX = "op."


@dataclass
class Measurement:
    """The content of a measurement file.

    Attributes:
        y: measurements ``(B, C, ...)`` on the CPU.
        operator_config: ``operator.config()`` of the operator that produced ``y``.
        operator_tensors: the operator's tensors (``operator.tensors()``), possibly empty.
        names: one name per batch entry (e.g. the source file stems).
        extra: free-form JSON metadata.
    """

    y: torch.Tensor
    operator_config: dict[str, Any]
    operator_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def save_measurement(
    path: str | os.PathLike[str],
    y: torch.Tensor,
    operator: "LinearOperator",
    *,
    names: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write measurements ``y`` of ``operator`` to a measurement file (atomically).

    Args:
        path: output file (conventionally ``*.safetensors``).
        y: measurements of shape ``operator.measurement_shape(B, C)``.
        operator: the operator that produced ``y``.
        names: ``B`` names (default ``["0", "1", ...]``).
        extra: JSON-serialisable extra metadata.
    """
    if not isinstance(y, torch.Tensor) or y.ndim < 2:
        raise IDMError(f"measurements must be a tensor of shape (B, C, ...), got {getattr(y, 'shape', type(y))}")
    batch = y.shape[0]
    names = [str(i) for i in range(batch)] if names is None else [str(n) for n in names]
    if len(names) != batch:
        raise IDMError(f"{len(names)} names given for a batch of {batch} measurements")
    op_tensors = getattr(operator, "tensors", dict)()
    tensors = {"y": y, **{_OP_PREFIX + key: value for key, value in op_tensors.items()}}
    metadata = {
        "format": MEASUREMENT_FORMAT,
        "operator": json.dumps(operator.config(), sort_keys=True),
        "names": json.dumps(names),
        "extra": json.dumps(extra or {}, sort_keys=True),
    }
    path = Path(path)
    with atomic_path(path) as temp:
        save_file(cpu_tensors(tensors), str(temp), metadata=metadata)
    return path


def _json_field(metadata: dict[str, str], key: str, kind: type, path: Path) -> Any:
    try:
        value = json.loads(metadata[key])
    except KeyError:
        raise IDMError(f"measurement file {path} lacks its {key!r} metadata") from None
    except json.JSONDecodeError:
        raise IDMError(f"measurement file {path} has corrupt {key!r} metadata") from None
    if not isinstance(value, kind):
        raise IDMError(f"measurement file {path}: {key!r} metadata must be a {kind.__name__}")
    return value


def load_measurement(path: str | os.PathLike[str]) -> Measurement:
    """Read a measurement file written by :func:`save_measurement`.

    Raises :class:`IDMError` for a missing, corrupt or foreign file (not an idm measurement file,
    no ``y``). The shape of ``y`` is checked against the operator by :func:`build_operator`.
    """
    path = Path(path)
    tensors, metadata = read_safetensors(path, "measurement")
    if metadata.get("format") != MEASUREMENT_FORMAT:
        raise IDMError(
            f"not an idm measurement file: {path} has format {metadata.get('format')!r}, "
            f"expected {MEASUREMENT_FORMAT!r}"
        )
    if "y" not in tensors:
        raise IDMError(f"measurement file {path} holds no measurements 'y'")
    y = tensors["y"]
    config = _json_field(metadata, "operator", dict, path)
    if "kind" not in config:
        raise IDMError(f"measurement file {path}: operator description has no 'kind'")
    names = _json_field(metadata, "names", list, path)
    if y.ndim < 2 or len(names) != y.shape[0]:
        raise IDMError(f"measurement file {path}: {len(names)} names for measurements of shape {tuple(y.shape)}")
    extra = _json_field(metadata, "extra", dict, path)
    op_tensors = {k[len(_OP_PREFIX):]: v for k, v in tensors.items() if k.startswith(_OP_PREFIX)}
    return Measurement(y=y, operator_config=config, operator_tensors=op_tensors, names=names, extra=extra)


def build_operator(measurement: Measurement) -> "LinearOperator":
    """The operator described by a measurement file, checked against the shape of its ``y``."""
    from ..physics import make_operator

    try:
        operator = make_operator(measurement.operator_config, measurement.operator_tensors)
    except IDMError:
        raise
    except (TypeError, ValueError, KeyError) as error:
        raise IDMError(f"invalid operator description {measurement.operator_config}: {error}") from None
    y = measurement.y
    # image channels: y's channels, except for multi-coil MRI (one complex image channel → Ncoil coils)
    channels = 1 if getattr(operator, "coils", 1) > 1 else y.shape[1]
    expected = tuple(operator.measurement_shape(y.shape[0], channels))
    if tuple(y.shape) != expected:
        raise IDMError(
            f"measurements of shape {tuple(y.shape)} do not match the operator "
            f"{operator!r}, which produces {expected}"
        )
    return operator
