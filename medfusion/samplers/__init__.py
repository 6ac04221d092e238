"""Sampling from a trained model: the model folder, samplers over diffusers schedulers, the
sampling loop, ``MedfusionPipeline``, the generator interface with its registry of model-folder
kinds, and the synthetic dataset folder (``medfusion sample``)."""

from medfusion.samplers.card import CARD, README, update_card
from medfusion.samplers.diffusion_generator import DiffusionGenerator, DiffusionSettings
from medfusion.samplers.files import FILE_FORMATS, SampleFiles, format_suffix, output_suffix
from medfusion.samplers.generator import (
    ImageGenerator,
    generator_kinds,
    load_generator,
    register_generator_kind,
)
from medfusion.samplers.model_folder import (
    DIFFUSION,
    INFO_FILE,
    MODEL_INDEX,
    ModelFolder,
    ModelFolderError,
    ModelInfo,
    load_model_folder,
    model_hash,
    read_model_info,
    read_model_kind,
    save_model_folder,
)
from medfusion.samplers.pipeline import MedfusionPipeline, decode_in_slabs
from medfusion.samplers.sampling import initial_noise, rescale_guidance, sample_latents
from medfusion.samplers.schedulers import (
    DEFAULT_STEPS,
    KARRAS_SAMPLERS,
    SAMPLERS,
    DDIMSampler,
    SamplerConfig,
    make_scheduler,
)
from medfusion.samplers.synthetic import (
    MANIFEST,
    SampleResult,
    SampleSettings,
    plan_samples,
    write_generated_dataset,
    write_synthetic_dataset,
)

__all__ = [
    "CARD",
    "DEFAULT_STEPS",
    "DIFFUSION",
    "FILE_FORMATS",
    "INFO_FILE",
    "KARRAS_SAMPLERS",
    "MANIFEST",
    "MODEL_INDEX",
    "README",
    "SAMPLERS",
    "DDIMSampler",
    "DiffusionGenerator",
    "DiffusionSettings",
    "ImageGenerator",
    "MedfusionPipeline",
    "ModelFolder",
    "ModelFolderError",
    "ModelInfo",
    "SampleFiles",
    "SampleResult",
    "SampleSettings",
    "SamplerConfig",
    "decode_in_slabs",
    "format_suffix",
    "generator_kinds",
    "initial_noise",
    "load_generator",
    "load_model_folder",
    "make_scheduler",
    "model_hash",
    "output_suffix",
    "plan_samples",
    "read_model_info",
    "read_model_kind",
    "register_generator_kind",
    "rescale_guidance",
    "sample_latents",
    "save_model_folder",
    "update_card",
    "write_generated_dataset",
    "write_synthetic_dataset",
]
