"""``medfusion classify``: differentially private classifiers, from scratch and pretrained on
synthetic images. 2D and 3D.

For every privacy budget ``epsilon`` (``inf``: no privacy), every seed and every initialisation the
same group-norm DenseNet (:func:`~medfusion.downstream.classifier.build_classifier`) is trained on
the real training folder with DP-SGD and scored on a held-out real folder:

1. **Pretraining** (with ``pretrain``: a ``medfusion sample`` folder), once per seed and reused by
   every ``epsilon``: non-private training on the synthetic images. Their classes must be classes of
   the training folder (a subset is fine; the network always has the training folder's classes).
2. **Training** on the real images: from the seed's initial weights (``scratch``) and from the
   seed's pretrained weights (``pretrained``, every layer fine-tuned), with the same epochs,
   optimizer and schedule. A finite ``epsilon`` trains with Opacus: Poisson sampling of the
   logical batches (expected size ``batch_size``), split into physical batches of at most
   ``max_physical_batch_size`` by Opacus' ``BatchMemoryManager``; per-sample gradients clipped to
   ``max_grad_norm``; Gaussian noise whose multiplier Opacus calibrates so that ``epochs`` epochs
   spend ``epsilon`` at ``delta`` (``make_private_with_epsilon``). ``epsilon = inf`` trains the
   same network without Opacus: shuffled batches of ``batch_size``, exactly plain training.
3. **Scoring** on the test folder: AUROC (macro and per class, one-vs-rest), accuracy and balanced
   accuracy; the table holds their mean and standard deviation over seeds.

Privacy: the guarantee covers the real training images (``data``) only. Pretraining on synthetic
images is private with respect to the fine-tuning data only: the generator that made them saw its
own training images, so unless it was itself trained with differential privacy, the pipeline as a
whole gives those images no formal guarantee. The random numbers (sampling and noise) come from
seeded generators, not Opacus' ``secure_mode``: right for experiments, not for a release.

Why not the shared training loop (:mod:`medfusion.training.loop`, Accelerate): DP-SGD needs Opacus to
wrap the model (per-sample gradients), the optimizer (clipping, noise, the accountant's hook) and
the data loader (Poisson sampling) together, and the accountant's steps must be exactly the
optimizer's; so this module has its own small loop, in memory (each folder is read once into a
tensor), on one device.

Everything lands in ``out``::

    OUT/settings.json                    the data and settings (a rerun must give the same ones)
    OUT/pretrain/seed0/model/            config.json + model.safetensors of a pretrained network
    OUT/pretrain/seed0/result.json       its scores on the test folder (train synthetic, test real)
    OUT/runs/eps1-seed0-scratch/model/   config.json (network, privacy spent) + model.safetensors
    OUT/runs/eps1-seed0-scratch/result.json  privacy spent, per-epoch epsilon and loss, scores
    OUT/classification.json              settings, every run, the table
    OUT/classification.html              the table and the AUROC-vs-epsilon curve (self-contained)

A finished run (``result.json`` there) is reused when the command runs again into the same ``out``;
other epsilons or seeds may be added then, but the data and settings must stay (``force``: start
over).
"""

from __future__ import annotations

import contextlib
import html
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from medfusion import __version__
from medfusion.config import Config, DataConfig
from medfusion.downstream.classifier import (
    ClassifierConfig,
    TensorClassDataset,
    build_classifier,
    classification_metrics,
    predict,
)
from medfusion.runlock import earlier_settings, run_lock
from medfusion.utils import MAX_SEED, atomic_dir, atomic_write_text

DP_INSTALL = 'pip install "medfusion[dp]"'
ACCOUNTANTS = ("prv", "rdp")
LR_SCHEDULES = ("cosine", "constant")
SCRATCH, PRETRAINED = "scratch", "pretrained"
METRICS = ("auroc", "balanced_accuracy", "accuracy")
METRIC_TITLES = {"auroc": "AUROC", "balanced_accuracy": "balanced accuracy", "accuracy": "accuracy"}
# delta None: 1 / (DELTA_DIVISOR * N), well below the 1/N at which releasing one record in full
# would already meet (epsilon, delta)
DELTA_DIVISOR = 10
# the network fields of ClassifierConfig (its max_steps, batch_size, learning_rate, weight_decay and
# seed are those of the TSTR fit and are not used here)
NETWORK_FIELDS = ("init_features", "growth_rate", "block_config", "bottleneck_factor", "num_groups")
SETTINGS_FILE = "settings.json"
SUMMARY_FILE = "classification.json"
REPORT_FILE = "classification.html"
RESULT_FILE = "result.json"
MODEL_DIR = "model"
RUNS_DIR = "runs"
PRETRAIN_DIR = "pretrain"
INF_TEXT = "inf"  # how JSON files write an infinite epsilon (JSON has no infinity)
# Opacus' warnings that say nothing about a run here: seeded (not secure) random numbers are the
# documented choice, the backward hook fires on the input layer, the RDP search hits its last order
QUIET_WARNINGS = (
    "Secure RNG turned off",
    "Full backward hook is firing",
    "Optimal order is the largest alpha",
)
NOTE = (
    "Pretraining on synthetic data is private with respect to the fine-tuning data only: the "
    "generator that made the synthetic images was trained on real images, and unless the generator "
    "itself was trained with differential privacy, those images get no formal guarantee."
)


