"""Baselines, registered as methods on import: classic ``pinv``, ``fbp`` and ``tv``, learned ``unrolled``."""

from . import fbp, pinv, tv, unrolled

__all__ = ["fbp", "pinv", "tv", "unrolled"]
