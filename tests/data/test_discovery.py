from __future__ import annotations

import re
from pathlib import Path

import pytest

from medfusion.data import DataError, discover
from tests.data._builders import write_ct_series


def test_labels_from_first_level_folders(make_folder):
    root = make_folder({"tumor": 3, "normal": 2})
    found = discover(root)
    assert found.label_source == "folders"
    assert found.class_names == ("normal", "tumor")  # sorted, stable
    assert sorted(s.relpath for s in found.samples)[0] == "normal/normal000.png"
    assert {s.label for s in found.samples} == {"normal", "tumor"}
    assert len(found.samples) == 5 and not found.problems


def test_nested_folders_take_the_first_level_as_class(make_folder, tmp_path):
    root = make_folder({"a": 1})
    (root / "a" / "deeper").mkdir()
    (root / "a" / "a000.png").rename(root / "a" / "deeper" / "x.png")
    found = discover(root)
    assert [(s.relpath, s.label) for s in found.samples] == [("a/deeper/x.png", "a")]


def test_flat_folder_is_unlabelled(make_folder):
    found = discover(make_folder(4))
    assert found.label_source == "none" and found.class_names == ()
    assert all(s.label is None for s in found.samples)


def test_labels_none_ignores_folder_names(make_folder):
    found = discover(make_folder({"a": 2, "b": 2}), labels="none")
    assert found.class_names == () and len(found.samples) == 4


def test_hidden_and_sidecar_files(make_folder):
    root = make_folder({"a": 2})
    (root / ".DS_Store").write_bytes(b"\0\1")
    (root / ".cache").mkdir()
    (root / ".cache" / "junk.bin").write_bytes(b"x")
    (root / "a" / "a000.json").write_text("{}")
    found = discover(root)
    assert len(found.samples) == 2 and not found.problems
    assert found.ignored == ("a/a000.json",)


def test_missing_folder_and_file_instead_of_folder(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'nope'}: folder does not exist")):
        discover(tmp_path / "nope")
    (tmp_path / "f.png").write_bytes(b"x")
    with pytest.raises(DataError, match="not a folder"):
        discover(tmp_path / "f.png")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'empty'}: no images or volumes found")):
        discover(tmp_path / "empty")
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match=r"no images or volumes found \(1 other files ignored\)"):
        discover(tmp_path / "empty")


def test_non_image_file_among_images_is_a_problem(make_folder):
    root = make_folder({"a": 2})
    (root / "a" / "report.pdf").write_bytes(b"%PDF-1.4")
    found = discover(root)
    assert len(found.samples) == 2
    [problem] = found.problems
    assert problem.path.endswith("report.pdf") and "not an image or volume" in problem.message


def test_top_level_file_beside_class_folders_is_a_problem(make_folder):
    root = make_folder({"a": 2})
    (root / "a" / "a000.png").rename(root / "stray.png")
    found = discover(root)
    [problem] = found.problems
    assert problem.path.endswith("stray.png") and "class subfolders" in problem.message


def _write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_labels_csv(make_folder, tmp_path):
    root = make_folder(3)
    csv = _write_csv(tmp_path / "labels.csv", "path,label\nimg000.png,b\nimg001.png,a\nimg002.png,b\n")
    found = discover(root, labels=csv)
    assert found.label_source == "csv" and found.class_names == ("a", "b")
    assert {s.relpath: s.label for s in found.samples} == {
        "img000.png": "b",
        "img001.png": "a",
        "img002.png": "b",
    }
    assert not found.problems


def test_labels_csv_absolute_paths_and_bom(make_folder, tmp_path):
    root = make_folder(1)
    csv = tmp_path / "labels.csv"
    csv.write_text(f"path,label\n{(root / 'img000.png').resolve()},x\n", encoding="utf-8-sig")
    assert [s.label for s in discover(root, labels=csv).samples] == ["x"]


@pytest.mark.parametrize(
    "header, message",
    [
        ("file,label", "missing ['path']"),
        ("path,label,site", "unknown ['site']"),
        ("path", "missing ['label']"),
    ],
)
def test_labels_csv_with_wrong_columns(make_folder, tmp_path, header, message):
    root = make_folder(1)
    csv = _write_csv(tmp_path / "labels.csv", f"{header}\nimg000.png,a,b\n")
    with pytest.raises(
        DataError, match=re.escape(f"{csv}: labels CSV must have exactly the columns path,label")
    ) as e:
        discover(root, labels=csv)
    assert message in str(e.value)


