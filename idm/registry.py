"""Registry of reconstruction methods.

A method is a factory ``build(*, checkpoint=None, device="cpu", seed=0, progress=False, **options)``
returning a callable ``reconstruct(y, op) -> x``: ``y`` are the (noisy) measurements of the
operator ``op``, shape ``op.measurement_shape(B, C)``, and ``x`` the estimate on the operator's
domain, shape ``(B, C, *op.domain_size)``, values nominally in [0, 1]. The factory does the
expensive work once (loading weights); the callable is applied to many images and operators.

Methods register themselves with :func:`register_method` when their module is imported;
:func:`get_method` imports the built-in method modules on first use. A method records what its
``checkpoint`` is (``checkpoint_kind``): ``"prior"`` (a diffusion prior: idm prior checkpoint,
diffusers folder or ``hf:`` id — the zero-shot methods), ``"idm"``, ``"unrolled"``, or None
(the method takes no checkpoint).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

import torch

from .errors import IDMError

if TYPE_CHECKING:
    from .physics.base import LinearOperator


class Reconstruct(Protocol):
    def __call__(self, y: torch.Tensor, op: "LinearOperator") -> torch.Tensor: ...


Builder = Callable[..., Reconstruct]


@dataclass(frozen=True)
class Posterior:
    """What the methods with an uncertainty (``with_uncertainty(y, op)``: ``diffuserecon``, ``mcddpm``,
    ``idm`` on 1D Cartesian MRI; :func:`gives_uncertainty`) return: a reconstruction ``x`` (B, C, *domain) and its per-pixel ``std`` (B, 1 or C, *domain), the
    spread of the method's samples on the image's scale (of the magnitude for complex images)."""

    x: torch.Tensor
    std: torch.Tensor


#: the methods whose reconstructors give a per-pixel std (for messages)
UNCERTAINTY_METHODS = ("diffuserecon", "mcddpm", "idm")


def gives_uncertainty(reconstruct: Any) -> bool:
    """Whether a built method gives a :class:`Posterior` through ``with_uncertainty(y, op)`` (its
    ``gives_uncertainty`` attribute where it has one, e.g. only ``diffuserecon`` among the zero-shot solvers)."""
    return bool(getattr(reconstruct, "gives_uncertainty", hasattr(reconstruct, "with_uncertainty")))


def require_uncertainty(name: str, reconstruct: Any) -> None:
    """:class:`IDMError` unless :func:`gives_uncertainty` (``reconstruct`` is method ``name``)."""
    if not gives_uncertainty(reconstruct):
        raise IDMError(f"method {name!r} gives no uncertainty; {', '.join(UNCERTAINTY_METHODS)} do")


def checked_options(method: str, defaults: Mapping[str, Any], options: Mapping[str, Any],
                    limits: Mapping[str, tuple[float, float]] | None = None) -> dict[str, Any]:
    """A method's ``defaults`` updated with ``options`` (``ratio`` dropped), each of the default's type
    (bool, str, int or float) and within ``limits[key]`` (inclusive) where given; unknown names, wrong types
    and out-of-range values raise :class:`IDMError`."""
    given = {key: value for key, value in options.items() if key != "ratio"}
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise IDMError(f"method {method!r} has no option(s) {', '.join(unknown)}; options: {', '.join(sorted(defaults))}")
    settings = dict(defaults)
    for key, value in given.items():
        kind, bounds = type(defaults[key]), (limits or {}).get(key)
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is str:
            ok = isinstance(value, str)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok:
            raise IDMError(f"method {method!r}: option {key} must be of type {kind.__name__}, got {value!r}")
        if bounds is not None and not bounds[0] <= value <= bounds[1]:
            raise IDMError(f"method {method!r}: option {key} must lie in [{bounds[0]:g}, {bounds[1]:g}], got {value!r}")
        settings[key] = kind(value)
    return settings


@dataclass(frozen=True)
class MethodInfo:
    """A registered method: ``checkpoint_kind`` names what its ``checkpoint`` argument is (None: none)."""

    name: str
    build: Builder
    description: str
    checkpoint_kind: str | None = None

    @property
    def needs_checkpoint(self) -> bool:
        """Whether the method loads a checkpoint (given, or its default one)."""
        return self.checkpoint_kind is not None


class MethodRegistry:
    """Name → :class:`MethodInfo`. One instance per process lives in :data:`METHODS`."""

    def __init__(self, builtin_modules: tuple[str, ...]) -> None:
        self._methods: dict[str, MethodInfo] = {}
        self._builtin_modules = builtin_modules
        self._loaded = False

    def register(self, name: str, description: str, checkpoint_kind: str | None = None) -> Callable[[Builder], Builder]:
        """Decorator registering ``build`` as method ``name`` (``checkpoint_kind``: see the module docstring)."""

        def decorator(build: Builder) -> Builder:
            self._methods[name] = MethodInfo(name, build, description, checkpoint_kind)
            return build

        return decorator

    def _load_builtins(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self._builtin_modules:
                importlib.import_module(module)

    def names(self) -> list[str]:
        self._load_builtins()
        return sorted(self._methods)

    def get(self, name: str) -> MethodInfo:
        self._load_builtins()
        if name not in self._methods:
            raise IDMError(f"unknown method {name!r}; available: {', '.join(self.names())}")
        return self._methods[name]


METHODS = MethodRegistry(builtin_modules=("idm.baselines", "idm.network.method", "idm.zeroshot", "idm.medical"))
register_method = METHODS.register
get_method = METHODS.get
