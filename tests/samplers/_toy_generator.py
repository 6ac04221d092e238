"""A toy generator of the kind ``toy``: a fixed linear map of seeded noise, its model folder
(``medfusion.json`` + safetensors) and its loader, for the tests of the generator interface."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from medfusion.samplers import ImageGenerator, ModelInfo, read_model_info
from tests.samplers._sampler_helpers import IMAGE_SIZE, SPACING

KIND = "toy"
NOISE = 8  # noise dimensions
WEIGHTS = "toy.safetensors"


class ToyNet(nn.Module):
    """``tanh(temperature * W z + b[label])`` reshaped to ``(C, *image_size)``; ``z`` ~ N(0, 1)."""

    def __init__(self, spatial_dims: int, num_classes: int = 2, channels: int = 1):
        super().__init__()
        self.image_shape = (channels, *IMAGE_SIZE[spatial_dims])
        pixels = int(torch.Size(self.image_shape).numel())
        self.linear = nn.Linear(NOISE, pixels, bias=False)
        self.class_bias = nn.Embedding(num_classes + 1, pixels)  # the last row: unconditional

    def forward(self, z: torch.Tensor, label: int | None, temperature: float) -> torch.Tensor:
        row = self.class_bias.num_embeddings - 1 if label is None else label
        h = temperature * self.linear(z) + self.class_bias.weight[row]  # (pixels,)
        return torch.tanh(h).view(self.image_shape)


def toy_info(spatial_dims: int, class_names=("a", "b")) -> ModelInfo:
    return ModelInfo(
        spatial_dims=spatial_dims,
        image_size=IMAGE_SIZE[spatial_dims],
        channels=1,
        class_names=class_names,
        normalization={"normalization": "percentile", "percentiles": [0.5, 99.5], "per_channel": True},
        source_dtype="uint16",
        spacing=SPACING[spatial_dims],
        kind=KIND,
    )


class ToyGenerator(ImageGenerator):
    """Images of a :class:`ToyNet`; each sample's noise from a generator seeded with its seed."""

    kind = KIND
    title = "a toy linear map"

    def __init__(self, net: ToyNet, info: ModelInfo, temperature: float = 1.0, path: Path | None = None):
        self.net, self._info, self.temperature, self.path = net.eval(), info, float(temperature), path

    @property
    def info(self) -> ModelInfo:
        return self._info

    def settings(self) -> dict[str, Any]:
        return {"temperature": self.temperature}

    def manifest_fields(self) -> dict[str, Any]:
        return {"temperature": self.temperature}

    def sha256(self) -> str:
        if self.path is not None:
            return super().sha256()
        digest = hashlib.sha256()
        for name, tensor in sorted(self.net.state_dict().items()):
            digest.update(name.encode() + tensor.numpy().tobytes())
        return digest.hexdigest()

    @torch.no_grad()
    def generate(self, labels: Sequence[int | None], seeds: Sequence[int]) -> torch.Tensor:
        images = []
        for label, seed in zip(labels, seeds):  # one at a time: no batch-dependent rounding
            z = torch.randn(NOISE, generator=torch.Generator().manual_seed(int(seed)))
            images.append(self.net(z, label, self.temperature))
        return torch.stack(images)


def toy_net(spatial_dims: int, seed: int = 0) -> ToyNet:
    torch.manual_seed(seed)
    net = ToyNet(spatial_dims)
    with torch.no_grad():
        net.class_bias.weight.mul_(0.5)
    return net.eval()


def save_toy_folder(path: Path, net: ToyNet, info: ModelInfo) -> Path:
    """A toy model folder: ``medfusion.json`` and the weights as safetensors (no code)."""
    path.mkdir(parents=True)
    (path / "medfusion.json").write_text(json.dumps(info.to_dict(), indent=2))
    save_file(net.state_dict(), str(path / WEIGHTS))
    return path


def load_toy(path: str | Path, temperature: float = 1.0) -> ToyGenerator:
    """The loader of the ``toy`` kind."""
    path = Path(path)
    info = read_model_info(path)
    net = ToyNet(info.spatial_dims, len(info.class_names), info.channels)
    net.load_state_dict(load_file(str(path / WEIGHTS)))
    return ToyGenerator(net, info, temperature, path=path)
