"""The TSTR classifier: a group-norm DenseNet in 2D and 3D, its config checks, metrics against
hand-computed values, a fit on real crops, and TSTR vs TRTR end to end on tiny folders of real
image crops (scikit-image's fundus and histology photographs)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medfusion.config import DataConfig
from medfusion.data import ImageFolderDataset, write_image
from medfusion.downstream import (
    ClassifierConfig,
    build_classifier,
    classification_metrics,
    train_classifier,
    tstr,
)

CLASSES = ("fundus", "histology")
TINY = ClassifierConfig(
    init_features=8, growth_rate=8, block_config=(1, 1), num_groups=4, max_steps=60, learning_rate=3e-3
)


def _crops(root: Path, seed: int, per_class: int = 12, noise: bool = False) -> Path:
    """16x16 grey crops of two real images, one class each: 64x64 crops of their central halves
    averaged over 4x4 blocks (smooth fundus vs textured histology); uniform noise with ``noise``."""
    from skimage import data

    rng = np.random.default_rng(seed)
    for name, image in zip(CLASSES, (data.retina(), data.immunohistochemistry())):
        grey = image.mean(axis=2)
        h, w = grey.shape
        for i in range(per_class):
            y, x = rng.integers(h // 4, 3 * h // 4 - 64), rng.integers(w // 4, 3 * w // 4 - 64)
            crop = grey[y : y + 64, x : x + 64].reshape(16, 4, 16, 4).mean(axis=(1, 3))
            crop = crop[None].round().astype(np.uint8)
            if noise:
                crop = rng.integers(0, 256, crop.shape, dtype=np.uint8)
            write_image(root / name / f"{i}.png", crop)
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tstr")
    return {
        "train": _crops(base / "train", 1, per_class=32),
        "synthetic": _crops(base / "synthetic", 2, per_class=16),
        "noise": _crops(base / "noise", 3, per_class=16, noise=True),
        "test": _crops(base / "test", 4, per_class=12),
    }


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_build_gives_logits_without_batchnorm_or_inplace_relu(spatial_dims):
    model = build_classifier(spatial_dims, 2, 3, TINY)
    logits = model(torch.randn(4, 2, *(8,) * spatial_dims))
    assert logits.shape == (4, 3)
    kinds = {type(m) for m in model.modules()}
    assert not any(issubclass(k, nn.modules.batchnorm._NormBase) for k in kinds)
    assert nn.GroupNorm in kinds
    assert not [name for name, m in model.named_modules() if getattr(m, "inplace", False)]


def test_stem_bias_makes_the_network_see_the_input_scale():
    """MONAI's stem convolution has no bias upstream; ours has one (else f(2x) == f(x))."""
    model = build_classifier(2, 1, 2, TINY).eval()
    assert model.features.conv0.bias is not None
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(model(2 * x), model(x))


