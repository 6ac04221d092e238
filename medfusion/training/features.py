"""Training the domain feature encoder of the evaluators: ``medfusion features train``.

The encoder (:class:`medfusion.metrics.features.DomainEncoder`) learns features of the real
reference images by contrast (SimCLR's NT-Xent, Chen et al. 2020): two random views of each image
must find each other among the batch. When the data has classes, a linear classifier on the
embedding adds a cross-entropy term, so classes separate. Its features are the embedding and the
multi-scale texture statistics of every level (see :class:`DomainEncoder`).

Choices, each for what an evaluation must see:

- **Views that keep texture.** A view is the image shifted by up to an eighth of each side
  (reflected at the edges), flipped, with a mild contrast and brightness change: no rescaling and
  no added noise. Views teach the encoder what to ignore; scaling (which blurs or sharpens) and
  noise are exactly what a yardstick of synthetic images must not ignore.
- **A validation criterion, not a fixed number of steps.** A share of the images
  (``validation_fraction``) is held out; every ``validate_every`` steps the training objective is
  computed on them with fixed views, and training stops once it has not improved by
  ``min_improvement`` for ``patience`` validations (or at ``train.max_steps``). The encoder of the
  best validation is the one saved.
- **Features on one scale.** After training, every feature is centred and scaled by its spread
  over the training images and by the square root of its group's width
  (:meth:`DomainEncoder.standardize`), so that each group (the embedding, the image's detail, each
  level's means and detail) weighs the same in a distance, whatever its magnitude or width.

It trains on the shared loop (checkpoints, resume, bf16, several GPUs) and writes
``FEAT/encoder/`` (``config.json`` + safetensors), which ``--features FEAT`` loads, and
``FEAT/validation.json`` (the validation history and the step kept).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

from medfusion.config import Config, DataConfig, model_config
from medfusion.data.dataset import ImageFolderDataset, build_transform
from medfusion.data.transforms import Compose, Resize
from medfusion.metrics.features import ENCODER_DIR, DomainEncoder
from medfusion.training.loop import TrainConfig, TrainingTask, TrainResult
from medfusion.training.run import PreparedRun, execute, seeded
from medfusion.utils import atomic_dir, atomic_write_text, process_state

MAX_DEFAULT_SIDE = 128
MIN_VALIDATION = 8  # validation images at least (fewer images: no validation)
MAX_VALIDATION = 256  # validation images at most
STANDARDIZE_IMAGES = 2000  # training images the feature scaling is measured on, at most
VALIDATION_FILE = "validation.json"


# the encoder's settings: DomainEncoder's constructor; multi-scale pooling for new encoders (the
# constructor's default, mean pooling, is what encoders saved before it load with)
EncoderConfig = model_config(
    DomainEncoder,
    "EncoderConfig",
    from_data=("spatial_dims", "in_channels", "image_size"),
    defaults={"pooling": "multiscale"},
)


@dataclass(frozen=True)
class FeaturesRunConfig(Config):
    """Everything ``medfusion features train`` needs; sections data, model, train.

    Attributes:
        model: the encoder; ``model.image_size`` is the size it works at (array order), None: the
            first image's (after the data transforms), each side capped at 128. Every image is
            resized to it.
        temperature: NT-Xent temperature.
        projection_dim: width of the contrastive projection head (discarded after training).
        class_weight: weight of the classification term when the data has classes (0: off).
        validation_fraction: share of the images held out for the stopping criterion (at least
            ``MIN_VALIDATION`` images, at most ``MAX_VALIDATION``; 0, or too few images: no
            validation, ``train.max_steps`` steps).
        validate_every: optimizer steps between validations.
        patience: validations without an improvement before training stops.
        min_improvement: the least decrease of the validation loss that counts as one.
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: EncoderConfig = field(default_factory=EncoderConfig)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(max_steps=2000, batch_size=32, learning_rate=1e-3, ema_decay=None)
    )
    temperature: float = 0.2
    projection_dim: int = 128
    class_weight: float = 1.0
    validation_fraction: float = 0.1
    validate_every: int = 25
    patience: int = 4
    min_improvement: float = 0.01

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0; got {self.temperature}")
        if self.class_weight < 0:
            raise ValueError(f"class_weight must be >= 0; got {self.class_weight}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1); got {self.validation_fraction}")
        for name in ("validate_every", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.min_improvement < 0:
            raise ValueError(f"min_improvement must be >= 0; got {self.min_improvement}")


def random_view(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random view of every image of ``x`` (N, C, *spatial) in [-1, 1], 2D or 3D alike: shifted
    by up to an eighth of each side (edges reflected), flipped at random along each axis, contrast
    and brightness changed by up to 10% and 0.05. Nothing that blurs, sharpens or adds noise."""
    spatial = x.shape[2:]
    pads = [max(1, side // 8) for side in spatial]
    padding = [p for pad in reversed(pads) for p in (pad, pad)]  # F.pad lists the last axis first
    mode = "reflect" if all(p < side for p, side in zip(pads, spatial)) else "replicate"
    padded = F.pad(x, padding, mode=mode)
    views = []
    for i in range(x.shape[0]):
        starts = [int(torch.randint(0, 2 * pad + 1, (1,), generator=generator)) for pad in pads]
        item = padded[(slice(i, i + 1), slice(None), *(slice(a, a + s) for a, s in zip(starts, spatial)))]
        flips = [d + 2 for d in range(len(spatial)) if float(torch.rand(1, generator=generator)) < 0.5]
        if flips:
            item = item.flip(flips)
        contrast = 0.9 + 0.2 * float(torch.rand(1, generator=generator))
        brightness = 0.1 * float(torch.rand(1, generator=generator)) - 0.05
        views.append((item * contrast + brightness).clamp(-1, 1))
    return torch.cat(views)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent: each of the 2N projections must pick its partner among the 2N - 1 others."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    n = z1.shape[0]
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, targets)


class EncoderTrainer(nn.Module):
    """The encoder with its training heads: a projection for NT-Xent and a linear classifier."""

    def __init__(self, encoder: DomainEncoder, projection_dim: int, num_classes: int | None):
        super().__init__()
        self.encoder = encoder
        width = encoder.config.num_features  # the embedding (the statistics are not trained on directly)
        self.projection = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, projection_dim))
        self.classifier = nn.Linear(width, num_classes) if num_classes else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        embedding, _ = self.encoder.embed(x)
        logits = self.classifier(embedding) if self.classifier is not None else None
        return embedding, self.projection(embedding), logits


class FeaturesTask(TrainingTask):
    """Contrastive (and, with classes, supervised) training of the domain encoder, stopped by a
    validation criterion when ``validation`` images are given.

    Args:
        trainer: the encoder with its heads.
        config: the run's settings (temperature, class weight, validation schedule).
        validation: held-out images ``(V, C, *spatial)`` and their labels ``(V,)`` (-1: none), or
            None (no validation: the run takes ``train.max_steps`` steps).
        seed: of the validation views.
    """

    name = "encoder"
    forward_chunk = 64  # validation images through the encoder at a time

    def __init__(
        self,
        trainer: EncoderTrainer,
        config: FeaturesRunConfig,
        validation: tuple[torch.Tensor, torch.Tensor] | None = None,
        seed: int = 0,
    ):
        self.trainer = trainer
        self.config = config
        self.validation = None
        if validation is not None:
            images, labels = validation
            generator = torch.Generator().manual_seed(seed)
            self.validation = (random_view(images, generator), random_view(images, generator), labels)
        self.history: list[dict] = []
        self.best: tuple[float, int, dict[str, torch.Tensor]] | None = None  # loss, step, weights
        self._waited = 0

    def modules(self) -> dict[str, nn.Module]:
        return {"encoder": self.trainer}

    def objective(
        self, model: nn.Module, v1: torch.Tensor, v2: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of two views of a batch: NT-Xent, plus the weighted cross-entropy of the class
        head when every image has a label."""
        chunk = self.forward_chunk if not torch.is_grad_enabled() else len(v1) * 2
        outputs = [model(part) for part in torch.cat([v1, v2]).split(chunk)]
        z = torch.cat([o[1] for o in outputs])
        logits = torch.cat([o[2] for o in outputs]) if outputs[0][2] is not None else None
        z1, z2 = z.chunk(2)
        contrastive = nt_xent(z1, z2, self.config.temperature)
        terms = {"nt_xent": contrastive.detach()}
        loss = contrastive
        if logits is not None and self.config.class_weight > 0 and bool((labels >= 0).all()):
            classification = F.cross_entropy(logits.float(), torch.cat([labels, labels]).to(logits.device))
            terms["cross_entropy"] = classification.detach()
            loss = loss + self.config.class_weight * classification
        return loss, terms

    def training_step(
        self, models: Mapping[str, nn.Module], batch: dict, step: int
    ) -> Iterator[tuple[str, torch.Tensor, dict[str, torch.Tensor]]]:
        x = batch["image"]
        # the views come from the global generator, which the loop seeds for every step: a resumed
        # run draws the views it would have drawn
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
        v1, v2 = random_view(x, generator), random_view(x, generator)
        loss, terms = self.objective(models["encoder"], v1, v2, batch["label"])
        yield "encoder", loss, terms

    @torch.no_grad()
    def validation_loss(self, model: nn.Module) -> float:
        """The objective on the validation images' fixed views (evaluation mode)."""
        v1, v2, labels = self.validation
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        loss, _ = self.objective(model, v1.to(device), v2.to(device), labels.to(device))
        model.train(was_training)
        return float(loss)

    def state_dict(self) -> dict:
        """The validation history, the patience count and the best encoder so far."""
        if self.validation is None:
            return {}
        best = (
            None
            if self.best is None
            else {"loss": self.best[0], "step": self.best[1], "weights": self.best[2]}
        )
        return {"history": self.history, "waited": self._waited, "best": best}

    def load_state_dict(self, state: dict) -> None:
        if self.validation is None:
            return
        self.history = list(state["history"])
        self._waited = int(state["waited"])
        best = state["best"]
        self.best = None if best is None else (float(best["loss"]), int(best["step"]), dict(best["weights"]))

    def stop_early(self, model: nn.Module, step: int) -> bool:
        if self.validation is None or step % self.config.validate_every:
            return False
        loss = self.validation_loss(model)
        improved = self.best is None or loss < self.best[0] - self.config.min_improvement
        if improved:
            weights = {k: v.detach().to("cpu", copy=True) for k, v in model.encoder.state_dict().items()}
            self.best = (loss, step, weights)
            self._waited = 0
        else:
            self._waited += 1
        self.history.append({"step": step, "loss": loss, "best": improved})
        return self._waited >= self.config.patience

    @torch.no_grad()
    def preview(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        x = batch["image"]
        features, _, _ = model(x)
        similarity = F.normalize(features.float(), dim=1) @ F.normalize(features.float(), dim=1).T
        off_diagonal = similarity[~torch.eye(len(x), dtype=torch.bool, device=x.device)]
        return random_view(x, torch.Generator().manual_seed(0)).float(), {
            "mean_cosine": float(off_diagonal.mean())
        }


def validation_split(size: int, fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices of the training and validation images of a dataset of ``size`` images:
    ``fraction`` of them (at least ``MIN_VALIDATION``, at most ``MAX_VALIDATION``) held out at
    random (seeded), none where that would leave fewer than ``MIN_VALIDATION`` to train on."""
    count = min(MAX_VALIDATION, max(MIN_VALIDATION, round(fraction * size))) if fraction > 0 else 0
    if count == 0 or size - count < MIN_VALIDATION:
        return list(range(size)), []
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[count:]), sorted(order[:count])


def _encoder_dataset(
    data: str | Path, config: FeaturesRunConfig, progress: bool
) -> tuple[ImageFolderDataset, tuple[int, ...]]:
    """The real images without random transforms, resized after every data transform to the
    encoder's size: ``config.image_size``, or the data's own with each side at most
    ``MAX_DEFAULT_SIDE`` (features need no fine detail). Returns the dataset and the size."""
    transform = build_transform(config.data.replace(random_crop=False, flip_axes=()))
    dataset = ImageFolderDataset(
        data,
        labels=config.data.labels,
        transform=transform,
        skip_bad=config.data.skip_bad,
        validate="header",
        progress=progress,
    )
    produced = tuple(dataset[0]["image"].shape[1:])  # after the data transforms
    if config.model.image_size:
        size = tuple(config.model.image_size)
    else:
        size = tuple(min(side, MAX_DEFAULT_SIDE) for side in produced)
    if len(size) != dataset.spatial_dims:
        raise ValueError(f"model.image_size {list(size)} does not fit {dataset.spatial_dims}D data")
    if size != produced:  # resized last, after every data transform, so that the encoder sees `size`
        dataset.transform = Compose([transform, Resize(size)])
    return dataset, size


def prepare_features_run(
    data: str | Path, out: str | Path, config: FeaturesRunConfig, progress: bool = True
) -> PreparedRun:
    """Read the real images of ``medfusion features train`` and resolve its config (the encoder's
    image size: the data's own, each side at most ``MAX_DEFAULT_SIDE``); nothing is written."""
    out = Path(out)
    dataset, size = _encoder_dataset(data, config, progress=progress and process_state().is_main_process)
    config = config.replace(model=config.model.resolve(dataset.spatial_dims, dataset.channels, size))
    num_classes = len(dataset.class_names) if dataset.class_names else None
    fraction, seed = config.validation_fraction, config.train.seed
    train_rows, validation_rows = validation_split(len(dataset), fraction, seed)
    validation = None
    if validation_rows:
        items = [dataset[i] for i in validation_rows]
        images = torch.stack([item["image"] for item in items])
        validation = (images, torch.tensor([int(item["label"]) for item in items]))

    def make_encoder() -> DomainEncoder:
        return config.model.build()

    def make_task() -> FeaturesTask:
        trainer = EncoderTrainer(make_encoder(), config.projection_dim, num_classes)
        return FeaturesTask(trainer, config, validation, seed=config.train.seed)

    task_of_run: list[FeaturesTask] = []  # the task execute() trains, for finish()

    def make_run_task() -> FeaturesTask:
        task_of_run.append(make_task())
        return task_of_run[-1]

    def finish(result: TrainResult, final: FeaturesRunConfig, log: Callable[[str], None]) -> None:
        _save_encoder(result, task_of_run[-1], dataset, train_rows, len(validation_rows), final, out, log)

    params = sum(p.numel() for p in make_encoder().parameters()) / 1e6
    classes = ", ".join(dataset.class_names) if num_classes else "none (contrastive only)"
    held = (
        f"{len(validation_rows)} held out for validation (stops when the validation loss has not "
        f"improved for {config.patience} validations, at most {config.train.max_steps} steps)"
        if validation_rows
        else f"no validation (too few images or validation_fraction 0): {config.train.max_steps} steps"
    )
    summary = (
        f"# data: {len(dataset)} items, {dataset.spatial_dims}D at {size}; classes: {classes}; "
        f"{held}; encoder {params:.2f} M parameters"
    )
    return PreparedRun(
        command="medfusion features train",
        config=config,
        run_dir=out,
        make_task=seeded(config.train.seed, make_run_task),
        dataset=Subset(dataset, train_rows) if validation_rows else dataset,
        summary=summary,
        finish=finish,
    )


def _save_encoder(result, task, dataset, train_rows, validation_images, config, out, log) -> None:
    """Keep the encoder of the best validation, standardise its features over (up to
    ``STANDARDIZE_IMAGES``) training images, write ``encoder/`` and ``validation.json``."""
    encoder = result.models["encoder"].encoder
    kept = result.step
    if task.best is not None:  # the encoder of the best validation
        _, kept, weights = task.best
        encoder.load_state_dict(weights)
    encoder.eval()
    rows = train_rows[:: max(1, -(-len(train_rows) // STANDARDIZE_IMAGES))]
    device = next(encoder.parameters()).device
    encoder.standardize(
        torch.stack([dataset[i]["image"] for i in rows[start : start + 64]]).to(device)
        for start in range(0, len(rows), 64)
    )
    if not process_state().is_main_process:
        return
    record = {
        "kept_step": kept,
        "last_step": result.step,
        "stopped_early": result.step < config.train.max_steps,
        "validation_images": validation_images,
        "history": task.history,
    }
    atomic_write_text(out / VALIDATION_FILE, json.dumps(record, indent=2) + "\n")
    with atomic_dir(out / ENCODER_DIR, overwrite=True) as tmp:
        encoder.save_pretrained(tmp, safe_serialization=True)
    how = (
        f"the best validation, step {kept} of {result.step}"
        if task.best is not None
        else f"step {result.step}"
    )
    log(
        f"# saved the domain encoder ({how}) to {out / ENCODER_DIR} (the extractor of an evaluation: "
        f"features={str(out)!r}, or medfusion evaluate --features {out})"
    )


def train_domain_encoder(
    data: str | Path,
    out: str | Path,
    config: FeaturesRunConfig,
    resume: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    deadline: float | None = None,
) -> TrainResult | None:
    """Train a :class:`DomainEncoder` on the real images of ``data``; writes ``out/encoder/``
    (``config.json`` + safetensors), ``out/validation.json``, ``out/config.yaml``,
    ``out/checkpoints/``, ``out/logs/``. ``deadline``: see :func:`medfusion.training.run.execute`.

    Returns:
        the training result, or None for a dry run.
    """
    run = prepare_features_run(data, out, config, progress=progress)
    return execute(run, resume, dry_run, progress, log, callback, deadline)
