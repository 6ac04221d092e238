"""Residual and attention blocks and the timestep/class embeddings of ``medfusion.nn``."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from torch import nn

from medfusion.nn import (
    ATTENTION_BACKENDS,
    SPATIAL_DIMS,
    AttentionBlock,
    ClassEmbedding,
    ResBlock,
    TimestepEmbedding,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def volume(spatial_dims: int, channels: int = 4, n: int = 2) -> torch.Tensor:
    return torch.randn(n, channels, *(8, 6, 4)[:spatial_dims])


def randomize(module: nn.Module) -> nn.Module:
    """Non-zero random parameters everywhere (zero-initialised layers included)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.5)
    return module


# ResBlock


@pytest.mark.parametrize("spatial_dims", SPATIAL_DIMS)
@pytest.mark.parametrize("out_channels", [None, 4, 8])
def test_resblock_shape_and_skip(spatial_dims, out_channels):
    block = ResBlock(spatial_dims, 4, out_channels, norm_num_groups=2)
    x = volume(spatial_dims)
    y = block(x)
    assert y.shape == (2, out_channels or 4, *x.shape[2:])
    if out_channels in (None, 4):
        assert isinstance(block.skip, nn.Identity)
    else:
        assert block.skip.kernel_size == (1,) * spatial_dims


@pytest.mark.parametrize("spatial_dims", SPATIAL_DIMS)
@pytest.mark.parametrize("scale_shift", [True, False])
def test_resblock_with_embedding(spatial_dims, scale_shift):
    block = ResBlock(spatial_dims, 4, 8, embed_dim=6, norm_num_groups=2, scale_shift=scale_shift)
    assert block.emb_proj.out_features == (16 if scale_shift else 8)
    x, emb = volume(spatial_dims), torch.randn(2, 6)
    y = block(x, emb)
    assert y.shape == (2, 8, *x.shape[2:])
    assert not torch.allclose(y, block(x, 2 * emb + 1))  # the embedding changes the output
    y.square().mean().backward()
    assert block.emb_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("scale_shift", [True, False])
def test_resblock_embedding_is_applied_as_documented(scale_shift):
    """Scale/shift (or add) the normalised features per sample and channel, by hand."""
    block = randomize(ResBlock(2, 4, 4, embed_dim=3, norm_num_groups=2, scale_shift=scale_shift))
    x, emb = volume(2), torch.randn(2, 3)
    h = block.norm2(block.conv1(nn.functional.silu(block.norm1(x))))
    e = block.emb_proj(nn.functional.silu(emb))[:, :, None, None]
    h = h * (1 + e[:, :4]) + e[:, 4:] if scale_shift else h + e
    expected = x + block.conv2(nn.functional.silu(h))
    torch.testing.assert_close(block(x, emb), expected)


@pytest.mark.parametrize("spatial_dims", SPATIAL_DIMS)
@pytest.mark.parametrize("embed_dim", [None, 6])
def test_resblock_zero_init_is_identity(spatial_dims, embed_dim):
    block = ResBlock(spatial_dims, 4, embed_dim=embed_dim, norm_num_groups=2, zero_init=True)
    assert all(torch.count_nonzero(p) == 0 for p in block.conv2.parameters())
    x = volume(spatial_dims)
    emb = None if embed_dim is None else torch.randn(2, embed_dim)
    torch.testing.assert_close(block(x, emb), x, rtol=0, atol=0)
    # without zero_init the residual branch is not zero
    assert not torch.allclose(ResBlock(spatial_dims, 4, embed_dim=embed_dim, norm_num_groups=2)(x, emb), x)


def test_resblock_embedding_mismatch_and_bad_dropout():
    message = "pass emb exactly when the block was built with embed_dim"
    with pytest.raises(ValueError, match=message):
        ResBlock(2, 4, embed_dim=6, norm_num_groups=2)(volume(2))
    with pytest.raises(ValueError, match=message):
        ResBlock(2, 4, norm_num_groups=2)(volume(2), torch.randn(2, 6))
    for dropout in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
            ResBlock(2, 4, norm_num_groups=2, dropout=dropout)
    with pytest.raises(ValueError, match="norm_num_groups=3 must divide the channel count 4"):
        ResBlock(2, 4, norm_num_groups=3)
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        ResBlock(1, 4, norm_num_groups=2)


# AttentionBlock


