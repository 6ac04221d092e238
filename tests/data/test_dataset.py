from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import medfusion.data.dataset as dataset_module
from medfusion.config import DataConfig
from medfusion.data import (
    DataError,
    DatasetSubset,
    ImageFolderDataset,
    MedicalImage,
    build_transform,
    split_indices,
    write_image,
)
from tests.data._builders import write_ct_series


def test_items_are_normalised_tensors_with_labels(make_folder):
    ds = ImageFolderDataset(make_folder({"b": 2, "a": 3}))
    assert len(ds) == 5 and ds.class_names == ("a", "b") and ds.num_classes == 2
    assert ds.spatial_dims == 2 and ds.channels == 1
    assert ds.labels == [0, 0, 0, 1, 1]
    item = ds[3]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (1, 16, 16)
    assert item["label"] == 1 and item["index"] == 3
    assert -1.0 <= item["image"].min() < item["image"].max() <= 1.0


def test_unlabelled_items_have_label_minus_one(make_folder):
    ds = ImageFolderDataset(make_folder(3))
    assert ds.class_names == () and ds[0]["label"] == -1


def test_index_out_of_range(make_folder):
    ds = ImageFolderDataset(make_folder(2))
    assert torch.equal(ds[-1]["image"], ds[1]["image"])
    with pytest.raises(IndexError, match="index 2 out of range for 2 samples"):
        ds[2]


def test_class_names_fix_the_order_and_reject_unknown_labels(make_folder):
    root = make_folder({"a": 1, "b": 1})
    ds = ImageFolderDataset(root, class_names=["b", "a"])
    assert ds.labels == [1, 0]
    with pytest.raises(DataError, match=r"label 'b' is not one of the classes \['a'\]"):
        ImageFolderDataset(root, class_names=["a"])


def test_opening_reads_no_pixels_and_one_header(make_folder, monkeypatch):
    root = make_folder({"a": 4, "b": 4})
    calls = {"info": 0}
    real_info = dataset_module.read_info

    def counting_info(path):
        calls["info"] += 1
        return real_info(path)

    def no_pixels(path, **kwargs):
        raise AssertionError("pixels read at start-up")

    monkeypatch.setattr(dataset_module, "read_info", counting_info)
    monkeypatch.setattr(dataset_module, "read_image", no_pixels)
    ds = ImageFolderDataset(root)
    assert len(ds) == 8 and calls["info"] == 1


def test_random_transforms_are_deterministic_per_seed_epoch_and_index(make_folder):
    root = make_folder({"a": 3})
    config = DataConfig(crop=(8, 8), random_crop=True, flip_axes=(0, 1))
    a = ImageFolderDataset(root, transform=build_transform(config), seed=1)
    b = ImageFolderDataset(root, transform=build_transform(config), seed=1)
    assert torch.equal(a[0]["image"], b[0]["image"]) and a[0]["image"].shape == (1, 8, 8)
    first = [a[0]["image"]]
    epochs = []
    for epoch in range(4):
        a.set_epoch(epoch)
        epochs.append(a[0]["image"])
    assert torch.equal(epochs[0], first[0])
    assert any(not torch.equal(epochs[0], e) for e in epochs[1:])  # augmentation varies by epoch
    c = ImageFolderDataset(root, transform=build_transform(config), seed=2)
    assert any(not torch.equal(a[i]["image"], c[i]["image"]) for i in range(3))


def test_dataloader_workers_give_the_same_batches(make_folder):
    root = make_folder({"a": 4, "b": 4})
    config = DataConfig(crop=(8, 8), random_crop=True, flip_axes=(1,))
    ds = ImageFolderDataset(root, transform=build_transform(config))
    single = next(iter(DataLoader(ds, batch_size=8, num_workers=0)))
    multi = next(iter(DataLoader(ds, batch_size=8, num_workers=2)))
    assert torch.equal(single["image"], multi["image"]) and torch.equal(single["label"], multi["label"])
    assert single["image"].shape == (8, 1, 8, 8)


def test_volumes_3d(make_volumes, tmp_path):
    make_volumes(tmp_path / "vols" / "x", 2)
    make_volumes(tmp_path / "vols" / "y", 1)
    config = DataConfig(spacing=(2.0, 2.0, 2.0), crop=(4, 4, 4), normalization="percentile")
    ds = ImageFolderDataset(tmp_path / "vols", transform=build_transform(config))
    assert ds.spatial_dims == 3 and ds.class_names == ("x", "y")
    assert ds[0]["image"].shape == (1, 4, 4, 4)


def test_dicom_series_dataset(tmp_path):
    write_ct_series(tmp_path / "data" / "p1", [0, 5, 10, 15])
    write_ct_series(tmp_path / "data" / "p2", [0, 5, 10, 15])
    ds = ImageFolderDataset(tmp_path / "data", labels="none")
    assert len(ds) == 2 and ds.spatial_dims == 3
    assert ds[0]["image"].shape == (1, 4, 128, 128)


def test_problems_found_when_opening_raise_with_every_file_named(make_folder):
    root = make_folder({"a": 2})
    (root / "a" / "notes.docx").write_bytes(b"PK")
    with pytest.raises(DataError) as e:
        ImageFolderDataset(root)
    message = str(e.value)
    assert "1 problem(s) found" in message and "notes.docx: not an image or volume" in message
    assert "--skip-bad" in message


