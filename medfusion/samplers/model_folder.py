"""The trained model folder (see DESIGN.md): written after training, read by the samplers.

::

    MODEL/
      model_index.json               which part is which class (a fixed allow-list; nothing imported by name)
      vae/config.json, *.safetensors
      unet/config.json, *.safetensors
      scheduler/scheduler_config.json  the noise schedule, a diffusers scheduler config
      medfusion.json                 image size, channels, intensity normalisation, class names, kind ...

``medfusion.json`` names the folder's ``kind``: ``diffusion`` (this layout; the default when the key
is absent, as in folders written before kinds existed) or another kind of generator (a GAN
baseline), whose folder is read by the loader registered in code for that kind
(:func:`medfusion.samplers.load_generator`); a folder never names the code that reads it.

Loading executes no code from the folder: JSON configs and safetensors weights only. A model folder
is shared, so it is untrusted input: every JSON file is checked against its schema (unknown keys,
wrong types and out-of-range values are errors naming the file and the key) before any network is
built, and the networks are built on the meta device (no memory, no weights) and checked to fit
together before any weights are read.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import numbers
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
from diffusers import DDPMScheduler
from torch import nn

from medfusion import __version__
from medfusion.autoencoders.vae import VAE
from medfusion.config import Config
from medfusion.data.names import check_class_names
from medfusion.data.transforms import NORMALIZATION_MODES
from medfusion.diffusion.objective import BETA_SCHEDULES, PREDICTION_TYPES, DiffusionConfig
from medfusion.diffusion.unet import UNet
from medfusion.utils import atomic_dir, atomic_write_text

MODEL_INDEX = "model_index.json"
INFO_FILE = "medfusion.json"
FORMAT_VERSION = 1
DIFFUSION = "diffusion"  # the kind of the folders this module writes and reads
_KIND_PATTERN = re.compile(r"[a-z][a-z0-9_-]{0,63}")
# the only classes a model folder may name: loading never imports a module named in a file
_COMPONENTS = {
    "vae": ("medfusion.autoencoders", "VAE"),
    "unet": ("medfusion.diffusion", "UNet"),
    "scheduler": ("diffusers", "DDPMScheduler"),
}
_NETWORKS = {"unet": UNet, "vae": VAE}
_INDEX_METADATA = {"_class_name": "MedfusionPipeline", "_diffusers_version": None, "medfusion_version": None}
# diffusers' bookkeeping keys (a required value, or None: any string); '_use_default_values' is not
# one of them: diffusers would replace the keys it lists by their defaults
_NETWORK_METADATA = ("_class_name", "_diffusers_version", "_name_or_path")
_SCHEDULER_METADATA = ("_class_name", "_diffusers_version")
# the noise schedules and prediction targets medfusion trains (diffusion/objective.py); a learned
# variance needs a U-Net with twice the output channels, which ours is not
_BETA_SCHEDULES = tuple(
    DiffusionConfig(beta_schedule=s).scheduler_config()["beta_schedule"] for s in BETA_SCHEDULES
)
_SCHEDULER_CHOICES = {  # narrower than DDPMScheduler's annotations
    "beta_schedule": typing.Literal[_BETA_SCHEDULES],
    "prediction_type": typing.Literal[PREDICTION_TYPES],
    "variance_type": typing.Literal["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"],
}
_SCHEDULER_RANGES = {
    "num_train_timesteps": (lambda v: v >= 1, ">= 1"),
    "beta_start": (lambda v: 0 < v < 1, "in (0, 1)"),
    "beta_end": (lambda v: 0 < v < 1, "in (0, 1)"),
    "dynamic_thresholding_ratio": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "clip_sample_range": (lambda v: v > 0, "> 0"),
    "sample_max_value": (lambda v: v > 0, "> 0"),
    "steps_offset": (lambda v: v >= 0, ">= 0"),
}
# the keys of the normalisation record: DataConfig's intensity fields and the tensors' range
_NORMALIZATION_KEYS = (
    "normalization",
    "percentiles",
    "window",
    "per_channel",
    "bounds",
    "class_bounds",
    "range",
)
_NUMERIC_DTYPE_KINDS = "biuf"  # bool, signed and unsigned integers, floats
_FLOAT32_MAX = float(np.finfo(np.float32).max)  # a window beyond it cannot be written as float32


class ModelFolderError(ValueError):
    """A model folder is missing a part, a file in it breaks its schema (the message names the
    file and the key), or its parts do not fit together."""


@dataclass(frozen=True)
class ModelInfo(Config):
    """What ``medfusion.json`` records about the data the model was trained on.

    Attributes:
        spatial_dims: 2 or 3.
        image_size: size of a generated image in array order ``(H, W)`` / ``(D, H, W)``.
        channels: image channels.
        latent_shape: ``(C, *spatial)`` of the latents the U-Net works on.
        class_names: the classes in label order; empty for an unconditional model.
        scaling_factor: the VAE's latent scaling factor (a copy, for reading without torch).
        normalization: how intensities were mapped to [-1, 1] (the data config's fields).
        source_dtype: dtype of the training files (``uint8``, ``uint16``, ``int16`` ...), so that
            samples can be written like the training data.
        spacing: voxel size (physical order) of the training data as the model saw it, for writing
            files with the training geometry.
        direction: the row-major direction-cosine matrix of the training images (None: identity).
        training_data: what the model was trained on (files, counts per class, format, dtype,
            modality), for the cards of the datasets it writes.
        kind: what generates the images: ``diffusion`` (the U-Net, VAE and schedule of this
            folder layout) or another kind registered in code
            (:func:`medfusion.samplers.register_generator_kind`); other kinds may leave
            ``latent_shape`` empty.
        version: medfusion version that wrote the folder.
        format: version of this folder layout.

    Raises:
        ValueError: naming the field, when a value is out of range: the same checks run when
            training writes the folder and when it is read (``Config.from_dict`` checks the types).
    """

    spatial_dims: int = 2
    image_size: tuple[int, ...] = ()
    channels: int = 1
    latent_shape: tuple[int, ...] = ()
    class_names: tuple[str, ...] = ()
    scaling_factor: float = 1.0
    normalization: dict[str, Any] = field(default_factory=dict)
    source_dtype: str = "uint8"
    spacing: tuple[float, ...] | None = None
    direction: tuple[float, ...] | None = None
    training_data: dict[str, Any] = field(default_factory=dict)
    kind: str = DIFFUSION
    version: str = __version__
    format: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        _check_format(self.format)
        if not _is_int(self.spatial_dims) or self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3; got {self.spatial_dims!r}")
        _check_sizes("image_size", self.image_size, self.spatial_dims)
        check_kind_name(self.kind, "kind")
        if self.kind == DIFFUSION or self.latent_shape:
            _check_sizes("latent_shape", self.latent_shape, self.spatial_dims + 1)
        if not _is_int(self.channels) or self.channels < 1:
            raise ValueError(f"channels must be an integer >= 1; got {self.channels!r}")
        object.__setattr__(self, "class_names", check_class_names(self.class_names, source="class_names"))
        if not _is_number(self.scaling_factor) or self.scaling_factor <= 0:
            raise ValueError(f"scaling_factor must be a finite number > 0; got {self.scaling_factor!r}")
        _check_normalization(self.normalization)
        _check_source_dtype(self.source_dtype)
        if self.spacing is not None and (
            len(self.spacing) != self.spatial_dims or not all(_is_number(s) and s > 0 for s in self.spacing)
        ):
            raise ValueError(
                f"spacing must be null or {self.spatial_dims} finite numbers > 0; got {list(self.spacing)}"
            )
        if self.direction is not None and not _is_direction(self.direction, self.spatial_dims):
            raise ValueError(
                f"direction must be null or a row-major {self.spatial_dims}x{self.spatial_dims} matrix of "
                f"orthonormal direction cosines; got {list(self.direction)}"
            )
        if not isinstance(self.training_data, dict):
            raise ValueError(f"training_data must be a mapping; got {self.training_data!r}")
        if not isinstance(self.version, str):
            raise ValueError(f"version must be a string; got {self.version!r}")


def check_kind_name(kind: Any, name: str) -> str:
    """Return ``kind`` when it is a valid generator kind name (lower-case letters, digits, ``-``
    and ``_``, starting with a letter, at most 64 characters); raise ``ValueError`` naming the
    argument or key ``name`` otherwise."""
    if not isinstance(kind, str) or not _KIND_PATTERN.fullmatch(kind):
        raise ValueError(
            f"{name} must be a generator kind name (lower-case letters, digits, '-' and '_', starting "
            f"with a letter, e.g. {DIFFUSION!r}); got {kind!r}"
        )
    return kind


def _is_direction(values: Any, dims: int) -> bool:
    if len(values) != dims * dims or not all(_is_number(v) for v in values):
        return False
    matrix = np.asarray(values, dtype=np.float64).reshape(dims, dims)
    return bool(np.allclose(matrix @ matrix.T, np.eye(dims), atol=1e-4))


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_format(value: Any) -> None:
    if _is_int(value) and value > FORMAT_VERSION:
        raise ValueError(
            f"format {value} was written by a newer medfusion (this one, {__version__}, reads format "
            f"{FORMAT_VERSION}); upgrade medfusion"
        )
    if value != FORMAT_VERSION or not _is_int(value):
        raise ValueError(f"format must be {FORMAT_VERSION}; got {value!r}")


def _check_sizes(name: str, sizes: Any, length: int) -> None:
    if len(sizes) != length or not all(_is_int(s) and s >= 1 for s in sizes):
        raise ValueError(f"{name} must be {length} integers >= 1; got {list(sizes)}")


def _check_pair(name: str, value: Any, low: float = -math.inf, high: float = math.inf) -> None:
    """``value`` is ``[a, b]``: finite numbers with ``low <= a < b <= high``."""
    if not (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(_is_number(v) for v in value)
        and low <= value[0] < value[1] <= high
    ):
        bounds = "" if math.isinf(low) else f" within [{low:g}, {high:g}]"
        raise ValueError(f"{name} must be [low, high]: two finite numbers, low < high{bounds}; got {value!r}")


def _check_normalization(record: Any) -> None:
    """The normalisation record: DataConfig's intensity fields (see ``training.diffusion.model_info``)."""
    if not isinstance(record, dict):
        raise ValueError(f"normalization must be a mapping; got {record!r}")
    unknown = sorted(set(record) - set(_NORMALIZATION_KEYS))
    if unknown:
        raise ValueError(f"normalization: unknown key(s) {unknown}; allowed: {list(_NORMALIZATION_KEYS)}")
    mode = record.get("normalization", "auto")
    if mode not in NORMALIZATION_MODES:
        raise ValueError(f"normalization.normalization must be one of {NORMALIZATION_MODES}; got {mode!r}")
    if "percentiles" in record:
        _check_pair("normalization.percentiles", record["percentiles"], 0.0, 100.0)
    if record.get("window") is not None:
        _check_pair("normalization.window", record["window"], -_FLOAT32_MAX, _FLOAT32_MAX)
    if "range" in record:
        _check_pair("normalization.range", record["range"])
    bounds = record.get("bounds")
    if bounds is not None:
        _check_bounds("normalization.bounds", bounds)
    class_bounds = record.get("class_bounds")
    if class_bounds is not None:
        if not isinstance(class_bounds, dict):
            raise ValueError(f"normalization.class_bounds must be null or a mapping; got {class_bounds!r}")
        for name, pairs in class_bounds.items():
            _check_bounds(f"normalization.class_bounds[{name!r}]", pairs)
    if mode == "dataset" and bounds is None:
        raise ValueError("normalization.bounds must be given for normalization 'dataset' (the fitted range)")
    if not isinstance(record.get("per_channel", True), bool):
        raise ValueError(f"normalization.per_channel must be true or false; got {record['per_channel']!r}")


def _check_bounds(name: str, bounds: Any) -> None:
    """Fitted bounds: [low, high] pairs (one per channel), low <= high."""
    if not isinstance(bounds, list | tuple) or not bounds:
        raise ValueError(f"{name} must be null or [low, high] pairs; got {bounds!r}")
    for i, pair in enumerate(bounds):
        constant = isinstance(pair, list | tuple) and len(pair) == 2 and pair[0] == pair[1]
        if constant and _is_number(pair[0]):
            continue  # a channel of one value
        _check_pair(f"{name}[{i}]", pair, -_FLOAT32_MAX, _FLOAT32_MAX)


def _check_source_dtype(name: Any) -> None:
    try:
        dtype = np.dtype(name) if isinstance(name, str) else None
    except (TypeError, ValueError):
        dtype = None
    if dtype is None or dtype.kind not in _NUMERIC_DTYPE_KINDS:
        raise ValueError(
            f"source_dtype must name a numeric numpy dtype (bool, int, uint or float, e.g. 'uint16'); "
            f"got {name!r}"
        )


@dataclass(frozen=True)
class ModelFolder:
    """A loaded model folder: the networks, the schedule (a diffusers scheduler) and the info."""

    unet: UNet
    vae: VAE
    scheduler: DDPMScheduler
    info: ModelInfo
    path: Path | None = None

    @property
    def scheduler_config(self) -> dict:
        return dict(self.scheduler.config)


def save_model_folder(
    path: str | Path, unet: UNet, vae: VAE, scheduler_config: dict, info: ModelInfo, overwrite: bool = True
) -> Path:
    """Write the model folder atomically (a temporary folder renamed into place).

    Args:
        path: the folder to write.
        unet, vae: the trained networks (the U-Net's EMA weights, typically).
        scheduler_config: the training noise schedule as a diffusers scheduler config.
        info: the data description.
        overwrite: replace an existing folder.
    Returns:
        ``path``.
    """
    _check_parts(unet, vae, info, Path(path))
    scheduler = _scheduler_from_config(scheduler_config, "scheduler_config")
    index = {
        "_class_name": "MedfusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "medfusion_version": __version__,
        **{name: list(component) for name, component in _COMPONENTS.items()},
    }
    with atomic_dir(Path(path), overwrite=overwrite) as tmp:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        vae.save_pretrained(tmp / "vae", safe_serialization=True)
        scheduler.save_config(tmp / "scheduler")
        atomic_write_text(tmp / MODEL_INDEX, json.dumps(index, indent=2) + "\n")
        atomic_write_text(tmp / INFO_FILE, json.dumps(info.to_dict(), indent=2) + "\n")
    return Path(path)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ModelFolderError(f"{path}: missing (not a complete medfusion model folder)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFolderError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path}: expected a JSON object")
    return data


def _check_parts(unet: UNet, vae: VAE, info: ModelInfo, where: Path) -> None:
    problems = []
    if info.kind != DIFFUSION:
        problems.append(f"{INFO_FILE} says kind {info.kind!r}; a U-Net and VAE folder is {DIFFUSION!r}")
    if unet.config.in_channels != vae.config.latent_channels:
        problems.append(
            f"the U-Net takes {unet.config.in_channels} latent channel(s) but the VAE makes "
            f"{vae.config.latent_channels}"
        )
    if unet.config.spatial_dims != vae.config.spatial_dims:
        problems.append(f"the U-Net is {unet.config.spatial_dims}D but the VAE {vae.config.spatial_dims}D")
    if vae.config.spatial_dims != info.spatial_dims or vae.config.in_channels != info.channels:
        problems.append(
            f"{INFO_FILE} says {info.spatial_dims}D with {info.channels} channel(s), the VAE is "
            f"{vae.config.spatial_dims}D with {vae.config.in_channels}"
        )
    factor = vae.downsampling_factor
    latent = tuple(info.latent_shape)
    if len(latent) != vae.config.spatial_dims + 1 or len(info.image_size) != vae.config.spatial_dims:
        problems.append(
            f"{INFO_FILE} gives latent_shape {list(latent)} and image_size {list(info.image_size)}; a "
            f"{vae.config.spatial_dims}D model needs (C, *spatial) and {vae.config.spatial_dims} sizes"
        )
    else:
        if latent[0] != vae.config.latent_channels:
            problems.append(
                f"{INFO_FILE} gives {latent[0]} latent channel(s), the VAE makes {vae.config.latent_channels}"
            )
        if tuple(s * factor for s in latent[1:]) != tuple(info.image_size):
            problems.append(
                f"{INFO_FILE}: latents {list(latent[1:])} decode to {[s * factor for s in latent[1:]]} with "
                f"this VAE, not the image_size {list(info.image_size)}"
            )
        if any(s % unet.downsampling_factor for s in latent[1:]):
            problems.append(
                f"{INFO_FILE}: latent sides {list(latent[1:])} are not multiples of the U-Net's "
                f"downsampling factor {unet.downsampling_factor}"
            )
    classes = len(info.class_names) or None
    if unet.config.num_classes != classes:
        problems.append(
            f"the U-Net has {unet.config.num_classes} class(es) but {INFO_FILE} names {len(info.class_names)}"
        )
    if problems:
        raise ModelFolderError(f"{where}: the parts do not fit together: " + "; ".join(problems))


def model_hash(path: str | Path) -> str:
    """SHA-256 over every file of a model folder (relative names and contents, in sorted order):
    the identity of a model in the dataset cards of its samples."""
    path = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def load_model_folder(
    path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> ModelFolder:
    """Read a model folder written by :func:`save_model_folder` (no code from it is executed).

    Every JSON file is checked against its schema, and the networks' configs against each other,
    before any weights are read.

    Args:
        path: the folder.
        device: where to put the networks (default CPU).
        dtype: cast the networks to this dtype (default: as saved, float32).
    Raises:
        ModelFolderError: a part is missing or unreadable, a file holds an unknown key, a value of
            the wrong type or out of range (the message names the file and the key), names a class
            other than the allowed ones, the folder is of another kind than ``diffusion``, or the
            parts do not fit together.
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelFolderError(f"{path}: not a folder (expected a medfusion model folder)")
    kind = read_model_kind(path)
    if kind != DIFFUSION:
        raise ModelFolderError(
            f"{path / INFO_FILE}: kind {kind!r}: not a {DIFFUSION} model folder; read it with "
            "medfusion.samplers.load_generator"
        )
    _check_index(path / MODEL_INDEX)
    info = _read_info(path / INFO_FILE)
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    scheduler = _scheduler_from_config(_read_json(scheduler_file), str(scheduler_file))
    skeletons = {name: network_skeleton(path / name / "config.json", cls) for name, cls in _NETWORKS.items()}
    _check_parts(skeletons["unet"], skeletons["vae"], info, path)
    parts = {name: _load_weights(path / name, cls) for name, cls in _NETWORKS.items()}
    unet, vae = parts["unet"], parts["vae"]
    unet.eval().requires_grad_(False)
    vae.eval().requires_grad_(False)
    if device is not None or dtype is not None:
        nn.Module.to(unet, device=device, dtype=dtype)  # ModelMixin.to warns on every dtype cast
        nn.Module.to(vae, device=device, dtype=dtype)
    return ModelFolder(unet, vae, scheduler, info, path)


def read_model_kind(path: str | Path) -> str:
    """The ``kind`` that a model folder's ``medfusion.json`` names (``diffusion`` when it names
    none), read before anything else of the folder.

    Args:
        path: the model folder.
    Returns:
        the kind name (not yet checked against the registered kinds).
    Raises:
        ModelFolderError: ``path`` is no folder, ``medfusion.json`` is missing or not a JSON
            object, or its ``kind`` is not a kind name (the message names the file).
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelFolderError(f"{path}: not a folder (expected a medfusion model folder)")
    file = path / INFO_FILE
    kind = _read_json(file).get("kind", DIFFUSION)
    try:
        return check_kind_name(kind, "kind")
    except ValueError as e:
        raise ModelFolderError(f"{file}: {e}") from e


def read_model_info(path: str | Path) -> ModelInfo:
    """A model folder's ``medfusion.json``, checked against its schema (for the loaders of every
    kind).

    Args:
        path: the model folder.
    Returns:
        its :class:`ModelInfo`.
    Raises:
        ModelFolderError: the file is missing, not JSON, or holds an unknown key, a value of the
            wrong type or out of range (the message names the file and the key).
    """
    return _read_info(Path(path) / INFO_FILE)


def _check_index(file: Path) -> None:
    """``model_index.json``: the fixed allow-list of classes and diffusers' bookkeeping."""
    index = _read_json(file)
    unknown = sorted(set(index) - set(_COMPONENTS) - set(_INDEX_METADATA))
    if unknown:
        raise ModelFolderError(
            f"{file}: unknown key(s) {unknown}; allowed: {[*_INDEX_METADATA, *_COMPONENTS]}"
        )
    for key, required in _INDEX_METADATA.items():
        _check_metadata(file, index, key, required)
    for name, component in _COMPONENTS.items():
        if index.get(name) != list(component):
            raise ModelFolderError(f"{file}: {name} must be {list(component)}; got {index.get(name)!r}")


def _check_metadata(where: Path | str, config: dict, key: str, required: str | None) -> None:
    """``config[key]``, when given, is the string ``required`` (None: any string)."""
    if key not in config:
        return
    value = config[key]
    if not isinstance(value, str) or (required is not None and value != required):
        expected = repr(required) if required is not None else "a string"
        raise ModelFolderError(f"{where}: {key} must be {expected}; got {value!r}")


def _read_info(file: Path) -> ModelInfo:
    """``medfusion.json``: its keys and types (``Config.from_dict``), its values (``ModelInfo``)."""
    data = _read_json(file)
    try:
        if "format" in data:  # first: a newer layout may hold keys this version does not know
            _check_format(data["format"])
        return ModelInfo.from_dict(data, source=str(file))
    except ValueError as e:
        message = str(e)
        raise ModelFolderError(message if message.startswith(f"{file}:") else f"{file}: {message}") from e


def _scheduler_from_config(config: dict, where: str) -> DDPMScheduler:
    """The training schedule of a ``DDPMScheduler`` config, once it passed
    :func:`_check_scheduler_config`, with its ``alphas_cumprod`` strictly between 0 and 1."""
    _check_scheduler_config(config, where)
    try:
        scheduler = DDPMScheduler.from_config(config)
    except (ValueError, TypeError, NotImplementedError, ArithmeticError) as e:
        raise ModelFolderError(f"{where}: not a valid noise schedule: {e}") from e
    alphas = scheduler.alphas_cumprod
    if not (torch.isfinite(alphas).all() and (alphas > 0).all() and (alphas < 1).all()):
        raise ModelFolderError(
            f"{where}: the schedule's alphas_cumprod must lie strictly between 0 and 1; got "
            f"{float(alphas.min()):g} .. {float(alphas.max()):g} (check the betas and rescale_betas_zero_snr)"
        )
    return scheduler


def _check_scheduler_config(config: dict, where: str) -> None:
    """Every key is one ``DDPMScheduler`` takes, of its type, and its value one medfusion trains
    and samples with; ``where`` names the file."""
    _check_init_config(DDPMScheduler, config, where, _SCHEDULER_METADATA, _SCHEDULER_CHOICES)
    values = {**_defaults(DDPMScheduler), **config}
    for key, (fits, expected) in _SCHEDULER_RANGES.items():
        if not fits(values[key]):
            raise ModelFolderError(f"{where}: {key} must be {expected}; got {values[key]!r}")
    steps, betas = values["num_train_timesteps"], values["trained_betas"]
    if values["beta_start"] > values["beta_end"]:
        raise ModelFolderError(
            f"{where}: beta_start must be <= beta_end; got {values['beta_start']}, {values['beta_end']}"
        )
    if betas is not None and (len(betas) != steps or not all(0 < b < 1 for b in betas)):
        shown = f"{betas[:8]}{' ...' if len(betas) > 8 else ''}"
        raise ModelFolderError(
            f"{where}: trained_betas must be null or num_train_timesteps ({steps}) numbers in (0, 1); "
            f"got {len(betas)}: {shown}"
        )
    if values["steps_offset"] >= steps:
        raise ModelFolderError(
            f"{where}: steps_offset must be < num_train_timesteps ({steps}); got {values['steps_offset']}"
        )


def network_skeleton(file: Path, cls: type):
    """The network of class ``cls`` (a diffusers ``ModelMixin, ConfigMixin``: the U-Net, the VAE, a
    GAN generator) that ``config.json`` describes, built on the meta device after checking the
    file against the constructor (its own argument checks run; no memory is taken, no weights are
    read, nothing from the folder is executed)."""
    config = _read_json(file)
    renamed = getattr(cls, "renamed_config_keys", {})  # names of earlier versions, read as today's
    config = {renamed.get(key, key): value for key, value in config.items()}
    _check_init_config(cls, config, str(file), _NETWORK_METADATA)
    try:
        with torch.device("meta"):
            return cls.from_config(config)
    except (ValueError, TypeError, RuntimeError) as e:
        raise ModelFolderError(f"{file}: {e}") from e


def _load_weights(folder: Path, cls: type[UNet] | type[VAE]) -> UNet | VAE:
    if not any(folder.glob("*.safetensors")):
        raise ModelFolderError(f"{folder}: no *.safetensors weights")
    try:
        return cls.from_pretrained(folder, use_safetensors=True)
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        raise ModelFolderError(f"{folder}: cannot load the {folder.name}: {e}") from e


def _defaults(cls: type) -> dict[str, Any]:
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]  # without self
    return {p.name: p.default for p in parameters}


