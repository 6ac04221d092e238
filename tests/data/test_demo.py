from __future__ import annotations

import json
import sys

import numpy as np
import pytest

pytest.importorskip("data_store", reason="the demo data needs pydicom-data")
pytest.importorskip("skimage", reason="the demo data needs scikit-image")
pytest.importorskip("nilearn", reason="the demo volumes need nilearn")

from medfusion.cli import main
from medfusion.data import ImageFolderDataset, inspect_dataset, read_image
from medfusion.data.demo import SOURCES, VOLUME_SPACING_MM, build_demo_data

SMALL = {"crop_size": 16, "per_class": 5, "volume_per_class": 5, "progress": False}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo_data(tmp_path_factory.mktemp("demo") / "data", **SMALL)


def test_layout_counts_and_formats(demo):
    meta = json.loads((demo / "demo.json").read_text())
    assert meta["counts"] == {
        "xray": {"chest": 5, "limb": 5, "ct": 5, "mr": 5},
        "color": {"fundus": 5, "histology": 5},
        "volumes": {"t1": 5, "anat": 5, "epi": 5},
    }
    assert meta["datasets"] == ["xray", "color", "volumes"]
    for dataset, channels, dtype in (("xray", 1, np.uint16), ("color", 3, np.uint8)):
        train = inspect_dataset(demo / dataset / "train", progress=False)
        heldout = inspect_dataset(demo / dataset / "heldout", progress=False)
        assert train.usable and heldout.usable
        assert set(train.summary()["classes"].values()) == {4} and set(
            heldout.summary()["classes"].values()
        ) == {1}
        image = read_image(train.records[0].sample.path)
        assert image.array.shape == (channels, 16, 16) and image.array.dtype == dtype


def test_crops_hold_structure_not_blank_background(demo):
    for path in sorted((demo / "xray" / "train").rglob("*.png")):
        array = read_image(path).array.astype(np.float64) / 65535
        assert array.std() > 0.01, path


def test_volumes_are_real_tissue_crops_with_their_geometry(demo):
    train = inspect_dataset(demo / "volumes" / "train", progress=False)
    heldout = inspect_dataset(demo / "volumes" / "heldout", progress=False)
    assert train.usable and heldout.usable
    assert train.summary()["classes"] == {"anat": 4, "epi": 4, "t1": 4}
    assert heldout.summary()["classes"] == {"anat": 1, "epi": 1, "t1": 1}
    for source in (s for s in SOURCES if s.dataset == "volumes"):
        direction = source.load().direction  # the EPI's is oblique
        for path in sorted((demo / "volumes").glob(f"*/{source.label}/*.nii.gz")):
            image = read_image(path)
            assert image.array.shape == (1, 32, 32, 32) and image.array.dtype == np.uint16, path
            assert np.allclose(image.spacing, VOLUME_SPACING_MM, rtol=0.01), image.spacing
            assert np.allclose(image.direction, direction), path
            array = image.array.astype(np.float64) / 65535
            assert array.std() > 0.05 and (array > 0.02).mean() > 0.4, path  # tissue, not background


def test_sources_are_documented(demo):
    text = (demo / "DATA_SOURCES.md").read_text()
    for source in SOURCES:
        assert f"| {source.dataset} | {source.label} |" in text and source.package in text
    for name in ("mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", "anatomical.nii", "example4d.nii.gz"):
        assert name in text
    assert "Louis Collins, McConnell Brain Imaging Centre" in text  # the notice the MNI licence asks for


def test_reuse_force_and_determinism(demo, tmp_path):
    stamp = (demo / "demo.json").stat().st_mtime_ns
    assert build_demo_data(demo, **SMALL) == demo
    assert (demo / "demo.json").stat().st_mtime_ns == stamp  # complete folder reused
    again = build_demo_data(tmp_path / "again", datasets=["color"], **SMALL)
    for path in sorted((demo / "color").rglob("*.png")):
        assert path.read_bytes() == (again / path.relative_to(demo)).read_bytes()
    other = build_demo_data(tmp_path / "again", datasets=["color"], seed=1, **SMALL)
    first = sorted((demo / "color" / "train" / "fundus").iterdir())[0]
    assert first.read_bytes() != (other / first.relative_to(demo)).read_bytes()


