"""``medfusion demo``: the whole pipeline on the bundled real data, run end to end with tiny models
(the real profiles are timed by running the README command itself, in CI, and by
``scripts/demo_budget.py`` on a slowed-down machine)."""

from __future__ import annotations

import base64
import io
import json
import re
import time

import numpy as np
import pytest
from PIL import Image

from medfusion.cli import main
from medfusion.samplers.model_folder import load_model_folder
from medfusion.training.diffusion import DiffusionTask
from medfusion.training.features import FeaturesTask
from medfusion.training.vae import VAETask
from medfusion.workflows import demo
from medfusion.workflows.demo import DEMO_FILE, DemoModels, run_demo

pytest.importorskip("data_store", reason="the demo data needs pydicom-data (the demo extra)")

TINY = {
    (2, "cpu"): DemoModels((8, 16), 8, (16, 32), 1, 16, (8, 16), 16),
    (3, "cpu"): DemoModels((8, 16, 16), 4, (16, 32), 1, 8, (8, 16), 8),
}
STAGES = ["data", "inspect", "autoencoder", "diffusion", "sample", "features", "tstr", "evaluate"]
TRAINED = ("autoencoder", "diffusion", "features")
UNBOUNDED = "30"  # minutes: a budget the tiny runs never reach, so that they do what the bounds say


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The 2D demo data, built once for the tests of this module that use it."""
    return tmp_path_factory.mktemp("demo-data")


@pytest.fixture
def tiny_demo(monkeypatch):
    """Tiny models and a few steps per stage, whatever the time budget."""
    monkeypatch.setattr(demo, "PROFILES", TINY)
    monkeypatch.setattr(demo, "STEP_BOUNDS", {"autoencoder": (3, 3), "diffusion": (4, 4), "features": (2, 2)})
    monkeypatch.setattr(demo, "TSTR_STEPS", {2: 2, 3: 2})
    monkeypatch.setattr(demo, "PROBE", {"warmup": 0, "repeats": 1})  # the timings matter little here
    monkeypatch.setattr(demo, "TSTR_PROBE_STEPS", 1)


def _embedded_images(page: str) -> list[Image.Image]:
    """Every image the page references, decoded; fails on any reference that is not embedded."""
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources
    images = []
    for source in sources:
        assert source.startswith("data:image/png;base64,"), source[:60]
        images.append(Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))))
        images[-1].load()
    assert not re.search(r'(href|src)="(https?:|file:|/)', page)
    return images


def _class_means(synthetic) -> dict[str, float]:
    """The mean intensity of each class's synthetic images."""
    folders = sorted(p for p in synthetic.iterdir() if p.is_dir())
    return {
        f.name: float(np.mean([np.asarray(Image.open(png), float).mean() for png in f.glob("*.png")]))
        for f in folders
    }


