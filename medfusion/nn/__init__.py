"""Dimension-generic building blocks: every spatial layer takes ``spatial_dims`` (2 or 3) first."""

from medfusion.nn.blocks import ATTENTION_BACKENDS, AttentionBlock, ResBlock
from medfusion.nn.embeddings import ClassEmbedding, TimestepEmbedding
from medfusion.nn.layers import (
    SPATIAL_DIMS,
    Downsample,
    GroupNorm,
    Upsample,
    append_dims,
    avg_pool_nd,
    check_spatial_dims,
    conv_nd,
    group_norm,
    to_channels_last,
    zero_module,
)

__all__ = [
    "ATTENTION_BACKENDS",
    "SPATIAL_DIMS",
    "AttentionBlock",
    "ClassEmbedding",
    "Downsample",
    "GroupNorm",
    "ResBlock",
    "TimestepEmbedding",
    "Upsample",
    "append_dims",
    "avg_pool_nd",
    "check_spatial_dims",
    "conv_nd",
    "group_norm",
    "to_channels_last",
    "zero_module",
]
