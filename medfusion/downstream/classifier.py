"""Utility of synthetic data: a small classifier trained on synthetic, tested on real (TSTR).

:func:`tstr` trains the same classifier on the synthetic folder (TSTR: train synthetic, test
real) and on the real training folder (TRTR: the reference), once per seed, and tests every fit
on the same held-out real folder. A synthetic dataset is useful for this task when TSTR comes
close to TRTR.

The network is MONAI's DenseNet with group norm and out-of-place ReLU, 2D or 3D, so that a
differentially private classifier (Opacus: no BatchNorm, no in-place activations) can reuse it.
The fits are short and in memory: each folder is read once into a tensor.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from medfusion.config import Config, DataConfig
from medfusion.data.dataset import ImageFolderDataset, open_alike
from medfusion.training.loop import EpochSampler
from medfusion.utils import MAX_SEED

METRICS = ("accuracy", "balanced_accuracy", "auroc")
REGIMES = (("tstr", "synthetic"), ("trtr", "real_train"))  # (regime, the folder it trains on)


@dataclass(frozen=True)
class ClassifierConfig(Config):
    """The classifier (a group-norm DenseNet) and how it is trained.

    Attributes:
        init_features: channels of the stem convolution.
        growth_rate: channels each dense layer adds.
        block_config: dense layers per block; every block but the last is followed by a transition
            that halves channels and size. Inputs need at least ``2 ** (len(block_config) + 1)``
            voxels per axis.
        bottleneck_factor: width of each dense layer's 1x1 bottleneck, in units of ``growth_rate``.
        num_groups: groups of every group norm; must divide every channel count of the network.
        max_steps: optimizer steps of one fit (the same for every training folder, whatever its
            size, so TSTR and TRTR get the same budget).
        batch_size: images per step (the whole training set when it holds fewer).
        learning_rate: peak learning rate of AdamW (cosine decay to 0 over ``max_steps``).
        weight_decay: of AdamW.
        seed: seeds the initial weights and the data order.
    """

    init_features: int = 16
    growth_rate: int = 8
    block_config: tuple[int, ...] = (2, 2, 2)
    bottleneck_factor: int = 4
    num_groups: int = 4
    max_steps: int = 200
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 1e-2
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("init_features", "growth_rate", "bottleneck_factor", "num_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        for name in ("max_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if not self.block_config or any(n < 1 for n in self.block_config):
            raise ValueError(f"block_config must be one or more positive integers; got {self.block_config!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0; got {self.learning_rate}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0; got {self.weight_decay}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer in 0..{MAX_SEED}; got {self.seed}")
        bad = sorted({c for c in _norm_channels(self) if c % self.num_groups})
        if bad:
            raise ValueError(
                f"num_groups must divide every channel count of the network; got {self.num_groups}, "
                f"which does not divide {bad} (from init_features={self.init_features}, "
                f"growth_rate={self.growth_rate}, block_config={list(self.block_config)})"
            )

    @property
    def min_size(self) -> int:
        """The smallest input size per axis: the stem halves it twice, each transition once."""
        return 2 ** (len(self.block_config) + 1)


def _norm_channels(config: ClassifierConfig) -> list[int]:
    """Channels of every norm layer of MONAI's DenseNet (its layout: dense layers add
    ``growth_rate`` each, transitions halve, a final norm after the last block)."""
    channels = config.init_features
    normed = [config.bottleneck_factor * config.growth_rate]
    for i, layers in enumerate(config.block_config):
        for _ in range(layers):
            normed.append(channels)
            channels += config.growth_rate
        normed.append(channels)  # the transition's norm, or the final one after the last block
        if i < len(config.block_config) - 1:
            channels //= 2
    return normed


def build_classifier(
    spatial_dims: int, in_channels: int, num_classes: int, config: ClassifierConfig
) -> nn.Module:
    """A group-norm DenseNet mapping ``(N, in_channels, *spatial)`` to logits ``(N, num_classes)``.

    No BatchNorm and no in-place activation anywhere (Opacus can train it with DP-SGD).
    """
    try:
        from monai.networks.nets import DenseNet
    except ImportError as e:
        raise ImportError(
            "the classifier needs MONAI: pip install 'medfusion[downstream]' (or 'monai>=1.4')"
        ) from e
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3; got {spatial_dims}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1; got {in_channels}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2; got {num_classes}")
    model = DenseNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=num_classes,
        init_features=config.init_features,
        growth_rate=config.growth_rate,
        block_config=tuple(config.block_config),
        bn_size=config.bottleneck_factor,
        norm=("group", {"num_groups": config.num_groups}),
        act=("relu", {"inplace": False}),
        dropout_prob=0.0,
    )
    _bias_the_stem(model)
    return model


def _bias_the_stem(model: nn.Module) -> None:
    """Give MONAI's stem convolution (bias-free upstream) a bias. Without one, a convolution and a
    group norm make the network blind to the scale of its input (f(a x) = f(x) for a > 0), so
    it cannot tell a flat image from a contrasted one with the same pattern."""
    stem = model.features.conv0
    biased = type(stem)(
        stem.in_channels, stem.out_channels, stem.kernel_size, stem.stride, stem.padding, bias=True
    )
    with torch.no_grad():
        biased.weight.copy_(stem.weight)
    model.features.conv0 = biased


class TensorClassDataset(Dataset):
    """Images and labels held in memory, with the item interface of :class:`ImageFolderDataset`.

    Args:
        images: ``(N, C, *spatial)`` float tensor.
        labels: ``(N,)`` class indices.
        class_names: the name of every class index.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]):
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"images and labels differ in length: {images.shape[0]} vs {labels.shape[0]}")
        self.images, self.labels, self.class_names = images, labels.long(), tuple(class_names)

    @classmethod
    def read(cls, dataset: Dataset, batch_size: int = 64, progress: bool = False) -> TensorClassDataset:
        """Read every item of ``dataset`` (``{"image", "label"}`` dicts of one size) once."""
        if isinstance(dataset, cls):
            return dataset
        images, labels = [], []
        name = os.path.basename(str(getattr(dataset, "root", "dataset")).rstrip("/\\"))
        for batch in tqdm(
            DataLoader(dataset, batch_size=batch_size), desc=f"reading {name}", disable=not progress
        ):
            images.append(batch["image"])
            labels.append(torch.as_tensor(batch["label"]))
        names = getattr(dataset, "class_names", None) or [
            str(i) for i in range(int(torch.cat(labels).max()) + 1)
        ]
        return cls(torch.cat(images), torch.cat(labels), names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "label": int(self.labels[index]), "index": index}


