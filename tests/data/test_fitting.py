"""A dataset's intensity normalisation fitted once, inverted exactly on output; the geometry the
model trains at."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest

from medfusion.config import DataConfig
from medfusion.data import MedicalImage, read_image, write_image
from medfusion.data.dataset import ImageFolderDataset, build_transform
from medfusion.data.fitting import describe_training_data, fit_normalization, training_geometry
from medfusion.data.writers import intensity_mapping
from medfusion.utils import full_suffix
from tests.data._builders import gray_crops


def _folder(tmp_path, arrays: list[np.ndarray], suffix: str, spacing=None, name="data"):
    root = tmp_path / name
    for i, array in enumerate(arrays):
        image = MedicalImage.from_array(array, spacing=spacing) if spacing else array
        write_image(root / ("a" if i % 2 else "b") / f"{i:03d}{suffix}", image)
    return root


def _dataset(root, **kwargs) -> ImageFolderDataset:
    return ImageFolderDataset(root, validate="header", **kwargs)


def _round_trip(tmp_path, root, config: DataConfig) -> tuple[DataConfig, list[np.ndarray], list[np.ndarray]]:
    """Fit, normalise every file as training does, invert with the writer's mapping, write in the
    files' own format and read back. Returns the fitted config, the originals and what came back."""
    dataset = _dataset(root)
    fitted = fit_normalization(dataset, config)
    transform = build_transform(fitted)
    record = {
        "normalization": fitted.normalization,
        "window": list(fitted.window) if fitted.window else None,
        "bounds": [list(b) for b in fitted.bounds] if fitted.bounds else None,
    }
    originals, back = [], []
    for i, sample in enumerate(dataset.samples):
        suffix = full_suffix(sample.path)
        raw = read_image(sample.path)
        x = transform(raw, np.random.default_rng(0)).array.numpy()
        mapping = intensity_mapping(suffix, dataset.info.dtype, record)
        assert mapping.physical, mapping.describe()
        out = write_image(
            tmp_path / "back" / f"{i}{suffix}", MedicalImage.from_array(mapping(x), spacing=raw.spacing)
        )
        originals.append(np.asarray(raw.array))
        back.append(np.asarray(read_image(out).array))
    return fitted, originals, back