@dataclass(frozen=True)
class ClassifyConfig(Config):
    """Everything ``medfusion classify`` needs (a YAML file has these sections and keys).

    Attributes:
        data: how files become tensors (every folder alike; resized to ``data.resize`` or else to
            the size of the first training image).
        classifier: the network (only its network fields: ``init_features``, ``growth_rate``,
            ``block_config``, ``bottleneck_factor``, ``num_groups``).
        epochs: passes over the real training images of every run (private or not).
        batch_size: the logical batch: the expected batch of Poisson sampling (sample rate
            ``1 / ceil(N / batch_size)``), the batch of non-private training.
        max_physical_batch_size: the most images one forward pass takes (a larger logical batch is
            split, by Opacus' ``BatchMemoryManager`` when private); bounds the memory.
        learning_rate: of Adam (the same optimizer with and without privacy).
        lr_schedule: ``cosine`` (decay over the epochs, stepped once per epoch) or ``constant``.
        max_grad_norm: every per-sample gradient is clipped to this L2 norm (all parameters
            together).
        delta: the delta of (epsilon, delta)-DP; None: ``1 / (10 N)`` for ``N`` training images.
        accountant: ``prv`` (tighter) or ``rdp``: calibrates the noise and reports the epsilon spent.
        pretrain_epochs: passes over the synthetic images when pretraining (non-private, the same
            optimizer, schedule and batches).
    """

    data: DataConfig = field(default_factory=DataConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    epochs: int = 15
    batch_size: int = 128
    max_physical_batch_size: int = 64
    learning_rate: float = 1e-2
    lr_schedule: str = "cosine"
    max_grad_norm: float = 1.0
    delta: float | None = None
    accountant: str = "prv"
    pretrain_epochs: int = 20

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "max_physical_batch_size", "pretrain_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
        for name in ("learning_rate", "max_grad_norm"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0; got {value!r}")
        if self.delta is not None and not (isinstance(self.delta, int | float) and 0 < self.delta < 1):
            raise ValueError(f"delta must lie in (0, 1) (or None: 1/(10 N)); got {self.delta!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}; got {self.accountant!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}; got {self.lr_schedule!r}")

    def network(self) -> dict[str, Any]:
        """The network fields of ``classifier`` (what a saved model's ``config.json`` holds)."""
        full = self.classifier.to_dict()
        return {name: full[name] for name in NETWORK_FIELDS}


# --- inputs -------------------------------------------------------------------------------------
def parse_epsilons(text: str | Sequence[float | str]) -> tuple[float, ...]:
    """``1,8,inf`` (or a sequence) as privacy budgets: numbers > 0 and ``inf``, sorted, inf last."""
    items = text.split(",") if isinstance(text, str) else list(text)
    epsilons: list[float] = []
    for item in items:
        word = str(item).strip().lower()
        if word in ("inf", "infinity", "∞"):
            epsilons.append(math.inf)
            continue
        try:
            value = float(word)
        except ValueError:
            raise ValueError(f"epsilons: {item!r} is not a number or 'inf'; give e.g. 1,8,inf") from None
        if math.isnan(value) or value <= 0:
            raise ValueError(f"epsilons: every epsilon must be > 0 (or inf); got {item!r}")
        epsilons.append(value)
    if not epsilons or len(set(epsilons)) != len(epsilons):
        raise ValueError(f"epsilons: give one or more distinct values, e.g. 1,8,inf; got {text!r}")
    return tuple(sorted(epsilons))


def epsilon_key(epsilon: float) -> str:
    """How run names and tables write an epsilon: ``1``, ``0.5``, ``inf``."""
    return INF_TEXT if math.isinf(epsilon) else f"{epsilon:g}"


def require_opacus() -> None:
    """Raise an ``ImportError`` saying how to install Opacus when it is missing."""
    try:
        import opacus  # noqa: F401
    except ImportError as e:
        raise ImportError(f"differentially private training needs Opacus: {DP_INSTALL}") from e


def check_private_model(model: nn.Module) -> None:
    """Raise ``ValueError`` naming every layer DP-SGD cannot train: those Opacus' validators reject
    (batch norm mixes the samples of a batch) and in-place activations (they break the per-sample
    gradient hooks)."""
    require_opacus()
    from opacus.validators import ModuleValidator

    problems = []
    for name, module in model.named_modules():
        validator = ModuleValidator.VALIDATORS.get(type(module))
        for error in validator(module) if validator is not None else ():
            reason = str(error).split(". ")[0].strip()
            problems.append(f"{name or '(the model)'} ({type(module).__name__}): {reason}")
        if getattr(module, "inplace", False) is True:
            problems.append(f"{name} ({type(module).__name__}): an in-place activation")
    if problems:
        raise ValueError(
            "model: layers that cannot be trained with differential privacy: "
            + "; ".join(problems)
            + ". Use group norm instead of batch norm (opacus.validators.ModuleValidator.fix does it) and "
            "out-of-place activations"
        )


def open_classify_folders(
    data: str | os.PathLike,
    test: str | os.PathLike,
    pretrain: str | os.PathLike | None,
    config: DataConfig,
    progress: bool = False,
) -> tuple[dict[str, TensorClassDataset], tuple[int, ...]]:
    """Open the folders alike, check their classes and read them into memory.

    ``test`` and ``pretrain`` must hold classes of ``data`` (a subset is fine); their labels are
    mapped to ``data``'s class indices, so every dataset returned has ``data``'s class names.

    Returns:
        The datasets (``data``, ``test`` and, when given, ``pretrain``) and the image size.
    """
    from medfusion.data.dataset import open_alike

    folders = {"data": Path(data), "test": Path(test)}
    if pretrain is not None:
        folders["pretrain"] = Path(pretrain)
    for name, folder in folders.items():
        if not folder.is_dir():
            raise FileNotFoundError(f"{name} {folder}: not a folder")
    datasets, size = open_alike(folders, config)
    classes = list(datasets["data"].class_names)
    if len(classes) < 2:
        raise ValueError(
            f"data {data}: a classifier needs at least 2 classes (first-level subfolders or data.labels); "
            f"found {classes}"
        )
    for name, dataset in datasets.items():
        absent = sorted(set(dataset.class_names) - set(classes))
        if not dataset.class_names or absent:
            raise ValueError(
                f"{name} {folders[name]}: class(es) {absent or 'none (no class subfolders)'} are not "
                f"classes of data {data}: {classes}; {name} must hold <class>/<file> with classes of data"
            )
        if min(dataset.labels) < 0:
            raise ValueError(f"{name} {folders[name]}: holds images outside any class subfolder")
    tensors = {}
    for name, dataset in datasets.items():
        read = TensorClassDataset.read(dataset, progress=progress)
        to_data = torch.tensor([classes.index(c) for c in read.class_names])
        tensors[name] = TensorClassDataset(read.images, to_data[read.labels], classes)
    return tensors, tuple(size)


def resolve_delta(config: ClassifyConfig, n_train: int, warn: bool = True) -> float:
    """``config.delta``, or ``1 / (10 N)``; warns (with ``warn``) when delta >= 1/N, too weak to
    mean anything."""
    delta = config.delta if config.delta is not None else 1.0 / (DELTA_DIVISOR * n_train)
    if warn and delta >= 1.0 / n_train:
        warnings.warn(
            f"delta {delta:g} >= 1/N for N = {n_train} training images: a mechanism that publishes one "
            "record in full meets such a delta; choose delta < 1/N (default 1/(10 N))",
            stacklevel=2,
        )
    return delta


# --- training -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PrivateFit:
    """One trained classifier and what its training spent.

    Attributes:
        model: the trained network, in eval mode, free of Opacus' hooks.
        target_epsilon: the budget asked for (inf: non-private training).
        epsilon: the epsilon spent at ``delta`` per the accountant (inf when non-private).
        epsilon_per_epoch: the epsilon spent after each epoch.
        loss_per_epoch: mean training cross-entropy of each epoch.
        delta, noise_multiplier, max_grad_norm, sample_rate, accountant: the privacy parameters
            (noise 0 and no clipping when non-private).
        steps: optimizer steps (logical batches) taken.
        epochs: passes over the data.
    """

    model: nn.Module
    target_epsilon: float
    epsilon: float
    epsilon_per_epoch: tuple[float, ...]
    loss_per_epoch: tuple[float, ...]
    delta: float
    noise_multiplier: float
    max_grad_norm: float | None
    sample_rate: float
    steps: int
    epochs: int
    accountant: str | None

    def privacy(self) -> dict[str, Any]:
        """The privacy parameters as plain values (``inf`` written as ``"inf"``)."""
        return _json_safe(
            {
                "private": math.isfinite(self.target_epsilon),
                "target_epsilon": self.target_epsilon,
                "epsilon": self.epsilon,
                "delta": self.delta,
                "noise_multiplier": self.noise_multiplier,
                "max_grad_norm": self.max_grad_norm,
                "sample_rate": self.sample_rate,
                "steps": self.steps,
                "epochs": self.epochs,
                "accountant": self.accountant,
            }
        )


@dataclass(frozen=True)
class PrivateTraining:
    """The objects Opacus makes private together (see :func:`make_private`)."""

    engine: Any  # opacus.PrivacyEngine
    module: nn.Module  # the model wrapped for per-sample gradients
    optimizer: Any  # opacus.optimizers.DPOptimizer: clips, adds noise, steps the accountant
    loader: torch.utils.data.DataLoader  # Poisson sampling of logical batches of (images, labels)

    @property
    def noise_multiplier(self) -> float:
        return float(self.optimizer.noise_multiplier)

    @property
    def sample_rate(self) -> float:
        return 1.0 / len(self.loader)

    @property
    def steps(self) -> int:
        return sum(count for _, _, count in self.engine.accountant.history)


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: TensorClassDataset,
    config: ClassifyConfig,
    epsilon: float,
    delta: float,
    epochs: int,
    seed: int,
) -> PrivateTraining:
    """Make ``model``, ``optimizer`` and a loader over ``data`` private with Opacus, the noise
    calibrated so that ``epochs`` epochs spend ``epsilon`` at ``delta``.

    The noise comes from a generator seeded with ``seed``; the Poisson sampling draws from torch's
    global generator (seed it for a reproducible order).
    """
    require_opacus()
    from opacus import PrivacyEngine

    check_private_model(model)
    dataset = torch.utils.data.TensorDataset(data.images, data.labels)
    loader = torch.utils.data.DataLoader(dataset, batch_size=min(config.batch_size, len(data)))
    device = next(model.parameters()).device
    noise = torch.Generator(device=device).manual_seed(seed)
    with _quiet_opacus():
        engine = PrivacyEngine(accountant=config.accountant)
        module, optimizer, loader = engine.make_private_with_epsilon(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            target_epsilon=epsilon,
            target_delta=delta,
            epochs=epochs,
            max_grad_norm=config.max_grad_norm,
            poisson_sampling=True,
            noise_generator=noise,
        )
    return PrivateTraining(engine, module, optimizer, loader)


def train_private(
    data: TensorClassDataset,
    config: ClassifyConfig,
    epsilon: float,
    delta: float,
    seed: int,
    epochs: int | None = None,
    init_state: Mapping[str, torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    callback: Callable[[dict], None] | None = None,
    desc: str = "classifier",
) -> PrivateFit:
    """Train a classifier on ``data`` with DP-SGD (finite ``epsilon``) or plainly (``inf``).

    The initial weights come from ``seed`` (``torch.manual_seed(seed)`` then
    :func:`build_classifier`), or from ``init_state``; the data order (a ``torch.randperm`` per
    epoch when non-private, Poisson sampling when private) and the noise follow ``seed`` too, so
    a run on the CPU is reproducible. Adam, cross-entropy; ``lr_schedule`` steps once per epoch.

    Args:
        data: images ``(N, C, *spatial)`` and labels, in memory.
        config: network, optimizer, batches, clipping, accountant.
        epsilon: the privacy budget of the whole training (``math.inf``: non-private).
        delta: the delta of (epsilon, delta)-DP (recorded when non-private).
        seed: of the weights, the data order and the noise.
        epochs: passes over ``data``; default ``config.epochs``.
        init_state: weights to start from (e.g. pretrained), instead of the seed's.
        device: where to train.
        progress: an epoch progress bar.
        callback: receives ``{"epoch", "epochs", "loss", "epsilon"}`` after each epoch.
        desc: the progress bar's label.

    Returns:
        The trained model and the privacy it spent.
    """
    epochs = config.epochs if epochs is None else epochs
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1; got {epochs!r}")
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0 (or inf); got {epsilon}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1); got {delta}")
    spatial = tuple(data.images.shape[2:])
    if len(spatial) not in (2, 3) or min(spatial) < config.classifier.min_size:
        raise ValueError(
            f"images of size {spatial} are too small for block_config "
            f"{list(config.classifier.block_config)}: every axis needs at least "
            f"{config.classifier.min_size} voxels"
        )
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_classifier(len(spatial), data.images.shape[1], data.num_classes, config.classifier)
        if init_state is not None:
            model.load_state_dict(init_state)
        model = model.to(device).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config.lr_schedule, epochs))
        bar = tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress, leave=False)
        if math.isfinite(epsilon):
            return _train_dp(
                model, optimizer, schedule, data, config, epsilon, delta, epochs, seed, bar, callback
            )
        return _train_plain(model, optimizer, schedule, data, config, delta, epochs, bar, callback)


