import math

import pytest
import torch
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

from medfusion.metrics.reconstruction import (
    MS_SSIM_BETAS,
    PSNR_CAP_DB,
    MultiScaleSSIMSettings,
    ReconstructionMeter,
    ReconstructionMetrics,
    ms_ssim,
    ms_ssim_settings,
    psnr,
    ssim,
    ssim_settings,
)

# 2D: a 64x64 crop; 3D: a 16^3 volume (the smallest sizes the toolkit trains on).
SHAPES = {2: (3, 1, 64, 64), 3: (2, 2, 16, 16, 16)}


def _images(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Smooth random images in [-1, 1], so that SSIM has structure to compare."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(shape[0], shape[1], *(s // 4 for s in shape[2:]), generator=generator)
    mode = "bilinear" if len(shape) == 4 else "trilinear"
    return torch.nn.functional.interpolate(coarse, size=shape[2:], mode=mode) * 2 - 1


def _noisy(x: torch.Tensor, std: float, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (x + std * torch.randn(x.shape, generator=generator)).clamp(-1, 1)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_identical_inputs_score_perfectly(spatial_dims):
    x = _images(SHAPES[spatial_dims])
    n = x.shape[0]
    assert torch.equal(psnr(x, x), torch.full((n,), math.inf))
    torch.testing.assert_close(ssim(x, x), torch.ones(n))
    torch.testing.assert_close(ms_ssim(x, x), torch.ones(n))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_psnr_of_constant_offset_matches_closed_form(spatial_dims):
    target = _images(SHAPES[spatial_dims]) * 0.5  # in [-0.5, 0.5]: the offsets below are not clamped
    offsets = torch.tensor([0.2, -0.1, 0.4][: target.shape[0]])
    preds = target + offsets.view(-1, *[1] * (target.ndim - 1))
    mse = (offsets / 2) ** 2  # the offset on the [0, 1] scale is half the offset on [-1, 1]
    torch.testing.assert_close(psnr(preds, target), 10 * torch.log10(1 / mse))


def test_values_outside_training_range_are_clamped():
    target = torch.ones(2, 1, 8, 8)
    assert torch.isinf(psnr(target * 3, target)).all()


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_more_noise_scores_lower(spatial_dims):
    x = _images(SHAPES[spatial_dims])
    light, heavy = _noisy(x, 0.05), _noisy(x, 0.3)
    for metric in (psnr, ssim, ms_ssim):
        assert (metric(heavy, x) < metric(light, x)).all(), metric.__name__
    assert (ssim(light, x) < 1).all() and (ms_ssim(light, x) < 1).all()


def test_anticorrelated_images_give_zero_ms_ssim_not_nan():
    x = _images((2, 1, 32, 32))
    score = ms_ssim(-x, x)
    assert not torch.isnan(score).any()
    torch.testing.assert_close(score, torch.zeros(2))


def test_five_scales_match_standard_ms_ssim():
    x = _images((2, 1, 192, 192))
    y = _noisy(x, 0.1)
    settings = ms_ssim_settings((192, 192))
    assert settings == MultiScaleSSIMSettings(5, 11, 1.5, MS_SSIM_BETAS)
    expected = multiscale_structural_similarity_index_measure(
        (y + 1) / 2, (x + 1) / 2, data_range=1.0, reduction="none"
    )
    torch.testing.assert_close(ms_ssim(y, x), expected)


@pytest.mark.parametrize(
    ("spatial_shape", "scales", "kernel_size"),
    [((64, 64), 3, 11), ((32, 32), 2, 11), ((16, 16, 16), 2, 7), ((32, 32, 32), 2, 11), ((8, 8, 8), 2, 3)],
)
def test_ms_ssim_settings_for_small_sizes(spatial_shape, scales, kernel_size):
    settings = ms_ssim_settings(spatial_shape)
    assert (settings.scales, settings.kernel_size) == (scales, kernel_size)
    assert settings.sigma == pytest.approx(1.5 * kernel_size / 11)
    # torchmetrics derives the Gaussian's width from sigma: it must be the kernel size chosen
    assert int(3.5 * settings.sigma + 0.5) * 2 + 1 == kernel_size
    assert len(settings.betas) == scales
    assert sum(settings.betas) == pytest.approx(1.0)
    ratios = [b / settings.betas[0] for b in settings.betas]
    assert ratios == pytest.approx([b / MS_SSIM_BETAS[0] for b in MS_SSIM_BETAS[:scales]])


def test_ms_ssim_settings_reject_too_small_images():
    with pytest.raises(ValueError, match=r"at least 6 .*\(4, 4\)"):
        ms_ssim_settings((4, 4))
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        ms_ssim(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))


def test_ssim_settings_fit_small_images():
    assert ssim_settings((64, 64)).kernel_size == 11
    assert ssim_settings((4, 4)).kernel_size == 3
    assert ssim_settings((8, 6, 8)).kernel_size == 5
    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.testing.assert_close(ssim(x, x), torch.ones(2))
    with pytest.raises(ValueError, match=r"at least 3.*\(2, 2\)"):
        ssim_settings((2, 2))


@pytest.mark.parametrize("metric", [psnr, ssim, ms_ssim])
def test_shape_mismatch_names_both_shapes(metric):
    with pytest.raises(ValueError, match=r"\(1, 1, 32, 32\).*\(1, 1, 32, 16\)"):
        metric(torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32, 16))
    with pytest.raises(ValueError, match=r"\(1, 32, 32\).*\(1, 32, 32\)"):
        metric(torch.zeros(1, 32, 32), torch.zeros(1, 32, 32))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_meter_over_two_batches_equals_one_shot(spatial_dims):
    shape = (4, *SHAPES[spatial_dims][1:])
    target = _images(shape)
    preds = _noisy(target, 0.1)
    meter = ReconstructionMeter()
    meter.update(preds[:3], target[:3])
    meter.update(preds[3:], target[3:])
    result = meter.compute()
    assert result.count == 4
    assert result.psnr == pytest.approx(psnr(preds, target).mean().item(), rel=1e-6)
    assert result.ssim == pytest.approx(ssim(preds, target).mean().item(), rel=1e-6)
    assert result.ms_ssim == pytest.approx(ms_ssim(preds, target).mean().item(), rel=1e-6)
    # a mean over samples, not over batches
    batch_means = (ssim(preds[:3], target[:3]).mean() + ssim(preds[3:], target[3:]).mean()) / 2
    assert result.ssim != pytest.approx(batch_means.item(), rel=1e-6)


