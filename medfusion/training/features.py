"""Training the domain feature encoder of the evaluators: ``medfusion features train``.

The encoder (:class:`medfusion.metrics.features.DomainEncoder`) learns features of the real
reference images by contrast (SimCLR's NT-Xent, Chen et al. 2020): two random views of each image
(crop and resize, flips, intensity jitter, noise) must find each other among the batch. When the
data has classes, a linear classifier on the features adds a cross-entropy term, so classes
separate. It trains on the shared loop (checkpoints, resume, bf16, several GPUs) and writes
``FEAT/encoder/`` (``config.json`` + safetensors), which ``--features FEAT`` loads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medfusion.config import Config, DataConfig
from medfusion.data.dataset import ImageFolderDataset, build_transform
from medfusion.data.transforms import Compose, Resize
from medfusion.metrics.features import ENCODER_DIR, DomainEncoder
from medfusion.runlock import run_lock
from medfusion.training.loop import (
    TrainConfig,
    TrainingTask,
    TrainResult,
    check_new_run,
    process_state,
    train,
)
from medfusion.utils import atomic_dir, atomic_write_text

MAX_DEFAULT_SIDE = 128


@dataclass(frozen=True)
class EncoderConfig(Config):
    """The domain encoder's shape (see :class:`DomainEncoder`)."""

    block_out_channels: tuple[int, ...] = (32, 64, 128, 256)
    layers_per_block: int = 1
    num_features: int = 256
    norm_num_groups: int = 16


@dataclass(frozen=True)
class FeaturesRunConfig(Config):
    """Everything ``medfusion features train`` needs; sections data, model, train.

    Attributes:
        image_size: size the encoder works at (array order); None: the first image's (after the
            data transforms), each side capped at 128. Every image is resized to it.
        temperature: NT-Xent temperature.
        projection_dim: width of the contrastive projection head (discarded after training).
        class_weight: weight of the classification term when the data has classes (0: off).
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: EncoderConfig = field(default_factory=EncoderConfig)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(max_steps=500, batch_size=64, learning_rate=1e-3)
    )
    image_size: tuple[int, ...] | None = None
    temperature: float = 0.2
    projection_dim: int = 128
    class_weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0; got {self.temperature}")
        if self.class_weight < 0:
            raise ValueError(f"class_weight must be >= 0; got {self.class_weight}")


def random_view(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random view of every image of ``x`` (N, C, *spatial) in [-1, 1], 2D or 3D alike: a crop
    of 60-100% of each side resized back, random flips, contrast/brightness jitter and noise."""
    n, spatial = x.shape[0], x.shape[2:]
    views = []
    for i in range(n):
        item = x[i : i + 1]
        fractions = 0.6 + 0.4 * torch.rand(len(spatial), generator=generator)
        sizes = [max(1, round(s * float(f))) for s, f in zip(spatial, fractions)]
        starts = [int(torch.randint(0, s - c + 1, (1,), generator=generator)) for s, c in zip(spatial, sizes)]
        crop = item[(slice(None), slice(None), *(slice(a, a + c) for a, c in zip(starts, sizes)))]
        mode = "bilinear" if len(spatial) == 2 else "trilinear"
        item = F.interpolate(crop, size=tuple(spatial), mode=mode, align_corners=False)
        flips = [d + 2 for d in range(len(spatial)) if float(torch.rand(1, generator=generator)) < 0.5]
        if flips:
            item = item.flip(flips)
        contrast = 0.8 + 0.4 * float(torch.rand(1, generator=generator))
        brightness = 0.2 * float(torch.rand(1, generator=generator)) - 0.1
        noise = 0.02 * torch.randn(item.shape, generator=generator).to(item.device)
        views.append((item * contrast + brightness + noise).clamp(-1, 1))
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
        width = encoder.num_features
        self.projection = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, projection_dim))
        self.classifier = nn.Linear(width, num_classes) if num_classes else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        features = self.encoder(x)
        logits = self.classifier(features) if self.classifier is not None else None
        return features, self.projection(features), logits


