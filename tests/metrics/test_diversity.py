"""Tests of the diversity metric (mean pairwise MS-SSIM within each class) on small 1x32x32 images:
known values for identical and unrelated images, the pair enumeration and sampling, and bad input;
and the pinned copy of torchmetrics' MS-SSIM (separable window) against torchmetrics in 2D and 3D."""

import itertools

import pytest
import torch

from medfusion.metrics._ssim import pairwise_ms_ssim
from medfusion.metrics.diversity import Diversity, _pairs, diversity, mean_pairwise_ms_ssim
from medfusion.metrics.reconstruction import MultiScaleSSIMSettings, ms_ssim, ms_ssim_settings

SIZE = 32  # 2 scales with the standard 11-wide window (MS-SSIM needs a side of at least 6)


def _noise(n: int, seed: int = 0, spatial_dims: int = 2) -> torch.Tensor:
    """Independent uniform-noise images in [-1, 1]: unrelated to each other."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, *[SIZE] * spatial_dims, generator=generator) * 2 - 1


def test_image_size_allows_standard_ms_ssim():
    settings = ms_ssim_settings((SIZE, SIZE))
    assert (settings.scales, settings.kernel_size) == (2, 11)


def test_identical_images_score_one():
    images = _noise(1).repeat(6, 1, 1, 1)
    result = diversity(images)
    assert isinstance(result, Diversity)
    assert result.per_class[None] == pytest.approx(1.0, abs=1e-6)
    assert result.pairs == {None: 15}


def test_unrelated_noise_images_score_low():
    result = diversity(_noise(8))
    assert 0 <= result.per_class[None] < 0.1  # measured ~0.02
    assert result.pairs == {None: 28}


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_value_is_the_mean_over_all_pairs(spatial_dims):
    unrelated = _noise(3, seed=1, spatial_dims=spatial_dims)
    images = torch.cat([unrelated, _noise(1, seed=2, spatial_dims=spatial_dims).expand_as(unrelated[:2])])
    expected = torch.stack(
        [ms_ssim(images[i : i + 1], images[j : j + 1])[0] for i, j in itertools.combinations(range(5), 2)]
    ).mean()
    value, pairs = mean_pairwise_ms_ssim(images, batch_size=3)  # several batches of pairs
    assert pairs == 10
    # float32: the separable window rounds differently from torchmetrics' dense one
    assert value == pytest.approx(float(expected), abs=1e-5)


# 2D: 3 scales, and 2 on odd sides (pooled with flooring); 3D: 3 scales of the standard 11-wide
# window, and 2 scales of a 7-wide one on two channels (the window is applied to each alike).
PINNED_SHAPES = {(64, 64): 1, (50, 37): 1, (48, 48, 48): 1, (16, 16, 16): 2}


def _smooth(n: int, channels: int, spatial_shape: tuple[int, ...], generator: torch.Generator):
    """Random images in [-1, 1] with structure at a few pixels' scale: noise upsampled 4x."""
    coarse = torch.rand(n, channels, *(s // 4 for s in spatial_shape), generator=generator)
    mode = "bilinear" if len(spatial_shape) == 2 else "trilinear"
    return torch.nn.functional.interpolate(coarse, size=spatial_shape, mode=mode) * 2 - 1


@pytest.mark.parametrize("spatial_shape", PINNED_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_separable_ms_ssim_matches_torchmetrics(spatial_shape):
    """The pin of the copy in medfusion.metrics._ssim: fails when torchmetrics' MS-SSIM, as
    reconstruction.ms_ssim calls it, changes (the two differ by float32 rounding, ~1e-6)."""
    generator = torch.Generator().manual_seed(0)
    x = _smooth(3, PINNED_SHAPES[spatial_shape], spatial_shape, generator)
    noise = torch.randn(x.shape, generator=generator)
    # a heavily and a lightly noisy copy (mid and high scores), the negative (negative contrast: 0)
    y = torch.stack([x[0] + noise[0], x[1] + 0.3 * noise[1], -x[2]]).clamp(-1, 1)
    expected = ms_ssim(x, y)
    pairs = torch.stack([torch.arange(3), torch.arange(3, 6)], dim=1)
    actual = pairwise_ms_ssim((torch.cat([x, y]) + 1) / 2, pairs, ms_ssim_settings(spatial_shape))
    assert 0.3 < expected[0] < 0.7 < expected[1] and expected[2] == 0
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_window_wider_than_kernel_size_is_refused():
    settings = MultiScaleSSIMSettings(scales=2, kernel_size=11, sigma=2.0, betas=(0.5, 0.5))
    with pytest.raises(ValueError, match=r"sigma 2\.0 gives a 15-wide Gaussian, not kernel_size 11"):
        pairwise_ms_ssim(torch.rand(2, 1, 32, 32), torch.tensor([[0, 1]]), settings)


def test_duplicates_make_a_set_less_diverse():
    images = _noise(4, seed=3)
    with_duplicates = torch.cat([images, images])
    low = diversity(images).per_class[None]
    high = diversity(with_duplicates).per_class[None]
    # 4 of the 28 pairs are identical (score 1): ~4/28 above the unrelated pairs' ~0.02
    assert high > low + 0.1
    assert high == pytest.approx(4 / 28 + 24 / 28 * low, abs=0.03)


def test_per_class_results():
    same = _noise(1, seed=4).repeat(4, 1, 1, 1)
    images = torch.cat([same, _noise(5, seed=5), _noise(1, seed=6)])
    labels = ["collapsed"] * 4 + ["varied"] * 5 + ["alone"]
    result = diversity(images, labels)
    # a class with a single image has no pairs and is left out; there is no overall (None) entry
    assert set(result.per_class) == set(result.pairs) == {"collapsed", "varied"}
    assert result.pairs == {"collapsed": 6, "varied": 10}
    assert result.per_class["collapsed"] == pytest.approx(1.0, abs=1e-6)
    assert result.per_class["varied"] < 0.1
    # the same classes in another order give the same values
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    shuffled = diversity(images[order], [labels[i] for i in order.tolist()])
    assert shuffled.pairs == result.pairs
    assert shuffled.per_class["collapsed"] == pytest.approx(result.per_class["collapsed"], abs=1e-6)
    assert shuffled.per_class["varied"] == pytest.approx(result.per_class["varied"], rel=1e-5)


@pytest.mark.parametrize("n, max_pairs", [(10, 20), (6, 14), (50, 100)])
def test_sampled_pairs_are_distinct_and_never_an_image_with_itself(n, max_pairs):
    pairs = _pairs(n, max_pairs, torch.Generator().manual_seed(0))
    assert pairs.shape == (max_pairs, 2)
    assert (pairs[:, 0] < pairs[:, 1]).all()  # ordered, so never (i, i)
    assert pairs.min() >= 0 and pairs.max() < n
    assert len({tuple(p) for p in pairs.tolist()}) == max_pairs
    again = _pairs(n, max_pairs, torch.Generator().manual_seed(0))
    assert torch.equal(pairs, again)
    assert not torch.equal(pairs, _pairs(n, max_pairs, torch.Generator().manual_seed(1)))


def test_all_pairs_when_few_enough():
    pairs = _pairs(5, 10, torch.Generator().manual_seed(0))
    assert pairs.tolist() == [list(p) for p in itertools.combinations(range(5), 2)]


def test_pairs_capped_and_deterministic_per_seed():
    images = torch.cat([_noise(6, seed=7), _noise(1, seed=8).repeat(4, 1, 1, 1)])  # 45 pairs, 6 identical
    result = diversity(images, max_pairs=20, seed=1)
    assert result.pairs == {None: 20}
    assert diversity(images, max_pairs=20, seed=1).per_class == result.per_class
    assert diversity(images, max_pairs=20, seed=2).per_class != result.per_class
    # never an image with itself: a sample of unrelated images stays low
    assert diversity(_noise(10, seed=9), max_pairs=20, seed=1).per_class[None] < 0.1


def test_bad_input_raises():
    images = _noise(3)
    with pytest.raises(ValueError, match="at least 2 images; got 1"):
        mean_pairwise_ms_ssim(images[:1])
    with pytest.raises(ValueError, match="a class with at least 2 images"):
        diversity(images[:1])
    with pytest.raises(ValueError, match="a class with at least 2 images"):
        diversity(images, ["a", "b", "c"])
    with pytest.raises(ValueError, match="got 2 labels for 3 images"):
        diversity(images, ["a", "a"])


def test_max_pairs_below_one_is_refused():
    images = torch.zeros(3, 1, 32, 32)
    with pytest.raises(ValueError, match="max_pairs must be >= 1; got 0"):
        diversity(images, max_pairs=0)
