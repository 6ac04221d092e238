"""Intensities in the files' own units: are the synthetic values on the real data's scale?

``medfusion evaluate`` normalises every image on its own before the feature extractor, so a
synthetic CT stored on a 0..65535 scale and a real CT in Hounsfield units (or stored as HU + 1024)
can look alike to every feature-based metric. This check reads the stored values (the readers'
output: DICOM rescale applied, nothing normalised), per class and channel, and compares the two
distributions with the Wasserstein-1 distance, in the files' units and relative to the real
data's spread, beside a real-vs-real reference; a synthetic set far from the real values gets a
warning that says what it likely means.

Values are a deterministic subsample: at most ``max_files`` files per class (an even spread of
the sorted files) and at most ``max_values`` voxels per class, drawn with a seeded generator.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from medfusion.data.discovery import Sample, discover
from medfusion.data.errors import DataError, format_problems
from medfusion.data.readers import read_image

OVERALL = "all"  # the key of every class together (a reserved class name, so it never collides)
MAX_FILES = 64  # files read per class, an even spread (enough to tell units apart; volumes are slow)
MAX_VALUES = 200_000  # voxel values kept per class
BINS = 48  # of the histograms
RELATIVE_LIMIT = 0.25  # W1 / the real 1st-99th percentile range above this: far
REFERENCE_FACTOR = 2.0  # ... and above this many times the real-vs-real relative W1
SHAPE_LIMIT = 0.1  # relative W1 after a linear map onto the real values up to this: a unit mismatch
SPREAD_PERCENTILES = (1.0, 99.0)  # the spread, and the "p1" and "p99" of the summaries
SUMMARY_PERCENTILES = (SPREAD_PERCENTILES[0], 50.0, SPREAD_PERCENTILES[1])
HISTOGRAM_PERCENTILES = (0.5, 99.5)  # the bins span both sides' range between these

REFERENCE = (
    "real vs real: the W1 between the values of two halves of the real files read (a seeded random "
    "split of the files, so that it measures how much scans differ from one another, not only voxels); "
    "each half holds half the files, so it is if anything larger than the W1 of two samples as large "
    "as the real and the synthetic ones"
)
RELATIVE = "W1 divided by the real values' spread: their 1st-99th percentile range (unit-free)"


@dataclass(frozen=True)
class Intensities:
    """Voxel values of one class of a folder, as stored in its files.

    Attributes:
        values: ``(N, C)`` values in the files' units and their common dtype (one row per voxel).
        files: ``(N,)`` which of the files read each row comes from (``0 .. n_read - 1``).
        n_files: files of the class.
        n_read: files read (an even spread of them, at most ``max_files``).
        dtype: the files' stored dtype(s), e.g. ``"uint16"`` or ``"int16, uint16"``.
    """

    values: np.ndarray
    files: np.ndarray
    n_files: int
    n_read: int
    dtype: str

    @property
    def channels(self) -> int:
        return int(self.values.shape[1])


def even_spread(n: int, k: int) -> np.ndarray:
    """``min(n, k)`` indices spread evenly over ``range(n)``, first and last included."""
    if n <= k:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, k)).astype(np.int64))


def _check_limits(max_files: int, max_values: int) -> None:
    if max_files < 1:
        raise ValueError(f"max_files must be >= 1; got {max_files}")
    if max_values < 1:
        raise ValueError(f"max_values must be >= 1; got {max_values}")


def read_intensities(
    samples: Sequence[Sample],
    max_files: int = MAX_FILES,
    max_values: int = MAX_VALUES,
    seed: int = 0,
    progress: bool = False,
    skip_bad: bool = False,
) -> dict[str, Intensities]:
    """Stored voxel values of ``samples``, per class and every class together.

    Args:
        samples: the samples (e.g. a dataset's ``samples``, or :func:`discover`'s); ``label`` None
            counts towards ``"all"`` only.
        max_files: files read per class, an even spread of them in their order.
        max_values: voxel values kept per class (and for ``"all"``, where each class contributes in
            proportion to its number of files).
        seed: of the voxels drawn.
        progress: show a progress bar.
        skip_bad: leave out a file that cannot be read, with a warning, instead of raising.

    Returns:
        ``{class: Intensities, ..., "all": Intensities}``. Raises :class:`DataError` naming the
        file when one cannot be read (without ``skip_bad``) or has another number of channels
        than the first one read.
    """
    _check_limits(max_files, max_values)
    groups: dict[str | None, list[Sample]] = {}
    for sample in samples:
        groups.setdefault(sample.label, []).append(sample)
    chosen = {
        label: [group[i] for i in even_spread(len(group), max_files)] for label, group in groups.items()
    }
    bar = tqdm(total=sum(map(len, chosen.values())), desc="intensities", unit="file", disable=not progress)
    reference: list = []  # the first file read and its channels
    out: dict[str | None, Intensities] = {}
    with bar:
        for k, label in enumerate(sorted(groups, key=str)):
            rng = np.random.default_rng([seed, k])
            read = _read_group(chosen[label], max_values, rng, reference, skip_bad, bar)
            if read is not None:
                out[label] = Intensities(read[0], read[1], len(groups[label]), read[2], read[3])
    if not out:
        first = samples[0].path if samples else "(no samples)"
        raise DataError(
            f"{first}: none of the {len(samples)} files given could be read for the intensity check"
        )
    result = {label: value for label, value in out.items() if label is not None}
    result[OVERALL] = _together(out, max_values, np.random.default_rng([seed, len(groups)]))
    return result


def _read_group(samples: list[Sample], max_values: int, rng, reference: list, skip_bad: bool, bar):
    """(values, files, n_read, dtype) of one class's chosen files, or None when none reads."""
    per_file = math.ceil(max_values / len(samples))
    parts, files, dtypes = [], [], set()
    for sample in samples:
        bar.update(1)
        try:
            array = np.asarray(read_image(sample.path).array)
        except DataError as e:
            if not skip_bad:
                raise
            warnings.warn(f"intensity check: skipping unreadable file: {e}", stacklevel=3)
            continue
        if not reference:
            reference.append((sample.path, array.shape[0]))
        elif array.shape[0] != reference[0][1]:
            raise DataError(
                f"{sample.path}: {array.shape[0]} channel(s), but {reference[0][0]} has "
                f"{reference[0][1]} (mixed files; run `medfusion data inspect` to list them)"
            )
        rows = array.reshape(array.shape[0], -1).T  # (voxels, C)
        if len(rows) > per_file:
            rows = rows[np.sort(rng.choice(len(rows), per_file, replace=False))]
        files.append(np.full(len(rows), len(parts), dtype=np.int64))
        parts.append(rows)
        dtypes.add(str(array.dtype))
    if not parts:
        return None
    values, file_of = np.concatenate(parts), np.concatenate(files)
    if len(values) > max_values:
        keep = np.sort(rng.choice(len(values), max_values, replace=False))
        values, file_of = values[keep], file_of[keep]
    return values, file_of, len(parts), ", ".join(sorted(dtypes))


