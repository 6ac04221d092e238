"""``medfusion segment``: does pretraining on synthetic (or real unlabelled) images help segmentation
when labelled cases are scarce? A learning-curve experiment, 2D and 3D.

1. **Pretraining**, once per source (``pretrain``: a ``medfusion sample`` folder, or any folder of
   unlabelled images): the whole encoder-decoder learns to restore corrupted images
   (:class:`~medfusion.downstream.segmentation.RestorationTask`: in-/out-painting and local pixel
   shuffling, L1), through the shared training loop.
2. **Fine-tuning**, for every number of labelled cases ``n`` and every seed: the same ``n`` pairs
   (drawn by the seed) train a segmenter from scratch and from each pretrained network (all but its
   output layer), with the same steps (:class:`~medfusion.downstream.segmentation.SegmentationTask`,
   DiceCE).
3. **Scoring**: every fine-tuned model predicts the test images (by sliding windows where they are
   larger than the training crop) and gets the Dice of every foreground class per test case
   (MONAI's ``DiceMetric``); the table holds the mean and the standard deviation over seeds of the
   mean over test cases.

Everything lands in ``out``::

    OUT/pretrain/SOURCE/            the pretraining run; model/ (config.json + model.safetensors)
    OUT/finetune/n5-seed1-SOURCE/   a fine-tuning run; model/, predictions/ (the test masks predicted,
                                    with the test images' geometry), result.json (Dice per case)
    OUT/segmentation.json           settings, every result, the table
    OUT/segmentation.html           the Dice table, the learning curve, overlays on test images

A finished run (``result.json`` or ``model/`` there) is reused when the command runs again.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfusion import __version__
from medfusion.config import Config, DataConfig
from medfusion.downstream.restoration import RestorationConfig, dice_per_class
from medfusion.downstream.segmentation import (
    RestorationTask,
    SegmentationTask,
    SegmenterConfig,
    build_segmenter,
    predict_masks,
    transfer_weights,
)
from medfusion.training.loop import TrainConfig
from medfusion.utils import atomic_dir, atomic_write_text

SCRATCH = "scratch"
MODEL_DIR = "model"
RESULT_FILE = "result.json"
SUMMARY_FILE = "segmentation.json"
SETTINGS_FILE = "settings.json"
LABEL_GAP = 14  # pixels between the labels of the learning curve's lines
REPORT_FILE = "segmentation.html"
NAME = re.compile(r"[^A-Za-z0-9._+-]+")


@dataclass(frozen=True)
class SegmentTrainConfig(TrainConfig):
    """:class:`~medfusion.training.loop.TrainConfig` with the defaults of a small segmentation run
    on a CPU: a few hundred steps of batch 8, cosine decay, no EMA, one checkpoint at the end."""

    max_steps: int = 200
    batch_size: int = 8
    learning_rate: float = 1e-3
    lr_schedule: str = "cosine"
    warmup_steps: int = 10
    ema_decay: float | None = None
    checkpoint_every: int = 100_000
    keep_checkpoints: int = 1
    preview_every: int = 0
    log_every: int = 10
    num_workers: int = 0


@dataclass(frozen=True)
class SegmentConfig(Config):
    """Everything ``medfusion segment`` needs (a YAML file has these sections).

    Attributes:
        data: how files become tensors; ``crop`` is the training crop (random), default: the size
            of the first training image.
        network: the segmentation network.
        restoration: the pretext task's corruption.
        pretrain: the pretraining runs' training.
        finetune: the fine-tuning runs' training (the same for every ``n`` and source).
        num_classes: classes, background included; None: read from the masks.
    """

    data: DataConfig = field(default_factory=DataConfig)
    network: SegmenterConfig = field(default_factory=SegmenterConfig)
    restoration: RestorationConfig = field(default_factory=RestorationConfig)
    pretrain: SegmentTrainConfig = field(default_factory=lambda: SegmentTrainConfig(max_steps=300))
    finetune: SegmentTrainConfig = field(default_factory=SegmentTrainConfig)
    num_classes: int | None = None


@dataclass(frozen=True)
class _RunConfig(Config):
    """What one run's ``config.yaml`` holds (the loop reads ``train``)."""

    kind: str
    data: DataConfig
    network: SegmenterConfig
    train: SegmentTrainConfig
    restoration: RestorationConfig | None = None
    num_classes: int | None = None
    init: str | None = None
    cases: tuple[str, ...] = ()


