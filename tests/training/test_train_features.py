"""Training the domain feature encoder (``medfusion features train``): the NT-Xent loss against hand
computations, the random views, and tiny end-to-end runs on real 2D crops and 3D volumes."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from medfusion.cli import main
from medfusion.config import DataConfig
from medfusion.metrics.features import ENCODER_DIR, DomainEncoder, load_extractor
from medfusion.training.features import (
    VALIDATION_FILE,
    EncoderConfig,
    EncoderTrainer,
    FeaturesRunConfig,
    FeaturesTask,
    nt_xent,
    random_view,
    train_domain_encoder,
    validation_split,
)
from medfusion.training.loop import TrainConfig


def _config(
    max_steps: int = 2, labels: str | None = None, image_size: tuple[int, ...] | None = None, **changes
) -> FeaturesRunConfig:
    return FeaturesRunConfig(
        data=DataConfig(labels=labels),
        model=EncoderConfig(
            block_out_channels=(8, 16), norm_num_groups=4, num_features=16, image_size=image_size
        ),
        train=TrainConfig(
            max_steps=max_steps,
            batch_size=4,
            num_workers=0,
            warmup_steps=1,
            checkpoint_every=2,
            log_every=1,
            preview_every=0,
            learning_rate=1e-3,
        ),
        projection_dim=8,
        **changes,
    )


# the features of the tiny encoder: the 16-wide embedding, the image's detail at 2 scales (1
# channel), the means and detail deviations of the 8 + 16 channels of its two levels
WIDTH = 16 + 2 + 2 * (8 + 16)


def _images(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _tags(history: list[dict]) -> set[str]:
    return {key for record in history for key in record}


def _jsonl_tags(run) -> set[str]:
    lines = (run / "logs" / "metrics.jsonl").read_text().splitlines()
    return {key for line in lines for key in json.loads(line)}


# --- NT-Xent ------------------------------------------------------------------------------------


def test_nt_xent_is_low_for_aligned_pairs_and_high_for_random_ones():
    z1 = torch.eye(8) * 5  # well separated: orthogonal directions
    aligned = nt_xent(z1, z1 + 0.01 * _images(8, 8), temperature=0.1)
    random_pairs = nt_xent(_images(8, 8, seed=1), _images(8, 8, seed=2), temperature=0.1)
    assert aligned < 0.01 and random_pairs > 1.0
    assert aligned < random_pairs / 20
    assert torch.isfinite(aligned) and aligned.ndim == 0 and aligned.dtype == torch.float32


def test_nt_xent_is_symmetric_and_scale_invariant():
    z1, z2 = _images(6, 4, seed=3), _images(6, 4, seed=4)
    loss = nt_xent(z1, z2, temperature=0.5)
    assert torch.allclose(loss, nt_xent(z2, z1, temperature=0.5), atol=1e-6)
    assert torch.allclose(loss, nt_xent(3 * z1, 0.5 * z2, temperature=0.5), atol=1e-6)
    # permuting the pairs together changes nothing
    order = torch.tensor([2, 0, 5, 1, 4, 3])
    assert torch.allclose(loss, nt_xent(z1[order], z2[order], temperature=0.5), atol=1e-6)


def test_nt_xent_hand_computed_with_orthogonal_vectors():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # partners equal: each row sees its partner at similarity 1 and two others at 0
    aligned = nt_xent(torch.stack([e1, e2]), torch.stack([e1, e2]), temperature=1.0)
    assert float(aligned) == pytest.approx(math.log(2 + math.e) - 1)
    # partners orthogonal: each row's partner is at 0, one other at 1 and one at 0
    crossed = nt_xent(torch.stack([e1, e2]), torch.stack([e2, e1]), temperature=1.0)
    assert float(crossed) == pytest.approx(math.log(2 + math.e))


def test_nt_xent_matches_a_manual_cross_entropy():
    z1, z2, temperature = _images(3, 5, seed=5), _images(3, 5, seed=6), 0.3
    z = [v / v.norm() for v in torch.cat([z1, z2]).double()]
    n = 3
    losses = []
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        logits = {j: float(z[i] @ z[j]) / temperature for j in range(2 * n) if j != i}
        losses.append(-logits[partner] + math.log(sum(math.exp(v) for v in logits.values())))
    assert float(nt_xent(z1, z2, temperature)) == pytest.approx(sum(losses) / len(losses), rel=1e-5)


# --- random views -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 1, 16, 16), (3, 2, 16, 12), (2, 1, 16, 16, 16)])
def test_random_view_keeps_shape_and_range_and_is_seeded(shape):
    x = _images(*shape, seed=7)
    generator = torch.Generator().manual_seed(0)
    first, second = random_view(x, generator), random_view(x, generator)
    assert first.shape == x.shape and second.shape == x.shape
    assert first.dtype == x.dtype
    assert first.min() >= -1 and first.max() <= 1
    assert not torch.allclose(first, second)
    assert not torch.allclose(first, x)
    again = random_view(x, torch.Generator().manual_seed(0))
    assert torch.equal(first, again)
    assert not torch.equal(first, random_view(x, torch.Generator().manual_seed(1)))


def test_random_view_keeps_a_constant_image_nearly_constant():
    x = torch.full((2, 1, 16, 16), 0.3)
    view = random_view(x, torch.Generator().manual_seed(0))
    # shifts and flips keep it constant; contrast/brightness move it; nothing adds noise
    assert view.std(dim=(1, 2, 3)).max() < 1e-6
    assert (view.mean(dim=(1, 2, 3)) - 0.3).abs().max() < 0.25


# --- the training task --------------------------------------------------------------------------


def _task(num_classes: int | None, class_weight: float = 1.0) -> tuple[FeaturesTask, EncoderTrainer]:
    torch.manual_seed(0)
    encoder = DomainEncoder(
        spatial_dims=2, in_channels=1, block_out_channels=(8, 16), norm_num_groups=4, num_features=16
    )
    trainer = EncoderTrainer(encoder, projection_dim=8, num_classes=num_classes)
    return FeaturesTask(trainer, _config(class_weight=class_weight)), trainer


def test_training_step_terms_follow_the_labels():
    x = _images(4, 1, 16, 16)
    labelled = {"image": x, "label": torch.tensor([0, 1, 0, 1])}
    task, trainer = _task(num_classes=2)
    [(name, loss, terms)] = list(task.training_step({"encoder": trainer}, labelled, 0))
    assert name == "encoder" and set(terms) == {"nt_xent", "cross_entropy"}
    assert torch.allclose(loss, terms["nt_xent"] + terms["cross_entropy"])
    loss.backward()
    assert trainer.classifier.weight.grad is not None and trainer.encoder.head.weight.grad is not None

    task, trainer = _task(num_classes=2, class_weight=0.0)
    [(_, loss, terms)] = list(task.training_step({"encoder": trainer}, labelled, 0))
    assert set(terms) == {"nt_xent"} and torch.equal(loss, terms["nt_xent"])

    task, trainer = _task(num_classes=None)
    unlabelled = {"image": x, "label": torch.full((4,), -1)}
    [(_, loss, terms)] = list(task.training_step({"encoder": trainer}, unlabelled, 0))
    assert trainer.classifier is None and set(terms) == {"nt_xent"}

    features, projections, logits = trainer(x)
    assert features.shape == (4, 16) and projections.shape == (4, 8) and logits is None


def test_run_config_validates():
    with pytest.raises(ValueError, match="temperature"):
        FeaturesRunConfig(temperature=0.0)
    with pytest.raises(ValueError, match="class_weight"):
        FeaturesRunConfig(class_weight=-1.0)


# --- end to end ---------------------------------------------------------------------------------


def test_train_2d_with_classes_writes_a_loadable_encoder_and_resumes(crops_2d, tmp_path):
    run = tmp_path / "FEAT"
    logs: list[str] = []
    result = train_domain_encoder(crops_2d, run, _config(max_steps=2), progress=False, log=logs.append)
    assert result is not None and result.step == 2
    assert (run / ENCODER_DIR / "config.json").is_file()
    assert list((run / ENCODER_DIR).glob("*.safetensors"))
    assert not [p for p in (run / ENCODER_DIR).iterdir() if p.suffix in (".bin", ".pt", ".pkl")]
    assert (run / "checkpoints" / "step_000002").is_dir()
    assert (run / "logs" / "metrics.jsonl").is_file()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["image_size"] == [16, 16] and saved["model"]["num_features"] == 16
    assert "classes: fundus, histology" in "\n".join(logs)
    assert {"encoder/nt_xent", "encoder/cross_entropy"} <= _tags(result.history)
    assert {"encoder/nt_xent", "encoder/cross_entropy"} <= _jsonl_tags(run)
    assert all(math.isfinite(r["encoder/loss"]) for r in result.history if "encoder/loss" in r)

    extractor = load_extractor(run)
    assert extractor.num_features == WIDTH and extractor.spatial_dims == 2 and extractor.channels == 1
    assert extractor.input_size == (16, 16)
    x = _images(3, 1, 16, 16)
    features = extractor(x)
    assert features.shape == (3, WIDTH) and torch.isfinite(features).all()
    with torch.no_grad():  # the exported weights are the trained (EMA) encoder's
        assert torch.allclose(features, result.models["encoder"].encoder.eval()(x), atol=1e-5)

    resumed = train_domain_encoder(
        crops_2d, run, _config(max_steps=4), resume=True, progress=False, log=print
    )
    assert resumed.step == 4 and (run / "checkpoints" / "step_000004").is_dir()
    assert min(r["step"] for r in resumed.history) == 3  # continued, did not start over
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 4
    assert not torch.allclose(load_extractor(run)(x), features)


def test_train_without_labels_is_contrastive_only(crops_2d, tmp_path):
    run = tmp_path / "FEAT"
    logs: list[str] = []
    result = train_domain_encoder(crops_2d, run, _config(labels="none"), progress=False, log=logs.append)
    assert "none (contrastive only)" in "\n".join(logs)
    tags = _tags(result.history)
    assert "encoder/nt_xent" in tags and not any("cross_entropy" in t for t in tags)
    assert not any("cross_entropy" in t for t in _jsonl_tags(run))
    assert result.models["encoder"].classifier is None
    assert load_extractor(run)(_images(2, 1, 16, 16)).shape == (2, WIDTH)


def test_train_3d(crops_3d, tmp_path):
    run = tmp_path / "FEAT3D"
    result = train_domain_encoder(crops_3d, run, _config(max_steps=2), progress=False, log=lambda _: None)
    assert result.step == 2
    extractor = load_extractor(run / ENCODER_DIR)
    assert extractor.spatial_dims == 3 and extractor.input_size == (16, 16, 16)
    features = extractor(_images(2, 1, 16, 16, 16))
    assert features.shape == (2, WIDTH) and torch.isfinite(features).all()
    with pytest.raises(ValueError, match="3D"):
        extractor(_images(2, 1, 16, 16))


def test_dry_run_writes_nothing(crops_2d, tmp_path):
    run = tmp_path / "FEAT"
    logs: list[str] = []
    config = _config(image_size=(24, 24))
    assert train_domain_encoder(crops_2d, run, config, dry_run=True, progress=False, log=logs.append) is None
    assert not run.exists()
    text = "\n".join(logs)
    assert "2D at (24, 24)" in text and "20 items" in text
    resolved = yaml.safe_load(text.split("# data:")[0])
    assert resolved["model"]["image_size"] == [24, 24] and resolved["model"]["block_out_channels"] == [8, 16]


def test_image_size_must_fit_the_data(crops_2d, tmp_path):
    with pytest.raises(ValueError, match="does not fit 2D data"):
        train_domain_encoder(
            crops_2d, tmp_path / "x", _config(image_size=(16, 16, 16)), dry_run=True, log=print
        )


def test_image_size_is_applied_after_the_data_transforms(crops_2d, tmp_path, monkeypatch):
    """The crops are 16x16 and data.resize keeps them so; image_size 32 is applied last, so the
    encoder trains at the size it records (and evaluation resizes to)."""
    import medfusion.training.features as features

    seen = []
    forward = features.EncoderTrainer.forward

    def recording(self, x):
        seen.append(tuple(x.shape[2:]))
        return forward(self, x)

    monkeypatch.setattr(features.EncoderTrainer, "forward", recording)
    config = _config(max_steps=1, image_size=(32, 32)).replace(data=DataConfig(resize=(16, 16)))
    train_domain_encoder(crops_2d, tmp_path / "feat", config, progress=False, log=print)
    assert seen and set(seen) == {(32, 32)}
    saved = json.loads((tmp_path / "feat" / ENCODER_DIR / "config.json").read_text())
    assert saved["image_size"] == [32, 32]


CLI_TINY = [
    "--max-steps",
    "2",
    "--batch-size",
    "4",
    "--quiet",
    "--set",
    "model.block_out_channels=[8,16]",
    "--set",
    "model.norm_num_groups=4",
    "--set",
    "model.num_features=16",
]


def test_cli_features_train(crops_2d, tmp_path):
    """The command as documented (default DataLoader workers included)."""
    run = tmp_path / "FEAT"
    assert main(["features", "train", "--data", str(crops_2d), "--out", str(run), *CLI_TINY]) == 0
    assert (run / ENCODER_DIR / "config.json").is_file() and list((run / ENCODER_DIR).glob("*.safetensors"))
    encoder = DomainEncoder.from_pretrained(run / ENCODER_DIR)
    assert tuple(encoder.config.block_out_channels) == (8, 16) and encoder.num_features == WIDTH
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["block_out_channels"] == [8, 16] and saved["train"]["max_steps"] == 2
    assert "encoder/cross_entropy" in _jsonl_tags(run)
    assert load_extractor(run)(_images(2, 1, 16, 16)).shape == (2, WIDTH)


def test_cli_features_train_without_labels(crops_2d, tmp_path):
    run = tmp_path / "FEAT"
    argv = ["features", "train", "--data", str(crops_2d), "--out", str(run), "--labels", "none", *CLI_TINY]
    assert main([*argv, "--set", "train.num_workers=0"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["labels"] == "none"
    tags = _jsonl_tags(run)
    assert "encoder/nt_xent" in tags and not any("cross_entropy" in t for t in tags)


def test_cli_features_train_dry_run_and_errors(crops_2d, tmp_path, capsys):
    run = tmp_path / "FEAT"
    assert (
        main(["features", "train", "--data", str(crops_2d), "--out", str(run), "--dry-run", *CLI_TINY]) == 0
    )
    out = capsys.readouterr().out
    assert yaml.safe_load(out.split("# data:")[0])["model"]["num_features"] == 16
    assert not run.exists()
    argv = ["features", "train", "--data", str(crops_2d), "--out", str(run), "--set", "temperature=0"]
    assert main([*argv, "--dry-run"]) == 1
    assert "temperature" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["features", "train", "--out", str(run)])  # --data is required


def test_every_encoder_config_field_reaches_the_encoder():
    """The encoder config's fields all reach the DomainEncoder (a typo would fail here)."""
    names = set(EncoderConfig().to_dict())
    encoder = _config().model.build(spatial_dims=2, in_channels=1, image_size=(16, 16))
    assert names <= set(encoder.config)


