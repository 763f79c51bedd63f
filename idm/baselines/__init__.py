"""Baselines, registered as methods on import: classic ``pinv`` and ``tv``, learned ``unrolled``."""

from . import pinv, tv, unrolled

__all__ = ["pinv", "tv", "unrolled"]
