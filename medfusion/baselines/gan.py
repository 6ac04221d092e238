"""Training a GAN baseline on a folder of images or volumes (``medfusion train-gan``), and the GAN
model folder as an :class:`~medfusion.samplers.ImageGenerator`.

``train_gan`` reads the data (the intensity normalisation fitted on it, as for the VAE), builds the
architecture's generator and discriminator (:mod:`medfusion.baselines.arch`), trains them with
:func:`medfusion.training.loop.train` and writes the model folder::

    RUN/model/
      medfusion.json               kind (the architecture's name), image size, channels, classes,
                                   intensity normalisation, spacing, direction, training data
      generator/config.json        the generator's constructor arguments
      generator/*.safetensors      its EMA weights

:func:`load_gan_generator` reads such a folder (no code from it is executed) and
:func:`medfusion.samplers.write_generated_dataset` writes its samples like a diffusion model's;
importing :mod:`medfusion.baselines` registers the loader for every architecture's kind.

Steps: the loop's ``train.max_steps`` counts discriminator updates; the generator is updated after
every ``critic_steps``-th of them, the first included (its learning-rate schedule ticks at its own
updates), and the EMA of its weights follows every step.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn

from medfusion.baselines.arch import GANArchitecture, architecture, architecture_module, with_options
from medfusion.config import Config, DataConfig
from medfusion.data.dataset import ImageFolderDataset, build_transform
from medfusion.data.fitting import (
    describe_training_data,
    fit_normalization,
    normalization_record,
    training_geometry,
)
from medfusion.samplers.generator import ImageGenerator
from medfusion.samplers.model_folder import (
    INFO_FILE,
    ModelFolderError,
    ModelInfo,
    network_skeleton,
    read_model_info,
)
from medfusion.training.loop import TrainConfig, TrainingTask, TrainResult
from medfusion.training.run import PreparedRun, execute, seeded
from medfusion.utils import atomic_dir, process_state

MODEL_DIR = "model"
GENERATOR_DIR = "generator"
NOISE_STATE = "noise"
REGULARIZATION_STATE = "regularization"


@dataclass(frozen=True)
class GANTrainConfig(TrainConfig):
    """:class:`~medfusion.training.loop.TrainConfig` with the defaults of a GAN run: WGAN-GP's Adam
    betas (0.0, 0.9) (the loop's AdamW takes its betas from here, for both networks), a constant
    learning rate without warm-up, no gradient clipping (it would fight the gradient penalty)."""

    max_steps: int = 20_000
    batch_size: int = 32
    learning_rate: float = 1e-4
    adam_betas: tuple[float, float] = (0.0, 0.9)
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    max_grad_norm: float | None = None


@dataclass(frozen=True)
class GANPreviewConfig(Config):
    """The sample grids logged during training (the EMA generator on fixed noise and labels).

    Attributes:
        per_class: samples per class (one row per class); unconditional models show one row.
        max_classes: show at most this many classes.
        seed: of the fixed noise.
    """

    per_class: int = 8
    max_classes: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("per_class", "max_classes"):
            if getattr(self, name) < 1:
                raise ValueError(f"preview.{name} must be >= 1; got {getattr(self, name)}")


@dataclass(frozen=True)
class GANRunConfig(Config):
    """Everything ``medfusion train-gan`` needs; a YAML file has the sections data, arch, model,
    gan, train, preview.

    The defaults suit 64x64 images and 32^3 volumes on a CPU (the generator starts from a 4x4 /
    2^3 grid and doubles it 4 times, 32 channels at full resolution).

    Attributes:
        arch: the architecture (``wgan-gp``, ``stylegan2``; see
            :data:`medfusion.baselines.arch.ARCHITECTURES`).
        model: the architecture's network options (for ``wgan-gp``: ``z_dim``, ``channels``,
            ``levels`` ...; see its ``build``).
        gan: the architecture's training settings (for ``wgan-gp``: ``gp_weight``,
            ``critic_steps``, ``drift_weight``); empty: its defaults.
        discriminator_learning_rate: the discriminator's; None: ``train.learning_rate``.
    """

    data: DataConfig = field(default_factory=DataConfig)
    arch: str = "wgan-gp"
    model: dict[str, Any] = field(default_factory=dict)
    gan: dict[str, Any] = field(default_factory=dict)
    train: GANTrainConfig = field(default_factory=GANTrainConfig)
    preview: GANPreviewConfig = field(default_factory=GANPreviewConfig)
    discriminator_learning_rate: float | None = None

    def __post_init__(self) -> None:
        for name in ("model", "gan"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be a mapping of options; got {getattr(self, name)!r}")
        lr = self.discriminator_learning_rate
        if lr is not None and not lr > 0:
            raise ValueError(f"discriminator_learning_rate must be > 0 or null; got {lr}")


class GANTask(TrainingTask):
    """The generator and discriminator of a GAN for the training loop.

    Each step updates the discriminator on real images and detached fakes; every
    ``arch.critic_steps``-th step (from the first) then updates the generator on the same fakes
    through the discriminator with its weights frozen. The noise comes from :attr:`noise`, a
    generator whose state is part of the checkpoints (every process draws the noise of the whole
    global batch and takes its own slice, so one saved state serves all of them).

    Args:
        arch: the architecture (its losses and ``critic_steps``).
        generator, discriminator: the networks (the generator has ``z_dim``).
        num_classes: None: unconditional (labels are not used).
        seed: of the noise.
        preview: the preview grid's settings.
        discriminator_learning_rate: None: the training config's.
    """

    name = "gan"

    def __init__(
        self,
        arch: GANArchitecture,
        generator: nn.Module,
        discriminator: nn.Module,
        num_classes: int | None,
        seed: int = 0,
        preview: GANPreviewConfig | None = None,
        discriminator_learning_rate: float | None = None,
    ):
        self.arch, self.generator, self.discriminator = arch, generator, discriminator
        self.num_classes = num_classes
        self.z_dim = int(generator.z_dim)
        self.noise = torch.Generator().manual_seed(int(seed))
        self.preview_config = preview or GANPreviewConfig()
        self.preview_nrow = self.preview_config.per_class
        self.discriminator_learning_rate = discriminator_learning_rate
        self.rank, self.world = 0, 1
        self.regularization: dict[str, torch.Tensor] = {}  # the architecture's state across steps

    def modules(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "discriminator": self.discriminator}

    def learning_rate(self, module: str, default: float) -> float:
        if module == "discriminator" and self.discriminator_learning_rate is not None:
            return self.discriminator_learning_rate
        return default

    def setup(self, accelerator) -> None:
        self.rank, self.world = accelerator.process_index, accelerator.num_processes

    def draw_noise(self, n: int, device: torch.device) -> torch.Tensor:
        """This process's ``(n, z_dim)`` slice of the global batch's noise."""
        z = torch.randn(n * self.world, self.z_dim, generator=self.noise)
        return z[self.rank * n : (self.rank + 1) * n].to(device)

    def updates_generator(self, step: int) -> bool:
        """Whether the step after ``step`` optimizer steps also updates the generator: every
        ``critic_steps``-th, the first included (so a step timed at step 0 times both networks)."""
        return step % self.arch.critic_steps == 0

    def training_step(
        self, models: Mapping[str, nn.Module], batch: dict, step: int
    ) -> Iterator[tuple[str, torch.Tensor, dict[str, torch.Tensor]]]:
        real = batch["image"]
        labels = batch["label"] if self.num_classes is not None else None
        z = self.draw_noise(len(real), real.device)
        update_generator = self.updates_generator(step)
        with torch.set_grad_enabled(update_generator):
            fake = models["generator"](z, labels)  # (N, C, *spatial)
        d_loss, d_terms = self.arch.discriminator_loss(
            models["discriminator"], real, fake.detach(), labels, step
        )
        yield "discriminator", d_loss, d_terms
        if not update_generator:
            return
        frozen = extract_model_from_parallel(models["discriminator"])
        frozen.requires_grad_(False)  # the generator's loss leaves no gradient in the discriminator
        try:
            g_loss, g_terms = self.arch.generator_loss(frozen, fake, labels, step)
        finally:
            frozen.requires_grad_(True)
        extra = self.arch.generator_regularization(
            models["generator"], z, labels, step // self.arch.critic_steps, self.regularization
        )
        if extra is not None:
            g_loss, g_terms = g_loss + extra[0], {**g_terms, **extra[1]}
        yield "generator", g_loss, g_terms

    @torch.no_grad()
    def preview(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        labels = batch["label"]
        device = next(model.parameters()).device
        generator = torch.Generator().manual_seed(self.preview_config.seed)
        z = torch.randn(len(labels), self.z_dim, generator=generator).to(device)
        images = model(z, labels.to(device) if self.num_classes is not None else None)
        images = images.float().clamp(-1, 1)
        return images, {"std": float(images.std())}

    def state_dict(self) -> dict:
        regularization = {k: v.detach().cpu() for k, v in self.regularization.items()}
        return {NOISE_STATE: self.noise.get_state(), REGULARIZATION_STATE: regularization}

    def load_state_dict(self, state: dict) -> None:
        self.noise.set_state(state[NOISE_STATE].to(torch.uint8).cpu())
        self.regularization = dict(state.get(REGULARIZATION_STATE) or {})


def preview_labels(num_classes: int | None, config: GANPreviewConfig) -> torch.Tensor:
    """Labels of the preview grid: ``per_class`` of each of the first ``max_classes`` classes."""
    classes = 1 if num_classes is None else min(num_classes, config.max_classes)
    return torch.arange(classes).repeat_interleave(config.per_class)


def _num_classes(dataset: ImageFolderDataset) -> int | None:
    labels = dataset.labels
    if all(label < 0 for label in labels):
        return None
    if any(label < 0 for label in labels):
        raise ValueError(f"{dataset.root}: some files have a class and some have none; label all or none")
    return dataset.num_classes


def gan_model_info(
    dataset: ImageFolderDataset, data: DataConfig, kind: str, image_size: Sequence[int], conditional: bool
) -> ModelInfo:
    """``medfusion.json`` of a GAN model folder (``latent_shape`` empty)."""
    spacing, direction = training_geometry(dataset, data)
    return ModelInfo(
        spatial_dims=dataset.spatial_dims,
        image_size=tuple(int(s) for s in image_size),
        channels=dataset.channels,
        class_names=tuple(dataset.class_names) if conditional else (),
        normalization=normalization_record(data),
        source_dtype=dataset.info.dtype,
        spacing=spacing,
        direction=direction,
        training_data=describe_training_data(dataset),
        kind=kind,
    )


def prepare_gan_run(
    data: str | Path, out: str | Path, config: GANRunConfig, progress: bool = True
) -> PreparedRun:
    """Read the data of ``medfusion train-gan`` and resolve its config (nothing is written).

    Raises:
        ValueError: before any training: an unknown ``config.arch`` or option of it, data of
            spatial dims the architecture does not support, or an image size its generator
            cannot make.
    """
    out = Path(out)
    arch = with_options(architecture(config.arch), config.gan)
    main = process_state().is_main_process
    dataset = ImageFolderDataset(
        data,
        labels=config.data.labels,
        skip_bad=config.data.skip_bad,
        seed=config.data.seed,
        validate="header",
        progress=progress and main,
    )
    if dataset.spatial_dims not in arch.spatial_dims:
        supported = " or ".join(f"{d}D" for d in arch.spatial_dims)
        raise ValueError(
            f"{data}: the images are {dataset.spatial_dims}D; the {arch.name} architecture (arch) "
            f"supports {supported} only"
        )
    fitted = fit_normalization(dataset, config.data, progress=progress and main)
    dataset.transform = build_transform(fitted)
    config = dataclasses.replace(config, data=fitted)
    image_shape = tuple(dataset[0]["image"].shape)  # (C, *spatial)
    dims, channels, size = dataset.spatial_dims, image_shape[0], image_shape[1:]
    classes = _num_classes(dataset)

    def build() -> tuple[nn.Module, nn.Module]:
        try:
            options = {**arch.data_options(len(dataset)), **config.model}
            return arch.build(dims, channels, size, classes, **options)
        except TypeError as e:  # an option the architecture's constructors do not take
            raise ValueError(f"model: {e}") from e

    with torch.device("meta"):
        generator, discriminator = build()  # raises now for a size the generator cannot make
    _check_generator_output(generator, (channels, *size), classes, f"the {arch.name} generator")
    info = gan_model_info(dataset, fitted, arch.name, size, classes is not None)  # checked now
    params = [sum(p.numel() for p in m.parameters()) / 1e6 for m in (generator, discriminator)]
    names = ", ".join(dataset.class_names) if classes else "none (unconditional)"
    summary = (
        f"# data: {len(dataset)} items, {dims}D, {channels} channel(s), size {list(size)}; classes: {names}\n"
        f"# {arch.name}: generator {params[0]:.2f} M, discriminator {params[1]:.2f} M parameters; "
        f"{arch.critic_steps} discriminator step(s) per generator step"
    )

    def make_task() -> GANTask:
        generator, discriminator = build()
        return GANTask(
            arch,
            generator,
            discriminator,
            classes,
            seed=config.train.seed,
            preview=config.preview,
            discriminator_learning_rate=config.discriminator_learning_rate,
        )

    def finish(result: TrainResult, final: GANRunConfig, log: Callable[[str], None]) -> None:
        if process_state().is_main_process:
            path = save_gan_folder(out / MODEL_DIR, result.models["generator"].to("cpu"), info)
            log(f"saved the model folder {path} ({arch.name} generator EMA weights, medfusion.json)")

    return PreparedRun(
        command="medfusion train-gan",
        config=config,
        run_dir=out,
        make_task=seeded(config.train.seed, make_task),
        dataset=dataset,
        summary=summary,
        finish=finish,
        preview_batch={"label": preview_labels(classes, config.preview)},
    )


def train_gan(
    data: str | Path,
    out: str | Path,
    config: GANRunConfig,
    resume: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    deadline: float | None = None,
) -> TrainResult | None:
    """Train a GAN baseline on the images of ``data`` into the run folder ``out``.

    Writes ``out/config.yaml`` (the resolved config), ``out/checkpoints/``, ``out/logs/`` (with
    sample grids) and, at the end, the model folder ``out/model/`` (see the module docstring).
    ``deadline``: see :func:`medfusion.training.run.execute`.

    Returns:
        the training result, or None for a dry run.
    """
    run = prepare_gan_run(data, out, config, progress=progress)
    return execute(run, resume, dry_run, progress, log, callback, deadline)


def save_gan_folder(path: str | Path, generator: nn.Module, info: ModelInfo) -> Path:
    """Write a GAN model folder atomically: ``medfusion.json`` and ``generator/`` (config.json +
    safetensors). Returns ``path``."""
    path = Path(path)
    with atomic_dir(path, overwrite=True) as tmp:
        generator.save_pretrained(tmp / GENERATOR_DIR, safe_serialization=True)
        (tmp / INFO_FILE).write_text(json.dumps(info.to_dict(), indent=2) + "\n", encoding="utf-8")
    return path


def _check_generator_output(generator: nn.Module, shape: tuple[int, ...], classes: int | None, what: str):
    """A generator (on the meta device) makes images of ``shape`` (C, *spatial) from one noise vector."""
    z_dim = getattr(generator, "z_dim", None)
    if not isinstance(z_dim, int) or z_dim < 1:
        raise ValueError(f"{what} has no z_dim (the size of its noise vector)")
    device = next(generator.parameters()).device
    labels = torch.zeros(1, dtype=torch.long, device=device) if classes is not None else None
    with torch.no_grad():
        made = tuple(generator(torch.zeros(1, z_dim, device=device), labels).shape[1:])
    if made != tuple(shape):
        raise ValueError(f"{what} makes images of shape {list(made)}, not the {list(shape)} of the data")


class GANGenerator(ImageGenerator):
    """The samples of a GAN model folder: each sample's noise ``z`` comes from a generator seeded
    with its own seed, so a sample does not depend on its batch.

    Args:
        generator: the loaded generator network (``z_dim``, ``forward(z, labels)``).
        info: the folder's ``medfusion.json``.
        path: the folder (for the dataset card's hash).
        device: where to run it; default: this process's device.
    """

    title = "a generative adversarial network"

    def __init__(
        self,
        generator: nn.Module,
        info: ModelInfo,
        path: Path | None = None,
        device: torch.device | str | None = None,
    ):
        self.network = generator.eval().requires_grad_(False)
        self._info, self.path, self.device = info, path, device
        self.kind = info.kind
        self.title = f"a {info.kind} generative adversarial network"
        self._placed = False

    @property
    def info(self) -> ModelInfo:
        return self._info

    def settings(self) -> dict[str, Any]:
        """Nothing beyond the model, the labels and the seeds decides a sample."""
        return {}

    def description(self) -> str:
        return f"{self.kind} generator, z ~ N(0, I) of {self.network.z_dim} dimensions per seed"

    @torch.no_grad()
    def generate(self, labels: Sequence[int | None], seeds: Sequence[int]) -> torch.Tensor:
        """Images (N, C, *image_size) in [-1, 1], float32 on the CPU.

        Args:
            labels: per sample a class index (a conditional model), or None (an unconditional one).
            seeds: per sample its seed (its noise comes from it alone).
        """
        if len(labels) != len(seeds):
            raise ValueError(f"labels and seeds must be as many; got {len(labels)} and {len(seeds)}")
        classes = len(self.info.class_names)
        if classes and any(label is None for label in labels):
            raise ValueError(f"labels: the {self.kind} model is class-conditional; give every sample a class")
        if not classes and any(label is not None for label in labels):
            raise ValueError(f"labels: the {self.kind} model is unconditional; give None for every sample")
        if not self._placed:
            self.network.to(self.device or process_state().device)
            self._placed = True
        device = next(self.network.parameters()).device
        z = torch.stack(
            [torch.randn(self.network.z_dim, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        ).to(device)
        y = torch.tensor([int(label) for label in labels], device=device) if classes else None
        return self.network(z, y).float().clamp(-1, 1).cpu()


def _generator_class(kind: str, config_file: Path) -> type:
    """The generator class of architecture ``kind`` (its ``generator_class``, or the ModelMixin
    class that ``config_file`` names, looked up in the architecture's own module only)."""
    arch = architecture(kind)
    if arch.generator_class is not None:
        return arch.generator_class
    from diffusers.configuration_utils import ConfigMixin
    from diffusers.models.modeling_utils import ModelMixin

    name = _read_config(config_file).get("_class_name")
    module = importlib.import_module(architecture_module(kind))
    found = getattr(module, name, None) if isinstance(name, str) else None
    if not (
        isinstance(found, type)
        and issubclass(found, ModelMixin)
        and issubclass(found, ConfigMixin)
        and found.__module__ == module.__name__
    ):
        raise ModelFolderError(
            f"{config_file}: _class_name {name!r} is not a generator of the {kind} architecture"
        )
    return found


def _read_config(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ModelFolderError(f"{file}: missing (a GAN model folder holds generator/config.json)") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"{file}: cannot read: {e}") from e
    if not isinstance(data, dict):
        raise ModelFolderError(f"{file}: expected a JSON object")
    return data


def load_gan_generator(path: str | Path, device: torch.device | str | None = None) -> GANGenerator:
    """The loader of the GAN kinds: read a folder written by :func:`train_gan` (no code from it is
    executed: JSON and safetensors only).

    ``medfusion.json`` and ``generator/config.json`` are checked against their schemas and the
    generator, built on the meta device, against the image size, channels and classes of
    ``medfusion.json`` before any weights are read.

    Args:
        path: the model folder.
        device: where to generate; default: this process's device.
    Raises:
        ModelFolderError: a part is missing or unreadable, breaks its schema, or does not fit.
    """
    path = Path(path)
    info = read_model_info(path)
    try:
        cls = _generator_class(info.kind, path / GENERATOR_DIR / "config.json")
    except ModelFolderError:
        raise
    except ValueError as e:  # an architecture this installation lacks
        raise ModelFolderError(f"{path / INFO_FILE}: {e}") from e
    skeleton = network_skeleton(path / GENERATOR_DIR / "config.json", cls)
    classes = len(info.class_names) or None
    if getattr(skeleton.config, "num_classes", classes) != classes:
        raise ModelFolderError(
            f"{path}: the generator has {skeleton.config.num_classes} class(es) but {INFO_FILE} names "
            f"{len(info.class_names)}"
        )
    try:
        _check_generator_output(skeleton, (info.channels, *info.image_size), classes, "generator/config.json")
    except (ValueError, RuntimeError) as e:
        raise ModelFolderError(f"{path}: the parts do not fit together: {e}") from e
    folder = path / GENERATOR_DIR
    if not any(folder.glob("*.safetensors")):
        raise ModelFolderError(f"{folder}: no *.safetensors weights")
    try:
        network = cls.from_pretrained(folder, use_safetensors=True)
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        raise ModelFolderError(f"{folder}: cannot load the generator: {e}") from e
    return GANGenerator(network, info, path=path, device=device)
