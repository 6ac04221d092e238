from __future__ import annotations

import importlib.util
import itertools
import json
import sys

import numpy as np
import pytest

pytest.importorskip("data_store", reason="the demo data needs pydicom-data")
pytest.importorskip("skimage", reason="the demo data needs scikit-image")
pytest.importorskip("nilearn", reason="the demo volumes need nilearn")

from medfusion.cli import main
from medfusion.data import ImageFolderDataset, inspect_dataset, read_image
from medfusion.data.demo import (
    PAIR_FOLDERS,
    SEGMENTATION_SOURCES,
    SOURCES,
    VOLUME_SPACING_MM,
    build_demo_data,
    label_map,
)

SMALL = {"crop_size": 16, "per_class": 5, "volume_per_class": 5, "pairs_per_set": 8, "progress": False}
HAS_STARDIST = importlib.util.find_spec("stardist") is not None
PAIR_SETS = ("nuclei-2d", "brain-2d", "brain-3d") if HAS_STARDIST else ("brain-2d", "brain-3d")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo_data(tmp_path_factory.mktemp("demo") / "data", **SMALL)


def test_layout_counts_and_formats(demo):
    meta = json.loads((demo / "demo.json").read_text())
    assert meta["counts"] == {
        "xray": {"chest": 5, "limb": 5, "ct": 5, "mr": 5},
        "color": {"fundus": 5, "histology": 5},
        "volumes": {"t1": 5, "anat": 5, "epi": 5},
        "segmentation": dict.fromkeys(PAIR_SETS, 8),
    }
    assert meta["datasets"] == ["xray", "color", "volumes", "segmentation"]
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
    for name in PAIR_SETS:
        assert f"| {name} |" in text
    assert "| brain-3d | 32x32x32 | 0 background, 1 grey matter, 2 white matter |" in text
    for phrase in ("mni_icbm152_gm_", "_wm_", "exceeds\n0.5, else 0", "disjoint from the training region"):
        assert phrase in text
    if HAS_STARDIST:
        assert "mask2d.tif" in text and "BSD-3-Clause" in text
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
        ({"pairs_per_set": 1}, "pairs_per_set"),
        ({"datasets": ["xray", "ct"]}, "datasets must be one or more of xray, color, volumes, segmentation;"),
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


def _pairs(demo, name, part):
    images, masks = (demo / "segmentation" / name / folder for folder in PAIR_FOLDERS[part])
    return [(path, masks / path.name) for path in sorted(images.iterdir())]


def test_segmentation_layout_and_counts(demo):
    meta = json.loads((demo / "demo.json").read_text())
    assert sorted(p.name for p in (demo / "segmentation").iterdir()) == sorted(PAIR_SETS)
    assert list(meta["segmentation"]) == list(PAIR_SETS)
    assert list(meta["skipped"]) == ([] if HAS_STARDIST else ["nuclei-2d"])
    for name in PAIR_SETS:
        folder = demo / "segmentation" / name
        assert sorted(p.name for p in folder.iterdir()) == ["images", "masks", "test-images", "test-masks"]
        for part, count in (("train", 6), ("test", 2)):
            images, masks = (folder / f for f in PAIR_FOLDERS[part])
            assert sorted(p.name for p in images.iterdir()) == sorted(p.name for p in masks.iterdir())
            assert len(list(images.iterdir())) == count == meta["segmentation"][name]["pairs"][part]
            assert len(meta["segmentation"][name]["boxes"][part]) == count
        train_names = {p.name for p in (folder / "images").iterdir()}
        assert not train_names & {p.name for p in (folder / "test-images").iterdir()}


def test_every_image_has_a_mask_of_its_shape_and_geometry(demo):
    expected = {"nuclei-2d": ((1, 16, 16), np.uint8), "brain-2d": ((1, 16, 16), np.uint16)}
    expected["brain-3d"] = ((1, 32, 32, 32), np.uint16)
    for name in PAIR_SETS:
        shape, dtype = expected[name]
        for image_path, mask_path in _pairs(demo, name, "train") + _pairs(demo, name, "test"):
            image, mask = read_image(image_path), read_image(mask_path)
            assert image.array.shape == mask.array.shape == shape and image.array.dtype == dtype, image_path
            assert mask.array.dtype == np.uint8, mask_path
            assert np.allclose(image.spacing, mask.spacing) and np.allclose(image.origin, mask.origin)
            assert np.allclose(image.direction, mask.direction), mask_path
            if name == "brain-3d":
                assert np.allclose(image.spacing, 1.0), image.spacing  # the template's 1 mm
                array = image.array.astype(np.float64) / 65535
                assert (mask.array > 0).mean() >= 0.5 and array.std() > 0.05, image_path  # brain inside


def test_mask_labels_and_fractions(demo):
    meta = json.loads((demo / "demo.json").read_text())["segmentation"]
    for name in PAIR_SETS:
        labels = meta[name]["labels"]
        seen = set()
        for part in ("train", "test"):
            masks = np.stack([read_image(m).array for _, m in _pairs(demo, name, part)])
            values = set(np.unique(masks).tolist())
            assert values <= set(range(len(labels))), (name, values)
            seen |= values
            fractions = np.bincount(masks.ravel(), minlength=len(labels)) / masks.size
            assert np.allclose(fractions, meta[name]["label_fractions"][part], atol=1e-3), name
        if name.startswith("brain"):
            assert labels == ["background", "grey matter", "white matter"] and seen == {0, 1, 2}, name
        else:
            assert labels == ["background", "nucleus"] and seen == {0, 1}
            for part in ("train", "test"):
                assert 0.0 < meta[name]["label_fractions"][part][1] < 1.0