def _together(groups: dict[str | None, Intensities], max_values: int, rng) -> Intensities:
    """Every class together: ``max_values`` values at most, each class's share in proportion to
    its number of files; file indices made unique across classes."""
    total = sum(g.n_files for g in groups.values())
    parts, files, offset = [], [], 0
    for group in groups.values():
        take = min(len(group.values), max(1, round(max_values * group.n_files / total)))
        keep = np.sort(rng.choice(len(group.values), take, replace=False))
        parts.append(group.values[keep])
        files.append(group.files[keep] + offset)
        offset += group.n_read
    dtypes = sorted({d for g in groups.values() for d in g.dtype.split(", ")})
    return Intensities(
        np.concatenate(parts),
        np.concatenate(files),
        total,
        sum(g.n_read for g in groups.values()),
        ", ".join(dtypes),
    )


def intensity_values(
    folder: str | os.PathLike,
    labels: str | os.PathLike | None = None,
    max_files: int = MAX_FILES,
    max_values: int = MAX_VALUES,
    seed: int = 0,
    progress: bool = False,
    skip_bad: bool = False,
) -> dict[str, Intensities]:
    """Stored voxel values of the files of ``folder``, per class and every class together.

    The values are those the readers return (:func:`~medfusion.data.readers.read_image`: DICOM
    rescale applied, nothing normalised), per channel; see :func:`read_intensities`.

    Args:
        folder: the dataset folder (see :mod:`medfusion.data.discovery` for the layout).
        labels: ``None``/``"folders"``, ``"none"`` or a ``path,label`` CSV.
        max_files, max_values, seed, progress, skip_bad: see :func:`read_intensities`;
            ``skip_bad`` also leaves out the files discovery finds fault with.

    Returns:
        ``{class: Intensities, ..., "all": Intensities}`` (an unlabelled folder: ``"all"`` only);
        each ``values`` of shape ``(N, C)``. Raises :class:`DataError` naming the folder when
        discovery finds problems (without ``skip_bad``).
    """
    _check_limits(max_files, max_values)
    found = discover(folder, labels)
    if found.problems and not skip_bad:
        raise DataError(
            f"{folder}: {len(found.problems)} problem(s) found:\n{format_problems(list(found.problems))}\n"
            "Fix them, or pass skip_bad=True to leave those files out."
        )
    bad = {p.path for p in found.problems}
    samples = [s for s in found.samples if s.path not in bad]
    if not samples:
        raise DataError(f"{folder}: no usable images left for the intensity check")
    return read_intensities(samples, max_files, max_values, seed, progress, skip_bad)