def _schedule(kind: str, epochs: int) -> Callable[[int], float]:
    """The learning-rate factor of each epoch."""
    if kind == "cosine":
        return lambda epoch: 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    if kind == "constant":
        return lambda epoch: 1.0
    raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}; got {kind!r}")


def _train_plain(model, optimizer, schedule, data, config, delta, epochs, bar, callback) -> PrivateFit:
    """Shuffled batches of ``batch_size`` (the last one smaller), each split into physical batches
    whose mean losses are weighted by their share of the batch."""
    n, batch = len(data), min(config.batch_size, len(data))
    device = next(model.parameters()).device
    losses, steps = [], 0
    for epoch in bar:
        order = torch.randperm(n)
        total = 0.0
        for start in range(0, n, batch):
            indices = order[start : start + batch]
            optimizer.zero_grad(set_to_none=True)
            for chunk in indices.split(config.max_physical_batch_size):
                images = data.images[chunk].to(device)  # (B, C, *spatial)
                labels = data.labels[chunk].to(device)  # (B,)
                loss = F.cross_entropy(model(images), labels) * (len(chunk) / len(indices))
                _check_finite(loss, epoch)
                loss.backward()
                total += loss.item() * len(indices)
            optimizer.step()
            steps += 1
        schedule.step()
        losses.append(total / n)
        _report(bar, callback, epoch, epochs, losses[-1], math.inf)
    return PrivateFit(
        model=model.eval(),
        target_epsilon=math.inf,
        epsilon=math.inf,
        epsilon_per_epoch=(math.inf,) * epochs,
        loss_per_epoch=tuple(losses),
        delta=delta,
        noise_multiplier=0.0,
        max_grad_norm=None,
        sample_rate=batch / n,
        steps=steps,
        epochs=epochs,
        accountant=None,
    )


