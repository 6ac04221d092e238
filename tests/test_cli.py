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
