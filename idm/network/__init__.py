"""IDM: the prior's multi-step sampler as an end-to-end trainable, two-level invertible network.

* :class:`IDMConfig`, :class:`IDMNet` (``net(y, op) -> x``), :func:`load_idm`;
* :class:`Injector` — measurement-injection adapters;
* the ``idm`` reconstruction method lives in :mod:`idm.network.method` (registered on import).
"""

from .config import LEVELS, IDMConfig
from .idm import IDMNet, SamplingStep, idm_from_config, idm_from_prior, load_idm, load_idm_prior
from .injector import Injector
from .measurement import MeasurementContext

__all__ = ["LEVELS", "IDMConfig", "IDMNet", "Injector", "MeasurementContext", "SamplingStep", "idm_from_config",
           "idm_from_prior", "load_idm", "load_idm_prior"]
