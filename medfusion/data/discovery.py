"""Finding the samples of a dataset folder and their class labels, without reading pixels.

Layout rules:

- A *sample* is an image/volume file, or a folder holding one DICOM series (two or more
  single-frame DICOM files sharing a SeriesInstanceUID). Hidden files and folders are skipped;
  sidecar files (``.json``, ``.csv``, ``.txt``, ``.raw`` ...) are ignored; any other file is a
  problem ("not an image").
- Only regular files are samples, judged with ``os.stat`` before anything is opened: a FIFO,
  socket or device, a dangling symbolic link or a link loop is a problem named by its own path
  (that of the link). Symbolic links to files are followed; links to folders are not (a problem:
  they could loop).
- Labels: with ``labels="folders"`` (the default) the class of a sample is the name of the
  first-level subfolder it lies in (``DATA/<class>/...``), and a dataset with all samples at the
  top level is unlabelled. A first-level folder without samples is a problem (it is not a class).
  With a CSV (``path,label`` columns; paths relative to the folder or absolute), every sample
  needs a row. ``labels="none"`` ignores folder names.
- Class names are data: a folder name or CSV label that is not a valid class name (see
  :mod:`medfusion.data.names`: no separators, control characters or reserved words such as
  ``none``) is a problem, and its files are left out. So are names that differ only in letter case.
- Class names are sorted, so class indices are stable across runs and machines.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from medfusion.data.errors import DataError, Problem
from medfusion.data.names import check_class_names, class_name_problem
from medfusion.data.readers import SIDECAR_SUFFIXES, file_problem, is_dicom_file, is_image_file
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
    walk = _walk(root_path)
    found, ignored, problems = walk.found, walk.ignored, walk.problems
    if labels is None or str(labels) == "folders":
        samples, label_problems, source = _labels_from_folders(root_path, found, walk.top_folders)
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


@dataclass
class _Walk:
    """What :func:`_walk` found: (path, relpath) of every sample, ignored sidecars, problems
    (odd and non-image files), and the names of the first-level subfolders."""

    found: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    top_folders: list[str] = field(default_factory=list)


_LINKED_FOLDER = (
    "is a symbolic link to a folder; links to folders are not followed (they could loop): "
    "move or copy the folder here, or list its files in a labels CSV"
)


def _walk(root: Path) -> _Walk:
    walk = _Walk()
    found, ignored, problems = walk.found, walk.ignored, walk.problems
    for folder, dirs, files in os.walk(root):
        folder_path = Path(folder)
        rel_folder = folder_path.relative_to(root).as_posix()
        dirs[:] = sorted(d for d in dirs if not _is_hidden(d))
        linked = [d for d in dirs if (folder_path / d).is_symlink()]
        problems += [Problem(str(folder_path / d), _LINKED_FOLDER) for d in linked]
        dirs[:] = [d for d in dirs if d not in linked]
        if rel_folder == ".":
            walk.top_folders = list(dirs)
        files = _regular_files(folder_path, sorted(f for f in files if not _is_hidden(f)), problems)
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
    return walk


def _regular_files(folder: Path, names: list[str], problems: list[Problem]) -> list[str]:
    """The names of regular files (links followed); the rest (FIFOs, sockets, devices, dangling
    links, link loops) become problems named by their own path. Nothing is opened."""
    regular = []
    for name in names:
        problem = file_problem(folder / name)
        if problem is None:
            regular.append(name)
        else:
            problems.append(Problem(str(folder / name), problem))
    return regular


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


_EMPTY_CLASS = "holds no images or volumes; it is not a class: remove it or fill it"


def _labels_from_folders(root: Path, found: list[tuple[str, str]], top_folders: list[str]):
    labelled = [(p, r) for p, r in found if "/" in r]
    if not labelled:
        return [Sample(p, r, None) for p, r in found], [], "none"
    bad = _bad_class_names(top_folders)
    problems = [Problem(str(root / name), f"{why} (its files are left out)") for name, why in bad.items()]
    occupied = {rel.split("/", 1)[0] for _, rel in found}
    problems += [
        Problem(str(root / name), _EMPTY_CLASS)
        for name in top_folders
        if name not in occupied and name not in bad
    ]
    samples = []
    for path, rel in found:
        if "/" in rel:
            if rel.split("/", 1)[0] not in bad:
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


def _bad_class_names(names: list[str]) -> dict[str, str]:
    """What is wrong with each invalid name, including names differing only in letter case."""
    bad = {name: why for name in names if (why := class_name_problem(name)) is not None}
    by_fold: dict[str, list[str]] = {}
    for name in names:
        if name not in bad:
            by_fold.setdefault(name.casefold(), []).append(name)
    for group in by_fold.values():
        for name in group if len(group) > 1 else ():
            others = ", ".join(repr(n) for n in group if n != name)
            bad[name] = (
                f"class name {name!r} differs from {others} only in letter case (such names collide "
                "on some file systems); merge or rename them"
            )
    return bad


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
    bad_labels = _bad_class_names(sorted({label for _, _, label in rows if label}))
    for line, path_text, label in rows:
        if not path_text:
            problems.append(Problem(str(csv_path), f"line {line}: empty path"))
            continue
        target = Path(path_text) if Path(path_text).is_absolute() else root / path_text
        if not label:
            problems.append(Problem(str(csv_path), f"line {line}: {path_text} has an empty label"))
            continue
        if label in bad_labels:
            problems.append(Problem(str(csv_path), f"line {line}: {path_text}: {bad_labels[label]}"))
            continue
        if not os.path.lexists(target):
            problems.append(Problem(str(csv_path), f"line {line}: {path_text} does not exist"))
            continue
        odd = file_problem(target, folder_ok=True)
        if odd is not None:
            problems.append(Problem(str(csv_path), f"line {line}: {path_text} {odd}"))
            continue
        key = str(target.resolve())
        if key in by_path and by_path[key][0] != label:
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
    """Write the class order (index = position) as JSON, atomically: ``{"class_names": [...]}``.

    Raises :class:`DataError` naming ``path`` when a name is not a valid class name (see
    :func:`~medfusion.data.names.check_class_name`) or repeats; nothing is written then.
    """
    names = list(_checked_names(class_names, path))
    atomic_write_text(path, json.dumps({"class_names": names}, indent=2) + "\n")
    return Path(path)


def load_class_names(path: str | os.PathLike) -> tuple[str, ...]:
    """Read a class order written by :func:`save_class_names`; every name is checked again
    (raises :class:`DataError` naming ``path``)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(f"{path}: cannot read class names: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON: {e}") from e
    names = data.get("class_names") if isinstance(data, dict) else None
    if not isinstance(names, list):
        raise DataError(f'{path}: expected {{"class_names": ["name", ...]}}')
    return _checked_names(names, path)


def _checked_names(names, path: str | os.PathLike) -> tuple[str, ...]:
    try:
        return check_class_names(names, str(path))
    except ValueError as e:
        raise DataError(str(e)) from e
