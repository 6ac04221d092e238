"""``medfusion demo --segmentation``: the story from unlabelled images to a Dice table, run end to end
with tiny models and a few steps (the real profiles are timed by running the command; the note of
the issue quotes them), its plan of the segmentation steps, and its arguments."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("monai", reason="the segmentation tools need MONAI (the segmentation extra)")
pytest.importorskip("nilearn", reason="the brain pairs need nilearn (the segmentation extra)")

from medfusion.cli import main
from medfusion.workflows import demo, segmentation_demo
from medfusion.workflows.demo import DemoModels
from medfusion.workflows.segmentation_demo import (
    AROUND_RUN_SECONDS,
    AROUND_RUN_STEPS,
    FINETUNE_BOUNDS,
    OVERHEAD,
    PRETRAIN_RATIO,
    plan_finetune_steps,
)


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(demo, "PROFILES", {(2, "cpu"): DemoModels((8, 16), 8, (16, 32), 1, 16, (8, 16), 16)})
    monkeypatch.setattr(demo, "STEP_BOUNDS", {"autoencoder": (3, 3), "diffusion": (4, 4)})
    monkeypatch.setattr(demo, "PROBE", {"warmup": 0, "repeats": 1})
    monkeypatch.setattr(segmentation_demo, "NETWORKS", {(2, "cpu"): (8, 16)})
    monkeypatch.setattr(segmentation_demo, "FINETUNE_BOUNDS", (2, 2))
    monkeypatch.setattr(segmentation_demo, "SYNTHETIC_BOUNDS", (1, 1))
    monkeypatch.setattr(segmentation_demo, "COUNTS", "2,all")
    monkeypatch.setattr(segmentation_demo, "SEEDS", 1)


def test_the_segmentation_story_from_the_command_line(tmp_path, tiny, capsys):
    out = tmp_path / "run"
    argv = ["demo", "--segmentation", "--out", str(out), "--data-dir", str(tmp_path / "data"), "--quiet"]
    assert main([*argv, "--minutes", "30"]) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "demo.json").read_text())
    assert list(record["stages"]) == ["data", "inspect", "autoencoder", "diffusion", "sample", "segment"]
    assert record["dataset"] == "brain-2d"
    # the generator learnt the training images without masks: unconditional, one synthetic image each
    training = sorted((tmp_path / "data" / "segmentation" / "brain-2d" / "images").iterdir())
    synthetic = sorted(p for p in (out / "synthetic").iterdir() if p.suffix == ".png")
    assert len(synthetic) == len(training)
    segment = record["stages"]["segment"]
    assert (segment["pretrain_steps"], segment["finetune_steps"], segment["runs"]) == (4, 2, 6)
    summary = json.loads((out / "segment" / "segmentation.json").read_text())
    assert summary["pretrain"] == {
        "synthetic": str(out / "synthetic"),
        "real-unlabelled": str(training[0].parent),
    }
    assert set(summary["table"]) == {"2", str(len(training))}
    assert all(set(row) == {"scratch", "synthetic", "real-unlabelled"} for row in summary["table"].values())
    assert summary["table"] == record["table"]
    assert "labelled" in printed and f"report: {(out / 'segment' / 'segmentation.html').resolve()}" in printed
    # a second run into the same folder needs --force
    assert main([*argv, "--minutes", "30"]) == 1
    assert "holds an earlier demo run; pass --force to replace it" in capsys.readouterr().err


def test_the_segmentation_steps_fill_the_time_and_keep_their_bounds():
    pretrain, sources = 0.05, 2
    finetune = [0.005] * 6 + [0.02] * 12  # runs with 2 labelled cases are cheaper per step
    steps = plan_finetune_steps(300.0, pretrain, finetune, sources)
    per_step = OVERHEAD * (sources * PRETRAIN_RATIO * pretrain + sum(finetune))
    around = sum(AROUND_RUN_SECONDS + AROUND_RUN_STEPS * step for step in finetune)
    assert around + steps * per_step <= 300.0 < around + (steps + 1) * per_step
    assert plan_finetune_steps(1.0, pretrain, finetune, sources) == FINETUNE_BOUNDS[0]
    assert plan_finetune_steps(1e9, pretrain, finetune, sources) == FINETUNE_BOUNDS[1]


def test_the_segmentation_demo_checks_its_arguments(tmp_path, capsys):
    assert main(["demo", "--segmentation", "--dataset", "xray", "--out", str(tmp_path / "a")]) == 1
    assert "--segmentation: --dataset must be one of brain-2d, nuclei-2d, brain-3d" in capsys.readouterr().err
    assert (
        main(["demo", "--segmentation", "--3d", "--dataset", "brain-2d", "--out", str(tmp_path / "a")]) == 1
    )
    assert "(--3d: brain-3d); got brain-2d" in capsys.readouterr().err
    assert main(["demo", "--dataset", "nuclei-2d", "--out", str(tmp_path / "a")]) == 1
    assert "--dataset nuclei-2d is a set of image/mask pairs: add --segmentation" in capsys.readouterr().err
    assert main(["demo", "--segmentation", "--minutes", "0", "--out", str(tmp_path / "a")]) == 1
    assert "--minutes must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
