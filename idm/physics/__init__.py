"""Forward operators: ``A``, ``A_adjoint``, ``A_dagger`` on batch-first images ``(B, C, H, W)``.

Every operator can be described by a JSON-serialisable ``op.config()`` (plus ``op.tensors()`` for
what JSON cannot hold, e.g. an explicit inpainting mask) and rebuilt with :func:`make_operator`.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import IDMError
from .base import GaussianNoise, LinearOperator, conjugate_gradient
from .blockcs import BlockCS
from .canvas import Canvas, padded_size
from .ct import ParallelBeamCT
from .inpainting import Inpainting
from .mri import MRI
from .superres import Denoising, SuperResolution

#: operator kind (as in ``config()["kind"]``) → class
OPERATORS: dict[str, type[LinearOperator]] = {
    "blockcs": BlockCS,
    "ct": ParallelBeamCT,
    "inpainting": Inpainting,
    "mri": MRI,
    "superres": SuperResolution,
    "denoising": Denoising,
}

#: the config value standing for an argument stored in ``tensors`` instead
EXPLICIT = "explicit"


def make_operator(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None) -> LinearOperator:
    """Rebuild an operator from ``op.config()`` (and ``op.tensors()`` for explicit arguments).

    Raises:
        IDMError: unknown kind, missing/unknown arguments, or a missing explicit tensor.
    """
    if not isinstance(config, Mapping) or "kind" not in config:
        raise IDMError(f"operator config must be a mapping with a 'kind', got {config!r}")
    args = dict(config)
    kind = args.pop("kind")
    if kind not in OPERATORS:
        raise IDMError(f"unknown operator kind {kind!r}; available: {', '.join(sorted(OPERATORS))}")
    cls = OPERATORS[kind]
    tensors = dict(tensors or {})
    for name, value in args.items():
        if isinstance(value, str) and value == EXPLICIT:
            if name not in tensors:
                raise IDMError(f"operator {kind!r}: argument {name!r} is explicit but no tensor {name!r} was given")
            args[name] = tensors.pop(name)
    if tensors:
        raise IDMError(f"operator {kind!r} does not use the tensors {', '.join(sorted(tensors))}")
    if "image_size" in args and isinstance(args["image_size"], (list, tuple)):
        args["image_size"] = tuple(args["image_size"])
    try:
        inspect.signature(cls).bind(**args)
    except TypeError as error:
        raise IDMError(f"bad arguments for operator {kind!r}: {error}") from None
    return cls(**args)


__all__ = [
    "OPERATORS",
    "BlockCS",
    "Canvas",
    "Denoising",
    "GaussianNoise",
    "Inpainting",
    "LinearOperator",
    "MRI",
    "ParallelBeamCT",
    "SuperResolution",
    "conjugate_gradient",
    "make_operator",
    "padded_size",
]
