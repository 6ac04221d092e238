"""Tests of medfusion.config: DataConfig serialisation, strict loading and validation."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from medfusion.config import (
    Config,
    DataConfig,
    load_mapping,
    merge_config,
    merge_dicts,
    parse_assignments,
)

FULL = DataConfig(
    spacing=(0.5, 0.75, 2.0),
    resize=(16, 32, 32),
    crop=(8, 16, 16),
    random_crop=True,
    normalization="window",
    percentiles=(1.0, 99.0),
    window=(-200.0, 400.0),
    per_channel=False,
    flip_axes=(0, 2),
    labels="labels.csv",
    skip_bad=True,
    seed=42,
)


@pytest.mark.parametrize("config", [DataConfig(), FULL, DataConfig(spacing=(1.0, 2.0), crop=(4, 4))])
def test_dict_round_trip(config):
    data = config.to_dict()
    # plain JSON/YAML types: tuples become lists
    assert json.loads(json.dumps(data)) == data
    for value in data.values():
        assert not isinstance(value, tuple)
    assert DataConfig.from_dict(data) == config


def test_to_dict_values():
    data = FULL.to_dict()
    assert data["spacing"] == [0.5, 0.75, 2.0]
    assert data["crop"] == [8, 16, 16]
    assert data["window"] == [-200.0, 400.0]
    assert data["seed"] == 42
    assert set(data) == {f.name for f in dataclasses.fields(DataConfig)}


@pytest.mark.parametrize("config", [DataConfig(), FULL])
def test_yaml_round_trip_via_file(tmp_path, config):
    path = tmp_path / "data.yaml"
    path.write_text(config.to_yaml(), encoding="utf-8")
    loaded = DataConfig.load(path)
    assert loaded == config
    assert isinstance(loaded.flip_axes, tuple)


def test_yaml_lists_become_tuples(tmp_path):
    path = tmp_path / "data.yml"
    path.write_text(
        "spacing: [1, 1.5]\ncrop: [8, 8]\npercentiles: [2, 98]\nwindow: [-100, 100]\nflip_axes: [1]\n",
        encoding="utf-8",
    )
    config = DataConfig.load(path)
    assert config.spacing == (1.0, 1.5) and isinstance(config.spacing, tuple)
    assert config.crop == (8, 8) and isinstance(config.crop, tuple)
    assert config.percentiles == (2.0, 98.0) and isinstance(config.percentiles, tuple)
    assert all(isinstance(v, float) for v in config.percentiles)
    assert config.window == (-100.0, 100.0) and isinstance(config.window, tuple)
    assert config.flip_axes == (1,) and isinstance(config.flip_axes, tuple)
    # unspecified fields keep their defaults
    assert config.resize is None and config.seed == 0 and config.normalization == "auto"


def test_json_file_load(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(FULL.to_dict()), encoding="utf-8")
    assert DataConfig.load(path) == FULL
    path.write_text(json.dumps({"crop": [4, 6], "seed": 3}), encoding="utf-8")
    config = DataConfig.load(path)
    assert config.crop == (4, 6) and config.seed == 3


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_load_section(tmp_path, suffix):
    document = {"model": {"channels": 64}, "data": {"crop": [8, 8], "normalization": "minmax"}}
    path = tmp_path / f"config{suffix}"
    text = json.dumps(document) if suffix == ".json" else yaml.safe_dump(document)
    path.write_text(text, encoding="utf-8")
    config = DataConfig.load(path, section="data")
    assert config == DataConfig(crop=(8, 8), normalization="minmax")
    # without the section, the other top-level keys are unknown keys
    with pytest.raises(ValueError, match="model"):
        DataConfig.load(path)


def test_load_empty_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")
    assert DataConfig.load(path) == DataConfig()


def test_load_empty_or_missing_section_gives_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {}\ndata:\n", encoding="utf-8")
    assert DataConfig.load(path, section="data") == DataConfig()
    assert DataConfig.load(path, section="absent") == DataConfig()


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("crop: [8, 8]\ncorp_size: 3\n", encoding="utf-8")
    with pytest.raises(ValueError, match="corp_size") as info:
        DataConfig.load(path)
    assert str(path) in str(info.value)
    # the allowed keys are listed too
    assert "crop" in str(info.value)


def test_unknown_key_in_section_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  bogus_key: 1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bogus_key") as info:
        DataConfig.load(path, section="data")
    assert str(path) in str(info.value)


def test_from_dict_unknown_key():
    with pytest.raises(ValueError, match="nope"):
        DataConfig.from_dict({"nope": 1})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("crop", "abc"),
        ("crop", ["a", "b"]),
        ("crop", [8.5, 8]),
        ("seed", 1.5),
        ("seed", "1"),
        ("seed", True),
        ("random_crop", 3),
        ("random_crop", "yes"),
        ("per_channel", 1),
        ("normalization", 5),
        ("spacing", "1.0"),
        ("spacing", [1.0, "x"]),
        ("percentiles", [1.0]),
        ("percentiles", [1.0, 2.0, 3.0]),
        ("window", 5),
        ("labels", 7),
        ("flip_axes", 0),
    ],
)
def test_wrong_types_name_key(tmp_path, key, value):
    with pytest.raises(ValueError, match=key):
        DataConfig.from_dict({key: value})
    path = tmp_path / "wrong.yaml"
    path.write_text(yaml.safe_dump({key: value}), encoding="utf-8")
    with pytest.raises(ValueError, match=key) as info:
        DataConfig.load(path)
    assert str(path) in str(info.value)


def test_from_dict_not_a_mapping():
    with pytest.raises(ValueError, match="mapping"):
        DataConfig.from_dict(["crop", 8])


def test_int_accepted_for_float_fields():
    config = DataConfig.from_dict({"spacing": [1, 2, 3], "window": [-1000, 1000]})
    assert config.spacing == (1.0, 2.0, 3.0)
    assert all(isinstance(v, float) for v in config.spacing)
    assert all(isinstance(v, float) for v in config.window)


def test_none_allowed_for_optional_fields():
    config = DataConfig.from_dict({"spacing": None, "crop": None, "window": None, "labels": None})
    assert config == DataConfig()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("normalization", "bogus"),
        ("crop", (0, 4)),
        ("crop", (4,)),
        ("crop", (4, 4, 4, 4)),
        ("resize", (-1, 4)),
        ("resize", (8,)),
        ("spacing", (1.0, 0.0)),
        ("spacing", (1.0,)),
        ("spacing", (-1.0, 1.0, 1.0)),
        ("percentiles", (90.0, 10.0)),
        ("percentiles", (-1.0, 50.0)),
        ("percentiles", (10.0, 100.5)),
        ("window", (5.0, 1.0)),
        ("window", (1.0, 1.0)),
        ("flip_axes", (5,)),
        ("flip_axes", (-1,)),
    ],
)
def test_validation_names_field(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        DataConfig(**{field: value})
    plain = list(value) if isinstance(value, tuple) else value
    with pytest.raises(ValueError, match=field):
        DataConfig.from_dict({field: plain})
    with pytest.raises(ValueError, match=field):
        DataConfig().replace(**{field: value})
    path = tmp_path / "invalid.yaml"
    path.write_text(yaml.safe_dump({field: plain}), encoding="utf-8")
    with pytest.raises(ValueError, match=field):
        DataConfig.load(path)


def test_replace_returns_validated_copy():
    config = DataConfig(crop=(8, 8))
    changed = config.replace(seed=7, spacing=[1, 1])
    assert changed.seed == 7 and changed.spacing == (1.0, 1.0) and changed.crop == (8, 8)
    assert config.seed == 0 and config.spacing is None  # the original is unchanged (frozen)
    with pytest.raises(ValueError, match="seed"):
        config.replace(seed="7")
    with pytest.raises(ValueError, match="unknown_field"):
        config.replace(unknown_field=1)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DataConfig().seed = 3  # type: ignore[misc]


def test_missing_file_names_file(tmp_path):
    path = tmp_path / "missing" / "nothere.yaml"
    with pytest.raises(ValueError, match=re.escape("nothere.yaml")) as info:
        DataConfig.load(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("broken.yaml", "crop: [8, 8\nseed: 1\n"),
        ("tabs.yaml", "data:\n\tcrop: 1\n"),
        ("broken.json", '{"crop": [8, 8],}'),
    ],
)
def test_invalid_yaml_or_json_names_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(name)) as info:
        DataConfig.load(path)
    assert str(path) in str(info.value)


def test_top_level_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(ValueError, match="mapping") as info:
        DataConfig.load(path)
    assert str(path) in str(info.value)
    with pytest.raises(ValueError, match="mapping"):
        DataConfig.load(path, section="data")


def test_replace_takes_a_nested_config_object():
    from medfusion.training.features import FeaturesRunConfig

    config = FeaturesRunConfig().replace(data=DataConfig(labels="none", resize=(8, 8)))
    assert config.data == DataConfig(labels="none", resize=(8, 8))
    assert FeaturesRunConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_seeds_out_of_range_are_named(seed):
    from medfusion.training.loop import TrainConfig

    with pytest.raises(ValueError, match=r"^seed must be an integer in 0\.\.18446744073709551615"):
        DataConfig(seed=seed)
    with pytest.raises(ValueError, match=r"^train\.seed must be an integer in 0\.\.18446744073709551615"):
        TrainConfig(seed=seed)
    assert DataConfig(seed=2**64 - 1).seed == TrainConfig(seed=2**64 - 1).seed == 2**64 - 1


# --- paths in configs ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Run(Config):
    """A run config with a section, a text field holding a folder, a path field and a number."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    heldout: str | None = None
    folder: Path | None = None
    steps: int = 10


