"""Two-level invertibility (IDM): reversible couplings, sequences, the reversible U-Net.

* :class:`Coupling` — ``y₁ = (1 − v)·f(x₁) + v·x₂, y₂ = x₁`` for any shape-preserving ``f``.
* :class:`ReversibleSequence` — duplicate ``(x, s·x)`` → couplings → merge ``y₁ + m·y₂``; in
  ``"reversible"`` memory mode only the output is stored and inputs are recomputed by inversion.
* :class:`ReversibleSampler` — level 1: one coupling per sampling step.
* :func:`convert_unet` / :class:`ReversibleUNet` — level 2: a U-Net (ours, or any described by a
  :class:`UNetLayout`, e.g. a diffusers model) with every run of shape-preserving layers (and
  caller-supplied injectors) reversible, the rest checkpointed.
* :func:`set_memory_mode`, :func:`inversion_error` — switch memory strategy, check inversion drift.
"""

from .convert import CheckpointedBody, CheckpointedChain, InjectionSite, ReversibleUNet, UNetBody, convert_unet
from .coupling import Coupling
from .layout import Layer, UNetLayout, unet_layout
from .sequence import (
    MEMORY_MODES,
    MemoryMode,
    ReversibleSampler,
    ReversibleSequence,
    inversion_error,
    set_memory_mode,
)

__all__ = [
    "MEMORY_MODES",
    "CheckpointedBody",
    "CheckpointedChain",
    "Coupling",
    "InjectionSite",
    "Layer",
    "MemoryMode",
    "ReversibleSampler",
    "ReversibleSequence",
    "ReversibleUNet",
    "UNetBody",
    "UNetLayout",
    "convert_unet",
    "inversion_error",
    "set_memory_mode",
    "unet_layout",
]