def test_meter_caps_infinite_psnr():
    target = _images((2, 1, 32, 32)) * 0.5
    preds = target.clone()
    preds[1] += 0.2  # 20 dB
    meter = ReconstructionMeter()
    meter.update(preds, target)
    assert meter.compute().psnr == pytest.approx((PSNR_CAP_DB + 20.0) / 2, rel=1e-5)


def test_meters_merge_into_one_shot():
    target = _images((3, 1, 32, 32))
    preds = _noisy(target, 0.1)
    whole, first, second = ReconstructionMeter(), ReconstructionMeter(), ReconstructionMeter()
    whole.update(preds, target)
    first.update(preds[:1], target[:1])
    second.update(preds[1:], target[1:])
    first.merge(second)
    first.merge(ReconstructionMeter())  # an empty meter adds nothing
    merged, expected = first.compute(), whole.compute()
    assert merged.count == expected.count == 3
    for name in ("psnr", "ssim", "ms_ssim"):
        assert getattr(merged, name) == pytest.approx(getattr(expected, name), rel=1e-9)


def test_meter_reports_settings_and_flat_dict():
    x = _images((2, 1, 16, 16, 16))
    meter = ReconstructionMeter()
    meter.update(x, x)
    result = meter.compute()
    assert isinstance(result, ReconstructionMetrics)
    assert result.ms_ssim_settings == ms_ssim_settings((16, 16, 16))
    assert result.ssim_settings == ssim_settings((16, 16, 16))
    as_dict = result.to_dict()
    assert as_dict["count"] == 2 and as_dict["psnr"] == PSNR_CAP_DB
    assert (as_dict["ms_ssim_scales"], as_dict["ms_ssim_kernel_size"]) == (2, 7)
    assert all(isinstance(v, (int, float)) for v in as_dict.values())


def test_meter_rejects_mixed_settings_and_empty_compute():
    meter = ReconstructionMeter()
    with pytest.raises(RuntimeError, match="before any update"):
        meter.compute()
    x64, x16 = _images((1, 1, 64, 64)), _images((1, 1, 16, 16))
    meter.update(x64, x64)
    with pytest.raises(ValueError, match="settings"):
        meter.update(x16, x16)
    meter.reset()
    meter.update(x16, x16)
    assert meter.compute().count == 1
