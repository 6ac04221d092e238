"""``medfusion.workflows.evaluate``: the evaluate command as one library call. The extractor named
or the default domain encoder (trained once into ``out/features``, then reused), the metrics and
report, and errors that name the function's arguments, raised before any work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import medfusion.training.features as training_features
from medfusion.config import DataConfig
from medfusion.data import write_image
from medfusion.metrics.features import ENCODER_DIR, DomainEncoder
from medfusion.workflows import FEATURES_DIR, default_domain_encoder, run_evaluate

TINY = {"block_out_channels": (4, 8), "norm_num_groups": 4, "num_features": 8, "image_size": (8, 8)}


def _images(root: Path, seed: int, per_class: int = 4) -> Path:
    rng = np.random.default_rng(seed)
    for label in ("a", "b"):
        for i in range(per_class):
            write_image(root / label / f"{i}.png", rng.integers(0, 255, (1, 8, 8), dtype=np.uint8))
    return root


def _save_encoder(folder: Path) -> Path:
    torch.manual_seed(0)
    DomainEncoder(spatial_dims=2, in_channels=1, **TINY).save_pretrained(
        folder / ENCODER_DIR, safe_serialization=True
    )
    return folder


@pytest.fixture
def fake_training(monkeypatch):
    """``train_domain_encoder`` replaced by one that saves a tiny encoder and records its call."""
    calls = []

    def train(data, out, config, resume=False, progress=True, log=print, **_):
        calls.append({"data": data, "out": Path(out), "config": config, "resume": resume})
        _save_encoder(Path(out))

    monkeypatch.setattr(training_features, "train_domain_encoder", train)
    return calls


def test_default_domain_encoder_is_trained_once_then_reused(tmp_path, fake_training):
    real = _images(tmp_path / "real", 0)
    lines = []
    folder = default_domain_encoder(real, tmp_path / "feat", DataConfig(seed=3), 7, False, lines.append)
    assert folder == tmp_path / "feat" and len(fake_training) == 1
    config = fake_training[0]["config"]
    assert config.train.max_steps == 7 and config.train.batch_size == 8  # the 8 real images: one batch
    assert config.data.seed == 3 and fake_training[0]["resume"] is False
    assert lines == [f"# no feature extractor given: training a domain encoder on {real} into {folder}"]
    assert default_domain_encoder(real, folder, log=lines.append) == folder
    assert len(fake_training) == 1 and len(lines) == 1  # reused, nothing said


def test_run_evaluate_without_features_trains_the_default_encoder_into_out(tmp_path, fake_training):
    real, fake = _images(tmp_path / "real", 0), _images(tmp_path / "fake", 1)
    out = tmp_path / "report"
    results = run_evaluate(real, fake, out, feature_steps=2, resamples=0, progress=False, log=lambda _: None)
    assert fake_training[0]["out"] == out / FEATURES_DIR and fake_training[0]["config"].train.max_steps == 2
    assert results["extractor"] == f"domain:{out / FEATURES_DIR / ENCODER_DIR}"
    assert json.loads((out / "metrics.json").read_text())["extractor"] == results["extractor"]
    assert (out / "report.html").is_file() and "tstr" not in results


def test_run_evaluate_with_a_given_extractor(tmp_path, fake_training):
    real, fake = _images(tmp_path / "real", 0), _images(tmp_path / "fake", 1)
    features = _save_encoder(tmp_path / "feat")
    lines = []
    results = run_evaluate(
        real, fake, tmp_path / "out", features, resamples=0, progress=False, log=lines.append
    )
    assert fake_training == [] and not (tmp_path / "out" / FEATURES_DIR).exists()
    assert results["overall"]["n_real"] == results["overall"]["n_fake"] == 8
    assert any("wrote" in line for line in lines)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"tstr": True}, r"^tstr needs train \(the real training images"),
        ({"level": 1.5}, r"^level must be in \(0, 1\); got 1\.5"),
        ({"resamples": 5}, r"^resamples must be 0 \(no intervals\) or >= 10; got 5"),
        ({"features": "nope"}, r"^features 'nope': no such file or folder; expected 'inception'"),
    ],
)
def test_errors_name_the_arguments_before_any_work(tmp_path, fake_training, arguments, message):
    real = _images(tmp_path / "real", 0)
    with pytest.raises(ValueError, match=message):
        run_evaluate(real, real, tmp_path / "out", progress=False, **arguments)
    assert fake_training == [] and not (tmp_path / "out").exists()


def test_folders_are_named_as_arguments(tmp_path):
    real, volumes = _images(tmp_path / "real", 0), tmp_path / "volumes"
    for i in range(3):
        write_image(volumes / f"{i}.nii.gz", np.zeros((1, 8, 8, 8), dtype=np.float32) + i)
    features = _save_encoder(tmp_path / "feat")
    with pytest.raises(ValueError, match=rf"^fake {volumes}: 3D images .*, but real {real} holds 2D"):
        run_evaluate(real, volumes, tmp_path / "out", features, progress=False)
