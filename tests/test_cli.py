from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medfusion import __version__
from medfusion.cli import main
from medfusion.data import write_image


@pytest.fixture
def small_folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        for i in range(3):
            write_image(
                tmp_path / "data" / label / f"{i}.png", rng.integers(0, 255, (1, 8, 8), dtype=np.uint8)
            )
    return tmp_path / "data"


def test_inspect_usable_folder(small_folder, capsys, tmp_path):
    assert main(["data", "inspect", str(small_folder), "--quiet", "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert f"Dataset {small_folder}" in out and "usable: yes" in out
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["classes"] == {"a": 3, "b": 3} and summary["usable"] is True


def test_inspect_bad_folder_exits_1_and_names_the_file(small_folder, capsys):
    (small_folder / "a" / "broken.png").write_text("x")
    assert main(["data", "inspect", str(small_folder), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "broken.png: not a readable image" in out and "usable: NO" in out
    assert main(["data", "inspect", str(small_folder), "--quiet", "--skip-bad"]) == 0


def test_inspect_with_labels_csv(small_folder, tmp_path, capsys):
    csv = tmp_path / "labels.csv"
    rows = [f"{label}/{i}.png,{'x' if i else 'y'}" for label in ("a", "b") for i in range(3)]
    csv.write_text("path,label\n" + "\n".join(rows) + "\n")
    assert (
        main(["data", "inspect", str(small_folder), "--labels", str(csv), "--quiet", "--headers-only"]) == 0
    )
    out = capsys.readouterr().out
    assert "labels         csv" in out and "x                    4" in out and "y                    2" in out


def test_inspect_missing_folder(tmp_path, capsys):
    assert main(["data", "inspect", str(tmp_path / "nope"), "--quiet"]) == 1
    assert f"medfusion: error: {tmp_path / 'nope'}: folder does not exist" in capsys.readouterr().err


def test_inspect_bad_csv(small_folder, tmp_path, capsys):
    csv = tmp_path / "labels.csv"
    csv.write_text("file,class\n")
    assert main(["data", "inspect", str(small_folder), "--labels", str(csv), "--quiet"]) == 1
    assert "labels CSV must have exactly the columns path,label" in capsys.readouterr().err


def test_console_entry_point_and_module(small_folder):
    result = subprocess.run(
        [sys.executable, "-m", "medfusion", "data", "inspect", str(small_folder), "--quiet"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "usable: yes" in result.stdout
    version = subprocess.run([sys.executable, "-m", "medfusion", "--version"], capture_output=True, text=True)
    assert version.stdout.strip() == f"medfusion {__version__}"


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", "inspect"])
    assert e.value.code == 2
    assert "DATA" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# what the command line promises: suggested options exist, ranges are named, errors are one line


def _options(parser) -> set[str]:
    import argparse

    found = set()
    for action in parser._actions:
        found.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _options(sub)
    return found


def test_every_option_the_library_mentions_exists():
    """Messages and docs suggest options (``pass --skip-bad``): each must be a real one."""
    import re

    import medfusion
    from medfusion.cli import build_parser

    launcher = {"--cpu"}  # ``accelerate launch --cpu``, not ours
    known = _options(build_parser()) | launcher
    package = Path(medfusion.__file__).parent
    mentioned = {
        (match.group(), path.relative_to(package).as_posix())
        for path in package.rglob("*.py")
        for match in re.finditer(r"(?<![\w-])--[a-z][a-z0-9-]*", path.read_text(encoding="utf-8"))
    }
    assert sorted(m for m in mentioned if m[0] not in known) == []


def test_evaluate_takes_skip_bad_and_max_pixels(monkeypatch, tmp_path):
    import medfusion.metrics.evaluate as evaluate_module
    import medfusion.metrics.features as features_module
    from medfusion.data.readers import MAX_PIXELS_ENV

    seen = {}
    monkeypatch.setattr(features_module, "load_extractor", lambda features, device: "extractor")
    monkeypatch.setattr(evaluate_module, "evaluate", lambda *args, **kwargs: seen.update(kwargs))
    monkeypatch.setenv(MAX_PIXELS_ENV, "")  # recorded, so the value main() sets is undone afterwards
    args = ["--real", str(tmp_path), "--fake", str(tmp_path), "--out", str(tmp_path / "r"), "--features", "x"]
    assert main(["evaluate", *args, "--skip-bad", "--max-pixels", "1000"]) == 0
    assert seen["data"].skip_bad is True
    import os

    assert os.environ[MAX_PIXELS_ENV] == "1000"  # read by the readers, DataLoader workers included


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["sample", "m", "--n", "1", "--out", "o", "--seed", "-1"],
            "argument --seed: must be an integer in 0..",
        ),
        (["sample", "m", "--n", "1", "--out", "o", "--seed", "1e3"], "argument --seed: must be an integer"),
        (["data", "inspect", "d", "--max-pixels", "0"], "argument --max-pixels: must be an integer >= 1"),
        (["demo", "--seed", str(2**64)], "argument --seed: must be an integer in 0..18446744073709551615"),
    ],
)
def test_option_ranges_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_path_below_a_file_is_one_line_naming_it(small_folder, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    target = tmp_path / "file" / "s.json"  # as root, the case a permission error would be
    assert main(["data", "inspect", str(small_folder), "--quiet", "--json", str(target)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"medfusion: error: {target}: cannot write: {tmp_path / 'file'} is not a folder"]


def test_os_errors_are_one_line_naming_the_path(small_folder, tmp_path, capsys, monkeypatch):
    import errno

    import medfusion.utils as utils

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(utils.os, "fsync", full)
    target = tmp_path / "s.json"
    assert main(["data", "inspect", str(small_folder), "--quiet", "--json", str(target)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"medfusion: error: {target}: cannot write: No space left on device")
    assert not target.exists() and list(tmp_path.glob(".s.json*")) == []


# --------------------------------------------------------------------------------------------
# shared options, paths that stay paths, library errors in the command line's words


def _subparsers(parser, prefix=()):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from _subparsers(sub, (*prefix, name))


SHARED = {
    ("data", "inspect"): {"--quiet", "--labels", "--skip-bad", "--max-pixels"},
    ("data", "demo"): {"--quiet", "--seed", "--force", "--out"},
    ("demo",): {"--quiet", "--device", "--seed", "--force", "--out"},
    ("train-vae",): {"--quiet", "--config", "--resume", "--dry-run", "--labels", "--batch-size", "--heldout"},
    ("train",): {"--quiet", "--config", "--resume", "--dry-run", "--vae", "--set", "--cache-latents"},
    ("features", "train"): {"--quiet", "--config", "--resume", "--dry-run", "--data", "--out"},
    ("evaluate",): {"--quiet", "--device", "--seed", "--batch-size", "--labels", "--skip-bad", "--features"},
    ("evaluate-vae",): {"--quiet", "--device", "--batch-size", "--vae", "--data", "--max-pixels"},
    ("sample",): {"--quiet", "--device", "--seed", "--batch-size", "--dry-run", "--out"},
    ("train-gan",): {"--quiet", "--config", "--resume", "--dry-run", "--data", "--out", "--set", "--arch"},
}


def test_every_command_lists_its_shared_options_in_its_help(capsys):
    from medfusion.cli import build_parser

    commands = dict(_subparsers(build_parser()))
    assert set(SHARED) <= set(commands)
    for path, options in SHARED.items():
        help_text = commands[path].format_help()
        assert all(option in help_text for option in options), (path, options)
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert all(name in top for name in ("data", "demo", "train-vae", "evaluate", "sample"))


def test_shared_options_are_declared_once():
    """--quiet, --device, --seed, --dry-run ... come from one declaration, not one per command."""
    import inspect
    import re

    import medfusion.cli as cli

    source = inspect.getsource(cli)
    for option in ("--quiet", "--device", "--seed", "--dry-run", "--labels", "--skip-bad", "--batch-size"):
        assert len(re.findall(rf'add_argument\(\s*"{option}"', source)) == 0, option
        assert source.count(f'"{option}": {{') == 1, option


@pytest.fixture
def crops(tmp_path: Path) -> Path:
    """16x16 grey images, 4 per class, and an unlabelled held-out folder named 2024."""
    rng = np.random.default_rng(0)
    for folder in ("data/a", "data/b", "2024"):
        for i in range(4):
            write_image(tmp_path / folder / f"{i}.png", rng.integers(0, 255, (1, 16, 16), dtype=np.uint8))
    return tmp_path / "data"


VAE_TINY = ["--set", "model.block_out_channels=[4, 8]", "--set", "model.norm_num_groups=4", "--quiet"]


def _resolved(out: str) -> dict:
    import yaml

    return yaml.safe_load(out.split("# data:")[0].split("resolved config", 1)[-1].split("\n", 1)[-1])


def test_heldout_is_a_path_not_yaml(crops, tmp_path, monkeypatch, capsys):
    """``--heldout 2024`` names the folder 2024 (YAML would read the year); ``--heldout null`` the
    folder null, which does not exist: an error naming it, not a silent fraction."""
    monkeypatch.chdir(tmp_path)
    argv = ["train-vae", "--data", str(crops), "--out", "run", "--dry-run", *VAE_TINY]
    assert main([*argv, "--heldout", "2024"]) == 0
    captured = capsys.readouterr()
    assert _resolved(captured.out)["heldout"] == "2024"
    assert main([*argv, "--heldout", "null"]) == 1
    assert "medfusion: error: null: folder does not exist" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_heldout_null_in_yaml_holds_out_a_fraction(crops, tmp_path, capsys):
    config = tmp_path / "vae.yaml"
    config.write_text("heldout: null\nheldout_fraction: 0.25\n", encoding="utf-8")
    argv = ["train-vae", "--data", str(crops), "--out", str(tmp_path / "run"), "--config", str(config)]
    assert main([*argv, "--dry-run", *VAE_TINY]) == 0
    out = capsys.readouterr().out
    assert _resolved(out)["heldout"] is None and _resolved(out)["heldout_fraction"] == 0.25


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        (["train.max_steps"], "medfusion: error: --set expects KEY=VALUE (e.g. train.max_steps=500); got"),
        (["data=1", "data.seed=2"], "medfusion: error: --set 'data.seed=2': data is not a section"),
        (["nonsense=1"], "medfusion: error: command line: unknown key(s) ['nonsense']"),
    ],
)
def test_set_errors_name_the_option(pairs, message, tmp_path, capsys):
    argv = ["train-vae", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--quiet"]
    assert main([*argv, *(arg for pair in pairs for arg in ("--set", pair))]) == 1
    assert message in capsys.readouterr().err


def test_evaluate_errors_name_the_options(small_folder, tmp_path, capsys):
    """The library names its arguments (``fake /x``, ``features 'x'``); the command line, its options."""
    volumes = tmp_path / "volumes"
    for i in range(3):
        write_image(volumes / f"{i}.nii.gz", np.zeros((1, 8, 8, 8), dtype=np.float32) + i)
    encoder = tmp_path / "feat" / "encoder"
    from medfusion.metrics.features import DomainEncoder

    tiny = {"block_out_channels": (4, 8), "norm_num_groups": 4, "num_features": 8, "image_size": (8, 8)}
    DomainEncoder(spatial_dims=2, in_channels=1, **tiny).save_pretrained(encoder, safe_serialization=True)
    argv = ["evaluate", "--real", str(small_folder), "--out", str(tmp_path / "report"), "--quiet"]
    assert main([*argv, "--fake", str(volumes), "--features", str(encoder.parent)]) == 1
    err = capsys.readouterr().err
    assert (
        f"medfusion: error: --fake {volumes}: 3D images with 1 channel(s), but --real {small_folder}" in err
    )
    assert main([*argv, "--fake", str(small_folder), "--features", "nope"]) == 1
    assert "medfusion: error: --features 'nope': no such file or folder; expected" in capsys.readouterr().err
    assert main([*argv, "--fake", str(small_folder), "--tstr"]) == 1
    assert "medfusion: error: --tstr needs --train" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


def test_data_inspect_reports_image_mask_pairs(tmp_path, capsys):
    from PIL import Image

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(images / f"case{i}.png")
        mask = np.zeros((8, 8), np.uint8)
        mask[:4, :] = 1
        mask[:2, :2] = 2
        Image.fromarray(mask).save(masks / f"case{i}.png")
    report = tmp_path / "pairs.json"
    assert (
        main(["data", "inspect", str(images), "--masks", str(masks), "--json", str(report), "--quiet"]) == 0
    )
    out = capsys.readouterr().out
    assert "pairs          3" in out and "labels found   0, 1, 2" in out and "usable: yes" in out
    summary = json.loads(report.read_text())
    assert summary["pairs"] == 3 and summary["class_fractions"] == {"0": 0.5, "1": 0.4375, "2": 0.0625}
    assert main(["data", "inspect", str(images), "--masks", str(masks), "--num-classes", "2", "--quiet"]) == 1
    assert "holds label(s) 2 but num_classes is 2" in capsys.readouterr().out
    (masks / "case2.png").unlink()
    assert main(["data", "inspect", str(images), "--masks", str(masks), "--quiet"]) == 1
    assert "images without a mask: 1: case2" in capsys.readouterr().out
    assert main(["data", "inspect", str(images), "--masks", str(masks), "--labels", "x.csv"]) == 1
    assert "--labels: not for image/mask pairs (--masks)" in capsys.readouterr().err
    assert main(["data", "inspect", str(images), "--num-classes", "2"]) == 1
    assert "--num-classes applies to image/mask pairs: give --masks" in capsys.readouterr().err