def test_demo_on_the_2d_data_from_the_command_line(tmp_path, data_dir, tiny_demo, capsys):
    out = tmp_path / "run"
    data = str(data_dir)
    code = main(["demo", "--out", str(out), "--data-dir", data, "--minutes", UNBOUNDED, "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"report: {(out / 'report.html').resolve()}" in printed
    assert re.search(r"domain:\S+: FID [\d.]+, KID \S+, precision [\d.]+, recall [\d.]+", printed)
    assert "calibration: " in printed and "trained on synthetic" in printed

    summary = json.loads((out / DEMO_FILE).read_text())
    assert list(summary["stages"]) == STAGES
    assert summary["dataset"] == "xray" and summary["device"] == "cpu"
    assert summary["stages"]["autoencoder"]["steps"] == 3 and summary["stages"]["diffusion"]["steps"] == 4
    assert summary["stages"]["autoencoder"]["psnr"] > 0
    assert summary["stages"]["inspect"]["files"] == 768  # 4 classes x 192 training crops
    for name in TRAINED:  # what each stage was given and what it did
        record = summary["stages"][name]
        assert record["steps_run"] == record["steps"] and not record["stopped_at_deadline"]
        assert record["planned_seconds"] > record["seconds"] > 0
    assert "planned_seconds" not in summary["stages"]["data"]
    assert "time: " in printed and "planned s" in printed  # how the time went

    model = load_model_folder(out / "model")
    assert model.info.class_names == ("chest", "ct", "limb", "mr")
    per_class = summary["stages"]["sample"]["per_class"]
    assert per_class == 64  # as many as the 64 held-out crops of a class
    for label in model.info.class_names:
        assert len(list((out / "synthetic" / label).glob("*.png"))) == per_class
    assert len(set(_class_means(out / "synthetic").values())) > 1  # the class labels reach the samples

    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(metrics["per_class"]) == ["chest", "ct", "limb", "mr"]
    assert metrics["extractor"].startswith("domain:")
    assert metrics["pipeline"]["stages"]["features"]["steps"] == 2
    assert metrics["memorisation"]["flagged"] >= 0
    assert metrics["overall"]["n_real"] == 256 and metrics["overall"]["reference"]["n_real"] == 256
    assert {c["check"] for c in metrics["calibration"]["checks"]} >= {"blur_2: FD / real-vs-real >= 2"}
    assert metrics["tstr"]["seeds"] == [0, 1, 2] and metrics["tstr"]["config"]["max_steps"] == 2
    assert summary["stages"]["tstr"]["steps"] == 2

    page = (out / "report.html").read_text()
    images = _embedded_images(page)
    assert len(images) >= 2 * 4  # a real and a synthetic grid per class, then the closest pairs
    assert "How the synthetic images were made" in page and "autoencoder" in page
    assert "What this yardstick can see" in page and "train on synthetic, test on real" in page

    # a second run into the same folder needs --force, and then replaces the run
    assert main(["demo", "--out", str(out), "--data-dir", data, "--quiet"]) == 1
    assert "--force" in capsys.readouterr().err


def test_demo_in_3d(tmp_path, tiny_demo):
    result = run_demo(tmp_path / "run", three_d=True, data_dir=tmp_path / "data", minutes=float(UNBOUNDED),
                      progress=False, log=lambda message: None)  # fmt: skip
    model = load_model_folder(result.out / "model")
    assert model.info.spatial_dims == 3 and len(model.info.class_names) == 3
    files = sorted((result.out / "synthetic").glob("*/*.nii.gz"))
    assert len(files) == 3 * result.stages["sample"]["per_class"]
    assert sorted(result.metrics["per_class"]) == sorted(model.info.class_names)
    assert result.metrics["overall"]["n_real"] == 3 * 24 and "calibration" in result.metrics
    _embedded_images(result.report.read_text())


def _slowed(training_step, seconds: float):
    """``training_step`` that first sleeps ``seconds`` (a machine slower than this one)."""

    def slow(self, models, batch, step):
        time.sleep(seconds)
        yield from training_step(self, models, batch, step)

    return slow


def test_the_demo_keeps_its_budget_when_training_is_slow(tmp_path, data_dir, tiny_demo, monkeypatch):
    """Training steps 50 ms slower and step floors far beyond what fits: every training stage stops
    at its deadline, the demo still ends with its report, and within its budget."""
    floor = 100_000
    monkeypatch.setattr(demo, "STEP_BOUNDS", dict.fromkeys(TRAINED, (floor, floor)))
    for task in (VAETask, DiffusionTask, FeaturesTask):
        monkeypatch.setattr(task, "training_step", _slowed(task.training_step, 0.05))
    minutes, lines = 0.8, []
    start = time.monotonic()
    result = run_demo(tmp_path / "run", data_dir=data_dir, minutes=minutes, progress=False, log=lines.append)
    wall = time.monotonic() - start
    assert wall <= 60 * minutes + 10  # the margin is the budget's; 10 s for one step past a deadline
    assert result.report.is_file() and result.metrics["per_class"]
    for name in TRAINED:
        record = result.stages[name]
        assert record["stopped_at_deadline"] and 1 <= record["steps_run"] < floor
        said = f"{name}: stopped at its deadline after {record['steps_run']} of {floor} planned steps"
        assert said in lines
    assert result.stages["sample"]["per_class"] >= demo.MIN_PER_CLASS
    assert len(set(_class_means(result.out / "synthetic").values())) > 1
    assert json.loads((result.out / DEMO_FILE).read_text())["stages"] == result.stages


def test_demo_checks_its_arguments_and_output_folder(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"^minutes must be > 0; got 0"):
        run_demo(tmp_path / "a", minutes=0)
    with pytest.raises(ValueError, match=r"^dataset must be one of .*; got 'fundus'"):
        run_demo(tmp_path / "a", dataset="fundus")
    with pytest.raises(ValueError, match=r"^three_d=True runs the 'volumes' dataset; got dataset 'xray'"):
        run_demo(tmp_path / "a", three_d=True, dataset="xray")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=re.escape(f"{tmp_path / 'file'} is a file")):
        run_demo(tmp_path / "file")
    # the command line names its options instead of the Python arguments
    assert main(["demo", "--minutes", "0"]) == 1
    assert "error: --minutes must be > 0" in capsys.readouterr().err
    assert main(["demo", "--3d", "--dataset", "xray"]) == 1
    assert "error: --3d runs the 'volumes' dataset; got --dataset 'xray'" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "file")]) == 1
    assert f"{tmp_path / 'file'} is a file" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a medfusion demo run"):
        run_demo(other, force=True)
    assert (other / "notes.txt").read_text() == "mine"


def test_force_removes_only_the_demo_outputs(tmp_path):
    out = tmp_path / "run"
    (out / "synthetic" / "chest").mkdir(parents=True)
    (out / DEMO_FILE).write_text("{}")
    (out / "report.html").write_text("old")
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="force=True"):
        demo.check_out(out, force=False)
    assert (out / "report.html").is_file()
    demo.check_out(out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
