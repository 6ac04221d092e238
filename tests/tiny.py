"""The tiny networks the tests build (channels 4-16, one or two levels), defined once.

Tests that need a variant pass the changed arguments (``tiny_vae(3, latent_channels=4)``); tests
that need non-zero outputs from zero-initialised layers :func:`perturb` the weights.
"""

from __future__ import annotations

import torch

from medfusion.autoencoders.vae import VAE
from medfusion.diffusion.unet import UNet

VAE_WIDTHS = (4, 8, 8)  # the first `levels` of them
TINY_VAE = {
    "block_out_channels": VAE_WIDTHS[:2],
    "layers_per_block": 1,
    "latent_channels": 2,
    "norm_num_groups": 4,
}
TINY_UNET = {
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "num_head_channels": 8,
}


def tiny_vae(spatial_dims: int = 2, in_channels: int = 1, levels: int = 2, **changes) -> VAE:
    """A VAE of ``levels`` levels (downsampling by ``2 ** (levels - 1)``) into 2 latent channels."""
    return VAE(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        **(TINY_VAE | {"block_out_channels": VAE_WIDTHS[:levels]} | changes),
    )


def tiny_unet(spatial_dims: int = 2, in_channels: int = 4, **changes) -> UNet:
    """A two-level U-Net with attention heads of 8 channels."""
    return UNet(spatial_dims=spatial_dims, in_channels=in_channels, **(TINY_UNET | changes))


def perturb(model: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Small noise on every parameter (zero-initialised layers would hide mix-ups otherwise)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model