# --- the validation criterion -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "fraction", "held"),
    [(100, 0.1, 10), (20, 0.1, 8), (15, 0.1, 0), (20, 0.0, 0), (10_000, 0.1, 256), (40, 0.5, 20)],
)
def test_validation_split(size, fraction, held):
    """A share of the images, at least 8 and at most 256, none where fewer than 8 would be left."""
    train_rows, validation_rows = validation_split(size, fraction, seed=0)
    assert len(validation_rows) == held
    assert sorted(train_rows + validation_rows) == list(range(size))
    assert validation_split(size, fraction, seed=0) == (train_rows, validation_rows)
    if held:
        assert validation_split(size, fraction, seed=1)[1] != validation_rows


def test_training_stops_when_the_validation_loss_stops_improving_and_keeps_the_best(
    crops_2d, tmp_path, monkeypatch
):
    """No improvement can reach min_improvement 1e9: the first validation (step 1) is the best, the
    second (step 2) runs out of patience 1; the run ends at step 2 with a checkpoint, and the
    encoder saved is the one of step 1."""
    seen: dict[int, dict[str, torch.Tensor]] = {}
    validation_loss = FeaturesTask.validation_loss

    def recording(self, model):
        seen[len(seen) + 1] = {k: v.clone() for k, v in model.encoder.state_dict().items()}
        return validation_loss(self, model)

    monkeypatch.setattr(FeaturesTask, "validation_loss", recording)
    run = tmp_path / "FEAT"
    config = _config(max_steps=10, validate_every=1, patience=1, min_improvement=1e9)
    result = train_domain_encoder(crops_2d, run, config, progress=False, log=lambda _: None)
    assert result.step == 2 and (run / "checkpoints" / "step_000002").is_dir()
    record = json.loads((run / VALIDATION_FILE).read_text())
    assert record["kept_step"] == 1 and record["last_step"] == 2 and record["stopped_early"]
    assert record["validation_images"] == 8 and [h["step"] for h in record["history"]] == [1, 2]
    assert [h["best"] for h in record["history"]] == [True, False]
    saved = DomainEncoder.from_pretrained(run / ENCODER_DIR).state_dict()
    weights = [k for k in saved if not k.startswith("feature_")]
    assert all(torch.equal(saved[k], seen[1][k]) for k in weights)
    assert not all(torch.equal(saved[k], seen[2][k]) for k in weights)


