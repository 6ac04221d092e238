"""The card of a synthetic dataset for sharing: what it says, in JSON and in words; file formats."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from medfusion.data import ImageFolderDataset, read_image
from medfusion.samplers import CARD, README, update_card, write_generated_dataset
from medfusion.samplers.card import DEFAULT_INTENDED_USE, NO_LICENCE, NO_PRIVACY_GUARANTEE, readme
from tests.samplers._toy_generator import ToyGenerator, toy_info, toy_net

TRAINING = {"files": 20, "counts": {"a": 12, "b": 8}, "format": "png", "dtype": "uint16", "modality": "CT"}


def _generator(spatial_dims: int = 2, **info_changes) -> ToyGenerator:
    info = dataclasses.replace(toy_info(spatial_dims), training_data=TRAINING, **info_changes)
    return ToyGenerator(toy_net(spatial_dims), info)


def _write(generator, out, **kwargs):
    return write_generated_dataset(generator, out, n=2, progress=False, log=lambda _: None, **kwargs)


def test_the_card_says_what_a_user_of_shared_data_needs(tmp_path):
    out = tmp_path / "synthetic"
    _write(_generator(), out, licence="CC-BY-4.0", intended_use="segmentation pretraining")
    card = json.loads((out / CARD).read_text())
    assert card["synthetic"] is True and "not acquired from any person" in card["statement"]
    assert card["privacy"] == NO_PRIVACY_GUARANTEE and card["licence"] == "CC-BY-4.0"
    assert card["intended_use"] == "segmentation pretraining"
    assert card["training_data"] == TRAINING
    # the toy model normalised each image on its own: the card says the scale is relative
    assert card["files"]["units"].startswith("a relative scale") and card["files"]["source_dtype"] == "uint16"
    text = (out / README).read_text()
    for expected in ("# Synthetic dataset", "CC-BY-4.0", "segmentation pretraining", "a 12, b 8", "CT",
                     card["model"]["sha256"], "a relative scale", "a 2, b 2"):  # fmt: skip
        assert expected in text, expected


def test_defaults_and_an_evaluation_added_later(tmp_path):
    out = tmp_path / "synthetic"
    _write(_generator(), out)
    card = json.loads((out / CARD).read_text())
    assert card["licence"] == NO_LICENCE and card["intended_use"] == DEFAULT_INTENDED_USE
    assert "None recorded" in (out / README).read_text()
    summary = {"fid": 12.5, "precision": 0.71, "memorisation": "no sample closer than the 1% quantile"}
    updated = update_card(out, evaluation=summary)
    assert json.loads((out / CARD).read_text()) == updated and updated["evaluation"] == summary
    text = (out / README).read_text()
    assert "**FID:** 12.5" in text and "**Precision:** 0.71" in text and "no sample closer" in text
    with pytest.raises(ValueError, match=f"no readable {CARD}"):
        update_card(tmp_path / "elsewhere", licence="x")


def test_a_model_in_source_units_says_so(tmp_path):
    normalization = {"normalization": "dataset", "bounds": [[999.0, 1385.0]], "per_channel": True}
    out = tmp_path / "synthetic"
    _write(_generator(normalization=normalization), out)
    card = json.loads((out / CARD).read_text())
    assert card["files"]["units"] == "the training data's units: Hounsfield units (CT)"
    assert card["files"]["dtype"] == "uint16" and card["files"]["suffix"] == ".png"
    values = np.concatenate([np.asarray(read_image(p).array).ravel() for p in out.glob("*/*.png")])
    assert values.min() >= 999 and values.max() <= 1385


def test_signed_2d_values_go_to_tiff_and_volumes_keep_their_direction(tmp_path):
    normalization = {"normalization": "window", "window": [-1000.0, 1000.0]}
    out = tmp_path / "ct2d"
    _write(_generator(normalization=normalization, source_dtype="int16"), out)
    files = sorted(out.glob("*/*"))
    assert files and all(p.suffix == ".tif" for p in files)
    assert read_image(files[0]).array.dtype == np.int16
    direction = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    out3 = tmp_path / "volumes"
    _write(_generator(3, direction=direction), out3)
    image = read_image(sorted(out3.glob("*/*.nii.gz"))[0])
    assert image.direction == pytest.approx(direction)
    assert json.loads((out3 / CARD).read_text())["files"]["direction"] == list(direction)


def test_file_formats_are_chosen_or_refused_by_name(tmp_path):
    _write(_generator(), tmp_path / "nifti", file_format="nifti")
    assert sorted(p.name for p in (tmp_path / "nifti" / "a").iterdir()) == ["000000.nii.gz", "000002.nii.gz"]
    _write(_generator(), tmp_path / "tif", file_format="tif")
    assert len(list((tmp_path / "tif").glob("*/*.tif"))) == 4
    with pytest.raises(ValueError, match="file_format must be 'auto' or one of"):
        _write(_generator(), tmp_path / "x", file_format="jpeg")
    with pytest.raises(ValueError, match="file_format 'png' holds 2D images; the model makes volumes"):
        _write(_generator(3), tmp_path / "y", file_format="png")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_readme_of_a_card_from_an_older_version():
    text = readme({"total": 4, "counts": {"a": 4}, "files": {"suffix": ".png"}, "model": {}})
    assert "not acquired from any person" in text and "Not recorded" in text


# DICOM output


def _ct_generator(spatial_dims: int, **changes) -> ToyGenerator:
    training = {**TRAINING, "dtype": "int16", "format": "dicom"}
    normalization = {"normalization": "window", "window": [-1000.0, 1000.0]}
    info = dataclasses.replace(
        toy_info(spatial_dims),
        normalization=normalization,
        source_dtype="int16",
        training_data=training,
        **changes,
    )
    return ToyGenerator(toy_net(spatial_dims), info)


def test_2d_dicom_files_hold_hounsfield_units_and_say_they_are_synthetic(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    out = tmp_path / "dicom"
    _write(_ct_generator(2), out, file_format="dicom")
    nifti = tmp_path / "nifti"
    _write(_ct_generator(2), nifti, file_format="nifti")
    files = sorted(out.glob("*/*.dcm"))
    assert [p.relative_to(out).as_posix() for p in files] == [
        "a/000000.dcm",
        "a/000002.dcm",
        "b/000001.dcm",
        "b/000003.dcm",
    ]
    for path in files:  # the same values as the NIfTI files of the same seeds, in HU
        same = nifti / path.relative_to(out).with_suffix(".nii.gz")
        np.testing.assert_array_equal(read_image(path).array, read_image(same).array)
    ds = pydicom.dcmread(files[0])
    assert (
        str(ds.PatientName) == "SYNTHETIC^a"
        and ds.Modality == "CT"
        and list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    )
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    other = pydicom.dcmread(files[-1])
    assert ds.StudyInstanceUID == other.StudyInstanceUID and ds.SOPInstanceUID != other.SOPInstanceUID
    # each image its own series, so that a class folder reads as 2D images, not as one volume
    assert len({pydicom.dcmread(p).SeriesInstanceUID for p in files}) == 4
    dataset = ImageFolderDataset(out)
    assert dataset.spatial_dims == 2 and len(dataset) == 4 and dataset.class_names == ("a", "b")
    card = json.loads((out / CARD).read_text())
    assert card["files"]["format"] == "dicom" and card["files"]["units"].endswith("Hounsfield units (CT)")
    # a rerun resumes: nothing is written twice
    again = _write(_ct_generator(2), out, file_format="dicom")
    assert (again.kept, again.written) == (4, 0)


def test_volumes_as_dicom_series_keep_the_training_geometry(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    direction = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    out = tmp_path / "series"
    generator = _ct_generator(3, direction=direction, spacing=(0.8, 0.7, 2.5))
    _write(generator, out, file_format="dicom")
    series = sorted(p for p in out.glob("*/*") if p.is_dir())
    assert [p.relative_to(out).as_posix() for p in series] == ["a/000000", "a/000002", "b/000001", "b/000003"]
    nifti = tmp_path / "nifti"
    _write(_ct_generator(3, direction=direction, spacing=(0.8, 0.7, 2.5)), nifti, file_format="nifti")
    for folder in series:
        image = read_image(folder)
        reference = read_image(nifti / f"{folder.relative_to(out).as_posix()}.nii.gz")
        np.testing.assert_array_equal(image.array, reference.array)
        assert image.spacing == pytest.approx((0.8, 0.7, 2.5)) and image.direction == pytest.approx(direction)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
        volume = reader.Execute()
        np.testing.assert_array_equal(sitk.GetArrayFromImage(volume), reference.array[0])
        assert volume.GetDirection() == pytest.approx(direction, abs=1e-4)
    # a damaged series (a slice gone) is written again on resume
    (series[0] / "000.dcm").unlink()
    again = _write(_ct_generator(3, direction=direction, spacing=(0.8, 0.7, 2.5)), out, file_format="dicom")
    assert (again.kept, again.written) == (3, 1)
    np.testing.assert_array_equal(read_image(series[0]).array, read_image(nifti / "a/000000.nii.gz").array)


def test_float_values_are_rescaled_into_16_bits(tmp_path):
    normalization = {"normalization": "dataset", "bounds": [[-3.5, 7.25]]}
    info = dataclasses.replace(toy_info(2), normalization=normalization, source_dtype="float32",
                               training_data={**TRAINING, "modality": "MR"})  # fmt: skip
    out = tmp_path / "mr"
    _write(ToyGenerator(toy_net(2), info), out, file_format="dicom")
    nifti = tmp_path / "nifti"
    _write(ToyGenerator(toy_net(2), info), nifti, file_format="nifti")
    path = out / "a" / "000000.dcm"
    np.testing.assert_allclose(read_image(path).array, read_image(nifti / "a/000000.nii.gz").array, atol=1e-3)
    pydicom = pytest.importorskip("pydicom")
    assert pydicom.dcmread(path).Modality == "OT"  # MR images carry no rescale: secondary capture


def test_rgb_histology_as_dicom_secondary_capture(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    import torch

    from tests.samplers._toy_generator import ToyNet

    training = {**TRAINING, "modality": "SM", "dtype": "uint8"}
    info = dataclasses.replace(
        toy_info(2),
        channels=3,
        source_dtype="uint8",
        normalization={"normalization": "dtype"},
        training_data=training,
    )
    torch.manual_seed(0)
    generator = ToyGenerator(ToyNet(2, channels=3).eval(), info)
    out, png = tmp_path / "histology", tmp_path / "png"
    _write(generator, out, file_format="dicom")
    _write(generator, png)
    path = out / "a" / "000000.dcm"
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and ds.PhotometricInterpretation == "RGB"
    assert ds.Modality == "SM" and str(ds.PatientName) == "SYNTHETIC^a"
    # the same 8-bit values as the PNG of the same seed
    np.testing.assert_array_equal(read_image(path).array, read_image(png / "a" / "000000.png").array)
    assert json.loads((out / CARD).read_text())["files"]["units"].startswith("the training data's units")


def test_an_older_model_says_its_scale_is_relative(tmp_path):
    lines = []
    write_generated_dataset(_generator(), tmp_path / "old", n=1, progress=False, log=lines.append)
    assert "normalised each training image on its own (percentile)" in "\n".join(lines)


def test_per_class_bounds_map_each_class_back_to_its_own_range(tmp_path):
    normalization = {"normalization": "dataset", "bounds": [[900.0, 32000.0]],
                     "class_bounds": {"a": [[900.0, 2000.0]], "b": [[28000.0, 32000.0]]}}  # fmt: skip
    out = tmp_path / "synthetic"
    _write(_generator(normalization=normalization), out)
    for label, (low, high) in (("a", (900, 2000)), ("b", (28000, 32000))):
        values = np.concatenate(
            [np.asarray(read_image(p).array).ravel() for p in (out / label).glob("*.png")]
        )
        assert values.min() >= low and values.max() <= high and np.ptp(values) > (high - low) / 4
    card = json.loads((out / CARD).read_text())
    assert card["files"]["intensity_per_class"]["a"].startswith("[-1, 1] -> [900, 2000] as uint16")
    with pytest.raises(ValueError, match=r"normalization.class_bounds\['a'\]\[0\] must be \[low, high\]"):
        dataclasses.replace(toy_info(2), normalization={**normalization, "class_bounds": {"a": [[5, 1]]}})


def test_a_left_handed_training_direction_gives_the_same_voxels_in_a_dicom_series(tmp_path):
    """DICOM orders slices along row x column: a left-handed direction (as NIfTI files often have)
    is written with its slices reversed and the origin at the other end: the same voxels in space."""
    sitk = pytest.importorskip("SimpleITK")
    direction = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    generator = _ct_generator(3, direction=direction, spacing=(1.0, 1.0, 2.0))
    _write(generator, tmp_path / "series", file_format="dicom")
    _write(generator, tmp_path / "nifti", file_format="nifti")
    reference = sitk.ReadImage(str(tmp_path / "nifti" / "a" / "000000.nii.gz"))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "series" / "a" / "000000")))
    series = reader.Execute()
    assert np.linalg.det(np.reshape(series.GetDirection(), (3, 3))) > 0
    on_grid = sitk.Resample(
        series, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, series.GetPixelID()
    )
    np.testing.assert_array_equal(sitk.GetArrayFromImage(on_grid), sitk.GetArrayFromImage(reference))
    flipped = np.asarray(read_image(tmp_path / "series" / "a" / "000000").array)[:, ::-1]
    np.testing.assert_array_equal(flipped, read_image(tmp_path / "nifti" / "a" / "000000.nii.gz").array)