def _check_init_config(
    cls: type, config: dict, where: str, metadata: tuple[str, ...], narrower: dict | None = None
) -> None:
    """Every key of ``config`` is a parameter of ``cls.__init__`` (diffusers' ``ConfigMixin``
    would ignore any other) or one of its ``metadata`` keys, each value of the parameter's
    annotated type (or of the ``narrower`` one given for it)."""
    defaults = _defaults(cls)
    unknown = sorted(set(config) - set(defaults) - set(metadata))
    if unknown:
        raise ModelFolderError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(defaults)}")
    for key in metadata:
        _check_metadata(where, config, key, cls.__name__ if key == "_class_name" else None)
    hints = {**typing.get_type_hints(cls.__init__), **(narrower or {})}
    for key, value in config.items():
        hint = hints.get(key, type(defaults.get(key)))
        if key in defaults and not _fits(value, hint):
            raise ModelFolderError(f"{where}: {key} must be {_describe(hint)}; got {value!r}")


_UNIONS = (typing.Union, types.UnionType)
_SCALARS = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
_ITEMS = {bool: "true/false values", int: "integers", float: "finite numbers", str: "strings"}


def _fits(value: Any, hint: Any) -> bool:
    """Whether the parsed JSON ``value`` is of the annotated type ``hint`` (a bool is no number)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in _UNIONS:
        return any(_fits(value, arg) for arg in args)
    if origin is typing.Literal:
        return any(type(value) is type(arg) and value == arg for arg in args)
    if origin in (tuple, list):
        if not isinstance(value, list):
            return False
        items = args[:1] * len(value) if len(args) < 2 or args[1] is Ellipsis else args
        return len(items) == len(value) and all(map(_fits, value, items))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return _is_int(value)
    if hint is float:
        return _is_number(value)
    return hint is str and isinstance(value, str)  # nothing else (arrays, objects) comes from JSON


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in _UNIONS:
        return " or ".join(_describe(arg) for arg in args if arg is not np.ndarray)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if origin in (tuple, list):
        return f"a list of {_ITEMS.get(args[0], 'values') if args else 'values'}"
    return "null" if hint is type(None) else _SCALARS.get(hint, str(hint))
