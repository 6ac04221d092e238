"""Tests for medfusion.data.dicom: synthetic DICOM files and series that read back as written,
say they are synthetic, carry every required attribute of their IOD, and refuse bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import UID

from medfusion.data import dicom
from medfusion.data.dicom import (
    CT_IMAGE_STORAGE,
    MR_IMAGE_STORAGE,
    PRIVATE_CREATOR,
    PRIVATE_GROUP,
    SECONDARY_CAPTURE_IMAGE_STORAGE,
    SyntheticDicomInfo,
    right_handed,
    sop_class_for,
    write_dicom_image,
    write_dicom_series,
)
from medfusion.data.readers import read_image

# pydicom warns (rather than raises) when a value breaks its VR (too long, bad characters): fail on it
pytestmark = pytest.mark.filterwarnings("error::UserWarning")

SHA = "ab" * 32
ROT_Z_90 = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # x -> +y, y -> -x
FLIP_XY = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # RAS-like axes in LPS (determinant +1)


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def ct_info(**changes) -> SyntheticDicomInfo:
    return SyntheticDicomInfo(
        **{"class_name": "liver", "seed": 42, "modality": "CT", "model_sha256": SHA, **changes}
    )


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


# --------------------------------------------------------------------------------------------
# Round trips


def test_ct_image_reads_back_in_hounsfield_units_and_says_it_is_synthetic(tmp_path, rng):
    stored = rng.integers(0, 4096, size=(1, 16, 12)).astype(np.uint16)
    path = write_dicom_image(
        tmp_path / "liver" / "000.dcm", stored, ct_info(), spacing=(0.5, 0.75), intercept=-1024
    )
    image = read_image(path)
    np.testing.assert_array_equal(image.array.astype(np.int64), stored.astype(np.int64) - 1024)
    assert image.spacing == (0.5, 0.75)
    assert image.modality == "CT"

    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == CT_IMAGE_STORAGE == ds.file_meta.MediaStorageSOPClassUID
    assert str(ds.PatientName) == "SYNTHETIC^liver"
    assert ds.PatientID == "SYNTHETIC-liver-42"
    assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert ds.Modality == "CT" and ds.Manufacturer == "medfusion" and ds.BurnedInAnnotation == "NO"
    assert [float(v) for v in ds.PixelSpacing] == [0.75, 0.5]  # row spacing (y) \ column spacing (x)
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)
    uids = [ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.FrameOfReferenceUID]
    assert all(UID(u).is_valid for u in uids) and len(set(uids)) == 4
    assert SHA in ds.DerivationDescription and "seed 42" in ds.DerivationDescription
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    assert (block[0x03].value, block[0x04].value, block[0x02].value) == ("42", SHA, "liver")
    assert list(tmp_path.joinpath("liver").iterdir()) == [path]  # no temporary file left


def test_rgb_histology_is_secondary_capture_and_reads_back_equal(tmp_path, rng):
    rgb = rng.integers(0, 256, size=(3, 16, 12)).astype(np.uint8)
    info = SyntheticDicomInfo("tumour", 3, modality="SM")
    path = write_dicom_image(tmp_path / "a.dcm", rgb, info, spacing=(0.25, 0.25))
    image = read_image(path)
    assert image.array.dtype == np.uint8
    np.testing.assert_array_equal(image.array, rgb)
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == SECONDARY_CAPTURE_IMAGE_STORAGE
    assert (ds.PhotometricInterpretation, ds.PlanarConfiguration, ds.Modality) == ("RGB", 0, "SM")
    assert ds.ConversionType == "SYN"


def test_odd_sized_8bit_grey_image_reads_back(tmp_path, rng):
    grey = rng.integers(0, 256, size=(1, 5, 3)).astype(np.uint8)  # 15 bytes: padded to even
    path = write_dicom_image(tmp_path / "x.dcm", grey, SyntheticDicomInfo("normal", 1, modality="DX"))
    np.testing.assert_array_equal(read_image(path).array, grey)
    assert pydicom.dcmread(path).SOPClassUID == SECONDARY_CAPTURE_IMAGE_STORAGE


def _sitk_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


@pytest.mark.parametrize(
    ("direction", "dtype", "slope", "intercept"),
    [(ROT_Z_90, "uint16", 1.0, -1024.0), (FLIP_XY, "int16", 0.5, 10.0)],
    ids=["rotated-uint16", "flipped-int16-scaled"],
)
def test_ct_series_reads_back_through_medfusion_and_simpleitk(
    tmp_path, rng, direction, dtype, slope, intercept
):
    info = np.iinfo(dtype)
    volume = rng.integers(max(info.min, -2000), min(info.max, 3000), size=(1, 5, 16, 12)).astype(dtype)
    spacing, origin = (0.8, 0.7, 2.5), (12.5, -30.0, 100.25)
    folder = write_dicom_series(
        tmp_path / "case",
        volume,
        ct_info(),
        spacing=spacing,
        origin=origin,
        direction=direction,
        slope=slope,
        intercept=intercept,
    )
    expected = volume.astype(np.float64) * slope + intercept

    image = read_image(folder)
    np.testing.assert_allclose(image.array.astype(np.float64), expected, atol=1e-6)
    np.testing.assert_allclose(image.spacing, spacing, atol=1e-4)
    np.testing.assert_allclose(image.origin, origin, atol=1e-4)
    np.testing.assert_allclose(image.direction, direction, atol=1e-4)

    itk = _sitk_series(folder)
    np.testing.assert_allclose(sitk.GetArrayFromImage(itk)[None].astype(np.float64), expected, atol=1e-6)
    np.testing.assert_allclose(itk.GetSpacing(), spacing, atol=1e-4)
    np.testing.assert_allclose(itk.GetOrigin(), origin, atol=1e-4)
    np.testing.assert_allclose(itk.GetDirection(), direction, atol=1e-4)

    files = _files(folder)
    assert [f.name for f in files] == [f"{k:03d}.dcm" for k in range(5)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case"]  # the temporary folder is gone
    slices = [pydicom.dcmread(f) for f in files]
    for attr in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert len({s[attr].value for s in slices}) == 1
    assert len({s.SOPInstanceUID for s in slices}) == 5
    normal = np.asarray(direction).reshape(3, 3)[:, 2]
    for k, s in enumerate(slices):
        assert s.InstanceNumber == k + 1
        np.testing.assert_allclose([float(v) for v in s.ImagePositionPatient], origin + k * 2.5 * normal)
        assert float(s.SliceThickness) == float(s.SpacingBetweenSlices) == 2.5
        assert float(s.SliceLocation) == pytest.approx(float(np.dot(origin, normal)) + 2.5 * k)


def test_left_handed_direction_is_refused_and_right_handed_keeps_the_voxels(tmp_path, rng):
    volume = rng.integers(0, 1000, size=(1, 4, 6, 5)).astype(np.uint16)
    flip_y = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # determinant -1
    with pytest.raises(ValueError, match="direction must be right-handed"):
        write_dicom_series(tmp_path / "s", volume, ct_info(), direction=flip_y)
    assert not (tmp_path / "s").exists()

    spacing, origin = (1.0, 1.0, 2.0), (0.0, 0.0, 5.0)
    flipped, new_origin, new_direction = right_handed(volume, spacing, origin, flip_y)
    image = read_image(
        write_dicom_series(tmp_path / "s", flipped, ct_info(), spacing, new_origin, new_direction)
    )
    # the same physical voxel: index (i, j, k) of the original sits at (i, j, D-1-k) of the copy
    np.testing.assert_array_equal(image.array[:, ::-1], volume)
    np.testing.assert_allclose(image.origin, (0.0, 0.0, 11.0))
    assert np.linalg.det(np.reshape(image.direction, (3, 3))) == pytest.approx(1.0)


def test_shared_study_and_series_uids(tmp_path, rng):
    from pydicom.uid import generate_uid

    study, series = generate_uid(), generate_uid()
    grey = rng.integers(0, 100, size=(1, 4, 4)).astype(np.uint16)
    paths = [
        write_dicom_image(tmp_path / f"{i}.dcm", grey, ct_info(seed=i, study_uid=study, series_uid=series))
        for i in range(2)
    ]
    a, b = (pydicom.dcmread(p) for p in paths)
    assert a.StudyInstanceUID == b.StudyInstanceUID == study
    assert a.SeriesInstanceUID == b.SeriesInstanceUID == series
    assert a.FrameOfReferenceUID == b.FrameOfReferenceUID
    assert a.SOPInstanceUID != b.SOPInstanceUID and a.PatientID != b.PatientID
    alone = pydicom.dcmread(write_dicom_image(tmp_path / "c.dcm", grey, ct_info()))
    assert alone.StudyInstanceUID != study and alone.SeriesInstanceUID != series


def test_class_names_are_cleaned_and_unicode_survives(tmp_path):
    grey = np.zeros((1, 4, 4), np.uint8)
    ds = pydicom.dcmread(write_dicom_image(tmp_path / "a.dcm", grey, SyntheticDicomInfo("Läsion^a\\b=c", 5)))
    assert str(ds.PatientName) == "SYNTHETIC^Läsion_a_b_c"
    assert ds.PatientID == "SYNTHETIC-Läsion_a_b_c-5"
    long = SyntheticDicomInfo("x" * 2000, 2**64 - 1)
    assert len(long.patient_id) == 64 and long.patient_id.endswith(f"-{2**64 - 1}")
    assert len(long.patient_name) == 64
    ds = pydicom.dcmread(write_dicom_image(tmp_path / "long.dcm", grey, long))  # within every VR's length
    assert str(ds.PatientName).startswith("SYNTHETIC^xxx") and len(ds.DerivationDescription) < 1024


def test_sop_class_for_each_modality_and_channel_count():
    assert sop_class_for("CT") == CT_IMAGE_STORAGE
    assert sop_class_for("MR", 1) == MR_IMAGE_STORAGE
    for modality in ("DX", "CR", "OT", "SM", "OP"):
        assert sop_class_for(modality) == SECONDARY_CAPTURE_IMAGE_STORAGE
    assert sop_class_for("CT", 3) == SECONDARY_CAPTURE_IMAGE_STORAGE
    with pytest.raises(ValueError, match="channels must be 1"):
        sop_class_for("CT", 2)


# --------------------------------------------------------------------------------------------
# Required attributes of each IOD written (in the spirit of dciodvfy): (keyword, type)

PATIENT = [("PatientName", 2), ("PatientID", 2), ("PatientBirthDate", 2), ("PatientSex", 2)]
GENERAL_STUDY = [
    ("StudyInstanceUID", 1),
    ("StudyDate", 2),
    ("StudyTime", 2),
    ("ReferringPhysicianName", 2),
    ("StudyID", 2),
    ("AccessionNumber", 2),
]
GENERAL_SERIES = [("Modality", 1), ("SeriesInstanceUID", 1), ("SeriesNumber", 2)]
GENERAL_EQUIPMENT = [("Manufacturer", 2)]
GENERAL_IMAGE = [("InstanceNumber", 2), ("ContentDate", 2), ("ContentTime", 2)]
IMAGE_PIXEL = [
    ("SamplesPerPixel", 1),
    ("PhotometricInterpretation", 1),
    ("Rows", 1),
    ("Columns", 1),
    ("BitsAllocated", 1),
    ("BitsStored", 1),
    ("HighBit", 1),
    ("PixelRepresentation", 1),
    ("PixelData", 1),
]
SOP_COMMON = [("SOPClassUID", 1), ("SOPInstanceUID", 1), ("SpecificCharacterSet", 1)]
FRAME_OF_REFERENCE = [("FrameOfReferenceUID", 1), ("PositionReferenceIndicator", 2)]
IMAGE_PLANE = [
    ("PixelSpacing", 1),
    ("ImageOrientationPatient", 1),
    ("ImagePositionPatient", 1),
    ("SliceThickness", 2),
]
CT_IMAGE = [
    ("ImageType", 1),
    ("RescaleIntercept", 1),
    ("RescaleSlope", 1),
    ("KVP", 2),
    ("AcquisitionNumber", 2),
]
MR_IMAGE = [
    ("ImageType", 1),
    ("ScanningSequence", 1),
    ("SequenceVariant", 1),
    ("ScanOptions", 2),
    ("MRAcquisitionType", 2),
    ("RepetitionTime", 2),
    ("EchoTime", 2),
    ("EchoTrainLength", 2),
]
SC_EQUIPMENT = [("ConversionType", 1)]
COMMON = (
    PATIENT + GENERAL_STUDY + GENERAL_SERIES + GENERAL_EQUIPMENT + GENERAL_IMAGE + IMAGE_PIXEL + SOP_COMMON
)
# Patient Position is Type 2C for CT and MR; Patient Orientation is Type 2C without an Image Plane
REQUIRED = {
    CT_IMAGE_STORAGE: [*COMMON, ("PatientPosition", 2), *FRAME_OF_REFERENCE, *IMAGE_PLANE, *CT_IMAGE],
    MR_IMAGE_STORAGE: [*COMMON, ("PatientPosition", 2), *FRAME_OF_REFERENCE, *IMAGE_PLANE, *MR_IMAGE],
    SECONDARY_CAPTURE_IMAGE_STORAGE: [*COMMON, ("PatientOrientation", 2), *SC_EQUIPMENT],
}


def _write_cases(folder: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 500, size=(1, 6, 4)).astype(np.uint16)
    volume = rng.integers(0, 500, size=(1, 3, 6, 4)).astype(np.int16)
    rgb = rng.integers(0, 256, size=(3, 6, 4)).astype(np.uint8)
    paths = [
        write_dicom_image(folder / "ct.dcm", grey, ct_info(), intercept=-1024),
        write_dicom_image(folder / "mr.dcm", grey.astype(np.uint8), ct_info(modality="MR")),
        write_dicom_image(folder / "dx.dcm", grey, ct_info(modality="DX"), slope=2.0),
        write_dicom_image(folder / "rgb.dcm", rgb, ct_info()),
    ]
    for modality in ("CT", "MR", "OT"):
        paths += _files(
            write_dicom_series(folder / modality, volume, ct_info(modality=modality), direction=ROT_Z_90)
        )
    return paths


def test_every_required_attribute_is_present(tmp_path):
    classes = set()
    for path in _write_cases(tmp_path):
        ds = pydicom.dcmread(path)
        classes.add(ds.SOPClassUID)
        required = list(REQUIRED[ds.SOPClassUID])
        if ds.SamplesPerPixel > 1:
            required.append(("PlanarConfiguration", 1))  # Type 1C
        if "RescaleIntercept" in ds and ds.SOPClassUID == SECONDARY_CAPTURE_IMAGE_STORAGE:
            required += [("RescaleSlope", 1), ("RescaleType", 1)]  # Modality LUT, Type 1C
        missing = [key for key, _ in required if key not in ds]
        empty = [
            key for key, kind in required if kind == 1 and key in ds and ds[key].value in (None, "", b"", [])
        ]
        assert not missing and not empty, f"{path.name}: missing {missing}, empty Type 1 {empty}"
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        if ds.SOPClassUID in (CT_IMAGE_STORAGE, MR_IMAGE_STORAGE):  # enumerated values of their IODs
            pixel = (ds.BitsAllocated, ds.SamplesPerPixel, ds.PhotometricInterpretation)
            assert pixel == (16, 1, "MONOCHROME2")
    assert classes == set(REQUIRED)


# --------------------------------------------------------------------------------------------
# Bad input

GREY = np.zeros((1, 4, 4), np.uint16)
VOLUME = np.zeros((1, 2, 4, 4), np.uint16)


@pytest.mark.parametrize(
    ("kind", "changes", "match"),
    [
        ("image", {"array": GREY.astype(np.float32)}, "array must hold stored integer values"),
        ("image", {"array": np.zeros((2, 4, 4), np.uint8)}, "array must have 1 .* or 3 .* channels"),
        ("image", {"array": np.zeros((4, 4, 4), np.uint8)}, "array must have 1 .* or 3 .* channels"),
        ("image", {"array": np.zeros((3, 4, 4), np.uint16)}, "array with 3 channels .* must be uint8"),
        ("image", {"array": np.zeros((4, 4), np.uint16)}, r"array must have shape \(C, H, W\)"),
        ("image", {"slope": 0.0}, "slope must not be 0"),
        ("image", {"spacing": (1.0, 0.0)}, "spacing must be > 0"),
        ("image", {"spacing": (1.0, -2.0)}, "spacing must be > 0"),
        ("image", {"path": "x.png"}, "path must end in .dcm"),
        (
            "image",
            {"info": ct_info(modality="MR"), "intercept": -1024.0},
            "slope and intercept must be 1 and 0",
        ),
        ("series", {"volume": VOLUME.astype(np.float64)}, "volume must hold stored integer values"),
        ("series", {"volume": np.zeros((3, 2, 4, 4), np.uint8)}, "volume must have one channel"),
        ("series", {"direction": (1.0, 0, 0, 0, 2.0, 0, 0, 0, 1.0)}, "direction must be an orthonormal"),
        ("series", {"direction": (1.0, 0, 0, 1.0, 0, 0, 0, 0, 1.0)}, "direction must be an orthonormal"),
        ("series", {"direction": (1.0, 0, 0)}, "direction must be 9 finite numbers"),
        ("series", {"slope": 0}, "slope must not be 0"),
        ("series", {"spacing": (1.0, 1.0, 0.0)}, "spacing must be > 0"),
        ("series", {"origin": (0.0, float("nan"), 0.0)}, "origin must be 3 finite numbers"),
    ],
)
def test_bad_input_names_the_argument(tmp_path, kind, changes, match):
    if kind == "image":
        args = {"path": tmp_path / "a.dcm", "array": GREY, "info": ct_info(), **changes}
        args["path"] = tmp_path / args["path"]
        with pytest.raises(ValueError, match=match):
            write_dicom_image(**args)
    else:
        args = {"folder": tmp_path / "s", "volume": VOLUME, "info": ct_info(), **changes}
        with pytest.raises(ValueError, match=match):
            write_dicom_series(**args)
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"class_name": ""}, "class_name must be a non-empty string"),
        ({"seed": -1}, "seed must be a whole number"),
        ({"seed": 2**64}, "seed must be a whole number"),
        ({"modality": "ct scan"}, "modality must be a DICOM modality code"),
        ({"model_sha256": "abc"}, "model_sha256 must be 64 hex digits"),
        ({"study_uid": "1.2.x"}, "study_uid must be a valid DICOM UID"),
        ({"series_uid": "01.2"}, "series_uid must be a valid DICOM UID"),
    ],
)
def test_bad_info_names_the_field(changes, match):
    with pytest.raises(ValueError, match=match):
        ct_info(**changes)


def test_existing_series_folder_is_refused_and_left_alone(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"folder .* already exists"):
        write_dicom_series(folder, VOLUME, ct_info())
    assert [p.name for p in folder.iterdir()] == ["keep.txt"]
    assert (folder / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


# --------------------------------------------------------------------------------------------
# Atomicity and read-back verification


def test_interrupted_series_leaves_nothing(tmp_path, monkeypatch):
    saved = []
    original = dicom._save

    def failing_save(ds, path):
        if len(saved) == 2:
            raise OSError(28, "No space left on device")
        saved.append(path)
        original(ds, path)

    monkeypatch.setattr(dicom, "_save", failing_save)
    with pytest.raises(OSError, match="s: cannot write: No space left"):
        write_dicom_series(tmp_path / "s", np.zeros((1, 4, 3, 3), np.uint16), ct_info())
    assert len(saved) == 2
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["image", "series"])
def test_a_file_that_reads_back_differently_is_not_kept(tmp_path, monkeypatch, kind):
    import medfusion.data.readers as readers

    real = readers.read_image

    def shifted(path, check_finite=True):
        image = real(path, check_finite)
        return image.replace(array=image.array + 1)

    monkeypatch.setattr(readers, "read_image", shifted)
    target = tmp_path / ("a.dcm" if kind == "image" else "s")
    with pytest.raises(OSError, match=f"{target.name}: cannot write: reads back with other values"):
        if kind == "image":
            write_dicom_image(target, GREY, ct_info())
        else:
            write_dicom_series(target, VOLUME, ct_info())
    assert list(tmp_path.iterdir()) == []
