"""The one training loop of the toolkit, on HuggingFace Accelerate.

A model is trained by handing :func:`train` a :class:`TrainingTask` (which modules are trained and
how a batch becomes losses) and a dataset. The loop owns everything else: devices and processes,
mixed precision, gradient accumulation and clipping, one AdamW optimizer and learning-rate
schedule per trained module, an EMA of the main module's weights, checkpoints, resume, logging,
and stopping on a non-finite loss.

Resume is exact: the data order is a permutation drawn from ``(seed, epoch)``, each micro-batch's
random numbers come from a generator seeded by ``(seed, process, micro-batch)``, and a checkpoint
holds the weights, EMA, optimizer, schedule, grad-scaler and RNG states, so a run stopped at step
30 and resumed to 60 ends with the same weights as a run straight to 60.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from tqdm.auto import tqdm

from medfusion.config import Config
from medfusion.nn.layers import to_channels_last
from medfusion.training.checkpoint import CheckpointManager, _step_of
from medfusion.training.state_io import CheckpointError, load_state, rng_state, save_state, set_rng_state
from medfusion.utils import (  # noqa: F401 (COMPILE_MODES, cpu_only, process_state: re-exported)
    COMPILE_MODES,
    MAX_SEED,
    atomic_path,
    atomic_write_text,
    cpu_only,
    process_state,
)

MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")
TRAINER_FILE = "trainer.json"
METRICS_FILE = "metrics.jsonl"
TASK_STATE = "task"  # the task's own state in a checkpoint: task.json + task.safetensors


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a dataset too small for one batch ...)."""


@dataclass(frozen=True)
class TrainConfig(Config):
    """How a model is trained (the same for every model of the toolkit).

    Attributes:
        max_steps: optimizer steps in all.
        batch_size: images per process and micro-batch; the global batch is
            ``batch_size * processes * gradient_accumulation_steps``.
        gradient_accumulation_steps: micro-batches per optimizer step.
        learning_rate: peak learning rate of AdamW.
        adam_betas, weight_decay: of AdamW.
        lr_schedule: ``constant``, ``constant_with_warmup``, ``linear`` or ``cosine`` (after warm-up).
        warmup_steps: linear warm-up from 0.
        max_grad_norm: clip the gradient norm to this; None: no clipping.
        mixed_precision: ``no``, ``fp16`` (with a grad scaler) or ``bf16``.
        ema_decay: decay of the EMA of the weights (the EMA weights are what is exported); None: off.
        ema_warmup: ramp the decay up as ``1 - (1 + step)^(-2/3)`` so early EMA follows the weights.
        compile: ``torch.compile`` the trained modules.
        compile_mode: ``default``, ``reduce-overhead`` (CUDA graphs: the fastest for small
            latents, where kernel launches dominate), ``max-autotune`` or
            ``max-autotune-no-cudagraphs``.
        channels_last: keep convolution weights (and so activations) channels-last, which the
            GPUs' tensor-core convolutions prefer (with bf16 especially).
        gradient_checkpointing: recompute activations in the backward pass (less memory, ~30% slower).
        checkpoint_every: steps between checkpoints (one is also written at the end).
        keep_checkpoints: how many recent checkpoints to keep.
        log_every: steps between logged scalars (progress bar, TensorBoard, ``metrics.jsonl``).
        preview_every: steps between preview image grids (e.g. reconstructions); 0: only at the end.
        num_workers: DataLoader worker processes.
        seed: seeds initialisation, data order, augmentation and per-step noise.
    """

    max_steps: int = 10_000
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    lr_schedule: str = "constant_with_warmup"
    warmup_steps: int = 100
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"
    ema_decay: float | None = 0.999
    ema_warmup: bool = True
    compile: bool = False
    compile_mode: str = "default"
    channels_last: bool = False
    gradient_checkpointing: bool = False
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 10
    preview_every: int = 500
    num_workers: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        positive = ("max_steps", "batch_size", "gradient_accumulation_steps", "checkpoint_every")
        positive += ("keep_checkpoints", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1; got {getattr(self, name)}")
        for name in ("warmup_steps", "preview_every", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0; got {getattr(self, name)}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"train.seed must be an integer in 0..{MAX_SEED}; got {self.seed}")
        if not self.learning_rate > 0:
            raise ValueError(f"train.learning_rate must be > 0; got {self.learning_rate}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"train.mixed_precision must be one of {MIXED_PRECISION}; got {self.mixed_precision!r}"
            )
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"train.compile_mode must be one of {COMPILE_MODES}; got {self.compile_mode!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"train.lr_schedule must be one of {LR_SCHEDULES}; got {self.lr_schedule!r}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be in (0, 1) or null; got {self.ema_decay}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"train.max_grad_norm must be > 0 or null; got {self.max_grad_norm}")


