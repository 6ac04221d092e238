"""Scanning a dataset folder: what the readers see, and every problem with its file.

Used by ``medfusion data inspect`` and by :class:`~medfusion.data.dataset.ImageFolderDataset`
when it validates its files (header-level) before training.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from medfusion.data.discovery import Discovery, Sample, discover
from medfusion.data.errors import DataError, Problem
from medfusion.data.image import ImageInfo
from medfusion.data.readers import read_image, read_info


@dataclass(frozen=True)
class FileRecord:
    """One sample as scanned: its header info, value range (when pixels were read) or problem."""

    sample: Sample
    info: ImageInfo | None
    value_range: tuple[float, float] | None = None
    problem: str | None = None


@dataclass(frozen=True)
class InspectionReport:
    """Everything ``medfusion data inspect`` prints. ``usable`` says whether training can start."""

    discovery: Discovery
    records: tuple[FileRecord, ...]
    problems: tuple[Problem, ...]
    read_pixels: bool
    skip_bad: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def good(self) -> list[FileRecord]:
        bad = {p.path for p in self.problems}
        return [r for r in self.records if r.info is not None and r.sample.path not in bad]

    @property
    def usable(self) -> bool:
        """At least one good file, and no problem (or problems skipped with ``skip_bad``)."""
        if not self.good:
            return False
        return self.skip_bad or not self.problems

    def summary(self) -> dict:
        """Machine-readable summary (also printed as JSON with ``--json``)."""
        good = self.good
        infos = [r.info for r in good]
        per_class = Counter(r.sample.label if r.sample.label is not None else "(unlabelled)" for r in good)
        spacings = (
            np.asarray([i.spacing for i in infos])
            if infos and len({len(i.spacing) for i in infos}) == 1
            else None
        )
        ranges = [r.value_range for r in good if r.value_range is not None]
        return {
            "root": self.discovery.root,
            "usable": self.usable,
            "files": len(self.records),
            "good_files": len(good),
            "label_source": self.discovery.label_source,
            "classes": dict(sorted(per_class.items())),
            "spatial_dims": sorted({i.spatial_dims for i in infos}),
            "channels": sorted({i.channels for i in infos}),
            "dtypes": dict(sorted(Counter(i.dtype for i in infos).items())),
            "formats": dict(sorted(Counter(i.format for i in infos).items())),
            "shapes": _shape_summary(infos),
            "spacing_min": spacings.min(axis=0).tolist() if spacings is not None else None,
            "spacing_max": spacings.max(axis=0).tolist() if spacings is not None else None,
            "value_min": min(r[0] for r in ranges) if ranges else None,
            "value_max": max(r[1] for r in ranges) if ranges else None,
            "ignored_files": len(self.discovery.ignored),
            "problems": [{"path": p.path, "message": p.message} for p in self.problems],
        }

    def format(self) -> str:
        """The human-readable report."""
        s = self.summary()
        lines = [f"Dataset {s['root']}"]
        lines.append(f"  files          {s['files']} ({s['good_files']} usable)")
        lines.append(f"  labels         {s['label_source']}")
        for name, count in s["classes"].items():
            lines.append(f"    {name:<20} {count}")
        lines.append(f"  spatial dims   {_join(s['spatial_dims'])}")
        lines.append(f"  channels       {_join(s['channels'])}")
        lines.append(f"  formats        {_counts(s['formats'])}")
        lines.append(f"  dtypes         {_counts(s['dtypes'])}")
        lines.append(f"  shapes         {s['shapes']}")
        if s["spacing_min"] is not None:
            lines.append(f"  spacing        {_vec(s['spacing_min'])} .. {_vec(s['spacing_max'])} (x, y[, z])")
        if s["value_min"] is not None:
            lines.append(f"  values         {s['value_min']:g} .. {s['value_max']:g}")
        elif not self.read_pixels:
            lines.append("  values         (not read: headers only)")
        if s["ignored_files"]:
            lines.append(f"  ignored        {s['ignored_files']} sidecar files (json, csv, txt, raw ...)")
        lines.extend(f"  note: {n}" for n in self.notes)
        if self.problems:
            verb = "skipped" if self.skip_bad else "found"
            lines.append(f"  problems {verb}: {len(self.problems)}")
            lines.extend(f"    - {p}" for p in self.problems)
        lines.append("  usable: yes" if self.usable else f"  usable: NO ({self._why_unusable()})")
        return "\n".join(lines)

    def _why_unusable(self) -> str:
        if not self.good:
            return "no readable image"
        return (
            f"{len(self.problems)} problem(s); fix them or pass skip_bad=True (--skip-bad) to leave "
            "those files out"
        )


def _join(values: Sequence) -> str:
    return ", ".join(str(v) for v in values) or "-"


def _counts(counts: dict) -> str:
    return ", ".join(f"{k} x{v}" for k, v in counts.items()) or "-"


def _vec(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _shape_summary(infos: Sequence[ImageInfo]) -> str:
    if not infos:
        return "-"
    shapes = Counter(i.shape for i in infos)
    if len(shapes) <= 3:
        return ", ".join(f"{'x'.join(map(str, s))} ({n})" for s, n in shapes.most_common())
    dims = {len(s) for s in shapes}
    if len(dims) != 1:
        return f"{len(shapes)} different shapes"
    arr = np.asarray(list(shapes.elements()))
    lo, hi = arr.min(axis=0), arr.max(axis=0)
    return f"{len(shapes)} different, from {'x'.join(map(str, lo))} to {'x'.join(map(str, hi))}"


def consistency_problems(records: Sequence[FileRecord]) -> list[Problem]:
    """Problems for files whose spatial dims or channel count differ from the majority's."""
    problems: list[Problem] = []
    readable = [r for r in records if r.info is not None and r.problem is None]
    for attribute, what in (("spatial_dims", "spatial dimensions"), ("channels", "channels")):
        counts = Counter(getattr(r.info, attribute) for r in readable)
        if len(counts) <= 1:
            continue
        majority, majority_count = counts.most_common(1)[0]
        summary = ", ".join(f"{n} files with {v}" for v, n in counts.most_common())
        for record in readable:
            value = getattr(record.info, attribute)
            if value != majority:
                problems.append(
                    Problem(
                        record.sample.path,
                        f"has {value} {what} while {majority_count} other files have {majority} "
                        f"(mixed {what}: {summary})",
                    )
                )
        readable = [r for r in readable if getattr(r.info, attribute) == majority]
    return problems


