"""Validation of operator constructor arguments (every problem is one-line :class:`IDMError`)."""

from __future__ import annotations

import math
import numbers
from typing import Any

from ..errors import IDMError


def as_int(name: str, value: Any, minimum: int | None = None) -> int:
    """``value`` as an int (integral numbers only, no bools), at least ``minimum`` if given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value:
        raise IDMError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise IDMError(f"{name} must be an integer, got {value!r}")
    result = int(value)
    if minimum is not None and result < minimum:
        raise IDMError(f"{name} must be >= {minimum}, got {result}")
    return result


def image_size_2d(kind: str, image_size: tuple[int, ...]) -> None:
    """Raise unless ``image_size`` is spatial 2D ``(H, W)``."""
    if len(image_size) != 2:
        raise IDMError(f"the {kind} operator works on 2D images (H, W), got image size {tuple(image_size)}")


def count_for_ratio(ratio: float, total: int) -> int:
    """``ceil(ratio · total)``, robust to float error (0.1·1024 → 103, 0.5·1024 → 512), at least 1."""
    return max(1, math.ceil(round(ratio * total, 6)))
