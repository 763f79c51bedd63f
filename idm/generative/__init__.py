"""Generative models of whole volumes: HA-GAN (:mod:`idm.generative.hagan`, Sun et al., JBHI 2022), a 3D GAN
trained on one high-resolution sub-volume per iteration that generates the whole volume at inference."""

from .hagan import HAGAN, Discriminators, HAGANConfig

__all__ = ["HAGAN", "Discriminators", "HAGANConfig"]
