"""Autoencoders that compress images and volumes into latents: the KL-regularised VAE and its losses."""

from medfusion.autoencoders.losses import VAELoss, VAELossConfig
from medfusion.autoencoders.vae import VAE, DiagonalGaussian, VAEConfig, VAEOutput

__all__ = ["VAE", "DiagonalGaussian", "VAEConfig", "VAELoss", "VAELossConfig", "VAEOutput"]
