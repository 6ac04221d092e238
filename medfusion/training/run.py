"""The run skeleton every kind of model shares: ``medfusion train-vae``, ``train``, ``features train``.

A kind of run reads its data and builds its model in a ``prepare_*`` function that returns a
:class:`PreparedRun` (nothing is written yet); :func:`execute` then does the rest the same way for
every kind: print the resolved config and the summary, stop there for a dry run, take the run
folder's lock, refuse to overwrite an earlier run without ``resume``, write ``config.yaml``, build
the training set, train through :func:`medfusion.training.loop.train` and save the result.
:func:`time_one_step` times one optimizer step of a prepared run, so that a planner (``medfusion
demo``, a benchmark) sizes a run with the very task it will train.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from medfusion.config import Config
from medfusion.runlock import run_lock
from medfusion.training.loop import (
    TrainConfig,
    TrainingTask,
    TrainResult,
    _collate,
    check_new_run,
    measure_step_seconds,
    train,
)
from medfusion.utils import atomic_write_text, process_state

CONFIG_FILE = "config.yaml"


@dataclass(frozen=True)
class PreparedRun:
    """A run of one kind of model, ready to train: what :func:`execute` needs.

    Attributes:
        command: the command's name for logs and the lock (``medfusion train-vae``).
        config: the resolved run config (written as ``config.yaml``); its ``train`` field is the
            :class:`TrainConfig` of the loop.
        run_dir: where ``config.yaml``, ``checkpoints/`` and ``logs/`` go.
        make_task: builds the task with freshly initialised modules (seeded by ``train.seed``);
            called once per training and once per step timing.
        dataset: the training items, or a function that builds them inside the run lock (e.g. a
            latent cache), called on every process.
        summary: lines printed after the resolved config (data, model size).
        finish: ``finish(result, config, log)`` saves what the run produces, called on every
            process after training, inside the lock (write only on the main process).
        preview_batch: a fixed batch for the preview grids; None: the first training items.
        probe_batch: ``probe_batch(batch_size)`` a batch like the training ones for
            :func:`time_one_step`; None: the first items of ``dataset``.
        lock_dir: the folder whose lock the run holds; None: ``run_dir``.
    """

    command: str
    config: Config
    run_dir: Path
    make_task: Callable[[], TrainingTask]
    dataset: Dataset | Callable[[], Dataset]
    summary: str = ""
    finish: Callable[[TrainResult, Any, Callable[[str], None]], None] | None = None
    preview_batch: dict | None = None
    probe_batch: Callable[[int], dict] | None = None
    lock_dir: Path | None = None

    @property
    def train_config(self) -> TrainConfig:
        return self.config.train

    def with_train(self, **changes: Any) -> PreparedRun:
        """The same run with some training settings changed (e.g. ``max_steps`` from a plan)."""
        config = dataclasses.replace(self.config, train=self.train_config.replace(**changes))
        return dataclasses.replace(self, config=config)


def seeded(seed: int, build: Callable[[], TrainingTask]) -> Callable[[], TrainingTask]:
    """``build`` with the global torch generator seeded first, so each call initialises alike."""

    def make() -> TrainingTask:
        torch.manual_seed(seed)
        return build()

    return make


def execute(
    run: PreparedRun,
    resume: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    deadline: float | None = None,
) -> TrainResult | None:
    """Train a prepared run and save its result.

    Args:
        run: what to train (see :class:`PreparedRun`).
        resume: continue from the latest checkpoint in ``run.run_dir``.
        dry_run: only print the resolved config and the summary; write nothing.
        progress: progress bars (main process).
        log: where the config and summaries go (main process).
        callback: passed to the loop (called after each optimizer step).
        deadline: a ``time.monotonic()`` instant at which training stops (with a checkpoint) and
            the run saves what it has; None: ``train.max_steps`` decides.
    Returns:
        the training result, or None for a dry run.
    """
    state = process_state()
    if state.is_main_process:
        log(f"# {run.command}: resolved config\n{run.config.to_yaml()}")
        if run.summary:
            log(run.summary)
    if dry_run:
        return None
    with run_lock(run.lock_dir or run.run_dir, run.command):
        check_new_run(run.run_dir, resume)  # before config.yaml replaces an earlier run's
        if state.is_main_process:
            run.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run.run_dir / CONFIG_FILE, run.config.to_yaml())
        dataset = run.dataset() if callable(run.dataset) else run.dataset
        result = train(
            run.make_task(),
            dataset,
            run.run_dir,
            run.train_config,
            resume=resume,
            preview_batch=run.preview_batch,
            callback=callback,
            progress=progress,
            deadline=deadline,
        )
        if run.finish is not None:
            run.finish(result, run.config, log)
        state.wait_for_everyone()
    return result


def time_one_step(run: PreparedRun, repeats: int = 3, warmup: int = 1) -> float:
    """Seconds one optimizer step of ``run`` takes here (forward, backward, AdamW of every module,
    under its mixed precision), on a fresh task and a batch like the training ones; the run
    itself is not touched."""
    batch_size = run.train_config.batch_size
    if run.probe_batch is not None:
        batch = run.probe_batch(batch_size)
    else:
        dataset = run.dataset() if callable(run.dataset) else run.dataset
        batch = next(iter(DataLoader(dataset, batch_size=min(batch_size, len(dataset)), collate_fn=_collate)))
    return measure_step_seconds(run.make_task(), batch, run.train_config, repeats=repeats, warmup=warmup)