def test_path_fields_take_text_or_paths_and_write_text():
    config = _Run.from_dict({"folder": "runs/2024"})
    assert config.folder == Path("runs/2024") and isinstance(config.folder, Path)
    assert config.to_dict()["folder"] == "runs/2024"
    assert _Run.from_dict(config.to_dict()) == config
    assert _Run().replace(folder=Path("x")).folder == Path("x")
    with pytest.raises(ValueError, match=r"folder: expected a path; got 3"):
        _Run.from_dict({"folder": 3})


def test_a_path_set_on_a_text_field_is_kept_as_its_text():
    """``replace`` takes Python values: a Path becomes its text, never parsed (``2024``, ``null``)."""
    assert _Run().replace(heldout=Path("2024")).heldout == "2024"
    assert _Run().replace(heldout=Path("null")).heldout == "null"
    assert DataConfig(labels=Path("labels.csv")).labels == "labels.csv"
    assert DataConfig(labels=Path("labels.csv")) == DataConfig(labels="labels.csv")


# --- merging a run config -----------------------------------------------------------------------


def test_parse_assignments_nests_keys_and_parses_values_as_yaml():
    nested = parse_assignments(["data.resize=[8, 8]", "steps=5", "heldout=null", "data.labels=x.csv"])
    assert nested == {"data": {"resize": [8, 8], "labels": "x.csv"}, "steps": 5, "heldout": None}
    assert parse_assignments(["steps=1", "steps=2"]) == {"steps": 2}  # the later one wins


