"""User-facing errors.

Every problem caused by the user's input (bad ratio, NaN pixels, corrupt file, mismatched
checkpoint, unknown method, ...) is raised as :class:`IDMError` with a one-line message that
names the problem. The CLI prints ``error: <message>`` and exits with status 2.
"""

from __future__ import annotations

from collections.abc import Iterable


class IDMError(ValueError):
    """A clear, one-line problem with the user's input."""


def check_ratio(ratio: float) -> float:
    """Return ``ratio`` as float if it lies in (0, 1], else raise :class:`IDMError`."""
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise IDMError(f"sampling ratio must be a number in (0, 1], got {ratio!r}") from None
    if not (0.0 < value <= 1.0):
        raise IDMError(f"sampling ratio must lie in (0, 1], got {value:g}")
    return value


def check_keys(given: Iterable[str], known: Iterable[str], what: str) -> None:
    """Raise :class:`IDMError` naming the keys of ``given`` not in ``known`` (``what``: e.g. ``"U-Net config"``)."""
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise IDMError(f"unknown {what} keys: {', '.join(unknown)}")
