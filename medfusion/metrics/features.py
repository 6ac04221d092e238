"""Feature extractors for the distribution metrics, pluggable by name or path.

==================== ===========================================================================
``--features``       extractor
==================== ===========================================================================
``FOLDER``           a domain encoder trained by ``medfusion features train`` (``config.json`` +
                     safetensors): any modality, 2D or 3D, offline. FIDs from it compare runs
                     on the same data, not with published numbers.
``inception``        the standard FID Inception-v3 (torch-fidelity's port, the weights
                     torchmetrics and torch-fidelity use), from a local weights file; needs the
                     ``inception`` extra. Never downloads.
``FILE.pt``/``.ts``  a TorchScript module (also ``.pth``) mapping (N, 3, H, W) images in [0, 1] to (N, D) (a
                     TorchScript file is a program: only load files you trust)
``FILE.onnx``        an ONNX model of the same contract (needs ``onnxruntime``)
==================== ===========================================================================

Every extractor takes images ``(N, C, *spatial)`` in the toolkit's range [-1, 1] and returns
float32 ``(N, D)``. :meth:`FeatureExtractor.prepare` adapts images to what a network expects:
grayscale is expanded to 3 channels explicitly (never silently truncated), images are resized,
and 3D volumes meet 2D networks as 2.5D features: slices along each of the three axes, the
features of each axis averaged and the three concatenated.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from medfusion.nn.blocks import ResBlock
from medfusion.nn.layers import Downsample, conv_nd, group_norm

INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/pt_inception-2015-12-05-6726825d.pth"
)
INCEPTION_ENV = "MEDFUSION_INCEPTION_WEIGHTS"
ENCODER_DIR = "encoder"  # the encoder inside the run folder of medfusion features train


class DomainEncoder(ModelMixin, ConfigMixin):
    """A small residual encoder whose pooled features describe images of one domain (2D or 3D).

    Trained by ``medfusion features train`` on the real reference set (self-supervised, with the
    class labels when there are any); saved and loaded like every model of the toolkit.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        block_out_channels: width per level; the image is halved between levels.
        layers_per_block: residual blocks per level.
        num_features: width of the feature vector.
        norm_num_groups: GroupNorm groups (must divide every width).
        image_size: the size it was trained at (array order); inputs are resized to it.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        block_out_channels: tuple[int, ...] = (32, 64, 128, 256),
        layers_per_block: int = 1,
        num_features: int = 256,
        norm_num_groups: int = 16,
        image_size: tuple[int, ...] = (64, 64),
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3; got {spatial_dims}")
        if len(image_size) != spatial_dims:
            raise ValueError(f"image_size must have {spatial_dims} values; got {tuple(image_size)}")
        if not block_out_channels or any(c % norm_num_groups for c in block_out_channels):
            raise ValueError(
                f"norm_num_groups {norm_num_groups} must divide every width in {tuple(block_out_channels)}"
            )
        d = spatial_dims
        blocks: list[nn.Module] = [conv_nd(d, in_channels, block_out_channels[0], 3, padding=1)]
        previous = block_out_channels[0]
        for level, width in enumerate(block_out_channels):
            for _ in range(layers_per_block):
                blocks.append(ResBlock(d, previous, width, norm_num_groups=norm_num_groups))
                previous = width
            if level < len(block_out_channels) - 1:
                blocks.append(Downsample(d, previous))
        blocks += [group_norm(previous, norm_num_groups), nn.SiLU()]
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(previous, num_features)

    @property
    def num_features(self) -> int:
        return int(self.config.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (N, in_channels, *spatial) in [-1, 1] -> features (N, num_features)."""
        h = self.body(x)  # (N, C, *spatial / 2^(levels-1))
        return self.head(h.flatten(2).mean(-1))  # (N, num_features)


def _resize(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    if tuple(x.shape[2:]) == tuple(size):
        return x
    mode = "bilinear" if len(size) == 2 else "trilinear"
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=len(size) == 2)


def expand_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Give ``x`` ``channels`` channels: grayscale is repeated (explicitly); other mismatches raise."""
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, channels, *x.shape[2:])
    raise ValueError(
        f"the feature extractor takes {channels} channel(s); got images with {x.shape[1]} "
        "(only grayscale is expanded; use a domain encoder trained on these images)"
    )