class TrainingTask:
    """What a model contributes to :func:`train`; subclass it for each kind of model.

    ``modules()`` returns the trained modules by name, the main one (EMA, export) first.
    ``training_step`` yields ``(module name, loss, terms)`` once per module to update, in order:
    the loop back-propagates each loss and steps that module's optimizer before asking for the
    next, so a later loss may reuse tensors of an earlier one (e.g. a discriminator on detached
    reconstructions).
    """

    name = "model"
    preview_nrow = 8  # images per row of the preview grid

    def modules(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def learning_rate(self, module: str, default: float) -> float:
        """Learning rate of ``module``'s optimizer; default: the training config's."""
        return default

    def setup(self, accelerator: Accelerator) -> None:
        """Move any frozen helper networks to ``accelerator.device`` (called once)."""

    def training_step(
        self, models: Mapping[str, nn.Module], batch: dict, step: int
    ) -> Iterator[tuple[str, torch.Tensor, dict[str, torch.Tensor]]]:
        """Losses of one micro-batch. ``models`` are the prepared (possibly DDP-wrapped) modules;
        ``step`` counts the optimizer steps done so far."""
        raise NotImplementedError

    @torch.no_grad()
    def preview(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """Images (N, C, *spatial) in [-1, 1] to show for the main ``model`` (EMA weights) on a
        fixed batch, and scalars to log with them."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """What the task itself must carry across a resume (e.g. a validation history), as nested
        dicts/lists of tensors and JSON values; saved in every checkpoint. Default: nothing."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (called when a run resumes)."""

    def stop_early(self, model: nn.Module, step: int) -> bool:
        """Whether the run ends after ``step`` optimizer steps (before ``max_steps``), e.g. because a
        validation criterion stopped improving; a checkpoint is written at that step. Called after
        every step, the last one included (where the answer changes nothing), on
        every process with the unwrapped main ``model`` (training weights), so the answer must be
        the same on all of them. Default: never."""
        return False


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` returns (on every process)."""

    step: int
    models: dict[str, nn.Module]  # unwrapped; the main one holds the EMA weights when EMA is on
    checkpoint: Path | None
    history: list[dict] = field(default_factory=list)  # logged scalars (main process)


class EpochSampler(Sampler[list[int]]):
    """Batches of one process: a permutation from ``(seed, epoch)`` cut into global batches.

    Every process sees the same permutation and takes its own slice of each global batch; the
    last incomplete global batch is dropped. ``set_epoch(epoch, start)`` skips ``start`` batches,
    which is how a resumed run continues mid-epoch without reading the skipped files.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.size // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
        global_batch = self.batch_size * self.world_size
        for b in range(self.start, len(self)):
            first = b * global_batch + self.rank * self.batch_size
            yield order[first : first + self.batch_size].tolist()


def _step_seed(seed: int, rank: int, micro_step: int) -> int:
    return int(np.random.SeedSequence([seed, rank, micro_step]).generate_state(1)[0])


def _tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX")


class _Logger:
    """Scalars to TensorBoard and ``metrics.jsonl``, images to PNG and TensorBoard (main process).

    ``resumed_from``: the step a resumed run continues from; the records of later steps (logged
    by the interrupted run after its last checkpoint) are dropped from ``metrics.jsonl`` and hidden
    in TensorBoard, so that each step is logged once. None: a new run, ``metrics.jsonl`` starts empty.
    """

    def __init__(self, accelerator: Accelerator, log_dir: Path, name: str, resumed_from: int | None = None):
        self.accelerator = accelerator
        self.log_dir = log_dir
        self.history: list[dict] = []
        self.tensorboard = False
        if accelerator.is_main_process:
            log_dir.mkdir(parents=True, exist_ok=True)
            _restart_metrics(log_dir / METRICS_FILE, resumed_from)
        if _tensorboard_available():
            purge = {"tensorboard": {"purge_step": resumed_from + 1}} if resumed_from is not None else {}
            accelerator.init_trackers(name, init_kwargs=purge)
            self.tensorboard = True
        elif accelerator.is_main_process:
            warnings.warn("tensorboard is not installed: scalars go to metrics.jsonl only", stacklevel=3)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        if self.tensorboard:
            self.accelerator.log(values, step=step)
        record = {"step": step, **values}
        self.history.append(record)
        with open(self.log_dir / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def images(self, tag: str, images: torch.Tensor, step: int, nrow: int = 8) -> Path:
        from medfusion.visualize import save_grid

        path = save_grid(images, self.log_dir / "images" / f"{tag}_step_{step:07d}.png", nrow=nrow)
        if self.tensorboard:
            from PIL import Image

            writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
            writer.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
        return path

    def close(self) -> None:
        # not accelerator.end_training(): that also ends the process group, which the caller may
        # still need (evaluation, saving, a barrier) after the loop.
        if self.tensorboard and self.accelerator.is_main_process:
            for tracker in self.accelerator.trackers:
                tracker.finish()


def _restart_metrics(path: Path, resumed_from: int | None) -> None:
    """Keep the records of ``path`` up to step ``resumed_from`` (a torn last line dropped too);
    None: remove it. Rewritten through a temporary file and a rename."""
    if resumed_from is None:
        path.unlink(missing_ok=True)
        return
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if (
            isinstance(record, dict)
            and isinstance(record.get("step"), int)
            and record["step"] <= resumed_from
        ):
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


def _describe_batch(dataset: Dataset, batch: dict) -> str:
    samples = getattr(dataset, "samples", None)
    indices = batch.get("index")
    if samples is None or indices is None:
        return ""
    paths = [str(samples[int(i)].path) for i in indices.tolist()]
    shown = ", ".join(paths[:8]) + (f" (+{len(paths) - 8} more)" if len(paths) > 8 else "")
    return f"\n  files in this batch: {shown}"


def _check_finite(loss: torch.Tensor, name: str, step: int, batch: dict, dataset: Dataset, last: str):
    if torch.isfinite(loss.detach()).all():
        return
    images = batch.get("image")
    bad_input = isinstance(images, torch.Tensor) and not torch.isfinite(images).all()
    cause = (
        "the batch itself holds NaN/Inf values"
        if bad_input
        else "the inputs are finite, so the model diverged: lower train.learning_rate, keep "
        "train.max_grad_norm on, or use bf16 instead of fp16"
    )
    raise TrainingError(
        f"the {name} loss is {loss.detach().float().item()} at step {step + 1}; stopping rather than "
        f"training a broken model ({cause}).{_describe_batch(dataset, batch)}\n  {last}"
    )


def _collate(items: list[dict]) -> dict:
    shapes = {tuple(item["image"].shape) for item in items if isinstance(item.get("image"), torch.Tensor)}
    if len(shapes) > 1:
        raise TrainingError(
            f"the images of one batch have different shapes {sorted(shapes)}: set data.crop (or "
            "data.resize / data.spacing) so that every item has the same size"
        )
    return default_collate(items)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


@contextlib.contextmanager
def _ema_weights(ema: EMAModel | None, model: nn.Module) -> Iterator[None]:
    if ema is None:
        yield
        return
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        yield
    finally:
        ema.restore(model.parameters())


def _save_checkpoint(
    manager: CheckpointManager,
    step: int,
    modules: dict[str, nn.Module],
    optimizers: dict,
    schedulers: dict,
    ema: EMAModel | None,
    accelerator: Accelerator,
    config: TrainConfig,
    task: TrainingTask,
) -> Path:
    def write(folder: Path) -> None:
        for name, module in modules.items():
            state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
            with atomic_path(folder / f"model_{name}.safetensors") as tmp:  # (it sets the file mode)
                save_file(state, tmp)
            save_state(optimizers[name].state_dict(), folder / f"optimizer_{name}")
            save_state(schedulers[name].state_dict(), folder / f"scheduler_{name}")
        if ema is not None:
            save_state(ema.state_dict(), folder / "ema")
        if accelerator.scaler is not None:
            save_state(accelerator.scaler.state_dict(), folder / "scaler")
        save_state(rng_state(), folder / "rng")
        task_state = task.state_dict()
        if task_state:
            save_state(task_state, folder / TASK_STATE)
        trainer = {
            "step": step,
            "processes": accelerator.num_processes,
            "train": config.to_dict(),
        }
        (folder / TRAINER_FILE).write_text(json.dumps(trainer, indent=2) + "\n", encoding="utf-8")

    return manager.save(step, write)


def _load_checkpoint(
    folder: Path,
    modules: dict[str, nn.Module],
    optimizers: dict,
    schedulers: dict,
    ema: EMAModel | None,
    accelerator: Accelerator,
    config: TrainConfig,
) -> int:
    trainer = _read_trainer(folder)
    for name, module in modules.items():
        path = folder / f"model_{name}.safetensors"
        if not path.is_file():
            raise CheckpointError(f"{folder}: it holds no weights for the module {name!r}")
        try:
            module.load_state_dict(load_file(path))
        except RuntimeError as e:
            raise CheckpointError(f"{path}: does not fit the model being trained: {e}") from e
        optimizers[name].load_state_dict(load_state(folder / f"optimizer_{name}"))
        schedulers[name].load_state_dict(load_state(folder / f"scheduler_{name}"))
    if ema is not None:
        if not (folder / "ema.json").is_file():
            raise CheckpointError(f"{folder}: no EMA state, but train.ema_decay is set")
        ema.load_state_dict(load_state(folder / "ema"))
    if accelerator.scaler is not None and (folder / "scaler.json").is_file():
        accelerator.scaler.load_state_dict(load_state(folder / "scaler"))
    set_rng_state(load_state(folder / "rng"))
    saved = trainer.get("train", {})
    for key in ("batch_size", "gradient_accumulation_steps", "seed"):
        if saved.get(key) != getattr(config, key):
            warnings.warn(
                f"{folder}: train.{key} was {saved.get(key)} and is now {getattr(config, key)}; "
                "the run continues, but not as it would have without the interruption",
                stacklevel=3,
            )
    if trainer.get("processes") != accelerator.num_processes:
        warnings.warn(
            f"{folder}: written by {trainer.get('processes')} process(es), resumed with "
            f"{accelerator.num_processes}: the data order differs from an uninterrupted run",
            stacklevel=3,
        )
    return int(trainer["step"])


def _load_task_state(task: TrainingTask, folder: Path) -> None:
    """Give ``task`` the state it saved in the checkpoint ``folder`` (its ``state_dict``)."""
    if not task.state_dict():
        return
    if not (folder / f"{TASK_STATE}.json").is_file():
        warnings.warn(
            f"{folder}: holds no state of the {task.name} task (a checkpoint of an earlier version); "
            "the run continues from the task's initial state",
            stacklevel=3,
        )
        return
    task.load_state_dict(load_state(folder / TASK_STATE))


def check_new_run(out_dir: str | Path, resume: bool) -> None:
    """Without ``resume``, refuse a run folder that already holds checkpoints (call it before
    writing anything into the folder, so that an earlier run's files stay as they are)."""
    checkpoints = Path(out_dir) / "checkpoints"
    if not resume and CheckpointManager(checkpoints).list():
        raise FileExistsError(
            f"{checkpoints} already holds checkpoints: pass --resume (resume=True) to continue that "
            "run, or choose another output folder"
        )


def _read_trainer(folder: Path) -> dict:
    """``trainer.json`` of a checkpoint, checked: the step, the process count, the settings."""
    path = folder / TRAINER_FILE
    try:
        trainer = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from e
    if not isinstance(trainer, dict) or set(trainer) != {"step", "processes", "train"}:
        keys = sorted(trainer) if isinstance(trainer, dict) else type(trainer).__name__
        raise CheckpointError(f"{path}: expected the keys step, processes and train; got {keys}")
    for key in ("step", "processes"):
        if type(trainer[key]) is not int or trainer[key] < (key == "processes"):
            raise CheckpointError(
                f"{path}: {key} must be an integer >= {int(key == 'processes')}; got {trainer[key]!r}"
            )
    if not isinstance(trainer["train"], dict):
        raise CheckpointError(f"{path}: train must be a mapping of the training settings")
    if _step_of(folder.name) not in (None, trainer["step"]):
        raise CheckpointError(f"{path}: says step {trainer['step']}, the folder {folder.name}")
    return trainer


def _optimizers(
    task: TrainingTask, modules: Mapping[str, nn.Module], config: TrainConfig, device: torch.device
) -> dict[str, torch.optim.Optimizer]:
    """One AdamW per module, as ``config`` and ``task`` set it (fused on CUDA): the same for
    training and for the step timer, so that the timer times what training runs."""
    return {
        name: torch.optim.AdamW(
            module.parameters(),
            lr=task.learning_rate(name, config.learning_rate),
            betas=config.adam_betas,
            weight_decay=config.weight_decay,
            fused=device.type == "cuda",
        )
        for name, module in modules.items()
    }


def measure_step_seconds(
    task: TrainingTask, batch: dict, config: TrainConfig, repeats: int = 3, warmup: int = 1
) -> float:
    """Seconds one optimizer step of ``task`` takes on ``batch`` here: forward, backward and AdamW
    step of every module it trains, under ``config.mixed_precision``, on this process's device,
    timed over ``repeats`` steps after ``warmup`` untimed ones.

    What a planner needs to fit a run into a time budget (``medfusion demo``). The task's modules
    are trained in place by the probe: pass a throwaway task, not the one to train.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0; got {repeats} and {warmup}")
    accelerator = Accelerator(cpu=cpu_only(), mixed_precision=config.mixed_precision)
    modules = task.modules()
    task.setup(accelerator)
    for module in modules.values():
        module.to(accelerator.device).train()
    optimizers = _optimizers(task, modules, config, accelerator.device)
    batch = _to_device(batch, accelerator.device)

    def step() -> None:
        with accelerator.autocast():
            for name, loss, _ in task.training_step(modules, batch, 0):
                loss.backward()
                optimizers[name].step()
                optimizers[name].zero_grad(set_to_none=True)

    def synchronize() -> None:
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize(accelerator.device)

    for _ in range(warmup):
        step()
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    synchronize()
    return (time.perf_counter() - start) / repeats


def train(
    task: TrainingTask,
    dataset: Dataset,
    out_dir: str | Path,
    config: TrainConfig,
    resume: bool = False,
    preview_batch: dict | None = None,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
    deadline: float | None = None,
) -> TrainResult:
    """Train ``task``'s modules on ``dataset`` for ``config.max_steps`` optimizer steps, until
    ``task.stop_early`` ends the run, or until ``deadline``.

    Writes ``out_dir/checkpoints/step_*/`` (every ``checkpoint_every`` steps and at the end) and
    ``out_dir/logs/`` (TensorBoard events, ``metrics.jsonl``, ``images/*.png``).

    Args:
        task: the modules and their losses.
        dataset: items are dicts holding at least ``image`` (C, *spatial).
        out_dir: the run folder.
        config: the training settings.
        resume: continue from the latest valid checkpoint in ``out_dir/checkpoints`` (a corrupt one
            is reported and the one before it used); ``metrics.jsonl`` keeps the records up to its
            step. Without it, existing checkpoints are an error and ``metrics.jsonl`` starts empty.
        preview_batch: a fixed batch for the preview grids (default: the first training items).
        callback: called on every process after each optimizer step with ``(step, scalars)``
            (scalars only on logging steps); it may raise to stop the run.
        progress: show a progress bar (main process).
        deadline: a ``time.monotonic()`` instant: the run ends after the first optimizer step that
            finishes later (a checkpoint and a preview are written at that step, as at the end).
            None: no time limit.
    Returns:
        the step reached, the unwrapped modules (EMA weights copied into the main one) and the
        last checkpoint.
    """
    trainer = _Trainer(task, dataset, Path(out_dir), config, progress, deadline)
    trainer.prepare(resume, preview_batch)
    try:
        while not trainer.finished:
            for batch in trainer.epoch():
                if not trainer.micro_step(batch):
                    continue  # gradients accumulate over more micro-batches
                scalars = trainer.log_step()
                trainer.checkpoint_if_due()
                if callback is not None:
                    callback(trainer.step, scalars)
                if trainer.finished:
                    break
    finally:
        trainer.close()
    return trainer.result()


class _Trainer:
    """The state of one :func:`train` call and its named steps: prepare (devices, optimizers,
    EMA, resume, data), a micro-step, the logging of an optimizer step, checkpoints, the result."""

    def __init__(
        self,
        task: TrainingTask,
        dataset: Dataset,
        out_dir: Path,
        config: TrainConfig,
        progress: bool,
        deadline: float | None,
    ):
        self.task, self.dataset, self.out_dir, self.config = task, dataset, out_dir, config
        self.progress, self.deadline = progress, deadline
        self.accelerator = Accelerator(
            cpu=cpu_only(),
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            log_with="tensorboard" if _tensorboard_available() else None,
            project_dir=str(out_dir / "logs"),
        )
        self.manager = CheckpointManager(out_dir / "checkpoints", keep_last=config.keep_checkpoints)
        self.world = self.accelerator.num_processes
        self.per_epoch = len(dataset) // (config.batch_size * self.world)
        if self.per_epoch < 1:
            raise TrainingError(
                f"the dataset has {len(dataset)} item(s), fewer than one global batch of "
                f"{config.batch_size * self.world} (train.batch_size x {self.world} process(es)); "
                "lower train.batch_size"
            )
        self.step = 0
        self.micro = 0
        self.checkpoint: Path | None = None
        self.stopping = False
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.window_start, self.window_steps = time.perf_counter(), 0

    # prepare ------------------------------------------------------------------------------------
    def prepare(self, resume: bool, preview_batch: dict | None) -> None:
        """Modules, optimizers, schedules and EMA on the device; the checkpoint state when
        resuming; the data loader, the preview batch, the logger and the progress bar."""
        task, config, accelerator = self.task, self.config, self.accelerator
        check_new_run(self.out_dir, resume)
        modules = task.modules()
        self.main_name = next(iter(modules))
        for module in modules.values():
            if config.gradient_checkpointing and hasattr(module, "enable_gradient_checkpointing"):
                module.enable_gradient_checkpointing()
        task.setup(accelerator)
        optimizers = _optimizers(task, modules, config, accelerator.device)
        self.schedulers = {
            name: get_scheduler(
                config.lr_schedule,
                opt,
                num_warmup_steps=config.warmup_steps,
                num_training_steps=config.max_steps,
            )
            for name, opt in optimizers.items()
        }
        self.ema = None
        if config.ema_decay is not None:
            self.ema = EMAModel(
                modules[self.main_name].parameters(),
                decay=config.ema_decay,
                use_ema_warmup=config.ema_warmup,
                power=2 / 3,
                foreach=True,  # one fused update for all parameters, not a Python loop over them
            )
        if resume:
            self._resume(modules, optimizers)
        if self.ema is not None:
            self.ema.to(accelerator.device)
        for module in modules.values():
            if config.channels_last:
                to_channels_last(module)
            if config.compile:
                module.compile(mode=config.compile_mode)
        names = list(modules)
        prepared = accelerator.prepare(*modules.values(), *optimizers.values())
        self.models = dict(zip(names, prepared[: len(names)]))
        self.optimizers = dict(zip(names, prepared[len(names) :]))
        self._prepare_data(preview_batch)
        self.logger = _Logger(
            accelerator, self.out_dir / "logs", task.name, resumed_from=self.step if resume else None
        )
        self.bar = tqdm(
            total=config.max_steps,
            initial=self.step,
            desc=f"training {task.name}",
            unit="step",
            disable=not (self.progress and accelerator.is_main_process),
            dynamic_ncols=True,
        )
        self.micro = self.step * config.gradient_accumulation_steps
        self.last_checkpoint = (
            f"last checkpoint: {self.checkpoint}" if self.checkpoint else "no checkpoint written yet"
        )

    def _resume(self, modules: dict[str, nn.Module], optimizers: dict) -> None:
        found = self.manager.latest_valid(log=self.log)
        if found is None:
            self.log(f"resume: no checkpoint in {self.manager.root}; starting from step 0")
            return
        self.checkpoint, _ = found
        self.step = _load_checkpoint(
            self.checkpoint, modules, optimizers, self.schedulers, self.ema, self.accelerator, self.config
        )
        _load_task_state(self.task, self.checkpoint)
        self.log(f"resumed from {self.checkpoint} (step {self.step})")

    def _prepare_data(self, preview_batch: dict | None) -> None:
        accelerator, config, dataset = self.accelerator, self.config, self.dataset
        self.sampler = EpochSampler(
            len(dataset), config.batch_size, config.seed, accelerator.process_index, self.world
        )
        self.loader = DataLoader(
            dataset,
            batch_sampler=self.sampler,
            num_workers=config.num_workers,
            collate_fn=_collate,
            pin_memory=accelerator.device.type == "cuda",
        )
        if preview_batch is None:
            first = DataLoader(dataset, batch_size=min(8, len(dataset)), collate_fn=_collate)
            preview_batch = next(iter(first))
        self.preview_batch = _to_device(preview_batch, accelerator.device)

    def log(self, message: str) -> None:
        if self.accelerator.is_main_process:
            print(message, file=sys.stderr)

    @property
    def finished(self) -> bool:
        return self.step >= self.config.max_steps or self.stopping

    # step ---------------------------------------------------------------------------------------
    def epoch(self) -> Iterator[dict]:
        """The batches from the current position (mid-epoch after a resume) to the epoch's end."""
        epoch, start = divmod(self.micro, self.per_epoch)
        self.sampler.set_epoch(epoch, start)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return iter(self.loader)

    def micro_step(self, batch: dict) -> bool:
        """Forward and backward passes of one micro-batch, and the optimizer steps when gradients
        are synchronised; True when an optimizer step is complete."""
        accelerator, config = self.accelerator, self.config
        batch = _to_device(batch, accelerator.device)
        torch.manual_seed(_step_seed(config.seed, accelerator.process_index, self.micro))
        with accelerator.accumulate(*self.models.values()):
            for name, loss, terms in self.task.training_step(self.models, batch, self.step):
                _check_finite(loss, name, self.step, batch, self.dataset, self.last_checkpoint)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(self.models[name].parameters(), config.max_grad_norm)
                self.optimizers[name].step()
                self.optimizers[name].zero_grad(set_to_none=True)
                if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                    self.schedulers[name].step()
                for key, value in {"loss": loss.detach(), **terms}.items():
                    tag = f"{name}/{key}"
                    self.sums[tag] = self.sums.get(tag, 0.0) + value.detach().float()
                    self.counts[tag] = self.counts.get(tag, 0) + 1
        self.micro += 1
        if not accelerator.sync_gradients:
            return False
        self.step += 1
        self.window_steps += 1
        if self.ema is not None:
            self.ema.step(accelerator.unwrap_model(self.models[self.main_name]).parameters())
        self.bar.update(1)
        return True

    # log ----------------------------------------------------------------------------------------
    def log_step(self) -> dict[str, float]:
        """The scalars of a logging step (loss means over the window, images/s, learning rates),
        the preview when due, and whether the run stops here (``task.stop_early``, the deadline)."""
        config, step = self.config, self.step
        scalars: dict[str, float] = {}
        if step % config.log_every == 0 or step == config.max_steps:
            scalars = self._window_scalars()
        paused = time.perf_counter()  # previews and checkpoints do not count towards images/s
        self.stopping = self.task.stop_early(self._unwrapped_main(), step) or self._past_deadline()
        if (config.preview_every and step % config.preview_every == 0) or self.finished:
            if self.accelerator.is_main_process:
                scalars |= self._preview()
            self.accelerator.wait_for_everyone()
        if scalars:
            self.logger.scalars(scalars, step)
        self.window_start += time.perf_counter() - paused
        return scalars

    def _window_scalars(self) -> dict[str, float]:
        tags = sorted(self.sums)
        means = self.accelerator.reduce(torch.stack([self.sums[t] / self.counts[t] for t in tags]), "mean")
        elapsed = time.perf_counter() - self.window_start
        images = self.config.batch_size * self.world * self.config.gradient_accumulation_steps
        scalars = {t: float(v) for t, v in zip(tags, means.tolist())}
        scalars["images_per_second"] = self.window_steps * images / max(elapsed, 1e-9)
        scalars |= {f"lr/{n}": s.get_last_lr()[0] for n, s in self.schedulers.items()}
        self.sums, self.counts = {}, {}
        self.window_start, self.window_steps = time.perf_counter(), 0
        main_loss = scalars.get(f"{self.main_name}/loss", math.nan)
        self.bar.set_postfix(loss=f"{main_loss:.4g}", img_s=f"{scalars['images_per_second']:.1f}")
        return scalars

    def _past_deadline(self) -> bool:
        """Whether the deadline has passed (the main process decides for all)."""
        if self.deadline is None:
            return False
        late = torch.tensor(float(time.monotonic() > self.deadline), device=self.accelerator.device)
        if self.world > 1:
            late = broadcast(late, from_process=0)
        if bool(late) and self.step < self.config.max_steps:
            self.log(f"time is up: stopping at step {self.step} of {self.config.max_steps}")
        return bool(late)

    def _unwrapped_main(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.models[self.main_name])

    def _preview(self) -> dict[str, float]:
        main = self._unwrapped_main()
        with _ema_weights(self.ema, main):
            main.eval()
            images, scalars = self.task.preview(main, self.preview_batch)
            main.train()
        self.logger.images(self.task.name, images, self.step, nrow=self.task.preview_nrow)
        return {f"preview/{k}": float(v) for k, v in scalars.items()}

    # checkpoint ---------------------------------------------------------------------------------
    def checkpoint_if_due(self) -> None:
        """A checkpoint every ``checkpoint_every`` steps and at the last step (main process)."""
        if self.step % self.config.checkpoint_every and not self.finished:
            return
        if self.accelerator.is_main_process:
            unwrapped = {n: self.accelerator.unwrap_model(m) for n, m in self.models.items()}
            self.checkpoint = _save_checkpoint(
                self.manager,
                self.step,
                unwrapped,
                self.optimizers,
                self.schedulers,
                self.ema,
                self.accelerator,
                self.config,
                self.task,
            )
            self.last_checkpoint = f"last checkpoint: {self.checkpoint}"
        self.accelerator.wait_for_everyone()

    def close(self) -> None:
        for opened in ("bar", "logger"):
            if hasattr(self, opened):
                getattr(self, opened).close()

    def result(self) -> TrainResult:
        """The step reached, the unwrapped modules (the EMA weights in the main one)."""
        unwrapped = {n: self.accelerator.unwrap_model(m) for n, m in self.models.items()}
        if self.ema is not None:
            self.ema.copy_to(unwrapped[self.main_name].parameters())
        latest = self.manager.list()
        return TrainResult(
            self.step, unwrapped, latest[-1] if latest else self.checkpoint, self.logger.history
        )
