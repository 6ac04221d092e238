"""The diffusion model folder as an :class:`~medfusion.samplers.generator.ImageGenerator`: an
adapter around :class:`MedfusionPipeline` and a :class:`SamplerConfig` (kind ``diffusion``).

::

    generator = DiffusionGenerator.from_folder("RUN/model", sampler=SamplerConfig("ddim", steps=50))
    write_generated_dataset(generator, "synthetic", n=100)

Sample ``i`` is a function of (model, label, seed, sampler settings, precision, decode slab): its
noise comes from its own generator (see :mod:`medfusion.samplers.pipeline`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medfusion.config import Config
from medfusion.samplers.generator import ImageGenerator, register_generator_kind
from medfusion.samplers.model_folder import DIFFUSION, ModelFolder, ModelInfo, load_model_folder
from medfusion.samplers.pipeline import MedfusionPipeline, precision_dtype
from medfusion.samplers.schedulers import SamplerConfig
from medfusion.utils import COMPILE_MODES, process_state


def _check_slab(value: Any, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be an integer >= 1 or None; got {value!r}")


@dataclass(frozen=True)
class DiffusionSettings(Config):
    """What decides the samples of a diffusion model besides the model, the label and the seed
    (the ``settings`` of its dataset cards).

    Attributes:
        sampler: sampler, steps, guidance.
        precision: ``fp32`` or ``bf16``.
        decode_slab: volumes decoded this many latent planes at a time (changes the decoded
            values slightly); None: at once.
    """

    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    precision: str = "fp32"
    decode_slab: int | None = None

    def __post_init__(self) -> None:
        precision_dtype(self.precision)
        _check_slab(self.decode_slab, "decode_slab")


class DiffusionGenerator(ImageGenerator):
    """Samples of a diffusion model folder: ``sampler`` denoises, the VAE decodes.

    The networks are moved to the device when the first batch is generated (checking the
    settings and planning a dataset need neither time nor device memory).

    Args:
        model: a loaded model folder (:func:`medfusion.samplers.load_model_folder`).
        sampler: sampler settings (default ``SamplerConfig()``).
        precision: ``fp32`` or ``bf16``.
        slab: decode volumes ``slab`` latent planes at a time (bounds memory); None: at once.
        device: e.g. ``cuda:1``; default: this process's device (one GPU per process).
        channels_last: channels-last networks (faster on GPUs; the same samples up to rounding).
        compile_mode: ``torch.compile`` the U-Net with this mode; None: eager.
    Raises:
        ValueError: naming the argument: an unknown precision or compile mode, ``slab`` < 1, or
            ``sampler.steps`` that do not fit the model's noise schedule.
    """

    kind = DIFFUSION
    title = "a latent diffusion model"

    def __init__(
        self,
        model: ModelFolder,
        sampler: SamplerConfig | None = None,
        precision: str = "fp32",
        slab: int | None = None,
        device: torch.device | str | None = None,
        channels_last: bool = False,
        compile_mode: str | None = None,
    ):
        self.check_options(precision=precision, slab=slab, compile_mode=compile_mode)
        self.model, self.path = model, model.path
        self.sampler = sampler or SamplerConfig()
        self.precision, self.slab = precision, slab
        self.device, self.channels_last, self.compile_mode = device, channels_last, compile_mode
        _check_steps(model, self.sampler)
        self._pipeline: MedfusionPipeline | None = None

    @classmethod
    def from_folder(cls, path: str | Path, **options: Any) -> DiffusionGenerator:
        """Load the diffusion model folder at ``path``; options as for the constructor."""
        return cls(load_model_folder(path), **options)

    @staticmethod
    def check_options(
        precision: str = "fp32", slab: int | None = None, compile_mode: str | None = None
    ) -> None:
        """Check the constructor's options that need no model (before one is loaded).

        Raises:
            ValueError: naming the argument and the allowed values.
        """
        precision_dtype(precision)
        _check_slab(slab, "slab")
        if compile_mode is not None and compile_mode not in COMPILE_MODES:
            raise ValueError(
                f"compile_mode must be one of {', '.join(COMPILE_MODES)} or None; got {compile_mode!r}"
            )

    @property
    def info(self) -> ModelInfo:
        return self.model.info

    def settings(self) -> dict[str, Any]:
        """The sampler, the precision and the decode slab (:class:`DiffusionSettings`)."""
        return DiffusionSettings(self.sampler, self.precision, self.slab).to_dict()

    def manifest_fields(self) -> dict[str, Any]:
        """``sampler, steps, guidance, guidance_rescale, eta``."""
        sampler = self.sampler
        return {
            "sampler": sampler.name,
            "steps": sampler.steps,
            "guidance": sampler.guidance_scale,
            "guidance_rescale": sampler.guidance_rescale,
            "eta": sampler.eta,
        }

    def description(self) -> str:
        sampler = self.sampler
        return (
            f"sampler {sampler.name}, {sampler.steps} steps, guidance {sampler.guidance_scale} "
            f"(rescale {sampler.guidance_rescale}), {self.precision}"
        )

    @property
    def pipeline(self) -> MedfusionPipeline:
        """The pipeline on the device (built on first use)."""
        if self._pipeline is None:
            self._pipeline = MedfusionPipeline(
                self.model,
                device=self.device or process_state().device,
                precision=self.precision,
                channels_last=self.channels_last,
                compile_mode=self.compile_mode,
            )
        return self._pipeline

    def generate(self, labels: Sequence[int | None], seeds: Sequence[int]) -> torch.Tensor:
        """Images (N, C, *image_size) in [-1, 1], float32 on the CPU: denoised latents, decoded.

        Args:
            labels: per sample a class index, or None (unconditional).
            seeds: per sample its seed (its initial and sampler noise come from it alone).
        """
        latents = self.pipeline.sample_latents(list(labels), list(seeds), self.sampler)
        return self.pipeline.decode(latents, slab=self.slab)


def _check_steps(model: ModelFolder, sampler: SamplerConfig) -> None:
    """The sampler's steps fit the model's noise schedule (before anything is written)."""
    scheduler = sampler.scheduler(model.scheduler_config)
    try:
        scheduler.set_timesteps(sampler.steps)
    except ValueError as e:
        total = model.scheduler_config.get("num_train_timesteps")
        raise ValueError(
            f"steps={sampler.steps} does not fit the model's noise schedule of {total} timesteps: {e}"
        ) from e


def load_diffusion_generator(path: str | Path, **options: Any) -> DiffusionGenerator:
    """The loader of the ``diffusion`` kind: :meth:`DiffusionGenerator.from_folder`."""
    return DiffusionGenerator.from_folder(path, **options)


register_generator_kind(DIFFUSION, load_diffusion_generator)
