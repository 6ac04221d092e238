"""The shared training loop: exact resume, corrupt checkpoints, NaN stop, logging, data order."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import SafetensorError

from medfusion.autoencoders.losses import VAELoss, VAELossConfig
from medfusion.training import loop
from medfusion.training.checkpoint import CheckpointManager
from medfusion.training.loop import EpochSampler, TrainConfig, TrainingError, measure_step_seconds, train
from medfusion.training.state_io import CheckpointError, load_state
from medfusion.training.vae import VAETask
from tests.tiny import tiny_vae
from tests.training._training_helpers import RetinaCrops

BASE = TrainConfig(
    max_steps=12,
    batch_size=4,
    gradient_accumulation_steps=2,
    learning_rate=2e-3,
    lr_schedule="cosine",
    warmup_steps=3,
    checkpoint_every=4,
    keep_checkpoints=2,
    log_every=2,
    preview_every=0,
    num_workers=0,
    ema_decay=0.99,
    seed=3,
)
# adversarial terms from step 2: two optimizers, the adaptive weight and the discriminator's state
# are all part of what a resume has to restore.
LOSS = VAELossConfig(
    adversarial_weight=0.5,
    adversarial_start=2,
    discriminator_channels=4,
    discriminator_layers=2,
    discriminator_norm_groups=2,
)


class Stop(Exception):
    pass


def _task(seed: int = 0) -> VAETask:
    torch.manual_seed(seed)
    vae = tiny_vae()
    return VAETask(vae, VAELoss(LOSS, spatial_dims=2, in_channels=1))


def _stop_at(step_to_stop: int):
    def callback(step, scalars):
        if step == step_to_stop:
            raise Stop

    return callback


def _weights(result) -> dict[str, torch.Tensor]:
    return {f"{m}.{k}": v.clone() for m, mod in result.models.items() for k, v in mod.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_killed_and_resumed_run_equals_an_uninterrupted_one(tmp_path, retina_crops):
    config = BASE.replace(max_steps=60, checkpoint_every=10, log_every=10, warmup_steps=10)
    straight = train(_task(), retina_crops, tmp_path / "a", config, progress=False)
    assert straight.step == 60

    with pytest.raises(Stop):  # killed at step 35; the last checkpoint is step 30
        train(_task(), retina_crops, tmp_path / "b", config, callback=_stop_at(35), progress=False)
    assert [p.name for p in sorted((tmp_path / "b" / "checkpoints").iterdir())] == [
        "step_000020",
        "step_000030",
    ]
    # a fresh process rebuilds the model from scratch: its different initial weights must not matter
    resumed = train(_task(seed=1), retina_crops, tmp_path / "b", config, resume=True, progress=False)
    assert resumed.step == 60
    _assert_same(_weights(straight), _weights(resumed))
    # the final checkpoints agree too: EMA, optimizer moments, schedule
    final_a = tmp_path / "a" / "checkpoints" / "step_000060"
    final_b = tmp_path / "b" / "checkpoints" / "step_000060"
    ema_a, ema_b = load_state(final_a / "ema"), load_state(final_b / "ema")
    assert ema_a["optimization_step"] == ema_b["optimization_step"] == 60
    for x, y in zip(ema_a["shadow_params"], ema_b["shadow_params"], strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    for name in ("optimizer_vae", "optimizer_discriminator"):
        opt_a, opt_b = load_state(final_a / name), load_state(final_b / name)
        assert opt_a["state"].keys() == opt_b["state"].keys()
        for key in opt_a["state"]:
            torch.testing.assert_close(opt_a["state"][key]["exp_avg"], opt_b["state"][key]["exp_avg"])
    assert load_state(final_a / "scheduler_vae") == load_state(final_b / "scheduler_vae")


def test_resume_is_a_different_run_without_the_checkpoint_state(tmp_path, retina_crops):
    """Control for the test above: restarting from scratch does not reproduce the weights."""
    straight = train(_task(), retina_crops, tmp_path / "a", BASE, progress=False)
    other = train(_task(seed=1), retina_crops, tmp_path / "b", BASE, progress=False)
    diffs = [not torch.allclose(v, _weights(other)[k]) for k, v in _weights(straight).items()]
    assert any(diffs)


def test_corrupt_latest_checkpoint_is_reported_and_the_previous_one_used(tmp_path, retina_crops, capsys):
    config = BASE.replace(keep_checkpoints=3)
    straight = train(_task(), retina_crops, tmp_path / "a", config, progress=False)
    with pytest.raises(Stop):
        train(_task(), retina_crops, tmp_path / "b", config, callback=_stop_at(9), progress=False)
    latest = tmp_path / "b" / "checkpoints" / "step_000008" / "model_vae.safetensors"
    latest.write_bytes(latest.read_bytes()[:100])  # truncated, as by a full disk
    capsys.readouterr()
    resumed = train(_task(), retina_crops, tmp_path / "b", config, resume=True, progress=False)
    err = capsys.readouterr().err
    assert "step_000008" in err and "model_vae.safetensors" in err
    assert "resumed from" in err and "step_000004" in err
    _assert_same(_weights(straight), _weights(resumed))


def test_all_checkpoints_corrupt_is_an_error(tmp_path, retina_crops):
    config = BASE.replace(max_steps=4)
    train(_task(), retina_crops, tmp_path, config, progress=False)
    (tmp_path / "checkpoints" / "step_000004" / "checkpoint.json").unlink()
    with pytest.raises(CheckpointError, match="step_000004"):
        train(_task(), retina_crops, tmp_path, config, resume=True, progress=False)


def test_existing_checkpoints_without_resume_are_not_overwritten(tmp_path, retina_crops):
    config = BASE.replace(max_steps=4)
    train(_task(), retina_crops, tmp_path, config, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(_task(), retina_crops, tmp_path, config, progress=False)


def test_nan_in_a_batch_stops_and_names_the_files(tmp_path):
    bad = RetinaCrops(count=16, nan_at=5)
    config = BASE.replace(max_steps=20, gradient_accumulation_steps=1, checkpoint_every=100)
    with pytest.raises(TrainingError) as info:
        train(_task(), bad, tmp_path, config, progress=False)
    message = str(info.value)
    assert "loss is nan" in message and "batch itself holds NaN" in message
    assert "crop_005.png" in message
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_diverging_model_stops_with_advice(tmp_path, retina_crops):
    config = BASE.replace(learning_rate=1e12, max_grad_norm=None, ema_decay=None, warmup_steps=0)
    with pytest.raises(TrainingError, match="model diverged"):
        train(_task(), retina_crops, tmp_path, config.replace(max_steps=50), progress=False)


def test_logs_scalars_images_and_tensorboard(tmp_path, retina_crops):
    config = BASE.replace(max_steps=4, preview_every=2)
    result = train(_task(), retina_crops, tmp_path, config, progress=False)
    records = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert {"vae/loss", "vae/pixel", "vae/kl", "images_per_second", "lr/vae", "preview/psnr"} <= set(
        records[-1]
    )
    assert "discriminator/loss" in records[-1]  # on from step 2
    assert records == result.history
    assert sorted(p.name for p in (tmp_path / "logs" / "images").iterdir()) == [
        "vae_step_0000002.png",
        "vae_step_0000004.png",
    ]
    assert list((tmp_path / "logs" / "vae").glob("events.out.tfevents.*"))


def _logged_steps(run) -> list[int]:
    lines = (run / "logs" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def test_a_resumed_run_logs_each_step_once(tmp_path, retina_crops):
    config = BASE.replace(max_steps=8, checkpoint_every=4, log_every=2)
    with pytest.raises(Stop):  # killed at step 6, after logging it; the last checkpoint is step 4
        train(_task(), retina_crops, tmp_path, config, callback=_stop_at(6), progress=False)
    assert _logged_steps(tmp_path) == [2, 4, 6]
    metrics = tmp_path / "logs" / "metrics.jsonl"
    with metrics.open("a") as f:  # what a run killed later still wrote, and a torn last line
        f.write(json.dumps({"step": 7, "vae/loss": 123.0}) + "\n" + '{"step": 8, "vae/lo')
    resumed = train(_task(), retina_crops, tmp_path, config, resume=True, progress=False)
    assert _logged_steps(tmp_path) == [2, 4, 6, 8]
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert records[2:] == resumed.history  # steps 6 and 8 as the resumed run logged them
    assert all(r["vae/loss"] != 123.0 for r in records)


def test_a_new_run_starts_a_new_log(tmp_path, retina_crops):
    """A run that died before its first checkpoint leaves a log; starting over (no checkpoint to
    resume from) starts the log over too."""
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "metrics.jsonl").write_text(json.dumps({"step": 2, "vae/loss": 9.0}) + "\n")
    train(_task(), retina_crops, tmp_path, BASE.replace(max_steps=2), progress=False)
    records = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2] and records[0]["vae/loss"] != 9.0


@pytest.mark.parametrize(
    "error",
    [
        SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"),
        OSError(28, ""),
    ],
    ids=["safetensors", "oserror"],
)
def test_a_full_disk_at_a_checkpoint_names_it_and_keeps_the_earlier_one(
    tmp_path, retina_crops, monkeypatch, error
):
    def save_file(tensors, path, *args, **kwargs):
        if "step_000004" in str(path):
            raise error
        return real_save_file(tensors, path, *args, **kwargs)

    real_save_file = loop.save_file
    monkeypatch.setattr(loop, "save_file", save_file)
    with pytest.raises(OSError) as info:
        train(_task(), retina_crops, tmp_path, BASE.replace(max_steps=4, checkpoint_every=2), progress=False)
    manager = CheckpointManager(tmp_path / "checkpoints")
    message = str(info.value)
    assert info.value.filename == str(manager.folder(4))
    assert message.startswith(f"{manager.folder(4)}: cannot write: ") and "checkpoints are kept" in message
    assert [p.name for p in manager.root.iterdir()] == ["step_000002"]  # nothing half-written
    assert manager.validate(manager.folder(2)) == []


def test_dataset_smaller_than_a_batch(tmp_path):
    with pytest.raises(TrainingError, match="fewer than one global batch"):
        train(_task(), RetinaCrops(count=3), tmp_path, BASE, progress=False)


def test_bf16_mixed_precision_trains_on_cpu(tmp_path, retina_crops):
    config = BASE.replace(max_steps=3, mixed_precision="bf16", checkpoint_every=3)
    result = train(_task(), retina_crops, tmp_path, config, progress=False)
    assert result.step == 3
    assert all(torch.isfinite(p).all() for p in result.models["vae"].parameters())
    assert next(result.models["vae"].parameters()).dtype == torch.float32  # weights stay fp32


def test_epoch_sampler_shards_disjointly_and_resumes_mid_epoch():
    shards = [EpochSampler(22, batch_size=3, seed=1, rank=r, world_size=2) for r in range(2)]
    for s in shards:
        s.set_epoch(4)
    batches = [list(s) for s in shards]
    assert len(batches[0]) == len(batches[1]) == 3  # 22 // 6 global batches
    flat = [i for rank in batches for b in rank for i in b]
    assert len(flat) == len(set(flat)) == 18
    skipped = EpochSampler(22, batch_size=3, seed=1, rank=1, world_size=2)
    skipped.set_epoch(4, start=2)
    assert list(skipped) == batches[1][2:]
    other = EpochSampler(22, batch_size=3, seed=1)
    other.set_epoch(5)
    first = EpochSampler(22, batch_size=3, seed=1)
    first.set_epoch(4)
    assert list(other) != list(first)


def test_train_config_validation():
    with pytest.raises(ValueError, match=r"train\.mixed_precision"):
        TrainConfig(mixed_precision="fp8")
    with pytest.raises(ValueError, match=r"train\.batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match=r"train\.lr_schedule"):
        TrainConfig(lr_schedule="exponential")
    with pytest.raises(ValueError, match=r"train\.ema_decay"):
        TrainConfig(ema_decay=1.0)


def test_measure_step_seconds_times_real_optimizer_steps():
    """The probe runs forward, backward and an optimizer step of every trained module."""
    task = _task()
    before = {k: v.clone() for k, v in task.vae.state_dict().items()}
    batch = {"image": torch.rand(2, 1, 16, 16) * 2 - 1}
    seconds = measure_step_seconds(task, batch, BASE, repeats=2)
    assert 0 < seconds < 60
    after = task.vae.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if after[k].is_floating_point())
    with pytest.raises(ValueError, match="repeats"):
        measure_step_seconds(task, batch, BASE, repeats=0)


def test_measure_step_seconds_times_the_optimizer_training_runs(monkeypatch):
    """The probe's AdamW takes the config's betas and weight decay, like the training loop's."""
    made = []

    class Recording(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            made.append(kwargs)
            super().__init__(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    config = BASE.replace(adam_betas=(0.8, 0.95), weight_decay=0.05)
    measure_step_seconds(_task(), {"image": torch.rand(2, 1, 16, 16) * 2 - 1}, config, repeats=1, warmup=0)
    assert made and all(k["betas"] == (0.8, 0.95) and k["weight_decay"] == 0.05 for k in made)
    assert made[0]["lr"] == config.learning_rate and all(k["fused"] is False for k in made)  # CPU: not fused


@pytest.mark.parametrize(
    ("trainer", "says"),
    [
        ("[1, 2]", "expected the keys step, processes and train"),
        ('{"step": 5, "processes": 1}', "expected the keys step, processes and train"),
        ('{"step": 5, "processes": 1, "train": {}, "evil": 1}', "expected the keys"),
        ('{"step": "5", "processes": 1, "train": {}}', "step must be an integer >= 0; got '5'"),
        ('{"step": true, "processes": 1, "train": {}}', "step must be an integer >= 0; got True"),
        ('{"step": 5, "processes": 0, "train": {}}', "processes must be an integer >= 1; got 0"),
        ('{"step": 5, "processes": 1, "train": []}', "train must be a mapping"),
        ('{"step": 4, "processes": 1, "train": {}}', "says step 4, the folder step_000005"),
        ("{", "cannot read"),
    ],
)
def test_trainer_json_is_checked_against_its_schema(tmp_path, trainer, says):
    from medfusion.training.loop import TRAINER_FILE, _read_trainer
    from medfusion.training.state_io import CheckpointError

    folder = tmp_path / "step_000005"
    folder.mkdir()
    (folder / TRAINER_FILE).write_text(trainer)
    with pytest.raises(CheckpointError, match=f"^{folder / TRAINER_FILE}: .*{re.escape(says)}"):
        _read_trainer(folder)
    (folder / TRAINER_FILE).write_text('{"step": 5, "processes": 2, "train": {"seed": 0}}')
    assert _read_trainer(folder)["processes"] == 2


def test_a_passed_deadline_stops_after_one_step_with_a_checkpoint(tmp_path, retina_crops, capsys):
    """A deadline in the past: the run ends after its first optimizer step, as at max_steps (a
    checkpoint of that step, the step's scalars), and says so."""
    import time

    config = BASE.replace(gradient_accumulation_steps=1, log_every=1)
    result = train(_task(), retina_crops, tmp_path, config, progress=False, deadline=time.monotonic() - 1)
    assert result.step == 1
    assert [p.name for p in CheckpointManager(tmp_path / "checkpoints").list()] == ["step_000001"]
    assert "time is up: stopping at step 1 of 12" in capsys.readouterr().err


def test_a_far_deadline_changes_nothing(tmp_path, retina_crops):
    import time

    config = BASE.replace(max_steps=4, gradient_accumulation_steps=1)
    later = time.monotonic() + 3600
    timed = train(_task(), retina_crops, tmp_path / "a", config, progress=False, deadline=later)
    plain = train(_task(), retina_crops, tmp_path / "b", config, progress=False)
    assert timed.step == plain.step == 4
    _assert_same(_weights(timed), _weights(plain))
