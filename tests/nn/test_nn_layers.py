"""Dimension-generic factories and helpers of ``medfusion.nn.layers``, and the house rule that no
other module chooses ``Conv2d``/``Conv3d`` itself."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import medfusion
from medfusion.nn import (
    SPATIAL_DIMS,
    Downsample,
    Upsample,
    append_dims,
    avg_pool_nd,
    check_spatial_dims,
    conv_nd,
    group_norm,
    zero_module,
)

CONV = {2: nn.Conv2d, 3: nn.Conv3d}
POOL = {2: nn.AvgPool2d, 3: nn.AvgPool3d}
BAD_SPATIAL_DIMS = [0, 1, 4, "2"]


@pytest.mark.parametrize("spatial_dims", SPATIAL_DIMS)
def test_factories_pick_the_class_of_the_dimension(spatial_dims):
    assert check_spatial_dims(spatial_dims) == spatial_dims
    conv = conv_nd(spatial_dims, 4, 6, 3, stride=2, padding=1, bias=False)
    assert type(conv) is CONV[spatial_dims]
    assert (conv.in_channels, conv.out_channels, conv.bias) == (4, 6, None)
    assert conv.stride == (2,) * spatial_dims
    pool = avg_pool_nd(spatial_dims, kernel_size=2, stride=2)
    assert type(pool) is POOL[spatial_dims]
    assert pool(torch.ones(1, 4, *[8] * spatial_dims)).shape == (1, 4, *[4] * spatial_dims)


@pytest.mark.parametrize("spatial_dims", BAD_SPATIAL_DIMS)
@pytest.mark.parametrize("factory", [conv_nd, avg_pool_nd, Downsample, Upsample])
def test_factories_reject_other_spatial_dims(factory, spatial_dims):
    with pytest.raises(ValueError, match=f"spatial_dims must be 2 or 3; got {spatial_dims!r}"):
        factory(spatial_dims, 4, 4)
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        check_spatial_dims(spatial_dims)


def test_group_norm():
    norm = group_norm(8, 4)
    assert isinstance(norm, nn.GroupNorm)
    assert (norm.num_groups, norm.num_channels, norm.eps, norm.affine) == (4, 8, 1e-6, True)
    for groups in (3, 16, 0):
        with pytest.raises(ValueError, match=f"norm_num_groups={groups} must divide the channel count 8"):
            group_norm(8, groups)


def test_append_dims():
    x = torch.arange(3.0)
    assert append_dims(x, 1).shape == (3,)
    assert append_dims(x, 4).shape == (3, 1, 1, 1)
    assert append_dims(x, 5).shape == (3, 1, 1, 1, 1)
    torch.testing.assert_close(append_dims(x, 4).flatten(), x)
    images = torch.ones(3, 2, 4, 4)
    torch.testing.assert_close(images * append_dims(x, images.ndim), x.view(3, 1, 1, 1).expand(3, 2, 4, 4))
    with pytest.raises(ValueError, match="input has 2 dims, more than the target 1"):
        append_dims(torch.ones(3, 2), 1)


def test_zero_module():
    conv = conv_nd(3, 4, 4, 3)
    assert zero_module(conv) is conv
    assert all(torch.count_nonzero(p) == 0 for p in conv.parameters())
    assert conv(torch.randn(1, 4, 8, 8, 8)).abs().max() == 0


@pytest.mark.parametrize("spatial_dims", SPATIAL_DIMS)
@pytest.mark.parametrize("use_conv", [True, False])
def test_downsample_halves_every_axis(spatial_dims, use_conv):
    sizes = (8, 12, 16)[:spatial_dims]
    x = torch.randn(2, 4, *sizes)
    down = Downsample(spatial_dims, 4, use_conv=use_conv)
    assert down(x).shape == (2, 4, *(s // 2 for s in sizes))
    if use_conv:
        assert Downsample(spatial_dims, 4, 6)(x).shape == (2, 6, *(s // 2 for s in sizes))
    else:  # average pooling: each output voxel is the mean of a 2x2(x2) block
        first_block = x[(..., *[slice(0, 2)] * spatial_dims)].flatten(2).mean(dim=2)
        torch.testing.assert_close(down(x)[(..., *[0] * spatial_dims)], first_block)


@pytest.mark.parametrize("spatial_dims", SPATIAL_DIMS)
@pytest.mark.parametrize("use_conv", [True, False])
def test_upsample_doubles_every_axis(spatial_dims, use_conv):
    sizes = (4, 6, 8)[:spatial_dims]
    x = torch.randn(2, 4, *sizes)
    up = Upsample(spatial_dims, 4, use_conv=use_conv)
    assert up(x).shape == (2, 4, *(2 * s for s in sizes))
    if use_conv:
        assert Upsample(spatial_dims, 4, 6)(x).shape == (2, 6, *(2 * s for s in sizes))
    else:  # nearest neighbour: every voxel becomes a 2x2(x2) block
        torch.testing.assert_close(up(x)[(..., *[slice(None, None, 2)] * spatial_dims)], x)
        torch.testing.assert_close(up(x)[(..., *[slice(1, None, 2)] * spatial_dims)], x)


def test_resampling_without_conv_cannot_change_channels():
    with pytest.raises(ValueError, match="Downsample without convolution cannot change the channel count"):
        Downsample(2, 4, 8, use_conv=False)
    with pytest.raises(ValueError, match="Upsample without convolution cannot change the channel count"):
        Upsample(3, 4, 8, use_conv=False)


CONV_PATTERN = re.compile(r"nn\.Conv[23]d|Conv[23]d\(")


def test_conv_classes_are_chosen_only_in_medfusion_nn():
    """House rule: every spatial layer goes through ``medfusion.nn``'s factories."""
    package = Path(medfusion.__file__).parent
    sources = sorted(p for p in package.rglob("*.py") if p.relative_to(package).parts[0] != "nn")
    assert len(sources) > 10  # the scan really saw the package
    offenders = [
        f"{path.relative_to(package.parent)}:{number}: {line.strip()}"
        for path in sources
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if CONV_PATTERN.search(line)
    ]
    assert not offenders, "Conv2d/Conv3d outside medfusion/nn/:\n" + "\n".join(offenders)


