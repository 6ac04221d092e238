"""Sampling from a trained model: the model folder, and the sampling loop over diffusers schedulers."""

from medfusion.samplers.model_folder import (
    INFO_FILE,
    MODEL_INDEX,
    ModelFolder,
    ModelFolderError,
    ModelInfo,
    load_model_folder,
    save_model_folder,
)
from medfusion.samplers.sampling import sample_latents

__all__ = [
    "INFO_FILE",
    "MODEL_INDEX",
    "ModelFolder",
    "ModelFolderError",
    "ModelInfo",
    "load_model_folder",
    "sample_latents",
    "save_model_folder",
]