def test_default_config_is_small():
    for spatial_dims, limit in ((2, 50_000), (3, 100_000)):
        model = build_classifier(spatial_dims, 1, 4, ClassifierConfig())
        assert sum(p.numel() for p in model.parameters()) < limit


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_steps": 0}, "max_steps must be >= 1; got 0"),
        ({"batch_size": 0}, "batch_size must be >= 1; got 0"),
        ({"learning_rate": 0.0}, "learning_rate must be > 0"),
        ({"weight_decay": -1.0}, "weight_decay must be >= 0"),
        ({"block_config": ()}, "block_config must be one or more positive integers"),
        ({"growth_rate": 0}, "growth_rate must be >= 1"),
        ({"seed": -1}, "seed must be an integer in 0.."),
        ({"block_config": (3, 3), "num_groups": 8}, "num_groups must divide every channel count"),
    ],
)
def test_config_validation_names_the_field(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ClassifierConfig(**changes)


@pytest.mark.parametrize("blocks", [(1,), (2, 3), (3, 3, 3), (1, 2, 5)])
@pytest.mark.parametrize("groups", [1, 2, 4, 8])
def test_group_check_agrees_with_the_network(blocks, groups):
    """The config accepts exactly the settings whose network can be built (pins MONAI's layout)."""
    try:
        config = ClassifierConfig(init_features=16, growth_rate=8, block_config=blocks, num_groups=groups)
    except ValueError:
        config = None
    settings = dict(init_features=16, growth_rate=8, block_config=blocks, bn_size=4)
    from monai.networks.nets import DenseNet

    try:
        DenseNet(2, 1, 2, norm=("group", {"num_groups": groups}), **settings)
        buildable = True
    except ValueError:
        buildable = False
    assert (config is not None) == buildable


def test_config_round_trip():
    config = ClassifierConfig(block_config=(2, 2), max_steps=7)
    assert ClassifierConfig.from_dict(config.to_dict()) == config


def test_metrics_match_hand_computed_values_three_classes():
    probs = torch.tensor(
        [[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.5, 0.1, 0.4]]
    )
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    m = classification_metrics(probs, labels, 3)
    # predictions 0, 1, 0, 1, 2, 0: 3 of 6 right; recalls 1/2, 1/2, 1/2
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["recall_per_class"] == pytest.approx([0.5, 0.5, 0.5])
    assert m["balanced_accuracy"] == pytest.approx(0.5)
    # one-vs-rest AUROCs by counting pairs (positive score > negative score, ties 1/2):
    # class 0: positives .7 .2 vs .6 .1 .3 .5 -> (4 + 1) / 8; class 1: .3 .8 vs .2 .5 .3 .1
    # -> (2.5 + 4) / 8; class 2: .4 .4 vs .1 .3 .1 .1 -> 8 / 8
    assert m["auroc"] == pytest.approx(np.mean([5 / 8, 6.5 / 8, 1.0]))


def test_metrics_two_classes_imbalanced_and_logits():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0], [0.5, 0.0]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    m = classification_metrics(logits, labels, 2)
    # predictions 0, 1, 0, 1, 0: accuracy 2/5; recall 1/2 and 1/3
    assert m["accuracy"] == pytest.approx(0.4)
    assert m["recall_per_class"] == pytest.approx([0.5, 1 / 3])
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1 / 3) / 2)
    # p(class 1) ranks the positives (-1, 3, -0.5 in logit difference) above the negatives
    # (-2, 1): pairs won 1 + 2 + 1 = 4 of 6, the same for both one-vs-rest directions
    assert m["auroc"] == pytest.approx(4 / 6)


def test_metrics_perfect_and_constant_scores():
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    perfect = classification_metrics(nn.functional.one_hot(labels, 3).float() * 5, labels, 3)
    assert perfect == {"accuracy": 1.0, "balanced_accuracy": 1.0, "auroc": 1.0, "recall_per_class": [1.0] * 3}
    constant = classification_metrics(torch.full((6, 3), 1 / 3), labels, 3)
    assert constant["auroc"] == pytest.approx(0.5)
    assert constant["recall_per_class"] == [1.0, 0.0, 0.0]  # ties go to the first class


