"""Helpers of the sampler tests: tiny networks with small random weights, model-folder parts."""

from __future__ import annotations

import torch

from medfusion.autoencoders.vae import VAE
from medfusion.diffusion.objective import DiffusionConfig
from medfusion.diffusion.unet import UNet
from medfusion.samplers import ModelInfo
from tests.tiny import perturb, tiny_unet, tiny_vae

# the sampling loop's U-Net: tests.tiny's on 4 latent channels, 3 classes
NUM_CLASSES = 3
LATENT_SPATIAL = {2: (8, 4), 3: (4, 8, 4)}  # not all sides equal, so that mixed-up axes show

# the model folder's parts: a VAE halving each side once into 2 latent channels, 2 classes
LATENT_CHANNELS = 2
UNET_TINY = {
    "block_out_channels": (8, 8),
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "num_head_channels": 8,
}
IMAGE_SIZE = {2: (16, 8), 3: (8, 8, 4)}  # array order
SPACING = {2: (0.5, 0.25), 3: (0.5, 0.25, 2.0)}


def random_unet(spatial_dims: int, num_classes: int | None = NUM_CLASSES) -> UNet:
    """A tiny conditional U-Net on 4 latent channels with small random weights everywhere."""
    return perturb(tiny_unet(spatial_dims, 4, num_classes=num_classes)).eval()


def latent_shape(spatial_dims: int, n: int = 2) -> tuple[int, ...]:
    return (n, 4, *LATENT_SPATIAL[spatial_dims])


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def folder_vae(spatial_dims: int, latent_channels: int = LATENT_CHANNELS) -> VAE:
    """The VAE of a tiny model folder: tests.tiny's, small random weights, a scaling factor."""
    vae = tiny_vae(spatial_dims, 1, latent_channels=latent_channels)
    vae.set_scaling_factor(0.75)
    return perturb(vae).eval()


def folder_unet(spatial_dims: int, in_channels: int = LATENT_CHANNELS, num_classes: int | None = 2) -> UNet:
    """The U-Net of a tiny model folder (fits :func:`tiny_vae` and :func:`model_info`)."""
    unet = UNet(spatial_dims=spatial_dims, in_channels=in_channels, num_classes=num_classes, **UNET_TINY)
    return perturb(unet).eval()


def model_info(spatial_dims: int, class_names=("a", "b")) -> ModelInfo:
    size = IMAGE_SIZE[spatial_dims]
    return ModelInfo(
        spatial_dims=spatial_dims,
        image_size=size,
        channels=1,
        latent_shape=(LATENT_CHANNELS, *(s // 2 for s in size)),
        class_names=class_names,
        scaling_factor=0.75,
        normalization={"normalization": "percentile", "percentiles": [0.5, 99.5], "per_channel": True},
        source_dtype="uint16",
        spacing=SPACING[spatial_dims],
    )


def scheduler_config() -> dict:
    return DiffusionConfig(beta_schedule="cosine", prediction_type="v_prediction").scheduler_config()
