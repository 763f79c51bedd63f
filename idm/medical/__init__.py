"""Medical diffusion methods beyond the shared operators and zero-shot solvers.

Importing the package registers the method ``mcddpm`` (:mod:`idm.medical.mcddpm`: MC-DDPM, a
conditional diffusion over the unsampled MRI k-space with a per-pixel uncertainty). Also here:
:mod:`idm.medical.lmi` (local mutual information), :mod:`idm.medical.translate` (LMI-guided
cross-modality translation, ``idm translate``) and :mod:`idm.medical.anomaly` (classifier-guided
anomaly detection, ``idm anomaly``).
"""

from .mcddpm import MCDDPM, load_mcddpm, sample_mcddpm

__all__ = ["MCDDPM", "load_mcddpm", "sample_mcddpm"]