def scan(
    samples: Sequence[Sample], read_pixels: bool = True, progress: bool = True, desc: str = "scanning"
) -> list[FileRecord]:
    """Read the header (and optionally the pixels) of each sample, catching every error."""
    records = []
    for sample in tqdm(samples, desc=desc, unit="file", disable=not progress, leave=False):
        records.append(_scan_one(sample, read_pixels))
    return records


def _scan_one(sample: Sample, read_pixels: bool) -> FileRecord:
    try:
        info = read_info(sample.path)
    except DataError as e:
        return FileRecord(sample, None, problem=getattr(e, "reason", str(e)))
    if not read_pixels:
        return FileRecord(sample, info)
    try:
        image = read_image(sample.path)
    except DataError as e:
        return FileRecord(sample, info, problem=getattr(e, "reason", str(e)))
    array = image.array
    if tuple(array.shape[1:]) != tuple(info.shape) or array.shape[0] != info.channels:
        return FileRecord(
            sample,
            info,
            problem=f"header says {info.channels} x {info.shape} but pixels are {tuple(array.shape)}",
        )
    return FileRecord(sample, info, value_range=(float(array.min()), float(array.max())))


def inspect_dataset(
    root: str | os.PathLike,
    labels: str | os.PathLike | None = None,
    read_pixels: bool = True,
    skip_bad: bool = False,
    progress: bool = True,
) -> InspectionReport:
    """Discover, read and check every file of a dataset folder.

    Args:
        root: the dataset folder.
        labels: see :func:`~medfusion.data.discovery.discover`.
        read_pixels: decode every file (finds truncated files and NaN/Inf values); headers only
            otherwise.
        skip_bad: treat problems as files to leave out rather than as a reason to stop.
        progress: show a progress bar.

    Returns:
        The :class:`InspectionReport`; raises :class:`DataError` only when the folder itself is
        unusable (missing, empty, bad CSV).
    """
    discovery = discover(root, labels)
    records = scan(discovery.samples, read_pixels=read_pixels, progress=progress)
    problems = list(discovery.problems)
    problems += [Problem(r.sample.path, r.problem) for r in records if r.problem is not None]
    problems += consistency_problems(records)
    notes = []
    constant = [r for r in records if r.value_range is not None and r.value_range[0] == r.value_range[1]]
    if constant:
        notes.append(f"{len(constant)} file(s) hold a single constant value, e.g. {constant[0].sample.path}")
    if discovery.label_source != "none" and len(discovery.class_names) == 1:
        notes.append("only one class: class-conditional training will behave as unconditional")
    return InspectionReport(
        discovery=discovery,
        records=tuple(records),
        problems=tuple(problems),
        read_pixels=read_pixels,
        skip_bad=skip_bad,
        notes=tuple(notes),
    )