def test_labels_csv_that_does_not_exist(make_folder, tmp_path):
    with pytest.raises(DataError, match="labels CSV does not exist"):
        discover(make_folder(1), labels=tmp_path / "nope.csv")


def test_labels_csv_naming_missing_files(make_folder, tmp_path):
    root = make_folder(2)
    csv = _write_csv(tmp_path / "l.csv", "path,label\nimg000.png,a\nimg001.png,a\ngone.png,b\n")
    found = discover(root, labels=csv)
    [problem] = found.problems
    assert problem.path == str(csv) and problem.message == "line 4: gone.png does not exist"
    assert len(found.samples) == 2


def test_label_for_only_some_files(make_folder, tmp_path):
    root = make_folder(3)
    csv = _write_csv(tmp_path / "l.csv", "path,label\nimg000.png,a\nimg001.png,\n")
    found = discover(root, labels=csv)
    messages = sorted(str(p) for p in found.problems)
    assert any("line 3: img001.png has an empty label" in m for m in messages)
    assert sum("has no label in l.csv" in m for m in messages) == 2  # img001 (empty) and img002 (absent)
    assert [s.relpath for s in found.samples] == ["img000.png"]


def test_conflicting_labels_in_csv(make_folder, tmp_path):
    root = make_folder(1)
    csv = _write_csv(tmp_path / "l.csv", "path,label\nimg000.png,a\nimg000.png,b\n")
    [problem] = discover(root, labels=csv).problems
    assert "labelled 'b' here and 'a' on line 2" in problem.message


def test_dicom_series_folder_is_one_sample(tmp_path):
    write_ct_series(tmp_path / "data" / "ct" / "patient1", [0, 5, 10])
    write_ct_series(tmp_path / "data" / "ct" / "patient2", [0, 5])
    found = discover(tmp_path / "data")
    assert [(s.relpath, s.label) for s in found.samples] == [("ct/patient1", "ct"), ("ct/patient2", "ct")]


def test_dicom_files_of_different_series_are_2d_samples(tmp_path):
    folder = tmp_path / "data" / "xray"
    write_ct_series(folder / "a", [0])
    write_ct_series(folder / "b", [0])
    for sub in ("a", "b"):
        (folder / sub / "slice000.dcm").rename(folder / f"{sub}.dcm")
    found = discover(tmp_path / "data")
    assert sorted(s.relpath for s in found.samples) == ["xray/a.dcm", "xray/b.dcm"]


def test_suffixless_dicom_files_are_found(tmp_path):
    [path] = write_ct_series(tmp_path / "data", [0])
    path.rename(tmp_path / "data" / "IM0001")
    assert [s.relpath for s in discover(tmp_path / "data").samples] == ["IM0001"]


def test_class_names_round_trip(tmp_path, make_folder):
    from medfusion.data import ImageFolderDataset, load_class_names, save_class_names

    path = save_class_names(tmp_path / "classes.json", ("tumor", "normal"))
    assert load_class_names(path) == ("tumor", "normal")
    ds = ImageFolderDataset(make_folder({"normal": 1, "tumor": 1}), class_names=load_class_names(path))
    assert ds.labels == [1, 0]


@pytest.mark.parametrize(
    "text, message",
    [
        ("{", "not valid JSON"),
        ('{"names": []}', "expected"),
        ('{"class_names": ["a", "a"]}', "class name 'a' is given twice"),
        ('{"class_names": ["a", ""]}', "must not be empty"),
        ('{"class_names": ["x/../y"]}', "holds '/'"),
        ('{"class_names": ["None"]}', "is reserved"),
    ],
)
def test_bad_class_names_file(tmp_path, text, message):
    from medfusion.data import load_class_names

    (tmp_path / "c.json").write_text(text)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'c.json'}: ") + ".*" + message):
        load_class_names(tmp_path / "c.json")
    with pytest.raises(DataError, match="cannot read class names"):
        load_class_names(tmp_path / "missing.json")


def test_save_class_names_rejects_duplicates(tmp_path):
    from medfusion.data import save_class_names

    path = tmp_path / "c.json"
    with pytest.raises(DataError, match=re.escape(f"{path}: class name 'a' is given twice")):
        save_class_names(path, ["a", "a"])
    with pytest.raises(DataError, match=re.escape(f"{path}: class name 'all' is reserved")):
        save_class_names(path, ["tumor", "all"])
    assert not path.exists()