def _train_dp(model, optimizer, schedule, data, config, epsilon, delta, epochs, seed, bar, callback):
    """DP-SGD: Poisson-sampled logical batches, physical batches by ``BatchMemoryManager``."""
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    private = make_private(model, optimizer, data, config, epsilon, delta, epochs, seed)
    module, dp_optimizer = private.module, private.optimizer
    device = next(model.parameters()).device
    losses, spent = [], []
    dp_optimizer.zero_grad(set_to_none=True)
    with _quiet_opacus():
        for epoch in bar:
            total, seen = 0.0, 0
            with BatchMemoryManager(
                data_loader=private.loader,
                max_physical_batch_size=config.max_physical_batch_size,
                optimizer=dp_optimizer,
            ) as batches:
                for images, labels in batches:
                    images, labels = images.to(device), labels.to(device)  # (B, C, *spatial), (B,)
                    loss = F.cross_entropy(module(images), labels)  # NaN for an empty batch (no samples)
                    loss.backward()
                    dp_optimizer.step()  # clips; adds noise and steps at the end of a logical batch
                    dp_optimizer.zero_grad(set_to_none=True)
                    if len(labels):
                        _check_finite(loss, epoch)
                        total, seen = total + loss.item() * len(labels), seen + len(labels)
            schedule.step()
            losses.append(total / max(seen, 1))
            spent.append(float(private.engine.get_epsilon(delta)))
            _report(bar, callback, epoch, epochs, losses[-1], spent[-1])
    fit = PrivateFit(
        model=model,
        target_epsilon=float(epsilon),
        epsilon=spent[-1],
        epsilon_per_epoch=tuple(spent),
        loss_per_epoch=tuple(losses),
        delta=delta,
        noise_multiplier=private.noise_multiplier,
        max_grad_norm=config.max_grad_norm,
        sample_rate=private.sample_rate,
        steps=private.steps,
        epochs=epochs,
        accountant=config.accountant,
    )
    module.to_standard_module()  # removes the hooks and the per-sample gradients from ``model``
    model.zero_grad(set_to_none=True)
    model.eval()
    return fit


def _check_finite(loss: torch.Tensor, epoch: int) -> None:
    if not torch.isfinite(loss):
        raise RuntimeError(f"the classifier loss is {loss.item()} in epoch {epoch + 1}; lower learning_rate")


def _report(bar, callback, epoch: int, epochs: int, loss: float, epsilon: float) -> None:
    bar.set_postfix(loss=f"{loss:.3f}", eps=f"{epsilon:.2f}", refresh=False)
    if callback is not None:
        callback({"epoch": epoch + 1, "epochs": epochs, "loss": loss, "epsilon": epsilon})


@contextlib.contextmanager
def _quiet_opacus() -> Iterator[None]:
    """Hide :data:`QUIET_WARNINGS` (and only those)."""
    with warnings.catch_warnings():
        for message in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=f".*{message}", category=UserWarning)
        yield


