"""Zero-shot solvers on the diffusion prior: DDNM, DDNM+ (Wang et al., ICLR 2023) and DPS (Chung et
al., ICLR 2023), and plug-and-play HQS with a deep denoiser (``pnp``, :mod:`idm.zeroshot.pnp`).

The samplers are small functions with one signature (k-diffusion style)::

    sample_xxx(model, y, op, schedule, *, steps, size_multiple=1, generator=None,
               progress=False, callback=None, **method_options) -> x

``model(x, t) -> ε`` on the prior's range [-1, 1]; ``y`` measurements of [0, 1] images by the
linear operator ``op`` (any :class:`~idm.physics.LinearOperator`: only ``A``, ``A_dagger`` and
``project`` are used); ``x`` the estimate ``(B, C, *op.domain_size)`` on [0, 1], not clipped. Importing this
package registers the methods ``ddnm``, ``ddnm+`` and ``dps`` (:mod:`idm.zeroshot.method`) and ``pnp``.
"""

from .common import data_consistency, jump_indices, misfit, operator_canvas, timestep_pairs
from .ddnm import noise_aware_weights, sample_ddnm
from ..registry import Posterior
from .diffuserecon import sample_diffuserecon
from .dps import sample_dps
from .method import DEFAULT_PRIOR, SOLVERS, ZeroShotReconstructor, build_solver, solver_options
from .pnp import PnPReconstructor, sample_pnp

__all__ = [
    "Posterior",
    "sample_diffuserecon",
    "DEFAULT_PRIOR",
    "PnPReconstructor",
    "SOLVERS",
    "ZeroShotReconstructor",
    "build_solver",
    "data_consistency",
    "jump_indices",
    "misfit",
    "noise_aware_weights",
    "operator_canvas",
    "sample_ddnm",
    "sample_dps",
    "sample_pnp",
    "solver_options",
    "timestep_pairs",
]