def test_mixed_channels_is_named_when_read_and_skipped_with_skip_bad(make_folder, real_rgb):
    root = make_folder({"a": 3})
    write_image(root / "a" / "zz_rgb.png", real_rgb[:, :16, :16])
    ds = ImageFolderDataset(root)  # lazy: found only when the file is read
    with pytest.raises(
        DataError, match=re.escape("zz_rgb.png: 2D with 3 channel(s), but the dataset is 2D with 1")
    ):
        ds[3]
    with pytest.warns(UserWarning, match="mixed channels"):
        skipping = ImageFolderDataset(root, skip_bad=True)
    assert len(skipping) == 3


def test_mixed_2d_and_3d(make_folder, make_volumes):
    root = make_folder({"a": 3})
    make_volumes(root / "a", 1)
    with pytest.raises(DataError, match="has 3 spatial dimensions while 3 other files have 2"):
        ImageFolderDataset(root, validate="header")


def test_unreadable_file_fails_on_read_and_is_replaced_with_skip_bad(make_folder):
    root = make_folder({"a": 3})
    data = (root / "a" / "a001.png").read_bytes()
    (root / "a" / "a001.png").write_bytes(data[: len(data) // 2])  # header intact, pixels truncated
    ds = ImageFolderDataset(root)
    with pytest.raises(
        DataError, match=re.escape(f"{(root / 'a' / 'a001.png').resolve()}: cannot read as png")
    ):
        ds[1]
    skipping = ImageFolderDataset(root, skip_bad=True)  # header check passes; the read fails
    assert len(skipping) == 3
    with pytest.warns(UserWarning, match="skipping unreadable file"):
        item = skipping[1]
    assert torch.equal(item["image"], skipping[2]["image"])  # replaced by the next readable item


def test_full_validation_finds_truncated_files_up_front(make_folder):
    root = make_folder({"a": 3})
    data = (root / "a" / "a001.png").read_bytes()
    (root / "a" / "a001.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"a001\.png: cannot read as png"):
        ImageFolderDataset(root, validate="full")


def test_nan_volume(tmp_path, make_volumes):
    root = tmp_path / "vols"
    make_volumes(root, 2)
    array = np.ones((1, 8, 10, 12), np.float32)
    array[0, 1, 2, 3] = np.nan
    array[0, 2, 2, 3] = np.inf
    write_image(root / "vol99.nii.gz", MedicalImage.from_array(array))
    ds = ImageFolderDataset(root)
    with pytest.raises(DataError, match=r"vol99.nii.gz: contains 2 NaN/Inf values"):
        ds[2]
    with pytest.raises(DataError, match=r"vol99.nii.gz: contains 2 NaN/Inf values"):
        ImageFolderDataset(root, validate="full")


def test_all_files_bad(make_folder):
    root = make_folder({"a": 1})
    (root / "a" / "a000.png").write_text("not a png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match="no usable images left after leaving out 1 bad file"):
            ImageFolderDataset(root, skip_bad=True)


def test_invalid_validate_mode(make_folder):
    with pytest.raises(ValueError, match="validate must be one of"):
        ImageFolderDataset(make_folder(1), validate="deep")


def test_split_indices_holds_out_a_fraction_of_every_class():
    labels = [0] * 10 + [1] * 4 + [2]
    kept, held = split_indices(labels, 0.2, seed=1)
    assert sorted(kept + held) == list(range(15)) and not set(kept) & set(held)
    held_labels = [labels[i] for i in held]
    assert held_labels.count(0) == 2 and held_labels.count(1) == 1 and 2 not in held_labels
    assert split_indices(labels, 0.2, seed=1) == (kept, held)
    assert split_indices(labels, 0.2, seed=2) != (kept, held)
    with pytest.raises(ValueError, match="between 0 and 1"):
        split_indices(labels, 1.0)


def test_dataset_subset_keeps_the_interface(make_folder):
    ds = ImageFolderDataset(make_folder({"a": 3, "b": 2}))
    subset = DatasetSubset(ds, [4, 0])
    assert len(subset) == 2 and subset.labels == [1, 0]
    assert subset.samples == (ds.samples[4], ds.samples[0])
    assert (subset.spatial_dims, subset.channels, subset.class_names) == (2, 1, ("a", "b"))
    item = subset[0]
    assert item["index"] == 0 and item["label"] == 1
    assert torch.equal(item["image"], ds[4]["image"])
    subset.set_epoch(3)
    assert ds.epoch == 3
    with pytest.raises(IndexError):
        DatasetSubset(ds, [5])


def test_open_alike_gives_every_folder_the_reference_size_and_names_a_misfit(tmp_path):
    from medfusion.data.dataset import open_alike

    rng = np.random.default_rng(0)
    for name, side in (("ref", 12), ("other", 20)):
        for label in ("a", "b"):
            write_image(tmp_path / name / label / "0.png", rng.integers(0, 255, (1, side, side), np.uint8))
    datasets, size = open_alike({"ref": tmp_path / "ref", "other": tmp_path / "other"}, DataConfig())
    assert size == (12, 12) and datasets["other"][0]["image"].shape == (1, 12, 12)
    write_image(tmp_path / "rgb" / "a" / "0.png", rng.integers(0, 255, (3, 12, 12), np.uint8))
    write_image(tmp_path / "rgb" / "a" / "1.png", rng.integers(0, 255, (3, 12, 12), np.uint8))
    with pytest.raises(
        ValueError, match=r"^--rgb .*rgb: 2D images with 3 channel\(s\), but ref .*ref holds 2D"
    ):
        open_alike({"ref": tmp_path / "ref", "rgb": tmp_path / "rgb"}, DataConfig(), names={"rgb": "--rgb"})
