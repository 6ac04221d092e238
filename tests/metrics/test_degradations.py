"""Tests of the known degradations used to calibrate a yardstick, on small 2D (N, C, H, W) and 3D
(N, C, D, H, W) images: shape, dtype and range of every degradation; the Gaussian blur's constancy,
mass, spread and smoothing; the matched noise's statistics and independence of the content; the
patch shuffle as a permutation of whole patches per image; and the inversion as a mirror of each
image's own range."""

import pytest
import torch

from medfusion.metrics.degradations import (
    DEGRADATIONS,
    gaussian_blur,
    inversion,
    matched_noise,
    patch_shuffle,
)

# small multi-channel images: 2D 24x20 (3x2 patches of 8, a 4-pixel margin), 3D 8x8x10 (2x2x2 of 4)
SHAPES = {2: (2, 3, 24, 20), 3: (2, 2, 8, 8, 10)}


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _uniform(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Independent uniform values in [-1, 1], with the bounds themselves present in every image."""
    x = torch.rand(shape, generator=_generator(seed)) * 2 - 1
    flat = x.flatten(2)
    flat[..., 0], flat[..., -1] = -1.0, 1.0
    return flat.reshape(shape)


def _smooth(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random images in [-1, 1] with structure at a few pixels' scale: noise upsampled 4x."""
    coarse = torch.rand(shape[0], shape[1], *(s // 4 for s in shape[2:]), generator=_generator(seed))
    mode = "bilinear" if len(shape) == 4 else "trilinear"
    return torch.nn.functional.interpolate(coarse, size=shape[2:], mode=mode) * 2 - 1


def _patches(x: torch.Tensor, patch: int) -> torch.Tensor:
    """The whole patches of each image, all channels together: (N, patches, C * patch^dims)."""
    dims = x.ndim - 2
    for axis in range(2, x.ndim):
        x = x.unfold(axis, patch, patch)  # (N, C, n1, ..., p1, ...) once all axes are unfolded
    n, c = x.shape[:2]
    counts = x.shape[2 : 2 + dims]
    order = [0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims)]
    return x.permute(order).reshape(n, int(torch.tensor(counts).prod()), c * patch**dims)


def _sorted_patches(x: torch.Tensor, patch: int) -> list[list[tuple[float, ...]]]:
    """The multiset of whole patches of each image, as a sorted list of tuples."""
    return [sorted(tuple(row.tolist()) for row in image) for image in _patches(x, patch)]


def _mean_abs_difference(x: torch.Tensor) -> float:
    """Mean absolute finite difference along every spatial axis (large for rough images)."""
    return sum(float(x.diff(dim=axis).abs().mean()) for axis in range(2, x.ndim))


def test_degradation_names():
    assert [d.name for d in DEGRADATIONS] == ["blur_1", "blur_2", "noise", "shuffle", "inversion", "copies"]
    assert all(d.description for d in DEGRADATIONS)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("degradation", DEGRADATIONS, ids=lambda d: d.name)
def test_degradation_keeps_shape_dtype_and_range(degradation, spatial_dims):
    """Every degradation returns multi-channel images of the input's shape and dtype in [-1, 1]."""
    x = _uniform(SHAPES[spatial_dims])
    out = degradation.apply(x, _generator())
    assert out.shape == x.shape
    assert out.dtype == x.dtype
    assert torch.isfinite(out).all()
    assert out.min() >= -1 and out.max() <= 1


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("degradation", DEGRADATIONS, ids=lambda d: d.name)
def test_degradation_is_reproducible(degradation, spatial_dims):
    """The same generator seed gives the same output, and the input is left unchanged."""
    x = _smooth(SHAPES[spatial_dims])
    before = x.clone()
    first = degradation.apply(x, _generator(3))
    second = degradation.apply(x, _generator(3))
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(x, before, rtol=0, atol=0)


# --- gaussian_blur


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_blur_keeps_a_constant_image(spatial_dims, sigma):
    x = torch.full(SHAPES[spatial_dims], 0.37)
    torch.testing.assert_close(gaussian_blur(x, sigma), x, rtol=0, atol=1e-6)


@pytest.mark.parametrize("sigma", [1.0, 2.0])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_blur_of_an_impulse_keeps_its_mass_and_spreads_by_sigma(spatial_dims, sigma):
    """An interior impulse (its window clear of the edges) sums to 1 after the blur, centred where it
    was, with a second moment of sigma^2 along every axis (~1% less: the window stops at 3 sigma)."""
    side = 17
    x = torch.zeros(1, 1, *[side] * spatial_dims)
    centre = side // 2
    x[(0, 0, *[centre] * spatial_dims)] = 1.0
    out = gaussian_blur(x, sigma)[0, 0].double()
    assert float(out.sum()) == pytest.approx(1.0, abs=1e-5)
    assert out.argmax() == x[0, 0].argmax()
    offsets = torch.arange(side, dtype=torch.float64) - centre
    for axis in range(spatial_dims):
        others = [a for a in range(spatial_dims) if a != axis]
        profile = out.sum(dim=others) if others else out
        assert float((profile * offsets).sum()) == pytest.approx(0.0, abs=1e-6)
        assert float((profile * offsets**2).sum()) == pytest.approx(sigma**2, rel=0.04)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_larger_sigma_smooths_more(spatial_dims):
    x = _uniform((1, 2, *[16] * spatial_dims))
    rough = _mean_abs_difference(x)
    blur_1 = _mean_abs_difference(gaussian_blur(x, 1.0))
    blur_2 = _mean_abs_difference(gaussian_blur(x, 2.0))
    assert blur_2 < 0.7 * blur_1 < 0.7 * 0.5 * rough


def test_blur_does_not_mix_images_or_channels():
    """Each image and channel is blurred on its own: zero images stay zero beside a noisy one."""
    x = torch.zeros(2, 2, 12, 12)
    x[1, 0] = _uniform((1, 1, 12, 12))[0, 0]
    out = gaussian_blur(x, 1.0)
    assert out[1, 0].abs().sum() > 0
    assert out[0].abs().max() == 0 and out[1, 1].abs().max() == 0


def test_blur_with_a_window_wider_than_the_image():
    """8x8 with sigma 2 (radius 6) reflects; the result is smooth and the mean stays close."""
    x = _uniform((1, 1, 8, 8))
    out = gaussian_blur(x, 2.0)
    assert out.shape == x.shape
    assert _mean_abs_difference(out) < 0.3 * _mean_abs_difference(x)
    assert out.min() >= x.min() and out.max() <= x.max()


@pytest.mark.parametrize("shape", [(1, 1, 3, 16), (1, 2, 3, 3), (1, 1, 3, 8, 8)], ids=str)
def test_blur_on_a_side_shorter_than_the_window_radius(shape):
    """A 3-pixel side with sigma 2 (radius 6) falls back to replicated edges: constants stay
    constant, and a ramp is averaged within its own range."""
    torch.testing.assert_close(gaussian_blur(torch.full(shape, -0.6), 2.0), torch.full(shape, -0.6))
    x = _uniform(shape)
    out = gaussian_blur(x, 2.0)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert out.min() >= x.min() - 1e-6 and out.max() <= x.max() + 1e-6
    assert _mean_abs_difference(out) < _mean_abs_difference(x)


def test_blur_keeps_half_precision():
    x = _smooth((1, 1, 16, 16)).half()
    out = gaussian_blur(x, 1.0)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), gaussian_blur(x.float(), 1.0), rtol=0, atol=2e-3)


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan")])
def test_blur_rejects_non_positive_sigma(sigma):
    with pytest.raises(ValueError, match="sigma"):
        gaussian_blur(torch.zeros(1, 1, 8, 8), sigma)