def test_validation_keeps_going_while_it_improves(crops_2d, tmp_path):
    """With no threshold on the improvement and plenty of patience the run takes all its steps."""
    run = tmp_path / "FEAT"
    config = _config(max_steps=4, validate_every=2, patience=5, min_improvement=0.0)
    result = train_domain_encoder(crops_2d, run, config, progress=False, log=lambda _: None)
    record = json.loads((run / VALIDATION_FILE).read_text())
    assert result.step == 4 and not record["stopped_early"]
    assert [h["step"] for h in record["history"]] == [2, 4]


def test_saved_features_are_standardised_per_group(crops_2d, tmp_path):
    """Over the training images every feature has mean 0 and every group of features total
    variance 1 (each group weighs the same in a distance)."""
    run = tmp_path / "FEAT"
    train_domain_encoder(crops_2d, run, _config(max_steps=2), progress=False, log=lambda _: None)
    from medfusion.data.dataset import ImageFolderDataset

    dataset = ImageFolderDataset(crops_2d, validate="none")
    train_rows, _ = validation_split(len(dataset), FeaturesRunConfig().validation_fraction, seed=0)
    features = load_extractor(run)(torch.stack([dataset[i]["image"] for i in train_rows])).double()
    assert features.mean(0).abs().max() < 1e-4
    encoder = DomainEncoder.from_pretrained(run / ENCODER_DIR)
    groups = encoder.feature_groups()
    assert groups == [16, 2, 8, 8, 16, 16] and sum(groups) == WIDTH
    variances = features.var(0).split(groups)
    assert all(float(v.sum()) == pytest.approx(1.0, rel=1e-3) for v in variances)


