"""Typed, frozen dataclass configs, read from and written to YAML/JSON.

Every component's config derives from :class:`Config`: ``to_dict``/``from_dict`` round-trip
through plain JSON/YAML types, unknown keys are an error naming the key and the allowed ones, and
lists from YAML become the tuples the dataclass declares. :func:`merge_config` builds a run's config
from the class defaults, a YAML/JSON file and overrides (Python values, or ``section.key=value``
assignments whose values are YAML).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

C = TypeVar("C", bound="Config")


@dataclass(frozen=True)
class Config:
    """Base class of every config: serialisation and strict loading."""

    def to_dict(self) -> dict[str, Any]:
        """Plain ``dict`` (tuples become lists) suitable for JSON or YAML."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], source: str = "config") -> C:
        """Build from a mapping; raises ``ValueError`` naming unknown keys or wrong types.

        Args:
            data: the mapping, e.g. parsed YAML.
            source: where it came from, used in error messages (a file name).
        """
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a mapping for {cls.__name__}; got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown} for {cls.__name__}; allowed: {names}")
        values = {key: _coerce(value, hints[key], f"{source}: {key}") for key, value in data.items()}
        return cls(**values)

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed (validated like ``from_dict``)."""
        return type(self).from_dict({**self.to_dict(), **_plain(changes)})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def load(cls: type[C], path: str | os.PathLike, section: str | None = None) -> C:
        """Read a YAML or JSON file (optionally one top-level ``section`` of it)."""
        path = Path(path)
        data = _read_file(path)
        if section is not None:
            if not isinstance(data, dict):
                raise ValueError(f"{path}: expected a mapping at the top level")
            data = data.get(section) or {}
        return cls.from_dict(data, source=str(path))


def _read_file(path: Path) -> Any:
    """The parsed contents of a YAML or JSON file (an empty file: ``{}``); errors name the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{path}: cannot read config: {e.strerror}") from e
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: not valid YAML/JSON: {e}") from e
    return data or {}


def load_mapping(path: str | os.PathLike) -> dict[str, Any]:
    """The top-level mapping of a YAML or JSON file (an empty file: ``{}``), unvalidated; errors
    name the file."""
    path = Path(path)
    data = _read_file(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level; got {type(data).__name__}")
    return data


def parse_assignments(assignments: Sequence[str]) -> dict[str, Any]:
    """``section.key=value`` assignments as a nested dict, each value parsed as YAML.

    Args:
        assignments: e.g. ``["train.max_steps=500", "data.resize=[64, 64]"]``; later ones win.

    Returns:
        The nested dict, e.g. ``{"train": {"max_steps": 500}, "data": {"resize": [64, 64]}}``.
    """
    nested: dict[str, Any] = {}
    for pair in assignments:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"assignments: expected KEY=VALUE (e.g. train.max_steps=500); got {pair!r}")
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"assignments {pair!r}: {part} is not a section")
        node[leaf] = yaml.safe_load(value)
    return nested


