"""``medfusion demo``: the whole pipeline on the bundled real data, run end to end with tiny models
(the real profiles are timed by running the README command itself, in CI)."""

from __future__ import annotations

import base64
import io
import json
import re

import pytest
from PIL import Image

from medfusion import demo
from medfusion.cli import main
from medfusion.demo import DEMO_FILE, DemoModels, plan_steps, run_demo
from medfusion.samplers.model_folder import load_model_folder

pytest.importorskip("data_store", reason="the demo data needs pydicom-data (the demo extra)")

TINY = {
    (2, "cpu"): DemoModels((8, 16), 8, (16, 32), 1, 16, (8, 16), 16),
    (3, "cpu"): DemoModels((8, 16, 16), 4, (16, 32), 1, 8, (8, 16), 8),
}
STAGES = ["data", "inspect", "autoencoder", "diffusion", "sample", "features", "tstr", "evaluate"]


@pytest.fixture
def tiny_demo(monkeypatch):
    """Tiny models and a few steps per stage, whatever the time budget."""
    monkeypatch.setattr(demo, "PROFILES", TINY)
    monkeypatch.setattr(demo, "STEP_BOUNDS", {"autoencoder": (3, 3), "diffusion": (4, 4), "features": (2, 2)})
    monkeypatch.setattr(demo, "TSTR_STEPS", {2: 2, 3: 2})


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


def test_plan_steps_spends_the_stage_share_within_bounds():
    low, high = demo.STEP_BOUNDS["diffusion"]
    share = demo.SHARES["diffusion"]
    seconds = 0.02
    expected = int(share * 600 / (seconds * demo.OVERHEAD))
    assert low < expected < high
    assert plan_steps("diffusion", seconds, 600) == expected
    assert plan_steps("diffusion", seconds, 900) == int(share * 900 / (seconds * demo.OVERHEAD))
    assert plan_steps("diffusion", 100.0, 600) == low  # a slow machine still trains the minimum
    assert plan_steps("diffusion", 1e-6, 600) == high


def test_demo_on_the_2d_data_from_the_command_line(tmp_path, tiny_demo, capsys):
    out = tmp_path / "run"
    data = str(tmp_path / "data")
    code = main(["demo", "--out", str(out), "--data-dir", data, "--minutes", "1", "--quiet"])
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

    model = load_model_folder(out / "model")
    assert model.info.class_names == ("chest", "ct", "limb", "mr")
    per_class = summary["stages"]["sample"]["per_class"]
    assert per_class == 64  # as many as the 64 held-out crops of a class
    for label in model.info.class_names:
        assert len(list((out / "synthetic" / label).glob("*.png"))) == per_class

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
    result = run_demo(tmp_path / "run", three_d=True, data_dir=tmp_path / "data", minutes=1, progress=False,
                      log=lambda message: None)  # fmt: skip
    model = load_model_folder(result.out / "model")
    assert model.info.spatial_dims == 3 and len(model.info.class_names) == 3
    files = sorted((result.out / "synthetic").glob("*/*.nii.gz"))
    assert len(files) == 3 * result.stages["sample"]["per_class"]
    assert sorted(result.metrics["per_class"]) == sorted(model.info.class_names)
    assert result.metrics["overall"]["n_real"] == 3 * 24 and "calibration" in result.metrics
    _embedded_images(result.report.read_text())


def test_demo_checks_its_arguments_and_output_folder(tmp_path):
    with pytest.raises(ValueError, match="--minutes"):
        run_demo(tmp_path / "a", minutes=0)
    with pytest.raises(ValueError, match="--dataset"):
        run_demo(tmp_path / "a", dataset="fundus")
    with pytest.raises(ValueError, match="--3d"):
        run_demo(tmp_path / "a", three_d=True, dataset="xray")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        run_demo(tmp_path / "file")
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
    with pytest.raises(FileExistsError, match="--force"):
        demo._check_out(out, force=False)
    assert (out / "report.html").is_file()
    demo._check_out(out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
