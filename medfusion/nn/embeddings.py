"""Embeddings of the diffusion timestep and of the class label (with a null class for guidance)."""

from __future__ import annotations

import torch
from diffusers.models.embeddings import TimestepEmbedding as _MLP
from diffusers.models.embeddings import Timesteps
from torch import nn


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of the timestep followed by a two-layer MLP.

    Args:
        channels: number of sinusoidal features.
        embed_dim: width of the output embedding.
    """

    def __init__(self, channels: int, embed_dim: int):
        super().__init__()
        if channels < 2 or channels % 2:
            raise ValueError(f"timestep channels must be an even number >= 2; got {channels}")
        self.features = Timesteps(channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.mlp = _MLP(channels, embed_dim)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        """``timesteps``: (N,) integer or float steps. Returns (N, embed_dim)."""
        if timesteps.ndim != 1:
            raise ValueError(f"timesteps must have shape (N,); got {tuple(timesteps.shape)}")
        h = self.features(timesteps)  # (N, channels), float32
        return self.mlp(h.to(self.mlp.linear_1.weight.dtype))


class ClassEmbedding(nn.Module):
    """A learned vector per class plus one for the null class (index ``num_classes``).

    The null class is what classifier-free guidance trains with when a label is dropped and what
    an unconditional sample is drawn with.
    """

    def __init__(self, num_classes: int, embed_dim: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1; got {num_classes}")
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes + 1, embed_dim)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """``labels``: (N,) in ``[0, num_classes]``. Returns (N, embed_dim).

        The range is not checked here (that would synchronise the device on every call); callers
        validate labels where they enter (datasets, samplers).
        """
        if labels.ndim != 1:
            raise ValueError(f"class labels must have shape (N,); got {tuple(labels.shape)}")
        return self.embedding(labels)