# --- scoring, saving ----------------------------------------------------------------------------
def score(model: nn.Module, test: TensorClassDataset, device: torch.device | str = "cpu") -> dict:
    """AUROC (macro and per class, one-vs-rest), accuracy, balanced accuracy and per-class recall of
    ``model`` on ``test``; a class absent from ``test`` has NaN for its AUROC and recall."""
    from torchmetrics.functional.classification import binary_auroc

    probs = predict(model, test.images, device=device).double().softmax(dim=1)  # (N, K)
    labels = test.labels
    metrics = classification_metrics(probs, labels, test.num_classes)
    per_class = {}
    for c, name in enumerate(test.class_names):
        positive = labels == c
        count = int(positive.sum())
        per_class[name] = (
            float(binary_auroc(probs[:, c], positive.long())) if 0 < count < len(labels) else math.nan
        )
    return {
        "auroc": metrics["auroc"],
        "balanced_accuracy": metrics["balanced_accuracy"],
        "accuracy": metrics["accuracy"],
        "auroc_per_class": per_class,
        "recall_per_class": dict(zip(test.class_names, metrics["recall_per_class"])),
    }


def save_classifier(folder: str | os.PathLike, model: nn.Module, config: Mapping[str, Any]) -> Path:
    """``config.json`` (what :func:`load_classifier` builds from) and ``model.safetensors``, atomically."""
    from safetensors.torch import save_file

    folder = Path(folder)
    with atomic_dir(folder, overwrite=True) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(_json_safe(config), indent=2) + "\n", encoding="utf-8")
    return folder


