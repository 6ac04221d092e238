"""Dimension-generic layers: the only place where ``Conv2d``/``Conv3d`` and friends are chosen.

Every factory takes ``spatial_dims`` (2 or 3) first, so that a model written once runs on images
``(N, C, H, W)`` and volumes ``(N, C, D, H, W)`` alike. In 3D every axis is resampled alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SPATIAL_DIMS = (2, 3)


def check_spatial_dims(spatial_dims: int) -> int:
    """Return ``spatial_dims`` if it is 2 or 3; otherwise raise ``ValueError``."""
    if spatial_dims not in SPATIAL_DIMS:
        raise ValueError(f"spatial_dims must be 2 or 3; got {spatial_dims!r}")
    return spatial_dims


def conv_nd(spatial_dims: int, *args, **kwargs) -> nn.Module:
    """``nn.Conv2d`` or ``nn.Conv3d`` with the given arguments."""
    return (nn.Conv2d, nn.Conv3d)[check_spatial_dims(spatial_dims) - 2](*args, **kwargs)


def avg_pool_nd(spatial_dims: int, *args, **kwargs) -> nn.Module:
    """``nn.AvgPool2d`` or ``nn.AvgPool3d`` with the given arguments."""
    return (nn.AvgPool2d, nn.AvgPool3d)[check_spatial_dims(spatial_dims) - 2](*args, **kwargs)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` whose output keeps a bf16/fp16 input's dtype under autocast.

    Autocast runs ``group_norm`` in float32, so every normalised activation is materialised in
    float32: twice the memory and traffic of the bf16 convolutions around it (the largest
    tensors of a 3D U-Net). The kernel accumulates its statistics in float32 either way, so this
    keeps the low precision only for the stored input and output. Without autocast, or for float32
    inputs, it is ``nn.GroupNorm``; weights and state dicts are the same.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                weight = self.weight.to(x.dtype) if self.weight is not None else None
                bias = self.bias.to(x.dtype) if self.bias is not None else None
                return F.group_norm(x, self.num_groups, weight, bias, self.eps)
        return super().forward(x)


def group_norm(channels: int, num_groups: int = 32, eps: float = 1e-6) -> GroupNorm:
    """:class:`GroupNorm` over ``channels``; ``num_groups`` must divide ``channels``."""
    if num_groups < 1 or channels % num_groups:
        raise ValueError(f"norm_num_groups={num_groups} must divide the channel count {channels}")
    return GroupNorm(num_groups, channels, eps=eps, affine=True)


def append_dims(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton axes to ``x`` until it has ``ndim`` axes (per-sample broadcast)."""
    missing = ndim - x.ndim
    if missing < 0:
        raise ValueError(f"input has {x.ndim} dims, more than the target {ndim}")
    return x[(...,) + (None,) * missing]


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero and return it (residual branches start as identity)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Downsample(nn.Module):
    """Halve every spatial axis: a strided 3-wide convolution, or average pooling."""

    def __init__(self, spatial_dims: int, channels: int, out_channels: int | None = None, use_conv=True):
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        if use_conv:
            self.op = conv_nd(spatial_dims, channels, out_channels, 3, stride=2, padding=1)
        elif out_channels == channels:
            self.op = avg_pool_nd(spatial_dims, kernel_size=2, stride=2)
        else:
            raise ValueError("Downsample without convolution cannot change the channel count")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)  # (N, C', *spatial/2)


class Upsample(nn.Module):
    """Double every spatial axis: nearest-neighbour interpolation followed by a 3-wide convolution."""

    def __init__(self, spatial_dims: int, channels: int, out_channels: int | None = None, use_conv=True):
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        if not use_conv and out_channels != channels:
            raise ValueError("Upsample without convolution cannot change the channel count")
        self.conv = conv_nd(spatial_dims, channels, out_channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (N, C, *spatial*2)
        return self.conv(h) if self.conv is not None else h


def to_channels_last(module: nn.Module) -> nn.Module:
    """Store every 4D/5D parameter (convolution weights) channels-last, in place; returns ``module``.

    ``module.to(memory_format=torch.channels_last)`` fails on 3D convolutions (5D weights need
    ``channels_last_3d``); this handles both.
    """
    for parameter in module.parameters():
        if parameter.ndim in (4, 5):
            memory_format = torch.channels_last if parameter.ndim == 4 else torch.channels_last_3d
            parameter.data = parameter.data.contiguous(memory_format=memory_format)
    return module
