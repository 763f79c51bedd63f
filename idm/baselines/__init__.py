"""Classic reconstruction baselines, registered as methods on import: ``pinv`` and ``tv``."""

from . import pinv, tv

__all__ = ["pinv", "tv"]