def test_auto_fits_the_range_of_16_bit_files_and_gives_their_values_back(tmp_path, real_gray_16bit):
    """HU + 1024 as uint16 PNG (the values of a head CT): the synthetic files come back in the
    same values and dtype, not stretched over 0..65535."""
    crops = [c // 8 + 999 for c in gray_crops(real_gray_16bit, 6, size=24)]
    root = _folder(tmp_path, crops, ".png")
    config = DataConfig(percentiles=(0.0, 100.0))
    fitted, originals, back = _round_trip(tmp_path, root, config)
    values = np.concatenate([c.ravel() for c in crops])
    assert fitted.normalization == "dataset"
    assert fitted.bounds == ((float(values.min()), float(values.max())),)
    for original, returned in zip(originals, back):
        assert returned.dtype == np.uint16
        np.testing.assert_array_equal(returned, original)


def test_the_fit_clips_to_the_percentiles_of_the_whole_set(tmp_path, real_gray_16bit):
    crops = gray_crops(real_gray_16bit, 8, size=24)
    dataset = _dataset(_folder(tmp_path, crops, ".png"))
    fitted = fit_normalization(dataset, DataConfig(percentiles=(1.0, 99.0)))
    values = np.concatenate([c.ravel() for c in crops]).astype(np.float64)
    expected = np.percentile(values, [1.0, 99.0])
    np.testing.assert_allclose(fitted.bounds[0], expected, rtol=1e-6)
    # one scale for every image: a dark and a bright crop keep their difference after normalising
    items = [dataset[i]["image"] for i in range(len(dataset))]
    dataset.transform = build_transform(fitted)
    fixed = [dataset[i]["image"] for i in range(len(dataset))]
    assert np.ptp([float(x.mean()) for x in fixed]) > 0.05
    assert not all(np.allclose(a, b) for a, b in zip(items, fixed))


@pytest.mark.parametrize(
    ("dtype", "suffix", "low", "high"),
    [("int16", ".nii.gz", -25, 592), ("float32", ".nii.gz", -3.5, 7.25), ("uint16", ".tif", 92, 59628)],
)
def test_round_trip_is_the_identity_for_every_type_and_format(tmp_path, dtype, suffix, low, high):
    rng = np.random.default_rng(1)
    shape = (1, 6, 8, 10) if suffix == ".nii.gz" else (1, 12, 10)
    arrays = [rng.uniform(low, high, size=shape) for _ in range(4)]
    arrays[0].flat[:2] = (low, high)
    arrays = [a.astype(dtype) for a in arrays]
    spacing = (1.0, 0.977, 0.977) if suffix == ".nii.gz" else None
    root = _folder(tmp_path, arrays, suffix, spacing=spacing)
    fitted, originals, back = _round_trip(tmp_path, root, DataConfig(percentiles=(0.0, 100.0)))
    assert fitted.normalization == "dataset"
    for original, returned in zip(originals, back):
        assert returned.dtype == np.dtype(dtype)
        if np.issubdtype(np.dtype(dtype), np.integer):
            np.testing.assert_array_equal(returned, original)
        else:
            np.testing.assert_allclose(returned, original, atol=1e-5 * (high - low))


def test_rgb_is_fitted_per_channel(tmp_path, real_rgb):
    crops = [(real_rgb[:, i : i + 16, i : i + 16].astype(np.uint16) * 200) for i in range(0, 64, 16)]
    root = _folder(tmp_path, crops, ".tif")
    fitted, originals, back = _round_trip(tmp_path, root, DataConfig(percentiles=(0.0, 100.0)))
    assert len(fitted.bounds) == 3 and len({b for b in fitted.bounds}) == 3
    for original, returned in zip(originals, back):
        np.testing.assert_array_equal(returned, original)
    pooled = fit_normalization(_dataset(root), DataConfig(per_channel=False))
    assert len(pooled.bounds) == 1


def test_auto_keeps_dtype_for_8_bit_and_window_for_ct(tmp_path, real_rgb):
    root = _folder(tmp_path, [real_rgb[:, :16, :16], real_rgb[:, 16:32, 16:32]], ".png")
    assert fit_normalization(_dataset(root), DataConfig()).normalization == "dtype"
    pydicom_data = pytest.importorskip("pydicom.data")
    ct = tmp_path / "ct" / "x"
    ct.mkdir(parents=True)
    shutil.copy(pydicom_data.get_testdata_file("CT_small.dcm"), ct / "ct.dcm")
    fitted = fit_normalization(_dataset(tmp_path / "ct"), DataConfig())
    assert fitted.normalization == "window" and fitted.bounds is None
    # a mode that is not fitted comes back as it is; fitted bounds are kept
    assert (
        fit_normalization(_dataset(root), DataConfig(normalization="percentile")).normalization
        == "percentile"
    )
    given = DataConfig(normalization="dataset", bounds=((0.0, 1.0),))
    assert fit_normalization(_dataset(root), given).bounds == ((0.0, 1.0),)


def test_bad_bounds_are_refused(tmp_path, real_rgb):
    root = _folder(tmp_path, [real_rgb[:, :16, :16]], ".png")
    with pytest.raises(ValueError, match=r"bounds hold 2 \(low, high\) pairs; .* has 3 channel"):
        fit_normalization(_dataset(root), DataConfig(normalization="dataset", bounds=((0, 1), (0, 1))))
    with pytest.raises(ValueError, match="bounds must be one"):
        DataConfig(normalization="dataset", bounds=((2.0, 1.0),))
    with pytest.raises(ValueError, match="fitted range of normalization 'dataset'"):
        DataConfig(normalization="window", bounds=((0.0, 1.0),))
    with pytest.raises(ValueError, match="needs the bounds fitted"):
        build_transform(DataConfig(normalization="dataset"))


def test_training_geometry_follows_the_transforms_and_warns_on_mixed_spacings(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(1, 6, 8, 10)).astype(np.float32) for _ in range(2)]
    root = _folder(tmp_path, arrays, ".nii.gz", spacing=(0.9, 0.8, 2.0))
    dataset = _dataset(root)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spacing, direction = training_geometry(dataset, DataConfig())
    assert spacing == pytest.approx((0.9, 0.8, 2.0)) and direction == pytest.approx(tuple(np.eye(3).ravel()))
    spacing, _ = training_geometry(dataset, DataConfig(resize=(3, 4, 5)))
    assert spacing == pytest.approx((1.8, 1.6, 4.0))  # half the voxels along each axis: twice the size
    write_image(root / "a" / "other.nii.gz", MedicalImage.from_array(arrays[0], spacing=(1.0, 1.0, 3.0)))
    with pytest.warns(UserWarning, match="2 different voxel spacings .* data.spacing is not set"):
        training_geometry(_dataset(root), DataConfig())


