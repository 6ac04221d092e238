"""Tests of medfusion.data.transforms and build_transform (2D and 3D)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medfusion.config import DataConfig
from medfusion.data.dataset import build_transform
from medfusion.data.image import MedicalImage
from medfusion.data.transforms import (
    Compose,
    CropOrPad,
    NormalizeIntensity,
    RandomFlip,
    Resample,
    Resize,
    as_float_tensor,
)

DIMS = pytest.mark.parametrize("spatial_dims", [2, 3])


def make_image(array, spacing=None, origin=None, direction=None, modality: str = "") -> MedicalImage:
    image = MedicalImage.from_array(array, spacing=spacing, origin=origin, direction=direction)
    return image.replace(modality=modality) if modality else image


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def as_numpy(image: MedicalImage) -> np.ndarray:
    array = image.array
    return array.numpy() if isinstance(array, torch.Tensor) else np.asarray(array)


def random_array(spatial_dims: int, size: int = 8, channels: int = 1, dtype=np.float32, seed: int = 0):
    gen = np.random.default_rng(seed)
    shape = (channels,) + (size,) * spatial_dims
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return gen.integers(info.min, int(info.max) + 1, size=shape, dtype=dtype)
    return gen.normal(size=shape).astype(dtype)


# --------------------------------------------------------------------------------------------------
# NormalizeIntensity
# --------------------------------------------------------------------------------------------------


@DIMS
@pytest.mark.parametrize(
    ("mode", "dtype"),
    [
        ("percentile", np.float32),
        ("percentile", np.uint16),
        ("window", np.int16),
        ("dtype", np.uint8),
        ("dtype", np.uint16),
        ("dtype", np.int16),
        ("minmax", np.float32),
        ("minmax", np.int16),
        ("auto", np.uint8),
        ("auto", np.uint16),
        ("auto", np.float32),
    ],
)
def test_normalize_output_float32_tensor_in_range(spatial_dims, mode, dtype):
    array = random_array(spatial_dims, dtype=dtype)
    if dtype == np.float32:
        array = array * 500.0
    out = NormalizeIntensity(mode)(make_image(array), rng())
    assert isinstance(out.array, torch.Tensor)
    assert out.array.dtype == torch.float32
    assert tuple(out.array.shape) == array.shape
    values = out.array
    assert torch.isfinite(values).all()
    assert values.min() >= -1.0 and values.max() <= 1.0
    # not a degenerate output: the range is actually used
    assert values.max() - values.min() > 1.0


@DIMS
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_normalize_dtype_maps_full_integer_range_exactly(spatial_dims, dtype):
    info = np.iinfo(dtype)
    array = np.zeros((1,) + (8,) * spatial_dims, dtype=dtype)
    flat = array.reshape(-1)
    flat[0] = info.max
    flat[1] = info.max // 2
    flat[2] = 0
    # only a small part of the range is used by the other voxels: must not matter for ``dtype``
    flat[3:] = 3
    out = as_numpy(NormalizeIntensity("dtype")(make_image(array), rng())).reshape(-1)
    assert out[0] == 1.0
    assert out[2] == -1.0
    assert out[1] == pytest.approx(2.0 * (info.max // 2) / info.max - 1.0, abs=1e-6)
    assert out[3] == pytest.approx(2.0 * 3 / info.max - 1.0, abs=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_normalize_dtype_on_float_data_raises(dtype):
    array = random_array(2, dtype=dtype)
    with pytest.raises(ValueError, match="dtype"):
        NormalizeIntensity("dtype")(make_image(array), rng())


def test_normalize_dtype_on_float_tensor_raises():
    array = torch.from_numpy(random_array(3))
    with pytest.raises(ValueError, match="dtype"):
        NormalizeIntensity("dtype")(make_image(array), rng())


@DIMS
def test_normalize_window_maps_and_clips(spatial_dims):
    array = np.zeros((1,) + (8,) * spatial_dims, dtype=np.int16)
    flat = array.reshape(-1)
    flat[:6] = [-1000, 0, 1000, -3000, 3000, 500]
    out = NormalizeIntensity("window", window=(-1000, 1000))(make_image(array), rng())
    values = as_numpy(out).reshape(-1)
    np.testing.assert_allclose(values[:6], [-1.0, 0.0, 1.0, -1.0, 1.0, 0.5], atol=1e-6)
    assert values[0] == -1.0 and values[2] == 1.0 and values[1] == 0.0


def test_normalize_window_default_is_ct_window():
    array = np.array([[[-2000, -1000, 0, 1000, 2000, 0, 0, 0]] * 8], dtype=np.int16)
    values = as_numpy(NormalizeIntensity("window")(make_image(array), rng()))[0, 0]
    np.testing.assert_allclose(values[:5], [-1.0, -1.0, 0.0, 1.0, 1.0], atol=1e-6)


def test_normalize_window_custom_window():
    array = np.array([[[0, 40, 80, 120, 160, 40, 40, 40]] * 8], dtype=np.float32)
    values = as_numpy(NormalizeIntensity("window", window=(40, 120))(make_image(array), rng()))[0, 0]
    np.testing.assert_allclose(values[:5], [-1.0, -1.0, 0.0, 1.0, 1.0], atol=1e-6)


@DIMS
def test_normalize_percentile_clips_outlier(spatial_dims):
    gen = np.random.default_rng(1)
    array = gen.uniform(0.0, 100.0, size=(1,) + (12,) * spatial_dims).astype(np.float32)
    array.reshape(-1)[5] = 1e6
    norm = NormalizeIntensity("percentile", percentiles=(1.0, 99.0))
    values = as_numpy(norm(make_image(array), rng())).reshape(-1)
    rest = np.delete(values, 5)
    assert values[5] == 1.0
    # the other voxels still spread over most of [-1, 1]
    assert rest.min() <= -0.9
    assert rest.max() >= 0.9
    assert rest.std() > 0.4
    # ...whereas minmax squashes them all next to -1
    squashed = np.delete(as_numpy(NormalizeIntensity("minmax")(make_image(array), rng())).reshape(-1), 5)
    assert squashed.max() < -0.99


@DIMS
def test_normalize_percentile_maps_percentiles_to_bounds(spatial_dims):
    array = np.arange(8**spatial_dims, dtype=np.float32).reshape((1,) + (8,) * spatial_dims)
    low, high = np.percentile(array, [10.0, 90.0])
    values = as_numpy(NormalizeIntensity("percentile", percentiles=(10.0, 90.0))(make_image(array), rng()))
    expected = np.clip((array - low) / (high - low), 0.0, 1.0) * 2.0 - 1.0
    np.testing.assert_allclose(values, expected, atol=1e-5)


def rgb_different_ranges(spatial_dims: int) -> np.ndarray:
    gen = np.random.default_rng(2)
    shape = (8,) * spatial_dims
    return np.stack(
        [
            gen.uniform(0.0, 1.0, size=shape),
            gen.uniform(100.0, 200.0, size=shape),
            gen.uniform(-5000.0, 5000.0, size=shape),
        ]
    ).astype(np.float32)


@DIMS
@pytest.mark.parametrize("mode", ["minmax", "percentile"])
def test_normalize_per_channel(spatial_dims, mode):
    array = rgb_different_ranges(spatial_dims)
    image = make_image(array)
    per_channel = as_numpy(NormalizeIntensity(mode, per_channel=True)(image, rng()))
    for c in range(3):
        assert per_channel[c].min() == pytest.approx(-1.0, abs=1e-6)
        assert per_channel[c].max() == pytest.approx(1.0, abs=1e-6)
    joint = as_numpy(NormalizeIntensity(mode, per_channel=False)(image, rng()))
    assert joint.min() >= -1.0 and joint.max() <= 1.0
    # channel 0 (range 1) and channel 1 (range 100) are tiny next to channel 2 (range 10000)
    for c in (0, 1):
        assert joint[c].max() - joint[c].min() < 0.1
    assert joint[2].max() - joint[2].min() > 1.5


@DIMS
@pytest.mark.parametrize("mode", ["percentile", "minmax", "auto"])
@pytest.mark.parametrize("per_channel", [True, False])
def test_normalize_constant_image_gives_zeros(spatial_dims, mode, per_channel):
    array = np.full((2,) + (8,) * spatial_dims, 7.0, dtype=np.float32)
    out = as_numpy(NormalizeIntensity(mode, per_channel=per_channel)(make_image(array), rng()))
    assert not np.isnan(out).any()
    np.testing.assert_array_equal(out, np.zeros_like(out))


def test_normalize_constant_channel_among_others():
    array = np.stack([np.full((8, 8), 3.0), np.arange(64.0).reshape(8, 8)]).astype(np.float32)
    out = as_numpy(NormalizeIntensity("minmax", per_channel=True)(make_image(array), rng()))
    assert not np.isnan(out).any()
    np.testing.assert_array_equal(out[0], 0.0)
    assert out[1].min() == -1.0 and out[1].max() == 1.0


@DIMS
def test_normalize_auto_resolves_mode(spatial_dims):
    norm = NormalizeIntensity("auto")
    uint8 = make_image(random_array(spatial_dims, dtype=np.uint8))
    ct = make_image(random_array(spatial_dims, dtype=np.int16), modality="CT")
    ct_lower = make_image(random_array(spatial_dims, dtype=np.int16), modality="ct")
    uint16 = make_image(random_array(spatial_dims, dtype=np.uint16), modality="MR")
    uint16_none = make_image(random_array(spatial_dims, dtype=np.uint16))
    floats = make_image(random_array(spatial_dims))
    assert norm.resolve_mode(uint8) == "dtype"
    assert norm.resolve_mode(make_image(torch.from_numpy(uint8.array))) == "dtype"
    assert norm.resolve_mode(ct) == "window"
    assert norm.resolve_mode(ct_lower) == "window"
    assert norm.resolve_mode(uint16) == "percentile"
    assert norm.resolve_mode(uint16_none) == "percentile"
    assert norm.resolve_mode(floats) == "percentile"
    # an explicit mode is kept
    assert NormalizeIntensity("minmax").resolve_mode(uint8) == "minmax"
    # an explicit window makes auto pick ``window``
    assert NormalizeIntensity("auto", window=(0, 10)).resolve_mode(uint16) == "window"


def test_normalize_auto_ct_uses_ct_window():
    array = np.array([[[-2000, -1000, 0, 1000, 2000, 0, 0, 0]] * 8], dtype=np.int16)
    out = NormalizeIntensity("auto")(make_image(array, modality="CT"), rng())
    np.testing.assert_allclose(as_numpy(out)[0, 0, :5], [-1.0, -1.0, 0.0, 1.0, 1.0], atol=1e-6)


def test_normalize_auto_uint8_uses_dtype():
    array = np.full((1, 8, 8), 100, dtype=np.uint8)
    array[0, 0, 0] = 50
    out = as_numpy(NormalizeIntensity("auto")(make_image(array), rng()))
    # dtype mode: 100 -> 2 * 100 / 255 - 1, not minmax/percentile (which would give +-1)
    assert out[0, 1, 1] == pytest.approx(2 * 100 / 255 - 1, abs=1e-6)
    assert out[0, 0, 0] == pytest.approx(2 * 50 / 255 - 1, abs=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"mode": "bogus"}, "mode"),
        ({"mode": "zscore"}, "mode"),
        ({"percentiles": (90.0, 10.0)}, "percentiles"),
        ({"percentiles": (5.0, 5.0)}, "percentiles"),
        ({"percentiles": (-1.0, 50.0)}, "percentiles"),
        ({"percentiles": (1.0, 101.0)}, "percentiles"),
        ({"percentiles": (1.0, 50.0, 99.0)}, "percentiles"),
        ({"window": (5.0, 1.0)}, "window"),
        ({"window": (3.0, 3.0)}, "window"),
        ({"window": (1.0,)}, "window"),
        ({"window": (0.0, 1.0, 2.0)}, "window"),
    ],
)
def test_normalize_invalid_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        NormalizeIntensity(**kwargs)


# --------------------------------------------------------------------------------------------------
# Resize
# --------------------------------------------------------------------------------------------------


@DIMS
@pytest.mark.parametrize("mode", ["auto", "linear", "area", "nearest"])
def test_resize_shape_and_spacing(spatial_dims, mode):
    shape = (8, 12, 16)[-spatial_dims:]  # array order
    new = (12, 6, 10)[-spatial_dims:]
    spacing = (0.5, 1.5, 3.0)[:spatial_dims]  # physical (x, y, z) order
    image = make_image(np.ones((2, *shape), dtype=np.float32), spacing=spacing)
    out = Resize(new, mode=mode)(image, rng())
    assert tuple(out.array.shape) == (2, *new)
    assert isinstance(out.array, torch.Tensor) and out.array.dtype == torch.float32
    # spacing is physical order: spacing[i] belongs to array axis -(i + 1)
    for i in range(spatial_dims):
        old_extent = shape[-(i + 1)] * spacing[i]
        new_extent = new[-(i + 1)] * out.spacing[i]
        assert new_extent == pytest.approx(old_extent)
    expected = tuple(spacing[i] * shape[-(i + 1)] / new[-(i + 1)] for i in range(spatial_dims))
    assert out.spacing == pytest.approx(expected)
    # geometry other than spacing is kept
    assert out.origin == image.origin and out.direction == image.direction


@DIMS
def test_resize_int_size(spatial_dims):
    image = make_image(random_array(spatial_dims, size=16), spacing=(1.0, 2.0, 3.0)[:spatial_dims])
    out = Resize(8)(image, rng())
    assert tuple(out.array.shape) == (1,) + (8,) * spatial_dims
    assert out.spacing == pytest.approx((2.0, 4.0, 6.0)[:spatial_dims])


@DIMS
def test_resize_same_size_is_identity(spatial_dims):
    array = random_array(spatial_dims, size=8)
    image = make_image(array, spacing=(0.7,) * spatial_dims)
    out = Resize(8)(image, rng())
    np.testing.assert_array_equal(as_numpy(out), array)
    assert out.spacing == image.spacing


@DIMS
@pytest.mark.parametrize("mode", ["area", "auto"])
def test_resize_area_is_block_average(spatial_dims, mode):
    shape = (4, 8, 12)[-spatial_dims:]
    factors = (2, 4, 3)[-spatial_dims:]
    gen = np.random.default_rng(3)
    array = gen.normal(size=(2, *shape)).astype(np.float32)
    new = tuple(s // f for s, f in zip(shape, factors))
    out = as_numpy(Resize(new, mode=mode)(make_image(array), rng()))
    blocked_shape = [2]
    for n, f in zip(new, factors):
        blocked_shape += [n, f]
    expected = array.reshape(blocked_shape).mean(axis=tuple(range(2, 2 + 2 * spatial_dims, 2)))
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, atol=1e-5)


@DIMS
def test_resize_linear_keeps_constant(spatial_dims):
    image = make_image(np.full((1,) + (6,) * spatial_dims, 4.0, dtype=np.float32))
    out = as_numpy(Resize(11, mode="linear")(image, rng()))
    assert out.shape == (1,) + (11,) * spatial_dims
    np.testing.assert_allclose(out, 4.0, atol=1e-5)


@DIMS
@pytest.mark.parametrize("size", [0, -3, (8,), (8, 8, 8, 8), (0, 8, 8), (8, 0)])
def test_resize_invalid_size(spatial_dims, size):
    if isinstance(size, tuple) and len(size) == spatial_dims and all(s > 0 for s in size):
        pytest.skip("valid for this spatial_dims")
    image = make_image(random_array(spatial_dims))
    with pytest.raises(ValueError, match="size"):
        Resize(size)(image, rng())


def test_resize_wrong_number_of_sizes_per_dims():
    with pytest.raises(ValueError, match="size"):
        Resize((8, 8))(make_image(random_array(3)), rng())
    with pytest.raises(ValueError, match="size"):
        Resize((8, 8, 8))(make_image(random_array(2)), rng())


def test_resize_invalid_mode():
    with pytest.raises(ValueError, match="mode"):
        Resize(8, mode="cubic")


# --------------------------------------------------------------------------------------------------
# Resample
# --------------------------------------------------------------------------------------------------


def test_resample_3d_shape_and_spacing():
    array = np.random.default_rng(0).normal(size=(1, 10, 20, 30)).astype(np.float32)  # (C, D, H, W)
    image = make_image(array, spacing=(1.0, 2.0, 4.0))  # (x, y, z)
    out = Resample(2.0)(image, rng())
    # x: 30 voxels at 1.0 -> 15; y: 20 at 2.0 -> 20; z: 10 at 4.0 -> 20
    assert tuple(out.array.shape) == (1, 20, 20, 15)
    assert out.spacing == pytest.approx((2.0, 2.0, 2.0))
    assert out.origin == image.origin


def test_resample_3d_per_axis_target():
    image = make_image(np.zeros((1, 10, 20, 30), dtype=np.float32), spacing=(1.0, 2.0, 4.0))
    out = Resample((3.0, 4.0, 8.0))(image, rng())
    assert tuple(out.array.shape) == (1, 5, 10, 10)
    assert out.spacing == pytest.approx((3.0, 4.0, 8.0))


def test_resample_2d_shape_and_spacing():
    array = np.random.default_rng(0).normal(size=(3, 8, 16)).astype(np.float32)  # (C, H, W)
    image = make_image(array, spacing=(0.5, 2.0))  # (x, y)
    out = Resample(1.0)(image, rng())
    # x: 16 at 0.5 -> 8; y: 8 at 2.0 -> 16
    assert tuple(out.array.shape) == (3, 16, 8)
    assert out.spacing == pytest.approx((1.0, 1.0))
    out = Resample((2.0, 1.0))(image, rng())
    # x: 16 at 0.5 -> 4; y: 8 at 2.0 -> 16
    assert tuple(out.array.shape) == (3, 16, 4)
    assert out.spacing == pytest.approx((2.0, 1.0))


@DIMS
def test_resample_keeps_physical_extent_when_not_exact(spatial_dims):
    shape = (9, 10, 11)[-spatial_dims:]
    spacing = (1.0, 1.0, 1.0)[:spatial_dims]
    image = make_image(np.zeros((1, *shape), dtype=np.float32), spacing=spacing)
    out = Resample(3.0)(image, rng())
    for i in range(spatial_dims):
        assert out.array.shape[-(i + 1)] * out.spacing[i] == pytest.approx(shape[-(i + 1)] * spacing[i])


@DIMS
@pytest.mark.parametrize("spacing", [0.0, -1.0, (1.0,), (1.0, 1.0, 1.0, 1.0), (1.0, 0.0), (1.0, -2.0, 1.0)])
def test_resample_bad_spacing(spatial_dims, spacing):
    image = make_image(random_array(spatial_dims))
    with pytest.raises(ValueError, match="spacing"):
        Resample(spacing)(image, rng())


def test_resample_wrong_number_of_spacings_per_dims():
    with pytest.raises(ValueError, match="spacing"):
        Resample((1.0, 1.0))(make_image(random_array(3)), rng())
    with pytest.raises(ValueError, match="spacing"):
        Resample((1.0, 1.0, 1.0))(make_image(random_array(2)), rng())


# --------------------------------------------------------------------------------------------------
# CropOrPad
# --------------------------------------------------------------------------------------------------


def arange_image(shape, spacing=None, origin=None, direction=None) -> MedicalImage:
    array = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    return make_image(array, spacing=spacing, origin=origin, direction=direction)


@DIMS
def test_crop_centre_exact_window(spatial_dims):
    shape = (1, *(10, 13, 16)[-spatial_dims:])
    size = (6, 8, 9)[-spatial_dims:]
    image = arange_image(shape)
    out = CropOrPad(size)(image, rng())
    starts = [(o - n) // 2 for o, n in zip(shape[1:], size)]
    window = (slice(None), *(slice(s, s + n) for s, n in zip(starts, size)))
    assert tuple(out.array.shape) == (1, *size)
    np.testing.assert_array_equal(as_numpy(out), image.array[window])


def test_crop_centre_explicit_2d():
    image = arange_image((1, 6, 7))
    out = as_numpy(CropOrPad((2, 3))(image, rng()))
    # rows 2..3, columns 2..4
    np.testing.assert_array_equal(out[0], [[16, 17, 18], [23, 24, 25]])


@DIMS
def test_pad_centred_with_minus_one(spatial_dims):
    shape = (2, *(4, 5, 6)[-spatial_dims:])
    size = (8, 9, 10)[-spatial_dims:]
    image = arange_image(shape)
    out = as_numpy(CropOrPad(size)(image, rng()))
    assert out.shape == (2, *size)
    befores = [(n - o) // 2 for o, n in zip(shape[1:], size)]
    inner = (slice(None), *(slice(b, b + o) for b, o in zip(befores, shape[1:])))
    np.testing.assert_array_equal(out[inner], image.array)
    mask = np.ones(out.shape, dtype=bool)
    mask[inner] = False
    assert mask.sum() == out.size - image.array.size
    np.testing.assert_array_equal(out[mask], -1.0)
    # centred: padding before and after differ by at most one voxel per axis
    for axis, (o, n) in enumerate(zip(shape[1:], size)):
        before = befores[axis]
        after = n - o - before
        assert abs(after - before) <= 1


def test_pad_custom_value():
    out = as_numpy(CropOrPad((4, 4), pad_value=0.5)(arange_image((1, 2, 2)), rng()))
    np.testing.assert_array_equal(out[0, 1:3, 1:3], [[0, 1], [2, 3]])
    assert (out[0, 0] == 0.5).all() and (out[0, 3] == 0.5).all()


@DIMS
def test_crop_one_axis_pad_another(spatial_dims):
    shape = (1, *(3, 10, 4)[-spatial_dims:])
    size = (7, 6, 8)[-spatial_dims:]
    image = arange_image(shape)
    out = as_numpy(CropOrPad(size)(image, rng()))
    assert out.shape == (1, *size)
    src = []
    dst = []
    for o, n in zip(shape[1:], size):
        if o > n:  # crop
            s = (o - n) // 2
            src.append(slice(s, s + n))
            dst.append(slice(0, n))
        else:  # pad
            b = (n - o) // 2
            src.append(slice(0, o))
            dst.append(slice(b, b + o))
    np.testing.assert_array_equal(out[(slice(None), *dst)], image.array[(slice(None), *src)])
    assert (out == -1.0).sum() == out.size - np.prod([s.stop - s.start for s in dst])


@DIMS
def test_crop_or_pad_same_size_keeps_everything(spatial_dims):
    image = arange_image((1,) + (8,) * spatial_dims, origin=(1.0, 2.0, 3.0)[:spatial_dims])
    out = CropOrPad(8)(image, rng())
    np.testing.assert_array_equal(as_numpy(out), image.array)
    assert out.origin == pytest.approx(image.origin)


@DIMS
@pytest.mark.parametrize("random", [False, True])
def test_crop_origin_identity_direction(spatial_dims, random):
    shape = (1, *(10, 12, 14)[-spatial_dims:])
    size = (4, 5, 6)[-spatial_dims:]
    spacing = (0.5, 2.0, 3.0)[:spatial_dims]  # (x, y, z)
    origin = (10.0, -20.0, 30.0)[:spatial_dims]
    image = arange_image(shape, spacing=spacing, origin=origin)
    out = CropOrPad(size, random=random)(image, rng(7))
    # recover the start index (array order) from the first value of the arange crop
    start = np.unravel_index(int(as_numpy(out).reshape(-1)[0]), shape[1:])
    expected = tuple(origin[i] + start[-(i + 1)] * spacing[i] for i in range(spatial_dims))
    assert out.origin == pytest.approx(expected)
    assert out.spacing == image.spacing
    # a voxel keeps its physical position: out index (0, ..., 0) is input index ``start``
    if not random:
        assert tuple(start) == tuple((o - n) // 2 for o, n in zip(shape[1:], size))


@DIMS
def test_pad_origin_moves_back(spatial_dims):
    shape = (1,) + (4,) * spatial_dims
    spacing = (0.5, 2.0, 3.0)[:spatial_dims]
    origin = (1.0, 2.0, 3.0)[:spatial_dims]
    image = arange_image(shape, spacing=spacing, origin=origin)
    out = CropOrPad(8)(image, rng())  # 2 voxels of padding before on every axis
    expected = tuple(o - 2 * s for o, s in zip(origin, spacing))
    assert out.origin == pytest.approx(expected)


def test_crop_origin_through_direction_2d_swapped_axes():
    # direction columns: index axis i (physical order) points along column i. Swap x and y.
    direction = (0.0, 1.0, 1.0, 0.0)
    spacing = (0.5, 2.0)  # (x-index spacing, y-index spacing)
    origin = (100.0, 200.0)
    image = arange_image((1, 10, 12), spacing=spacing, origin=origin, direction=direction)
    out = CropOrPad((4, 6))(image, rng())
    # array starts: rows (10 - 4) // 2 = 3, columns (12 - 6) // 2 = 3
    # index offset in (i, j) = (column, row) = (3, 3); scaled: (3 * 0.5, 3 * 2.0) = (1.5, 6.0)
    # physical = origin + D @ (1.5, 6.0) = origin + (6.0, 1.5)
    assert out.origin == pytest.approx((106.0, 201.5))


def test_crop_origin_through_direction_3d():
    # index i -> physical -z, index j -> x, index k -> y (a permutation with a sign)
    d = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]])
    spacing = (1.0, 2.0, 3.0)
    origin = (5.0, 6.0, 7.0)
    image = arange_image((1, 10, 12, 14), spacing=spacing, origin=origin, direction=tuple(d.ravel()))
    out = CropOrPad((6, 8, 10))(image, rng())
    start_array = np.array([2, 2, 2])  # (10-6)//2, (12-8)//2, (14-10)//2
    step = start_array[::-1] * np.array(spacing)
    expected = np.array(origin) + d @ step
    assert out.origin == pytest.approx(tuple(expected))
    # and it differs from the naive (identity) shift
    assert not np.allclose(out.origin, np.array(origin) + step)


@DIMS
def test_random_crop_deterministic_and_varies(spatial_dims):
    shape = (1,) + (16,) * spatial_dims
    image = arange_image(shape)
    crop = CropOrPad(8, random=True)
    first = as_numpy(crop(image, rng(123)))
    again = as_numpy(crop(image, rng(123)))
    np.testing.assert_array_equal(first, again)
    corners = {int(as_numpy(crop(image, rng(seed))).reshape(-1)[0]) for seed in range(6)}
    assert len(corners) >= 2
    # each crop is still a contiguous window of the input
    for seed in range(3):
        out = as_numpy(crop(image, rng(seed)))
        start = np.unravel_index(int(out.reshape(-1)[0]), shape[1:])
        window = (slice(None), *(slice(s, s + 8) for s in start))
        np.testing.assert_array_equal(out, image.array[window])


def test_random_crop_pads_centred_on_padded_axes():
    image = arange_image((1, 4, 16))
    for seed in range(4):
        out = as_numpy(CropOrPad((8, 8), random=True)(image, rng(seed)))
        assert (out[0, :2] == -1).all() and (out[0, 6:] == -1).all()
        assert (out[0, 2:6] >= 0).all()


@DIMS
@pytest.mark.parametrize("size", [0, (8,), (8, 8, 8, 8)])
def test_crop_or_pad_invalid_size(spatial_dims, size):
    with pytest.raises(ValueError, match="size"):
        CropOrPad(size)(make_image(random_array(spatial_dims)), rng())


# --------------------------------------------------------------------------------------------------
# RandomFlip
# --------------------------------------------------------------------------------------------------


@DIMS
def test_flip_p1_flips_all_axes(spatial_dims):
    image = arange_image((2,) + (8,) * spatial_dims)
    tensor = torch.from_numpy(image.array)
    out = RandomFlip(p=1.0)(image, rng())
    assert torch.equal(out.array, torch.flip(tensor, list(range(1, spatial_dims + 1))))
    for axis in range(spatial_dims):
        out = RandomFlip(axes=[axis], p=1.0)(image, rng())
        assert torch.equal(out.array, torch.flip(tensor, [axis + 1]))


@DIMS
def test_flip_p0_is_identity(spatial_dims):
    image = arange_image((1,) + (8,) * spatial_dims)
    for seed in range(5):
        out = RandomFlip(p=0.0)(image, rng(seed))
        np.testing.assert_array_equal(as_numpy(out), image.array)


@DIMS
def test_flip_keeps_geometry(spatial_dims):
    image = arange_image((1,) + (8,) * spatial_dims, spacing=(0.5,) * spatial_dims)
    out = RandomFlip(p=1.0)(image, rng())
    assert out.spacing == image.spacing and out.origin == image.origin


@DIMS
def test_flip_same_seed_same_result_and_seeds_vary(spatial_dims):
    image = arange_image((1,) + (8,) * spatial_dims)
    flip = RandomFlip(p=0.5)
    for seed in range(4):
        a = as_numpy(flip(image, rng(seed)))
        b = as_numpy(flip(image, rng(seed)))
        np.testing.assert_array_equal(a, b)
    results = {as_numpy(flip(image, rng(seed))).tobytes() for seed in range(16)}
    assert len(results) >= 2


@DIMS
@pytest.mark.parametrize("axes", [[-1], [3], [0, 5]])
def test_flip_invalid_axis(spatial_dims, axes):
    image = arange_image((1,) + (8,) * spatial_dims)
    with pytest.raises(ValueError, match="axes"):
        RandomFlip(axes=axes, p=1.0)(image, rng())


def test_flip_axis_2_invalid_for_2d_only():
    with pytest.raises(ValueError, match="axes"):
        RandomFlip(axes=[2], p=1.0)(arange_image((1, 8, 8)), rng())
    out = RandomFlip(axes=[2], p=1.0)(arange_image((1, 4, 4, 4)), rng())
    assert tuple(out.array.shape) == (1, 4, 4, 4)


@pytest.mark.parametrize("p", [-0.1, 1.5, 2.0])
def test_flip_invalid_p(p):
    with pytest.raises(ValueError, match="p"):
        RandomFlip(p=p)


# --------------------------------------------------------------------------------------------------
# Compose
# --------------------------------------------------------------------------------------------------


class Record:
    def __init__(self, name: str, log: list):
        self.name = name
        self.log = log

    def __call__(self, image, generator):
        self.log.append((self.name, generator))
        return image.replace(array=image.array + 1 if self.name == "a" else image.array * 10)


def test_compose_applies_in_order_with_same_rng():
    log: list = []
    compose = Compose([Record("a", log), Record("b", log)])
    generator = rng()
    out = compose(make_image(np.zeros((1, 4, 4), dtype=np.float32)), generator)
    assert [name for name, _ in log] == ["a", "b"]
    assert all(g is generator for _, g in log)
    np.testing.assert_array_equal(out.array, 10.0)  # (0 + 1) * 10, not 0 * 10 + 1


@DIMS
def test_compose_two_random_flips_reproducible(spatial_dims):
    image = arange_image((1,) + (8,) * spatial_dims)
    compose = Compose([RandomFlip(p=0.5), RandomFlip(axes=[0], p=0.5)])
    outs = {}
    for seed in range(8):
        a = as_numpy(compose(image, rng(seed)))
        b = as_numpy(compose(image, rng(seed)))
        np.testing.assert_array_equal(a, b)
        outs[seed] = a.tobytes()
    assert len(set(outs.values())) >= 2


def test_compose_shares_rng_state():
    # the second flip must see the generator already advanced by the first one
    image = arange_image((1, 8, 8))
    flip = RandomFlip(axes=[0], p=0.5)
    seed = 0
    while True:
        g = np.random.default_rng(seed)
        first, second = g.random() < 0.5, g.random() < 0.5
        if first != second:
            break
        seed += 1
    out = as_numpy(Compose([flip, flip])(image, rng(seed)))
    flipped_once = np.flip(image.array, axis=1)
    np.testing.assert_array_equal(out, flipped_once)


# --------------------------------------------------------------------------------------------------
# build_transform
# --------------------------------------------------------------------------------------------------


def test_build_transform_steps_in_order():
    config = DataConfig(
        spacing=(1.0, 1.0),
        resize=(8, 8),
        crop=(6, 6),
        random_crop=True,
        normalization="window",
        window=(-100.0, 100.0),
        percentiles=(1.0, 99.0),
        per_channel=False,
        flip_axes=(0, 1),
    )
    compose = build_transform(config)
    assert isinstance(compose, Compose)
    steps = compose.transforms
    assert [type(s) for s in steps] == [NormalizeIntensity, Resample, Resize, CropOrPad, RandomFlip]
    norm, resample, resize, crop, flip = steps
    assert norm.mode == "window" and norm.window == (-100.0, 100.0)
    assert norm.percentiles == (1.0, 99.0) and norm.per_channel is False
    assert tuple(resample.spacing) == (1.0, 1.0)
    assert tuple(resize.size) == (8, 8)
    assert tuple(crop.size) == (6, 6) and crop.random is True and crop.pad_value == -1.0
    assert flip.axes == (0, 1) and flip.p == 0.5


def test_build_transform_default_only_normalizes():
    steps = build_transform(DataConfig()).transforms
    assert len(steps) == 1 and isinstance(steps[0], NormalizeIntensity)
    assert steps[0].mode == "auto"


def test_build_transform_optional_steps_left_out():
    steps = build_transform(DataConfig(crop=(4, 4), flip_axes=(1,))).transforms
    assert [type(s) for s in steps] == [NormalizeIntensity, CropOrPad, RandomFlip]
    assert steps[1].random is False


@DIMS
def test_build_transform_output_shape(spatial_dims):
    if spatial_dims == 2:
        array = np.random.default_rng(0).integers(0, 256, size=(3, 12, 16), dtype=np.uint8)
        spacing = (0.5, 1.0)  # x: 16 * 0.5 -> 8 at 1.0; y: 12 * 1.0 -> 12
        config = DataConfig(spacing=(1.0, 1.0), resize=(12, 12), crop=(10, 14), flip_axes=(0, 1))
        expected = (3, 10, 14)
    else:
        array = np.random.default_rng(0).integers(-1000, 1000, size=(1, 8, 12, 16), dtype=np.int16)
        spacing = (0.5, 1.0, 2.0)  # x: 16 -> 8; y: 12 -> 12; z: 8 -> 16
        config = DataConfig(
            spacing=(1.0, 1.0, 1.0), resize=(8, 8, 8), crop=(6, 10, 8), random_crop=True, flip_axes=(0, 2)
        )
        expected = (1, 6, 10, 8)
    image = make_image(array, spacing=spacing, modality="CT" if spatial_dims == 3 else "")
    transform = build_transform(config)
    out = transform(image, rng(0))
    assert tuple(out.array.shape) == expected
    assert out.array.dtype == torch.float32
    assert out.array.min() >= -1.0 and out.array.max() <= 1.0
    # spacing follows resample then resize: extent 8 (x) and 12 (y) [and 16 (z)] kept until the crop
    resized = (8, 8, 8) if spatial_dims == 3 else (12, 12)
    extents = (8.0, 12.0, 16.0)[:spatial_dims]
    expected_spacing = tuple(extents[i] / resized[-(i + 1)] for i in range(spatial_dims))
    assert out.spacing == pytest.approx(expected_spacing)


@DIMS
def test_build_transform_deterministic(spatial_dims):
    array = np.random.default_rng(5).normal(size=(1,) + (12,) * spatial_dims).astype(np.float32)
    image = make_image(array)
    config = DataConfig(crop=(8,) * spatial_dims, random_crop=True, flip_axes=tuple(range(spatial_dims)))
    transform = build_transform(config)
    outs = []
    for seed in range(6):
        a = transform(image, rng(seed))
        b = build_transform(config)(image, rng(seed))
        assert torch.equal(a.array, b.array)
        assert a.origin == b.origin
        outs.append(a.array.numpy().tobytes())
    assert len(set(outs)) >= 2


@pytest.mark.parametrize("dtype", [">i2", ">f4", ">u2"])
def test_as_float_tensor_takes_big_endian_arrays(dtype):
    """Big-endian data (e.g. some NIfTI files) converts with its values, not refused by torch."""
    values = np.array([[0, 1, 300], [7, 1000, 2]])
    array = values.astype(dtype)
    assert not array.dtype.isnative
    assert torch.equal(as_float_tensor(array), torch.tensor(values, dtype=torch.float32))
