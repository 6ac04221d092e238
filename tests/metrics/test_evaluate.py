"""``medfusion evaluate``: metrics.json and a self-contained report.html from real, synthetic and
training folders of real image crops; per-class metrics, each with its interval beside its
real-vs-real reference at the same n; the verdict against the real-vs-real band; warnings for
small classes; a copied training image caught by the memorisation audit; the extractor named
everywhere; clear errors for mismatched folders."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medfusion.cli import main
from medfusion.config import DataConfig
from medfusion.data import write_image
from medfusion.metrics import evaluate as evaluate_module
from medfusion.metrics.evaluate import (
    bootstrap_resamples,
    compare_features,
    evaluate,
    headline,
    open_folders,
    read_image_set,
    significant,
)
from medfusion.metrics.features import DomainEncoder, load_extractor

CLASSES = ("fundus", "histology")
METRICS = ("fid", "kid", "precision", "recall", "density", "coverage")
INTERVALS = ("fid", "precision", "recall", "density", "coverage")


def _crops(root: Path, seed: int, per_class: int = 12) -> Path:
    """16x16 grey crops of two real images (scikit-image's fundus and histology photographs)."""
    from skimage import data

    rng = np.random.default_rng(seed)
    for name, image in zip(CLASSES, (data.retina(), data.immunohistochemistry())):
        grey = image.mean(axis=2).astype(np.uint8)
        h, w = grey.shape
        for i in range(per_class):
            y, x = rng.integers(h // 4, 3 * h // 4 - 16), rng.integers(w // 4, 3 * w // 4 - 16)
            write_image(root / name / f"{i}.png", grey[None, y : y + 16, x : x + 16])
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("evaluate")
    real, fake, train = (_crops(base / name, seed) for name, seed in (("real", 1), ("fake", 2), ("train", 3)))
    torch.manual_seed(0)
    encoder = DomainEncoder(
        spatial_dims=2,
        in_channels=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        num_features=16,
        image_size=(16, 16),
    )
    encoder.save_pretrained(base / "feat" / "encoder", safe_serialization=True)
    return {"real": real, "fake": fake, "train": train, "feat": base / "feat", "base": base}


def test_evaluate_writes_metrics_and_a_self_contained_report(folders, tmp_path):
    out = tmp_path / "report"
    extractor = load_extractor(folders["feat"])
    results = evaluate(
        folders["real"], folders["fake"], out, extractor, train=folders["train"], progress=False
    )
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["extractor"] == extractor.name == f"domain:{folders['feat'] / 'encoder'}"
    assert saved["overall"]["n_real"] == saved["overall"]["n_fake"] == 24
    for key in ("fid", "kid", "kid_std", "precision", "recall", "density", "coverage"):
        assert np.isfinite(saved["overall"][key]), key
    assert set(saved["per_class"]) == set(CLASSES)
    assert all(saved["per_class"][c]["n_real"] == 12 for c in CLASSES)
    assert set(saved["diversity"]["real"]) == set(CLASSES)
    assert results["overall"]["fid"] == pytest.approx(saved["overall"]["fid"])
    # every metric beside its real-vs-real reference: held-out vs as many training images
    assert (
        saved["reference"]["real_vs_real"] == "train"
        and "training images" in saved["reference"]["definition"]
    )
    for name, group in [("overall", saved["overall"]), *saved["per_class"].items()]:
        n = 24 if name == "overall" else 12
        reference = group["reference"]
        assert (reference["n_real"], reference["n_other"], reference["n_fake"]) == (n, n, n), name
        assert group["interval_resamples"] == 200 and set(group["interval"]) == set(INTERVALS), name
        for key in METRICS:
            entry = reference[key]
            assert {"value", "reference", "difference", "within_band"} <= set(entry), (name, key)
            if key in INTERVALS:
                low, high = entry["reference_interval"]
                assert low <= high and entry["within_band"] in (True, False)
        fid = reference["fid"]
        assert fid["ratio"] == pytest.approx(fid["value"] / fid["reference"])
        # all real and all synthetic images are already the same n: the same value
        assert fid["value"] == pytest.approx(group["fid"]) and fid["interval"] == group["interval"]["fid"]
    assert saved["bootstrap"]["level"] == 0.9 and saved["bootstrap"]["skipped"] == []
    assert (
        saved["verdict"]["within_band"] in (True, False) and "real-vs-real band" in saved["verdict"]["text"]
    )
    for label in CLASSES:
        div = saved["per_class"][label]["diversity"]
        assert div["reference"] == saved["diversity"]["real"][label] and div["n_real"] == div["n_fake"] == 12
        assert div["ratio"] == pytest.approx(div["value"] / div["reference"])
    page = (out / "report.html").read_text()
    assert extractor.name in page and "not comparable" in page
    assert saved["verdict"]["text"].replace("'", "&#x27;") in page  # the headline against the band
    fid_cell = re.search(r"<th>all</th><td>24</td><td>24</td><td>(.*?)</td>", page).group(1)
    low, high = (significant(v) for v in saved["overall"]["interval"]["fid"])
    assert f"<b>{significant(saved['overall']['fid'])}</b> [{low}, {high}]" in fid_cell
    assert f"n 24/24: {significant(saved['overall']['reference']['fid']['value'])}" in fid_cell
    assert f"real vs real {significant(saved['overall']['reference']['fid']['reference'])} [" in fid_cell
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r'(href|src)="(?!data:)', page)  # nothing outside the file
    # one real and one synthetic grid per class, the closest pairs, two plots
    assert len(sources) == 2 * len(CLASSES) + min(8, 24)
    assert page.count("<svg") == 2 + 1 + len(CLASSES)  # and the intensity histograms: all, each class


def test_a_copied_training_image_is_flagged(folders, tmp_path):
    fake = tmp_path / "fake"
    shutil.copytree(folders["fake"], fake)
    shutil.copy(folders["train"] / "histology" / "3.png", fake / "histology" / "copy.png")
    results = evaluate(
        folders["real"],
        fake,
        tmp_path / "out",
        load_extractor(folders["feat"]),
        train=folders["train"],
        progress=False,
    )
    memo = results["memorisation"]
    closest = memo["closest"][0]
    assert closest["fake"].endswith("histology/copy.png") and closest["train"].endswith("histology/3.png")
    assert closest["distance"] < 1e-5 < memo["threshold"]
    assert memo["flagged"] >= 1


def test_identical_folders_score_a_zero_fid_and_full_precision_recall(folders, tmp_path):
    results = evaluate(
        folders["real"], folders["real"], tmp_path, load_extractor(folders["feat"]), progress=False
    )
    assert results["overall"]["fid"] < 1e-6
    assert results["overall"]["precision"] == results["overall"]["recall"] == 1.0
    assert "memorisation" not in results
    assert results["verdict"]["within_band"] is True


def test_command_line(folders, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["evaluate", "--real", str(folders["real"]), "--fake", str(folders["fake"]), "--out", str(out)]
    assert main([*args, "--features", str(folders["feat"]), "--quiet"]) == 0
    assert "FID" in capsys.readouterr().out and (out / "report.html").is_file()
    assert main([*args, "--features", str(tmp_path / "missing"), "--quiet"]) == 1
    error = capsys.readouterr().err
    assert "missing': no such file or folder; expected 'inception'" in error and "domain encoder" in error


def test_volumes_against_images_are_refused(folders, tmp_path):
    volumes = tmp_path / "volumes"
    for i in range(3):
        write_image(volumes / f"{i}.nii.gz", np.zeros((1, 8, 8, 8), dtype=np.float32) + i)
    with pytest.raises(
        ValueError, match=r"^fake .*: 3D images with 1 channel.*but real .*compare like with like"
    ):
        evaluate(folders["real"], volumes, tmp_path / "out", load_extractor(folders["feat"]), progress=False)


def test_volumes_with_a_3d_encoder(tmp_path):
    """16^3 crops of nibabel's test volumes, two classes: metrics, diversity and a report whose
    grids show middle slices."""
    import nibabel as nib
    from nibabel.testing import data_path

    rng = np.random.default_rng(0)
    anat = np.asarray(nib.load(Path(data_path) / "anatomical.nii").dataobj, dtype=np.float32)
    epi = np.asarray(nib.load(Path(data_path) / "example4d.nii.gz").dataobj, dtype=np.float32)[..., 0]
    for folder in ("real", "fake"):
        for name, volume in (("anatomical", anat), ("epi", epi)):
            for i in range(7):
                start = [rng.integers(0, s - 16 + 1) for s in volume.shape]
                crop = volume[tuple(slice(s, s + 16) for s in start)]
                write_image(tmp_path / folder / name / f"{i}.nii.gz", crop[None])
    encoder = DomainEncoder(
        spatial_dims=3,
        in_channels=1,
        block_out_channels=(4, 8),
        norm_num_groups=4,
        num_features=8,
        image_size=(16, 16, 16),
    )
    encoder.save_pretrained(tmp_path / "feat", safe_serialization=True)
    results = evaluate(
        tmp_path / "real",
        tmp_path / "fake",
        tmp_path / "out",
        load_extractor(tmp_path / "feat"),
        progress=False,
    )
    assert results["image_size"] == [16, 16, 16]
    assert set(results["per_class"]) == {"anatomical", "epi"}
    assert np.isfinite(results["overall"]["fid"]) and set(results["diversity"]["real"]) == {
        "anatomical",
        "epi",
    }
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4  # real and synthetic grid per class


def test_a_labels_csv_applies_to_the_real_folder_only(folders, tmp_path):
    """Real images flat with a path,label CSV; the synthetic folder keeps its class subfolders."""
    real = tmp_path / "real_flat"
    rows = ["path,label"]
    for label in CLASSES:
        for file in sorted((folders["real"] / label).glob("*.png")):
            target = real / f"{label}_{file.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(file, target)
            rows.append(f"{target.name},{label}")
    csv = tmp_path / "labels.csv"
    csv.write_text("\n".join(rows) + "\n")
    results = evaluate(
        real,
        folders["fake"],
        tmp_path / "out",
        load_extractor(folders["feat"]),
        data=DataConfig(labels=str(csv)),
        progress=False,
    )
    assert set(results["per_class"]) == set(CLASSES)
    assert results["overall"]["n_real"] == results["overall"]["n_fake"] == 24


def test_an_output_folder_in_use_is_refused(folders, tmp_path, lock_holder):
    """Two evaluations into one folder: the second stops before writing anything. The process that
    holds the folder may evaluate into it (the demo into its own folder)."""
    from medfusion.runlock import RunLockError, run_lock

    out = tmp_path / "report"
    holder = lock_holder(out, "medfusion evaluate")
    with pytest.raises(RunLockError, match=f"pid {holder.pid} on host"):
        evaluate(folders["real"], folders["fake"], out, load_extractor(folders["feat"]), progress=False)
    assert sorted(p.name for p in out.iterdir()) == [".medfusion.lock"]
    holder.kill()
    holder.wait()
    with run_lock(out, "medfusion demo"):  # the caller's own lock: evaluate takes it again
        evaluate(folders["real"], folders["fake"], out, load_extractor(folders["feat"]), progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "report.html"]


def test_refused_input_leaves_no_output_folder(folders, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        evaluate(folders["real"], tmp_path / "empty", tmp_path / "out", load_extractor(folders["feat"]))
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------ reference, band, intervals


@pytest.fixture(scope="module")
def real_features(folders) -> tuple[torch.Tensor, tuple]:
    """Features and labels of the real crops (12 per class)."""
    datasets, _ = open_folders({"real": folders["real"]}, DataConfig())
    image_set = read_image_set(datasets["real"], load_extractor(folders["feat"]), progress=False)
    return image_set.features, image_set.labels


def _results(features: tuple[torch.Tensor, tuple], fake: torch.Tensor, **options) -> dict:
    results = compare_features(*features, fake, features[1], **options)
    return {"extractor": "test", **results}


def test_identical_features_sit_inside_the_real_vs_real_band(real_features):
    """Synthetic features equal to the real ones: without training images the reference splits
    each class in halves of 6, the synthetic side draws 6 of the same images."""
    results = _results(real_features, real_features[0].clone())
    assert results["reference"]["real_vs_real"] == "split"
    for name, group in [("overall", results["overall"]), *results["per_class"].items()]:
        reference = group["reference"]
        assert (
            reference["n_real"]
            == reference["n_other"]
            == reference["n_fake"]
            == (12 if name == "overall" else 6)
        )
        assert reference["fid"]["within_band"] is True, name
        assert reference["fid"]["value"] <= reference["fid"]["reference_interval"][1]
    assert results["verdict"]["within_band"] is True
    assert "within the real-vs-real band" in headline(results)


def test_features_far_from_the_real_ones_fall_outside_the_band(real_features):
    features, _ = real_features
    noise = torch.randn(features.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    results = _results(real_features, features + 10 * features.std() * noise)
    for group in [results["overall"], *results["per_class"].values()]:
        entry = group["reference"]["fid"]
        assert entry["within_band"] is False and entry["ratio"] > 10
        assert entry["value"] > entry["reference_interval"][1]
        assert entry["interval"][0] > entry["reference_interval"][1]  # the intervals do not even overlap
    assert results["verdict"]["within_band"] is False
    line = headline(results)
    assert "outside the real-vs-real band" in line and re.search(r"\d+x the real-vs-real value", line)


def test_intervals_are_deterministic_per_seed_and_hold_the_estimate(real_features):
    fake = real_features[0] + 0.5 * real_features[0].std()
    first = _results(real_features, fake, seed=1, resamples=50)
    assert first == _results(real_features, fake, seed=1, resamples=50)
    other = _results(real_features, fake, seed=2, resamples=50)
    assert other["overall"]["interval"] != first["overall"]["interval"]
    for group in [first["overall"], *first["per_class"].values()]:
        for key, (low, high) in group["interval"].items():
            assert low <= group[key] <= high, key


def test_large_sets_get_fewer_resamples_and_none_beyond_the_budget(real_features, monkeypatch):
    assert bootstrap_resamples(24, 24, 16) == 200
    assert 50 <= bootstrap_resamples(2000, 2000, 256) < 200
    assert bootstrap_resamples(10000, 10000, 2048) == 0  # scripts/bench_metrics.py's size
    assert bootstrap_resamples(24, 24, 16, requested=0) == bootstrap_resamples(3, 24, 16) == 0
    monkeypatch.setattr(evaluate_module, "BOOTSTRAP_BUDGET", 1.0)
    results = _results(real_features, real_features[0] + 1.0)
    assert results["bootstrap"]["skipped"] == ["overall", *CLASSES]
    assert results["overall"]["interval"] == {} and results["overall"]["interval_resamples"] == 0
    assert results["overall"]["reference"]["fid"]["within_band"] is None
    assert results["overall"]["reference"]["fid"]["ratio"] > 1  # the reference is still there
    assert results["verdict"]["within_band"] is None and "no real-vs-real band" in results["verdict"]["text"]


def test_small_classes_are_warned_about_in_the_log_and_the_report(folders, tmp_path):
    lines = []
    evaluate(
        folders["real"],
        folders["fake"],
        tmp_path,
        load_extractor(folders["feat"]),
        progress=False,
        log=lines.append,
        resamples=20,
    )
    text = "\n".join(lines)
    for name, n in (("overall", 24), *((c, 12) for c in CLASSES)):
        warning = f"{name}: FID on {n} images is not meaningful ({n} real, {n} synthetic; fewer than 50)"
        assert f"# warning: {warning}" in text
        assert warning in (tmp_path / "report.html").read_text()
    assert "# domain:" in text and "real-vs-real band" in text
    assert re.search(
        r"#   fundus: FID [\d.]+ \[[\d.]+, [\d.]+\] \(12 real, 12 synthetic\); at n = 6: FID", text
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [({"resamples": 5}, r"resamples must be 0 \(no intervals\) or >= 10; got 5"), ({"level": 1.0}, r"level")],
)
def test_bad_interval_options_are_refused_before_anything_is_read(folders, tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        extractor = load_extractor(folders["feat"])
        evaluate(folders["real"], folders["fake"], tmp_path / "out", extractor, **options)
    assert not (tmp_path / "out").exists()


def test_numbers_are_printed_to_three_significant_digits():
    assert [significant(v) for v in (0.41234, 1.0, 257.1436, 1234.5, 0.000757123, -0.0123456, 0.0)] == [
        "0.412",
        "1.00",
        "257",
        "1234",
        "0.000757",
        "-0.0123",
        "0",
    ]
    assert significant(None) == "–" and significant(float("inf")) == "inf"


def test_evaluate_tstr_from_the_command_line(folders, tmp_path, capsys):
    """--tstr: the classifier of medfusion.downstream trained on the synthetic and on the real
    training images, tested on the held-out real ones; its numbers in metrics.json and the report."""
    from medfusion.cli import main

    out = tmp_path / "report"
    args = ["evaluate", "--real", str(folders["real"]), "--fake", str(folders["fake"]), "--out", str(out)]
    args += ["--features", str(folders["feat"]), "--quiet"]
    assert main([*args, "--tstr"]) == 1  # no --train: nothing to compare with
    assert "--tstr needs --train" in capsys.readouterr().err and not out.exists()
    assert (
        main([*args, "--train", str(folders["train"]), "--tstr", "--tstr-seeds", "2", "--tstr-steps", "5"])
        == 0
    )
    utility = json.loads((out / "metrics.json").read_text())["tstr"]
    assert utility["seeds"] == [0, 1] and utility["classes"] == sorted(CLASSES)
    assert utility["n_train"] == {"tstr": 24, "trtr": 24} and utility["n_test"] == 24
    for side in ("tstr", "trtr"):
        for key in ("accuracy", "balanced_accuracy", "auroc"):
            entry = utility[side][key]
            assert len(entry["per_seed"]) == 2 and 0.0 <= entry["mean"] <= 1.0
            assert entry["mean"] == pytest.approx(sum(entry["per_seed"]) / 2)
    page = (out / "report.html").read_text()
    assert "Utility: train on synthetic, test on real" in page and "macro AUROC" in page