def slices_25d(volumes: torch.Tensor, per_axis: int = 3) -> list[torch.Tensor]:
    """Slices of ``volumes`` (N, C, D, H, W) along each axis: three tensors (N * per_axis, C, ., .),
    the slices evenly spaced over the middle half of the axis (the centre one for ``per_axis`` 1)."""
    planes = []
    for axis in (2, 3, 4):
        size = volumes.shape[axis]
        if per_axis == 1:
            positions = [size // 2]
        else:
            positions = (
                torch.linspace(size * 0.25, size * 0.75 - 1, per_axis)
                .round()
                .long()
                .clamp(0, size - 1)
                .tolist()
            )
        taken = torch.stack([volumes.select(axis, p) for p in positions], dim=1)  # (N, k, C, ., .)
        planes.append(taken.flatten(0, 1))
    return planes


class FeatureExtractor(nn.Module):
    """A network wrapped to take images ``(N, C, *spatial)`` in [-1, 1] and return ``(N, D)``.

    Args:
        network: maps prepared images to (N, D).
        name: how reports name it (e.g. ``inception``, ``domain:PATH``).
        num_features: D.
        spatial_dims: what the network takes (2: volumes go through 2.5D slices).
        channels: input channels the network takes (grayscale is expanded to them).
        input_size: spatial size the network takes (images are resized), or None for any.
        value_range: the range the network wants, mapped from [-1, 1] (e.g. (0, 1)).
        slices_per_axis: 2.5D slices per axis for volumes under a 2D network.
    """

    def __init__(
        self,
        network: Callable[[torch.Tensor], torch.Tensor],
        name: str,
        num_features: int,
        spatial_dims: int = 2,
        channels: int = 3,
        input_size: tuple[int, ...] | None = None,
        value_range: tuple[float, float] = (-1.0, 1.0),
        slices_per_axis: int = 3,
    ):
        super().__init__()
        self.network = network
        self.name = name
        self.num_features = num_features
        self.spatial_dims = spatial_dims
        self.channels = channels
        self.input_size = input_size
        self.value_range = value_range
        self.slices_per_axis = slices_per_axis

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Images as the network takes them: channels, size, value range."""
        x = expand_channels(x.float().clamp(-1, 1), self.channels)
        if self.input_size is not None:
            x = _resize(x, self.input_size)
        low, high = self.value_range
        return low + (x + 1) * ((high - low) / 2)

    def output_features(self, images: torch.Tensor) -> int:
        """D for ``images`` of this many spatial dims (2.5D concatenates three axes)."""
        return self.num_features * (3 if images.ndim - 2 == 3 and self.spatial_dims == 2 else 1)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features (N, D) of images (N, C, *spatial) in [-1, 1]; volumes under a 2D network give
        (N, 3 * D): per axis the mean over its slices."""
        if images.ndim - 2 == self.spatial_dims:
            return self.network(self.prepare(images)).float().flatten(1)
        if images.ndim == 5 and self.spatial_dims == 2:
            n, k = images.shape[0], self.slices_per_axis
            per_axis = [self.network(self.prepare(s)).float().flatten(1) for s in slices_25d(images, k)]
            return torch.cat([f.view(n, k, -1).mean(1) for f in per_axis], dim=1)
        raise ValueError(
            f"the {self.name} extractor takes {self.spatial_dims}D images; got shape {tuple(images.shape)}"
        )


def domain_extractor(path: str | Path, device: torch.device | str = "cpu") -> FeatureExtractor:
    """A :class:`DomainEncoder` saved at ``path`` (``config.json`` + safetensors), as an extractor."""
    path = Path(path)
    if (path / ENCODER_DIR / "config.json").is_file():  # the run folder of medfusion features train
        path = path / ENCODER_DIR
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise ValueError(
            f"--features {path}: not a domain encoder folder (needs config.json and *.safetensors; "
            "train one with: medfusion features train --data REAL --out FEAT)"
        )
    encoder = (
        DomainEncoder.from_pretrained(path, use_safetensors=True).eval().requires_grad_(False).to(device)
    )
    config = encoder.config
    return FeatureExtractor(
        encoder,
        f"domain:{path}",
        encoder.num_features,
        spatial_dims=config.spatial_dims,
        channels=config.in_channels,
        input_size=tuple(config.image_size),
    )


def inception_weights_path(path: str | Path | None = None) -> Path:
    """Where the FID Inception weights are: ``path``, ``$MEDFUSION_INCEPTION_WEIGHTS``, or the
    torch hub cache (``~/.cache/torch/hub/checkpoints/``) where torch-fidelity keeps them."""
    candidates = [Path(path)] if path else []
    if os.environ.get(INCEPTION_ENV):
        candidates.append(Path(os.environ[INCEPTION_ENV]))
    candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"the FID Inception weights {INCEPTION_WEIGHTS_FILE} are not here (looked at: "
        f"{', '.join(str(c) for c in candidates)}). Download {INCEPTION_WEIGHTS_URL} on a machine with "
        f"internet and copy it to {candidates[-1]}, or point ${INCEPTION_ENV} at it. "
        "Nothing is downloaded at run time."
    )


