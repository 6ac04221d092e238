"""``medfusion demo``: the whole pipeline on the bundled real data, within a time budget.

One call runs what a user runs on their own data, in order, with the same functions as the
commands: build the demo data (:mod:`medfusion.data.demo`, once, into a cache), inspect it, train
the VAE, train the class-conditional latent diffusion U-Net, sample a synthetic dataset, train the
domain feature extractor on the real training images, train a classifier on the synthetic and on
the real training images (TSTR beside TRTR), and evaluate the synthetic images against the
held-out real ones, with the calibration of the yardstick. Everything lands in one folder::

    OUT/autoencoder/      the VAE run (OUT/autoencoder/vae is the model)
    OUT/diffusion/        the U-Net run (checkpoints, logs, sample grids)
    OUT/model/            the model folder that ``medfusion sample`` takes
    OUT/synthetic/        the synthetic dataset (files, manifest.csv, dataset_card.json)
    OUT/features/         the domain feature extractor
    OUT/metrics.json      the evaluation; OUT/report.html shows it with the pipeline's timings
    OUT/demo.json         per stage: its planned and spent seconds, planned and run steps

The time budget (``minutes``) is kept, on any machine. After the data and its inspection, every
stage gets a share of the time left by :data:`WEIGHTS` (:class:`~medfusion.workflows.budget.
TimeBudget`), which makes its deadline, and plans its work to fit on this machine:

- a training stage times one optimizer step of the very run it trains
  (:func:`~medfusion.training.run.time_one_step`) and plans the steps its time buys (within
  :data:`STEP_BOUNDS`); the training loop also stops at the deadline, whatever the plan, and the
  stage saves what it has (the demo says so);
- sampling times a first batch, then makes as many samples per class as the rest of its time
  buys (at least :data:`MIN_PER_CLASS`, at most the held-out images of a class);
- the classifiers of TSTR take the steps their time buys (up to :data:`TSTR_STEPS`), and the
  evaluation drops the calibration when the extractor's measured speed says it would not fit.

So a CPU trains small models briefly and a GPU trains larger ones for longer, from the same
command, and a slow machine ends on time with less trained models.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from medfusion import __version__
from medfusion.runlock import LOCK_NAME, run_lock
from medfusion.utils import atomic_write_text, process_state
from medfusion.workflows.budget import TimeBudget, affordable, samples_per_class, within

if TYPE_CHECKING:
    from medfusion.training.run import PreparedRun

DATASETS_2D = ("xray", "color")
DATASET_3D = "volumes"
DEFAULT_MINUTES = 10.0
DEMO_FILE = "demo.json"
OUTPUTS = (
    "autoencoder",
    "diffusion",
    "model",
    "synthetic",
    "features",
    "metrics.json",
    "report.html",
    DEMO_FILE,
)
# each stage's weight of the time left after the data and its inspection, in the order they run;
# MARGIN is the weight of the time kept free at the end
WEIGHTS = {
    "autoencoder": 0.18,
    "diffusion": 0.34,
    "sample": 0.1,
    "features": 0.1,
    "tstr": 0.08,
    "evaluate": 0.12,
}
MARGIN = 0.08
# the planned steps of each training stage lie within these bounds; the deadline wins over the floor
STEP_BOUNDS = {
    "autoencoder": (100, 5000),
    "diffusion": (300, 20000),
    "features": (100, 2000),
    "gan": (100, 100000),
}
OVERHEAD = 1.25  # a training step in the loop (data, EMA, logging, validation) over the timed bare step
# the work of a training stage around its loop (loading, the latent cache, the last preview, the
# scaling factor and the evaluation of the VAE, the feature scaling, saving), in timed steps
AROUND_STEPS = {"autoencoder": 20, "diffusion": 30, "features": 15, "gan": 10}
PROBE = {"warmup": 1, "repeats": 2}  # steps of the step timing: untimed, then timed
VAE_EVAL_IMAGES = 256  # images of the VAE's scaling factor and of its held-out evaluation
MIN_PER_CLASS = 16  # samples per class at least: fewer make the evaluation meaningless
SAMPLE_BATCH = 16  # samples per batch of the sampler (the first one is timed)
TSTR_STEPS = {2: 200, 3: 60}  # classifier steps of each TSTR/TRTR fit at most, by spatial dims
TSTR_SEEDS = 3  # fits a side
TSTR_PROBE_STEPS = 5  # classifier steps timed (the difference of a fit of 1 + them and one of 1)
TSTR_AROUND_STEPS = 5  # per fit: building the classifier and predicting the held-out images, in steps
# the evaluation, in passes of every image through the extractor: the real, synthetic and
# training images once; the calibration adds its degradations of the reference's images
EVALUATE_PASSES = 4.5  # per image read (reading, the bootstrap and the report included)
CALIBRATION_PASSES = 8.0  # per image of the reference (six degradations and their scores)


@dataclass(frozen=True)
class DemoModels:
    """Model sizes and batch sizes of one demo profile (the rest are the library defaults)."""

    vae_channels: tuple[int, ...]
    vae_batch: int
    unet_channels: tuple[int, ...]
    unet_layers: int
    unet_batch: int
    encoder_channels: tuple[int, ...]
    encoder_batch: int
    mixed_precision: str = "no"
    num_workers: int = 0


PROFILES = {
    # (spatial dims, accelerator): small enough for two CPU cores, larger where a GPU gives the time
    # (on a CPU, minutes buy more from small models trained for more steps than from larger ones)
    (2, "cpu"): DemoModels((16, 32, 64), 8, (32, 64, 64), 1, 16, (16, 32, 64, 128), 32),
    (2, "cuda"): DemoModels((64, 128, 256), 32, (128, 256, 256), 2, 128, (32, 64, 128, 256), 128, "bf16", 4),
    (3, "cpu"): DemoModels((16, 32, 64), 4, (32, 64, 64), 1, 16, (16, 32, 64), 16),
    (3, "cuda"): DemoModels((32, 64, 128), 8, (64, 128, 128), 2, 64, (32, 64, 128), 64, "bf16", 4),
}  # fmt: skip


@dataclass
class DemoResult:
    """What :func:`run_demo` did: the run folder, the report, the metrics and per-stage timings."""

    out: Path
    report: Path
    metrics: dict
    stages: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0


def plan_steps(stage: str, seconds_per_step: float, seconds: float) -> int:
    """Optimizer steps of the training ``stage`` that ``seconds`` buy at ``seconds_per_step`` (times
    :data:`OVERHEAD`), after the work around its loop (:data:`AROUND_STEPS`), within its
    :data:`STEP_BOUNDS`."""
    low, high = STEP_BOUNDS[stage]
    left = seconds - AROUND_STEPS[stage] * seconds_per_step
    return within(affordable(left, seconds_per_step * OVERHEAD), low, high)


def training_deadline(stage: str, deadline: float, seconds_per_step: float) -> float:
    """When the training loop of ``stage`` must stop for the stage to end by ``deadline``: the work
    after the loop (at most :data:`AROUND_STEPS` steps' worth) still fits."""
    return deadline - AROUND_STEPS[stage] * seconds_per_step


def plan_classifier_steps(seconds: float, seconds_per_step: float, max_steps: int, fits: int) -> int:
    """Steps of each of ``fits`` classifier fits that ``seconds`` buy at ``seconds_per_step`` (times
    :data:`OVERHEAD`, plus :data:`TSTR_AROUND_STEPS` a fit): at most ``max_steps``, at least a
    quarter of it (fewer teach the classifier too little to compare anything)."""
    steps = affordable(seconds / fits, seconds_per_step * OVERHEAD) - TSTR_AROUND_STEPS
    return within(steps, max(1, max_steps // 4), max_steps)


def evaluation_seconds(seconds_per_image: float, images: int, reference: int, calibrate: bool) -> float:
    """Seconds the evaluation of ``images`` (real, synthetic and training) is expected to take at
    ``seconds_per_image`` through the extractor, with the calibration on the ``reference``'s images."""
    passes = EVALUATE_PASSES * images + (CALIBRATION_PASSES * reference if calibrate else 0.0)
    return passes * seconds_per_image


def time_table(stages: dict[str, dict], budget_seconds: float, seconds: float) -> list[str]:
    """Lines that say how the time went: each stage's planned and spent seconds and steps."""
    lines = [
        f"time: {seconds:.0f} s of the {budget_seconds:.0f} s budget",
        f"  {'stage':<12} {'planned s':>9} {'spent s':>8}  work",
    ]
    for name, info in stages.items():
        planned = info.get("planned_seconds")
        work = ""
        if "steps_run" in info:
            work = f"{info['steps_run']} of {info['steps']} planned steps"
            if info.get("stopped_at_deadline"):
                work += ", stopped at its deadline"
        elif "per_class" in info:
            work = f"{info['per_class']} samples per class"
        elif name == "tstr":
            work = f"{info['steps']} steps x {2 * info['seeds']} fits"
        elif "calibrate" in info:
            work = "with the calibration" if info["calibrate"] else "without the calibration"
        planned_text = "-" if planned is None else f"{planned:.0f}"
        lines.append(f"  {name:<12} {planned_text:>9} {info['seconds']:>8.1f}  {work}".rstrip())
    return lines


def check_out(out: Path, force: bool, outputs: tuple[str, ...] = OUTPUTS) -> None:
    """``out`` must be new, empty (but for a lock file), or (with ``force``) an earlier demo run,
    whose ``outputs`` are removed."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out {out} is a file; give a folder for the demo run")
    if not out.is_dir() or not any(p.name != LOCK_NAME for p in out.iterdir()):
        return
    if not (out / DEMO_FILE).is_file() and not (out / "autoencoder").is_dir():
        raise FileExistsError(f"out {out} is not empty and not a medfusion demo run; choose another folder")
    if not force:
        raise FileExistsError(f"out {out} holds an earlier demo run; pass force=True to replace it")
    for name in outputs:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def pick_device(device: str | None) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() and not os.environ.get("ACCELERATE_USE_CPU") else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA device is available here")
    return device


def run_demo(
    out: str | os.PathLike = "medfusion-demo",
    three_d: bool = False,
    dataset: str | None = None,
    minutes: float = DEFAULT_MINUTES,
    data_dir: str | os.PathLike | None = None,
    device: str | None = None,
    force: bool = False,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Run the whole pipeline on a bundled dataset into ``out`` within ``minutes``.

    Args:
        out: the run folder (new, empty, or an earlier demo run with ``force``).
        three_d: the 3D demo (MRI volumes) instead of 2D.
        dataset: which bundled dataset: ``xray`` (default 2D: chest, limb, CT, MR), ``color``
            (fundus, histology) or ``volumes`` (3D).
        minutes: the time budget of the whole run (see the module docstring).
        data_dir: where the demo data is built once and reused (default: the user cache).
        device: ``cpu``, ``cuda``, ``cuda:1``...; default: CUDA when available.
        force: replace an earlier demo run in ``out``.
        seed: seeds the data crops, training and sampling.
        progress: progress bars.
        log: where stage headers and summaries go.
    """
    dataset = dataset or (DATASET_3D if three_d else DATASETS_2D[0])
    if dataset not in (*DATASETS_2D, DATASET_3D):
        raise ValueError(f"dataset must be one of {(*DATASETS_2D, DATASET_3D)}; got {dataset!r}")
    if three_d and dataset != DATASET_3D:
        raise ValueError(f"three_d=True runs the {DATASET_3D!r} dataset; got dataset {dataset!r}")
    budget = demo_budget(minutes, WEIGHTS, MARGIN)
    out = Path(out)
    device = pick_device(device)
    with run_lock(out, "medfusion demo"):  # the stages lock their own folders (or this one again)
        check_out(out, force)
        return _run_stages(out, dataset, budget, data_dir, device, seed, progress, log)


def demo_budget(minutes: float, weights: dict[str, float], margin: float) -> TimeBudget:
    """The time budget of a demo run, starting now; a demo runs in one process."""
    if not minutes > 0:
        raise ValueError(f"minutes must be > 0; got {minutes}")
    if process_state().num_processes > 1:
        raise RuntimeError("medfusion demo runs in one process; use the single commands under a launcher")
    return TimeBudget(60.0 * minutes, weights, margin)


class Stages:
    """The stage headers and the record of every stage (``demo.json``'s ``stages``)."""

    def __init__(self, budget: TimeBudget, log: Callable[[str], None], total: int = 8):
        self.budget, self.log, self.total = budget, log, total
        self.records: dict[str, dict] = {}
        self.number = 0

    def start(self, name: str, text: str) -> tuple[float, float | None]:
        """Log the header of stage ``name``; returns its start and deadline (None: not budgeted)."""
        self.number += 1
        start = self.budget.now()
        deadline = self.budget.deadline(name) if name in self.budget.weights else None
        until = ""
        if deadline is not None:
            until = f" ({deadline - start:.0f} s of the {self.budget.left():.0f} s left)"
        self.log(f"\n[{self.number}/{self.total}] {text}{until}")
        return start, deadline

    def done(self, name: str, start: float, deadline: float | None, **details) -> None:
        planned = {} if deadline is None else {"planned_seconds": round(deadline - start, 1)}
        self.records[name] = {"seconds": round(self.budget.now() - start, 1), **planned, **details}


def _run_stages(out: Path, dataset: str, budget: TimeBudget, data_dir, device: str, seed: int, progress, log):
    from medfusion.data.demo import build_demo_data
    from medfusion.data.inspect import inspect_dataset

    spatial_dims = 3 if dataset == DATASET_3D else 2
    profile = PROFILES[(spatial_dims, "cuda" if device.startswith("cuda") else "cpu")]
    stages = Stages(budget, log)

    t, _ = stages.start("data", "demo data (built once from files inside installed packages, then reused)")
    root = build_demo_data(data_dir, datasets=(dataset,), seed=seed, progress=progress) / dataset
    train_dir, heldout_dir = root / "train", root / "heldout"
    sources = root.parent / "DATA_SOURCES.md"
    log(f"data: {train_dir} (training) and {heldout_dir} (held out); sources in {sources}")
    stages.done("data", t, None, path=str(root))

    t, _ = stages.start("inspect", f"medfusion data inspect {train_dir}")
    report = inspect_dataset(train_dir, progress=progress)
    log(report.format())
    if not report.usable:
        raise RuntimeError(
            f"the demo data in {train_dir} is not usable (see above); rebuild it with "
            "build_demo_data(force=True) (medfusion data demo --force)"
        )
    stages.done("inspect", t, None, files=report.summary().get("files"))
    demo_data = StageData.open(root)

    out.mkdir(parents=True, exist_ok=True)
    t, deadline = stages.start("autoencoder", "training the autoencoder")
    run = autoencoder_run(demo_data, out, profile, seed, progress)
    vae_path, info = train_autoencoder_stage(run, deadline, progress, log)
    stages.done("autoencoder", t, deadline, **info)

    t, deadline = stages.start("diffusion", "training the class-conditional latent diffusion U-Net")
    model_path, info = train_unet_stage(demo_data, vae_path, out, profile, deadline, seed, progress, log)
    stages.done("diffusion", t, deadline, **info)

    t, deadline = stages.start("sample", "sampling a synthetic dataset")
    info = sample_stage(model_path, demo_data, out / "synthetic", deadline, device, seed, progress, log)
    stages.done("sample", t, deadline, **info)

    t, deadline = stages.start(
        "features", "training the domain feature extractor on the real training images"
    )
    info = train_features_stage(demo_data, out / "features", profile, deadline, seed, progress, log)
    stages.done("features", t, deadline, **info)

    t, deadline = stages.start(
        "tstr", "train on synthetic, test on real: a classifier on each, tested on held-out images"
    )
    utility = _utility(demo_data, out / "synthetic", deadline, device, seed, progress, log)
    config = utility["config"]
    steps, seeds = config["max_steps"], len(utility["seeds"])
    stages.done("tstr", t, deadline, steps=steps, seeds=seeds, scaled_down=steps < TSTR_STEPS[demo_data.dims])

    t, deadline = stages.start(
        "evaluate", "evaluating the synthetic images against the held-out real images, calibrated"
    )
    pipeline = {
        "dataset": dataset,
        "device": device,
        "budget_minutes": budget.seconds / 60,
        "stages": stages.records,
        "medfusion_version": __version__,
    }
    metrics, info = _evaluate(demo_data, out, pipeline, utility, deadline, device, seed, progress, log)
    stages.done("evaluate", t, deadline, **info)
    seconds = budget.elapsed()
    from medfusion.metrics.evaluate import headline

    summary = {**pipeline, "seconds": round(seconds, 1), "headline": headline(metrics)}
    atomic_write_text(out / DEMO_FILE, json.dumps(summary, indent=2) + "\n")
    log("\n" + "\n".join(time_table(stages.records, budget.seconds, seconds)))
    return DemoResult(out, out / "report.html", metrics, stages.records, seconds)


def _train_config(
    stage: str, profile: DemoModels, batch: int, learning_rate: float, seed: int, **extra
) -> dict:
    """The training settings of a demo run; its steps (and what depends on them) come from the
    plan (see :func:`_train`): until then, the most the stage may take."""
    return {
        "max_steps": STEP_BOUNDS[stage][1],
        "batch_size": batch,
        "learning_rate": learning_rate,
        "lr_schedule": "cosine",
        "mixed_precision": profile.mixed_precision,
        "keep_checkpoints": 1,
        "log_every": 10,
        "num_workers": profile.num_workers,
        "seed": seed,
        **extra,
    }


@dataclass(frozen=True)
class StageData:
    """A training and a held-out folder as the stages need them, read once: image size, channels,
    classes (``medfusion demo`` and ``medfusion benchmark`` train on it)."""

    train: Path
    heldout: Path
    size: tuple[int, ...]  # spatial, array order, as trained
    channels: int
    classes: tuple[str, ...]
    heldout_per_class: int  # held-out images of the largest class
    resize: tuple[int, ...] | None = None  # what the images are resized to first; None: their own size

    @classmethod
    def open(cls, root: Path) -> StageData:
        """The demo data under ``root`` (``train/`` and ``heldout/``)."""
        return cls.from_folders(root / "train", root / "heldout")

    @classmethod
    def from_folders(cls, train: Path, heldout: Path, resize: tuple[int, ...] | None = None) -> StageData:
        from medfusion.config import DataConfig
        from medfusion.data.dataset import ImageFolderDataset, build_transform
        from medfusion.data.discovery import discover

        transform = build_transform(DataConfig(resize=resize)) if resize else None
        dataset = ImageFolderDataset(train, validate="none", transform=transform)
        item = dataset[0]["image"]
        counts: dict = {}
        for sample in discover(heldout, None).samples:
            counts[sample.label] = counts.get(sample.label, 0) + 1
        return cls(
            Path(train),
            Path(heldout),
            tuple(item.shape[1:]),
            int(item.shape[0]),
            dataset.class_names,
            max(counts.values(), default=0),
            tuple(resize) if resize else None,
        )

    @property
    def dims(self) -> int:
        return len(self.size)

    def section(self) -> dict:
        """The ``data`` config section: the images' size (resized first where asked), flips along
        the width."""
        resize = {"resize": list(self.resize)} if self.resize else {}
        return {**resize, "crop": list(self.size), "flip_axes": [self.dims - 1]}


class _StepClock:
    """The loop's callback: when the first and the last optimizer steps ended."""

    def __init__(self):
        self.first: float | None = None
        self.last: float | None = None
        self.first_step = self.steps = 0

    def __call__(self, step: int, scalars: dict) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first, self.first_step = now, step
        self.last, self.steps = now, step

    def seconds_per_step(self) -> float | None:
        if self.first is None or self.steps <= self.first_step:
            return None
        return (self.last - self.first) / (self.steps - self.first_step)


def train_stage(
    run: PreparedRun,
    stage: str,
    deadline: float,
    progress: bool,
    log,
    per_step: float | None = None,
    until_deadline: bool = False,
    **changes,
) -> dict:
    """Time a step of the prepared ``run`` (unless ``per_step`` was measured already), plan its
    steps to end by ``deadline``, train it with the loop's deadline set, and say what happened.
    ``changes(steps)`` are more training settings that depend on the planned steps (they override
    the defaults: warm-up over a tenth of the steps, one checkpoint at the end). With
    ``until_deadline`` (a run whose schedule does not depend on its length, e.g. a constant
    learning rate) the loop runs until the deadline (at most :data:`STEP_BOUNDS`' upper end) and
    the plan only estimates its steps. Returns the stage's record."""
    from medfusion.training.run import execute, time_one_step

    prepared = time.monotonic()
    if per_step is None:
        per_step = time_one_step(run, **PROBE)
    seconds = deadline - time.monotonic()
    steps = plan_steps(stage, per_step, seconds)
    stop = training_deadline(stage, deadline, per_step)
    fit = affordable(stop - time.monotonic(), per_step * OVERHEAD)
    batch = run.train_config.batch_size
    most = STEP_BOUNDS[stage][1] if until_deadline else steps
    if until_deadline:
        steps = max(1, min(fit, most))  # an estimate: the deadline ends the run
    measured = f"{per_step:.3f} s per step measured here"
    if until_deadline:
        log(f"plan: batch {batch} until the deadline in {seconds:.0f} s, about {steps} steps ({measured}; "
            f"{most} at most)")  # fmt: skip
    else:
        log(f"plan: {steps} steps of batch {batch} in {seconds:.0f} s ({measured})")
        if fit < steps:
            log(
                f"note: about {fit} steps fit in the time; training stops at the deadline before step {steps}"
            )
    settings = {"warmup_steps": min(50, steps // 10), "checkpoint_every": steps}
    settings |= {key: value(steps) for key, value in changes.items()}
    run = run.with_train(max_steps=most, **settings)
    clock = _StepClock()
    started = time.monotonic()
    result = execute(run, progress=progress, log=_quiet_config(log), callback=clock, deadline=stop)
    ended = time.monotonic()
    stopped = result.step < most and clock.last is not None and clock.last >= stop
    if stopped and until_deadline:
        log(f"{stage}: trained until its deadline: {result.step} steps")
    elif stopped:
        log(f"{stage}: stopped at its deadline after {result.step} of {steps} planned steps")
    in_loop = clock.seconds_per_step()
    record = {
        "steps": steps,
        "until_deadline": until_deadline,
        "steps_run": result.step,
        "stopped_at_deadline": stopped,
        "seconds_per_step_probe": round(per_step, 4),
        "seconds_per_step": None if in_loop is None else round(in_loop, 4),
        # the stage's time after reading its data: timing a step, training to the last step, after it
        "timing_seconds": round(started - prepared, 1),
        "training_seconds": round((clock.last or started) - started, 1),
        "after_seconds": round(ended - (clock.last or started), 1),
    }
    return record


def autoencoder_run(
    data: StageData, out: Path, profile: DemoModels, seed: int, progress: bool
) -> PreparedRun:
    """The VAE run of a stage (into ``out/autoencoder``), prepared: data read, nothing written."""
    from medfusion.training.vae import VAERunConfig, prepare_vae_run

    base = {
        "data": data.section(),
        "model": {
            "block_out_channels": list(profile.vae_channels),
            "layers_per_block": 1,
            "latent_channels": 4,
            "norm_num_groups": 8,
        },
        "loss": {"pixel_loss": "l1", "kl_weight": 1e-6},
        "heldout": str(data.heldout),
        "eval_max_images": VAE_EVAL_IMAGES,
        "scaling_samples": VAE_EVAL_IMAGES,
        "train": _train_config("autoencoder", profile, profile.vae_batch, 1e-3, seed, ema_decay=0.99),
    }
    config = VAERunConfig.from_dict(base, source="medfusion demo")
    return prepare_vae_run(data.train, out / "autoencoder", config, progress=progress)


def train_autoencoder_stage(run: PreparedRun, deadline, progress, log, per_step: float | None = None):
    """Train the prepared VAE ``run`` by ``deadline``; returns the model's path and the stage's
    record, with the VAE's scores on the held-out images."""
    record = train_stage(
        run, "autoencoder", deadline, progress, log, per_step, preview_every=lambda steps: max(1, steps // 4)
    )
    evaluation = json.loads((run.run_dir / "vae_eval.json").read_text(encoding="utf-8"))
    scores = {k: evaluation[k] for k in ("psnr", "ssim", "ms_ssim") if isinstance(evaluation.get(k), float)}
    log("autoencoder on held-out images: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    return run.run_dir / "vae", {**record, **scores}


def train_unet_stage(demo_data: StageData, vae_path, out, profile, deadline, seed, progress, log):
    from medfusion.training.diffusion import MODEL_DIR, DiffusionRunConfig, prepare_diffusion_run

    levels = len(profile.unet_channels)
    base = {
        "data": demo_data.section(),
        "model": {
            "block_out_channels": list(profile.unet_channels),
            "layers_per_block": profile.unet_layers,
            "attention_levels": [False] * (levels - 1) + [True],
            "num_head_channels": 32,
            "norm_num_groups": 16,
        },
        "diffusion": {"beta_schedule": "scaled_linear", "prediction_type": "epsilon", "label_dropout": 0.1},
        "cache_latents": True,
        "preview": {"per_class": 4, "steps": 25, "guidance_scale": 3.0},
        "train": _train_config(
            "diffusion", profile, profile.unet_batch, 1e-3, seed, ema_decay=0.995, preview_every=0
        ),
    }
    config = DiffusionRunConfig.from_dict(base, source="medfusion demo")
    run = prepare_diffusion_run(demo_data.train, vae_path, out, config, progress=progress)
    record = train_stage(run, "diffusion", deadline, progress, log)
    return out / MODEL_DIR, record


def sample_stage(
    model_path,
    demo_data: StageData,
    synthetic,
    deadline,
    device,
    seed,
    progress,
    log,
    bounds: tuple[int, int] | None = None,
):
    """A first batch of samples, timed; then as many per class (unconditional: in all) as the rest
    of the time buys, within ``bounds`` (default: at least :data:`MIN_PER_CLASS`, at most the
    held-out images of a class)."""
    from medfusion.samplers.schedulers import SamplerConfig
    from medfusion.samplers.synthetic import write_synthetic_dataset

    classes = max(1, len(demo_data.classes))
    low, high = bounds or (MIN_PER_CLASS, max(MIN_PER_CLASS, demo_data.heldout_per_class))
    sampler = SamplerConfig()

    def write(n: int):
        return write_synthetic_dataset(
            model_path,
            synthetic,
            n=n,
            sampler=sampler,
            seed=seed,
            batch_size=SAMPLE_BATCH,
            device=device,
            progress=progress,
            log=log,
        )

    first = write(max(1, SAMPLE_BATCH // classes))  # one batch (model loading included)
    done = first.total // classes
    rate = first.written / first.seconds if first.seconds > 0 else math.inf
    n = samples_per_class(deadline - time.monotonic(), rate, classes, done, low, high)
    log(f"plan: {n} samples per class ({rate:.2f} images/s measured on the first {first.total})")
    result = write(n) if n > done else first
    seconds = first.seconds + (result.seconds if n > done else 0.0)
    rate = result.total / seconds if seconds > 0 else 0.0
    log(f"wrote {result.total} samples ({n} per class; {sampler.name}, {sampler.steps} steps) in "
        f"{seconds:.1f} s ({rate:.1f} images/s) to {synthetic}")  # fmt: skip
    return {
        "per_class": n,
        "sampler": sampler.name,
        "sampler_steps": sampler.steps,
        "images_per_second": round(rate, 2),
    }


def train_features_stage(demo_data: StageData, features_dir, profile, deadline, seed, progress, log):
    from medfusion.training.features import VALIDATION_FILE, FeaturesRunConfig, prepare_features_run

    groups = min(16, profile.encoder_channels[0])
    base = {
        "model": {"block_out_channels": list(profile.encoder_channels), "norm_num_groups": groups},
        "train": _train_config(
            "features", profile, profile.encoder_batch, 1e-3, seed, preview_every=0, ema_decay=None
        ),
    }
    config = FeaturesRunConfig.from_dict(base, source="medfusion demo")
    run = prepare_features_run(demo_data.train, features_dir, config, progress=progress)
    record = train_stage(run, "features", deadline, progress, log)
    validation = json.loads((features_dir / VALIDATION_FILE).read_text(encoding="utf-8"))
    return {**record, "kept_step": validation["kept_step"]}


def _classifier_step_seconds(config, demo_data: StageData, device: str) -> float:
    """Seconds of one step of the TSTR classifier here: short fits on a batch of noise, of 1 step
    (once untimed: the first fit of a process pays for more than its step) and of
    ``1 + TSTR_PROBE_STEPS`` steps, timed; their difference leaves out building the network."""
    import torch

    from medfusion.downstream.classifier import TensorClassDataset, train_classifier

    images = torch.rand(config.batch_size, demo_data.channels, *demo_data.size) * 2 - 1
    labels = torch.arange(config.batch_size) % len(demo_data.classes)
    data = TensorClassDataset(images, labels, demo_data.classes)

    def fit(steps: int) -> float:
        start = time.perf_counter()
        train_classifier(data, config.replace(max_steps=steps), device, progress=False)
        return time.perf_counter() - start

    fit(1)
    once, more = fit(1), fit(1 + TSTR_PROBE_STEPS)
    return (more - once) / TSTR_PROBE_STEPS if more > once else more / (1 + TSTR_PROBE_STEPS)


def _utility(demo_data: StageData, synthetic: Path, deadline, device: str, seed: int, progress, log) -> dict:
    """TSTR beside TRTR on the demo data: the downstream classifier, :data:`TSTR_SEEDS` seeds a
    side, with the steps its time buys (fewer in 3D, where a step costs more)."""
    from medfusion.config import DataConfig
    from medfusion.downstream import ClassifierConfig, tstr

    most = TSTR_STEPS[demo_data.dims]
    config = ClassifierConfig(max_steps=most, batch_size=32 if demo_data.dims == 2 else 16)
    per_step = _classifier_step_seconds(config, demo_data, device)
    fits = 2 * TSTR_SEEDS
    steps = plan_classifier_steps(deadline - time.monotonic(), per_step, most, fits)
    if steps < most:
        log(f"note: {steps} classifier steps per fit instead of {most}, to fit the time "
            f"({per_step:.3f} s per step measured here)")  # fmt: skip
    seeds = tuple(range(seed, seed + TSTR_SEEDS))
    config = config.replace(max_steps=steps)
    result = tstr(demo_data.train, synthetic, demo_data.heldout, DataConfig(), config, seeds=seeds,
                  device=device, progress=progress, log=lambda message: None)  # fmt: skip
    synthetic_score, real_score = (result[k]["balanced_accuracy"]["mean"] for k in ("tstr", "trtr"))
    log(
        "balanced accuracy on held-out real images: trained on synthetic "
        f"{synthetic_score:.3f}, on real {real_score:.3f}"
    )
    return result


def _evaluate(demo_data: StageData, out: Path, pipeline: dict, utility: dict, deadline, device, seed,
              progress, log) -> tuple[dict, dict]:  # fmt: skip
    """The evaluation, with the calibration when the extractor's speed here says that both fit
    the time (else without it, and the demo says so). Returns the metrics and the stage's record."""
    from medfusion.metrics.evaluate import evaluate
    from medfusion.metrics.features import load_extractor

    extractor = load_extractor(out / "features", device)
    per_image = _extractor_seconds_per_image(extractor, demo_data.heldout, device)
    real, fake, train = (_count_images(p) for p in (demo_data.heldout, out / "synthetic", demo_data.train))
    needed = evaluation_seconds(per_image, real + fake + train, real, calibrate=True)
    calibrate = time.monotonic() + needed <= deadline
    if not calibrate:
        log(f"note: with the calibration the evaluation would take about {needed:.0f} s, past its "
            "time; evaluating without it")  # fmt: skip
        needed = evaluation_seconds(per_image, real + fake + train, real, calibrate=False)
    metrics = evaluate(
        demo_data.heldout,
        out / "synthetic",
        out,
        extractor,
        train=demo_data.train,
        device=device,
        progress=progress,
        log=lambda message: None,
        pipeline=pipeline,
        seed=seed,
        utility=utility,
        calibrate=calibrate,
    )
    record = {"calibrate": calibrate, "expected_seconds": round(needed, 1), "seconds_per_image": per_image}
    return metrics, record


def _extractor_seconds_per_image(extractor, folder: Path, device: str, batch_size: int = 32) -> float:
    """Seconds the extractor takes for an image of ``folder`` here (a batch read and extracted,
    timed after one untimed pass)."""
    import torch

    from medfusion.data.dataset import ImageFolderDataset

    dataset = ImageFolderDataset(folder, labels="none", validate="none")
    start = time.perf_counter()
    images = torch.stack([dataset[i]["image"] for i in range(min(batch_size, len(dataset)))])
    reading = time.perf_counter() - start
    with torch.no_grad():
        extractor(images.to(device))
        start = time.perf_counter()
        extractor(images.to(device))
    return (reading + time.perf_counter() - start) / len(images)


def _count_images(folder: Path) -> int:
    from medfusion.data.discovery import discover

    return len(discover(folder, "none").samples)


def _quiet_config(log: Callable[[str], None]) -> Callable[[str], None]:
    """``log`` without the resolved-config dumps of the training commands (the demo's configs are
    in each run folder's ``config.yaml``)."""

    def forward(message: str) -> None:
        if "resolved config" not in message:
            log(message)

    return forward