def merge_dicts(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` applied: where both hold a mapping under a key the two are merged
    (recursively); any other value in ``changes`` replaces the one in ``base``. Neither is modified."""
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_dicts(merged[key], value)
        else:
            merged[key] = value
    return merged


def merge_config(
    cls: type[C],
    file: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    assignments: Sequence[str] = (),
    defaults: Mapping[str, Any] | None = None,
    source: str = "overrides",
) -> C:
    """A run's config: the class defaults, then ``defaults``, then ``file``, then ``overrides``,
    then ``assignments`` (each later one wins).

    Args:
        cls: the config class, e.g. ``VAERunConfig``.
        file: a YAML or JSON file of the config (errors in it name it); None: none.
        overrides: a nested mapping of Python values, e.g. ``{"train": {"max_steps": 500},
            "heldout": Path("2024")}``; paths are kept as their text, never parsed.
        assignments: ``section.key=value`` strings whose values are parsed as YAML (see
            :func:`parse_assignments`), e.g. ``["train.learning_rate=2e-4"]``.
        defaults: whole top-level entries (e.g. ``{"data": {...}}``) used where ``file`` gives
            none, in place of the class defaults.
        source: how errors in ``overrides``, ``assignments`` and ``defaults`` name their origin.

    Returns:
        The validated config (``cls`` loaded from ``file`` itself when nothing else changes it).
    """
    given = _read_file(Path(file)) if file is not None else {}
    config = cls.from_dict(given, source=str(file)) if file is not None else cls()
    base = config.to_dict()
    if defaults:
        base |= {key: _plain(value) for key, value in defaults.items() if key not in given}
    changes = merge_dicts(_plain(dict(overrides or {})), parse_assignments(assignments))
    merged = merge_dicts(base, changes)
    return cls.from_dict(merged, source=source) if merged != config.to_dict() else config


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):  # a path's plain form is its text
        return os.fspath(value)
    return value


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against the type ``hint`` and convert lists to tuples where declared."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if len(errors) == 1 else f"{where}: {value!r} does not match {hint}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where}: expected a list; got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if len(args) != len(value):
            raise ValueError(f"{where}: expected {len(args)} values; got {len(value)}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if dataclasses.is_dataclass(hint):
        return hint.from_dict(value, source=where)
    if hint is Path:
        if not isinstance(value, str | os.PathLike):
            raise ValueError(f"{where}: expected a path; got {value!r}")
        return Path(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where}: expected a number; got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer; got {value!r}")
        return value
    if hint in (str, bool):
        if not isinstance(value, hint):
            raise ValueError(f"{where}: expected {hint.__name__}; got {value!r}")
        return value
    return value


@dataclass(frozen=True)
class DataConfig(Config):
    """How files become training tensors. Sizes are in array order ``(H, W)`` / ``(D, H, W)``.

    Attributes:
        spacing: resample to this voxel size, physical order ``(x, y[, z])``; None keeps it.
        resize: resize to this many voxels per axis; None keeps the size.
        crop: crop/pad to this many voxels per axis (after resampling/resizing); None keeps it.
        random_crop: crop at a random offset (training) instead of the centre.
        normalization: ``auto``, ``dataset``, ``percentile``, ``window``, ``dtype`` or ``minmax``
            (see :mod:`medfusion.data.transforms`). Training fits ``auto`` and ``dataset`` on the
            training set (:func:`medfusion.data.fitting.fit_normalization`), so that generated
            images map back to the training data's units; ``percentile`` (each image on its own)
            gives a relative scale.
        percentiles: (low, high) percent for ``percentile`` and ``dataset``.
        window: (low, high) intensity window for ``window`` (CT HU); None means (-1000, 1000).
        per_channel: normalise each channel on its own (RGB).
        bounds: for ``dataset``: the fitted (low, high) of each channel (one pair when not
            ``per_channel``); written by the fit into the run's resolved config, None before.
        fit_per_class: fit ``dataset``'s bounds for each class on its own too (``class_bounds``),
            so that each class uses the whole [-1, 1] range (classes of very different ranges,
            e.g. CT and X-ray, in one model); images without a class take ``bounds``.
        class_bounds: per class name, its fitted ``bounds`` (with ``fit_per_class``).
        flip_axes: spatial axes (array order) flipped at random with probability 1/2.
        labels: CSV ``path,label`` giving the classes (a path is kept as its text), ``"none"``
            (unlabelled); None uses first-level subfolders.
        skip_bad: drop unreadable or inconsistent files with a warning instead of stopping.
        seed: seed of every random transform.
    """

    spacing: tuple[float, ...] | None = None
    resize: tuple[int, ...] | None = None
    crop: tuple[int, ...] | None = None
    random_crop: bool = False
    normalization: str = "auto"
    percentiles: tuple[float, float] = (0.5, 99.5)
    window: tuple[float, float] | None = None
    per_channel: bool = True
    bounds: tuple[tuple[float, float], ...] | None = None
    fit_per_class: bool = False
    class_bounds: dict[str, tuple[tuple[float, float], ...]] | None = None
    flip_axes: tuple[int, ...] = ()
    labels: str | None = None
    skip_bad: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        from medfusion.data.transforms import NORMALIZATION_MODES

        if isinstance(self.labels, os.PathLike):  # a CSV given as a Path: its text, as from YAML
            object.__setattr__(self, "labels", os.fspath(self.labels))

        if self.normalization not in NORMALIZATION_MODES:
            raise ValueError(
                f"normalization must be one of {NORMALIZATION_MODES}; got {self.normalization!r}"
            )
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if value is not None and (len(value) not in (2, 3) or any(v < 1 for v in value)):
                raise ValueError(f"{name} must be 2 or 3 positive integers; got {value!r}")
        if self.spacing is not None and (
            len(self.spacing) not in (2, 3) or any(v <= 0 for v in self.spacing)
        ):
            raise ValueError(f"spacing must be 2 or 3 positive numbers; got {self.spacing!r}")
        low, high = self.percentiles
        if not 0.0 <= low < high <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100; got {self.percentiles!r}")
        if self.window is not None and not self.window[0] < self.window[1]:
            raise ValueError(f"window must be (low, high) with low < high; got {self.window!r}")
        if self.bounds is not None and (
            not self.bounds
            or any(not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi) for lo, hi in self.bounds)
        ):
            raise ValueError(
                "bounds must be one (low, high) pair of finite numbers per channel, low <= high; "
                f"got {self.bounds!r}"
            )
        if self.class_bounds is not None:
            from medfusion.data.transforms import _pairs

            if not isinstance(self.class_bounds, dict):
                raise ValueError(
                    f"class_bounds must be a mapping of class name to bounds; got {self.class_bounds!r}"
                )
            fitted = {str(k): _pairs(v, f"class_bounds[{k!r}]") for k, v in self.class_bounds.items()}
            object.__setattr__(self, "class_bounds", fitted)
        if (self.bounds is not None or self.class_bounds) and self.normalization not in ("auto", "dataset"):
            raise ValueError(
                "bounds are the fitted range of normalization 'dataset'; normalization is "
                f"{self.normalization!r}"
            )
        from medfusion.utils import MAX_SEED

        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer in 0..{MAX_SEED}; got {self.seed}")
        if any(a not in (0, 1, 2) for a in self.flip_axes):
            raise ValueError(f"flip_axes must be spatial axes 0, 1 or 2; got {self.flip_axes!r}")


@dataclass(frozen=True)
class ModelConfig(Config):
    """Base of the configs that :func:`model_config` derives from a model's constructor."""

    model_class: ClassVar[type]
    from_data: ClassVar[tuple[str, ...]] = ()

    def resolve(self: C, *values: Any, **named: Any) -> C:
        """This config with the arguments that come from the data (``from_data``, positionally in
        that order or by name) filled in; a value set in the config must equal the data's."""
        given = dict(zip(self.from_data, values)) | named
        unknown = sorted(set(given) - set(self.from_data))
        if unknown or len(values) > len(self.from_data):
            takes = list(self.from_data)
            raise TypeError(f"{type(self).__name__}.resolve takes {takes}; got {sorted(given)}")
        for name, value in given.items():
            configured = getattr(self, name)
            if configured is not None and _plain(configured) != _plain(value):
                raise ValueError(f"model.{name} is {_plain(configured)} but the data give {_plain(value)}")
        return dataclasses.replace(self, **given)

    def build(self, *values: Any, **named: Any) -> Any:
        """A new model of ``model_class`` from this config, resolved with ``values`` (see
        :meth:`resolve`)."""
        resolved = self.resolve(*values, **named)
        return self.model_class(**{f.name: getattr(resolved, f.name) for f in dataclasses.fields(resolved)})


def model_config(
    model: type,
    name: str,
    from_data: Sequence[str] = (),
    exclude: Sequence[str] = (),
    defaults: Mapping[str, Any] | None = None,
) -> type[ModelConfig]:
    """A typed, frozen config class derived from ``model``'s constructor: one field per argument
    (its type hint and default), so that the constructor (which diffusers' ``ConfigMixin``
    saves as ``config.json``) is the single definition of a model's settings.

    Args:
        model: the model class (its ``__init__`` has type hints and defaults).
        name: the config class's name (``UNetConfig``).
        from_data: arguments the data decides (``spatial_dims``, ``in_channels``...): they default
            to None in the config and are filled in by :meth:`ModelConfig.resolve`.
        exclude: arguments the config does not hold (set by training, e.g. a scaling factor).
        defaults: defaults that differ from the constructor's (a run's better choice for new
            models, where the constructor keeps the one that loads older saved models).
    Returns:
        the config class, a :class:`ModelConfig`.
    """
    parameters = list(inspect.signature(model.__init__).parameters.values())[1:]  # without self
    hints = typing.get_type_hints(model.__init__)
    defaults = dict(defaults or {})
    unknown = sorted((set(from_data) | set(exclude) | set(defaults)) - {p.name for p in parameters})
    if unknown:
        raise ValueError(f"{model.__name__} takes no argument(s) {unknown}")
    fields = []
    for parameter in parameters:
        if parameter.name in exclude:
            continue
        if parameter.default is inspect.Parameter.empty and parameter.name not in from_data:
            raise ValueError(f"{model.__name__}: argument {parameter.name} has no default")
        hint, default = hints[parameter.name], defaults.get(parameter.name, parameter.default)
        if parameter.name in from_data:
            hint, default = hint | None, None
        fields.append((parameter.name, hint, dataclasses.field(default=default)))
    config = dataclasses.make_dataclass(name, fields, bases=(ModelConfig,), frozen=True)
    config.model_class, config.from_data = model, tuple(from_data)
    config.__module__ = model.__module__
    config.__doc__ = (
        f"The settings of a :class:`{model.__name__}`: its constructor's arguments (see there), "
        f"{', '.join(from_data) or 'none'} from the data."
    )
    return config