def _columns(values: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2 or len(array) == 0:
        raise ValueError(f"{name} must have shape (N,) or (N, C) with N >= 1; got {tuple(np.shape(values))}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return array


def wasserstein_1(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The 1D Wasserstein-1 distance between the samples ``a`` and ``b``, per channel.

    ``W1 = integral over u in (0, 1) of |Q_a(u) - Q_b(u)| du``: the mean absolute difference of the
    two empirical quantile functions. Both are step functions, constant between the points
    ``i / len(a)`` and ``j / len(b)``; on that common grid the integral is an exact weighted sum
    (numpy only, no scipy: the same value as ``scipy.stats.wasserstein_distance``).

    Args:
        a, b: samples of shape ``(N,)`` / ``(M,)``, or ``(N, C)`` / ``(M, C)`` (one distance per
            channel); sizes may differ.

    Returns:
        An array of shape ``()`` for 1D samples, ``(C,)`` for ``C`` channels, in the samples' units.
    """
    x, y = _columns(a, "a"), _columns(b, "b")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"a and b must have as many channels; got {x.shape[1]} and {y.shape[1]}")
    n, m = len(x), len(y)
    grid = np.union1d(np.arange(n + 1) / n, np.arange(m + 1) / m)  # (K + 1,) in [0, 1]
    middle = (grid[1:] + grid[:-1]) / 2
    weights = np.diff(grid)
    rows_x = np.minimum((middle * n).astype(np.int64), n - 1)
    rows_y = np.minimum((middle * m).astype(np.int64), m - 1)
    qx, qy = np.sort(x, axis=0)[rows_x], np.sort(y, axis=0)[rows_y]  # (K, C) quantiles
    distance = weights @ np.abs(qx - qy)
    return distance.reshape(()) if np.ndim(a) == 1 else distance


def summary(intensities: Intensities) -> dict:
    """Per channel: mean, min, 1st/50th/99th percentile and max of the values, with the files' dtype
    and how many files and values they come from (plain JSON)."""
    values = intensities.values.astype(np.float64)
    p_low, p50, p_high = np.percentile(values, SUMMARY_PERCENTILES, axis=0)
    return {
        "dtype": intensities.dtype,
        "n_files": intensities.n_files,
        "files_read": intensities.n_read,
        "n_values": len(values),
        "mean": _plain(values.mean(axis=0)),
        "min": _plain(values.min(axis=0)),
        "p1": _plain(p_low),
        "p50": _plain(p50),
        "p99": _plain(p_high),
        "max": _plain(values.max(axis=0)),
    }


def _plain(array) -> list[float]:
    return [float(v) for v in np.atleast_1d(array)]


def _relative(w1: np.ndarray, spread: np.ndarray) -> list[float | None]:
    """``w1 / spread`` per channel; None where the real values do not spread (constant)."""
    return [float(w / s) if s > 0 else None for w, s in zip(w1, spread)]


def _reference(real: Intensities, spread: np.ndarray, rng) -> dict | None:
    """W1 between two seeded random halves of the real files read; None with fewer than 2."""
    if real.n_read < 2:
        return None
    order = rng.permutation(real.n_read)
    first = np.isin(real.files, order[: real.n_read // 2])
    w1 = wasserstein_1(real.values[first], real.values[~first])
    return {
        "w1": _plain(w1),
        "relative_w1": _relative(w1, spread),
        "n_files": [real.n_read // 2, real.n_read - real.n_read // 2],
    }


def _histogram(real: np.ndarray, fake: np.ndarray, bins: int) -> dict:
    """Counts of both sides on common bins per channel, spanning both sides' 0.5th to 99.5th
    percentiles; values beyond fall into the end bins."""
    edges, real_counts, fake_counts = [], [], []
    for c in range(real.shape[1]):
        bounds = [np.percentile(side[:, c], HISTOGRAM_PERCENTILES) for side in (real, fake)]
        low, high = min(b[0] for b in bounds), max(b[1] for b in bounds)
        if not high > low:  # every value alike: half a unit either side
            low, high = low - 0.5, high + 0.5
        channel_edges = np.linspace(low, high, bins + 1)
        edges.append(_plain(channel_edges))
        for side, counts in ((real, real_counts), (fake, fake_counts)):
            clipped = np.clip(side[:, c], low, high)
            counts.append([int(v) for v in np.histogram(clipped, channel_edges)[0]])
    return {
        "edges": edges,
        "real": real_counts,
        "fake": fake_counts,
        "clipped_to": list(HISTOGRAM_PERCENTILES),
    }


def rule(relative_limit: float = RELATIVE_LIMIT) -> str:
    """When a group is flagged, in words."""
    return (
        f"flagged when, in any channel, the relative W1 is above {relative_limit:g} and above "
        f"{REFERENCE_FACTOR:g}x the real-vs-real relative W1, or when the median of one side lies outside "
        f"the 1st-99th percentile range of the other by more than {relative_limit:g}x the real range"
    )


def _outside(value: float, low: float, high: float) -> float:
    """How far ``value`` lies outside ``[low, high]`` (0 inside)."""
    return max(low - value, value - high, 0.0)


def _flags(entry: dict, relative_limit: float) -> list[int]:
    """The channels in which the synthetic values are far from the real ones (see :func:`rule`)."""
    real, fake, reference = entry["real"], entry["fake"], entry["reference"]
    flagged = []
    for c, relative in enumerate(entry["relative_w1"]):
        base = reference["relative_w1"][c] if reference is not None else None
        far = relative is not None and relative > relative_limit
        far = far and (base is None or relative > REFERENCE_FACTOR * base)
        margin = relative_limit * entry["spread"][c]
        medians = (
            _outside(fake["p50"][c], real["p1"][c], real["p99"][c]) > margin
            or _outside(real["p50"][c], fake["p1"][c], fake["p99"][c]) > margin
        )
        if far or medians:
            flagged.append(c)
    return flagged


def number(value: float) -> str:
    """``value`` to 4 significant digits, without an exponent between 0.001 and 10 million, whole
    numbers whole (``999``, ``32768``, ``1.500``, ``0.2500``)."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    if value == round(value) and abs(value) < 1e7:
        return str(round(value))
    if 1e-3 <= abs(value) < 1e7:
        return f"{value:.{max(0, 3 - math.floor(math.log10(abs(value))))}f}"
    return f"{value:.4g}"


def _likely(entry: dict, c: int) -> str:
    """What a mismatch in channel ``c`` likely is: an offset or another scale where a linear map
    of the synthetic values onto the real median and range leaves them within ``SHAPE_LIMIT`` (the
    shapes agree), values distributed otherwise where it does not."""
    real, fake, aligned = entry["real"], entry["fake"], entry["aligned_relative_w1"][c]
    if aligned is None or aligned > SHAPE_LIMIT:
        left = f" ({number(aligned)}x the real range left)" if aligned is not None else ""
        return (
            f"unlike the real values even once mapped onto their median and range{left}: likely a "
            "generator that has not learned the real intensities, or units and content both differ"
        )
    real_spread, fake_spread = real["p99"][c] - real["p1"][c], fake["p99"][c] - fake["p1"][c]
    if 0.8 <= fake_spread / real_spread <= 1.25:
        shift = fake["mean"][c] - real["mean"][c]
        return (
            f"the real shape shifted by about {number(shift)}: likely an offset (e.g. values stored as "
            "HU + 1024 against HU, or another rescale intercept)"
        )
    return (
        f"the real shape on a scale {number(fake_spread / real_spread)}x the real one: likely another "
        "scale (e.g. a relative 0..1 or 0..65535 scale, or a per-image normalisation, against the real "
        "units)"
    )


def _warning(name: str, entry: dict, channels: list[int], relative_limit: float) -> str:
    real, fake, reference = entry["real"], entry["fake"], entry["reference"]
    parts = []
    for c in channels:
        where = f"channel {c}: " if len(entry["w1"]) > 1 else ""
        relative = entry["relative_w1"][c]
        base = reference["relative_w1"][c] if reference is not None else None
        scaled = f" = {number(relative)}x the real 1st-99th percentile range" if relative is not None else ""
        base = f", real vs real {number(base)}x" if base is not None else ""
        likely = _likely(entry, c)
        parts.append(
            f"{where}W1 {number(entry['w1'][c])} in the files' units{scaled} (limit {relative_limit:g}x"
            f"{base}); real median {number(real['p50'][c])} in [{number(real['p1'][c])}, "
            f"{number(real['p99'][c])}] ({real['dtype']}), synthetic median {number(fake['p50'][c])} in "
            f"[{number(fake['p1'][c])}, {number(fake['p99'][c])}] ({fake['dtype']}); {likely}"
        )
    return (
        f"intensity {name}: the synthetic values are far from the real ones in the files' own units ("
        + "; ".join(parts)
        + "). Check that the synthetic files are in the real data's units (map them back to those units "
        "before comparing or sharing them); the feature metrics normalise each image and cannot see this"
    )


def _aligned(real: np.ndarray, fake: np.ndarray, spread: np.ndarray) -> list[float | None]:
    """Per channel, the relative W1 once the synthetic values are mapped linearly onto the real
    median and 1st-99th percentile range: small where the two differ by a scale and an offset
    alone (a matter of units), large where their shapes differ. None where a side is constant."""
    out: list[float | None] = []
    for c in range(real.shape[1]):
        r_low, r_mid, r_high = np.percentile(real[:, c], SUMMARY_PERCENTILES)
        f_low, f_mid, f_high = np.percentile(fake[:, c], SUMMARY_PERCENTILES)
        if not (spread[c] > 0 and f_high > f_low):
            out.append(None)
            continue
        mapped = (fake[:, c] - f_mid) * ((r_high - r_low) / (f_high - f_low)) + r_mid
        out.append(float(wasserstein_1(real[:, c], mapped) / spread[c]))
    return out


def _compare_group(real: Intensities, fake: Intensities, bins: int, rng) -> dict:
    if real.channels != fake.channels:
        raise ValueError(
            f"real has {real.channels} channel(s) and fake {fake.channels}; compare like with like"
        )
    x, y = real.values.astype(np.float64), fake.values.astype(np.float64)
    w1 = wasserstein_1(x, y)
    low, high = np.percentile(x, SPREAD_PERCENTILES, axis=0)
    spread = high - low
    return {
        "channels": real.channels,
        "w1": _plain(w1),
        "spread": _plain(spread),
        "relative_w1": _relative(w1, spread),
        "aligned_relative_w1": _aligned(x, y, spread),
        "reference": _reference(real, spread, rng),
        "real": summary(real),
        "fake": summary(fake),
        "histogram": _histogram(x, y, bins),
    }


def compare_intensities(
    real: Mapping[str, Intensities],
    fake: Mapping[str, Intensities],
    bins: int = BINS,
    relative_limit: float = RELATIVE_LIMIT,
    seed: int = 0,
) -> dict:
    """Compare the stored values of a real and a synthetic set, overall and per shared class.

    Per group (every class together, and each class both sides hold), per channel:

    - ``w1``: the Wasserstein-1 distance in the files' units (:func:`wasserstein_1`);
    - ``spread``: the real values' 1st-99th percentile range; ``relative_w1``: W1 / spread
      (unit-free; None where the real values are constant);
    - ``aligned_relative_w1``: the same once the synthetic values are mapped linearly onto the real
      median and 1st-99th percentile range (small: the sets differ by units alone, a scale or an
      offset; large: their shapes differ);
    - ``reference``: real vs real, the W1 (and relative) between two seeded random halves of the
      real files read, so that the variation between scans sets the scale (None with fewer than 2
      real files);
    - ``real``, ``fake``: summary statistics (:func:`summary`); ``histogram``: counts of both sides
      on common bins;
    - ``flagged`` and ``warning`` (None when not flagged). A group is flagged when, in any channel,
      the relative W1 is above ``relative_limit`` and above twice the real-vs-real relative W1, or
      when the median of one side lies outside the 1st-99th percentile range of the other by more
      than ``relative_limit`` times the real range; the warning names the likely cause (another
      scale, an offset, or values distributed otherwise).

    Args:
        real, fake: :func:`intensity_values` (or :func:`read_intensities`) of each set; both need
            ``"all"``.
        bins: of the histograms.
        relative_limit: the relative W1 above which the sets are far apart.
        seed: of the real-vs-real split.

    Returns:
        ``{"overall": group, "per_class": {class: group}, "flagged": bool, "warnings": [...],
        "definitions": {...}}``, plain JSON (lists, floats, strings).
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1; got {bins}")
    if not relative_limit > 0:
        raise ValueError(f"relative_limit must be > 0; got {relative_limit}")
    for name, side in (("real", real), ("fake", fake)):
        if OVERALL not in side:
            raise ValueError(f"{name} must hold {OVERALL!r} (every class together); got {sorted(side)}")
    shared = sorted((set(real) & set(fake)) - {OVERALL})
    rng = np.random.default_rng(seed)
    groups, warnings_out = {}, []
    for name in (OVERALL, *shared):
        entry = _compare_group(real[name], fake[name], bins, rng)
        channels = _flags(entry, relative_limit)
        entry["flagged"] = bool(channels)
        entry["warning"] = _warning(name, entry, channels, relative_limit) if channels else None
        if entry["warning"] is not None:
            warnings_out.append(entry["warning"])
        groups[name] = entry
    overall = groups.pop(OVERALL)
    return {
        "overall": overall,
        "per_class": groups,
        "flagged": overall["flagged"] or any(g["flagged"] for g in groups.values()),
        "warnings": warnings_out,
        "definitions": {
            "values": "as stored in the files (the readers' values: DICOM rescale applied, nothing "
            "normalised), a seeded subsample of the voxels of an even spread of the files",
            "w1": "Wasserstein-1 distance between the real and the synthetic values, in the files' units",
            "relative_w1": RELATIVE,
            "aligned_relative_w1": "relative W1 once the synthetic values are mapped linearly onto the real "
            "median and 1st-99th percentile range (small: the sets differ by units alone)",
            "reference": REFERENCE,
            "flagged": rule(relative_limit),
            "relative_limit": relative_limit,
        },
    }