def naive_attention(block: AttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V per head, written out with the block's norm, qkv and proj weights."""
    n, c, *spatial = x.shape
    heads, d = block.num_heads, c // block.num_heads
    g = block.norm.num_groups
    grouped = x.reshape(n, g, -1)
    mean = grouped.mean(dim=2, keepdim=True)
    var = grouped.var(dim=2, unbiased=False, keepdim=True)
    h = ((grouped - mean) / torch.sqrt(var + block.norm.eps)).reshape(n, c, -1)  # (N, C, L)
    h = h * block.norm.weight[:, None] + block.norm.bias[:, None]
    qkv = torch.einsum("oc,ncl->nol", block.qkv.weight.reshape(3 * c, c), h) + block.qkv.bias[:, None]
    q, k, v = qkv.split(c, dim=1)  # each (N, C, L); head i owns channels [i*d, (i+1)*d)
    outputs = []
    for i in range(heads):
        qi, ki, vi = (t[:, i * d : (i + 1) * d] for t in (q, k, v))  # (N, d, L)
        weights = torch.softmax(torch.einsum("ndq,ndk->nqk", qi, ki) / math.sqrt(d), dim=-1)  # (N, L, L)
        outputs.append(torch.einsum("nqk,ndk->ndq", weights, vi))  # (N, d, L)
    a = torch.cat(outputs, dim=1)  # (N, C, L)
    out = torch.einsum("oc,ncl->nol", block.proj.weight.reshape(c, c), a) + block.proj.bias[:, None]
    return x + out.reshape(n, c, *spatial)


@pytest.mark.parametrize("spatial_dims", SPATIAL_DIMS)
@pytest.mark.parametrize("num_head_channels", [None, 4])
def test_attention_matches_naive_computation(spatial_dims, num_head_channels):
    block = AttentionBlock(spatial_dims, 8, num_head_channels=num_head_channels, norm_num_groups=4)
    assert block.num_heads == (1 if num_head_channels is None else 2)
    randomize(block)
    assert torch.count_nonzero(block.proj.weight) > 0
    x = volume(spatial_dims, channels=8)
    y = block(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, naive_attention(block, x), rtol=1e-4, atol=1e-5)


def test_attention_comparison_is_sensitive_to_the_head_split():
    """The same weights run as one head give another result, so the comparison above has teeth."""
    block = randomize(AttentionBlock(2, 8, num_head_channels=4, norm_num_groups=4))
    x = volume(2, channels=8)
    two_heads = naive_attention(block, x)
    block.num_heads = 1
    assert not torch.allclose(block(x), two_heads, atol=1e-3)
    torch.testing.assert_close(block(x), naive_attention(block, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spatial_dims", SPATIAL_DIMS)
def test_attention_starts_as_identity(spatial_dims):
    block = AttentionBlock(spatial_dims, 8, norm_num_groups=4)
    x = volume(spatial_dims, channels=8)
    torch.testing.assert_close(block(x), x, rtol=0, atol=0)


def test_attention_errors():
    assert ATTENTION_BACKENDS == ("sdpa", "xformers")
    with pytest.raises(ValueError, match=r"channels \(8\) must be a multiple of num_head_channels \(3\)"):
        AttentionBlock(2, 8, num_head_channels=3, norm_num_groups=4)
    with pytest.raises(
        ValueError, match=r"attention backend must be one of \('sdpa', 'xformers'\); got 'flash'"
    ):
        AttentionBlock(2, 8, norm_num_groups=4, backend="flash")
    block = AttentionBlock(3, 8, norm_num_groups=4)
    with pytest.raises(ValueError, match="attention backend must be one of"):
        block.set_backend("math")
    assert block.backend == "sdpa"


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed")
def test_xformers_backend_needs_the_extra():
    with pytest.raises(ValueError, match=r"medfusion\[xformers\]"):
        AttentionBlock(2, 8, norm_num_groups=4, backend="xformers")
    block = AttentionBlock(2, 8, norm_num_groups=4)
    with pytest.raises(ValueError, match=r"medfusion\[xformers\]"):
        block.set_use_memory_efficient_attention_xformers(True)
    assert block.backend == "sdpa"
    block.set_use_memory_efficient_attention_xformers(False)
    assert block.backend == "sdpa"


# Embeddings


def test_timestep_embedding():
    embed = TimestepEmbedding(8, 16)
    out = embed(torch.tensor([0, 10, 999]))
    assert out.shape == (3, 16) and out.dtype == torch.float32
    torch.testing.assert_close(embed(torch.tensor([0.0, 10.0, 999.0])), out)
    assert not torch.allclose(out[0], out[1])
    for channels in (7, 1, 0):
        with pytest.raises(
            ValueError, match=f"timestep channels must be an even number >= 2; got {channels}"
        ):
            TimestepEmbedding(channels, 16)
    for bad in (torch.tensor(5), torch.zeros(2, 1)):
        with pytest.raises(ValueError, match=r"timesteps must have shape \(N,\)"):
            embed(bad)


def test_class_embedding():
    embed = ClassEmbedding(3, 8)
    assert embed.null_class == embed.num_classes == 3
    assert embed.embedding.num_embeddings == 4  # three classes and the null class
    labels = torch.tensor([0, 2, embed.null_class])
    out = embed(labels)
    assert out.shape == (3, 8)
    torch.testing.assert_close(out[2], embed.embedding.weight[3])
    for num_classes in (0, -1):
        with pytest.raises(ValueError, match=f"num_classes must be >= 1; got {num_classes}"):
            ClassEmbedding(num_classes, 8)
    with pytest.raises(ValueError, match=r"class labels must have shape \(N,\); got \(3, 1\)"):
        embed(labels[:, None])
