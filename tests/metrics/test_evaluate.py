"""``medfusion evaluate``: metrics.json and a self-contained report.html from real, synthetic and
training folders of real image crops; per-class metrics; a copied training image caught by the
memorisation audit; the extractor named everywhere; clear errors for mismatched folders."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medfusion.cli import main
from medfusion.data import write_image
from medfusion.metrics.evaluate import evaluate
from medfusion.metrics.features import DomainEncoder, load_extractor

CLASSES = ("fundus", "histology")


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
    page = (out / "report.html").read_text()
    assert extractor.name in page and "not comparable" in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r'(href|src)="(?!data:)', page)  # nothing outside the file
    # one real and one synthetic grid per class, the closest pairs, two plots
    assert len(sources) == 2 * len(CLASSES) + min(8, 24)
    assert page.count("<svg") == 2


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
    with pytest.raises(ValueError, match=r"--fake .*: 3D images with 1 channel.*compare like with like"):
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
    from medfusion.config import DataConfig

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
