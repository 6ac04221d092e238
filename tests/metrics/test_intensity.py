"""The intensity check in the files' own units: W1 against known values, identical sets at 0 and
unflagged, a synthetic set on another scale or shifted by an offset flagged (in ``evaluate``'s
metrics.json, its log and its report), classes kept apart, channels compared one by one, volumes
read like images, and a deterministic, bounded subsample."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medfusion.data import write_image
from medfusion.data.discovery import discover
from medfusion.metrics.evaluate import evaluate
from medfusion.metrics.features import FeatureExtractor
from medfusion.metrics.intensity import (
    RELATIVE_LIMIT,
    SHAPE_LIMIT,
    compare_intensities,
    even_spread,
    intensity_values,
    read_intensities,
    wasserstein_1,
)


def _folder(root: Path, classes: dict[str, tuple[int, int]], dtype=np.uint16, n: int = 6, seed: int = 0,
            size: int = 16, suffix: str = ".png", channels: int = 1, spatial: int = 2) -> Path:  # fmt: skip
    """``n`` files per class of uniform integer values in ``[low, high]`` (per class)."""
    rng = np.random.default_rng(seed)
    for label, (low, high) in classes.items():
        for i in range(n):
            shape = (channels, *(size,) * spatial)
            write_image(root / label / f"{i}{suffix}", rng.integers(low, high + 1, shape).astype(dtype))
    return root


def test_w1_of_known_distributions():
    rng = np.random.default_rng(0)
    a = rng.normal(size=500)
    assert float(wasserstein_1(a, a + 3.5)) == pytest.approx(3.5)
    assert float(wasserstein_1(a, a)) == 0.0
    # the quantile functions: [0] against [1, 3] differ by 1 on half of (0, 1) and by 3 on the other
    assert float(wasserstein_1(np.array([0.0]), np.array([1.0, 3.0]))) == pytest.approx(2.0)
    assert float(wasserstein_1(np.array([0.0, 1.0]), np.array([0.0, 3.0]))) == pytest.approx(1.0)
    # per channel: a shift of c in each channel gives c, sizes may differ
    x = rng.normal(size=(400, 3))
    shifted = x[:200] + np.array([0.0, 1.0, -10.0])
    w1 = wasserstein_1(x[:200], shifted)
    assert w1.shape == (3,) and np.allclose(w1, [0.0, 1.0, 10.0])
    assert wasserstein_1(x, shifted)[2] == pytest.approx(10.0, abs=0.2)


def test_w1_is_that_of_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=333), rng.exponential(size=517) * 3
    assert float(wasserstein_1(a, b)) == pytest.approx(stats.wasserstein_distance(a, b))


@pytest.mark.parametrize(
    ("a", "b", "message"),
    [
        (np.zeros((3, 2)), np.zeros((3, 1)), "a and b must have as many channels; got 2 and 1"),
        (np.zeros(0), np.zeros(3), r"a must have shape \(N,\) or \(N, C\) with N >= 1; got \(0,\)"),
        (np.zeros(3), np.array([0.0, np.nan]), "b holds NaN or infinite values"),
    ],
)
def test_w1_refuses_bad_samples(a, b, message):
    with pytest.raises(ValueError, match=message):
        wasserstein_1(a, b)


def test_identical_sets_give_zero_and_no_warning(tmp_path):
    real = _folder(tmp_path / "real", {"a": (999, 1385), "b": (0, 400)})
    same = tmp_path / "same"
    shutil.copytree(real, same)
    result = compare_intensities(intensity_values(real), intensity_values(same))
    for entry in (result["overall"], *result["per_class"].values()):
        assert entry["w1"] == [0.0] and entry["relative_w1"] == [0.0]
        assert entry["histogram"]["real"] == entry["histogram"]["fake"]
        assert not entry["flagged"] and entry["warning"] is None
    assert result["warnings"] == [] and not result["flagged"]
    # other files drawn from the same distribution: far below the limit, and unflagged
    other = _folder(tmp_path / "other", {"a": (999, 1385), "b": (0, 400)}, seed=7)
    result = compare_intensities(intensity_values(real), intensity_values(other))
    assert result["overall"]["relative_w1"][0] < 0.05 and not result["flagged"]
    assert result["overall"]["reference"]["relative_w1"][0] < 0.05


def test_another_scale_is_flagged(tmp_path):
    real = _folder(tmp_path / "real", {"a": (999, 1385)})
    fake = _folder(tmp_path / "fake", {"a": (0, 65535)}, seed=1)
    result = compare_intensities(intensity_values(real), intensity_values(fake))
    entry = result["per_class"]["a"]
    assert entry["relative_w1"][0] > 20 * RELATIVE_LIMIT
    assert entry["w1"][0] > 25_000  # in the files' units: 32767 - 1192 = 31575, roughly
    assert entry["real"]["dtype"] == entry["fake"]["dtype"] == "uint16"
    assert entry["real"]["min"][0] >= 999 and entry["real"]["max"][0] <= 1385
    assert entry["flagged"] and result["flagged"] and len(result["warnings"]) == 2  # all, and a
    assert entry["aligned_relative_w1"][0] < 0.05  # uniform both: one linear map apart
    assert "intensity a:" in entry["warning"] and "likely another scale" in entry["warning"]
    assert "real median 1" in entry["warning"] and "(uint16)" in entry["warning"]
    json.dumps(result, allow_nan=False)  # plain JSON


def test_an_offset_is_flagged_as_one(tmp_path):
    real = _folder(tmp_path / "real", {"a": (-1000, 400)}, dtype=np.int16, suffix=".nii.gz", size=8)
    fake = _folder(tmp_path / "fake", {"a": (24, 1424)}, dtype=np.int16, suffix=".nii.gz", size=8, seed=1)
    result = compare_intensities(intensity_values(real), intensity_values(fake))
    entry = result["per_class"]["a"]
    assert entry["w1"][0] == pytest.approx(1024, rel=0.05)
    assert entry["aligned_relative_w1"][0] < 0.05
    assert entry["flagged"] and "likely an offset" in entry["warning"]
    shift = re.search(r"shifted by about (-?[\d.]+)", entry["warning"]).group(1)
    assert float(shift) == pytest.approx(1024, rel=0.03)


def test_values_of_another_shape_are_told_from_a_unit_mismatch(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(6):  # real: dark and bright halves; synthetic: mid-grey noise, as from an untrained model
        dark_and_bright = np.concatenate([rng.integers(0, 50, 128), rng.integers(950, 1001, 128)])
        write_image(
            tmp_path / "real" / "a" / f"{i}.png", dark_and_bright.reshape(1, 16, 16).astype(np.uint16)
        )
        write_image(
            tmp_path / "fake" / "a" / f"{i}.png", rng.integers(400, 601, (1, 16, 16)).astype(np.uint16)
        )
    entry = compare_intensities(intensity_values(tmp_path / "real"), intensity_values(tmp_path / "fake"))
    entry = entry["per_class"]["a"]
    assert entry["flagged"] and entry["aligned_relative_w1"][0] > SHAPE_LIMIT
    assert "not learned the real intensities" in entry["warning"] and "likely an" not in entry["warning"]


def test_classes_are_kept_apart(tmp_path):
    real = _folder(tmp_path / "real", {"a": (0, 9), "b": (1000, 1009)}, n=4)
    values = intensity_values(real)
    assert set(values) == {"a", "b", "all"}
    assert values["a"].values.max() <= 9 and values["b"].values.min() >= 1000
    assert values["all"].n_files == 8 and len(values["all"].values) == 2 * 4 * 256
    # the classes swapped: the same values overall, far apart within each class
    fake = _folder(tmp_path / "fake", {"a": (1000, 1009), "b": (0, 9)}, n=4, seed=1)
    result = compare_intensities(values, intensity_values(fake))
    assert not result["overall"]["flagged"]
    assert all(entry["flagged"] for entry in result["per_class"].values())
    assert [w.split(":")[0] for w in result["warnings"]] == ["intensity a", "intensity b"]


def test_a_class_only_one_side_holds_is_left_out(tmp_path):
    real = _folder(tmp_path / "real", {"a": (0, 9), "b": (0, 9)}, n=2)
    fake = _folder(tmp_path / "fake", {"a": (0, 9)}, n=2)
    result = compare_intensities(intensity_values(real), intensity_values(fake))
    assert set(result["per_class"]) == {"a"}


def test_rgb_is_compared_channel_by_channel(tmp_path):
    real = _folder(tmp_path / "real", {"a": (0, 120)}, dtype=np.uint8, channels=3)
    rng = np.random.default_rng(3)
    for i in range(6):  # red and green as the real ones, blue on another scale
        image = rng.integers(0, 121, (3, 16, 16)).astype(np.uint8)
        image[2] = rng.integers(200, 256, (16, 16))
        write_image(tmp_path / "fake" / "a" / f"{i}.png", image)
    values = intensity_values(real)
    assert values["a"].values.shape == (6 * 256, 3) and values["a"].values.dtype == np.uint8
    entry = compare_intensities(values, intensity_values(tmp_path / "fake"))["per_class"]["a"]
    assert entry["channels"] == 3 and len(entry["w1"]) == 3 and len(entry["histogram"]["real"]) == 3
    assert max(entry["relative_w1"][:2]) < 0.1 < 1.0 < entry["relative_w1"][2]
    assert entry["flagged"] and "channel 2: " in entry["warning"] and "channel 0: " not in entry["warning"]


def test_volumes_are_read_in_their_units(tmp_path):
    real = _folder(tmp_path / "real", {"ct": (-1024, 3071)}, dtype=np.int16, suffix=".nii.gz", size=8,
                   spatial=3, n=3)  # fmt: skip
    values = intensity_values(real, max_values=10_000)
    assert values["ct"].values.shape == (3 * 8**3, 1) and values["ct"].dtype == "int16"
    assert values["ct"].values.min() < -900 and values["ct"].values.max() > 2900
    result = compare_intensities(values, values)
    assert result["overall"]["w1"] == [0.0] and not result["flagged"]


def test_the_subsample_is_bounded_spread_and_deterministic(tmp_path):
    real = _folder(tmp_path / "real", {"a": (0, 1000)}, n=10)
    values = intensity_values(real, max_files=4, max_values=100)["a"]
    assert (values.n_files, values.n_read) == (10, 4) and len(values.values) == 100
    assert set(values.files.tolist()) == {0, 1, 2, 3}
    assert even_spread(10, 4).tolist() == [0, 3, 6, 9] and even_spread(3, 4).tolist() == [0, 1, 2]
    again = intensity_values(real, max_files=4, max_values=100)["a"]
    other = intensity_values(real, max_files=4, max_values=100, seed=1)["a"]
    assert np.array_equal(values.values, again.values) and not np.array_equal(values.values, other.values)
    # the files read are the even spread: the first and the last file among them
    samples = discover(real).samples
    first = read_intensities([samples[0]], max_values=10**6)["a"].values
    assert np.isin(values.values[values.files == 0], first).all()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_files": 0}, "max_files must be >= 1; got 0"),
        ({"max_values": -1}, "max_values must be >= 1; got -1"),
    ],
)
def test_bad_limits_are_refused(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        intensity_values(tmp_path, **options)


def test_bad_comparisons_are_refused(tmp_path):
    values = intensity_values(_folder(tmp_path / "real", {"a": (0, 9)}, n=2))
    rgb = intensity_values(_folder(tmp_path / "rgb", {"a": (0, 9)}, dtype=np.uint8, n=2, channels=3))
    with pytest.raises(ValueError, match="bins must be >= 1; got 0"):
        compare_intensities(values, values, bins=0)
    with pytest.raises(ValueError, match=r"fake must hold 'all' \(every class together\); got \['a'\]"):
        compare_intensities(values, {"a": values["a"]})
    with pytest.raises(ValueError, match=r"real has 1 channel\(s\) and fake 3"):
        compare_intensities(values, rgb)


def test_mixed_channels_are_named(tmp_path):
    write_image(tmp_path / "a" / "0.png", np.zeros((1, 8, 8), np.uint8))
    write_image(tmp_path / "a" / "1.png", np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"1\.png: 3 channel\(s\), but .*0\.png has 1"):
        intensity_values(tmp_path)


def _pooled() -> FeatureExtractor:
    return FeatureExtractor(
        lambda x: torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1), "pooled", 4, channels=1
    )


def test_evaluate_reports_a_scale_mismatch(tmp_path):
    real = _folder(tmp_path / "real", {"a": (999, 1385), "b": (999, 1385)}, n=4)
    fake = _folder(tmp_path / "fake", {"a": (0, 65535), "b": (0, 65535)}, n=4, seed=1)
    lines = []
    out = tmp_path / "out"
    evaluate(real, fake, out, _pooled(), progress=False, resamples=0, kid_subsets=2, log=lines.append)
    metrics = json.loads((out / "metrics.json").read_text())
    intensity = metrics["intensity"]
    assert set(intensity["per_class"]) == {"a", "b"} and intensity["flagged"]
    assert intensity["overall"]["relative_w1"][0] > 20 * RELATIVE_LIMIT
    assert intensity["warnings"] and all(w in metrics["warnings"] for w in intensity["warnings"])
    assert any("likely another scale" in line for line in lines)
    page = (out / "report.html").read_text()
    section = page.split("<h2>Intensities in the files' units</h2>")[1].split("<h2>")[0]
    # all, a and b: each with its numbers, its warning and the two histograms with a legend
    assert [h.split("</h3>")[0] for h in section.split("<h3>")[1:]] == ["all", "a", "b"]
    assert section.count("<th>W1 / real range</th>") == 3 and section.count("<svg") == 3
    assert section.count(">real</text>") == section.count(">synthetic</text>") == 3
    assert section.count("class='warning'") == 3
    for warning in intensity["warnings"]:
        assert warning.replace("'", "&#x27;") in section


def test_evaluate_of_matching_units_adds_no_warning(tmp_path):
    real = _folder(tmp_path / "real", {"a": (999, 1385)}, n=4)
    fake = _folder(tmp_path / "fake", {"a": (999, 1385)}, n=4, seed=1)
    metrics = evaluate(real, fake, tmp_path / "out", _pooled(), progress=False, resamples=0, kid_subsets=2,
                       log=lambda _: None)  # fmt: skip
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["intensity"] == json.loads(json.dumps(metrics["intensity"]))
    assert not saved["intensity"]["flagged"] and saved["intensity"]["warnings"] == []
    assert not any(w.startswith("intensity") for w in saved["warnings"])
