"""The class-conditional diffusion U-Net, one code path for images (2D) and volumes (3D).

The network predicts a tensor of the input's shape from a noisy latent, the timestep and an
optional class label; what that tensor means (noise or velocity) is the objective's business
(:mod:`medfusion.diffusion.objective`), not the network's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from medfusion.config import model_config
from medfusion.nn import AttentionBlock, ClassEmbedding, Downsample, ResBlock, TimestepEmbedding, Upsample
from medfusion.nn.layers import check_spatial_dims, conv_nd, group_norm, zero_module


class _Level(nn.Module):
    """Residual blocks (each optionally followed by attention) of one resolution."""

    def __init__(self, res_blocks: list[ResBlock], attentions: list[nn.Module]):
        super().__init__()
        self.res_blocks = nn.ModuleList(res_blocks)
        self.attentions = nn.ModuleList(attentions)


class UNet(ModelMixin, ConfigMixin):
    """Class-conditional U-Net for latents of ``spatial_dims`` 2 or 3.

    Levels run from full resolution down: level ``i`` has ``layers_per_block`` residual blocks
    of width ``block_out_channels[i]`` (plus self-attention after each when
    ``attention_levels[i]``), and every level but the last halves each spatial axis. The decoder
    mirrors it with one more block per level, each taking a skip connection. The timestep
    embedding, plus the learned class embedding when ``num_classes`` is set, conditions every
    residual block (scale and shift after its second normalisation).

    Args:
        spatial_dims: 2 (images) or 3 (volumes).
        in_channels: channels of the latent.
        out_channels: channels of the prediction; default ``in_channels``.
        block_out_channels: width of each level.
        layers_per_block: residual blocks per level in the encoder (the decoder has one more).
        attention_levels: per level, whether self-attention (SDPA) follows each residual block;
            default none.
        mid_attention: self-attention between the two residual blocks at the lowest level.
        num_head_channels: channels per attention head; None: one head.
        norm_num_groups: GroupNorm groups (must divide every width).
        dropout: dropout inside the residual blocks.
        num_classes: number of classes for conditioning (index ``num_classes`` is the null class
            of classifier-free guidance); None: unconditional.
        time_embed_dim: width of the timestep/class embedding; default ``4 * block_out_channels[0]``.
    """

    config_name = "config.json"
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 4,
        out_channels: int | None = None,
        block_out_channels: tuple[int, ...] = (128, 256, 512),
        layers_per_block: int = 2,
        attention_levels: tuple[bool, ...] | None = None,
        mid_attention: bool = False,
        num_head_channels: int | None = 64,
        norm_num_groups: int = 32,
        dropout: float = 0.0,
        num_classes: int | None = None,
        time_embed_dim: int | None = None,
    ):
        super().__init__()
        check_spatial_dims(spatial_dims)
        widths = tuple(block_out_channels)
        if not widths or any(w < 1 for w in widths):
            raise ValueError(f"block_out_channels must be positive widths; got {block_out_channels!r}")
        if layers_per_block < 1:
            raise ValueError(f"layers_per_block must be >= 1; got {layers_per_block}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1; got {in_channels}")
        attention = tuple(attention_levels) if attention_levels is not None else (False,) * len(widths)
        if len(attention) != len(widths):
            raise ValueError(
                f"attention_levels needs one entry per level ({len(widths)}); got {attention_levels!r}"
            )
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 or None (unconditional); got {num_classes}")
        out_channels = in_channels if out_channels is None else out_channels
        if out_channels < 1:
            raise ValueError(f"out_channels must be >= 1; got {out_channels}")
        embed_dim = 4 * widths[0] if time_embed_dim is None else time_embed_dim
        if embed_dim < 2:
            raise ValueError(f"time_embed_dim must be >= 2; got {embed_dim}")

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(spatial_dims, cin, cout, embed_dim, norm_num_groups, dropout, zero_init=True)

        def attn(channels: int) -> AttentionBlock:
            return AttentionBlock(spatial_dims, channels, num_head_channels, norm_num_groups)

        self.time_embedding = TimestepEmbedding(widths[0], embed_dim)
        self.class_embedding = ClassEmbedding(num_classes, embed_dim) if num_classes is not None else None
        self.conv_in = conv_nd(spatial_dims, in_channels, widths[0], 3, padding=1)

        skips = [widths[0]]
        channels = widths[0]
        self.down_levels = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        for level, width in enumerate(widths):
            blocks, attentions = [], []
            for _ in range(layers_per_block):
                blocks.append(res(channels, width))
                attentions.append(attn(width) if attention[level] else nn.Identity())
                channels = width
                skips.append(channels)
            self.down_levels.append(_Level(blocks, attentions))
            if level < len(widths) - 1:
                self.downsamplers.append(Downsample(spatial_dims, channels))
                skips.append(channels)

        self.mid_block1 = res(channels, channels)
        self.mid_attn = attn(channels) if mid_attention else nn.Identity()
        self.mid_block2 = res(channels, channels)

        self.up_levels = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        for level in reversed(range(len(widths))):
            width = widths[level]
            blocks, attentions = [], []
            for _ in range(layers_per_block + 1):
                blocks.append(res(channels + skips.pop(), width))
                attentions.append(attn(width) if attention[level] else nn.Identity())
                channels = width
            self.up_levels.append(_Level(blocks, attentions))
            if level > 0:
                self.upsamplers.append(Upsample(spatial_dims, channels))

        self.norm_out = group_norm(channels, norm_num_groups)
        self.conv_out = zero_module(conv_nd(spatial_dims, channels, out_channels, 3, padding=1))
        self.gradient_checkpointing = False

    @property
    def num_classes(self) -> int | None:
        return self.config.num_classes

    @property
    def null_class(self) -> int | None:
        """The label that means "no class" (classifier-free guidance); None when unconditional."""
        return self.config.num_classes

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def _check_input(self, sample: torch.Tensor) -> None:
        expected = 2 + self.config.spatial_dims
        if sample.ndim != expected or sample.shape[1] != self.config.in_channels:
            raise ValueError(
                f"UNet expects latents (N, {self.config.in_channels}, *spatial) with "
                f"{self.config.spatial_dims} spatial axes; got {tuple(sample.shape)}"
            )
        factor = self.downsampling_factor
        if any(s % factor for s in sample.shape[2:]):
            raise ValueError(
                f"latent size {tuple(sample.shape[2:])} must be divisible by {factor} "
                f"(2 ** (levels - 1) for {len(self.config.block_out_channels)} levels)"
            )

    def _embedding(self, sample: torch.Tensor, timesteps, class_labels) -> torch.Tensor:
        n = sample.shape[0]
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], device=sample.device)
        if timesteps.ndim == 0:
            timesteps = timesteps[None]
        if timesteps.ndim != 1 or timesteps.shape[0] not in (1, n):
            raise ValueError(f"timesteps must be a scalar, (1,) or ({n},); got {tuple(timesteps.shape)}")
        emb = self.time_embedding(timesteps.to(sample.device).expand(n))  # (N, E)
        if self.class_embedding is not None:
            if class_labels is None:  # unconditional: the null class
                class_labels = torch.full((n,), self.null_class, device=sample.device, dtype=torch.long)
            if class_labels.shape != (n,) or class_labels.is_floating_point():
                raise ValueError(
                    f"class_labels must be integer indices of shape ({n},); got "
                    f"{class_labels.dtype} {tuple(class_labels.shape)}"
                )
            emb = emb + self.class_embedding(class_labels.to(sample.device))
        elif class_labels is not None:
            raise ValueError("this UNet is unconditional (num_classes is None): pass no class_labels")
        return emb

    def _run(self, block: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)

    def forward(
        self,
        sample: torch.Tensor,
        timesteps: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict from noisy latents.

        Args:
            sample: noisy latents (N, C, *spatial); each spatial size divisible by
                ``2 ** (levels - 1)``.
            timesteps: (N,) or a scalar, integer or float.
            class_labels: (N,) class indices, ``num_classes`` for the null class; None means the
                null class for a conditional model (and must be None for an unconditional one).
        Returns:
            (N, out_channels, *spatial).
        """
        self._check_input(sample)
        emb = self._embedding(sample, timesteps, class_labels)  # (N, E)
        h = self.conv_in(sample.to(self.conv_in.weight.dtype))  # (N, C0, *spatial)
        skips = [h]
        for i, level in enumerate(self.down_levels):
            for block, attention in zip(level.res_blocks, level.attentions):
                h = attention(self._run(block, h, emb))  # (N, C_i, *spatial/2^i)
                skips.append(h)
            if i < len(self.downsamplers):
                h = self.downsamplers[i](h)  # (N, C_i, *spatial/2^(i+1))
                skips.append(h)
        h = self._run(self.mid_block1, h, emb)
        h = self.mid_attn(h)
        h = self._run(self.mid_block2, h, emb)
        for i, level in enumerate(self.up_levels):
            for block, attention in zip(level.res_blocks, level.attentions):
                h = torch.cat([h, skips.pop()], dim=1)  # (N, C + C_skip, *)
                h = attention(self._run(block, h, emb))
            if i < len(self.upsamplers):
                h = self.upsamplers[i](h)  # (N, C, *spatial*2)
        return self.conv_out(F.silu(self.norm_out(h)))  # (N, out_channels, *spatial)


UNetConfig = model_config(UNet, "UNetConfig", from_data=("spatial_dims", "in_channels", "num_classes"))