def inception_extractor(
    weights: str | Path | None = None, device: torch.device | str = "cpu"
) -> FeatureExtractor:
    """The standard FID Inception-v3 (2048 pool features) from local weights; never downloads."""
    path = inception_weights_path(weights)
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as e:
        raise ImportError(
            'the inception extractor needs torch-fidelity: pip install "medfusion[inception]" '
            "(it pulls in torchvision; see the README)"
        ) from e
    network = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
    )
    network = network.eval().requires_grad_(False).to(device)

    def features(x: torch.Tensor) -> torch.Tensor:  # torch-fidelity takes uint8-range floats
        return network((x * 255).round().to(torch.uint8))[0]

    return FeatureExtractor(
        features, "inception", 2048, channels=3, input_size=(299, 299), value_range=(0, 1)
    )


def torchscript_extractor(path: str | Path, device: torch.device | str = "cpu") -> FeatureExtractor:
    """A TorchScript module (N, 3, H, W) in [0, 1] -> (N, D), its D found on a probe image."""
    module = torch.jit.load(str(path), map_location=device).eval()
    return _probed(module, f"torchscript:{path}", device)


def onnx_extractor(path: str | Path, device: torch.device | str = "cpu") -> FeatureExtractor:
    """An ONNX model (N, 3, H, W) in [0, 1] -> (N, D), run by onnxruntime on the CPU."""
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError(f"--features {path}: ONNX models need onnxruntime (pip install onnxruntime)") from e
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {input_name: x.cpu().numpy()})[0])

    return _probed(run, f"onnx:{path}", device)


def _probed(network: Callable, name: str, device) -> FeatureExtractor:
    with torch.no_grad():
        out = network(torch.zeros(1, 3, 64, 64, device=device))
    if out.ndim < 2 or out.shape[0] != 1:
        raise ValueError(f"{name}: expected (N, D) features; got shape {tuple(out.shape)} for one image")
    return FeatureExtractor(network, name, int(out[0].numel()), channels=3, value_range=(0.0, 1.0))


def load_extractor(spec: str | Path, device: torch.device | str = "cpu") -> FeatureExtractor:
    """The extractor ``spec`` names: ``inception``, a domain encoder folder (``FEAT`` or
    ``FEAT/encoder``), or a ``.pt``/``.ts``/``.onnx`` file."""
    spec_text = str(spec)
    if spec_text == "inception":
        return inception_extractor(device=device)
    path = Path(spec_text)
    if path.is_dir():
        return domain_extractor(path, device)
    if path.is_file() and path.suffix in (".pt", ".ts", ".pth"):
        return torchscript_extractor(path, device)
    if path.is_file() and path.suffix == ".onnx":
        return onnx_extractor(path, device)
    raise ValueError(
        f"--features {spec_text!r}: not 'inception', a domain encoder folder, or a .pt/.ts/.onnx file"
    )
