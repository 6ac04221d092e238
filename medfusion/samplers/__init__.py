"""Sampling from a trained model: the model folder, samplers over diffusers schedulers, the
sampling loop, ``MedfusionPipeline`` and the synthetic dataset folder (``medfusion sample``)."""

from medfusion.samplers.model_folder import (
    INFO_FILE,
    MODEL_INDEX,
    ModelFolder,
    ModelFolderError,
    ModelInfo,
    load_model_folder,
    model_hash,
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
    CARD,
    MANIFEST,
    SampleResult,
    SampleSettings,
    plan_samples,
    write_synthetic_dataset,
)

__all__ = [
    "CARD",
    "DEFAULT_STEPS",
    "INFO_FILE",
    "KARRAS_SAMPLERS",
    "MANIFEST",
    "MODEL_INDEX",
    "SAMPLERS",
    "DDIMSampler",
    "MedfusionPipeline",
    "ModelFolder",
    "ModelFolderError",
    "ModelInfo",
    "SampleResult",
    "SampleSettings",
    "SamplerConfig",
    "decode_in_slabs",
    "initial_noise",
    "load_model_folder",
    "make_scheduler",
    "model_hash",
    "plan_samples",
    "rescale_guidance",
    "sample_latents",
    "save_model_folder",
    "write_synthetic_dataset",
]
