"""``medfusion benchmark``: every model trained, sampled and evaluated alike on small crops of the
bundled X-rays (tiny models, a few steps: the real budgets are measured by running the command), an
external folder of real images as a row, resume, and bad input refused before any training."""

from __future__ import annotations

import json
import re
import shutil
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

from medfusion.cli import main
from medfusion.data.demo import build_demo_data
from medfusion.workflows import demo
from medfusion.workflows.benchmark import (
    BENCHMARK_FILE,
    MODELS_DIR,
    RECORD_FILE,
    REPORT_FILE,
    check_models,
    count_parameters,
    default_models,
    parse_external,
    run_benchmark,
    table_lines,
)
from medfusion.workflows.demo import DemoModels

pytest.importorskip("data_store", reason="the bundled X-rays need pydicom-data (the demo extra)")

TINY_PROFILES = {(2, "cpu"): DemoModels((8, 16), 8, (16, 32), 1, 16, (8, 16), 16)}
TINY_GANS = {
    "wgan-gp": {"model": {"base_channels": 8, "levels": 2, "z_dim": 8, "norm_num_groups": 4}},
    "stylegan2": {"model": {"channel_base": 64, "channel_max": 8, "z_dim": 8, "w_dim": 8}},
}
TRAINED = ("diffusion", "wgan-gp", "stylegan2")
N = 4  # samples per class
CLASSES = ("chest", "ct", "limb", "mr")