@pytest.mark.parametrize(
    ("assignments", "message"),
    [
        (["steps"], r"^assignments: expected KEY=VALUE \(e\.g\. train\.max_steps=500\); got 'steps'$"),
        (["=3"], r"^assignments: expected KEY=VALUE .*; got '=3'$"),
        (["data=1", "data.seed=2"], r"^assignments 'data\.seed=2': data is not a section$"),
    ],
)
def test_parse_assignments_names_the_bad_one(assignments, message):
    with pytest.raises(ValueError, match=message):
        parse_assignments(assignments)


def test_merge_dicts_merges_mappings_and_replaces_the_rest():
    base = {"data": {"seed": 1, "resize": [8, 8]}, "steps": 3}
    merged = merge_dicts(base, {"data": {"seed": 2}, "steps": {"a": 1}})
    assert merged == {"data": {"seed": 2, "resize": [8, 8]}, "steps": {"a": 1}}
    assert base == {"data": {"seed": 1, "resize": [8, 8]}, "steps": 3}  # unchanged


def test_merge_config_order(tmp_path):
    """Class defaults < defaults (where the file gives no entry) < file < overrides < assignments."""
    file = tmp_path / "run.yaml"
    file.write_text("steps: 20\ndata:\n  seed: 4\n", encoding="utf-8")
    defaults = {"data": {"seed": 7, "normalization": "minmax"}, "heldout": "from-defaults"}
    assert merge_config(_Run) == _Run()
    assert merge_config(_Run, file) == _Run(steps=20, data=DataConfig(seed=4))
    assert merge_config(_Run, defaults=defaults) == _Run(
        data=DataConfig(seed=7, normalization="minmax"), heldout="from-defaults"
    )
    config = merge_config(
        _Run,
        file,
        overrides={"steps": 30, "data": {"labels": Path("l.csv")}, "heldout": Path("2024")},
        assignments=["steps=40", "data.resize=[8, 8]"],
        defaults=defaults,
    )
    assert config == _Run(data=DataConfig(seed=4, labels="l.csv", resize=(8, 8)), heldout="2024", steps=40)


def test_merge_config_keeps_override_paths_as_text_and_yaml_null_as_none(tmp_path):
    assert merge_config(_Run, overrides={"heldout": Path("null")}).heldout == "null"
    file = tmp_path / "run.yaml"
    file.write_text("heldout: null\n", encoding="utf-8")
    assert merge_config(_Run, file).heldout is None
    assert merge_config(_Run, file, overrides={"heldout": Path("2024")}).heldout == "2024"


def test_merge_config_errors_name_their_source(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("stepz: 1\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{file}: unknown key(s) ['stepz']")):
        merge_config(_Run, file)
    with pytest.raises(ValueError, match=r"^command line: unknown key\(s\) \['nonsense'\]"):
        merge_config(_Run, assignments=["nonsense=1"], source="command line")
    with pytest.raises(ValueError, match=r"^overrides: steps: expected an integer; got 'many'"):
        merge_config(_Run, overrides={"steps": "many"})
    with pytest.raises(ValueError, match="cannot read config"):
        merge_config(_Run, tmp_path / "missing.yaml")


def test_load_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  seed: 1\n", encoding="utf-8")
    assert load_mapping(path) == {"data": {"seed": 1}}
    path.write_text("", encoding="utf-8")
    assert load_mapping(path) == {}
    path.write_text("- 1\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{path}: expected a mapping at the top level; got list")):
        load_mapping(path)
