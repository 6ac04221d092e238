"""Training the class-conditional latent diffusion model: ``medfusion train``.

``train_diffusion`` loads the trained VAE, reads the data (latents encoded on the fly by the
frozen VAE, or once into a cache), trains the U-Net with :func:`medfusion.training.loop.train`,
logging grids of class-conditional samples, and writes the model folder (``RUN/model``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from medfusion.autoencoders.vae import VAE
from medfusion.config import Config, DataConfig
from medfusion.data.dataset import ImageFolderDataset, build_transform
from medfusion.data.fitting import (
    describe_training_data,
    fit_normalization,
    normalization_record,
    training_geometry,
)
from medfusion.diffusion.objective import DiffusionConfig, DiffusionObjective
from medfusion.diffusion.unet import UNet, UNetConfig
from medfusion.samplers.model_folder import ModelInfo, save_model_folder
from medfusion.samplers.sampling import sample_latents
from medfusion.samplers.schedulers import make_scheduler
from medfusion.training.latents import LatentDataset, build_latent_cache, cache_fingerprint
from medfusion.training.loop import TrainConfig, TrainingTask, TrainResult
from medfusion.training.run import PreparedRun, execute, seeded
from medfusion.training.vae import load_vae
from medfusion.utils import process_state

DIFFUSION_DIR = "diffusion"
MODEL_DIR = "model"


@dataclass(frozen=True)
class PreviewConfig(Config):
    """The class-conditional sample grids logged during training.

    Attributes:
        per_class: samples per class (one row per class); unconditional models show one row.
        max_classes: show at most this many classes.
        steps: DDIM steps of each preview.
        guidance_scale: classifier-free guidance of the previews.
        seed: the previews use the same noise every time, so grids are comparable across steps.
    """

    per_class: int = 8
    max_classes: int = 8
    steps: int = 25
    guidance_scale: float = 3.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("per_class", "max_classes", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"preview.{name} must be >= 1; got {getattr(self, name)}")


@dataclass(frozen=True)
class DiffusionRunConfig(Config):
    """Everything ``medfusion train`` needs; a YAML file has the sections data, model, diffusion,
    train, preview.

    Attributes:
        cache_latents: encode the data once into ``RUN/diffusion/latents`` and train from the
            cache (no random crops/flips then: each item is encoded as the centre crop).
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    cache_latents: bool = False


