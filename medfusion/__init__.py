"""medfusion: latent diffusion for medical image synthesis, 2D and 3D."""

__version__ = "0.1.0"