def test_datasets_selection_reuse_and_adding(tmp_path):
    small = {**SMALL, "per_class": 3, "volume_per_class": 3}
    out = build_demo_data(tmp_path / "d", datasets=["volumes"], **small)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["volumes"]
    meta = json.loads((out / "demo.json").read_text())
    assert meta["datasets"] == ["volumes"] and list(meta["counts"]) == ["volumes"]
    assert "| volumes | t1 |" in (out / "DATA_SOURCES.md").read_text()
    assert "| xray |" not in (out / "DATA_SOURCES.md").read_text()
    first = sorted((out / "volumes" / "train" / "epi").iterdir())[0]
    volume = first.read_bytes()
    stamp = (out / "demo.json").stat().st_mtime_ns
    assert build_demo_data(out, datasets="volumes", **small) == out
    assert (out / "demo.json").stat().st_mtime_ns == stamp  # holds what was asked for: reused

    build_demo_data(out, datasets=["xray"], **small)  # a dataset it lacks: added to those it held
    meta = json.loads((out / "demo.json").read_text())
    assert meta["datasets"] == ["xray", "volumes"] and list(meta["counts"]) == ["xray", "volumes"]
    assert first.read_bytes() == volume and len(list((out / "xray" / "train").rglob("*.png"))) == 8
    stamp = (out / "demo.json").stat().st_mtime_ns
    build_demo_data(out, datasets=["xray"], **small)
    assert (out / "demo.json").stat().st_mtime_ns == stamp

    build_demo_data(out, datasets=["color"], **{**small, "seed": 1})  # other settings: rebuilt
    assert json.loads((out / "demo.json").read_text())["datasets"] == ["color"]
    assert not (out / "volumes").exists()


def test_missing_package_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nilearn", None)  # find_spec then reports it missing
    with pytest.raises(RuntimeError, match=r"needs the package 'nilearn'.*medfusion\[demo\]"):
        build_demo_data(tmp_path / "d", datasets=["volumes"], progress=False)
    assert not (tmp_path / "d").exists()


def test_volume_crop_larger_than_a_source_names_it(tmp_path):
    with pytest.raises(ValueError, match=r"anatomical.nii: source image 40x66x53 .* crop size 48"):
        build_demo_data(tmp_path / "d", datasets=["volumes"], volume_crop_size=48, progress=False)


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="is not a medfusion demo folder"):
        build_demo_data(tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"crop_size": 4}, "crop_size"),
        ({"per_class": 1}, "per_class"),
        ({"heldout_fraction": 1.0}, "heldout_fraction"),
        ({"volume_crop_size": 4}, "volume_crop_size"),
        ({"volume_per_class": 1}, "volume_per_class"),
        ({"datasets": ["xray", "ct"]}, "datasets must be one or more of xray, color, volumes"),
        ({"datasets": []}, "datasets must be one or more of"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_demo_data(tmp_path / "d", progress=False, **kwargs)


def test_demo_data_feeds_the_dataset(demo):
    ds = ImageFolderDataset(demo / "xray" / "train")
    assert ds.class_names == ("chest", "ct", "limb", "mr") and len(ds) == 16
    assert ds[0]["image"].shape == (1, 16, 16)


def test_cli_demo_then_inspect(tmp_path, capsys):
    out = tmp_path / "cli_demo"
    args = ["data", "demo", "--out", str(out), "--crop-size", "16", "--per-class", "3", "--quiet"]
    assert main([*args, "--datasets", "xray", "color"]) == 0
    printed = capsys.readouterr().out
    assert f"demo data in {out}" in printed and "classes: chest, ct, limb, mr" in printed
    assert not (out / "volumes").exists()
    assert main(["data", "inspect", str(out / "color" / "train"), "--quiet"]) == 0
