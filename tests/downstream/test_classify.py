"""``run_classify``: DP-SGD through Opacus (the accountant's epsilon, per-sample clipping), the
non-private path against a plain training loop, resuming, the files written, bad input, 2D and 3D.

The folders hold tiny uint8 images of two classes told apart by their pattern (a ramp along the
first axis vs a checkerboard, both under noise); the network is a one-block DenseNet of 4 channels.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("monai")
pytest.importorskip("opacus")

from medfusion.data import write_image
from medfusion.downstream.classifier import ClassifierConfig, TensorClassDataset, build_classifier
from medfusion.downstream.classify import (
    NOTE,
    ClassifyConfig,
    check_private_model,
    load_classifier,
    make_private,
    parse_epsilons,
    resolve_delta,
    run_classify,
    train_private,
)

NETWORK = ClassifierConfig(init_features=4, growth_rate=4, block_config=(1,), num_groups=2)
# RDP calibrates the noise faster than PRV at these few steps; PRV is tested on its own below
TINY = ClassifyConfig(
    classifier=NETWORK,
    epochs=2,
    pretrain_epochs=2,
    batch_size=4,
    max_physical_batch_size=4,
    learning_rate=1e-2,
    accountant="rdp",
)
SIZE = {2: 16, 3: 8}
SUFFIX = {2: ".png", 3: ".nii.gz"}
PER_CLASS = 16


def _pattern(name: str, spatial_dims: int, rng: np.random.Generator) -> np.ndarray:
    """A ``(1, *spatial)`` uint8 image: a ramp (``ramp``) or a checkerboard (else), with noise."""
    grid = np.indices((SIZE[spatial_dims],) * spatial_dims)
    base = grid[0] * (200 / SIZE[spatial_dims]) if name == "ramp" else (grid.sum(0) % 2) * 120.0
    return np.clip(base + rng.normal(60, 20, base.shape), 0, 255).astype(np.uint8)[None]


def _folder(
    root: Path, spatial_dims: int, seed: int, classes=("checker", "ramp"), per_class=PER_CLASS
) -> Path:
    rng = np.random.default_rng(seed)
    for name in classes:
        for i in range(per_class):
            write_image(root / name / f"{i}{SUFFIX[spatial_dims]}", _pattern(name, spatial_dims, rng))
    return root


def _tensors(spatial_dims: int = 2, n: int = 2 * PER_CLASS, seed: int = 0) -> TensorClassDataset:
    rng = np.random.default_rng(seed)
    names = ("checker", "ramp")
    images = [_pattern(names[i % 2], spatial_dims, rng) for i in range(n)]
    x = torch.from_numpy(np.stack(images)).float() / 127.5 - 1
    return TensorClassDataset(x, torch.arange(n) % 2, names)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("classify")
    return {
        "train": _folder(base / "train", 2, 1),
        "test": _folder(base / "test", 2, 2, per_class=8),
        "synthetic": _folder(base / "synthetic", 2, 3, per_class=8),
    }


@pytest.fixture(scope="module")
def experiment(folders, tmp_path_factory):
    """One finished experiment (epsilon 2 and inf, two seeds, scratch and pretrained), and its log."""
    return _experiment(folders, tmp_path_factory.mktemp("experiment") / "out")


def _experiment(folders: dict[str, Path], out: Path):
    """Epsilon 2 and inf, two seeds, scratch and pretrained into ``out``; the result and the log."""
    lines: list[str] = []
    result = run_classify(
        folders["train"],
        folders["test"],
        out,
        pretrain=folders["synthetic"],
        epsilons="2,inf",
        seeds=2,
        config=TINY,
        progress=False,
        log=lines.append,
    )
    return result, lines


# --- epsilons and config --------------------------------------------------------------------------
def test_parse_epsilons():
    assert parse_epsilons("8, 1,inf") == (1.0, 8.0, math.inf)
    assert parse_epsilons([0.5, "INF"]) == (0.5, math.inf)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0,1", "every epsilon must be > 0 (or inf); got '0'"),
        ("-1", "every epsilon must be > 0"),
        ("1,abc", "'abc' is not a number or 'inf'"),
        ("nan", "every epsilon must be > 0"),
        ("1,1", "give one or more distinct values"),
        ("", "is not a number"),
    ],
)
def test_parse_epsilons_refuses(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_epsilons(text)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"epochs": 0}, "epochs must be an integer >= 1; got 0"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"max_physical_batch_size": -1}, "max_physical_batch_size must be an integer >= 1"),
        ({"pretrain_epochs": 0}, "pretrain_epochs must be an integer >= 1"),
        ({"learning_rate": 0.0}, "learning_rate must be a finite number > 0"),
        ({"max_grad_norm": math.inf}, "max_grad_norm must be a finite number > 0"),
        ({"delta": 1.0}, "delta must lie in (0, 1)"),
        ({"delta": 0.0}, "delta must lie in (0, 1)"),
        ({"accountant": "gdp"}, "accountant must be one of ('prv', 'rdp'); got 'gdp'"),
        ({"lr_schedule": "step"}, "lr_schedule must be one of"),
    ],
)
def test_config_validation_names_the_field(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ClassifyConfig(**changes)


def test_config_round_trip():
    config = TINY.replace(delta=1e-4)
    assert ClassifyConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_default_delta_is_a_tenth_of_one_over_n_and_a_large_one_warns():
    assert resolve_delta(ClassifyConfig(), 50) == pytest.approx(1 / 500)
    with pytest.warns(UserWarning, match=r"delta 0\.05 >= 1/N for N = 20 training images"):
        assert resolve_delta(ClassifyConfig(delta=0.05), 20) == 0.05
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_delta(ClassifyConfig(delta=0.05), 20, warn=False) == 0.05  # no private run: no warning


# --- privacy --------------------------------------------------------------------------------------
@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_spent_epsilon_matches_an_independent_accountant(accountant):
    """The run's epsilon is what Opacus' accountant gives for the run's (noise, sample rate, steps,
    delta), stepped here by hand; it is just under the target."""
    from opacus.accountants import PRVAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
    from opacus.accountants.rdp import RDPAccountant

    data, delta, target = _tensors(), 1e-3, 3.0
    fit = train_private(data, TINY.replace(accountant=accountant), target, delta, seed=0, progress=False)
    batches = math.ceil(len(data) / TINY.batch_size)
    assert fit.sample_rate == 1 / batches
    assert fit.steps == TINY.epochs * batches
    if accountant == "prv":
        reference = PRVAccountant()
        for _ in range(fit.steps):
            reference.step(noise_multiplier=fit.noise_multiplier, sample_rate=fit.sample_rate)
        expected = reference.get_epsilon(delta)
    else:
        orders = RDPAccountant.DEFAULT_ALPHAS
        rdp = compute_rdp(
            q=fit.sample_rate, noise_multiplier=fit.noise_multiplier, steps=fit.steps, orders=orders
        )
        expected, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    assert fit.epsilon == pytest.approx(expected, rel=1e-6)
    assert target - 0.05 <= fit.epsilon <= target
    assert fit.epsilon_per_epoch[-1] == fit.epsilon and fit.epsilon_per_epoch[0] < fit.epsilon
    assert fit.privacy()["private"] and fit.noise_multiplier > 0.5


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_each_sample_gradient_is_clipped_on_its_own():
    """Through the per-sample gradients of a private step: every sample's gradient (all parameters
    together) is above max_grad_norm before clipping and at most max_grad_norm after it, and a
    batch sums the clipped per-sample gradients."""
    norm = 1e-3
    config = TINY.replace(max_grad_norm=norm)
    data = _tensors()
    torch.manual_seed(0)
    model = build_classifier(2, 1, 2, NETWORK)
    private = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), data, config, 4.0, 1e-3, 2, 0)
    module, optimizer = private.module, private.optimizer
    params = [p for p in module.parameters() if p.requires_grad]
    images, labels = data.images[:6], data.labels[:6]

    def clipped_sum(indices: slice) -> tuple[list[torch.Tensor], torch.Tensor]:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(module(images[indices]), labels[indices]).backward()
        per_sample = torch.cat([p.grad_sample.flatten(1) for p in params], dim=1)  # (B, P)
        optimizer.clip_and_accumulate()
        return per_sample, torch.cat([p.summed_grad.flatten() for p in params])

    clipped = []
    for i in range(len(labels)):
        raw, summed = clipped_sum(slice(i, i + 1))
        assert raw.norm() > 10 * norm
        assert summed.norm() <= norm * (1 + 1e-5)
        assert torch.allclose(summed, raw[0] * norm / raw[0].norm(), rtol=1e-4, atol=1e-9)  # same direction
        clipped.append(summed)
    _, batch = clipped_sum(slice(0, len(labels)))
    assert torch.allclose(batch, torch.stack(clipped).sum(0), rtol=1e-4, atol=1e-8)
    assert batch.norm() <= len(labels) * norm * (1 + 1e-5)


def test_check_private_model_names_batch_norm_and_in_place_layers():
    check_private_model(build_classifier(3, 1, 2, NETWORK))
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
    with pytest.raises(
        ValueError, match=r"1 \(BatchNorm2d\): BatchNorm cannot support .*2 \(ReLU\): an in-place"
    ):
        check_private_model(model)


# --- non-private training -------------------------------------------------------------------------
def _plain_training(data: TensorClassDataset, config: ClassifyConfig, seed: int) -> nn.Module:
    """The textbook loop: weights from the seed, Adam, a shuffled order per epoch, cosine per epoch."""
    torch.manual_seed(seed)
    model = build_classifier(2, 1, 2, config.classifier)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    for epoch in range(config.epochs):
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * (0.5 * (1.0 + math.cos(math.pi * epoch / config.epochs)))
        order = torch.randperm(len(data))
        for start in range(0, len(data), config.batch_size):
            batch = order[start : start + config.batch_size]
            loss = F.cross_entropy(model(data.images[batch]), data.labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model


def test_epsilon_inf_is_plain_training():
    data, config = _tensors(n=30), TINY.replace(epochs=3, batch_size=8, max_physical_batch_size=8)
    fit = train_private(data, config, math.inf, 1e-3, seed=5, progress=False)
    reference = _plain_training(data, config, seed=5).state_dict()
    for key, value in fit.model.state_dict().items():
        assert torch.equal(value, reference[key]), key
    assert fit.steps == 3 * 4 and fit.epsilon == math.inf and fit.noise_multiplier == 0.0
    # physical batches of 3 sum to the same gradient (up to rounding)
    split = train_private(
        data, config.replace(max_physical_batch_size=3), math.inf, 1e-3, seed=5, progress=False
    )
    for key, value in split.model.state_dict().items():
        assert torch.allclose(value, reference[key], atol=1e-5), key
    assert not torch.equal(split.model.features.conv0.weight, reference["features.conv0.weight"])


# --- the experiment -------------------------------------------------------------------------------
def test_experiment_files_and_table(experiment, folders):
    result, lines = experiment
    out = result.out
    names = sorted(p.name for p in (out / "runs").iterdir())
    expected = sorted(
        f"eps{e}-seed{s}-{i}" for e in ("2", "inf") for s in (0, 1) for i in ("scratch", "pretrained")
    )
    assert names == expected
    assert sorted(p.name for p in (out / "pretrain").iterdir()) == ["seed0", "seed1"]
    summary = json.loads((out / "classification.json").read_text())
    for key in (
        "data",
        "test",
        "pretrain",
        "classes",
        "delta",
        "config",
        "epsilons",
        "seeds",
        "table",
        "runs",
        "note",
    ):
        assert key in summary, key
    assert summary["epsilons"] == [2.0, "inf"] and summary["delta"] == pytest.approx(1 / (10 * 2 * PER_CLASS))
    assert set(summary["runs"]) == set(expected)
    entry = summary["table"]["2"]["pretrained"]
    assert set(entry) >= {"auroc", "accuracy", "balanced_accuracy", "auroc_per_class", "epsilon_spent"}
    assert len(entry["auroc"]["per_seed"]) == 2 and entry["auroc"]["std"] >= 0
    assert set(entry["auroc_per_class"]) == {"checker", "ramp"}
    assert summary["table"]["inf"]["scratch"]["epsilon_spent"]["mean"] == "inf"
    assert summary["table"]["inf"]["scratch"]["balanced_accuracy"]["mean"] > 0.75  # it learns
    model_config = json.loads((out / "runs" / "eps2-seed1-scratch" / "model" / "config.json").read_text())
    privacy = model_config["privacy"]
    for key in (
        "target_epsilon",
        "epsilon",
        "delta",
        "noise_multiplier",
        "max_grad_norm",
        "sample_rate",
        "steps",
    ):
        assert key in privacy, key
    assert privacy["accountant"] == "rdp" and privacy["epochs"] == 2 and privacy["target_epsilon"] == 2.0
    assert 1.9 <= privacy["epsilon"] <= 2.0
    assert (
        json.loads((out / "runs" / "epsinf-seed0-scratch" / "model" / "config.json").read_text())["privacy"][
            "epsilon"
        ]
        == "inf"
    )
    run = json.loads((out / "runs" / "eps2-seed1-scratch" / "result.json").read_text())
    assert run["privacy"] == privacy and len(run["epsilon_per_epoch"]) == 2
    # the saved model gives the recorded scores
    model, _ = load_classifier(out / "runs" / "eps2-seed1-scratch" / "model")
    test = _read(folders["test"])
    accuracy = (model(test.images).argmax(1) == test.labels).double().mean().item()
    assert accuracy == pytest.approx(run["metrics"]["accuracy"])
    assert any("eps2-seed0-pretrained: epsilon spent" in line for line in lines)
    report = (out / "classification.html").read_text()
    assert "<script" not in report.lower() and "<svg" in report
    assert not re.search(r"(href|src)\s*=|<link|@import", report)
    assert report.count("<tr class='run'>") == 2 * 2  # epsilon x init
    assert "∞" in report and NOTE in report


def _read(folder: Path) -> TensorClassDataset:
    from medfusion.config import DataConfig
    from medfusion.data.dataset import open_alike

    datasets, _ = open_alike({"test": folder}, DataConfig())
    return TensorClassDataset.read(datasets["test"])


def test_rerun_reuses_finished_runs_and_refuses_other_settings(experiment, folders, tmp_path):
    result, _ = experiment
    out = tmp_path / "out"
    shutil.copytree(result.out, out)
    before = _files(out)
    redo = out / "runs" / "epsinf-seed1-pretrained"
    (redo / "result.json").unlink()
    _, lines = _experiment(folders, out)
    trained = [line for line in lines if re.match(r"eps\S+-seed\d+-\w+: ", line) and "reused" not in line]
    assert len(trained) == 1 and trained[0].startswith("epsinf-seed1-pretrained: non-private")
    assert sum("finished earlier, reused" in line for line in lines) == 7
    assert not any("pretraining" in line for line in lines)
    after = _files(out)
    for name, content in before.items():
        if name.startswith(("runs/", "pretrain/")) and name != "runs/epsinf-seed1-pretrained/result.json":
            assert after[name] == content, name  # the retrained model is the same, byte for byte
    # another setting is refused and nothing changes
    snapshot = _files(out)
    with pytest.raises(FileExistsError, match=r"other settings \(config\.epochs 2 -> 3\)"):
        run_classify(
            folders["train"], folders["test"], out, folders["synthetic"], "2", 1, TINY.replace(epochs=3)
        )
    with pytest.raises(FileExistsError, match=r"pretrain .* -> null"):
        run_classify(folders["train"], folders["test"], out, None, "2", 1, TINY)
    assert _files(out) == snapshot
    # the classifier's TSTR training fields are not used here: changing them is no other setting
    unused = TINY.replace(classifier=TINY.classifier.replace(max_steps=7, learning_rate=0.5))
    lines.clear()
    run_classify(folders["train"], folders["test"], out, folders["synthetic"], "2", 1, unused,
                 log=lines.append, progress=False)  # fmt: skip
    assert not any(re.match(r"eps\S+-seed\d+-\w+: ", line) and "reused" not in line for line in lines)


def test_force_starts_over_with_other_settings(folders, tmp_path):
    out = tmp_path / "out"
    quiet = {"progress": False, "log": lambda line: None}
    run_classify(folders["train"], folders["test"], out, epsilons="inf", seeds=1, config=TINY, **quiet)
    (out / "runs" / "stray.txt").write_text("left by the first experiment")
    with pytest.raises(FileExistsError, match=r"config\.learning_rate 0\.01 -> 0\.02"):
        run_classify(
            folders["train"],
            folders["test"],
            out,
            epsilons="inf",
            seeds=1,
            config=TINY.replace(learning_rate=0.02),
        )
    result = run_classify(
        folders["train"],
        folders["test"],
        out,
        epsilons="inf",
        seeds=1,
        config=TINY.replace(learning_rate=0.02),
        force=True,
        **quiet,
    )
    assert not (out / "runs" / "stray.txt").exists() and set(result.runs) == {"epsinf-seed0-scratch"}
    assert json.loads((out / "settings.json").read_text())["config"]["learning_rate"] == 0.02


def test_out_holding_something_else_is_refused(folders, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a medfusion classify folder"):
        run_classify(folders["train"], folders["test"], tmp_path, epsilons="inf", seeds=1, config=TINY)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


# --- bad input ------------------------------------------------------------------------------------
def test_bad_input_is_refused_before_anything_is_written(folders, tmp_path, monkeypatch):
    base = tmp_path / "inputs"
    other = _folder(base / "other", 2, 4, classes=("checker", "ramp", "spots"), per_class=2)
    single = _folder(base / "single", 2, 5, classes=("checker",), per_class=4)
    out = tmp_path / "out"

    def refused(error, message, **changes):
        arguments = {"data": folders["train"], "test": folders["test"], "out": out, "config": TINY} | changes
        with pytest.raises(error, match=message):
            run_classify(**arguments, seeds=1, progress=False, log=lambda line: None)
        assert not out.exists()

    refused(ValueError, r"epsilons: every epsilon must be > 0", epsilons="0,inf")
    refused(ValueError, r"epsilons: 'x' is not a number", epsilons="x")
    refused(
        ValueError,
        rf"test {re.escape(str(other))}: class\(es\) \['spots'\] are not classes of data",
        test=other,
    )
    refused(ValueError, rf"pretrain {re.escape(str(other))}: class\(es\) \['spots'\]", pretrain=other)
    refused(ValueError, r"data .*single: a classifier needs at least 2 classes", data=single, test=single)
    refused(FileNotFoundError, r"test .*missing: not a folder", test=base / "missing")
    refused(
        ValueError,
        r"too small for classifier\.block_config",
        config=TINY.replace(classifier=NETWORK.replace(block_config=(1, 1, 1, 1))),
    )
    monkeypatch.setitem(sys.modules, "opacus", None)
    refused(ImportError, re.escape('pip install "medfusion[dp]"'), epsilons="1,inf")


def test_seeds_must_be_positive(folders, tmp_path):
    with pytest.raises(ValueError, match=r"seeds must be an integer >= 1; got 0"):
        run_classify(folders["train"], folders["test"], tmp_path / "out", seeds=0, config=TINY)
    assert not (tmp_path / "out").exists()


# --- 3D -------------------------------------------------------------------------------------------
def test_volumes_with_pretraining_on_a_subset_of_the_classes(tmp_path):
    """8^3 volumes; the synthetic folder holds one of the two classes (allowed)."""
    train, test = _folder(tmp_path / "train", 3, 1), _folder(tmp_path / "test", 3, 2, per_class=6)
    synthetic = _folder(tmp_path / "synthetic", 3, 3, classes=("ramp",), per_class=6)
    result = run_classify(
        train,
        test,
        tmp_path / "out",
        pretrain=synthetic,
        epsilons="4,inf",
        seeds=1,
        config=TINY,
        progress=False,
        log=lambda line: None,
    )
    assert set(result.table) == {"4", "inf"} and set(result.table["4"]) == {"scratch", "pretrained"}
    assert result.table["inf"]["scratch"]["auroc"]["mean"] > 0.75
    assert result.runs["eps4-seed0-pretrained"]["privacy"]["epsilon"] <= 4.0
    model, config = load_classifier(tmp_path / "out" / "runs" / "eps4-seed0-scratch" / "model")
    assert config["spatial_dims"] == 3 and config["classes"] == ["checker", "ramp"]
    assert model(torch.zeros(1, 1, 8, 8, 8)).shape == (1, 2)


# --- the command line -----------------------------------------------------------------------------
def test_classify_from_the_command_line(folders, tmp_path, capsys):
    from medfusion.cli import main

    out = tmp_path / "cli"
    network = [
        f"classifier.{k}={v}" for k, v in (("init_features", 4), ("growth_rate", 4), ("num_groups", 2))
    ]
    sets = [x for pair in zip(["--set"] * 8, [*network, "classifier.block_config=[1]", "batch_size=4",
            "max_physical_batch_size=4", "accountant=rdp", "pretrain_epochs=1"]) for x in pair]  # fmt: skip
    data = ["--data", str(folders["train"]), "--test", str(folders["test"]), "--out", str(out)]
    argv = ["classify", *data, "--epsilon", "4", "--epochs", "1", "--seeds", "1", "--delta", "0.01",
            "--quiet", *sets]  # fmt: skip
    assert main(argv) == 0
    assert f"report: {(out / 'classification.html').resolve()}" in capsys.readouterr().out
    summary = json.loads((out / "classification.json").read_text())
    assert summary["delta"] == 0.01 and summary["config"]["epochs"] == 1 and list(summary["table"]) == ["4"]
    model = json.loads((out / "runs" / "eps4-seed0-scratch" / "model" / "config.json").read_text())
    assert model["privacy"]["target_epsilon"] == 4 and model["privacy"]["delta"] == 0.01
    assert main([*argv[:-len(sets)], "--epsilon", "0"]) == 1  # fmt: skip
    assert "--epsilon: every epsilon must be > 0 (or inf); got '0'" in capsys.readouterr().err
    assert main([*argv, "--epochs", "2"]) == 1
    assert "--force" in capsys.readouterr().err