class FeaturesTask(TrainingTask):
    """Contrastive (and, with classes, supervised) training of the domain encoder."""

    name = "encoder"

    def __init__(self, trainer: EncoderTrainer, config: FeaturesRunConfig, seed: int):
        self.trainer = trainer
        self.config = config
        self.generator = torch.Generator().manual_seed(seed)

    def modules(self) -> dict[str, nn.Module]:
        return {"encoder": self.trainer}

    def training_step(
        self, models: Mapping[str, nn.Module], batch: dict, step: int
    ) -> Iterator[tuple[str, torch.Tensor, dict[str, torch.Tensor]]]:
        x = batch["image"]
        model = models["encoder"]
        v1, v2 = random_view(x, self.generator), random_view(x, self.generator)
        _, z, logits = model(torch.cat([v1, v2]))
        z1, z2 = z.chunk(2)
        contrastive = nt_xent(z1, z2, self.config.temperature)
        terms = {"nt_xent": contrastive.detach()}
        loss = contrastive
        labels = batch["label"]
        if logits is not None and self.config.class_weight > 0 and bool((labels >= 0).all()):
            classification = F.cross_entropy(logits.float(), torch.cat([labels, labels]))
            terms["cross_entropy"] = classification.detach()
            loss = loss + self.config.class_weight * classification
        yield "encoder", loss, terms

    @torch.no_grad()
    def preview(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        x = batch["image"]
        features, _, _ = model(x)
        similarity = F.normalize(features.float(), dim=1) @ F.normalize(features.float(), dim=1).T
        off_diagonal = similarity[~torch.eye(len(x), dtype=torch.bool, device=x.device)]
        return random_view(x, torch.Generator().manual_seed(0)).float(), {
            "mean_cosine": float(off_diagonal.mean())
        }


def train_domain_encoder(
    data: str | Path,
    out: str | Path,
    config: FeaturesRunConfig,
    resume: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult | None:
    """Train a :class:`DomainEncoder` on the real images of ``data``; writes ``out/encoder/``
    (``config.json`` + safetensors), ``out/config.yaml``, ``out/checkpoints/``, ``out/logs/``."""
    out = Path(out)
    state = process_state()
    transform = build_transform(config.data.replace(random_crop=False, flip_axes=()))
    dataset = ImageFolderDataset(
        data,
        labels=config.data.labels,
        transform=transform,
        skip_bad=config.data.skip_bad,
        validate="header",
        progress=progress and state.is_main_process,
    )
    produced = tuple(dataset[0]["image"].shape[1:])  # after the data transforms
    if config.image_size:
        size = tuple(config.image_size)
    else:  # the data's own size, each side at most MAX_DEFAULT_SIDE (features need no fine detail)
        size = tuple(min(side, MAX_DEFAULT_SIDE) for side in produced)
    if len(size) != dataset.spatial_dims:
        raise ValueError(f"image_size {list(size)} does not fit {dataset.spatial_dims}D data")
    if size != produced:  # resized last, after every data transform, so that the encoder sees `size`
        dataset.transform = Compose([transform, Resize(size)])
    config = config.replace(image_size=size)
    num_classes = len(dataset.class_names) if dataset.class_names else None
    torch.manual_seed(config.train.seed)
    encoder = DomainEncoder(
        spatial_dims=dataset.spatial_dims,
        in_channels=dataset.channels,
        image_size=size,
        **config.model.to_dict(),
    )
    if state.is_main_process:
        log(f"# medfusion features train: resolved config\n{config.to_yaml()}")
        params = sum(p.numel() for p in encoder.parameters()) / 1e6
        classes = ", ".join(dataset.class_names) if num_classes else "none (contrastive only)"
        log(
            f"# data: {len(dataset)} items, {dataset.spatial_dims}D at {size}; classes: {classes}; "
            f"encoder {params:.2f} M parameters"
        )
    if dry_run:
        return None
    with run_lock(out, "medfusion features train"):
        check_new_run(out, resume)  # before config.yaml replaces an earlier run's
        if state.is_main_process:
            atomic_write_text(out / "config.yaml", config.to_yaml())
        trainer = EncoderTrainer(encoder, config.projection_dim, num_classes)
        task = FeaturesTask(trainer, config, seed=config.train.seed + state.process_index)
        result = train(task, dataset, out, config.train, resume=resume, callback=callback, progress=progress)
        if state.is_main_process:
            with atomic_dir(out / ENCODER_DIR, overwrite=True) as tmp:
                result.models["encoder"].encoder.save_pretrained(tmp, safe_serialization=True)
            log(f"# saved the domain encoder to {out / ENCODER_DIR} (use it with --features {out})")
        state.wait_for_everyone()
    return result