def parse_counts(text: str | Sequence[int | str]) -> tuple[int | str, ...]:
    """``2,5,10,all`` (or a sequence) as labelled-case counts: integers >= 1 and ``all``, in order."""
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else [str(s) for s in text]
    counts: list[int | str] = []
    for item in items:
        if item == "all":
            counts.append("all")
            continue
        if not item.isdigit() or int(item) < 1:
            raise ValueError(f"n_labelled: give counts >= 1 and 'all', e.g. 2,5,10,all; got {item!r}")
        counts.append(int(item))
    if not counts or len(set(counts)) != len(counts):
        raise ValueError(f"n_labelled: give distinct counts, e.g. 2,5,10,all; got {text!r}")
    return tuple(counts)


def source_name(folder: Path, taken: set[str]) -> str:
    """A folder-safe name for a pretraining source (its folder's name, made unique)."""
    base = NAME.sub("-", folder.name).strip("-") or "source"
    name, i = base, 2
    while name in taken or name == SCRATCH:
        name, i = f"{base}-{i}", i + 1
    return name


def save_segmenter(folder: Path, model: torch.nn.Module, config: dict) -> Path:
    """``config.json`` (what :func:`load_segmenter` builds from) and ``model.safetensors``, atomically."""
    from safetensors.torch import save_file

    with atomic_dir(folder, overwrite=True) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return folder