def test_conv_pattern_catches_the_forbidden_spellings():
    for line in (
        "self.c = nn.Conv2d(1, 2, 3)",
        "torch.nn.Conv3d",
        "from torch.nn import Conv2d; Conv2d(1, 2, 3)",
    ):
        assert CONV_PATTERN.search(line), line
    assert not CONV_PATTERN.search("conv_nd(2, 1, 2, 3)")


def test_to_channels_last_handles_2d_and_3d_convolutions():
    from medfusion.nn import to_channels_last

    module = torch.nn.ModuleDict(
        {"c2": conv_nd(2, 3, 4, 3), "c3": conv_nd(3, 3, 4, 3), "norm": torch.nn.GroupNorm(2, 4)}
    )
    before = {k: v.clone() for k, v in module.state_dict().items()}
    parameters = list(module.parameters())
    assert to_channels_last(module) is module
    assert module["c2"].weight.is_contiguous(memory_format=torch.channels_last)
    assert module["c3"].weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert not module["c2"].weight.is_contiguous()
    assert all(a is b for a, b in zip(parameters, module.parameters()))  # same Parameter objects
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_group_norm_keeps_bf16_under_autocast_and_matches_float32():
    from medfusion.nn import GroupNorm

    torch.manual_seed(0)
    norm = group_norm(16, 4)
    assert isinstance(norm, GroupNorm) and isinstance(norm, nn.GroupNorm)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 16, 4, 4, 4) * 3 + 1
    reference = nn.functional.group_norm(x, 4, norm.weight, norm.bias, norm.eps)
    assert torch.equal(norm(x), reference)  # float32 without autocast: plain GroupNorm
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = norm(x.bfloat16())
        assert norm(x).dtype == torch.float32  # a float32 input is normalised in float32
    assert low.dtype == torch.bfloat16
    assert torch.allclose(low.float(), reference, atol=0.05, rtol=0.02)
    low.float().sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.dtype == torch.float32
