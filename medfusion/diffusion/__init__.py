"""Latent diffusion: the class-conditional U-Net, the noise schedule and the training objective."""

from medfusion.diffusion.objective import (
    BETA_SCHEDULES,
    LOSS_TYPES,
    PREDICTION_TYPES,
    DiffusionConfig,
    DiffusionObjective,
    NoiseSchedule,
    betas_from_scheduler_config,
)
from medfusion.diffusion.unet import UNet, UNetConfig

__all__ = [
    "BETA_SCHEDULES",
    "LOSS_TYPES",
    "PREDICTION_TYPES",
    "DiffusionConfig",
    "DiffusionObjective",
    "NoiseSchedule",
    "UNet",
    "UNetConfig",
    "betas_from_scheduler_config",
]
