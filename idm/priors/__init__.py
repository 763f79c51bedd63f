"""Diffusion prior: ε-prediction U-Net, noise schedules, samplers, checkpoints.

Convention: images are on [0, 1]; the prior works on [-1, 1] (:func:`to_model_range`,
:func:`from_model_range`).
"""

from .prior import Prior, load_prior, prior_from_config
from .samplers import SAMPLERS, sample_ddim, sample_ddpm
from .schedule import NoiseSchedule, from_model_range, to_model_range
from .unet import AttentionBlock, Downsample, ResBlock, UNet, UNetConfig, UNetStage, Upsample, split_runs

__all__ = [
    "AttentionBlock",
    "Downsample",
    "NoiseSchedule",
    "Prior",
    "ResBlock",
    "SAMPLERS",
    "UNet",
    "UNetConfig",
    "UNetStage",
    "Upsample",
    "from_model_range",
    "load_prior",
    "prior_from_config",
    "sample_ddim",
    "sample_ddpm",
    "split_runs",
    "to_model_range",
]
