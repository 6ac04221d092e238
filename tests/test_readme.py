"""The README's commands stay true: every ``medfusion`` command in its shell blocks parses, and the
worked examples (the ones on the demo data, no placeholders) run in order, shortened to a few
steps. The Quick start's ``medfusion demo`` runs in full in CI (``.ci/run``)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from medfusion.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LAUNCHERS = ("accelerate", "torchrun")
# a few steps of everything: the examples are about the commands, not the models
SHORTEN = {
    "train-vae": ["--max-steps", "2", "--batch-size", "2"],
    "train": ["--max-steps", "2", "--batch-size", "2"],
    "train-gan": ["--max-steps", "2", "--batch-size", "2"],
    "features": ["--max-steps", "2", "--batch-size", "4"],
    "sample": ["--n", "1", "--steps", "2"],
    "evaluate": ["--feature-steps", "2"],
}
PLACEHOLDER = re.compile(r"\b[A-Z]{2,}\b")  # DATA, RUN/vae, REAL, DIR ...


def readme_commands() -> list[list[str]]:
    """The ``medfusion`` commands of the README's bash blocks, as argument lists (after
    ``medfusion``), in order; synopsis lines (with ``[options]``) are left out."""
    text = README.read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if "[" in line or "medfusion" not in line:
                continue
            for part in line.split("&&"):
                words = shlex.split(part)
                if not words:
                    continue
                if words[0] in LAUNCHERS:
                    words = words[words.index("medfusion") + 1 :] if "medfusion" in words else []
                elif Path(words[0]).name == "medfusion":
                    words = words[1:]
                else:
                    continue
                if words:
                    commands.append(words)
    return commands


COMMANDS = readme_commands()


def _runnable(args: list[str]) -> bool:
    return args[0] != "demo" and not any(PLACEHOLDER.search(a) for a in args if not a.startswith("-"))


def test_the_readme_shows_the_commands_of_every_task():
    names = {args[0] for args in COMMANDS}
    assert {"demo", "data", "train-vae", "train", "sample", "features", "evaluate"} <= names
    assert sum(_runnable(args) for args in COMMANDS) >= 8


@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(a)[:60] for a in COMMANDS])
def test_every_readme_command_parses(args):
    parser = build_parser()
    try:
        parser.parse_args(args)
    except SystemExit as e:  # argparse's way of refusing
        pytest.fail(f"the README command `medfusion {' '.join(args)}` does not parse (exit {e.code})")


def test_the_readme_examples_run_in_order(tmp_path, monkeypatch):
    pytest.importorskip("data_store", reason="the examples use the demo data (the demo extra)")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    ran = []
    for args in filter(_runnable, COMMANDS):
        extra = SHORTEN.get(args[0], [])
        if args[0] == "evaluate" and "--features" in args:
            extra = []
        if args[0] == "data" and args[1] == "demo":
            extra = ["--per-class", "10"]
        code = main([*args, *extra, "--quiet"])
        assert code == 0, f"the README example `medfusion {' '.join(args)}` failed"
        ran.append(args[0])
    assert {"data", "train-vae", "train", "sample", "evaluate"} <= set(ran)
    assert (tmp_path / "runs" / "xray" / "model" / "medfusion.json").is_file()
    assert (tmp_path / "report" / "report.html").is_file()