def load_segmenter(
    folder: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, dict]:
    """A segmenter saved by :func:`save_segmenter`: built from its JSON, weights from safetensors
    (nothing from the folder is executed)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    network = SegmenterConfig.from_dict(config["network"], source=str(folder / "config.json"))
    model = build_segmenter(config["spatial_dims"], config["in_channels"], config["out_channels"], network)
    model.load_state_dict(load_file(str(folder / "model.safetensors"), device=str(device)))
    return model.to(device).eval(), config


@dataclass
class SegmentResult:
    """What :func:`run_segment` did."""

    out: Path
    report: Path
    table: dict
    runs: dict[str, dict]


def run_segment(
    images: str | os.PathLike,
    masks: str | os.PathLike,
    test_images: str | os.PathLike,
    test_masks: str | os.PathLike,
    out: str | os.PathLike,
    pretrain: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike] = (),
    n_labelled: str | Sequence[int | str] = "all",
    seeds: int = 3,
    config: SegmentConfig | None = None,
    device: str = "cpu",
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> SegmentResult:
    """Run the learning-curve experiment (see the module docstring) into ``out``.

    Args:
        images, masks: the labelled training pairs (matched by file name).
        test_images, test_masks: the test pairs every model is scored on.
        out: the experiment folder (a rerun reuses its finished runs).
        pretrain: folders of unlabelled images (e.g. ``medfusion sample`` output) to pretrain on,
            each a source of its own, named after its folder (or by the keys of a mapping
            name -> folder); none: scratch only.
        n_labelled: labelled-case counts, e.g. ``2,5,10,all``.
        seeds: draws of the labelled cases (and initialisations) per count.
        config: networks, corruption, training; default :class:`SegmentConfig`.
        device: where to train and predict.
        seed: the first seed.
        force: start over in an ``out`` that holds an experiment of other settings (its runs are
            removed); without it, that is an error (runs of other data or training would be
            reused). More counts, seeds or sources than before are no change: they add runs.
        progress: progress bars.
        log: where headers and results go.
    """
    from medfusion.data.pairs import PairedDataset

    config = config or SegmentConfig()
    counts = parse_counts(n_labelled)
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1; got {seeds}")
    out = Path(out)
    train = PairedDataset(images, masks, config.data, num_classes=config.num_classes, training=True)
    num_classes = config.num_classes or train.num_classes
    test = PairedDataset(
        test_images,
        test_masks,
        config.data.replace(crop=None, random_crop=False),
        num_classes=num_classes,
        training=False,
    )
    _check_geometry(train, test, config)
    sizes = [c for c in counts if c != "all"]
    if sizes and max(sizes) > len(train):
        raise ValueError(
            f"n_labelled: {max(sizes)} labelled cases asked for, but {images} holds {len(train)} pairs"
        )
    sources = _open_sources(pretrain, train, config, log)
    settings = {
        "images": str(images),
        "masks": str(masks),
        "test_images": str(test_images),
        "test_masks": str(test_masks),
        "num_classes": num_classes,
        "seed": seed,
        "config": config.to_dict(),
        "pretrain": {name: str(dataset.root) for name, dataset in sources.items()},
    }
    _check_settings(out, settings, force)
    runs: dict[str, dict] = {}
    pretrained = {
        name: _pretrain(name, dataset, train, out, config, device, progress, log)
        for name, dataset in sources.items()
    }
    inits = [SCRATCH, *pretrained]
    for count in counts:
        n = len(train) if count == "all" else int(count)
        for k in range(seeds):
            draw = seed + k
            cases = sorted(np.random.default_rng(draw).choice(len(train), size=n, replace=False).tolist())
            for init in inits:
                name = f"n{n}-seed{draw}-{init}"
                runs[name] = _finetune(
                    name,
                    train,
                    cases,
                    test,
                    pretrained.get(init),
                    init,
                    num_classes,
                    draw,
                    out,
                    config,
                    device,
                    progress,
                    log,
                )
                runs[name] |= {"n": n, "count": str(count), "seed": draw, "init": init}
    table = summarize(runs, inits, num_classes)
    summary = {
        "images": str(images),
        "masks": str(masks),
        "test_images": str(test_images),
        "test_masks": str(test_masks),
        "pretrain": {name: str(dataset.root) for name, dataset in sources.items()},
        "n_labelled": [str(c) for c in counts],
        "seeds": seeds,
        "num_classes": num_classes,
        "spatial_dims": train.spatial_dims,
        "config": config.to_dict(),
        "table": table,
        "runs": runs,
        "note": "pretraining uses the images of each source without labels; fine-tuning and scoring "
        "use the labelled pairs only",
        "medfusion_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    atomic_write_text(
        out / REPORT_FILE, segmentation_html(summary, _overlays(runs, test, out, device, tuple(train.crop)))
    )
    for line in table_lines(table, inits):
        log(line)
    log(f"wrote {out / SUMMARY_FILE} and {out / REPORT_FILE}")
    return SegmentResult(out, out / REPORT_FILE, table, runs)


def _check_settings(out: Path, settings: dict, force: bool) -> None:
    """Refuse to reuse the runs in ``out`` when they were made with other settings (or, with
    ``force``, remove them); then record ``settings``. Sources are compared by name: a known name
    must be the same folder, a new one adds runs."""
    path = out / SETTINGS_FILE
    earlier = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    if earlier is not None:
        differ = [k for k in settings if k != "pretrain" and earlier.get(k) != settings[k]]
        sources = earlier.get("pretrain", {})
        differ += [
            f"pretrain {k}"
            for k in settings["pretrain"]
            if k in sources and sources[k] != settings["pretrain"][k]
        ]
        if differ and not force:
            raise ValueError(
                f"out {out} holds an experiment of other settings ({', '.join(differ)} differ); its runs "
                "would not compare with new ones: give another folder, the same settings to resume, or "
                "force=True to start over"
            )
        if differ:
            for name in ("pretrain", "finetune", SUMMARY_FILE, REPORT_FILE):
                target = out / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
            earlier = None
    recorded = dict(settings)
    if earlier is not None:
        recorded["pretrain"] = {**earlier.get("pretrain", {}), **settings["pretrain"]}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(recorded, indent=2) + "\n")


def _check_geometry(train, test, config: SegmentConfig) -> None:
    if (test.spatial_dims, test.channels) != (train.spatial_dims, train.channels):
        raise ValueError(
            f"test_images: {test.spatial_dims}D images with {test.channels} channel(s), but images holds "
            f"{train.spatial_dims}D with {train.channels}"
        )
    crop = tuple(train.crop)
    multiple = config.network.multiple
    if any(side % multiple for side in crop):
        raise ValueError(
            f"data.crop: the training crop {list(crop)} must be a multiple of {multiple} per axis (the "
            f"network halves the size {len(config.network.channels) - 1} times); set data.crop"
        )


def _open_sources(pretrain, train, config: SegmentConfig, log) -> dict[str, Any]:
    """The pretraining folders, opened with the training crop; another dimensionality or channel
    count is an error naming the folder."""
    from medfusion.data.dataset import ImageFolderDataset, build_transform

    crop = tuple(train.crop)
    sources: dict[str, Any] = {}
    given_names = list(pretrain.items()) if isinstance(pretrain, Mapping) else [(None, f) for f in pretrain]
    for given, folder in given_names:
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"pretrain {folder}: not a folder")
        data = config.data.replace(crop=crop, random_crop=True, labels="none")
        dataset = ImageFolderDataset(
            folder, labels="none", transform=build_transform(data), validate="header"
        )
        if (dataset.spatial_dims, dataset.channels) != (train.spatial_dims, train.channels):
            raise ValueError(
                f"pretrain {folder}: {dataset.spatial_dims}D images with {dataset.channels} channel(s), but "
                f"the labelled images are {train.spatial_dims}D with {train.channels}"
            )
        if isinstance(given, str):
            if NAME.search(given) or given == SCRATCH or given in sources:
                raise ValueError(
                    f"pretrain: the source name {given!r} must be unique, not {SCRATCH!r}, and hold only "
                    "letters, digits and ._+-"
                )
            sources[given] = dataset
        else:
            sources[source_name(folder, set(sources))] = dataset
        log(f"pretraining source {folder}: {len(dataset)} images")
    return sources


def _prepared(kind: str, run_dir: Path, run_config: _RunConfig, task_factory, dataset):
    """One run of the shared skeleton (nothing written until it executes)."""
    from medfusion.training.run import PreparedRun, seeded

    return PreparedRun(
        command=f"medfusion segment ({kind})",
        config=run_config,
        run_dir=run_dir,
        make_task=seeded(run_config.train.seed, task_factory),
        dataset=dataset,
    )


def _execute(run, progress):
    """Train ``run`` (resuming its checkpoint when there is one); the run's resolved config goes to
    its config.yaml, not to the log."""
    from medfusion.training.run import execute

    resume = (run.run_dir / "checkpoints").is_dir()
    return execute(run, resume=resume, progress=progress, log=lambda message: None)


def _model_config(train, out_channels: int, config: SegmentConfig, **extra) -> dict:
    return {
        "spatial_dims": train.spatial_dims,
        "in_channels": train.channels,
        "out_channels": out_channels,
        "network": config.network.to_dict(),
        "crop": list(train.crop),
        **extra,
    }


def _pretrain_run(folder: Path, dataset, train, config: SegmentConfig):
    crop = tuple(train.crop)
    run_config = _RunConfig("restoration", config.data, config.network, config.pretrain, config.restoration)

    def task():
        network = build_segmenter(train.spatial_dims, train.channels, train.channels, config.network)
        return RestorationTask(network, config.restoration, crop, seed=config.pretrain.seed)

    return _prepared("pretraining", folder, run_config, task, dataset)


def _pretrain(name, dataset, train, out: Path, config: SegmentConfig, device, progress, log) -> Path:
    folder = out / "pretrain" / name
    if (folder / MODEL_DIR / "config.json").is_file():
        return folder / MODEL_DIR
    log(f"# pretraining on {name}: restoration of corrupted images ({config.pretrain.max_steps} steps)")
    result = _execute(_pretrain_run(folder, dataset, train, config), progress)
    model = result.models["segmenter"]
    return save_segmenter(
        folder / MODEL_DIR, model, _model_config(train, train.channels, config, task="restoration")
    )


def _finetune_run(folder: Path, train, cases, pretrained, init, num_classes, seed, config: SegmentConfig):
    from medfusion.data.pairs import PairedSubset

    # a batch holds at most the labelled cases (2 cases: batches of 2, with random crops and flips)
    finetune = config.finetune.replace(seed=seed, batch_size=min(config.finetune.batch_size, len(cases)))
    chosen = tuple(str(train.pairs[i].image) for i in cases)
    run_config = _RunConfig(
        "segmentation",
        config.data,
        config.network,
        finetune,
        num_classes=num_classes,
        init=init,
        cases=chosen,
    )

    def task():
        network = build_segmenter(train.spatial_dims, train.channels, num_classes, config.network)
        if pretrained is not None:
            source, _ = load_segmenter(pretrained)
            transfer_weights(source, network)
        return SegmentationTask(network, num_classes)

    return _prepared("fine-tuning", folder, run_config, task, PairedSubset(train, cases))


def step_seconds(
    images: str | os.PathLike,
    masks: str | os.PathLike,
    pretrain: str | os.PathLike,
    config: SegmentConfig | None = None,
    n_labelled: str | Sequence[int | str] = "all",
) -> tuple[float, dict[int, float]]:
    """Seconds of one pretraining step (on the images of ``pretrain``) and of one fine-tuning step
    of every labelled count in ``n_labelled`` (its batch holds at most that many pairs), measured
    here: what a caller plans ``pretrain.max_steps`` and ``finetune.max_steps`` from.

    Returns:
        The pretraining step's seconds and ``{n: seconds}`` for every count ``n`` (``all`` as the
        number of pairs). Nothing is written.
    """
    from medfusion.data.pairs import PairedDataset
    from medfusion.training.run import time_one_step

    config = config or SegmentConfig()
    train = PairedDataset(images, masks, config.data, num_classes=config.num_classes, training=True)
    num_classes = config.num_classes or train.num_classes
    (dataset,) = _open_sources([pretrain], train, config, lambda message: None).values()
    nowhere = Path(os.devnull)
    pretraining = time_one_step(_pretrain_run(nowhere, dataset, train, config))
    counts = [len(train) if c == "all" else min(int(c), len(train)) for c in parse_counts(n_labelled)]
    by_batch: dict[int, float] = {}
    for batch in sorted({min(config.finetune.batch_size, n) for n in counts}):
        run = _finetune_run(nowhere, train, list(range(batch)), None, SCRATCH, num_classes, 0, config)
        by_batch[batch] = time_one_step(run)
    return pretraining, {n: by_batch[min(config.finetune.batch_size, n)] for n in counts}


def _finetune(
    name, train, cases, test, pretrained, init, num_classes, seed, out, config, device, progress, log
):
    folder = out / "finetune" / name
    if (folder / RESULT_FILE).is_file():
        return json.loads((folder / RESULT_FILE).read_text(encoding="utf-8"))
    if folder.exists() and not (folder / "checkpoints").is_dir():
        shutil.rmtree(folder)
    log(f"# fine-tuning {name}: {len(cases)} labelled case(s), from {init}")
    run = _finetune_run(folder, train, cases, pretrained, init, num_classes, seed, config)
    result = _execute(run, progress)
    model = result.models["segmenter"].to(device).eval()
    chosen = list(run.config.cases)
    save_segmenter(
        folder / MODEL_DIR,
        model,
        _model_config(train, num_classes, config, task="segmentation", init=init, cases=chosen),
    )
    scores = _score(model, test, num_classes, tuple(train.crop), folder, device)
    record = {"cases": chosen, "dice": scores, "steps": result.step}
    atomic_write_text(folder / RESULT_FILE, json.dumps(record, indent=2) + "\n")
    return record


def _score(model, test, num_classes: int, crop: tuple[int, ...], folder: Path, device) -> dict:
    """Dice of every foreground class per test case; the predicted masks written beside."""
    from medfusion.data.pairs import write_prediction

    per_case = {}
    for index in range(len(test)):
        item = test[index]
        image = item["image"].unsqueeze(0).to(device)
        predicted = predict_masks(model, image, crop).cpu()
        scores = dice_per_class(predicted, item["mask"].unsqueeze(0), num_classes)[0]
        per_case[Path(str(item["path"])).name] = [
            None if math.isnan(v) else float(v) for v in scores.tolist()
        ]
        write_prediction(test, index, predicted[0], folder / "predictions")
    return per_case


def _case_mean(scores: list[float | None]) -> float | None:
    values = [v for v in scores if v is not None]
    return sum(values) / len(values) if values else None


def summarize(runs: Mapping[str, dict], inits: Sequence[str], num_classes: int) -> dict:
    """Per count and init: the mean Dice over the foreground classes and test cases of each seed's
    model, their mean and standard deviation over seeds, and per class the same."""
    table: dict[str, dict] = {}
    for run in runs.values():
        entry = table.setdefault(str(run["n"]), {}).setdefault(run["init"], {"seeds": [], "per_class": []})
        cases = list(run["dice"].values())
        entry["seeds"].append(_mean([_case_mean(c) for c in cases]))
        entry["per_class"].append([_mean([c[k] for c in cases]) for k in range(num_classes - 1)])
    for per_init in table.values():
        for entry in per_init.values():
            entry["mean"], entry["std"] = _mean_std(entry["seeds"])
            columns = list(zip(*entry["per_class"])) if entry["per_class"] else []
            entry["class_mean"] = [_mean_std(list(column))[0] for column in columns]
    return {n: {init: table[n][init] for init in inits if init in table[n]} for n in table}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    kept = [v for v in values if v is not None]
    if not kept:
        return None, None
    return float(np.mean(kept)), float(np.std(kept, ddof=1)) if len(kept) > 1 else 0.0


def _text(mean: float | None, std: float | None) -> str:
    return "–" if mean is None else f"{mean:.3f} ± {std:.3f}"


def table_lines(table: dict, inits: Sequence[str]) -> list[str]:
    """The Dice table as text: one row per labelled count, one column per initialisation."""
    width = max(16, *(len(i) + 2 for i in inits))
    lines = [
        "",
        "mean Dice over foreground classes and test cases (± std over seeds)",
        f"{'labelled':<10}" + "".join(f"{init:>{width}}" for init in inits),
    ]
    for n, per_init in table.items():
        cells = "".join(
            f"{_text(per_init[i]['mean'], per_init[i]['std']) if i in per_init else '–':>{width}}"
            for i in inits
        )
        lines.append(f"{n:<10}{cells}")
    return lines


def _overlays(runs: Mapping[str, dict], test, out: Path, device, crop: tuple[int, ...]) -> dict[str, str]:
    """Per initialisation, at the largest count and the first seed: the first test case with its
    predicted mask over it, beside the true mask (PNG data URIs)."""
    from medfusion.metrics.report import png_data_uri

    if not runs:
        return {}
    largest = max(run["n"] for run in runs.values())
    first_seed = min(run["seed"] for run in runs.values())
    item = test[0]
    overlays = {}
    for name, run in runs.items():
        if run["n"] != largest or run["seed"] != first_seed:
            continue
        model, config = load_segmenter(out / "finetune" / name / MODEL_DIR, device)
        predicted = predict_masks(model, item["image"].unsqueeze(0).to(device), crop).cpu()[0]
        pictures = [
            _overlay(item["image"], predicted, config["out_channels"]),
            _overlay(item["image"], item["mask"], config["out_channels"]),
        ]
        overlays[run["init"]] = png_data_uri(torch.stack(pictures), nrow=2)
    return overlays


PALETTE = torch.tensor(
    [[0.0, 0.0, 0.0], [0.9, 0.2, 0.2], [0.2, 0.5, 0.95], [0.2, 0.8, 0.3], [0.95, 0.75, 0.1]]
)


def _overlay(image: torch.Tensor, mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The image (first channel, grey) with the classes tinted, RGB in [-1, 1]; volumes: the
    middle slice."""
    grey = image[0].float()
    labels = mask.long()
    if grey.ndim == 3:
        grey, labels = grey[grey.shape[0] // 2], labels[labels.shape[0] // 2]
    grey = (grey - grey.min()) / (grey.max() - grey.min() + 1e-8)
    rgb = grey.expand(3, *grey.shape).clone()
    colours = PALETTE[1 + (labels.clamp(min=1) - 1) % (len(PALETTE) - 1)].permute(2, 0, 1)
    tinted = 0.55 * rgb + 0.45 * colours
    rgb = torch.where(labels.unsqueeze(0) > 0, tinted, rgb)
    return rgb * 2 - 1


def _curve(table: dict, inits: Sequence[str], width: int = 460, height: int = 280) -> str:
    """Mean Dice (y) against labelled cases (x, log scale), one line per initialisation, with
    ± std bars."""
    margin = 44
    counts = sorted(int(n) for n in table)
    if not counts:
        return ""
    low, high = math.log(max(1, counts[0])), math.log(max(counts[-1], counts[0] + 1))

    def x(n: int) -> float:
        return margin + (math.log(max(1, n)) - low) / (high - low or 1) * (width - 2 * margin)

    def y(value: float) -> float:
        return height - margin - value * (height - 2 * margin)

    parts = [
        f'<rect x="{margin}" y="{margin}" width="{width - 2 * margin}" height="{height - 2 * margin}" '
        'fill="none" stroke="#999"/>'
    ]
    for n in counts:
        parts.append(
            f'<text x="{x(n):.1f}" y="{height - margin + 16}" font-size="11" text-anchor="middle">{n}</text>'
        )
    for t in (0, 0.5, 1):
        parts.append(
            f'<text x="{margin - 6}" y="{y(t) + 4:.1f}" font-size="11" text-anchor="end">{t:g}</text>'
        )
    labels: list[tuple[float, str, str]] = []  # (y, text, colour) at the right end of each line
    for index, init in enumerate(inits):
        colour = ("#333", "#c0392b", "#1f6fb2", "#1e8449", "#8e44ad")[index % 5]
        points = [
            (x(n), y(table[str(n)][init]["mean"]), table[str(n)][init]["std"] or 0.0)
            for n in counts
            if init in table.get(str(n), {}) and table[str(n)][init]["mean"] is not None
        ]
        if not points:
            continue
        path = " ".join(f"{px:.1f},{py:.1f}" for px, py, _ in points)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for px, py, std in points:
            span = std * (height - 2 * margin)
            parts.append(
                f'<line x1="{px:.1f}" y1="{py - span:.1f}" x2="{px:.1f}" y2="{py + span:.1f}" '
                f'stroke="{colour}"/><circle cx="{px:.1f}" cy="{py:.1f}" r="3.5" fill="{colour}"/>'
            )
        labels.append((points[-1][1] + 4, init, colour))
    placed = -math.inf
    for label_y, init, colour in sorted(labels):  # top to bottom, at least a line apart
        placed = max(label_y, placed + LABEL_GAP)
        parts.append(
            f'<text x="{width - margin + 4}" y="{placed:.1f}" font-size="12" fill="{colour}">'
            f"{html.escape(init)}</text>"
        )
    parts.append(
        f'<text x="{width / 2}" y="{height - 8}" font-size="12" text-anchor="middle">labelled cases</text>'
    )
    return f'<svg width="{width + 80}" height="{height}" xmlns="http://www.w3.org/2000/svg">{"".join(parts)}</svg>'


def segmentation_html(summary: dict, overlays: Mapping[str, str]) -> str:
    """The self-contained report: table, learning curve, overlays (data URIs, inline SVG, no script)."""
    table, inits = summary["table"], [SCRATCH, *summary["pretrain"]]
    head = "".join(f"<th>{html.escape(i)}</th>" for i in inits)
    rows = []
    for n, per_init in table.items():
        best = max((e["mean"] for e in per_init.values() if e["mean"] is not None), default=None)
        cells = []
        for init in inits:
            entry = per_init.get(init)
            if entry is None or entry["mean"] is None:
                cells.append("<td>–</td>")
                continue
            classes = ", ".join("–" if v is None else f"{v:.3f}" for v in entry["class_mean"])
            bold = " class='best'" if entry["mean"] == best and len(per_init) > 1 else ""
            cells.append(
                f"<td{bold}>{_text(entry['mean'], entry['std'])}<div class='note'>per class: {classes}"
                "</div></td>"
            )
        rows.append(f"<tr><td>{html.escape(n)}</td>{''.join(cells)}</tr>")
    figures = "".join(
        f"<figure><img src='{uri}' alt='{html.escape(init)}'><figcaption>{html.escape(init)}: "
        "predicted | true</figcaption></figure>"
        for init, uri in overlays.items()
    )
    sources = "".join(
        f"<li>{html.escape(k)}: <code>{html.escape(v)}</code></li>" for k, v in summary["pretrain"].items()
    )
    style = (
        "body{font-family:system-ui,sans-serif;margin:24px;max-width:1200px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}.note{color:#555;font-size:85%}"
        ".best{background:#e8f5e9;font-weight:bold}figure{display:inline-block;margin:8px}"
        "img{width:320px;image-rendering:pixelated}"
    )
    title = "medfusion segment"
    return "\n".join(
        [
            f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title><style>{style}</style>",
            "</head><body><h1>Segmentation with few labels: from scratch and pretrained</h1>",
            f"<p>Labelled pairs <code>{html.escape(summary['images'])}</code> · test <code>"
            f"{html.escape(summary['test_images'])}</code> · {summary['spatial_dims']}D · "
            f"{summary['num_classes']} classes (background included) · {summary['seeds']} seed(s) per "
            f"count · {html.escape(summary['created'])}</p>",
            "<p>Pretraining sources (restoration of corrupted images):</p>",
            f"<ul>{sources or '<li>none</li>'}</ul>",
            f"<p class='note'>{html.escape(summary['note'])}.</p>",
            "<h2>Dice on the test pairs</h2>",
            "<p class='note'>Mean Dice over the foreground classes and the test cases, mean ± std over "
            "seeds (each seed draws its labelled cases and initialises its network); the same cases and "
            "steps for every initialisation.</p>",
            f"<table><tr><th>labelled cases</th>{head}</tr>{''.join(rows)}</table>",
            "<h2>Learning curve</h2>",
            _curve(table, inits),
            "<h2>Predictions on a test case</h2>",
            figures or "<p>none</p>",
            "</body></html>",
        ]
    )