# --- matched_noise


def _two_channel_images(spatial_shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Two images of two channels with different means and spreads, all well inside [-1, 1]."""
    smooth = _smooth((2, 2, *spatial_shape), seed)  # in [-1, 1]
    mean = torch.tensor([[0.3, -0.2], [0.0, 0.1]]).view(2, 2, *[1] * len(spatial_shape))
    spread = torch.tensor([[0.1, 0.2], [0.15, 0.05]]).view(2, 2, *[1] * len(spatial_shape))
    return mean + spread * smooth


@pytest.mark.parametrize("spatial_shape", [(64, 64), (16, 16, 16)], ids=str)
def test_noise_matches_mean_and_std_per_image_and_channel(spatial_shape):
    x = _two_channel_images(spatial_shape)
    out = matched_noise(x, _generator())
    torch.testing.assert_close(out.flatten(2).mean(-1), x.flatten(2).mean(-1), rtol=0, atol=0.01)
    torch.testing.assert_close(out.flatten(2).std(-1), x.flatten(2).std(-1), rtol=0.05, atol=0)


@pytest.mark.parametrize("spatial_shape", [(64, 64), (16, 16, 16)], ids=str)
def test_noise_is_uncorrelated_with_the_input(spatial_shape):
    x = _two_channel_images(spatial_shape)
    out = matched_noise(x, _generator())
    for image, noise in zip(x.flatten(2).flatten(0, 1), out.flatten(2).flatten(0, 1)):
        correlation = torch.corrcoef(torch.stack([image, noise]))[0, 1]
        assert abs(float(correlation)) < 0.1


def test_noise_is_not_smooth():
    """The noise is independent from pixel to pixel: neighbours are uncorrelated, unlike the input's."""
    x = _two_channel_images((64, 64))
    out = matched_noise(x, _generator())
    for image, noise in zip(x.flatten(0, 1), out.flatten(0, 1)):
        smooth = torch.corrcoef(torch.stack([image[:, :-1].flatten(), image[:, 1:].flatten()]))[0, 1]
        rough = torch.corrcoef(torch.stack([noise[:, :-1].flatten(), noise[:, 1:].flatten()]))[0, 1]
        assert float(smooth) > 0.5 and abs(float(rough)) < 0.1


def test_noise_depends_on_the_seed():
    x = _two_channel_images((16, 16))
    same = matched_noise(x, _generator(1)), matched_noise(x, _generator(1))
    torch.testing.assert_close(*same, rtol=0, atol=0)
    other = matched_noise(x, _generator(2))
    assert not torch.equal(same[0], other)


def test_noise_is_clipped_to_the_range():
    """An image spread over the whole range gives noise that would overshoot, clipped to [-1, 1]."""
    x = torch.sign(torch.randn(1, 1, 32, 32, generator=_generator()))
    out = matched_noise(x, _generator())
    assert out.min() == -1 and out.max() == 1


# --- patch_shuffle


@pytest.mark.parametrize(("spatial_dims", "patch"), [(2, 8), (3, 4)])
def test_shuffle_keeps_the_multiset_of_patches(spatial_dims, patch):
    """With the default patch (8 in 2D, 4 in 3D), each image holds the same patches, channels together."""
    x = _uniform(SHAPES[spatial_dims])
    out = patch_shuffle(x, _generator())
    assert _sorted_patches(out, patch) == _sorted_patches(x, patch)
    assert not torch.equal(out, x)


def test_shuffle_leaves_the_margin_alone():
    """A 20x20 image holds 2x2 whole 8-wide patches; the 4-pixel margin right and below stays put."""
    x = _uniform((2, 2, 20, 20))
    out = patch_shuffle(x, _generator())
    torch.testing.assert_close(out[..., 16:, :], x[..., 16:, :], rtol=0, atol=0)
    torch.testing.assert_close(out[..., :, 16:], x[..., :, 16:], rtol=0, atol=0)
    assert not torch.equal(out[..., :16, :16], x[..., :16, :16])
    assert _sorted_patches(out[..., :16, :16], 8) == _sorted_patches(x[..., :16, :16], 8)


def test_shuffle_leaves_the_margin_alone_in_3d():
    x = _uniform((1, 1, 9, 8, 10))  # 2x2x2 whole 4-wide patches; margins of 1 and 2 voxels
    out = patch_shuffle(x, _generator())
    torch.testing.assert_close(out[:, :, 8:], x[:, :, 8:], rtol=0, atol=0)
    torch.testing.assert_close(out[..., 8:], x[..., 8:], rtol=0, atol=0)
    assert not torch.equal(out, x)


def test_shuffle_moves_whole_patches():
    """Every 8x8 patch of the output is one of the input's patches, not a mix of them."""
    x = _uniform((1, 1, 32, 32))
    out = patch_shuffle(x, _generator())
    inputs = {tuple(row.tolist()) for row in _patches(x, 8)[0]}
    outputs = [tuple(row.tolist()) for row in _patches(out, 8)[0]]
    assert all(row in inputs for row in outputs)
    moved = sum(a != b for a, b in zip(outputs, (tuple(row.tolist()) for row in _patches(x, 8)[0])))
    assert moved >= 2  # a permutation moves at least two patches, or none


def test_shuffle_with_an_explicit_patch():
    x = _uniform((1, 2, 16, 12))
    out = patch_shuffle(x, _generator(), patch=4)
    assert _sorted_patches(out, 4) == _sorted_patches(x, 4)
    assert not torch.equal(out, x)


def test_shuffle_orders_each_image_differently():
    """A batch of identical images: each gets its own order of its 16 patches."""
    x = _uniform((1, 1, 32, 32)).repeat(4, 1, 1, 1)
    out = patch_shuffle(x, _generator())
    for i in range(4):
        assert _sorted_patches(out[i : i + 1], 8) == _sorted_patches(x[:1], 8)
        for j in range(i):
            assert not torch.equal(out[i], out[j])


@pytest.mark.parametrize("spatial_shape", [(24, 16), (8, 8, 12)], ids=str)
def test_shuffle_moves_all_channels_together(spatial_shape):
    x = _uniform((2, 1, *spatial_shape)) * 0.5
    x = torch.cat([x, x * 2, -x], dim=1)
    out = patch_shuffle(x, _generator())
    assert not torch.equal(out, x)
    torch.testing.assert_close(out[:, 1], out[:, 0] * 2, rtol=0, atol=0)
    torch.testing.assert_close(out[:, 2], -out[:, 0], rtol=0, atol=0)


def test_shuffle_is_reproducible_and_depends_on_the_seed():
    x = _uniform((1, 1, 32, 32))
    torch.testing.assert_close(patch_shuffle(x, _generator(5)), patch_shuffle(x, _generator(5)))
    assert not torch.equal(patch_shuffle(x, _generator(5)), patch_shuffle(x, _generator(6)))


@pytest.mark.parametrize(
    ("shape", "patch"),
    [
        ((1, 1, 8, 8), None),  # one whole 8x8 patch
        ((1, 1, 15, 15), None),  # still one
        ((1, 1, 7, 64), None),  # no whole patch along the first axis
        ((1, 1, 4, 4, 4), None),  # one 4x4x4 cube
        ((1, 1, 3, 16, 16), None),  # no whole cube along depth
        ((1, 1, 16, 16), 16),  # one patch of an explicit size
    ],
    ids=str,
)
def test_shuffle_rejects_images_with_fewer_than_two_patches(shape, patch):
    with pytest.raises(ValueError, match="fewer than two"):
        patch_shuffle(torch.zeros(shape), _generator(), patch=patch)


def test_shuffle_accepts_exactly_two_patches():
    x = _uniform((1, 1, 8, 16))
    out = patch_shuffle(x, _generator())
    assert _sorted_patches(out, 8) == _sorted_patches(x, 8)


# --- inversion


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_inversion_twice_gives_the_input_back(spatial_dims):
    x = _smooth(SHAPES[spatial_dims])
    torch.testing.assert_close(inversion(inversion(x)), x, rtol=0, atol=1e-6)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_inversion_keeps_each_images_range(spatial_dims):
    x = _smooth(SHAPES[spatial_dims])
    x = x * torch.linspace(0.3, 1.0, x.shape[1]).view(1, -1, *[1] * spatial_dims)  # ranges per channel
    out = inversion(x)
    torch.testing.assert_close(out.flatten(2).amin(-1), x.flatten(2).amin(-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.flatten(2).amax(-1), x.flatten(2).amax(-1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_inversion_reverses_the_order_of_intensities(spatial_dims):
    x = _smooth(SHAPES[spatial_dims])
    out = inversion(x)
    flat_x, flat_out = x.flatten(2), out.flatten(2)
    torch.testing.assert_close(flat_out.argmin(-1), flat_x.argmax(-1))
    torch.testing.assert_close(flat_out.argmax(-1), flat_x.argmin(-1))
    # pairwise: where x rises, the inversion falls by as much
    torch.testing.assert_close(flat_out.diff(dim=-1), -flat_x.diff(dim=-1), rtol=0, atol=1e-6)


def test_inversion_is_the_mirror_within_the_range():
    x = torch.tensor([[[[-0.5, 0.0], [0.25, 0.75]]], [[[-1.0, 1.0], [0.0, 0.5]]]])
    expected = torch.tensor([[[[0.75, 0.25], [0.0, -0.5]]], [[[1.0, -1.0], [0.0, -0.5]]]])
    torch.testing.assert_close(inversion(x), expected, rtol=0, atol=0)
