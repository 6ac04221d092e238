"""Finding the samples of a dataset folder and their class labels, without reading pixels.

Layout rules:

- A *sample* is an image/volume file, or a folder holding one DICOM series (two or more
  single-frame DICOM files sharing a SeriesInstanceUID). Hidden files and folders are skipped;
  sidecar files (``.json``, ``.csv``, ``.txt``, ``.raw`` ...) are ignored; any other file is a
  problem ("not an image").
- Labels: with ``labels="folders"`` (the default) the class of a sample is the name of the
  first-level subfolder it lies in (``DATA/<class>/...``), and a dataset with all samples at the
  top level is unlabelled. With a CSV (``path,label`` columns; paths relative to the folder or
  absolute), every sample needs a row. ``labels="none"`` ignores folder names.
- Class names are sorted, so class indices are stable across runs and machines.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

from medfusion.data.errors import DataError, Problem
from medfusion.data.readers import SIDECAR_SUFFIXES, is_dicom_file, is_image_file
from medfusion.utils import atomic_write_text, full_suffix

CSV_COLUMNS = ("path", "label")


@dataclass(frozen=True)
class Sample:
    """One image or volume of a dataset.

    Attributes:
        path: absolute path of the file or DICOM series folder.
        relpath: path relative to the dataset folder, with ``/`` separators.
        label: class name, or None when unlabelled.
    """

    path: str
    relpath: str
    label: str | None


@dataclass(frozen=True)
class Discovery:
    """What :func:`discover` found: samples, class names, ignored files and problems."""

    root: str
    samples: tuple[Sample, ...]
    class_names: tuple[str, ...]
    label_source: str
    problems: tuple[Problem, ...]
    ignored: tuple[str, ...]


def discover(root: str | os.PathLike, labels: str | os.PathLike | None = None) -> Discovery:
    """List the samples under ``root`` and assign their labels.

    Args:
        root: the dataset folder.
        labels: ``None``/``"folders"`` (first-level subfolders), ``"none"`` (unlabelled), or the
            path of a ``path,label`` CSV.

    Returns:
        A :class:`Discovery`. Raises :class:`DataError` when the folder does not exist, holds no
        images at all, or the CSV cannot be used; per-file issues are returned as ``problems``.
    """
    root_path = Path(root)
    if not root_path.exists():
        raise DataError(f"{root_path}: folder does not exist")
    if not root_path.is_dir():
        raise DataError(f"{root_path}: not a folder (give the folder that holds the images)")
    found, ignored, problems = _walk(root_path)
    if labels is None or str(labels) == "folders":
        samples, label_problems, source = _labels_from_folders(root_path, found)
    elif str(labels) == "none":
        samples, label_problems, source = [Sample(p, r, None) for p, r in found], [], "none"
    else:
        samples, label_problems, source = _labels_from_csv(root_path, Path(labels), found)
    problems += label_problems
    if not samples and not problems:
        other = f" ({len(ignored)} other files ignored)" if ignored else ""
        raise DataError(f"{root_path}: no images or volumes found{other}")
    class_names = tuple(sorted({s.label for s in samples if s.label is not None}))
    return Discovery(
        root=str(root_path),
        samples=tuple(samples),
        class_names=class_names,
        label_source=source,
        problems=tuple(problems),
        ignored=tuple(ignored),
    )


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__")


def _walk(root: Path) -> tuple[list[tuple[str, str]], list[str], list[Problem]]:
    """(path, relpath) of every sample, ignored sidecars, and non-image files as problems."""
    found: list[tuple[str, str]] = []
    ignored: list[str] = []
    problems: list[Problem] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not _is_hidden(d))
        files = sorted(f for f in files if not _is_hidden(f))
        folder_path = Path(folder)
        rel_folder = folder_path.relative_to(root).as_posix()
        dicom = [f for f in files if is_dicom_file(folder_path / f)]
        if _is_dicom_series(folder_path, dicom):
            found.append((str(folder_path.resolve()), rel_folder))
            series_files = set(dicom)
            files = [f for f in files if f not in series_files]
            dicom = []
        dicom_names = set(dicom)
        for name in files:
            path = folder_path / name
            rel = (Path(rel_folder) / name).as_posix() if rel_folder != "." else name
            if name in dicom_names or is_image_file(path):
                found.append((str(path.resolve()), rel))
            elif full_suffix(name) in SIDECAR_SUFFIXES:
                ignored.append(rel)
            else:
                problems.append(
                    Problem(str(path), f"not an image or volume (suffix {full_suffix(name) or 'none'!r})")
                )
    return found, ignored, problems


def _is_dicom_series(folder: Path, dicom_files: list[str]) -> bool:
    """Two or more single-frame DICOM files of one series: judged from the first two headers."""
    if len(dicom_files) < 2:
        return False
    import pydicom

    try:
        heads = [
            pydicom.dcmread(folder / name, stop_before_pixels=True, specific_tags=_SERIES_TAGS)
            for name in dicom_files[:2]
        ]
    except Exception:
        return False  # unreadable files are reported one by one when read
    uids = {str(h.get("SeriesInstanceUID", "")) for h in heads}
    frames = {int(h.get("NumberOfFrames", 1) or 1) for h in heads}
    return len(uids) == 1 and "" not in uids and frames == {1}


_SERIES_TAGS = ["SeriesInstanceUID", "NumberOfFrames"]


def _labels_from_folders(root: Path, found: list[tuple[str, str]]):
    labelled = [(p, r) for p, r in found if "/" in r]
    if not labelled:
        return [Sample(p, r, None) for p, r in found], [], "none"
    samples, problems = [], []
    for path, rel in found:
        if "/" in rel:
            samples.append(Sample(path, rel, rel.split("/", 1)[0]))
        else:
            problems.append(
                Problem(
                    path,
                    "lies at the top level while other images sit in class subfolders; "
                    "move it into a class folder or give a labels CSV",
                )
            )
    return samples, problems, "folders"


def _read_label_rows(csv_path: Path) -> list[tuple[int, str, str]]:
    """(line number, path, label) for each row; raises DataError for an unusable CSV."""
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: labels CSV does not exist")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in CSV_COLUMNS if c not in columns]
            unknown = [c for c in columns if c not in CSV_COLUMNS]
            if missing or unknown:
                raise DataError(
                    f"{csv_path}: labels CSV must have exactly the columns {','.join(CSV_COLUMNS)}; "
                    f"found {','.join(columns) or 'no header'}"
                    + (f" (missing {missing})" if missing else "")
                    + (f" (unknown {unknown})" if unknown else "")
                )
            rows = []
            for row in reader:
                row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
                rows.append((reader.line_num, row.get("path", ""), row.get("label", "")))
            return rows
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{csv_path}: cannot read labels CSV: {e}") from e


def _labels_from_csv(root: Path, csv_path: Path, found: list[tuple[str, str]]):
    rows = _read_label_rows(csv_path)
    problems: list[Problem] = []
    by_path: dict[str, tuple[str, int]] = {}
    for line, path_text, label in rows:
        if not path_text:
            problems.append(Problem(str(csv_path), f"line {line}: empty path"))
            continue
        target = Path(path_text) if Path(path_text).is_absolute() else root / path_text
        key = str(target.resolve())
        if not label:
            problems.append(Problem(str(csv_path), f"line {line}: {path_text} has an empty label"))
        elif not target.exists():
            problems.append(Problem(str(csv_path), f"line {line}: {path_text} does not exist"))
        elif key in by_path and by_path[key][0] != label:
            problems.append(
                Problem(
                    str(csv_path),
                    f"line {line}: {path_text} labelled {label!r} here and "
                    f"{by_path[key][0]!r} on line {by_path[key][1]}",
                )
            )
        else:
            by_path[key] = (label, line)
    samples = []
    listed = set()
    for path, rel in found:
        if path in by_path:
            samples.append(Sample(path, rel, by_path[path][0]))
            listed.add(path)
        else:
            problems.append(Problem(path, f"has no label in {csv_path.name} (every image needs a row)"))
    for key, (label, line) in by_path.items():  # listed files outside the folder
        if key not in listed:
            if is_image_file(key) or Path(key).is_dir():
                samples.append(Sample(key, key, label))
            else:
                problems.append(Problem(str(csv_path), f"line {line}: {key} is not an image or volume"))
    return samples, problems, "csv"


def save_class_names(path: str | os.PathLike, class_names: tuple[str, ...] | list[str]) -> Path:
    """Write the class order (index = position) as JSON, atomically: ``{"class_names": [...]}``."""
    names = list(class_names)
    if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"class_names must be distinct non-empty strings; got {names}")
    atomic_write_text(path, json.dumps({"class_names": names}, indent=2) + "\n")
    return Path(path)


def load_class_names(path: str | os.PathLike) -> tuple[str, ...]:
    """Read a class order written by :func:`save_class_names`."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(f"{path}: cannot read class names: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON: {e}") from e
    names = data.get("class_names") if isinstance(data, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise DataError(f'{path}: expected {{"class_names": ["name", ...]}}')
    if len(set(names)) != len(names):
        raise DataError(f"{path}: class names repeat: {names}")
    return tuple(names)