class _Interrupt(Exception):
    pass


def _stop_at(step: int):
    def callback(at: int, scalars: dict) -> None:
        if at == step:
            raise _Interrupt

    return callback


def test_an_interrupted_and_resumed_run_equals_an_uninterrupted_one(crops_2d, tmp_path):
    """Stopped after the checkpoint of step 2 and resumed to 6: the same weights, the same
    validation history (kept in the checkpoint), the same encoder kept as a run straight to 6."""
    config = _config(max_steps=6, validate_every=1, patience=3, min_improvement=0.0)
    quiet = {"progress": False, "log": lambda _: None}
    straight = train_domain_encoder(crops_2d, tmp_path / "a", config, **quiet)
    with pytest.raises(_Interrupt):
        train_domain_encoder(crops_2d, tmp_path / "b", config, callback=_stop_at(2), **quiet)
    assert (tmp_path / "b" / "checkpoints" / "step_000002" / "task.json").is_file()
    resumed = train_domain_encoder(crops_2d, tmp_path / "b", config, resume=True, **quiet)
    assert resumed.step == straight.step
    a, b = straight.models["encoder"].state_dict(), resumed.models["encoder"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads((tmp_path / run / VALIDATION_FILE).read_text()) for run in ("a", "b")]
    assert records[0]["history"] == records[1]["history"] and len(records[0]["history"]) == straight.step
    assert records[0]["kept_step"] == records[1]["kept_step"]
    saved = [DomainEncoder.from_pretrained(tmp_path / run / ENCODER_DIR).state_dict() for run in ("a", "b")]
    assert all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])


