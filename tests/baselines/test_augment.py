"""DiffAugment: policies, differentiability, determinism, translation and cutout."""

from __future__ import annotations

import pytest
import torch

from medfusion.baselines.augment import (
    AUTO_MAX_IMAGES,
    DEFAULT_POLICY,
    DiffAugment,
    _saturation,
    diff_augment,
    parse_policy,
    resolve_policy,
)


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("channels", [1, 3])
def test_gradients_reach_the_input(channels):
    x = torch.randn(3, channels, 16, 16, requires_grad=True)
    out = diff_augment(x, DEFAULT_POLICY, _seeded(0))
    assert out.shape == x.shape
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_no_gradient_reaches_the_cut_out_box():
    x = torch.randn(2, 1, 16, 16, requires_grad=True)
    out = diff_augment(x, "cutout", _seeded(0))
    out.sum().backward()
    assert torch.equal(x.grad == 0, out.detach() == 0)
    assert (x.grad == 0).any() and (x.grad == 1).any()


def test_deterministic_given_a_generator():
    x = torch.randn(4, 3, 16, 16)
    a = diff_augment(x, DEFAULT_POLICY, _seeded(1))
    b = diff_augment(x, DEFAULT_POLICY, _seeded(1))
    c = diff_augment(x, DEFAULT_POLICY, _seeded(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(DiffAugment(DEFAULT_POLICY)(x, _seeded(1)), a)


@pytest.mark.parametrize("spatial", [(16, 16), (16, 8), (8, 8, 8)])
def test_translation_moves_content_within_the_ratio(spatial):
    x = torch.zeros(8, 1, *spatial)
    centre = tuple(s // 2 for s in spatial)
    x[(slice(None), 0, *centre)] = 1.0
    out = diff_augment(x, "translation", _seeded(3))
    assert out.shape == x.shape
    max_shift = [int(s * 0.125 + 0.5) for s in spatial]
    for sample in out:
        (position,) = sample[0].nonzero().tolist()  # the one pixel, moved but not lost
        assert sample.sum() == 1.0
        assert all(abs(p - c) <= m for p, c, m in zip(position, centre, max_shift))
    moved = [tuple(s[0].nonzero()[0].tolist()) != centre for s in out]
    assert any(moved)


def test_translation_fills_with_zeros():
    out = diff_augment(torch.ones(16, 1, 16, 16), "translation", _seeded(4))
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    assert (out == 0).any()  # some sample is shifted, leaving a zero border
    border = (out == 0).flatten(1).sum(1)
    assert border.max() <= 16 * 16 - 14 * 14  # at most 2 rows and 2 columns


def test_cutout_zeroes_one_box():
    out = diff_augment(torch.ones(8, 2, 16, 16), "cutout", _seeded(5))
    for sample in out:
        assert torch.equal(sample[0], sample[1])  # the same box in every channel
        zero = sample[0] == 0
        rows, cols = zero.any(1), zero.any(0)
        assert 0 < zero.sum() <= 8 * 8
        assert torch.equal(zero, rows[:, None] & cols[None, :])  # a rectangle
        assert rows.sum() <= 8 and cols.sum() <= 8
        assert (sample[0][~zero] == 1).all()


def test_saturation_is_a_no_op_for_grey_images():
    grey = torch.randn(2, 1, 8, 8)
    assert _saturation(grey, _seeded(0)) is grey
    rgb = torch.randn(2, 3, 8, 8)
    assert not torch.allclose(_saturation(rgb, _seeded(0)), rgb)


def test_color_keeps_the_channel_mean_difference_structure():
    x = torch.randn(4, 3, 8, 8)
    out = diff_augment(x, "color", _seeded(6))
    # brightness, saturation and contrast are affine per sample: one scale per sample of x minus its mean
    centred_in = x - x.mean(dim=(1, 2, 3), keepdim=True)
    centred_out = out - out.mean(dim=(1, 2, 3), keepdim=True)
    grey_in = centred_in.mean(1)
    grey_out = centred_out.mean(1)
    scale = (grey_out * grey_in).sum((1, 2)) / grey_in.square().sum((1, 2))
    assert torch.allclose(grey_out, scale[:, None, None] * grey_in, atol=1e-5)
    assert ((scale > 0.5 - 1e-5) & (scale < 1.5 + 1e-5)).all()  # the contrast factor


@pytest.mark.parametrize("policy", [None, "", "none", "  none "])
def test_empty_policies_change_nothing(policy):
    x = torch.randn(2, 1, 8, 8)
    assert parse_policy(policy) == ()
    assert torch.equal(diff_augment(x, policy), x)


def test_policy_parsing():
    assert parse_policy("cutout, color") == ("cutout", "color")
    assert parse_policy(DEFAULT_POLICY) == ("color", "translation", "cutout")


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ("color,flip", "unknown operation 'flip'.*color, translation, cutout"),
        ("color,,cutout", "unknown operation ''"),
        ("color,color", r"\['color'\] appear more than once"),
        (3, "must be a string"),
    ],
)
def test_bad_policies_are_refused(policy, message):
    with pytest.raises(ValueError, match=message):
        parse_policy(policy)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match=r"\(N, C, \*spatial\)"):
        diff_augment(torch.randn(8, 8), "color")
    with pytest.raises(ValueError, match="cutout_ratio must be in"):
        diff_augment(torch.randn(1, 1, 8, 8), "cutout", cutout_ratio=1.5)


def test_auto_policy_follows_the_training_set_size():
    assert resolve_policy("auto", 100) == DEFAULT_POLICY
    assert resolve_policy("auto", AUTO_MAX_IMAGES - 1) == DEFAULT_POLICY
    assert resolve_policy("auto", AUTO_MAX_IMAGES) == ""
    assert resolve_policy("auto", None) == DEFAULT_POLICY
    assert resolve_policy(None, 10) == ""
    assert resolve_policy(" cutout ,color", 10**6) == "cutout,color"
    with pytest.raises(ValueError, match="num_train_images must be >= 0"):
        resolve_policy("auto", -1)
    with pytest.raises(ValueError, match="unknown operation 'auto2'"):
        resolve_policy("auto2", 10)
