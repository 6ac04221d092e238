"""GAN baselines trained on the same data and loop as the diffusion model, writing the same
synthetic dataset folders: the architecture interface and registry (:mod:`.arch`), WGAN-GP
(:mod:`.wgan`) and the run machinery with its model folder and generator (:mod:`.gan`).

Importing this package registers the model-folder kinds of the GAN architectures with
:func:`medfusion.samplers.register_generator_kind`, so that
``medfusion.samplers.load_generator("RUN/model")`` reads a GAN model folder.
"""

from medfusion.baselines.arch import ARCHITECTURES, GANArchitecture, architecture, with_options
from medfusion.baselines.gan import (
    GANGenerator,
    GANPreviewConfig,
    GANRunConfig,
    GANTask,
    GANTrainConfig,
    load_gan_generator,
    prepare_gan_run,
    save_gan_folder,
    train_gan,
)
from medfusion.samplers.generator import register_generator_kind

for _kind in ARCHITECTURES:
    register_generator_kind(_kind, load_gan_generator)

__all__ = [
    "ARCHITECTURES",
    "GANArchitecture",
    "GANGenerator",
    "GANPreviewConfig",
    "GANRunConfig",
    "GANTask",
    "GANTrainConfig",
    "architecture",
    "load_gan_generator",
    "prepare_gan_run",
    "save_gan_folder",
    "train_gan",
    "with_options",
]
