"""``medfusion segment`` end to end on small bundled brain slices (tiny networks, a few steps: the
numbers are measured by running the command), its reuse of finished runs, and bad input."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("monai", reason="the segmentation tools need MONAI (the segmentation extra)")
pytest.importorskip("nilearn", reason="the brain pairs need nilearn (the demo extra)")

from medfusion.data.demo import build_demo_data
from medfusion.downstream.segment import SegmentConfig, parse_counts, run_segment

TINY = {
    "network": {"channels": [8, 16], "num_groups": 4},
    "pretrain": {"max_steps": 3, "batch_size": 4},
    "finetune": {"max_steps": 3, "batch_size": 4},
}


@pytest.fixture(scope="module")
def brain(tmp_path_factory):
    root = tmp_path_factory.mktemp("segment-data")
    built = build_demo_data(root, crop_size=16, pairs_per_set=10, datasets=("segmentation",), progress=False)
    return built / "segmentation" / "brain-2d"


def _run(brain, out, **changes):
    lines: list[str] = []
    options = {
        "pretrain": [brain / "images"], "n_labelled": "2,all", "seeds": 2,
        "config": SegmentConfig.from_dict(TINY, source="test"), "progress": False, "log": lines.append,
    }  # fmt: skip
    result = run_segment(brain / "images", brain / "masks", brain / "test-images", brain / "test-masks", out,
                         **(options | changes))  # fmt: skip
    return result, lines


@pytest.fixture(scope="module")
def experiment(brain, tmp_path_factory):
    out = tmp_path_factory.mktemp("segment") / "out"
    return out, *_run(brain, out)


def test_every_count_seed_and_initialisation_is_fine_tuned_and_scored(experiment, brain):
    out, result, lines = experiment
    train = len(list((brain / "images").iterdir()))
    test = sorted(p.name for p in (brain / "test-images").iterdir())
    assert set(result.table) == {"2", str(train)}
    assert len(result.runs) == 2 * 2 * 2  # counts x seeds x (scratch, one source)
    for name, run in result.runs.items():
        assert sorted(run["dice"]) == test
        assert all(len(scores) == 2 for scores in run["dice"].values())  # grey and white matter
        predictions = sorted(p.name for p in (out / "finetune" / name / "predictions").iterdir())
        assert predictions == test
        assert (out / "finetune" / name / "model" / "model.safetensors").is_file()
    # the same labelled cases for both initialisations of a count and seed
    assert result.runs["n2-seed0-scratch"]["cases"] == result.runs["n2-seed0-images"]["cases"]
    assert result.runs["n2-seed0-scratch"]["cases"] != result.runs["n2-seed1-scratch"]["cases"]
    for per_init in result.table.values():
        for entry in per_init.values():
            assert len(entry["seeds"]) == 2 and 0.0 <= entry["mean"] <= 1.0
    assert (out / "pretrain" / "images" / "model" / "config.json").is_file()
    summary = json.loads((out / "segmentation.json").read_text())
    assert summary["num_classes"] == 3 and summary["table"] == result.table
    page = (out / "segmentation.html").read_text()
    assert "<script" not in page and "<polyline" in page
    sources = re.findall(r"src='([^']*)'", page)
    assert len(sources) == 2 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert any(line.startswith("labelled") for line in lines)


def test_a_rerun_reuses_every_finished_run(experiment, brain):
    out = experiment[0]
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("finetune/*/result.json")}
    result, lines = _run(brain, out)
    assert not any(line.startswith("# fine-tuning") or line.startswith("# pretraining") for line in lines)
    assert {p: p.stat().st_mtime_ns for p in out.glob("finetune/*/result.json")} == stamps
    assert result.table == experiment[1].table


def test_bad_input_is_refused_before_training(brain, tmp_path):
    with pytest.raises(ValueError, match=r"n_labelled: 500 labelled cases asked for, but .* holds \d+ pairs"):
        _run(brain, tmp_path / "out", n_labelled="2,500")
    with pytest.raises(FileNotFoundError, match=r"pretrain .*nowhere: not a folder"):
        _run(brain, tmp_path / "out", pretrain=[tmp_path / "nowhere"])
    assert not (tmp_path / "out" / "finetune").exists() and not (tmp_path / "out" / "pretrain").exists()
    with pytest.raises(ValueError, match="seeds must be >= 1"):
        _run(brain, tmp_path / "out", seeds=0)


def test_counts_are_parsed():
    assert parse_counts("2, 5,10,all") == (2, 5, 10, "all")
    for text in ("0", "two", "2,2", ""):
        with pytest.raises(ValueError, match="n_labelled"):
            parse_counts(text)


def test_other_settings_are_refused_unless_forced(experiment, brain, tmp_path):
    out = tmp_path / "out"
    _run(brain, out, n_labelled="2", seeds=1, pretrain=[])
    changed = SegmentConfig.from_dict({**TINY, "finetune": {"max_steps": 4, "batch_size": 4}}, source="test")
    with pytest.raises(ValueError, match=r"holds an experiment of other settings \(config differ\)"):
        _run(brain, out, n_labelled="2", seeds=1, pretrain=[], config=changed)
    # more counts and sources add runs to the same experiment
    _, lines = _run(brain, out, n_labelled="2,3", seeds=1, pretrain=[brain / "images"])
    assert sum(line.startswith("# fine-tuning n2-seed0-scratch") for line in lines) == 0
    assert any(line.startswith("# fine-tuning n3-seed0-images") for line in lines)
    result, lines = _run(brain, out, n_labelled="2", seeds=1, pretrain=[], config=changed, force=True)
    assert any(line.startswith("# fine-tuning n2-seed0-scratch") for line in lines)
    assert result.runs["n2-seed0-scratch"]["steps"] == 4 and not (out / "pretrain").exists()


def test_an_interrupted_experiment_resumes_to_the_same_results(experiment, brain, tmp_path, monkeypatch):
    """Interrupted in the middle of pretraining (at step 3 of 4, after its checkpoint at step 2),
    then after a fine-tuned model was trained but not scored: the rerun ends as an uninterrupted
    run, weight for weight."""
    from safetensors.torch import load_file

    from medfusion.downstream import segment
    from medfusion.training.run import execute

    steps = {"max_steps": 4, "batch_size": 4, "checkpoint_every": 2}
    config = SegmentConfig.from_dict({**TINY, "pretrain": steps, "finetune": steps}, source="test")
    options = {"n_labelled": "2", "seeds": 1, "config": config}
    whole, _ = _run(brain, tmp_path / "whole", **options)

    def interrupted(run, progress):
        def stop(step, scalars):
            if step == 3:
                raise KeyboardInterrupt

        return execute(run, resume=(run.run_dir / "checkpoints").is_dir(), progress=False,
                       log=lambda message: None, callback=stop)  # fmt: skip

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(segment, "_execute", interrupted)
        with pytest.raises(KeyboardInterrupt):
            _run(brain, out, **options)
    assert not (out / "pretrain" / "images" / "model").exists()
    with monkeypatch.context() as patch:
        patch.setattr(segment, "_score", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            _run(brain, out, **options)
    assert (out / "pretrain" / "images" / "model").is_dir()
    assert not list(out.glob("finetune/*/result.json"))
    resumed, _ = _run(brain, out, **options)
    for path in (
        "pretrain/images/model",
        "finetune/n2-seed0-scratch/model",
        "finetune/n2-seed0-images/model",
    ):
        a, b = (load_file(str(root / path / "model.safetensors")) for root in (tmp_path / "whole", out))
        assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a), path
    assert resumed.table == whole.table
