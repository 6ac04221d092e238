"""Training a VAE on a folder of images or volumes: ``medfusion train-vae``.

``train_vae`` reads the data, builds the model, runs :func:`medfusion.training.loop.train`, then
measures the latent scaling factor, saves ``RUN/vae/`` (diffusers format) and evaluates the
reconstructions of held-out images into ``RUN/vae_eval.json``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from medfusion.autoencoders.losses import VAELoss, VAELossConfig
from medfusion.autoencoders.vae import VAE, VAEConfig
from medfusion.config import Config, DataConfig
from medfusion.data.dataset import DatasetSubset, ImageFolderDataset, build_transform, split_indices
from medfusion.data.fitting import fit_normalization
from medfusion.metrics.reconstruction import ReconstructionMeter, psnr
from medfusion.training.loop import TrainConfig, TrainingTask, TrainResult
from medfusion.training.run import PreparedRun, execute, seeded
from medfusion.utils import atomic_dir, atomic_write_text, process_state
from medfusion.visualize import reconstruction_grid


@dataclass(frozen=True)
class VAERunConfig(Config):
    """Everything ``medfusion train-vae`` needs; a YAML file has the sections data, model, loss, train.

    Attributes:
        heldout: folder of held-out images for the evaluation; None: hold out
            ``heldout_fraction`` of every class of the training folder (not trained on).
        heldout_fraction: see ``heldout``.
        eval_max_images: evaluate on at most this many held-out images.
        scaling_samples: training images whose latents set the scaling factor (1/std).
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: VAEConfig = field(default_factory=VAEConfig)
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    heldout: str | None = None
    heldout_fraction: float = 0.1
    eval_max_images: int = 1000
    scaling_samples: int = 512

    def __post_init__(self) -> None:
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be between 0 and 1; got {self.heldout_fraction}")
        for name in ("eval_max_images", "scaling_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")


