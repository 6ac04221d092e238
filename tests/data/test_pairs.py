"""Image/mask pairs: pairing by name, checks whose errors name the files, joint transforms that keep
image and mask aligned (one draw of randomness, nearest neighbour for masks), and inspection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medfusion.config import DataConfig
from medfusion.data import DataError, MedicalImage, read_image, write_image
from medfusion.data.pairs import PairedDataset, PairedSubset, discover_pairs, inspect_pairs, write_prediction
from tests.data._builders import write_ct_series


def blocks(shape: tuple[int, ...], side: int, seed: int, values: tuple[int, ...] = (0, 1)) -> np.ndarray:
    """A random pattern of ``side``-sided blocks, each holding one of ``values``."""
    rng = np.random.default_rng(seed)
    pattern = rng.choice(values, size=tuple(s // side for s in shape))
    for axis in range(len(shape)):
        pattern = np.repeat(pattern, side, axis=axis)
    return pattern


def write(path: Path, array: np.ndarray, spacing: tuple[float, ...] | None = None) -> Path:
    """Write a one-channel ``array`` (*spatial) with ``spacing`` (physical order)."""
    return write_image(path, MedicalImage.from_array(array[None], spacing=spacing))


def write_pair(
    root: Path,
    name: str,
    image: np.ndarray,
    mask: np.ndarray,
    suffix: str = ".png",
    mask_suffix: str | None = None,
    spacing: tuple[float, ...] | None = None,
    mask_spacing: tuple[float, ...] | None = None,
) -> tuple[Path, Path]:
    """``root/images/<name><suffix>`` and ``root/masks/<name><mask_suffix>``."""
    image_path = write(root / "images" / f"{name}{suffix}", image, spacing)
    mask_path = write(root / "masks" / f"{name}{mask_suffix or suffix}", mask, mask_spacing or spacing)
    return image_path, mask_path


def open_pairs(root: Path, **kwargs) -> PairedDataset:
    return PairedDataset(root / "images", root / "masks", **kwargs)


def as_u8(array: np.ndarray) -> np.ndarray:
    return array.astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# joint transforms keep image and mask aligned


def assert_aligned_over_draws(dataset: PairedDataset, shape: tuple[int, ...]) -> None:
    """Over several epochs, every mask equals the pattern recomputed from its transformed image
    (foreground where the normalised image is above 0), and the random draws do vary."""
    outcomes: dict[int, set[bytes]] = {i: set() for i in range(len(dataset))}
    for epoch in range(6):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            item = dataset[index]
            assert item["image"].shape == (1, *shape) and item["mask"].shape == shape
            assert item["mask"].dtype == torch.int64
            assert torch.equal(item["mask"], (item["image"][0] > 0).long()), (epoch, index)
            outcomes[index].add(item["mask"].numpy().tobytes())
    assert all(len(seen) > 2 for seen in outcomes.values())  # crops and flips really were drawn


@pytest.mark.parametrize(("resize", "crop"), [(32, 20), (8, 6)])
def test_2d_random_crop_flip_and_resize_keep_mask_on_the_image(tmp_path, resize, crop):
    for seed in range(2):
        pattern = blocks((16, 16), 4, seed)
        assert not any(np.array_equal(pattern, np.flip(pattern, axes)) for axes in (0, 1, (0, 1)))
        write_pair(tmp_path, f"case{seed}", as_u8(40 + 160 * pattern), as_u8(pattern))
    data = DataConfig(resize=(resize, resize), crop=(crop, crop), flip_axes=(0, 1), normalization="minmax")
    dataset = open_pairs(tmp_path, data=data, training=True)
    assert dataset.num_classes == 2 and dataset.spatial_dims == 2
    assert_aligned_over_draws(dataset, (crop, crop))


def test_3d_resample_random_crop_and_flip_keep_mask_on_the_volume(tmp_path):
    # spacing (x, y, z) = (0.5, 0.5, 2) resampled to 1: depth doubles (linear), height and width halve
    for seed in range(2):
        pattern = blocks((8, 16, 16), 4, seed)
        image = (10.0 + 90.0 * pattern).astype(np.float32)
        write_pair(tmp_path, f"vol{seed}", image, as_u8(pattern), ".nii.gz", spacing=(0.5, 0.5, 2.0))
    data = DataConfig(spacing=(1.0, 1.0, 1.0), crop=(12, 6, 6), flip_axes=(0, 1, 2), normalization="minmax")
    dataset = open_pairs(tmp_path, data=data, training=True)
    assert dataset.spatial_dims == 3
    assert_aligned_over_draws(dataset, (12, 6, 6))


def test_masks_are_resampled_by_nearest_neighbour_and_images_linearly(tmp_path):
    labels = (0, 1, 3)  # 0 beside 3 would give 1.5 (or 2 once rounded) if interpolated linearly
    plane = blocks((16, 16), 1, 0, labels)
    write_pair(tmp_path / "2d", "a", as_u8(50 * plane), as_u8(plane))
    volume = blocks((8, 8, 8), 1, 1, labels)
    write_pair(tmp_path / "3d", "a", (50.0 * volume).astype(np.float32), as_u8(volume), ".nii.gz")
    cases = [
        (tmp_path / "2d", DataConfig(resize=(23, 23), normalization="minmax"), (23, 23)),
        (tmp_path / "3d", DataConfig(spacing=(0.7, 1.3, 0.9), normalization="minmax"), (9, 6, 11)),
    ]
    for root, data, shape in cases:
        item = open_pairs(root, data=data, num_classes=4)[0]  # label 2 is never used
        assert item["mask"].shape == shape and item["mask"].dtype == torch.int64
        assert set(item["mask"].unique().tolist()) == set(labels)
        assert len(item["image"].unique()) > len(labels)  # the image was interpolated, not the mask


def test_mask_without_spacing_takes_its_image_geometry(tmp_path):
    # a PNG carries no spacing: the mask is resampled on its image's grid, not on a 1 mm one
    pattern = blocks((16, 16), 4, 3)
    write_pair(tmp_path, "a", as_u8(40 + 160 * pattern), as_u8(pattern), ".mha", ".png", spacing=(0.5, 0.5))
    data = DataConfig(spacing=(1.0, 1.0), normalization="minmax")
    item = open_pairs(tmp_path, data=data)[0]
    assert item["image"].shape == (1, 8, 8) and item["mask"].shape == (8, 8)
    assert torch.equal(item["mask"], (item["image"][0] > 0).long())


# ------------------------------------------------------------------------------------------------
# pairing by name


def test_pairs_match_by_name_across_suffixes_subfolders_and_dicom_series(tmp_path):
    volume, plane = np.zeros((4, 6, 6), np.float32), np.zeros((6, 6), np.uint8)
    write(tmp_path / "images" / "case_01.nii.gz", volume)
    write(tmp_path / "masks" / "case_01.nii.gz", volume)
    write(tmp_path / "images" / "case_02.png", plane)
    write(tmp_path / "masks" / "case_02.tif", plane)
    write(tmp_path / "images" / "sub" / "case_03.nii.gz", volume)
    write(tmp_path / "masks" / "sub" / "case_03.mha", volume)
    write_ct_series(tmp_path / "images" / "case_04", [0.0, 1.0])
    write(tmp_path / "masks" / "case_04.nii.gz", volume)
    pairs = discover_pairs(tmp_path / "images", tmp_path / "masks")
    assert [(p.name, Path(p.image).name, Path(p.mask).name) for p in pairs] == [
        ("case_01", "case_01.nii.gz", "case_01.nii.gz"),
        ("case_02", "case_02.png", "case_02.tif"),
        ("case_04", "case_04", "case_04.nii.gz"),
        ("sub/case_03", "case_03.nii.gz", "case_03.mha"),
    ]


def test_unmatched_names_are_listed_with_their_folder(tmp_path):
    plane = np.zeros((6, 6), np.uint8)
    for i in range(9):
        write(tmp_path / "images" / f"img{i}.png", plane)
    for i in (0, 1):
        write(tmp_path / "masks" / f"img{i}.png", plane)
    write(tmp_path / "masks" / "stray.png", plane)
    with pytest.raises(DataError) as error:
        discover_pairs(tmp_path / "images", tmp_path / "masks")
    message = str(error.value)
    assert (
        f"{tmp_path / 'images'}: 7 image(s) have no mask of the same name in {tmp_path / 'masks'}" in message
    )
    assert "img2, img3, img4, img5, img6 ... (7 in all)" in message and "img7" not in message
    assert f"{tmp_path / 'masks'}: 1 mask(s) have no image of the same name" in message
    assert message.rstrip().endswith("stray")


def test_two_files_of_one_name_are_an_error_naming_both(tmp_path):
    plane = np.zeros((6, 6), np.uint8)
    first = write(tmp_path / "images" / "case.png", plane)
    second = write(tmp_path / "images" / "case.tif", plane)
    write(tmp_path / "masks" / "case.png", plane)
    with pytest.raises(DataError) as error:
        discover_pairs(tmp_path / "images", tmp_path / "masks")
    message = str(error.value)
    assert "2 files are named 'case'" in message
    assert str(first.resolve()) in message and str(second.resolve()) in message
    assert "no image of the same name" not in message  # the mask is not blamed for the duplicate


# ------------------------------------------------------------------------------------------------
# checks when the dataset opens


def test_shape_mismatch_names_both_files_and_shapes(tmp_path):
    image, mask = write_pair(tmp_path, "a", np.zeros((16, 16), np.uint8), np.zeros((16, 12), np.uint8))
    with pytest.raises(DataError) as error:
        open_pairs(tmp_path)
    message = str(error.value)
    assert str(image.resolve()) in message and str(mask.resolve()) in message
    assert "spatial shape 16x12 (2D) differs from 16x16 (2D)" in message


def test_spacing_mismatch_names_both_files_and_spacings(tmp_path):
    volume = np.zeros((4, 6, 6), np.uint8)
    image, mask = write_pair(
        tmp_path, "a", volume, volume, ".nii.gz", spacing=(1.0, 1.0, 2.0), mask_spacing=(1.0, 1.0, 1.0)
    )
    write_pair(tmp_path, "b", volume, volume, ".nii.gz", spacing=(1.0, 1.0, 2.0))  # within tolerance
    with pytest.raises(DataError) as error:
        open_pairs(tmp_path)
    message = str(error.value)
    assert "1 problem(s)" in message and str(image.resolve()) in message and str(mask.resolve()) in message
    assert "spacing (1, 1, 1) differs from (1, 1, 2)" in message


def test_label_at_or_above_num_classes_names_the_file_and_value(tmp_path):
    write_pair(tmp_path, "ok", np.zeros((8, 8), np.uint8), as_u8(np.eye(8)))
    _, bad = write_pair(tmp_path, "bad", np.zeros((8, 8), np.uint8), as_u8(3 * np.eye(8)))
    with pytest.raises(DataError) as error:
        open_pairs(tmp_path, num_classes=2)
    message = str(error.value)
    assert f"{bad.resolve()}: holds label(s) 3 but num_classes is 2" in message and "ok.png" not in message
    assert open_pairs(tmp_path, num_classes=4).num_classes == 4


def test_non_integer_mask_names_the_file_and_a_value(tmp_path):
    mask = np.zeros((4, 6, 6), np.float32)
    mask[1, 2, 3] = 0.5
    _, path = write_pair(tmp_path, "a", np.zeros((4, 6, 6), np.float32), mask, ".nii.gz")
    with pytest.raises(DataError, match="non-integer") as error:
        open_pairs(tmp_path)
    assert f"{path.resolve()}: holds non-integer values (1 voxel(s), e.g. 0.5)" in str(error.value)


def test_multi_channel_mask_names_the_file(tmp_path):
    write(tmp_path / "images" / "a.png", np.zeros((8, 8), np.uint8))
    path = write_image(tmp_path / "masks" / "a.png", np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(DataError) as error:
        open_pairs(tmp_path)
    assert f"{path.resolve()}: has 3 channels; a mask is one label map" in str(error.value)


def test_empty_masks_are_refused_on_request_naming_each(tmp_path):
    plane = np.zeros((8, 8), np.uint8)
    empty = [write_pair(tmp_path, name, plane, plane)[1] for name in ("e1", "e2")]
    write_pair(tmp_path, "full", plane, as_u8(np.eye(8)))
    assert len(open_pairs(tmp_path)) == 3  # accepted by default
    with pytest.raises(DataError) as error:
        open_pairs(tmp_path, allow_empty=False)
    message = str(error.value)
    assert "2 problem(s)" in message and "full.png" not in message
    assert all(f"{path.resolve()}: is empty" in message for path in empty)


def test_bad_pairs_are_left_out_with_a_warning_when_skip_bad(tmp_path):
    write_pair(tmp_path, "good", np.zeros((8, 8), np.uint8), as_u8(np.eye(8)))
    write_pair(tmp_path, "bad", np.zeros((8, 8), np.uint8), np.zeros((8, 6), np.uint8))
    with pytest.warns(UserWarning, match="bad.png: spatial shape 8x6"):
        dataset = open_pairs(tmp_path, data=DataConfig(skip_bad=True))
    assert [p.name for p in dataset.pairs] == ["good"]


def test_num_classes_is_read_from_the_masks(tmp_path):
    write_pair(tmp_path, "a", np.zeros((8, 8), np.uint8), as_u8(np.eye(8)))
    write_pair(tmp_path, "b", np.zeros((8, 8), np.uint8), as_u8(2 * np.eye(8)[::-1]))
    dataset = open_pairs(tmp_path)
    assert dataset.num_classes == 3 and dataset.label_values == (0, 1, 2)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        open_pairs(tmp_path, num_classes=1)


def test_labels_missing_below_the_largest_are_an_error_unless_num_classes_is_given(tmp_path):
    write_pair(tmp_path, "a", np.zeros((8, 8), np.uint8), as_u8(255 * np.eye(8)))
    with pytest.raises(DataError, match=r"0/255.*num_classes=256") as error:
        open_pairs(tmp_path)
    assert "label(s) 1, 2, 3, 4, 5 ... (254 in all) appear in no mask" in str(error.value)
    assert open_pairs(tmp_path, num_classes=256).num_classes == 256


def test_training_without_crop_crops_every_item_to_the_first_size_padding_masks_with_background(tmp_path):
    write_pair(tmp_path, "a", as_u8(40 + 160 * np.eye(16)), as_u8(np.eye(16)))
    write_pair(tmp_path, "b", as_u8(40 + 160 * np.eye(12, 20)), as_u8(np.eye(12, 20)))
    training = open_pairs(tmp_path, data=DataConfig(normalization="minmax"), training=True)
    assert training.crop == (16, 16)
    for index in range(2):
        item = training[index]
        assert item["mask"].shape == (16, 16)
        # b is padded from 12 to 16 rows: -1 in the image, background (0) in the mask
        assert torch.equal(item["mask"], (item["image"][0] > 0).long())
    padded = training[1]
    rows = [0, 1, 14, 15]  # padding is centred
    assert (padded["image"][0, rows] == -1).all() and (padded["mask"][rows] == 0).all()
    assert open_pairs(tmp_path)[1]["mask"].shape == (12, 20)  # not training: sizes kept


# ------------------------------------------------------------------------------------------------
# subsets and predictions


def test_subset_and_prediction_keep_the_pairs_and_their_geometry(tmp_path):
    for seed in range(2):
        pattern = blocks((8, 8, 8), 2, seed)
        write_pair(
            tmp_path, f"v{seed}", pattern.astype(np.float32), as_u8(pattern), ".nii.gz", spacing=(1, 1, 2)
        )
    dataset = open_pairs(tmp_path, data=DataConfig(spacing=(1.0, 1.0, 1.0)))
    subset = PairedSubset(dataset, [1])
    assert len(subset) == 1 and subset[0]["index"] == 0 and subset[0]["mask_path"] == dataset[1]["mask_path"]
    item = dataset[1]
    path = write_prediction(dataset, 1, item["mask"], tmp_path / "predictions")
    assert path == tmp_path / "predictions" / "v1.nii.gz"
    written = read_image(path)
    assert written.spacing == pytest.approx((1.0, 1.0, 1.0)) and written.spatial_shape == (16, 8, 8)
    assert np.array_equal(written.array[0], item["mask"].numpy())


# ------------------------------------------------------------------------------------------------
# inspection


def test_inspect_reports_labels_fractions_empty_masks_unmatched_and_geometry(tmp_path):
    plane = np.zeros((16, 16), np.uint8)
    a = plane.copy()
    a[:8, :8] = 1  # 64 voxels of 1
    b = plane.copy()
    b[:4, :8] = 2  # 32 voxels of 2
    b[8:12, 8:12] = 1  # 16 voxels of 1
    write_pair(tmp_path, "a", plane, a)
    _, b_path = write_pair(tmp_path, "b", plane, b)
    _, c_path = write_pair(tmp_path, "c", plane, plane)  # empty
    d_image, d_mask = write_pair(tmp_path, "d", plane, np.zeros((16, 12), np.uint8))  # empty, other shape
    write(tmp_path / "images" / "lonely.png", plane)
    report = inspect_pairs(tmp_path / "images", tmp_path / "masks")
    total = 3 * 256 + 16 * 12
    assert len(report.pairs) == 4 and report.num_classes == 3 and report.label_values == (0, 1, 2)
    assert report.class_voxels == {0: total - 64 - 16 - 32, 1: 64 + 16, 2: 32}
    assert report.class_fractions == pytest.approx({0: 848 / 960, 1: 80 / 960, 2: 32 / 960})
    assert report.empty_masks == (str(c_path.resolve()), str(d_mask.resolve()))
    assert report.unmatched_images == ("lonely",) and report.unmatched_masks == ()
    (geometry,) = report.geometry
    assert geometry.path == str(d_mask.resolve()) and str(d_image.resolve()) in geometry.message
    assert not report.usable and report.problems == ()
    summary = report.summary()
    assert summary["pairs"] == 4 and summary["label_values"] == [0, 1, 2]
    assert summary["class_fractions"][1] == pytest.approx(80 / 960)
    text = report.format()
    assert "lonely" in text and "geometry problems: 1" in text and "2: 3.33%" in text
    # a given num_classes makes larger labels problems, collected rather than raised
    (problem,) = inspect_pairs(tmp_path / "images", tmp_path / "masks", num_classes=2).problems
    assert (
        problem.path == str(b_path.resolve()) and "holds label(s) 2 but num_classes is 2" in problem.message
    )