class DiffusionTask(TrainingTask):
    """The U-Net for the training loop; latents come from the frozen VAE or from a cache."""

    name = "unet"

    def __init__(self, unet: UNet, vae: VAE, config: DiffusionRunConfig, latent_shape: tuple[int, ...]):
        self.unet = unet
        self.vae = vae.eval().requires_grad_(False)
        self.objective = DiffusionObjective(config.diffusion)
        self.preview_config = config.preview
        self.latent_shape = latent_shape
        self.preview_nrow = config.preview.per_class
        self.accelerator = None

    def modules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet}

    def setup(self, accelerator) -> None:
        self.accelerator = accelerator
        self.vae.to(accelerator.device)

    @torch.no_grad()
    def latents(self, batch: dict) -> torch.Tensor:
        """A posterior draw per item (N, C, *spatial), scaled: from the cache or the encoder."""
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"], batch["latent_std"]
            return mean + std * torch.randn_like(std)
        with self.accelerator.autocast():
            return self.vae.encode_latents(batch["image"]).float()

    def training_step(
        self, models: Mapping[str, nn.Module], batch: dict, step: int
    ) -> Iterator[tuple[str, torch.Tensor, dict[str, torch.Tensor]]]:
        x0 = self.latents(batch)
        labels = batch["label"] if self.unet.num_classes is not None else None
        loss, terms = self.objective.loss(models["unet"], x0, labels, self.unet.null_class)
        yield "unet", loss, terms

    @torch.no_grad()
    def preview(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        labels = batch["label"]
        scheduler = make_scheduler("ddim", self.objective.schedule.scheduler_config)
        generator = torch.Generator().manual_seed(self.preview_config.seed)
        with self.accelerator.autocast():
            z = sample_latents(
                model,
                scheduler,
                (len(labels), *self.latent_shape),
                labels=labels if model.num_classes is not None else None,
                steps=self.preview_config.steps,
                guidance_scale=self.preview_config.guidance_scale,
                generator=generator,
            )
            images = self.vae.decode_latents(z)
        images = images.float().clamp(-1, 1)
        return images, {"std": float(images.std())}


def preview_labels(num_classes: int | None, config: PreviewConfig) -> torch.Tensor:
    """Labels of the preview grid: ``per_class`` of each of the first ``max_classes`` classes."""
    classes = 1 if num_classes is None else min(num_classes, config.max_classes)
    return torch.arange(classes).repeat_interleave(config.per_class)


def build_diffusion_dataset(
    data: str | Path, config: DiffusionRunConfig, progress: bool = True
) -> tuple[ImageFolderDataset, DataConfig]:
    """The training images with the data config's transforms (deterministic ones when caching),
    and the data config with its normalisation fitted on them
    (:func:`~medfusion.data.fitting.fit_normalization`; fitted bounds, e.g. the VAE run's, are kept)."""
    dataset = ImageFolderDataset(
        data,
        labels=config.data.labels,
        skip_bad=config.data.skip_bad,
        seed=config.data.seed,
        validate="header",
        progress=progress,
    )
    fitted = fit_normalization(dataset, config.data, progress=progress)
    seen = fitted.replace(random_crop=False, flip_axes=()) if config.cache_latents else fitted
    dataset.transform = build_transform(seen)
    return dataset, fitted


def _check_compatible(dataset: ImageFolderDataset, vae: VAE, vae_path) -> tuple[int, ...]:
    if (dataset.spatial_dims, dataset.channels) != (vae.config.spatial_dims, vae.config.in_channels):
        raise ValueError(
            f"{dataset.root}: the images are {dataset.spatial_dims}D with {dataset.channels} channel(s), "
            f"but the VAE {vae_path} was trained on {vae.config.spatial_dims}D with "
            f"{vae.config.in_channels}"
        )
    image_shape = tuple(dataset[0]["image"].shape)
    return tuple(vae.latent_shape(image_shape[1:]))  # (C, *spatial)


def _num_classes(dataset: ImageFolderDataset) -> int | None:
    labels = dataset.labels
    if all(label < 0 for label in labels):
        return None
    if any(label < 0 for label in labels):
        raise ValueError(f"{dataset.root}: some files have a class and some have none; label all or none")
    return dataset.num_classes


def resolved_config(config: DiffusionRunConfig, dataset, vae: VAE) -> DiffusionRunConfig:
    """The config with the U-Net's dims, latent channels and classes filled in."""
    model = config.model.resolve(vae.config.spatial_dims, vae.config.latent_channels, _num_classes(dataset))
    return dataclasses.replace(config, model=model)


def model_info(dataset: ImageFolderDataset, config: DiffusionRunConfig, vae: VAE, latent_shape) -> ModelInfo:
    data = config.data
    spacing, direction = training_geometry(dataset, data)
    return ModelInfo(
        spatial_dims=dataset.spatial_dims,
        image_size=tuple(s * vae.downsampling_factor for s in latent_shape[1:]),
        channels=dataset.channels,
        latent_shape=tuple(latent_shape),
        class_names=tuple(dataset.class_names) if config.model.num_classes is not None else (),
        scaling_factor=vae.scaling_factor,
        normalization=normalization_record(data),
        source_dtype=dataset.info.dtype,
        spacing=spacing,
        direction=direction,
        training_data=describe_training_data(dataset),
    )


def prepare_diffusion_run(
    data: str | Path, vae_path: str | Path, out: str | Path, config: DiffusionRunConfig, progress: bool = True
) -> PreparedRun:
    """Load the VAE, read the data of ``medfusion train`` and resolve its config (nothing is
    written); the model folder's metadata is checked now, not after training."""
    out = Path(out)
    run_dir = out / DIFFUSION_DIR
    vae = load_vae(vae_path)
    main = process_state().is_main_process
    dataset, fitted = build_diffusion_dataset(data, config, progress=progress and main)
    config = dataclasses.replace(config, data=fitted)
    latent_shape = _check_compatible(dataset, vae, vae_path)
    config = resolved_config(config, dataset, vae)
    dims, channels, classes = vae.config.spatial_dims, vae.config.latent_channels, config.model.num_classes
    probe = config.model.build(dims, channels, classes)
    probe._check_input(torch.empty(1, *latent_shape, device="meta"))  # latent size vs levels
    info = model_info(dataset, config, vae, latent_shape)  # checked now (class names ...), not after training
    params = sum(p.numel() for p in probe.parameters()) / 1e6
    names = ", ".join(dataset.class_names) if classes else "none (unconditional)"
    summary = (
        f"# data: {len(dataset)} items, {dataset.spatial_dims}D, {dataset.channels} channel(s); "
        f"classes: {names}\n# latents {latent_shape} from {vae_path} (scaling factor "
        f"{vae.scaling_factor:.4g}); U-Net: {params:.2f} M parameters"
    )

    def make_task() -> DiffusionTask:
        return DiffusionTask(config.model.build(dims, channels, classes), vae, config, latent_shape)

    def finish(result: TrainResult, final: DiffusionRunConfig, log: Callable[[str], None]) -> None:
        if process_state().is_main_process:
            trained = result.models["unet"].to("cpu")
            path = save_model_folder(
                out / MODEL_DIR, trained, vae.to("cpu"), final.diffusion.scheduler_config(), info
            )
            log(f"saved the model folder {path} (U-Net EMA weights, VAE, schedule, medfusion.json)")

    def probe_batch(batch_size: int) -> dict:
        """Latents as the cache holds them (or images to encode when training without a cache)."""
        labels = torch.arange(batch_size) % (classes or 1)
        if not config.cache_latents:
            images = torch.stack([dataset[i % len(dataset)]["image"] for i in range(batch_size)])
            return {"image": images, "label": labels}
        mean = torch.randn(batch_size, *latent_shape)
        return {"latent_mean": mean, "latent_std": torch.full_like(mean, 0.1), "label": labels}

    return PreparedRun(
        command="medfusion train",
        config=config,
        run_dir=run_dir,
        make_task=seeded(config.train.seed, make_task),
        dataset=lambda: _training_set(dataset, vae, config, run_dir, process_state(), progress),
        summary=summary,
        finish=finish,
        preview_batch={"label": preview_labels(classes, config.preview)},
        probe_batch=probe_batch,
        lock_dir=out,
    )


def train_diffusion(
    data: str | Path,
    vae_path: str | Path,
    out: str | Path,
    config: DiffusionRunConfig,
    resume: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    deadline: float | None = None,
) -> TrainResult | None:
    """Train a class-conditional latent diffusion U-Net on ``data`` with the VAE at ``vae_path``.

    Writes ``out/diffusion/`` (``config.yaml``, ``checkpoints/``, ``logs/`` with sample grids,
    ``latents/`` when caching) and, at the end, the model folder ``out/model/``.
    ``deadline``: see :func:`medfusion.training.run.execute`.

    Returns:
        the training result, or None for a dry run.
    """
    run = prepare_diffusion_run(data, vae_path, out, config, progress=progress)
    return execute(run, resume, dry_run, progress, log, callback, deadline)


def _training_set(dataset: ImageFolderDataset, vae: VAE, config, run_dir: Path, state, progress) -> Dataset:
    """The images, or with ``cache_latents`` their latents (the cache built by the main process)."""
    if not config.cache_latents:
        return dataset
    fingerprint = cache_fingerprint(vae, dataset, config.data.to_dict())
    if state.is_main_process:
        build_latent_cache(
            vae,
            dataset,
            run_dir / "latents",
            fingerprint,
            batch_size=config.train.batch_size,
            device=state.device,
            num_workers=config.train.num_workers,
            progress=progress,
        )
    state.wait_for_everyone()
    return LatentDataset(run_dir / "latents", samples=dataset.samples)
