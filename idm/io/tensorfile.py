"""Reading and writing flat dicts of tensors as safetensors files, with clear errors."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import IDMError


def cpu_tensors(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies safetensors can write (tensors sharing memory are cloned)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"entry {key!r} is a {type(value).__name__}, not a tensor")
        tensor = value.detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensor = tensor.to("cpu").contiguous()
        if tensor.numel() > 0:
            pointer = tensor.untyped_storage().data_ptr()
            if pointer in seen:
                tensor = tensor.clone()
            seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


def read_safetensors(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of ``path``; :class:`IDMError` if it is missing or corrupt."""
    if not path.is_file():
        raise IDMError(f"{what} not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises SafetensorError, OSError, ...
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise IDMError(f"corrupt {what} file {path}: {reason}") from None
    return tensors, metadata
