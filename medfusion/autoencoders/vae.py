"""A KL-regularised variational autoencoder for images (2D) and volumes (3D).

The architecture follows the latent-diffusion autoencoder (Rombach et al. 2022): a convolutional
encoder of residual blocks that halves every spatial axis between levels, an optional attention
block at the lowest level, a diagonal Gaussian posterior, and a mirrored decoder. It is a diffusers
``ModelMixin``/``ConfigMixin``: ``save_pretrained`` writes ``config.json`` and safetensors, and
``VAE.from_pretrained(folder)`` loads it without any training code.

Latents for diffusion are ``posterior.sample() * scaling_factor``; the scaling factor (1/std of the
latents over a sample of the training set) is measured after training and stored in the config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from medfusion.config import model_config
from medfusion.nn import (
    AttentionBlock,
    Downsample,
    ResBlock,
    Upsample,
    check_spatial_dims,
    conv_nd,
    group_norm,
)

LOGVAR_RANGE = (-30.0, 20.0)


@dataclass(frozen=True)
class DiagonalGaussian:
    """A diagonal Gaussian posterior ``q(z | x)`` over latents ``(N, L, *latent_spatial)``."""

    mean: torch.Tensor
    logvar: torch.Tensor

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A reparameterised draw ``mean + std * eps`` (differentiable in mean and logvar)."""
        eps = randn_tensor(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL divergence to the standard normal, summed over the latent elements of a sample: (N,)."""
        mean, logvar = self.mean.float(), self.logvar.float()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
        return kl.flatten(1).sum(dim=1)


@dataclass(frozen=True)
class VAEOutput:
    """What :meth:`VAE.forward` returns."""

    reconstruction: torch.Tensor  # (N, C, *spatial)
    posterior: DiagonalGaussian


class _Stack(nn.Module):
    """Run single-input blocks in order, each under activation checkpointing when enabled."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.gradient_checkpointing = False

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = self._gradient_checkpointing_func(block, h)
            else:
                h = block(h)
        return h


def _mid_blocks(spatial_dims: int, channels: int, groups: int, attention: bool, head_channels, dropout):
    blocks: list[nn.Module] = [ResBlock(spatial_dims, channels, norm_num_groups=groups, dropout=dropout)]
    if attention:
        blocks.append(AttentionBlock(spatial_dims, channels, head_channels, norm_num_groups=groups))
    blocks.append(ResBlock(spatial_dims, channels, norm_num_groups=groups, dropout=dropout))
    return blocks


class VAE(ModelMixin, ConfigMixin):
    """KL autoencoder for ``spatial_dims`` 2 or 3 and any number of channels.

    Args:
        spatial_dims: 2 (images) or 3 (volumes).
        in_channels: channels of the images (1 grey, 3 RGB, N for multi-sequence MRI ...).
        out_channels: channels of the reconstruction; default ``in_channels``.
        block_out_channels: width of each level; the image is downsampled by 2 between levels,
            so ``len(block_out_channels) - 1`` levels give a factor of 1, 2, 4, 8 or 16.
        layers_per_block: residual blocks per level in the encoder (the decoder has one more).
        latent_channels: channels of the latent.
        norm_num_groups: GroupNorm groups (must divide every width).
        mid_attention: self-attention at the lowest level (SDPA).
        num_head_channels: channels per attention head; None: one head.
        dropout: dropout inside the residual blocks.
        scaling_factor: multiplier that gives latents unit variance; set after training with
            :meth:`set_scaling_factor`.
    """

    config_name = "config.json"
    _supports_gradient_checkpointing = True

    # names of the saved config.json (of earlier versions) and what they are called now
    renamed_config_keys: ClassVar[dict[str, str]] = {"attention_head_channels": "num_head_channels"}

    @classmethod
    def extract_init_dict(cls, config_dict: dict, **kwargs):
        """diffusers' config reading, with the :attr:`renamed_config_keys` of earlier versions."""
        renamed = {cls.renamed_config_keys.get(k, k): v for k, v in config_dict.items()}
        return super().extract_init_dict(renamed, **kwargs)

    @register_to_config
    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int | None = None,
        block_out_channels: tuple[int, ...] = (64, 128, 256),
        layers_per_block: int = 2,
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        mid_attention: bool = False,
        num_head_channels: int | None = None,
        dropout: float = 0.0,
        scaling_factor: float = 1.0,
    ):
        super().__init__()
        check_spatial_dims(spatial_dims)
        widths = tuple(block_out_channels)
        if not 1 <= len(widths) <= 5 or any(w < 1 for w in widths):
            raise ValueError(
                f"block_out_channels must hold 1 to 5 positive widths (downsampling 1x to 16x); got {widths}"
            )
        for name, value in (("in_channels", in_channels), ("latent_channels", latent_channels)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1; got {value}")
        if layers_per_block < 1:
            raise ValueError(f"layers_per_block must be >= 1; got {layers_per_block}")
        if not (math.isfinite(scaling_factor) and scaling_factor > 0):
            raise ValueError(f"scaling_factor must be a positive number; got {scaling_factor}")
        if out_channels is not None and out_channels < 1:
            raise ValueError(f"out_channels must be >= 1 or None (same as in_channels); got {out_channels}")
        if num_head_channels is not None and (
            num_head_channels < 1 or any(w % num_head_channels for w in widths[-1:])
        ):
            raise ValueError(
                f"num_head_channels ({num_head_channels}) must be a positive divisor of the "
                f"lowest level's width {widths[-1]}"
            )
        out_channels = in_channels if out_channels is None else out_channels
        d, g = spatial_dims, norm_num_groups
        res = dict(norm_num_groups=g, dropout=dropout)

        blocks: list[nn.Module] = [conv_nd(d, in_channels, widths[0], 3, padding=1)]
        prev = widths[0]
        for level, width in enumerate(widths):
            for _ in range(layers_per_block):
                blocks.append(ResBlock(d, prev, width, **res))
                prev = width
            if level < len(widths) - 1:
                blocks.append(Downsample(d, width))
        blocks += _mid_blocks(d, prev, g, mid_attention, num_head_channels, dropout)
        blocks += [group_norm(prev, g), nn.SiLU(), conv_nd(d, prev, 2 * latent_channels, 3, padding=1)]
        self.encoder = _Stack(blocks)
        self.quant_conv = conv_nd(d, 2 * latent_channels, 2 * latent_channels, 1)

        self.post_quant_conv = conv_nd(d, latent_channels, latent_channels, 1)
        blocks = [conv_nd(d, latent_channels, widths[-1], 3, padding=1)]
        blocks += _mid_blocks(d, widths[-1], g, mid_attention, num_head_channels, dropout)
        prev = widths[-1]
        for level in reversed(range(len(widths))):
            for _ in range(layers_per_block + 1):
                blocks.append(ResBlock(d, prev, widths[level], **res))
                prev = widths[level]
            if level > 0:
                blocks.append(Upsample(d, prev))
        blocks += [group_norm(prev, g), nn.SiLU(), conv_nd(d, prev, out_channels, 3, padding=1)]
        self.decoder = _Stack(blocks)

    @property
    def downsampling_factor(self) -> int:
        """How much each spatial axis shrinks from image to latent."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.config.scaling_factor)

    def latent_shape(self, spatial_shape: tuple[int, ...]) -> tuple[int, ...]:
        """``(L, *latent_spatial)`` of an image with ``spatial_shape``."""
        self._check_spatial(spatial_shape)
        return (self.config.latent_channels, *(s // self.downsampling_factor for s in spatial_shape))

    def _check_spatial(self, spatial_shape) -> None:
        f = self.downsampling_factor
        if len(spatial_shape) != self.config.spatial_dims or any(s % f for s in spatial_shape):
            raise ValueError(
                f"this VAE takes {self.config.spatial_dims}D inputs whose sides are multiples of {f}; "
                f"got spatial shape {tuple(spatial_shape)}"
            )

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """``x``: (N, C, *spatial) in [-1, 1]. Returns the posterior over (N, L, *spatial/f)."""
        if x.ndim != self.config.spatial_dims + 2 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"this VAE takes (N, {self.config.in_channels}, *spatial) with "
                f"{self.config.spatial_dims} spatial axes; got {tuple(x.shape)}"
            )
        self._check_spatial(x.shape[2:])
        moments = self.quant_conv(self.encoder(x))  # (N, 2L, *spatial/f)
        mean, logvar = moments.chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar.clamp(*LOGVAR_RANGE))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``z``: unscaled latents (N, L, *latent_spatial). Returns images (N, C_out, *spatial)."""
        if z.ndim != self.config.spatial_dims + 2 or z.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"this VAE decodes latents (N, {self.config.latent_channels}, *spatial) with "
                f"{self.config.spatial_dims} spatial axes; got {tuple(z.shape)}"
            )
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> VAEOutput:
        """Encode, draw a latent (or take the mean), decode."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return VAEOutput(self.decode(z), posterior)

    def encode_latents(
        self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Latents for diffusion: a posterior draw (or its mean) times ``scaling_factor``."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return z * self.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`encode_latents`: divide by ``scaling_factor`` and decode."""
        return self.decode(latents / self.scaling_factor)

    def set_scaling_factor(self, value: float) -> None:
        """Store the latent scaling factor in the model's config (saved with it)."""
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"scaling_factor must be a positive number; got {value}")
        self.register_to_config(scaling_factor=float(value))

    def last_layer_weight(self) -> torch.Tensor:
        """Weight of the decoder's output convolution (for the adversarial loss's adaptive weight)."""
        return self.decoder.blocks[-1].weight


VAEConfig = model_config(
    VAE, "VAEConfig", from_data=("spatial_dims", "in_channels"), exclude=("scaling_factor",)
)


def reconstruction_loss(x: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample pixel loss **averaged** over channels and positions: (N,). ``kind``: l1 or mse."""
    if x.shape != y.shape:
        raise ValueError(f"reconstruction {tuple(x.shape)} and target {tuple(y.shape)} differ in shape")
    if kind == "l1":
        loss = F.l1_loss(x.float(), y.float(), reduction="none")
    elif kind == "mse":
        loss = F.mse_loss(x.float(), y.float(), reduction="none")
    else:
        raise ValueError(f"pixel loss must be 'l1' or 'mse'; got {kind!r}")
    return loss.flatten(1).mean(dim=1)