@contextmanager
def tiny():
    """Tiny models and a few steps per stage, whatever the budget."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(demo, "PROFILES", TINY_PROFILES)
        patch.setattr(demo, "STEP_BOUNDS", {"autoencoder": (3, 3), "diffusion": (4, 4), "features": (2, 2),
                                            "gan": (3, 3)})  # fmt: skip
        patch.setattr(demo, "TSTR_STEPS", {2: 2, 3: 2})
        patch.setattr(demo, "PROBE", {"warmup": 0, "repeats": 1})
        yield


@pytest.fixture(scope="module")
def xray(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmark-data")
    return build_demo_data(root, crop_size=16, per_class=16, datasets=("xray",), progress=False) / "xray"


@pytest.fixture(scope="module")
def real_copy(xray, tmp_path_factory):
    """Real training images (not held out) laid out as a sample folder made elsewhere."""
    folder = tmp_path_factory.mktemp("real-copy")
    for label in CLASSES:
        (folder / label).mkdir()
        for file in sorted((xray / "train" / label).iterdir())[:N]:
            shutil.copy(file, folder / label / file.name)
    return folder


def _run(xray, out, **changes):
    lines: list[str] = []
    models = changes.get("models", TRAINED)
    gans = {name: config for name, config in TINY_GANS.items() if name in models}
    options = {"minutes": 5, "n": N, "gan_configs": gans, "progress": False, "log": lines.append}
    with tiny():
        result = run_benchmark(xray / "train", xray / "heldout", out, **(options | changes))
    return result, lines


@pytest.fixture(scope="module")
def benchmark(xray, real_copy, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    result, lines = _run(xray, out, external={"real-copy": real_copy})
    return out, result, lines


def test_every_model_is_trained_sampled_and_evaluated_alike(benchmark):
    out = benchmark[0]
    summary = json.loads((out / BENCHMARK_FILE).read_text())
    rows = summary["rows"]
    assert list(rows) == [*TRAINED, "real-copy"]
    extractors = {row["extractor"] for row in rows.values()}
    assert extractors == {f"domain:{out / 'features' / 'encoder'}"}  # one yardstick for every row
    for name in TRAINED:
        row = rows[name]
        assert row["source"] == "trained" and row["kind"] == name
        assert row["n_per_class"] == N and row["n_fake"] == N * len(CLASSES)
        assert row["n_real"] == rows["real-copy"]["n_real"]
        files = {p.parent.name for p in (out / MODELS_DIR / name / "synthetic").rglob("*.png")}
        assert files == set(CLASSES)
        assert row["parameters"] == count_parameters(out / MODELS_DIR / name / "model") > 0
        assert row["training_seconds"] > 0 and row["sampling_images_per_second"] > 0
        evaluation = json.loads((out / MODELS_DIR / name / "evaluation" / "metrics.json").read_text())
        assert row["metrics"]["fid"]["value"] == evaluation["overall"]["fid"]
        assert 0.0 <= row["metrics"]["tstr"]["value"] <= 1.0
    assert rows["diffusion"]["steps"] == {"autoencoder": 3, "diffusion": 4}
    assert rows["wgan-gp"]["steps"] == rows["stylegan2"]["steps"] == {"gan": 3}
    assert rows["real-copy"]["source"] == "external" and rows["real-copy"]["parameters"] is None
    # the real-vs-real row: the first model's reference, the classifier trained on real images
    reference = summary["real_vs_real"]["metrics"]
    assert reference["fid"]["value"] == rows["diffusion"]["reference"]["fid"]["reference"]
    assert set(reference) >= {"fid", "precision", "recall", "tstr"}


def test_the_yardstick_ranks_real_images_above_models_of_a_few_steps(benchmark):
    """Real training images as an external row score far better than models trained 3-4 steps
    (noise): the comparison can tell a good sample folder from a bad one."""
    rows = benchmark[1].rows
    real = rows["real-copy"]["metrics"]
    for name in TRAINED:
        assert real["fid"]["value"] < rows[name]["metrics"]["fid"]["value"] / 2, name
        assert real["coverage"]["value"] > rows[name]["metrics"]["coverage"]["value"], name


def test_the_report_is_self_contained_with_a_grid_per_class(benchmark):
    out, result, lines = benchmark
    page = (out / REPORT_FILE).read_text()
    assert "<script" not in page.lower()
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    # a grid of the real images and of every row, for every class
    assert len(sources) == len(CLASSES) * (1 + len(result.rows))
    for label in CLASSES:
        assert f"<h3>{label}</h3>" in page
    svg = page[page.index("<svg") : page.index("</svg>")]
    assert svg.count("<circle") == len(result.rows)  # one point per row, and the real-vs-real square
    assert svg.count("<rect") == 2
    for name in result.rows:
        assert f">{name}</a>" in page
    # the printed table has a line per row and the real-vs-real line
    table = table_lines(result.rows, result.reference)
    assert [line.split()[0] for line in table[2:]] == [*result.rows, "real"]
    assert all(line in lines for line in table[1:])


def test_a_second_call_resumes_without_training_again(benchmark, xray, real_copy):
    out = benchmark[0]
    records = {name: (out / MODELS_DIR / name / RECORD_FILE).read_text() for name in TRAINED}
    record = json.loads(records["wgan-gp"])
    del record["training"]  # as if wgan-gp's training had been interrupted
    (out / MODELS_DIR / "wgan-gp" / RECORD_FILE).write_text(json.dumps(record))
    result, lines = _run(xray, out, external={"real-copy": real_copy})
    assert any("resuming" in line for line in lines)
    trained = [line for line in lines if re.search(r"\] training \S+ for", line)]
    assert len(trained) == 1 and "wgan-gp" in trained[0]
    assert any("wgan-gp: an interrupted training starts over" in line for line in lines)
    for name in ("diffusion", "stylegan2"):
        assert (out / MODELS_DIR / name / RECORD_FILE).read_text() == records[name]
        assert result.rows[name]["metrics"] == benchmark[1].rows[name]["metrics"]
    assert "training" in json.loads((out / MODELS_DIR / "wgan-gp" / RECORD_FILE).read_text())


def test_other_settings_in_the_same_folder_are_refused(benchmark, xray):
    with pytest.raises(FileExistsError, match=r"other settings \(minutes 5\.0 -> 6\.0\)"):
        _run(xray, benchmark[0], minutes=6)


def _nothing_trained(out) -> bool:
    return not (out / MODELS_DIR).exists() and not (out / "features").exists()


def _write_pngs(folder, classes, size, mode="L", count=3):
    rng = np.random.default_rng(0)
    for label in classes:
        (folder / label).mkdir(parents=True)
        for i in range(count):
            shape = (size, size, 3) if mode == "RGB" else (size, size)
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(
                folder / label / f"{i}.png"
            )
    return folder


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("classes", r"external other .*: its classes \['chest', 'ct', 'limb'\] differ .*missing: \['mr'\]"),
        ("channels", r"external other .*: 2D images with 3 channel\(s\)"),
        ("size", r"external other .*: images of size \[32, 32\], but the models here make \[16, 16\]"),
    ],
)
def test_external_folders_unlike_the_data_are_refused_before_training(xray, tmp_path, case, error):
    classes = CLASSES[:3] if case == "classes" else CLASSES
    size = 32 if case == "size" else 16
    other = _write_pngs(tmp_path / "other", classes, size, "RGB" if case == "channels" else "L")
    with pytest.raises(ValueError, match=error):
        _run(xray, tmp_path / "out", external={"other": other})
    assert _nothing_trained(tmp_path / "out")


def test_a_budget_that_buys_no_step_is_refused_before_training(xray, tmp_path):
    with pytest.raises(
        ValueError, match=r"minutes 1e-05 is too small for diffusion: one training step takes"
    ):
        _run(xray, tmp_path / "out", minutes=1e-5, models=["diffusion", "wgan-gp"])
    assert _nothing_trained(tmp_path / "out")


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        (
            {"models": ["diffusion", "gan3"]},
            r"models: unknown model 'gan3'; known: diffusion, wgan-gp, stylegan2",
        ),
        ({"models": ["wgan-gp", "wgan-gp"]}, r"models: 'wgan-gp' is given twice"),
        ({"models": []}, r"models: give at least one model"),
        ({"minutes": 0}, r"minutes must be > 0"),
        ({"n": 0}, r"n must be >= 1"),
        ({"models": ["wgan-gp"], "gan_configs": {"stylegan2": {}}}, r"gan_configs: 'stylegan2' is not a GAN"),
    ],
)
def test_bad_arguments_are_refused_before_training(xray, tmp_path, changes, error):
    with pytest.raises(ValueError, match=error):
        _run(xray, tmp_path / "out", **changes)
    assert _nothing_trained(tmp_path / "out")


def test_model_names_and_external_items_are_checked():
    assert default_models(2) == ("diffusion", "wgan-gp", "stylegan2")
    assert default_models(3) == ("diffusion", "wgan-gp")
    with pytest.raises(ValueError, match=r"models: stylegan2 supports 2D images only; the data is 3D"):
        check_models(["diffusion", "stylegan2"], 3, {})
    with pytest.raises(ValueError, match=r"external 'wgan-gp': the name of a model trained here"):
        check_models(["wgan-gp"], 2, {"wgan-gp": "x"})
    with pytest.raises(ValueError, match=r"external 'a/b': a name of letters"):
        check_models(["wgan-gp"], 2, {"a/b": "x"})
    assert parse_external(["sg3=/data/a=b"]) == {"sg3": __import__("pathlib").Path("/data/a=b")}
    for item in ("sg3", "=dir", "sg3="):
        with pytest.raises(ValueError, match=rf"external {re.escape(repr(item))}: give NAME=SAMPLES_DIR"):
            parse_external([item])
    with pytest.raises(ValueError, match=r"the name 'a' is given twice"):
        parse_external(["a=x", "a=y"])


def test_the_command_line_names_its_options(xray, tmp_path, capsys):
    argv = ["benchmark", "--data", str(xray / "train"), "--heldout", str(xray / "heldout")]
    assert main([*argv, "--out", str(tmp_path / "out"), "--models", "diffusion,gan3", "--quiet"]) == 1
    assert "medfusion: error: --models: unknown model 'gan3'" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "out"), "--external", "nofolder", "--quiet"]) == 1
    assert "--external 'nofolder': give NAME=SAMPLES_DIR" in capsys.readouterr().err
    assert _nothing_trained(tmp_path / "out")