def _overlap(a, b) -> bool:
    return all(start_a < stop_b and start_b < stop_a for (start_a, stop_a), (start_b, stop_b) in zip(a, b))


def test_test_pairs_come_from_a_region_disjoint_from_training(demo):
    meta = json.loads((demo / "demo.json").read_text())["segmentation"]
    for name in PAIR_SETS:
        split, boxes = meta[name]["split"], meta[name]["boxes"]
        axis = {"x": -1, "z": 0}[split["axis"]]
        assert split["train"][1] < split["test"][0]  # a gap between the regions
        for part in ("train", "test"):
            for box in boxes[part].values():
                assert split[part][0] <= box[axis][0] < box[axis][1] <= split[part][1], (name, part, box)
        for train, test in itertools.product(boxes["train"].values(), boxes["test"].values()):
            assert not _overlap(train, test), (name, train, test)
    brain = [meta[name]["boxes"] for name in ("brain-2d", "brain-3d")]  # one grid, one split
    assert meta["brain-2d"]["split"] == meta["brain-3d"]["split"]
    for train, test in itertools.chain(
        itertools.product(brain[0]["train"].values(), brain[1]["test"].values()),
        itertools.product(brain[1]["train"].values(), brain[0]["test"].values()),
    ):
        assert not _overlap(train, test), (train, test)


def test_recorded_boxes_are_where_the_pairs_come_from(demo):
    meta = json.loads((demo / "demo.json").read_text())["segmentation"]
    sources = {s.name: s for s in SEGMENTATION_SOURCES}
    brain = sources["brain-3d"].load()
    labels = label_map(brain.probabilities)
    for part in ("train", "test"):
        for image_path, mask_path in _pairs(demo, "brain-3d", part):
            box = meta["brain-3d"]["boxes"][part][mask_path.name.removesuffix(".nii.gz")]
            index = (slice(None), *(slice(*b) for b in box))
            assert np.array_equal(read_image(mask_path).array, labels[index]), mask_path
            step = np.asarray([b[0] for b in reversed(box)], dtype=float) * brain.image.spacing
            direction = np.asarray(brain.image.direction).reshape(3, 3)
            assert np.allclose(
                read_image(image_path).origin, np.asarray(brain.image.origin) + direction @ step
            )
    if HAS_STARDIST:
        nuclei = sources["nuclei-2d"].load().probabilities > 0
        for part in ("train", "test"):
            for _, mask_path in _pairs(demo, "nuclei-2d", part):
                box = meta["nuclei-2d"]["boxes"][part][mask_path.stem]
                index = (slice(None), *(slice(*b) for b in box))
                assert np.array_equal(read_image(mask_path).array, nuclei[index]), mask_path


def test_label_map_thresholds_the_most_probable_label():
    probabilities = np.array([[0.6, 0.2, 0.5, 0.0], [0.3, 0.7, 0.4, 0.51]])[:, None]  # (K=2, 1, 4)
    assert label_map(probabilities).tolist() == [[[1, 2, 0, 2]]]


def test_segmentation_reuse_and_determinism(demo, tmp_path):
    out = build_demo_data(tmp_path / "seg", datasets=["segmentation"], **SMALL)
    assert json.loads((out / "demo.json").read_text())["datasets"] == ["segmentation"]
    stamp = (out / "demo.json").stat().st_mtime_ns
    assert build_demo_data(out, datasets="segmentation", **SMALL) == out
    assert (out / "demo.json").stat().st_mtime_ns == stamp  # complete folder reused
    for path in sorted((out / "segmentation").rglob("*.*")):  # the same pairs as in the full build
        assert path.read_bytes() == (demo / path.relative_to(out)).read_bytes(), path


def test_missing_stardist_skips_the_nuclei_set(tmp_path, monkeypatch):
    small = {**SMALL, "pairs_per_set": 3}
    monkeypatch.setitem(sys.modules, "stardist", None)  # find_spec then reports it missing
    with pytest.warns(UserWarning, match=r"skipping the segmentation set nuclei-2d: .*'stardist'"):
        out = build_demo_data(tmp_path / "d", datasets=["segmentation"], **small)
    assert sorted(p.name for p in (out / "segmentation").iterdir()) == ["brain-2d", "brain-3d"]
    meta = json.loads((out / "demo.json").read_text())
    assert list(meta["skipped"]) == ["nuclei-2d"] and "nuclei-2d" not in meta["counts"]["segmentation"]
    assert "- nuclei-2d: skipped; it needs the package 'stardist'" in (out / "DATA_SOURCES.md").read_text()
    if HAS_STARDIST:  # installed again: the next call builds the set it skipped
        monkeypatch.delitem(sys.modules, "stardist")
        build_demo_data(out, datasets=["segmentation"], **small)
        assert json.loads((out / "demo.json").read_text())["skipped"] == {}
        assert len(list((out / "segmentation" / "nuclei-2d" / "images").iterdir())) == 2


def test_segmentation_split_without_room_for_training_names_it(tmp_path):
    with pytest.raises(ValueError, match=r"brain-2d: no room along z .* heldout_fraction 0.95 \(the fore"):
        build_demo_data(tmp_path / "d", datasets=["segmentation"], **{**SMALL, "heldout_fraction": 0.95})
    assert not (tmp_path / "d").exists()


def test_cli_builds_the_segmentation_pairs(tmp_path):
    out = tmp_path / "cli_seg"
    args = ["data", "demo", "--out", str(out), "--crop-size", "16", "--quiet", "--datasets", "segmentation"]
    assert main(args) == 0
    assert (out / "segmentation" / "brain-3d" / "test-masks").is_dir()
