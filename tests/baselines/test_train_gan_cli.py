"""``medfusion train-gan``: the resolved config of a dry run, a tiny run to a model folder, resume
with the run's own config, and errors in the command line's words."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from medfusion.cli import main
from medfusion.data import write_image

TINY = [
    "--set", "model={base_channels: 8, levels: 2, z_dim: 8, norm_num_groups: 4}",
    "--set", "gan.critic_steps=2",
    "--set", "train.num_workers=0",
    "--set", "train.checkpoint_every=2",
    "--set", "train.preview_every=0",
    "--batch-size", "4",
    "--quiet",
]  # fmt: skip


@pytest.fixture
def crops(tmp_path: Path) -> Path:
    """16x16 crops of a real photograph, 4 per class."""
    from skimage import data

    camera = data.camera()
    for k, name in enumerate(("a", "b")):
        for i in range(4):
            y, x = 100 + 40 * k, 100 + 20 * i
            write_image(tmp_path / "data" / name / f"{i}.png", camera[None, y : y + 16, x : x + 16])
    return tmp_path / "data"


def _resolved(out: str) -> dict:
    return yaml.safe_load(out.split("# data:")[0].split("resolved config", 1)[-1].split("\n", 1)[-1])


def test_dry_run_prints_the_resolved_config_and_writes_nothing(crops, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train-gan", "--data", str(crops), "--out", str(run), "--dry-run", *TINY]) == 0
    out = capsys.readouterr().out
    config = _resolved(out)
    assert (
        config["arch"] == "wgan-gp" and config["model"]["z_dim"] == 8 and config["gan"] == {"critic_steps": 2}
    )
    assert config["train"]["adam_betas"] == [0.0, 0.9] and config["train"]["batch_size"] == 4
    assert config["data"]["normalization"] == "dtype"
    assert "# wgan-gp: generator" in out and "2 discriminator step(s) per generator step" in out
    assert not run.exists()


def test_a_tiny_run_writes_the_model_folder_and_resumes(crops, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train-gan", "--data", str(crops), "--out", str(run), "--arch", "wgan-gp", *TINY]
    assert main([*argv, "--max-steps", "2"]) == 0
    info = json.loads((run / "model" / "medfusion.json").read_text())
    assert info["kind"] == "wgan-gp" and info["class_names"] == ["a", "b"]
    assert main([*argv, "--max-steps", "2"]) == 1  # an earlier run is not overwritten
    assert "--resume" in capsys.readouterr().err
    assert (
        main(
            ["train-gan", "--data", str(crops), "--out", str(run), "--resume", "--max-steps", "4", "--quiet"]
        )
        == 0
    )
    assert "resuming with the run's own config" in capsys.readouterr().out
    assert (run / "checkpoints" / "step_000004").is_dir()


def test_errors_are_one_line(crops, tmp_path, capsys):
    argv = ["train-gan", "--data", str(crops), "--out", str(tmp_path / "run"), *TINY]
    assert main([*argv, "--set", "model.levels=5"]) == 1
    assert "medfusion: error: image_size [16, 16] cannot be made with levels=5" in capsys.readouterr().err
    assert main([*argv, "--set", "arch=bigan"]) == 1
    assert "medfusion: error: arch 'bigan' is not a known GAN architecture" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv, "--arch", "bigan"])
    assert "invalid choice: 'bigan'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