def test_resume_without_the_task_state_warns_and_goes_on(crops_2d, tmp_path):
    """A checkpoint without task.json (an earlier version's) resumes with a warning."""
    config = _config(max_steps=4, validate_every=1, patience=3, min_improvement=0.0)
    quiet = {"progress": False, "log": lambda _: None}
    with pytest.raises(_Interrupt):
        train_domain_encoder(crops_2d, tmp_path, config, callback=_stop_at(2), **quiet)
    checkpoint = tmp_path / "checkpoints" / "step_000002"
    manifest = json.loads((checkpoint / "checkpoint.json").read_text())
    manifest["files"] = [f for f in manifest["files"] if not f["path"].startswith("task.")]
    (checkpoint / "checkpoint.json").write_text(json.dumps(manifest))
    for name in ("task.json", "task.safetensors"):
        (checkpoint / name).unlink()
    with pytest.warns(UserWarning, match="no state of the encoder task"):
        resumed = train_domain_encoder(crops_2d, tmp_path, config, resume=True, **quiet)
    assert resumed.step == 4


def test_validation_settings_are_checked():
    for changes, name in (
        ({"validation_fraction": 1.0}, "validation_fraction"),
        ({"validation_fraction": -0.1}, "validation_fraction"),
        ({"validate_every": 0}, "validate_every"),
        ({"patience": 0}, "patience"),
        ({"min_improvement": -1.0}, "min_improvement"),
    ):
        with pytest.raises(ValueError, match=name):
            FeaturesRunConfig(**changes)
