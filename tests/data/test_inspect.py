from __future__ import annotations

import numpy as np
import pytest

from medfusion.data import DataError, MedicalImage, inspect_dataset, write_image


def test_report_of_a_good_folder(make_folder, real_gray_16bit):
    root = make_folder({"a": 3, "b": 2})
    report = inspect_dataset(root, progress=False)
    assert report.usable and not report.problems
    summary = report.summary()
    assert summary["classes"] == {"a": 3, "b": 2}
    assert summary["spatial_dims"] == [2] and summary["channels"] == [1]
    assert summary["dtypes"] == {"uint16": 5} and summary["formats"] == {"png": 5}
    assert summary["shapes"] == "16x16 (5)"
    values = [r.value_range for r in report.records]
    assert summary["value_min"] == min(v[0] for v in values) and summary["value_max"] == max(
        v[1] for v in values
    )
    assert 0 <= summary["value_min"] < summary["value_max"] <= real_gray_16bit.max()
    text = report.format()
    assert "usable: yes" in text and "a                    3" in text


def test_headers_only_reads_no_values(make_folder):
    report = inspect_dataset(make_folder({"a": 2}), read_pixels=False, progress=False)
    assert report.usable and report.summary()["value_min"] is None
    assert "not read: headers only" in report.format()


def test_every_problem_is_named_with_its_file(make_folder, real_rgb, make_volumes):
    root = make_folder({"a": 4, "b": 4})
    (root / "a" / "notes.pdf").write_bytes(b"%PDF")
    (root / "a" / "fake.png").write_text("not an image")
    data = (root / "b" / "b000.png").read_bytes()
    (root / "b" / "b000.png").write_bytes(data[: len(data) // 2])
    write_image(root / "b" / "rgb.png", real_rgb[:, :16, :16])
    make_volumes(root / "b", 1)
    nan = np.zeros((1, 16, 16), np.float32)
    nan[0, 3, 3] = np.nan
    write_image(root / "a" / "nan.tif", nan)
    report = inspect_dataset(root, progress=False)
    assert not report.usable
    by_file = {p.path.rsplit("/", 1)[-1]: p.message for p in report.problems}
    assert set(by_file) == {"notes.pdf", "fake.png", "b000.png", "rgb.png", "vol00.nii.gz", "nan.tif"}
    assert "not an image or volume" in by_file["notes.pdf"]
    assert "not a readable image" in by_file["fake.png"]
    assert "truncated" in by_file["b000.png"]
    assert "has 3 channels while" in by_file["rgb.png"]
    assert "has 3 spatial dimensions while" in by_file["vol00.nii.gz"]
    assert "contains 1 NaN/Inf values" in by_file["nan.tif"]
    text = report.format()
    assert "problems found: 6" in text and "usable: NO" in text
    assert report.summary()["good_files"] == 7  # 8 PNGs less the truncated one


def test_skip_bad_makes_a_folder_with_good_files_usable(make_folder):
    root = make_folder({"a": 2})
    (root / "a" / "fake.png").write_text("not an image")
    report = inspect_dataset(root, skip_bad=True, progress=False)
    assert report.usable and len(report.problems) == 1
    assert "problems skipped: 1" in report.format()


def test_folder_with_only_bad_files_is_unusable(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.png").write_text("no")
    report = inspect_dataset(tmp_path / "d", skip_bad=True, progress=False)
    assert not report.usable and "no readable image" in report.format()


def test_zero_size_dimension(make_folder):
    nibabel = pytest.importorskip("nibabel")
    root = make_folder({"a": 2})
    nibabel.save(nibabel.Nifti1Image(np.zeros((0, 4, 4), np.float32), np.eye(4)), root / "a" / "empty.nii.gz")
    [problem] = inspect_dataset(root, progress=False).problems
    assert problem.path.endswith("empty.nii.gz") and "zero-size dimension: shape (0, 4, 4)" in problem.message


def test_notes_for_constant_images_and_a_single_class(tmp_path):
    write_image(tmp_path / "d" / "only" / "flat.png", np.full((1, 8, 8), 7, np.uint8))
    report = inspect_dataset(tmp_path / "d", progress=False)
    assert report.usable
    assert any("single constant value" in n for n in report.notes)
    assert any("only one class" in n for n in report.notes)


def test_volumes_report_spacing_range(tmp_path):
    for i, spacing in enumerate([(1.0, 1.0, 2.0), (0.5, 1.0, 3.0)]):
        image = MedicalImage.from_array(
            np.random.default_rng(i).normal(size=(1, 4, 5, 6)).astype(np.float32), spacing
        )
        write_image(tmp_path / "v" / f"{i}.nii.gz", image)
    summary = inspect_dataset(tmp_path / "v", progress=False).summary()
    assert summary["spatial_dims"] == [3]
    assert summary["spacing_min"] == [0.5, 1.0, 2.0] and summary["spacing_max"] == [1.0, 1.0, 3.0]


def test_unusable_folder_raises(tmp_path):
    with pytest.raises(DataError, match="folder does not exist"):
        inspect_dataset(tmp_path / "missing", progress=False)
