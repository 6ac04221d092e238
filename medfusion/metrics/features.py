"""Feature extractors for the distribution metrics, pluggable by name or path.

==================== ===========================================================================
``features``         extractor (:func:`load_extractor`; ``--features`` of ``medfusion evaluate``)
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
``torchvision:NAME`` a torchvision classification model (``resnet50``, ``densenet121``, ``vit_b_16``,
                     ...) without its classifier: pooled features of ImageNet-normalised images at
                     its weights' input size. Weights from ``torchvision:NAME@FILE`` or from the
                     file torchvision keeps in the torch hub cache (``~/.cache/torch/hub/``);
                     never downloads. Needs torchvision (``pip install torchvision``, the build
                     matching your torch).
``timm:NAME``        a timm model without its classifier, with the mean, std and input size of its
                     ``pretrained_cfg``. Weights from ``timm:NAME@FILE`` or the ``model.safetensors``
                     of its ``hf_hub_id`` in the local Hugging Face cache; never downloads. Needs
                     ``pip install timm`` (and torchvision).
==================== ===========================================================================

``@FILE`` weights are ``.safetensors`` or a torch file of tensors only (read with
``weights_only=True``: no code runs from it), loaded strictly into the whole model before its
classifier is removed.

Every extractor takes images ``(N, C, *spatial)`` in the toolkit's range [-1, 1] and returns
float32 ``(N, D)``. :meth:`FeatureExtractor.prepare` adapts images to what a network expects:
grayscale is expanded to 3 channels explicitly (never silently truncated), images are resized,
and 3D volumes meet 2D networks as 2.5D features: slices along each of the three axes, the
features of each axis averaged and the three concatenated.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import urlparse

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
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_INPUT_SIZE = (224, 224)  # when torchvision weights or a timm config name none
CLASSIFIER_NAMES = ("fc", "classifier", "heads", "head")  # where torchvision models keep theirs
TIMM_WEIGHTS_FILE = "model.safetensors"  # what timm's Hugging Face hub repositories hold
PROBE_SIZE = (64, 64)  # the probe image of extractors that take any size
POOLINGS = ("multiscale", "mean")  # of the domain encoder
# torchvision's DenseNet files keep the old key names ``denselayer1.norm.1.weight``; torchvision
# renames them (to ``norm1``) when it loads them, and so do we
_DENSENET_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


class DomainEncoder(ModelMixin, ConfigMixin):
    """A small residual encoder whose pooled features describe images of one domain (2D or 3D).

    Trained by ``medfusion features train`` on the real reference set (self-supervised, with the
    class labels when there are any); saved and loaded like every model of the toolkit.

    With ``pooling="multiscale"`` (what ``medfusion features train`` builds) the features are the
    embedding (``num_features``, the global mean of the last level through a linear head, which
    the training objectives shape), the image's own detail energy at every scale (per channel and
    level, the log deviation of what a 3-wide neighbourhood does not share, the image halved
    between levels) and, for every level, the spatial mean of each channel and the log deviation of
    its fine detail (:func:`feature_group_widths`). The statistics respond to fine detail, noise
    and edges that a pooled embedding learns to ignore; ``standardize`` (called once after
    training) scales every feature by its spread over the training images and by the square root
    of its group's width, so that each group weighs the same in a distance.
    ``pooling="mean"``: the embedding alone.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        block_out_channels: width per level; the image is halved between levels.
        layers_per_block: residual blocks per level.
        num_features: width of the embedding.
        norm_num_groups: GroupNorm groups (must divide every width).
        image_size: the size it was trained at (array order); inputs are resized to it.
        pooling: ``multiscale`` or ``mean`` (see above).
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
        pooling: str = "mean",
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
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}; got {pooling!r}")
        d = spatial_dims
        blocks: list[nn.Module] = [conv_nd(d, in_channels, block_out_channels[0], 3, padding=1)]
        previous = block_out_channels[0]
        self._level_ends = []  # indices into body after which a level's feature map is complete
        for level, width in enumerate(block_out_channels):
            for _ in range(layers_per_block):
                blocks.append(ResBlock(d, previous, width, norm_num_groups=norm_num_groups))
                previous = width
            self._level_ends.append(len(blocks) - 1)
            if level < len(block_out_channels) - 1:
                blocks.append(Downsample(d, previous))
        blocks += [group_norm(previous, norm_num_groups), nn.SiLU()]
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(previous, num_features)
        if pooling == "multiscale":
            width = sum(feature_group_widths(num_features, in_channels, block_out_channels, pooling))
            self.register_buffer("feature_mean", torch.zeros(width))
            self.register_buffer("feature_scale", torch.ones(width))

    @property
    def num_features(self) -> int:
        """Width of the features :meth:`forward` returns."""
        return sum(self.feature_groups())

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The embedding (N, num_features) and the feature map of every level."""
        h, maps = x, []
        for index, block in enumerate(self.body):
            h = block(h)
            if index in self._level_ends:
                maps.append(h)
        return self.head(h.flatten(2).mean(-1)), maps

    def raw_features(self, x: torch.Tensor) -> torch.Tensor:
        """The features before :meth:`standardize`'s scaling."""
        embedding, maps = self.embed(x)
        if self.config.pooling == "mean":
            return embedding
        statistics = [self._image_detail(x)]
        for h in maps:
            h = h.float()
            detail = h - _local_mean(h)  # what a 3-wide neighbourhood does not share: fine detail
            statistics += [
                h.flatten(2).mean(-1),
                detail.flatten(2).std(-1, correction=0).clamp_min(1e-6).log(),
            ]
        return torch.cat([embedding.float(), *statistics], dim=1)

    def feature_groups(self) -> list[int]:
        """Widths of the groups the features come in (see :func:`feature_group_widths`)."""
        config = self.config
        return feature_group_widths(
            config.num_features, config.in_channels, config.block_out_channels, config.pooling
        )

    def _image_detail(self, x: torch.Tensor) -> torch.Tensor:
        """The image's own fine detail at every scale of the encoder (a Laplacian pyramid's
        energies): per scale and channel the log standard deviation of what a 3-wide
        neighbourhood does not share, the image halved between scales. (N, channels * levels)."""
        x = x.float()
        energies = []
        for level in range(len(self.config.block_out_channels)):
            if level:
                x = F.avg_pool2d(x, 2) if x.ndim == 4 else F.avg_pool3d(x, 2)
            detail = x - _local_mean(x)
            energies.append(detail.flatten(2).std(-1, correction=0).clamp_min(1e-6).log())
        return torch.cat(energies, dim=1)

    @torch.no_grad()
    def standardize(self, batches) -> None:
        """Set the feature scaling from images (an iterable of (N, C, *spatial) batches): every
        feature centred on its mean and divided by its standard deviation over them (with a floor
        of 1e-3 of the mean deviation, so that a constant feature does not explode) and by the
        square root of its group's width (:meth:`feature_groups`), so that each group weighs the
        same in a distance: the embedding as much as the fine detail of the first level, whatever
        the number of channels behind each."""
        if self.config.pooling == "mean":
            return
        rows = torch.cat([self.raw_features(b.to(self.device)).double() for b in batches])
        if len(rows) < 2:
            raise ValueError("standardize needs at least 2 images")
        std = rows.std(0)
        floor = 1e-3 * float(std.mean()) + 1e-12
        width = torch.cat([torch.full((w,), float(w), dtype=torch.float64) for w in self.feature_groups()])
        self.feature_mean.copy_(rows.mean(0).float())
        self.feature_scale.copy_((std.clamp_min(floor) * width.sqrt()).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (N, in_channels, *spatial) in [-1, 1] -> features (N, num_features)."""
        features = self.raw_features(x)
        if self.config.pooling == "mean":
            return features
        return (features - self.feature_mean) / self.feature_scale


def feature_group_widths(
    num_features: int, in_channels: int, block_out_channels: tuple[int, ...], pooling: str
) -> list[int]:
    """Widths of the groups a :class:`DomainEncoder`'s features come in: the embedding; with
    ``multiscale`` pooling also the image's detail (channels x levels), then per level the channel
    means and the channel detail deviations."""
    widths = [int(num_features)]
    if pooling == "multiscale":
        widths.append(in_channels * len(block_out_channels))
        widths += [w for width in block_out_channels for w in (width, width)]
    return widths


def _local_mean(h: torch.Tensor) -> torch.Tensor:
    """The mean of every 3-wide (3x3 or 3x3x3) neighbourhood of ``h`` (N, C, *spatial), edges
    replicated: the same shape."""
    padded = F.pad(h, [1, 1] * (h.ndim - 2), mode="replicate")
    pool = F.avg_pool2d if h.ndim == 4 else F.avg_pool3d
    return pool(padded, 3, stride=1)


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
            f"{path}: not a domain encoder folder (needs config.json and *.safetensors; train one with "
            "medfusion.training.features.train_domain_encoder, or the command medfusion features train)"
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


def torchscript_extractor(
    path: str | Path, device: torch.device | str = "cpu", input_size: tuple[int, int] | None = None
) -> FeatureExtractor:
    """A TorchScript module (N, 3, H, W) in [0, 1] -> (N, D), its D found on a probe image.
    ``input_size``: the (H, W) it takes (images are resized to it), or None for any."""
    module = torch.jit.load(str(path), map_location=device).eval()
    return _probed(module, f"torchscript:{path}", device, input_size)


def onnx_extractor(
    path: str | Path, device: torch.device | str = "cpu", input_size: tuple[int, int] | None = None
) -> FeatureExtractor:
    """An ONNX model (N, 3, H, W) in [0, 1] -> (N, D), run by onnxruntime on the CPU.
    ``input_size``: the (H, W) it takes (images are resized to it), or None for any."""
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError(f"{path}: ONNX models need onnxruntime (pip install onnxruntime)") from e
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {input_name: x.cpu().numpy()})[0])

    return _probed(run, f"onnx:{path}", device, input_size)


def _probed(
    network: Callable, name: str, device, input_size: tuple[int, int] | None = None
) -> FeatureExtractor:
    with torch.no_grad():
        out = network(torch.zeros(1, 3, *(input_size or PROBE_SIZE), device=device))
    if out.ndim < 2 or out.shape[0] != 1:
        raise ValueError(f"{name}: expected (N, D) features; got shape {tuple(out.shape)} for one image")
    return FeatureExtractor(
        network, name, int(out[0].numel()), channels=3, input_size=input_size, value_range=(0.0, 1.0)
    )


# --- torchvision and timm models by name ----------------------------------------------------------


class _Normalized(nn.Module):
    """``network`` on images in [0, 1], normalised per channel first: ``(x - mean) / std``."""

    def __init__(self, network: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.network = network
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network((x - self.mean) / self.std)  # (N, D)


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` without running code from it: ``.safetensors``, or a torch file
    read with ``weights_only=True``. Raises FileNotFoundError / ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"the weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors, pickle and zip errors alike: the file is bad
        raise ValueError(f"{path}: not a readable weights file ({type(e).__name__}: {e})") from e
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        kind = type(state).__name__
        raise ValueError(f"{path}: expected a state dict (parameter name -> tensor); got a {kind}")
    return dict(state)


def _load_strictly(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, name: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = str(e) if len(str(e)) <= 1000 else str(e)[:1000] + " ..."
        raise ValueError(f"{path}: the weights do not fit {name}: {detail}") from e


def _remove_classifier(model: nn.Module, name: str) -> None:
    """Replace the final Linear of ``model``'s classifier (``fc``, ``classifier``, ``heads``,
    ``head``; in a Sequential, its last Linear) by an identity: the model returns pooled features."""
    for attribute in CLASSIFIER_NAMES:
        head = getattr(model, attribute, None)
        if isinstance(head, nn.Linear):
            setattr(model, attribute, nn.Identity())
            return
        if isinstance(head, nn.Sequential):
            linear = [i for i, layer in enumerate(head) if isinstance(layer, nn.Linear)]
            if linear:
                head[linear[-1]] = nn.Identity()
                return
    raise ValueError(
        f"{name}: found no classifier to remove (looked for a Linear, or a Sequential with one, in "
        f"{', '.join(CLASSIFIER_NAMES)}); use a TorchScript file of the feature network instead"
    )


def _named_spec(spec: str) -> tuple[str, Path | None]:
    """``KIND:NAME`` or ``KIND:NAME@FILE`` (``load_extractor``'s ``features``) -> (NAME, FILE or None)."""
    kind, _, rest = spec.partition(":")
    name, at, weights = rest.partition("@")
    if not name or (at and not weights):
        raise ValueError(f"features {spec!r}: expected {kind}:NAME or {kind}:NAME@WEIGHTS_FILE")
    return name, Path(weights) if weights else None


def _import_torchvision_models(spec: str):
    try:
        from torchvision import models
    except (ImportError, RuntimeError) as e:  # RuntimeError: a torchvision built for another torch
        raise ImportError(
            f"{spec} needs torchvision: pip install torchvision, the build that matches "
            f"your torch {torch.__version__} (see https://pytorch.org/get-started/locally/) ({e})"
        ) from e
    return models


def torchvision_weights_path(name: str, url: str) -> Path:
    """Where torchvision keeps the weights file of ``url``: the torch hub cache
    (``~/.cache/torch/hub/checkpoints/``). Raises FileNotFoundError (saying where to get it)."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    if path.is_file():
        return path
    raise FileNotFoundError(
        f"the weights of torchvision:{name} are not here: {path}. Download {url} on a machine with "
        f"internet and copy it to {path}, or name the file (weights=FILE; as features: "
        f"torchvision:{name}@FILE). Nothing is downloaded at run time."
    )


def _torchvision_input_size(default_weights) -> tuple[int, int]:
    """(H, W) of the crop in the transforms of torchvision weights; 224 x 224 when they name none."""
    try:
        crop = default_weights.transforms().crop_size
    except (AttributeError, TypeError):
        return IMAGENET_INPUT_SIZE
    crop = [crop] if isinstance(crop, int) else list(crop)
    return (int(crop[0]), int(crop[-1])) if crop else IMAGENET_INPUT_SIZE


def torchvision_extractor(
    name: str, weights: str | Path | None = None, device: torch.device | str = "cpu"
) -> FeatureExtractor:
    """A torchvision classification model without its classifier: pooled features of images
    normalised with the ImageNet mean and std, resized (not cropped) to its weights' input size.

    Args:
        name: a torchvision model name (``torchvision.models.list_models()``), e.g. ``resnet50``.
        weights: a state dict file (``.safetensors`` or a torch file of tensors); by default the
            file of the model's DEFAULT weights in the torch hub cache. Never downloads.
        device: where the network runs.

    Returns:
        an extractor named ``torchvision:NAME``: (N, C, H, W) in [-1, 1] -> (N, D).
    """
    spec = f"torchvision:{name}"
    models = _import_torchvision_models(spec)
    try:
        default_weights = models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError) as e:
        if weights is None:
            raise ValueError(
                f"{spec}: torchvision names no default weights for it ({e}); name a weights file "
                f"(weights=FILE; as features: {spec}@FILE)"
            ) from e
        default_weights = None
    path = Path(weights) if weights else torchvision_weights_path(name, default_weights.url)
    state = {_legacy_densenet_key(key): value for key, value in load_weights_file(path).items()}
    model = models.get_model(name, weights=None)
    _load_strictly(model, state, path, spec)
    if hasattr(model, "transform_input"):  # GoogLeNet, Inception-v3: torchvision sets it with weights
        model.transform_input = True
    _remove_classifier(model, spec)
    network = _Normalized(model, IMAGENET_MEAN, IMAGENET_STD).eval().requires_grad_(False).to(device)
    return _probed(network, spec, device, _torchvision_input_size(default_weights))


def _legacy_densenet_key(key: str) -> str:
    match = _DENSENET_LEGACY_KEY.match(key)
    return match.group(1) + match.group(2) if match else key


def timm_cached_weights(name: str, hf_hub_id: str | None) -> Path:
    """The ``model.safetensors`` of ``hf_hub_id`` (``repo`` or ``repo@revision``) in the local
    Hugging Face cache. Raises FileNotFoundError (saying how to fetch it) when it is not there."""
    spec = f"timm:{name}"
    if not hf_hub_id:
        raise FileNotFoundError(
            f"{spec}: its pretrained_cfg names no Hugging Face hub repository; name a weights file "
            f"(weights=FILE; as features: {spec}@FILE)"
        )
    import huggingface_hub
    from huggingface_hub.constants import HF_HUB_CACHE

    repo_id, _, revision = hf_hub_id.partition("@")
    found = huggingface_hub.try_to_load_from_cache(repo_id, TIMM_WEIGHTS_FILE, revision=revision or None)
    if isinstance(found, str) and Path(found).is_file():
        return Path(found)
    raise FileNotFoundError(
        f"the weights of {spec} ({TIMM_WEIGHTS_FILE} of the Hugging Face repository {repo_id}) are "
        f"not in the local Hugging Face cache {HF_HUB_CACHE}. On a machine with internet run "
        f"`hf download {repo_id} {TIMM_WEIGHTS_FILE}` and copy its cache folder here (or point "
        f"$HF_HUB_CACHE at it), or copy the file and name it (weights=FILE; as features: {spec}@FILE). "
        "Nothing is downloaded at run time."
    )


def timm_extractor(
    name: str, weights: str | Path | None = None, device: torch.device | str = "cpu"
) -> FeatureExtractor:
    """A timm model without its classifier (``reset_classifier(0)``): pooled features of images
    normalised with the mean and std of its ``pretrained_cfg``, resized to its input size.

    Args:
        name: a timm model name (``timm.list_models()``), e.g. ``resnet50.a1_in1k``.
        weights: a state dict file (``.safetensors`` or a torch file of tensors); by default the
            ``model.safetensors`` of its ``hf_hub_id`` in the local Hugging Face cache. Never downloads.
        device: where the network runs.

    Returns:
        an extractor named ``timm:NAME``: (N, C, H, W) in [-1, 1] -> (N, D).
    """
    spec = f"timm:{name}"
    if name.startswith("hf-hub:"):  # timm would download its config
        raise ValueError(f"{spec}: name the model by its timm name, not hf-hub:")
    try:
        import timm
    except (ImportError, RuntimeError) as e:
        raise ImportError(
            f"{spec} needs timm: pip install timm (it needs torchvision: the build that "
            f"matches your torch {torch.__version__}) ({e})"
        ) from e
    model = timm.create_model(name, pretrained=False)
    config = dict(model.pretrained_cfg)
    path = Path(weights) if weights else timm_cached_weights(name, config.get("hf_hub_id"))
    _load_strictly(model, load_weights_file(path), path, spec)
    model.reset_classifier(0)
    mean, std = tuple(config.get("mean", IMAGENET_MEAN)), tuple(config.get("std", IMAGENET_STD))
    input_size = tuple(int(s) for s in config.get("input_size", (3, *IMAGENET_INPUT_SIZE))[-2:])
    network = _Normalized(model, mean, std).eval().requires_grad_(False).to(device)
    return _probed(network, spec, device, input_size)


def load_extractor(features: str | Path, device: torch.device | str = "cpu") -> FeatureExtractor:
    """The extractor that ``features`` names.

    Args:
        features: ``inception``, ``torchvision:NAME[@FILE]``, ``timm:NAME[@FILE]``, a domain encoder
            folder (``FEAT`` or ``FEAT/encoder``), or a ``.pt``/``.ts``/``.pth``/``.onnx`` file.
        device: where the network runs.

    Returns:
        The extractor: (N, C, *spatial) in [-1, 1] -> (N, D).
    """
    spec_text = str(features)
    if spec_text == "inception":
        return inception_extractor(device=device)
    if spec_text.startswith("torchvision:"):
        return torchvision_extractor(*_named_spec(spec_text), device=device)
    if spec_text.startswith("timm:"):
        return timm_extractor(*_named_spec(spec_text), device=device)
    path = Path(spec_text)
    if path.is_dir():
        return domain_extractor(path, device)
    if path.is_file() and path.suffix in (".pt", ".ts", ".pth"):
        return torchscript_extractor(path, device)
    if path.is_file() and path.suffix == ".onnx":
        return onnx_extractor(path, device)
    missing = "no such file or folder; " if not path.exists() else ""
    raise ValueError(
        f"features {spec_text!r}: {missing}expected 'inception', 'torchvision:NAME[@FILE]', "
        "'timm:NAME[@FILE]', a domain encoder folder, or a .pt/.ts/.pth/.onnx file"
    )
