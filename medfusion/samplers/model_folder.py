"""The trained model folder (see DESIGN.md): written after training, read by the samplers.

::

    MODEL/
      model_index.json               which part is which class (a fixed allow-list; nothing imported by name)
      vae/config.json, *.safetensors
      unet/config.json, *.safetensors
      scheduler/scheduler_config.json  the noise schedule, a diffusers scheduler config
      medfusion.json                 image size, channels, intensity normalisation, class names ...

Loading executes no code from the folder: JSON configs and safetensors weights only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import DDPMScheduler
from torch import nn

from medfusion import __version__
from medfusion.autoencoders.vae import VAE
from medfusion.config import Config
from medfusion.diffusion.unet import UNet
from medfusion.utils import atomic_dir, atomic_write_text

MODEL_INDEX = "model_index.json"
INFO_FILE = "medfusion.json"
FORMAT_VERSION = 1
# the only classes a model folder may name: loading never imports a module named in a file
_COMPONENTS = {
    "vae": ("medfusion.autoencoders", "VAE"),
    "unet": ("medfusion.diffusion", "UNet"),
    "scheduler": ("diffusers", "DDPMScheduler"),
}


class ModelFolderError(ValueError):
    """A model folder is missing a part, or its parts do not fit together."""


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
        spacing: voxel size (physical order) of the training data, for writing volumes.
        version: medfusion version that wrote the folder.
        format: version of this folder layout.
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
    version: str = __version__
    format: int = FORMAT_VERSION


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
    scheduler = DDPMScheduler.from_config(scheduler_config)
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

    Args:
        path: the folder.
        device: where to put the networks (default CPU).
        dtype: cast the networks to this dtype (default: as saved, float32).
    Raises:
        ModelFolderError: a part is missing or unreadable, names a class other than the allowed
            ones, or the parts do not fit together.
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelFolderError(f"{path}: not a folder (expected a medfusion model folder)")
    index = _read_json(path / MODEL_INDEX)
    for name, component in _COMPONENTS.items():
        if index.get(name) != list(component):
            raise ModelFolderError(
                f"{path / MODEL_INDEX}: {name} must be {list(component)}; got {index.get(name)!r}"
            )
    try:
        info = ModelInfo.from_dict(_read_json(path / INFO_FILE), source=str(path / INFO_FILE))
    except ModelFolderError:
        raise
    except ValueError as e:
        raise ModelFolderError(str(e)) from e
    scheduler_config = _read_json(path / "scheduler" / "scheduler_config.json")
    scheduler = DDPMScheduler.from_config(scheduler_config)
    parts = {}
    for name, cls in (("unet", UNet), ("vae", VAE)):
        folder = path / name
        _read_json(folder / "config.json")
        if not any(folder.glob("*.safetensors")):
            raise ModelFolderError(f"{folder}: no *.safetensors weights")
        try:
            parts[name] = cls.from_pretrained(folder, use_safetensors=True)
        except (OSError, ValueError, RuntimeError, TypeError) as e:
            raise ModelFolderError(f"{folder}: cannot load the {name}: {e}") from e
    unet, vae = parts["unet"], parts["vae"]
    _check_parts(unet, vae, info, path)
    unet.eval().requires_grad_(False)
    vae.eval().requires_grad_(False)
    if device is not None or dtype is not None:
        nn.Module.to(unet, device=device, dtype=dtype)  # ModelMixin.to warns on every dtype cast
        nn.Module.to(vae, device=device, dtype=dtype)
    return ModelFolder(unet, vae, scheduler, info, path)