class VAETask(TrainingTask):
    """The VAE (and its discriminator, when the adversarial term is on) for the training loop."""

    name = "vae"

    def __init__(self, vae: VAE, loss: VAELoss):
        self.vae = vae
        self.loss = loss
        self.discriminator = loss.make_discriminator()

    def modules(self) -> dict[str, nn.Module]:
        modules: dict[str, nn.Module] = {"vae": self.vae}
        if self.discriminator is not None:
            modules["discriminator"] = self.discriminator
        return modules

    def learning_rate(self, module: str, default: float) -> float:
        if module == "discriminator" and self.loss.config.discriminator_learning_rate is not None:
            return self.loss.config.discriminator_learning_rate
        return default

    def setup(self, accelerator) -> None:
        self.loss.to(accelerator.device)

    def training_step(
        self, models: Mapping[str, nn.Module], batch: dict, step: int
    ) -> Iterator[tuple[str, torch.Tensor, dict[str, torch.Tensor]]]:
        x = batch["image"]
        output = models["vae"](x)
        discriminator = models.get("discriminator")
        loss, terms = self.loss.generator_loss(
            x,
            output,
            step,
            discriminator=extract_model_from_parallel(discriminator) if discriminator is not None else None,
            last_layer=extract_model_from_parallel(models["vae"]).last_layer_weight(),
        )
        yield "vae", loss, terms
        if self.loss.adversarial_active(step):
            d_loss, d_terms = self.loss.discriminator_loss(discriminator, x, output.reconstruction)
            yield "discriminator", d_loss, d_terms

    @torch.no_grad()
    def preview(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        x = batch["image"]
        recon = model(x, sample_posterior=False).reconstruction.float().clamp(-1, 1)
        return reconstruction_grid(x, recon), {"psnr": float(psnr(recon, x).mean())}


@dataclass(frozen=True)
class VAEDatasets:
    """The training and held-out datasets of a run."""

    train: Dataset
    heldout: Dataset
    heldout_source: str
    data: DataConfig  # the run's data config with its normalisation fitted on the training images


def build_vae_datasets(data: str | Path, config: VAERunConfig, progress: bool = True) -> VAEDatasets:
    """Training items (with the random transforms) and held-out items (centre crop, no flips), with
    the intensity normalisation fitted on the training folder
    (:func:`~medfusion.data.fitting.fit_normalization`)."""
    common = dict(labels=config.data.labels, skip_bad=config.data.skip_bad, seed=config.data.seed)
    full = ImageFolderDataset(data, validate="header", progress=progress, **common)
    data_config = fit_normalization(full, config.data, progress=progress)
    train_tf = build_transform(data_config)
    eval_tf = build_transform(data_config.replace(random_crop=False, flip_axes=()))
    full.transform = train_tf
    if config.heldout is not None:
        heldout = ImageFolderDataset(
            config.heldout, labels="none", transform=eval_tf, skip_bad=config.data.skip_bad, validate="header"
        )
        if (heldout.spatial_dims, heldout.channels) != (full.spatial_dims, full.channels):
            raise ValueError(
                f"{config.heldout}: held-out images are {heldout.spatial_dims}D with {heldout.channels} "
                f"channel(s); the training images are {full.spatial_dims}D with {full.channels}"
            )
        return VAEDatasets(full, heldout, str(config.heldout), data_config)
    kept, held = split_indices(full.labels, config.heldout_fraction, seed=config.data.seed)
    if not held:
        raise ValueError(
            f"{data}: too few images to hold any out for evaluation ({len(full)}); pass a held-out folder"
        )
    evaluation = ImageFolderDataset(data, transform=eval_tf, class_names=full.class_names, **common)
    source = f"{len(held)} images held out of {data} (heldout_fraction {config.heldout_fraction})"
    return VAEDatasets(DatasetSubset(full, kept), DatasetSubset(evaluation, held), source, data_config)


@torch.no_grad()
def measure_scaling_factor(vae: VAE, dataset: Dataset, max_images: int, batch_size: int, device) -> float:
    """1 / std of posterior draws over up to ``max_images`` items of ``dataset``."""
    loader = DataLoader(dataset, batch_size=batch_size)
    total = sum_sq = count = 0.0
    seen = 0
    generator = torch.Generator(device="cpu").manual_seed(0)
    for batch in loader:
        x = batch["image"][: max_images - seen].to(device)
        z = vae.encode(x).sample(generator).double()
        total += float(z.sum())
        sum_sq += float(z.pow(2).sum())
        count += z.numel()
        seen += x.shape[0]
        if seen >= max_images:
            break
    mean = total / count
    std = max(sum_sq / count - mean**2, 0.0) ** 0.5
    if not std > 0:
        raise RuntimeError("the latents have zero variance; the VAE did not train (check the loss curve)")
    return 1.0 / std


@torch.no_grad()
def evaluate_reconstruction(
    vae: VAE, dataset: Dataset, max_images: int, batch_size: int, device, progress: bool = True
) -> dict:
    """PSNR / SSIM / MS-SSIM of posterior-mean reconstructions of up to ``max_images`` items."""
    meter = ReconstructionMeter()
    loader = DataLoader(dataset, batch_size=batch_size)
    seen = 0
    with tqdm(
        total=min(max_images, len(dataset)), desc="evaluating", unit="img", disable=not progress
    ) as bar:
        for batch in loader:
            x = batch["image"][: max_images - seen].to(device)
            recon = vae(x, sample_posterior=False).reconstruction.float().clamp(-1, 1)
            meter.update(recon.cpu(), x.float().cpu())
            seen += x.shape[0]
            bar.update(x.shape[0])
            if seen >= max_images:
                break
    return meter.compute().to_dict()


def resolved_config(config: VAERunConfig, dataset: Dataset) -> VAERunConfig:
    """The config with the model's spatial dims and channels filled in from the data."""
    model = config.model.resolve(dataset.spatial_dims, dataset.channels)
    return dataclasses.replace(config, model=model)


def prepare_vae_run(
    data: str | Path, out: str | Path, config: VAERunConfig, progress: bool = True
) -> PreparedRun:
    """Read the data of ``medfusion train-vae`` and resolve its config (nothing is written).

    Raises ``ValueError`` when the image size does not suit the model, before any training.
    """
    out = Path(out)
    datasets = build_vae_datasets(data, config, progress=progress and process_state().is_main_process)
    config = dataclasses.replace(resolved_config(config, datasets.train), data=datasets.data)
    dims, channels = datasets.train.spatial_dims, datasets.train.channels
    item_shape = tuple(datasets.train[0]["image"].shape)
    probe = config.model.build(dims, channels)
    latent = probe.latent_shape(item_shape[1:])  # raises when the image size does not suit the model
    params = sum(p.numel() for p in probe.parameters())
    summary = (
        f"# data: {len(datasets.train)} training items, {dims}D, {channels} channel(s); held out: "
        f"{datasets.heldout_source}\n"
        f"# model: {params / 1e6:.2f} M parameters; images {item_shape} -> latents {latent}"
    )

    def make_task() -> VAETask:
        return VAETask(config.model.build(dims, channels), VAELoss(config.loss, dims, channels))

    def finish(result: TrainResult, final: VAERunConfig, log: Callable[[str], None]) -> None:
        if process_state().is_main_process:
            _finish(result.models["vae"], datasets, out, final, process_state().device, progress, log)

    preview = next(iter(DataLoader(datasets.heldout, batch_size=min(8, len(datasets.heldout)))))
    return PreparedRun(
        command="medfusion train-vae",
        config=config,
        run_dir=out,
        make_task=seeded(config.train.seed, make_task),
        dataset=datasets.train,
        summary=summary,
        finish=finish,
        preview_batch=preview,
    )


def train_vae(
    data: str | Path,
    out: str | Path,
    config: VAERunConfig,
    resume: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    deadline: float | None = None,
) -> TrainResult | None:
    """Train a VAE on the images of ``data`` into the run folder ``out``.

    Writes ``out/config.yaml`` (the resolved config), ``out/checkpoints/``, ``out/logs/``,
    ``out/vae/`` (the EMA model with its scaling factor, loadable with ``VAE.from_pretrained``)
    and ``out/vae_eval.json``. With ``dry_run`` only prints the resolved config and the model size.
    ``deadline``: see :func:`medfusion.training.run.execute`.

    Returns:
        the training result, or None for a dry run.
    """
    run = prepare_vae_run(data, out, config, progress=progress)
    return execute(run, resume, dry_run, progress, log, callback, deadline)


def _finish(vae: VAE, datasets: VAEDatasets, out: Path, config: VAERunConfig, device, progress, log) -> None:
    vae.eval()
    batch = config.train.batch_size
    factor = measure_scaling_factor(vae, datasets.train, config.scaling_samples, batch, device)
    vae.set_scaling_factor(factor)
    with atomic_dir(out / "vae", overwrite=True) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
    metrics = evaluate_reconstruction(vae, datasets.heldout, config.eval_max_images, batch, device, progress)
    report = {
        **metrics,
        "heldout": datasets.heldout_source,
        "scaling_factor": factor,
        "steps": config.train.max_steps,
        "model": str(out / "vae"),
    }
    atomic_write_text(out / "vae_eval.json", json.dumps(report, indent=2) + "\n")
    log(
        f"saved {out / 'vae'} (scaling factor {factor:.4g}); held-out reconstruction: "
        f"PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}, MS-SSIM {metrics['ms_ssim']:.4f} "
        f"-> {out / 'vae_eval.json'}"
    )


def load_vae(path: str | Path) -> VAE:
    """The trained VAE of a ``train-vae`` run (``RUN/vae``), checked for a scaling factor."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}: no trained VAE here (config.json missing); pass the vae/ folder that "
            "`medfusion train-vae` wrote (RUN/vae)"
        )
    vae = VAE.from_pretrained(path, use_safetensors=True)
    return vae.eval().requires_grad_(False)


def evaluate_vae(
    vae_path: str | Path,
    data: str | Path,
    data_config: DataConfig | None = None,
    max_images: int = 1000,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict:
    """Reconstruction metrics (PSNR, SSIM, MS-SSIM of posterior means) of the VAE at ``vae_path``
    on the images of ``data``; the data settings default to those of the VAE's run
    (``RUN/config.yaml`` beside ``RUN/vae``), without random crops or flips."""
    vae_path = Path(vae_path)
    vae = load_vae(vae_path).to(device)
    if data_config is None:
        saved = vae_path.parent / "config.yaml"
        data_config = VAERunConfig.load(saved).data if saved.is_file() else DataConfig()
    data_config = data_config.replace(random_crop=False, flip_axes=())
    dataset = ImageFolderDataset(
        data,
        labels="none",
        transform=build_transform(data_config),
        skip_bad=data_config.skip_bad,
        validate="header",
    )
    if (dataset.spatial_dims, dataset.channels) != (vae.config.spatial_dims, vae.config.in_channels):
        raise ValueError(
            f"{data}: {dataset.spatial_dims}D images with {dataset.channels} channel(s); the VAE takes "
            f"{vae.config.spatial_dims}D with {vae.config.in_channels}"
        )
    metrics = evaluate_reconstruction(vae, dataset, max_images, batch_size, device, progress)
    return {**metrics, "data": str(data), "images": min(max_images, len(dataset)), "model": str(vae_path)}
