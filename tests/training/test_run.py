"""The run skeleton shared by every kind of model: dry run, config.yaml, lock, resume refusal,
finish, step timing, on a toy kind of run."""

from __future__ import annotations

import time

import pytest
import torch
import yaml

from medfusion.autoencoders.losses import VAELoss, VAELossConfig
from medfusion.training.loop import TrainConfig
from medfusion.training.run import CONFIG_FILE, PreparedRun, execute, seeded, time_one_step
from medfusion.training.vae import VAERunConfig, VAETask
from tests.tiny import tiny_vae
from tests.training._training_helpers import RetinaCrops

TRAIN = TrainConfig(max_steps=3, batch_size=4, checkpoint_every=3, preview_every=0, num_workers=0, seed=5)


def _run(tmp_path, finished: list, **changes) -> PreparedRun:
    def make_task() -> VAETask:
        return VAETask(tiny_vae(), VAELoss(VAELossConfig(), spatial_dims=2, in_channels=1))

    def finish(result, config, log) -> None:
        finished.append((result.step, config.train.max_steps))
        log("finished")

    fields = dict(
        command="medfusion toy",
        config=VAERunConfig(train=TRAIN),
        run_dir=tmp_path / "run",
        make_task=seeded(TRAIN.seed, make_task),
        dataset=RetinaCrops(count=8),
        summary="# toy summary",
        finish=finish,
    )
    return PreparedRun(**(fields | changes))


def test_dry_run_logs_the_config_and_summary_and_writes_nothing(tmp_path):
    finished, logs = [], []
    assert execute(_run(tmp_path, finished), dry_run=True, progress=False, log=logs.append) is None
    assert logs[0].startswith("# medfusion toy: resolved config") and logs[1] == "# toy summary"
    assert not (tmp_path / "run").exists() and finished == []


def test_execute_writes_the_config_trains_and_finishes(tmp_path):
    finished, logs = [], []
    result = execute(_run(tmp_path, finished), progress=False, log=logs.append)
    assert result.step == 3 and finished == [(3, 3)] and logs[-1] == "finished"
    saved = yaml.safe_load((tmp_path / "run" / CONFIG_FILE).read_text())
    assert saved["train"]["max_steps"] == 3 and saved["train"]["seed"] == 5
    with pytest.raises(FileExistsError, match="pass --resume"):
        execute(_run(tmp_path, finished), progress=False, log=logs.append)
    assert yaml.safe_load((tmp_path / "run" / CONFIG_FILE).read_text()) == saved  # not replaced


def test_a_dataset_function_is_called_inside_the_run(tmp_path):
    calls = []

    def dataset():
        calls.append((tmp_path / "run" / CONFIG_FILE).is_file())
        return RetinaCrops(count=8)

    execute(_run(tmp_path, [], dataset=dataset), progress=False, log=lambda _: None)
    assert calls == [True]  # after config.yaml was written, once


def test_with_train_changes_the_training_settings_only(tmp_path):
    run = _run(tmp_path, []).with_train(max_steps=2)
    assert run.train_config.max_steps == 2 and run.train_config.seed == 5
    assert execute(run, progress=False, log=lambda _: None).step == 2


def test_seeded_tasks_start_alike_and_time_one_step_leaves_the_run_alone(tmp_path):
    run = _run(tmp_path, [])
    a, b = run.make_task(), run.make_task()
    assert all(torch.equal(x, y) for x, y in zip(a.vae.state_dict().values(), b.vae.state_dict().values()))
    seconds = time_one_step(run, repeats=1, warmup=0)
    assert 0 < seconds < 60
    assert not (tmp_path / "run").exists()


def test_a_deadline_reaches_the_loop(tmp_path):
    result = execute(_run(tmp_path, []), progress=False, log=lambda _: None, deadline=time.monotonic() - 1)
    assert result.step == 1