def load_classifier(folder: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """A classifier saved by :func:`save_classifier`: built from its JSON, weights from safetensors
    (nothing from the folder is executed). Returns the model (eval mode) and its config."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    network = ClassifierConfig.from_dict(config["network"], source=str(folder / "config.json"))
    model = build_classifier(config["spatial_dims"], config["in_channels"], config["num_classes"], network)
    model.load_state_dict(load_file(str(folder / "model.safetensors"), device=str(device)))
    return model.to(device).eval(), config


def _json_safe(value: Any) -> Any:
    """Plain JSON: infinite floats as ``"inf"``, NaN as null, tuples as lists."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return INF_TEXT if math.isinf(value) else value
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


# --- the experiment -----------------------------------------------------------------------------
@dataclass
class ClassifyResult:
    """What :func:`run_classify` did: the folder, the report, the table and every run's record."""

    out: Path
    report: Path
    table: dict
    runs: dict[str, dict]


@dataclass
class _Experiment:
    """The data and settings every run of one :func:`run_classify` shares."""

    out: Path
    datasets: dict[str, TensorClassDataset]
    size: tuple[int, ...]
    config: ClassifyConfig
    delta: float
    device: str
    progress: bool
    log: Callable[[str], None]
    pretrained: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        return list(self.datasets["data"].class_names)

    def model_config(self, fit: PrivateFit, init: str, seed: int) -> dict:
        data = self.datasets["data"]
        c = self.config
        return {
            "kind": "classifier",
            "spatial_dims": data.images.ndim - 2,
            "in_channels": data.images.shape[1],
            "num_classes": data.num_classes,
            "classes": self.classes,
            "image_size": list(self.size),
            "network": c.network(),
            "init": init,
            "seed": seed,
            "training": {
                "optimizer": "adam",
                "learning_rate": c.learning_rate,
                "lr_schedule": c.lr_schedule,
                "batch_size": c.batch_size,
                "max_physical_batch_size": c.max_physical_batch_size,
            },
            "privacy": fit.privacy(),
        }

    def fit(self, name: str, data: TensorClassDataset, epsilon: float, seed: int, epochs: int, init=None):
        def epoch_line(record: dict) -> None:
            spent = "" if math.isinf(record["epsilon"]) else f", epsilon spent {record['epsilon']:.3f}"
            self.log(f"  {name} epoch {record['epoch']}/{record['epochs']}: loss {record['loss']:.4f}{spent}")

        return train_private(
            data,
            self.config,
            epsilon,
            self.delta,
            seed,
            epochs=epochs,
            init_state=init,
            device=self.device,
            progress=self.progress,
            callback=epoch_line,
            desc=name,
        )

    def pretrain(self, seed: int) -> dict[str, torch.Tensor]:
        """The seed's pretrained weights: trained now, or read from ``OUT/pretrain/seedS/model``."""
        if seed in self.pretrained:
            return self.pretrained[seed]
        folder = self.out / PRETRAIN_DIR / f"seed{seed}"
        if (folder / RESULT_FILE).is_file() and (folder / MODEL_DIR / "config.json").is_file():
            model, _ = load_classifier(folder / MODEL_DIR)
        else:
            epochs = self.config.pretrain_epochs
            self.log(
                f"# pretraining seed {seed} on {len(self.datasets['pretrain'])} synthetic images "
                f"({epochs} epochs)"
            )
            fit = self.fit(f"pretrain-seed{seed}", self.datasets["pretrain"], math.inf, seed, epochs)
            model = fit.model
            save_classifier(folder / MODEL_DIR, model, self.model_config(fit, "synthetic", seed))
            metrics = score(model, self.datasets["test"], self.device)
            record = _json_safe({"seed": seed, "epochs": epochs, "metrics": metrics})
            atomic_write_text(folder / RESULT_FILE, json.dumps(record, indent=2) + "\n")
            self.log(f"pretrain seed {seed} (train synthetic, test real): {_scores_text(metrics)}")
        self.pretrained[seed] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        return self.pretrained[seed]

    def run(self, epsilon: float, seed: int, init: str) -> dict:
        """One run's record: read from its finished folder, or trained, scored and saved now."""
        name = f"eps{epsilon_key(epsilon)}-seed{seed}-{init}"
        folder = self.out / RUNS_DIR / name
        if (folder / RESULT_FILE).is_file():
            self.log(f"{name}: finished earlier, reused")
            return json.loads((folder / RESULT_FILE).read_text(encoding="utf-8"))
        if folder.exists():  # an interrupted run: start it again
            shutil.rmtree(folder)
        start = time.perf_counter()
        weights = self.pretrain(seed) if init == PRETRAINED else None
        fit = self.fit(name, self.datasets["data"], epsilon, seed, self.config.epochs, weights)
        save_classifier(folder / MODEL_DIR, fit.model, self.model_config(fit, init, seed))
        metrics = score(fit.model, self.datasets["test"], self.device)
        record = _json_safe(
            {
                "name": name,
                "epsilon": epsilon,
                "seed": seed,
                "init": init,
                "privacy": fit.privacy(),
                "epsilon_per_epoch": fit.epsilon_per_epoch,
                "loss_per_epoch": fit.loss_per_epoch,
                "metrics": metrics,
                "seconds": time.perf_counter() - start,
            }
        )
        atomic_write_text(folder / RESULT_FILE, json.dumps(record, indent=2) + "\n")
        privacy = fit.privacy()
        spent = (
            "non-private"
            if not privacy["private"]
            else f"epsilon spent {fit.epsilon:.3f} of {epsilon:g} (delta {fit.delta:.2g}, noise "
            f"{fit.noise_multiplier:.3f}, {fit.steps} steps)"
        )
        self.log(f"{name}: {spent}; {_scores_text(metrics)} ({record['seconds']:.1f} s)")
        return record


def _scores_text(metrics: Mapping[str, Any]) -> str:
    def text(value) -> str:
        return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"

    return (
        f"AUROC {text(metrics['auroc'])}, balanced accuracy {text(metrics['balanced_accuracy'])}, "
        f"accuracy {text(metrics['accuracy'])}"
    )


def run_classify(
    data: str | os.PathLike,
    test: str | os.PathLike,
    out: str | os.PathLike,
    pretrain: str | os.PathLike | None = None,
    epsilons: str | Sequence[float | str] = (1.0, 8.0, math.inf),
    seeds: int = 3,
    config: ClassifyConfig | None = None,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
    force: bool = False,
) -> ClassifyResult:
    """Train and score private classifiers for every epsilon, seed and initialisation (see the
    module docstring) into ``out``.

    Args:
        data: the real training images, ``<class>/<file>`` (or classes from ``config.data.labels``).
        test: held-out real images, ``<class>/<file>``, classes of ``data``.
        out: the experiment folder (new, empty, or an earlier one of the same data and settings).
        pretrain: synthetic images (a ``medfusion sample`` folder) to pretrain on, classes of
            ``data``; None: scratch only.
        epsilons: privacy budgets, e.g. ``"1,8,inf"`` (see :func:`parse_epsilons`).
        seeds: runs per epsilon and initialisation, with seeds ``seed, seed + 1, ...``.
        config: network, training, privacy; default :class:`ClassifyConfig`.
        device: where to train and predict.
        seed: the first seed.
        progress: progress bars.
        log: receives stage headers, a line per epoch and one per run.
        force: remove an earlier experiment of other settings in ``out`` first.

    Returns:
        The folder, the report, the table (``{epsilon: {init: {metric: {mean, std, per_seed}}}}``,
        also in ``classification.json``) and every run's record.

    Raises:
        ValueError, FileNotFoundError, ImportError: bad input, before anything is written.
        FileExistsError: ``out`` holds something else, or an experiment of other settings.
    """
    config = config or ClassifyConfig()
    epsilons = parse_epsilons(epsilons)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an integer >= 1; got {seeds!r}")
    if not 0 <= seed <= MAX_SEED - seeds + 1:
        raise ValueError(f"seed must be an integer in 0..{MAX_SEED - seeds + 1}; got {seed}")
    private = any(math.isfinite(e) for e in epsilons)
    if private:
        require_opacus()
    datasets, size = open_classify_folders(data, test, pretrain, config.data, progress)
    train = datasets["data"]
    if min(size) < config.classifier.min_size:
        raise ValueError(
            f"data {data}: images of size {list(size)} are too small for classifier.block_config "
            f"{list(config.classifier.block_config)}: every axis needs at least {config.classifier.min_size} "
            "voxels (use fewer blocks or data.resize)"
        )
    delta = resolve_delta(config, len(train), warn=private)
    if private:
        check_private_model(
            build_classifier(len(size), train.images.shape[1], train.num_classes, config.classifier)
        )
    out = Path(out)
    settings = {
        "data": str(Path(data).resolve()),
        "test": str(Path(test).resolve()),
        "pretrain": str(Path(pretrain).resolve()) if pretrain is not None else None,
        "classes": list(train.class_names),
        "n_train": len(train),
        "delta": delta,
        # the classifier's own training fields (max_steps, ...) are TSTR's: not used here
        "config": {**config.to_dict(), "classifier": config.network()},
    }
    inits = [SCRATCH, PRETRAINED] if pretrain is not None else [SCRATCH]
    run_seeds = [seed + k for k in range(seeds)]
    with run_lock(out, "medfusion classify"):
        _check_out(out, settings, force, log)
        atomic_write_text(out / SETTINGS_FILE, json.dumps(settings, indent=2) + "\n")
        experiment = _Experiment(out, datasets, size, config, delta, device, progress, log)
        runs = {}
        for epsilon in epsilons:
            for run_seed in run_seeds:
                for init in inits:
                    record = experiment.run(epsilon, run_seed, init)
                    runs[record["name"]] = record
        table = summarize(runs, epsilons, inits, train.class_names)
        summary = _json_safe(
            {
                **settings,
                "epsilons": epsilons,
                "seeds": run_seeds,
                "inits": inits,
                "n_test": len(datasets["test"]),
                "n_pretrain": len(datasets["pretrain"]) if pretrain is not None else None,
                "image_size": list(size),
                "spatial_dims": len(size),
                "table": table,
                "runs": runs,
                "note": NOTE,
                "medfusion_version": __version__,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        )
        atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
        atomic_write_text(out / REPORT_FILE, classification_html(summary))
    for line in table_lines(table, inits):
        log(line)
    log(f"wrote {out / SUMMARY_FILE} and {out / REPORT_FILE}")
    return ClassifyResult(out, out / REPORT_FILE, table, runs)


def _check_out(out: Path, settings: dict, force: bool, log: Callable[[str], None]) -> None:
    """``out`` must be new, empty (but for its lock), or an earlier experiment: of the same settings
    (resumed) or, with ``force``, any (removed)."""
    not_ours = (
        f"out {out} is not empty and not a medfusion classify folder (no {SETTINGS_FILE}); "
        "choose another folder"
    )
    earlier = earlier_settings(out, SETTINGS_FILE, force, not_ours)
    if earlier is None:
        return
    differ = _differences(earlier, settings)
    if differ:
        raise FileExistsError(
            f"out {out} holds a classify experiment of other settings ({'; '.join(differ)}); give another "
            "folder, the same data and settings to resume (other epsilons and seeds may be added), or "
            "force=True to start over"
        )
    log(f"resuming the experiment in {out}: finished runs are reused")


def _differences(earlier: Any, now: Any, prefix: str = "") -> list[str]:
    """``key old -> new`` for every leaf where ``now`` differs from ``earlier`` (dotted keys)."""
    if isinstance(earlier, dict) and isinstance(now, dict):
        found = []
        for key in dict.fromkeys([*now, *earlier]):
            found += _differences(earlier.get(key), now.get(key), f"{prefix}{key}.")
        return found
    if earlier == now:
        return []
    return [f"{prefix.rstrip('.')} {json.dumps(earlier)} -> {json.dumps(now)}"]


# --- the table and the report -------------------------------------------------------------------
def _stats(values: Sequence[Any]) -> dict:
    """Mean and sample std (ddof 1; 0 for one value) of the numbers among ``values`` (None and
    ``"inf"`` left out of the mean; all ``"inf"``: ``"inf"``)."""
    numbers = [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    numbers = [v for v in numbers if math.isfinite(v)]
    if not numbers:
        infinite = values and all(v == INF_TEXT for v in values)
        return {"mean": INF_TEXT if infinite else None, "std": None, "per_seed": list(values)}
    std = float(np.std(numbers, ddof=1)) if len(numbers) > 1 else 0.0
    return {"mean": float(np.mean(numbers)), "std": std, "per_seed": list(values)}


def summarize(
    runs: Mapping[str, dict], epsilons: Sequence[float], inits: Sequence[str], classes: Sequence[str]
) -> dict:
    """Per epsilon and init: mean, std and per-seed values of every metric over the seeds, of the
    AUROC of every class, and of the epsilon spent."""
    table: dict[str, dict] = {}
    for epsilon in epsilons:
        key = epsilon_key(epsilon)
        for init in inits:
            chosen = [
                r for r in runs.values() if r["epsilon"] == _json_safe(float(epsilon)) and r["init"] == init
            ]
            if not chosen:
                continue
            entry = {metric: _stats([r["metrics"][metric] for r in chosen]) for metric in METRICS}
            entry["auroc_per_class"] = {
                c: _stats([r["metrics"]["auroc_per_class"][c] for r in chosen]) for c in classes
            }
            entry["epsilon_spent"] = _stats([r["privacy"]["epsilon"] for r in chosen])
            entry["seeds"] = [r["seed"] for r in chosen]
            table.setdefault(key, {})[init] = entry
    return table


def _text(entry: Mapping[str, Any] | None) -> str:
    if entry is None or entry["mean"] is None:
        return "–"
    if entry["mean"] == INF_TEXT:
        return "∞"
    return f"{entry['mean']:.3f} ± {entry['std']:.3f}"


def table_lines(table: Mapping[str, dict], inits: Sequence[str]) -> list[str]:
    """The table as text: one row per epsilon and init."""
    width = 17
    lines = [
        "",
        "scores on the test images (mean ± std over seeds)",
        f"{'epsilon':<9}{'init':<12}{'spent':>9}"
        + "".join(f"{METRIC_TITLES[m]:>{width + 3}}" for m in METRICS),
    ]
    for key, per_init in table.items():
        for init in inits:
            entry = per_init.get(init)
            if entry is None:
                continue
            spent = entry["epsilon_spent"]["mean"]
            spent_text = "∞" if spent == INF_TEXT else "–" if spent is None else f"{spent:.2f}"
            cells = "".join(f"{_text(entry[m]):>{width + 3}}" for m in METRICS)
            lines.append(f"{'∞' if key == INF_TEXT else key:<9}{init:<12}{spent_text:>9}{cells}")
    return lines


COLOURS = ("#333", "#c0392b", "#1f6fb2", "#1e8449", "#8e44ad")


def _curve(table: Mapping[str, dict], inits: Sequence[str], width: int = 480, height: int = 300) -> str:
    """Mean AUROC (y) against epsilon (x, log scale; inf at the right end, after a gap, labelled ∞),
    one line per init, ± std bars. Inline SVG."""
    margin, gap = 48, 0.15  # the share of the axis between the largest finite epsilon and ∞
    finite = sorted(float(k) for k in table if k != INF_TEXT)
    has_inf = INF_TEXT in table
    span = width - 2 * margin
    finite_span = span * (1 - gap) if has_inf else span
    low, high = (math.log(finite[0]), math.log(finite[-1])) if finite else (0.0, 0.0)

    def x(key: str) -> float:
        if key == INF_TEXT:
            return margin + span if finite else margin + span / 2
        if high == low:
            return margin + (finite_span / 2 if not has_inf else 0.0)
        return margin + (math.log(float(key)) - low) / (high - low) * finite_span

    points = {
        init: [
            (x(key), per_init[init]["auroc"]["mean"], per_init[init]["auroc"]["std"] or 0.0)
            for key, per_init in table.items()
            if init in per_init and isinstance(per_init[init]["auroc"]["mean"], float)
        ]
        for init in inits
    }
    lows = [mean - std for series in points.values() for _, mean, std in series]
    bottom = min(0.5, math.floor(min(lows, default=0.5) * 10) / 10)

    def y(value: float) -> float:
        return height - margin - (value - bottom) / (1 - bottom) * (height - 2 * margin)

    parts = [
        f'<rect x="{margin}" y="{margin}" width="{span}" height="{height - 2 * margin}" '
        'fill="none" stroke="#999"/>'
    ]
    for key in table:
        label = "∞" if key == INF_TEXT else key
        parts.append(
            f'<text x="{x(key):.1f}" y="{height - margin + 16}" font-size="11" '
            f'text-anchor="middle">{label}</text>'
        )
    if has_inf and finite:
        at = margin + finite_span + span * gap / 2
        parts.append(
            f'<text x="{at:.1f}" y="{height - margin + 4}" font-size="12" text-anchor="middle">//</text>'
        )
    for tick in (bottom, (bottom + 1) / 2, 1.0):
        parts.append(
            f'<text x="{margin - 6}" y="{y(tick) + 4:.1f}" font-size="11" text-anchor="end">{tick:.2f}</text>'
        )
    for index, init in enumerate(inits):
        series = sorted(points[init])
        if not series:
            continue
        colour = COLOURS[index % len(COLOURS)]
        path = " ".join(f"{px:.1f},{y(mean):.1f}" for px, mean, _ in series)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for px, mean, std in series:
            parts.append(
                f'<line x1="{px:.1f}" y1="{y(mean - std):.1f}" x2="{px:.1f}" y2="{y(mean + std):.1f}" '
                f'stroke="{colour}"/><circle cx="{px:.1f}" cy="{y(mean):.1f}" r="3.5" fill="{colour}"/>'
            )
        parts.append(
            f'<text x="{width - margin + 6}" y="{margin + 14 * (index + 1)}" font-size="12" fill="{colour}">'
            f"{html.escape(init)}</text>"
        )
    parts.append(
        f'<text x="{width / 2}" y="{height - 10}" font-size="12" '
        'text-anchor="middle">epsilon (log scale)</text>'
        f'<text x="14" y="{height / 2}" font-size="12" text-anchor="middle" '
        f'transform="rotate(-90 14 {height / 2})">AUROC</text>'
    )
    return (
        f'<svg width="{width + 90}" height="{height}" xmlns="http://www.w3.org/2000/svg" role="img">'
        f"{''.join(parts)}</svg>"
    )


def classification_html(summary: Mapping[str, Any]) -> str:
    """The self-contained report: settings, the table, the curve (inline SVG, no script, no links)."""
    table, inits, classes = summary["table"], summary["inits"], summary["classes"]
    head = "".join(f"<th>{html.escape(METRIC_TITLES[m])}</th>" for m in METRICS)
    rows = []
    for key, per_init in table.items():
        for init in inits:
            entry = per_init.get(init)
            if entry is None:
                continue
            per_class = ", ".join(f"{html.escape(c)} {_text(entry['auroc_per_class'][c])}" for c in classes)
            cells = "".join(f"<td>{_text(entry[m])}</td>" for m in METRICS)
            rows.append(
                f"<tr class='run'><td>{'∞' if key == INF_TEXT else html.escape(key)}</td>"
                f"<td>{html.escape(init)}</td><td>{_text(entry['epsilon_spent'])}</td>{cells}"
                f"<td class='note'>{per_class}</td></tr>"
            )
    config = summary["config"]
    facts = (
        f"{summary['n_train']} training images, {summary['n_test']} test images"
        + (f", {summary['n_pretrain']} synthetic images" if summary["n_pretrain"] else "")
        + f" · {summary['spatial_dims']}D, {' × '.join(map(str, summary['image_size']))} · classes "
        f"{', '.join(map(html.escape, classes))} · seeds {', '.join(map(str, summary['seeds']))}"
    )
    privacy = (
        f"delta {summary['delta']:.3g} · {config['epochs']} epochs · expected batch {config['batch_size']} "
        f"(physical ≤ {config['max_physical_batch_size']}) · max_grad_norm {config['max_grad_norm']} · "
        f"Adam, learning rate {config['learning_rate']} ({config['lr_schedule']}) · accountant "
        f"{config['accountant']}"
        + (f" · pretraining: {config['pretrain_epochs']} epochs, non-private" if summary["pretrain"] else "")
    )
    style = (
        "body{font-family:system-ui,sans-serif;margin:24px;max-width:1200px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}.note{color:#555;font-size:85%}"
    )
    sources = "".join(
        f"<li>{name}: <code>{html.escape(str(summary[name]))}</code></li>"
        for name in ("data", "test", "pretrain")
        if summary[name]
    )
    return "\n".join(
        [
            "<!DOCTYPE html><html><head><meta charset='utf-8'><title>medfusion classify</title>"
            f"<style>{style}</style></head><body><h1>Differentially private classifiers</h1>",
            f"<ul>{sources}</ul>",
            f"<p>{facts}</p>",
            f"<p class='note'>{privacy} · {html.escape(summary['created'])}</p>",
            f"<p><strong>{html.escape(NOTE)}</strong></p>",
            "<h2>Scores on the test images</h2>",
            "<p class='note'>Mean ± std over seeds; epsilon spent is what the accountant reports at the end "
            "(∞: non-private training); AUROC is the macro mean of the one-vs-rest AUROCs.</p>",
            "<table><tr><th>epsilon</th><th>init</th><th>epsilon spent</th>",
            f"{head}<th>AUROC per class</th></tr>",
            "".join(rows),
            "</table>",
            "<h2>AUROC against the privacy budget</h2>",
            _curve(table, inits),
            "</body></html>",
        ]
    )