def test_describe_training_data(tmp_path, real_gray_16bit):
    root = _folder(tmp_path, gray_crops(real_gray_16bit, 5), ".png")
    described = describe_training_data(_dataset(root))
    assert described == {
        "files": 5,
        "counts": {"a": 2, "b": 3},
        "format": "png",
        "dtype": "uint16",
        "modality": "",
    }


def test_per_class_bounds_give_each_class_the_whole_range_and_its_values_back(tmp_path, real_gray_16bit):
    """Classes of very different ranges (e.g. CT around 1000 and X-ray around 30000) in one model."""
    crops = gray_crops(real_gray_16bit, 6, size=16)
    arrays = [c // 16 + (30000 if i % 2 else 900) for i, c in enumerate(crops)]  # class a: odd, b: even
    root = _folder(tmp_path, [a.astype(np.uint16) for a in arrays], ".png")
    dataset = _dataset(root)
    fitted = fit_normalization(dataset, DataConfig(fit_per_class=True, percentiles=(0.0, 100.0)))
    for name, members in (("a", arrays[1::2]), ("b", arrays[0::2])):
        values = np.concatenate([m.ravel() for m in members])
        assert fitted.class_bounds[name] == ((float(values.min()), float(values.max())),)
    assert fitted.bounds == ((float(min(a.min() for a in arrays)), float(max(a.max() for a in arrays))),)
    record = {"normalization": "dataset", "bounds": [list(fitted.bounds[0])],
              "class_bounds": {k: [list(v[0])] for k, v in fitted.class_bounds.items()}}  # fmt: skip
    transform = build_transform(fitted)
    seen: dict[str, list[np.ndarray]] = {"a": [], "b": []}
    for i in range(len(dataset)):
        image = dataset.read(i)
        x = transform(image, np.random.default_rng(0)).array.numpy()
        seen[image.label].append(x)
        mapping = intensity_mapping(".png", "uint16", record, image.label)
        np.testing.assert_array_equal(mapping(x), np.asarray(image.array))
    for values in seen.values():  # each class spans the whole range on its own
        assert min(v.min() for v in values) == -1.0 and max(v.max() for v in values) == 1.0
    assert training_geometry(dataset, fitted)[0] == pytest.approx((1.0, 1.0))  # a fitted config's geometry
    unlabelled = _folder(tmp_path, [arrays[0].astype(np.uint16)], ".png", name="flat")
    (unlabelled / "b" / "000.png").rename(unlabelled / "000.png")
    with pytest.raises(ValueError, match="fit_per_class needs a class for every file"):
        fit_normalization(ImageFolderDataset(unlabelled, labels="none"), DataConfig(fit_per_class=True))
