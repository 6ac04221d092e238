"""``medfusion demo --segmentation``: does pretraining on synthetic images help a segmentation
model that has few labelled cases? The whole story on bundled image/mask pairs, within a time budget.

The stages, with the same functions as the commands (and as ``medfusion demo``):

1. **data**: the bundled pairs (``medfusion data demo --datasets segmentation``), one set:
   ``brain-2d`` (default: MNI152 T1 slices, background / grey / white matter), ``nuclei-2d``
   (fluorescence nuclei, binary) or ``brain-3d`` (32^3 T1 crops);
2. **inspect**: label values and per-class fractions of the training and the test pairs;
3. **autoencoder** and **diffusion**: an unconditional latent diffusion model trained on the
   training images without their masks (the unlabelled pool a user has);
4. **sample**: a synthetic set from it, as many images as the time buys (between
   :data:`SYNTHETIC_BOUNDS` times the training images);
5. **segment**: ``medfusion segment`` with two pretraining sources, the synthetic images and the
   real training images without their masks, and fine-tuning with :data:`COUNTS` labelled cases
   and :data:`SEEDS` seeds, from scratch and from each source. Its steps are planned from the time
   left: one pretraining and one fine-tuning step are timed here first (:func:`plan_finetune_steps`).

Everything lands in one folder::

    OUT/autoencoder/ OUT/diffusion/ OUT/model/   the generator (as ``medfusion demo``)
    OUT/synthetic/                               the synthetic images (a ``medfusion sample`` folder)
    OUT/segment/                                 the experiment: segmentation.json, segmentation.html
    OUT/demo.json                                per stage: planned and spent seconds, steps

A stage that runs over its plan takes time from the later ones (:class:`~medfusion.workflows.budget.
TimeBudget`); the segmentation experiment trains a fixed number of steps per run (every run alike,
so the comparison is fair), so a machine much slower than its timed steps ends late rather than
with an unfair table.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from medfusion import __version__
from medfusion.runlock import run_lock
from medfusion.utils import atomic_write_text
from medfusion.workflows import demo
from medfusion.workflows.budget import TimeBudget, affordable, within
from medfusion.workflows.demo import (
    DEFAULT_MINUTES,
    DEMO_FILE,
    OVERHEAD,
    StageData,
    Stages,
    autoencoder_run,
    check_out,
    demo_budget,
    pick_device,
    sample_stage,
    train_autoencoder_stage,
    train_unet_stage,
)

SETS = ("brain-2d", "nuclei-2d", "brain-3d")
SET_3D = "brain-3d"
OUTPUTS = ("autoencoder", "diffusion", "model", "synthetic", "segment", DEMO_FILE)
WEIGHTS = {"autoencoder": 0.14, "diffusion": 0.3, "sample": 0.08, "segment": 0.42}
MARGIN = 0.06
COUNTS = "2,8,all"  # labelled cases of the learning curve
SEEDS = 2  # draws of the labelled cases per count
SYNTHETIC_BOUNDS = (1, 4)  # synthetic images, in multiples of the training images
PRETRAIN_RATIO = 2  # pretraining steps per fine-tuning step
FINETUNE_BOUNDS = (20, 1000)  # fine-tuning steps per run; the floor wins over the budget
# the work of a fine-tuning run around its loop (building, saving, predicting and writing the test
# masks): seconds, and fine-tuning steps
AROUND_RUN_SECONDS = 1.5
AROUND_RUN_STEPS = 10
# the segmentation networks by spatial dims and accelerator (a few minutes on two CPU cores)
NETWORKS = {
    (2, "cpu"): (16, 32, 64),
    (2, "cuda"): (32, 64, 128, 256),
    (3, "cpu"): (16, 32, 64),
    (3, "cuda"): (32, 64, 128, 256),
}


@dataclass
class SegmentationDemoResult:
    """What :func:`run_segmentation_demo` did: the run folder, the report, the Dice table and
    per-stage timings."""

    out: Path
    report: Path
    table: dict
    stages: dict[str, dict]
    seconds: float


def plan_finetune_steps(
    seconds: float, pretrain_step: float, finetune_steps: Sequence[float], sources: int
) -> int:
    """Fine-tuning steps per run (pretraining takes :data:`PRETRAIN_RATIO` times as many per
    source) that fit ``sources`` pretrainings and one fine-tuning per entry of ``finetune_steps``
    (its seconds per step) in ``seconds``, with the loop's overhead and each run's work around its
    loop (:data:`AROUND_RUN_SECONDS` and :data:`AROUND_RUN_STEPS`); within :data:`FINETUNE_BOUNDS`."""
    per_step = OVERHEAD * (sources * PRETRAIN_RATIO * pretrain_step + sum(finetune_steps))
    around = sum(AROUND_RUN_SECONDS + AROUND_RUN_STEPS * step for step in finetune_steps)
    return within(affordable(seconds - around, per_step), *FINETUNE_BOUNDS)


def run_segmentation_demo(
    out: str | os.PathLike = "medfusion-segmentation-demo",
    dataset: str = SETS[0],
    minutes: float = DEFAULT_MINUTES,
    data_dir: str | os.PathLike | None = None,
    device: str | None = None,
    force: bool = False,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> SegmentationDemoResult:
    """Run the segmentation story (see the module docstring) on a bundled set into ``out``.

    Args:
        out: the run folder (new, empty, or an earlier demo run with ``force``).
        dataset: which bundled set: ``brain-2d``, ``nuclei-2d`` or ``brain-3d``.
        minutes: the time budget of the whole run.
        data_dir: where the demo data is built once and reused (default: the user cache).
        device: ``cpu``, ``cuda``, ``cuda:1``...; default: CUDA when available.
        force: replace an earlier demo run in ``out``.
        seed: seeds the data, training, sampling and the draws of labelled cases.
        progress: progress bars.
        log: where stage headers and summaries go.
    """
    if dataset not in SETS:
        raise ValueError(f"dataset must be one of {SETS} for the segmentation demo; got {dataset!r}")
    budget = demo_budget(minutes, WEIGHTS, MARGIN)
    out = Path(out)
    device = pick_device(device)
    with run_lock(out, "medfusion demo --segmentation"):
        check_out(out, force, OUTPUTS)
        return _run_stages(out, dataset, budget, data_dir, device, seed, progress, log)


def _run_stages(out: Path, dataset: str, budget: TimeBudget, data_dir, device: str, seed, progress, log):
    from medfusion.data.demo import build_demo_data
    from medfusion.data.discovery import discover
    from medfusion.data.pairs import inspect_pairs

    stages = Stages(budget, log, total=6)
    t, _ = stages.start("data", "demo data (built once from files inside installed packages, then reused)")
    built = build_demo_data(data_dir, datasets=("segmentation",), seed=seed, progress=progress)
    root = built / "segmentation" / dataset
    if not (root / "images").is_dir():
        raise RuntimeError(
            f"the segmentation set {dataset} was not built in {root.parent} (a package it is cut from is "
            'missing; see the warning above): pip install "medfusion[segmentation]"'
        )
    folders = {name: root / name for name in ("images", "masks", "test-images", "test-masks")}
    log(f"data: {root} (training pairs in images/ and masks/, test pairs in test-images/ and test-masks/)")
    stages.done("data", t, None, path=str(root))

    t, _ = stages.start("inspect", f"medfusion data inspect {folders['images']} --masks {folders['masks']}")
    for images, masks in (("images", "masks"), ("test-images", "test-masks")):
        log(inspect_pairs(folders[images], folders[masks], progress=progress).format())
    stages.done("inspect", t, None)

    # the generator learns the training images without their masks: the unlabelled pool
    generator_data = StageData.from_folders(folders["images"], folders["test-images"])
    machine = (generator_data.dims, "cuda" if device.startswith("cuda") else "cpu")
    profile = demo.PROFILES[machine]
    out.mkdir(parents=True, exist_ok=True)
    t, deadline = stages.start("autoencoder", "training the autoencoder on the training images (no masks)")
    run = autoencoder_run(generator_data, out, profile, seed, progress)
    vae_path, info = train_autoencoder_stage(run, deadline, progress, log)
    stages.done("autoencoder", t, deadline, **info)

    t, deadline = stages.start("diffusion", "training the unconditional latent diffusion U-Net")
    model_path, info = train_unet_stage(generator_data, vae_path, out, profile, deadline, seed, progress, log)
    stages.done("diffusion", t, deadline, **info)

    t, deadline = stages.start("sample", "sampling synthetic images to pretrain on")
    count = len(discover(folders["images"], None).samples)
    bounds = (SYNTHETIC_BOUNDS[0] * count, SYNTHETIC_BOUNDS[1] * count)
    info = sample_stage(
        model_path, generator_data, out / "synthetic", deadline, device, seed, progress, log, bounds
    )
    stages.done("sample", t, deadline, **info)

    t, deadline = stages.start(
        "segment", "medfusion segment: pretraining on synthetic and on real unlabelled images, fine-tuning"
    )
    result, info = _segment(folders, NETWORKS[machine], out, deadline, device, seed, progress, log)
    stages.done("segment", t, deadline, **info)

    seconds = budget.elapsed()
    summary = {
        "dataset": dataset,
        "device": device,
        "budget_minutes": budget.seconds / 60,
        "stages": stages.records,
        "seconds": round(seconds, 1),
        "table": result.table,
        "medfusion_version": __version__,
    }
    atomic_write_text(out / DEMO_FILE, json.dumps(summary, indent=2) + "\n")
    return SegmentationDemoResult(out, result.report, result.table, stages.records, seconds)


def _segment(
    folders: dict[str, Path],
    channels: tuple[int, ...],
    out: Path,
    deadline: float,
    device: str,
    seed,
    progress,
    log,
):
    from medfusion.downstream.segment import SegmentConfig, run_segment, step_seconds

    images = folders["images"]
    config = SegmentConfig.from_dict({"network": {"channels": list(channels)}}, source="medfusion demo")
    sources = {"synthetic": out / "synthetic", "real-unlabelled": images}
    pretrain_step, finetune_step = step_seconds(
        images, folders["masks"], sources["synthetic"], config, n_labelled=COUNTS
    )
    per_run = [finetune_step[n] for n in finetune_step for _ in range(SEEDS * (1 + len(sources)))]
    runs = len(per_run)
    seconds = deadline - time.monotonic()
    steps = plan_finetune_steps(seconds, pretrain_step, per_run, len(sources))
    measured = ", ".join(f"{t:.3f} s with {n} labelled" for n, t in finetune_step.items())
    log(
        f"plan: {len(sources)} pretrainings of {PRETRAIN_RATIO * steps} steps and {runs} fine-tunings of "
        f"{steps} steps in {seconds:.0f} s (per step, measured here: {pretrain_step:.3f} s pretraining, "
        f"{measured})"
    )
    config = config.replace(
        pretrain=config.pretrain.replace(max_steps=PRETRAIN_RATIO * steps, seed=seed),
        finetune=config.finetune.replace(max_steps=steps),
    )
    result = run_segment(
        images,
        folders["masks"],
        folders["test-images"],
        folders["test-masks"],
        out / "segment",
        pretrain=sources,
        n_labelled=COUNTS,
        seeds=SEEDS,
        config=config,
        device=device,
        seed=seed,
        progress=progress,
        log=log,
    )
    info = {
        "pretrain_steps": PRETRAIN_RATIO * steps,
        "finetune_steps": steps,
        "runs": runs,
        "seconds_per_step": {
            "pretrain": round(pretrain_step, 4),
            "finetune": {str(n): round(t, 4) for n, t in finetune_step.items()},
        },
    }
    return result, info
