"""Residual and attention blocks shared by the autoencoders and the diffusion U-Net."""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from medfusion.nn.layers import append_dims, conv_nd, group_norm, zero_module

ATTENTION_BACKENDS = ("sdpa", "xformers")


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a skip connection, optionally conditioned on an embedding.

    With ``embed_dim`` the block takes ``emb`` (N, embed_dim) and applies it as a per-channel scale
    and shift after the second normalisation (``scale_shift=True``, as in guided-diffusion) or adds
    it to the features (``scale_shift=False``).

    Args:
        spatial_dims: 2 or 3.
        in_channels, out_channels: channel counts; the skip is a 1x1 convolution when they differ.
        embed_dim: width of the conditioning embedding, or None for an unconditioned block.
        norm_num_groups: groups of each GroupNorm.
        dropout: dropout probability before the second convolution.
        zero_init: start the residual branch at zero (the block is the identity at initialisation).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int | None = None,
        embed_dim: int | None = None,
        norm_num_groups: int = 32,
        dropout: float = 0.0,
        scale_shift: bool = True,
        zero_init: bool = False,
    ):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"channel counts must be >= 1; got in {in_channels}, out {out_channels}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout}")
        self.norm1 = group_norm(in_channels, norm_num_groups)
        self.conv1 = conv_nd(spatial_dims, in_channels, out_channels, 3, padding=1)
        self.scale_shift = scale_shift
        self.emb_proj = (
            nn.Linear(embed_dim, out_channels * (2 if scale_shift else 1)) if embed_dim is not None else None
        )
        self.norm2 = group_norm(out_channels, norm_num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv_nd(spatial_dims, out_channels, out_channels, 3, padding=1)
        if zero_init:
            zero_module(self.conv2)
        self.skip = (
            nn.Identity()
            if in_channels == out_channels
            else conv_nd(spatial_dims, in_channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: (N, C_in, *spatial); ``emb``: (N, embed_dim) when the block has one."""
        if (emb is None) != (self.emb_proj is None):
            raise ValueError("ResBlock: pass emb exactly when the block was built with embed_dim")
        h = self.conv1(F.silu(self.norm1(x)))  # (N, C_out, *spatial)
        h = self.norm2(h)
        if self.emb_proj is not None:
            e = append_dims(self.emb_proj(F.silu(emb)), h.ndim)  # (N, C_out[*2], 1, ...)
            if self.scale_shift:
                scale, shift = e.chunk(2, dim=1)
                h = h * (1 + scale) + shift
            else:
                h = h + e
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all positions of an image or volume, with a skip connection.

    Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` (flash or
    memory-efficient kernels where the device has them); ``backend="xformers"`` uses xformers'
    memory-efficient attention instead, when it is installed.

    Args:
        spatial_dims: 2 or 3.
        channels: feature channels.
        num_head_channels: channels per head (``channels`` must be a multiple of it); None: one head.
        norm_num_groups: groups of the GroupNorm before attention.
        backend: ``sdpa`` or ``xformers``.
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        num_head_channels: int | None = None,
        norm_num_groups: int = 32,
        backend: str = "sdpa",
    ):
        super().__init__()
        head_channels = channels if num_head_channels is None else num_head_channels
        if head_channels < 1 or channels % head_channels:
            raise ValueError(
                f"channels ({channels}) must be a multiple of num_head_channels ({head_channels})"
            )
        self.num_heads = channels // head_channels
        self.norm = group_norm(channels, norm_num_groups)
        self.qkv = conv_nd(spatial_dims, channels, 3 * channels, 1)
        self.proj = zero_module(conv_nd(spatial_dims, channels, channels, 1))
        self.backend = "sdpa"
        self.set_backend(backend)

    def set_backend(self, backend: str) -> None:
        """Choose ``sdpa`` or ``xformers`` (the latter must be installed)."""
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}; got {backend!r}")
        if backend == "xformers" and importlib.util.find_spec("xformers") is None:
            raise ValueError(
                'attention backend "xformers" needs the xformers package: pip install "medfusion[xformers]"'
            )
        self.backend = backend

    def set_use_memory_efficient_attention_xformers(self, valid: bool, attention_op=None) -> None:
        """The hook diffusers' ``enable_xformers_memory_efficient_attention`` calls."""
        self.set_backend("xformers" if valid else "sdpa")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (N, C, *spatial). Returns the same shape."""
        n, c, *spatial = x.shape
        qkv = self.qkv(self.norm(x)).reshape(n, 3, self.num_heads, c // self.num_heads, -1)
        q, k, v = qkv.permute(1, 0, 2, 4, 3).unbind(0)  # each (N, heads, L, C/heads)
        if self.backend == "xformers":
            import xformers.ops

            h = xformers.ops.memory_efficient_attention(
                q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
            ).transpose(1, 2)  # xformers takes (N, L, heads, C/heads)
        else:
            h = F.scaled_dot_product_attention(q, k, v)  # (N, heads, L, C/heads)
        h = h.transpose(2, 3).reshape(n, c, *spatial)
        return x + self.proj(h)