def test_metrics_with_an_absent_class_and_bad_inputs():
    m = classification_metrics(torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0]]), torch.tensor([0, 1]), 3)
    assert math.isnan(m["recall_per_class"][2])
    assert m["balanced_accuracy"] == 1.0 and m["auroc"] == 1.0
    with pytest.raises(ValueError, match=r"logits_or_probs must have shape \(N, 3\)"):
        classification_metrics(torch.zeros(2, 2), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.1; got 0\.\.2"):
        classification_metrics(torch.zeros(2, 2), torch.tensor([0, 2]), 2)


def test_train_classifier_learns_real_crops_and_is_reproducible(folders):
    train = ImageFolderDataset(folders["train"])
    test = ImageFolderDataset(folders["test"])
    model = train_classifier(train, TINY, progress=False)
    images = torch.stack([test[i]["image"] for i in range(len(test))])
    with torch.no_grad():
        logits = model(images)
    m = classification_metrics(logits, torch.tensor(test.labels), 2)
    assert m["accuracy"] >= 0.9 and m["auroc"] >= 0.95
    again = train_classifier(train, TINY, progress=False)
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_train_classifier_refuses_images_too_small(folders):
    config = TINY.replace(block_config=(1, 1, 1, 1))  # needs 32 pixels per axis
    with pytest.raises(ValueError, match=r"size \(16, 16\) are too small .* at least 32"):
        train_classifier(ImageFolderDataset(folders["train"]), config, progress=False)


def test_tstr_is_close_to_trtr_on_another_draw_of_real_crops(folders):
    lines: list[str] = []
    good = tstr(
        folders["train"],
        folders["synthetic"],
        folders["test"],
        DataConfig(),
        TINY,
        seeds=(0, 1),
        progress=False,
        log=lines.append,
    )
    assert good["classes"] == list(CLASSES) and good["seeds"] == [0, 1]
    assert good["n_train"] == {"tstr": 32, "trtr": 64} and good["n_test"] == 24
    assert good["image_size"] == [16, 16]
    assert len(lines) == 4 and lines[0].startswith("tstr (train on synthetic) seed 0: accuracy")
    for regime in ("tstr", "trtr"):
        assert len(good[regime]["accuracy"]["per_seed"]) == 2
        assert good[regime]["accuracy"]["mean"] >= 0.9
        assert set(good[regime]["recall_per_class"]["mean"]) == set(CLASSES)
    assert abs(good["tstr"]["auroc"]["mean"] - good["trtr"]["auroc"]["mean"]) < 0.05


def test_tstr_on_noise_is_clearly_below_trtr(folders):
    """A classifier fit to noise labels is arbitrary on real images: chance on average over seeds."""
    noise = tstr(
        folders["train"],
        folders["noise"],
        folders["test"],
        DataConfig(),
        TINY,
        seeds=(0, 1),
        progress=False,
        log=lambda _: None,
    )
    assert noise["trtr"]["balanced_accuracy"]["mean"] >= 0.9
    assert noise["tstr"]["balanced_accuracy"]["mean"] < noise["trtr"]["balanced_accuracy"]["mean"] - 0.25


def test_tstr_refuses_mismatched_classes_naming_both_folders(folders, tmp_path):
    other = tmp_path / "other"
    for i in range(2):
        write_image(other / "fundus" / f"{i}.png", np.zeros((1, 16, 16), np.uint8))
        write_image(other / "xray" / f"{i}.png", np.zeros((1, 16, 16), np.uint8))
    with pytest.raises(ValueError) as error:
        tstr(folders["train"], other, folders["test"], DataConfig(), TINY, progress=False)
    message = str(error.value)
    assert f"synthetic {other}" in message and f"real_train {folders['train']}" in message
    assert "missing: ['histology'], extra: ['xray']" in message


def test_tstr_refuses_an_unlabelled_synthetic_folder(folders, tmp_path):
    flat = tmp_path / "flat"
    for i in range(3):
        write_image(flat / f"{i}.png", np.zeros((1, 16, 16), np.uint8))
    with pytest.raises(ValueError, match=rf"synthetic {flat}: holds no class subfolders"):
        tstr(folders["train"], flat, folders["test"], DataConfig(), TINY, progress=False)


def test_tstr_refuses_bad_seeds(folders):
    with pytest.raises(ValueError, match="seeds must be one or more distinct integers"):
        tstr(folders["train"], folders["synthetic"], folders["test"], DataConfig(), TINY, seeds=(1, 1))


def test_tstr_trains_only_the_regimes_asked_for_and_each_as_when_both_are(folders):
    """TRTR once and TSTR per synthetic set (``medfusion benchmark``) give the numbers of one call."""
    args = (folders["train"], folders["synthetic"], folders["test"], DataConfig(), TINY)
    options = {"seeds": (0,), "progress": False, "log": lambda _: None}
    both = tstr(*args, **options)
    for regime in ("tstr", "trtr"):
        alone = tstr(*args, **options, regimes=(regime,))
        other = "trtr" if regime == "tstr" else "tstr"
        assert other not in alone and alone["n_train"] == {regime: both["n_train"][regime]}
        assert alone[regime]["balanced_accuracy"] == both[regime]["balanced_accuracy"]
    with pytest.raises(ValueError, match=r"regimes must be one or more of \['tstr', 'trtr'\]; got"):
        tstr(*args, **options, regimes=("trts",))