def train_classifier(
    train_dataset: Dataset,
    config: ClassifierConfig,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> nn.Module:
    """Fit a classifier (:func:`build_classifier`) with AdamW and cross-entropy.

    ``config.max_steps`` steps of ``config.batch_size`` images, epoch by epoch in an order drawn
    from ``(config.seed, epoch)`` (the last incomplete batch of an epoch is dropped); the initial
    weights come from ``config.seed`` too, so a fit on the CPU is reproducible.

    Args:
        train_dataset: items ``{"image": (C, *spatial), "label": int}`` of one size, every label a
            class index (e.g. an :class:`ImageFolderDataset`); read into memory once.
        config: the network and the training.
        device: where to train.
        progress: show a progress bar.

    Returns:
        The trained model, in eval mode, on ``device``.
    """
    data = TensorClassDataset.read(train_dataset, progress=progress)
    if len(data) == 0:
        raise ValueError("train_dataset is empty")
    if int(data.labels.min()) < 0:
        raise ValueError("train_dataset has unlabelled items (label -1); a classifier needs class labels")
    spatial = tuple(data.images.shape[2:])
    if len(spatial) not in (2, 3) or min(spatial) < config.min_size:
        raise ValueError(
            f"train_dataset images of size {spatial} are too small for block_config "
            f"{list(config.block_config)}: every axis needs at least {config.min_size} voxels "
            "(use fewer blocks or resize the images)"
        )
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_classifier(len(spatial), data.images.shape[1], data.num_classes, config).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.max_steps)
    sampler = EpochSampler(len(data), min(config.batch_size, len(data)), config.seed)
    model.train()
    step, epoch = 0, 0
    with tqdm(total=config.max_steps, desc="classifier", unit="step", disable=not progress) as bar:
        while step < config.max_steps:
            sampler.set_epoch(epoch)
            for indices in sampler:
                images = data.images[indices].to(device)  # (B, C, *spatial)
                labels = data.labels[indices].to(device)  # (B,)
                loss = F.cross_entropy(model(images), labels)
                if not torch.isfinite(loss):
                    raise RuntimeError(
                        f"the classifier loss is {loss.item()} at step {step + 1}; lower learning_rate"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                if step == config.max_steps:
                    break
            epoch += 1
    return model.eval()


@torch.no_grad()
def predict(
    model: nn.Module, images: torch.Tensor, batch_size: int = 64, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Logits ``(N, K)`` (on the CPU) of ``images`` ``(N, C, *spatial)``, in eval mode."""
    model.eval()
    out = [
        model(images[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out)


def classification_metrics(logits_or_probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Accuracy, balanced accuracy, macro one-vs-rest AUROC and per-class recall.

    Args:
        logits_or_probs: ``(N, K)`` scores; rows in [0, 1] that sum to 1 are taken as
            probabilities, anything else as logits (softmax applied).
        labels: ``(N,)`` class indices in ``0..K-1``.
        num_classes: ``K`` (at least 2).

    Returns:
        ``{"accuracy", "balanced_accuracy", "auroc", "recall_per_class"}``: floats and a list of
        ``K`` floats. Recall of a class absent from ``labels`` is NaN and left out of the balanced
        accuracy (the mean recall of the classes present); the AUROC averages the one-vs-rest
        AUROCs of the classes that are present and not alone (NaN when there is none).
    """
    from torchmetrics.functional.classification import binary_auroc

    scores = torch.as_tensor(logits_or_probs).detach().double().cpu()
    labels = torch.as_tensor(labels).detach().long().cpu()
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2; got {num_classes}")
    if scores.ndim != 2 or scores.shape[1] != num_classes:
        raise ValueError(f"logits_or_probs must have shape (N, {num_classes}); got {tuple(scores.shape)}")
    if labels.shape != (scores.shape[0],):
        raise ValueError(f"labels must have shape ({scores.shape[0]},); got {tuple(labels.shape)}")
    if scores.shape[0] == 0:
        raise ValueError("logits_or_probs is empty")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels must lie in 0..{num_classes - 1}; got {int(labels.min())}..{int(labels.max())}"
        )
    is_probs = bool(((scores >= 0) & (scores <= 1)).all()) and torch.allclose(
        scores.sum(1), torch.ones(len(scores), dtype=scores.dtype), atol=1e-4
    )
    probs = scores if is_probs else scores.softmax(dim=1)
    predicted = probs.argmax(dim=1)
    recall, aurocs = [], []
    for c in range(num_classes):
        positive = labels == c
        count = int(positive.sum())
        recall.append(float((predicted[positive] == c).double().mean()) if count else math.nan)
        if 0 < count < len(labels):
            aurocs.append(float(binary_auroc(probs[:, c], positive.long())))
    present = [r for r in recall if not math.isnan(r)]
    return {
        "accuracy": float((predicted == labels).double().mean()),
        "balanced_accuracy": float(np.mean(present)),
        "auroc": float(np.mean(aurocs)) if aurocs else math.nan,
        "recall_per_class": recall,
    }


def open_tstr_folders(
    real_train: str | os.PathLike,
    synthetic: str | os.PathLike,
    real_test: str | os.PathLike,
    data: DataConfig,
) -> tuple[dict[str, ImageFolderDataset], tuple[int, ...]]:
    """Open the three folders of :func:`tstr` alike and check that they agree.

    ``data.labels`` (a CSV) is for ``real_train``; ``synthetic`` and ``real_test`` take their
    classes from first-level subfolders. All three must hold the same class names (so the same
    class indices: names are sorted), images of one kind (2D/3D, channels), and get one transform:
    ``data``, resized to ``data.resize`` or else to the size of the first ``real_train`` image.

    Returns:
        The datasets by argument name and the image size.
    """
    folders = {"real_train": real_train, "synthetic": synthetic, "real_test": real_test}
    datasets, size = open_alike(folders, data)
    reference = datasets["real_train"]
    classes = reference.class_names
    if len(classes) < 2:
        raise ValueError(
            f"real_train {real_train}: a classifier needs at least 2 classes (first-level subfolders "
            f"or data.labels); found {list(classes)}"
        )
    for name, dataset in datasets.items():
        where = f"{name} {folders[name]}"
        if not dataset.class_names:
            raise ValueError(
                f"{where}: holds no class subfolders; {name} needs the layout <class>/<file> "
                f"with the classes of real_train {real_train}: {list(classes)} (data.labels "
                "applies to real_train only)"
            )
        if dataset.class_names != classes:
            missing = sorted(set(classes) - set(dataset.class_names))
            extra = sorted(set(dataset.class_names) - set(classes))
            raise ValueError(
                f"{where}: its classes {list(dataset.class_names)} differ from those of real_train "
                f"{real_train}: {list(classes)} (missing: {missing}, extra: {extra}); TSTR needs the "
                "same class names in all three folders"
            )
    return datasets, size


def _summary(per_seed: list[dict], classes: Sequence[str]) -> dict:
    """Mean, sample std (ddof=1; 0 with one seed) and per-seed values of every metric."""

    def stats(values: list[float]) -> dict:
        std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        return {"mean": float(np.mean(values)), "std": std, "per_seed": [float(v) for v in values]}

    out = {name: stats([m[name] for m in per_seed]) for name in METRICS}
    recall = {c: stats([m["recall_per_class"][i] for m in per_seed]) for i, c in enumerate(classes)}
    out["recall_per_class"] = {
        key: {c: recall[c][key] for c in classes} for key in ("mean", "std", "per_seed")
    }
    return out


def tstr(
    real_train: str | os.PathLike,
    synthetic: str | os.PathLike,
    real_test: str | os.PathLike,
    data: DataConfig,
    config: ClassifierConfig,
    seeds: Sequence[int] = (0, 1, 2),
    device: torch.device | str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] = print,
    regimes: Sequence[str] = ("tstr", "trtr"),
) -> dict:
    """Train on synthetic, test on real (TSTR) beside train on real, test on real (TRTR).

    The classifier is trained on ``synthetic`` and on ``real_train`` with every seed (the seed
    replaces ``config.seed``) and tested on ``real_test`` each time.

    Args:
        real_train: real training images (those the generator was trained on, typically).
        synthetic: synthetic images, ``<class>/<file>`` (e.g. a ``medfusion sample`` folder).
        real_test: held-out real images, ``<class>/<file>``.
        data: how files become tensors (see :func:`open_tstr_folders`).
        config: the classifier and its training.
        seeds: one fit per seed and regime.
        device: where to train.
        progress: show progress bars.
        log: receives one line per fit.
        regimes: which of the two to train (``tstr``, ``trtr``); e.g. TRTR once and TSTR for each
            of several synthetic sets.

    Returns:
        ``{"tstr": {...}, "trtr": {...}, "seeds", "n_train": {"tstr", "trtr"}, "n_test",
        "classes", "image_size", "config"}``; each regime maps ``accuracy``, ``balanced_accuracy``
        and ``auroc`` to ``{"mean", "std", "per_seed"}`` and ``recall_per_class`` to the same
        keys, each a mapping class name -> value.
    """
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds) or any(not 0 <= s <= MAX_SEED for s in seeds):
        raise ValueError(f"seeds must be one or more distinct integers in 0..{MAX_SEED}; got {seeds}")
    known = [regime for regime, _ in REGIMES]
    if not regimes or any(regime not in known for regime in regimes):
        raise ValueError(f"regimes must be one or more of {known}; got {list(regimes)}")
    chosen = [(regime, source) for regime, source in REGIMES if regime in regimes]
    datasets, size = open_tstr_folders(real_train, synthetic, real_test, data)
    needed = {"real_test", *(source for _, source in chosen)}
    tensors = {
        name: TensorClassDataset.read(dataset, progress=progress)
        for name, dataset in datasets.items()
        if name in needed
    }
    test = tensors["real_test"]
    classes = list(test.class_names)
    results: dict = {}
    for regime, source in chosen:
        per_seed = []
        for seed in seeds:
            start = time.perf_counter()
            model = train_classifier(tensors[source], config.replace(seed=seed), device, progress)
            metrics = classification_metrics(
                predict(model, test.images, device=device), test.labels, len(classes)
            )
            per_seed.append(metrics)
            log(
                f"{regime} (train on {source}) seed {seed}: accuracy {metrics['accuracy']:.3f}, balanced "
                f"{metrics['balanced_accuracy']:.3f}, AUROC {metrics['auroc']:.3f} "
                f"({time.perf_counter() - start:.1f} s)"
            )
        results[regime] = _summary(per_seed, classes)
    results.update(
        seeds=seeds,
        n_train={regime: len(tensors[source]) for regime, source in chosen},
        n_test=len(test),
        classes=classes,
        image_size=list(size),
        config=config.to_dict(),
    )
    return results
