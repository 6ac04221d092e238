"""``medfusion.workflows.sample``: a model folder of any registered kind written as a synthetic
dataset, then evaluated against real images, with the summary in its card and README."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import medfusion.samplers.generator as generator_module
from medfusion.cli import main
from medfusion.data import write_image
from medfusion.metrics.features import ENCODER_DIR, DomainEncoder
from medfusion.samplers import CARD, README, register_generator_kind
from medfusion.workflows.sample import evaluation_folder, run_sample
from tests.samplers._toy_generator import load_toy, save_toy_folder, toy_info, toy_net

TINY = {"block_out_channels": (4, 8), "norm_num_groups": 4, "num_features": 8, "image_size": (16, 8)}


@pytest.fixture
def toy_model(tmp_path, monkeypatch) -> Path:
    """A model folder of the ``toy`` kind, registered for this test."""
    monkeypatch.setattr(generator_module, "_KINDS", dict(generator_module._KINDS))
    register_generator_kind("toy", load_toy)
    info = dataclasses.replace(toy_info(2), training_data={"files": 8, "counts": {"a": 4, "b": 4}})
    return save_toy_folder(tmp_path / "model", toy_net(2), info)


def _real(root: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for label in ("a", "b"):
        for i in range(6):
            write_image(root / label / f"{i}.png", rng.integers(0, 65535, (1, 16, 8), dtype=np.uint16))
    return root


def _encoder(folder: Path) -> Path:
    torch.manual_seed(0)
    DomainEncoder(spatial_dims=2, in_channels=1, **TINY).save_pretrained(
        folder / ENCODER_DIR, safe_serialization=True
    )
    return folder


def test_sample_then_evaluate_records_the_summary_in_the_card(tmp_path, toy_model):
    real, train = _real(tmp_path / "real", 0), _real(tmp_path / "train", 1)
    out = tmp_path / "synthetic"
    lines = []
    features = _encoder(tmp_path / "feat")
    result, summary = run_sample(
        toy_model,
        out,
        6,
        evaluate_against=real,
        train=train,
        features=features,
        progress=False,
        log=lines.append,
    )
    assert result.total == 12 and result.written == 12
    report = evaluation_folder(out)
    assert report == tmp_path / "synthetic-evaluation" and (report / "report.html").is_file()
    assert not (out / "synthetic-evaluation").exists()  # never inside the dataset: it would read as a class
    metrics = json.loads((report / "metrics.json").read_text())
    card = json.loads((out / CARD).read_text())
    assert card["evaluation"] == summary and summary["against"] == str(real)
    assert summary["fid"] == pytest.approx(metrics["overall"]["fid"])
    assert (
        summary["memorisation"].endswith("real images' distances") and str(train) in summary["memorisation"]
    )
    assert "intensity" in metrics and len(summary["intensity_relative_w1"]) == 1
    text = (out / README).read_text()
    assert "## Evaluation" in text and str(report / "report.html") in text
    assert any("the card of" in line for line in lines)


def test_arguments_are_checked_before_the_model_is_loaded(tmp_path, toy_model):
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        run_sample(tmp_path / "missing", tmp_path / "out", 0)
    with pytest.raises(ValueError, match=r"train .* needs evaluate_against"):
        run_sample(toy_model, tmp_path / "out", 1, train=tmp_path)
    with pytest.raises(ValueError, match=r"evaluate_against .*: not a folder"):
        run_sample(toy_model, tmp_path / "out", 1, evaluate_against=tmp_path / "nowhere")
    assert not (tmp_path / "out").exists()


def test_the_command_line_names_its_options(tmp_path, toy_model, capsys):
    code = main(
        ["sample", str(toy_model), "--n", "1", "--out", str(tmp_path / "o"), "--train", str(tmp_path)]
    )
    assert (
        code == 1 and "--train (the memorisation audit) needs --evaluate-against" in capsys.readouterr().err
    )
    code = main(["sample", str(toy_model), "--n", "1", "--out", str(tmp_path / "o"), "--format", "png",
                 "--licence", "CC0-1.0", "--quiet"])  # fmt: skip
    assert code == 0 and json.loads((tmp_path / "o" / CARD).read_text())["licence"] == "CC0-1.0"
