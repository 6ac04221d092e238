"""The GAN configs under configs/ load, and their networks build for the image size in their name
(on the meta device: no memory, no weights)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from medfusion.baselines.arch import architecture, with_options
from medfusion.baselines.gan import GANRunConfig
from medfusion.config import load_mapping

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("gan-*.yaml"))


def test_there_are_cpu_and_gpu_configs_for_2d_and_3d():
    names = [file.name for file in CONFIGS]
    for pattern in (r"-2d-64px\.yaml", r"-3d-32px\.yaml", r"-2d-\d+px-gpu\.yaml", r"-3d-\d+px-gpu\.yaml"):
        assert any(re.search(pattern, name) for name in names), pattern


@pytest.mark.parametrize("file", CONFIGS, ids=[file.name for file in CONFIGS])
def test_a_gan_config_loads_and_builds_at_its_size(file):
    config = GANRunConfig.from_dict(load_mapping(file), source=str(file))
    dims, side = re.search(r"-(\d)d-(\d+)px", file.name).groups()
    size = (int(side),) * int(dims)
    assert config.arch in file.name and config.data.resize in (None, size)
    arch = with_options(architecture(config.arch), config.gan)
    with torch.device("meta"):
        generator, discriminator = arch.build(
            int(dims), 1, size, 3, **(arch.data_options(1000) | config.model)
        )
        images = generator(torch.zeros(2, generator.z_dim), torch.zeros(2, dtype=torch.long))
        scores = discriminator(images, torch.zeros(2, dtype=torch.long))
    assert tuple(images.shape) == (2, 1, *size) and tuple(scores.shape) == (2,)
    if "gpu" in file.name:
        assert config.train.mixed_precision == "bf16"
