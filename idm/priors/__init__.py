"""Diffusion prior: ε-prediction U-Net, noise schedules, samplers, checkpoints; pre-trained
diffusers U-Nets as priors (:mod:`idm.priors.hub`).

Convention: images are on [0, 1]; the prior works on [-1, 1] (:func:`to_model_range`,
:func:`from_model_range`).
"""

from .hub import DiffusersPrior, is_diffusers_folder, load_diffusers_prior, load_diffusers_unet
from .prior import Prior, PriorLike, PriorSampling, load_prior, prior_from_config
from .samplers import SAMPLERS, sample_ddim, sample_ddpm
from .schedule import NoiseSchedule, from_model_range, schedule_from_diffusers, to_model_range
from .unet import AttentionBlock, Downsample, ResBlock, UNet, UNetConfig, UNetStage, Upsample, split_runs

__all__ = [
    "AttentionBlock",
    "DiffusersPrior",
    "Downsample",
    "NoiseSchedule",
    "Prior",
    "PriorLike",
    "PriorSampling",
    "ResBlock",
    "SAMPLERS",
    "UNet",
    "UNetConfig",
    "UNetStage",
    "Upsample",
    "from_model_range",
    "is_diffusers_folder",
    "load_diffusers_prior",
    "load_diffusers_unet",
    "load_prior",
    "prior_from_config",
    "sample_ddim",
    "sample_ddpm",
    "schedule_from_diffusers",
    "split_runs",
    "to_model_range",
]
