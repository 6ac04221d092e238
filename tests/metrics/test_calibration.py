"""``evaluate --calibrate``: what the yardstick can see. The default domain encoder, trained as
``medfusion features train`` trains it on small crops of the bundled real data (2D radiographs, 3D
MR volumes), must pass every check; an extractor blind to texture must fail the ones it cannot see."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from medfusion.cli import main
from medfusion.data.demo import build_demo_data
from medfusion.metrics.calibration import CHECKS, Check, calibrate, summary
from medfusion.metrics.degradations import DEGRADATIONS
from medfusion.metrics.evaluate import evaluate, point_metrics
from medfusion.metrics.features import FeatureExtractor, load_extractor
from medfusion.training.features import FeaturesRunConfig, train_domain_encoder

CASES = {
    # dataset, crop side, crops per class, encoder widths, batch, steps
    "2d": ("xray", 32, 64, [8, 16, 32], 32, 120),
    "3d": ("volumes", 16, 40, [8, 16], 8, 80),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def bundled(request, tmp_path_factory):
    """Small crops of a bundled dataset and a default encoder trained on its training images.

    The 2D case leaves out the ``mr`` class: at 32 pixels many of its crops are the scanner's
    background, white noise itself, so matched noise is no degradation there."""
    name, side, per_class, widths, batch, steps = CASES[request.param]
    root = tmp_path_factory.mktemp(f"calibration-{request.param}")
    data = build_demo_data(
        root / "data", crop_size=side, volume_crop_size=side, per_class=per_class,
        volume_per_class=per_class, datasets=(name,), progress=False,
    ) / name  # fmt: skip
    if name == "xray":
        for split in ("train", "heldout"):
            shutil.rmtree(data / split / "mr")
    train_settings = {"max_steps": steps, "batch_size": batch, "learning_rate": 2e-3, "ema_decay": None}
    train_settings |= {"num_workers": 0, "preview_every": 0, "checkpoint_every": steps}
    model = {"block_out_channels": widths, "norm_num_groups": 4, "num_features": 32}
    config = FeaturesRunConfig.from_dict({"model": model, "train": train_settings}, source="test")
    train_domain_encoder(data / "train", root / "features", config, progress=False, log=lambda _: None)
    return data, root


def test_the_default_encoder_sees_every_degradation(bundled):
    data, root = bundled
    metrics = evaluate(
        data / "heldout", data / "heldout", root / "evaluation", load_extractor(root / "features"),
        train=data / "train", progress=False, log=lambda _: None, calibrate=True, resamples=0,
    )  # fmt: skip
    calibration = metrics["calibration"]
    failed = [c for c in calibration["checks"] if not c["passed"]]
    assert not failed, failed
    assert calibration["passed"] and calibration["n"] >= 24
    assert set(calibration["degradations"]) == {d.name for d in DEGRADATIONS}
    assert calibration["degradations"]["blur_1"]["fid_ratio"] > 1.0
    assert "training images" in calibration["degraded"]
    saved = json.loads((root / "evaluation" / "metrics.json").read_text())
    assert saved["calibration"]["checks"] == calibration["checks"]
    report = (root / "evaluation" / "report.html").read_text()
    assert "What this yardstick can see" in report and "blur_2" in report


def test_calibrate_on_the_command_line_without_train_uses_a_split(bundled, capsys):
    """Without --train the degraded images are the second half of the held-out images."""
    data, root = bundled
    out = root / "cli"
    argv = ["evaluate", "--real", str(data / "heldout"), "--fake", str(data / "heldout"), "--out", str(out)]
    argv += ["--features", str(root / "features"), "--calibrate", "--resamples", "0", "--quiet"]
    assert main(argv) == 0
    calibration = json.loads((out / "metrics.json").read_text())["calibration"]
    assert "second half of the held-out" in calibration["degraded"]
    assert {c["check"] for c in calibration["checks"]} == {c.text() for c in CHECKS}
    assert "calibration:" in capsys.readouterr().out


def _mean_only(x: torch.Tensor) -> torch.Tensor:
    """A yardstick that sees nothing but each image's mean intensity (and its square)."""
    mean = x.flatten(1).mean(1, keepdim=True)
    return torch.cat([mean, mean**2], dim=1)


class _Images:
    """A dataset of fixed images, as calibrate reads them."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index]}


def test_a_yardstick_blind_to_texture_fails_the_checks_it_cannot_see():
    """Blur, shuffle and matched noise keep each image's mean: an extractor of the mean alone
    scores them like real images, and the calibration says so."""
    generator = torch.Generator().manual_seed(0)
    base = torch.rand(80, 1, 4, 4, generator=generator)
    images = torch.nn.functional.interpolate(base, size=(32, 32), mode="bilinear") * 1.6 - 0.8
    extractor = FeatureExtractor(_mean_only, "mean", 2, spatial_dims=2, channels=1)
    real = extractor(images[:40]).double()
    other = torch.arange(40, 80)
    train = extractor(images[40:]).double()
    result = calibrate(extractor, real, _Images(images), other, train, point_metrics, progress=False)
    checks = {c["check"]: c for c in result["checks"]}
    assert not result["passed"]
    assert not checks[CHECKS[0].text()]["passed"]  # blur
    assert not checks[CHECKS[1].text()]["passed"]  # shuffle
    assert checks[CHECKS[4].text()]["passed"]  # copies: the same features, distance 0
    assert result["degradations"]["blur_2"]["fid_ratio"] < 2.0
    lines = summary(result)
    assert any("does not see blur_2" in line for line in lines)
    assert summary({"skipped": "too few images"}) == ["calibration: none (too few images)"]


def test_calibrate_draws_at_most_max_images_and_checks_its_arguments():
    images = torch.rand(30, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    extractor = FeatureExtractor(_mean_only, "mean", 2, spatial_dims=2, channels=1)
    real = extractor(images[:15]).double()
    rows = torch.arange(15, 30)
    result = calibrate(extractor, real, _Images(images), rows, real, point_metrics, max_images=10,
                       progress=False)  # fmt: skip
    assert result["n"] == 10
    with pytest.raises(ValueError, match="15 real features but 14 images"):
        calibrate(extractor, real, _Images(images), rows[:14], real, point_metrics, progress=False)


NOISE_PRECISION = Check("noise", "precision", "<=", 0.2)
BLUR_RATIO = Check("blur_2", "fid_ratio", ">=", 2.0)


@pytest.mark.parametrize(
    ("check", "value", "passes"),
    [
        (NOISE_PRECISION, 0.2, True),
        (NOISE_PRECISION, 0.21, False),
        (BLUR_RATIO, 1.99, False),
        (BLUR_RATIO, 2.0, True),
    ],
)
def test_check_comparisons(check, value, passes):
    assert check.passes(value) is passes
