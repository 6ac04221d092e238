from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("data_store", reason="the demo data needs pydicom-data")
pytest.importorskip("skimage", reason="the demo data needs scikit-image")

from medfusion.cli import main
from medfusion.data import ImageFolderDataset, inspect_dataset, read_image
from medfusion.data.demo import SOURCES, build_demo_data


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo_data(
        tmp_path_factory.mktemp("demo") / "data", crop_size=16, per_class=5, progress=False
    )


def test_layout_counts_and_formats(demo):
    meta = json.loads((demo / "demo.json").read_text())
    assert meta["counts"] == {
        "xray": {"chest": 5, "limb": 5, "ct": 5, "mr": 5},
        "color": {"fundus": 5, "histology": 5},
    }
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


def test_sources_are_documented(demo):
    text = (demo / "DATA_SOURCES.md").read_text()
    for source in SOURCES:
        assert f"| {source.dataset} | {source.label} |" in text and source.package in text


def test_reuse_force_and_determinism(demo, tmp_path):
    stamp = (demo / "demo.json").stat().st_mtime_ns
    assert build_demo_data(demo, crop_size=16, per_class=5, progress=False) == demo
    assert (demo / "demo.json").stat().st_mtime_ns == stamp  # complete folder reused
    again = build_demo_data(tmp_path / "again", crop_size=16, per_class=5, progress=False)
    for path in sorted((demo / "color").rglob("*.png")):
        assert path.read_bytes() == (again / path.relative_to(demo)).read_bytes()
    other = build_demo_data(tmp_path / "again", crop_size=16, per_class=5, seed=1, progress=False)
    first = sorted((demo / "color" / "train" / "fundus").iterdir())[0]
    assert first.read_bytes() != (other / first.relative_to(demo)).read_bytes()


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
    assert main(["data", "demo", "--out", str(out), "--crop-size", "16", "--per-class", "3", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"demo data in {out}" in printed and "classes: chest, ct, limb, mr" in printed
    assert main(["data", "inspect", str(out / "color" / "train"), "--quiet"]) == 0
