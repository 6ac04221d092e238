"""LPIPS perceptual distance (Zhang et al. 2018, VGG16 backbone, linear layers v0.1), written by hand.

Neither torchvision nor the ``lpips`` package is imported: the VGG16 ``features`` stack is rebuilt
here with torchvision's module indices, so that torchvision's ``vgg16-397923af.pth`` and the
``lpips`` package's ``weights/v0.1/vgg.pth`` load as they are. Weights are only ever read from local
files (see :meth:`LPIPS.from_pretrained`); nothing is downloaded.

Medical images rarely have three colour channels: an input with ``C != 3`` channels is compared one
channel at a time, each channel repeated to a grey RGB image, and the per-channel distances are
averaged. Volumes are compared on random 2D slices (:func:`perceptual_distance`).
"""

from __future__ import annotations

import importlib.util
import os
import pickle
from pathlib import Path

import torch
from torch import nn

from medfusion.nn import conv_nd
from medfusion.utils import full_suffix

VGG16_FILENAME = "vgg16-397923af.pth"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG16_ENV = "MEDFUSION_VGG16_WEIGHTS"
LPIPS_ENV = "MEDFUSION_LPIPS_WEIGHTS"
LPIPS_URL = "https://github.com/richzhang/PerceptualSimilarity"
LPIPS_PACKAGE_FILE = ("weights", "v0.1", "vgg.pth")  # inside the installed ``lpips`` package

# torchvision's vgg16 "D" configuration: output channels of each 3x3 conv, "M" for a 2x2 max-pool.
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Indices in ``vgg16().features`` of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
VGG16_TAPS = (3, 8, 15, 22, 29)
VGG16_TAP_CHANNELS = (64, 128, 256, 512, 512)
# Four 2x2 pools lie before relu5_3: a side of 16 pixels leaves it a 1x1 map.
LPIPS_MIN_SIZE = 16
_UNIT_NORM_EPS = 1e-10  # lpips' normalize_tensor

_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")


class VGG16Features(nn.Module):
    """The convolutional part of VGG16, indexed like torchvision's ``vgg16().features``.

    ``self.features[i]`` is torchvision's ``features[i]`` for i = 0..29 (the final max-pool, index
    30, is left out: nothing after relu5_3 is used), so a torchvision state dict's
    ``features.<i>.weight`` / ``features.<i>.bias`` entries load with ``load_state_dict``.
    """

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [conv_nd(2, in_channels, v, 3, padding=1), nn.ReLU(inplace=True)]
                in_channels = v
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Args: ``x`` (N, 3, H, W), ImageNet-normalised. Returns the five maps after relu1_2, relu2_2,
        relu3_3, relu4_3, relu5_3: (N, 64, H, W), (N, 128, H/2, W/2), ..., (N, 512, H/16, W/16)."""
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in VGG16_TAPS:
                taps.append(x)
        return tuple(taps)


class _LinearLayer(nn.Module):
    """lpips' ``NetLinLayer``: a 1x1 convolution to one channel, without bias.

    Index 0 of ``model`` is lpips' dropout, which is inactive in eval mode; an identity keeps the
    index so that the key ``model.1.weight`` matches the lpips weight files.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), conv_nd(2, channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def to_rgb_images(x: torch.Tensor) -> torch.Tensor:
    """Turn (N, C, H, W) images of any channel count into RGB images for an ImageNet network.

    Three channels are kept as they are; otherwise each channel becomes its own grey image,
    repeated to three channels.

    Args:
        x: (N, C, H, W).
    Returns:
        (N * K, 3, H, W), where K = 1 if C == 3 else C; image ``n * K + k`` is channel k of sample n.
    """
    if x.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W); got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if c == 3:
        return x
    return x.reshape(n * c, 1, h, w).expand(-1, 3, -1, -1)


class LPIPS(nn.Module):
    """Learned perceptual image patch similarity, VGG16 variant with the "lin" v0.1 layers.

    The distance of two images is the sum over five VGG16 layers of the spatial mean of
    ``w_l . (f_l(x) / |f_l(x)| - f_l(y) / |f_l(y)|)**2``, where the norm is taken over channels and
    ``w_l`` are the learned non-negative channel weights.

    The module is frozen: parameters do not require gradients and the module stays in eval mode
    (``train()`` is a no-op), while gradients still flow to the inputs, so it can serve as a loss.
    ``LPIPS()`` has random weights; use :meth:`from_pretrained` for the published ones.
    """

    def __init__(self):
        super().__init__()
        # lpips' ScalingLayer: maps [-1, 1] inputs to ImageNet normalisation. Constants, not weights.
        self.register_buffer(
            "shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.net = VGG16Features()
        for i, channels in enumerate(VGG16_TAP_CHANNELS):
            self.add_module(f"lin{i}", _LinearLayer(channels))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        """Stay in eval mode whatever ``mode`` says (the module is a fixed loss network)."""
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Perceptual distance of two batches of images.

        Args:
            x, y: (N, C, H, W) in [-1, 1], H and W at least 16. Any C: see :func:`to_rgb_images`;
                with C != 3 the distances of the C channels are averaged.
        Returns:
            (N,) distances, 0 for identical images.
        """
        if x.shape != y.shape:
            raise ValueError(f"LPIPS inputs differ in shape: {tuple(x.shape)} and {tuple(y.shape)}")
        if x.ndim != 4:
            raise ValueError(f"LPIPS expects images (N, C, H, W); got shape {tuple(x.shape)}")
        if min(x.shape[-2:]) < LPIPS_MIN_SIZE:
            raise ValueError(
                f"LPIPS needs images of at least {LPIPS_MIN_SIZE}x{LPIPS_MIN_SIZE} pixels "
                f"(VGG16 pools four times); got {tuple(x.shape[-2:])}"
            )
        n = x.shape[0]
        rgb = torch.cat([to_rgb_images(x), to_rgb_images(y)])  # (2M, 3, H, W), M = N*K
        feats = self.net((rgb - self.shift) / self.scale)
        dist = 0
        for i, f in enumerate(feats):
            f = f / (
                torch.sqrt(torch.sum(f**2, dim=1, keepdim=True)) + _UNIT_NORM_EPS
            )  # unit vector per pixel
            fx, fy = f.chunk(2)
            lin = getattr(self, f"lin{i}")
            dist = dist + lin((fx - fy) ** 2).mean(dim=(1, 2, 3))  # (M,)
        return dist.view(n, -1).mean(dim=1)  # (N,): mean over the K channels

    @classmethod
    def from_pretrained(
        cls, backbone: str | os.PathLike | None = None, linear: str | os.PathLike | None = None
    ) -> LPIPS:
        """Build LPIPS with the published weights, read from local files only (never downloaded).

        Args:
            backbone: torchvision's VGG16 weights (``vgg16-397923af.pth``, or the same keys in a
                ``.safetensors`` file; ``classifier.*`` keys are ignored). None: see
                :func:`find_vgg16_weights`.
            linear: the lpips "lin" v0.1 weights (``vgg.pth`` with keys ``lin<i>.model.1.weight``).
                None: see :func:`find_lpips_weights`.
        Returns:
            A frozen LPIPS module in eval mode, on the CPU.
        Raises:
            FileNotFoundError: a weight file cannot be found; the message says where to get it.
            ValueError: a file has missing, unexpected or wrongly shaped entries.
        """
        backbone_path = find_vgg16_weights(backbone)
        linear_path = find_lpips_weights(linear)
        backbone_state = _load_state_dict(backbone_path)
        backbone_state = {k: v for k, v in backbone_state.items() if not k.startswith("classifier.")}
        linear_state = _load_state_dict(linear_path)
        _check_state_dict(backbone_state, _vgg16_shapes(), backbone_path)
        _check_state_dict(linear_state, _linear_shapes(), linear_path)
        model = cls()
        model.net.load_state_dict(backbone_state)
        model.load_state_dict(linear_state, strict=False)  # the backbone is already loaded
        return model


def perceptual_distance(
    lpips: LPIPS,
    x: torch.Tensor,
    y: torch.Tensor,
    max_slices: int = 8,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """LPIPS of images, or of volumes applied to random 2D slices.

    For volumes, one spatial axis is drawn at random among those whose slices are at least 16x16,
    then up to ``max_slices`` distinct slice positions along it; every sample of the batch is
    sliced alike, and each sample's distance is the mean over its slices.

    Args:
        lpips: the distance network.
        x, y: images (N, C, H, W) or volumes (N, C, D, H, W) in [-1, 1], of equal shape.
        max_slices: slices per volume (all of them if the axis is shorter).
        generator: random generator for the axis and slice positions; None: torch's global one.
    Returns:
        (N,) distances.
    """
    if x.shape != y.shape:
        raise ValueError(f"perceptual_distance inputs differ in shape: {tuple(x.shape)} and {tuple(y.shape)}")
    if x.ndim == 4:
        return lpips(x, y)
    if x.ndim != 5:
        raise ValueError(
            f"expected images (N, C, H, W) or volumes (N, C, D, H, W); got shape {tuple(x.shape)}"
        )
    if max_slices < 1:
        raise ValueError(f"max_slices must be at least 1; got {max_slices}")
    spatial = x.shape[2:]
    axes = [a for a in range(3) if min(s for b, s in enumerate(spatial) if b != a) >= LPIPS_MIN_SIZE]
    if not axes:
        raise ValueError(
            f"no slice of a volume of size {tuple(spatial)} is at least {LPIPS_MIN_SIZE}x{LPIPS_MIN_SIZE} "
            "voxels, as LPIPS needs"
        )
    device = generator.device if generator is not None else "cpu"
    axis = axes[int(torch.randint(len(axes), (1,), generator=generator, device=device))]
    length = spatial[axis]
    index = torch.randperm(length, generator=generator, device=device)[: min(max_slices, length)]
    index = index.to(x.device)
    n, k = x.shape[0], index.numel()

    def slices(v: torch.Tensor) -> torch.Tensor:
        v = v.index_select(axis + 2, index).movedim(axis + 2, 1)  # (N, k, C, A, B)
        return v.reshape(n * k, *v.shape[2:])  # (N*k, C, A, B)

    return lpips(slices(x), slices(y)).view(n, k).mean(dim=1)


def find_vgg16_weights(path: str | os.PathLike | None = None) -> Path:
    """Locate torchvision's VGG16 weights on this machine.

    Looks at ``path`` if given, else at ``$MEDFUSION_VGG16_WEIGHTS`` if set, else at
    ``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth`` (torchvision's download cache;
    ``torch.hub.get_dir()``, by default ``~/.cache/torch/hub``).

    Returns:
        The path of an existing file.
    Raises:
        FileNotFoundError: naming the places looked at and where to get the file.
    """
    how = (
        f"Download {VGG16_URL} (torchvision's VGG16 ImageNet weights) and pass its path as "
        f"LPIPS.from_pretrained(backbone=...), set {VGG16_ENV}, or put it in that cache folder."
    )
    cache = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILENAME
    return _find_file("the VGG16 backbone weights", VGG16_FILENAME, path, "backbone", VGG16_ENV, [cache], how)


def find_lpips_weights(path: str | os.PathLike | None = None) -> Path:
    """Locate the LPIPS "lin" v0.1 weights for VGG16 (``vgg.pth``) on this machine.

    Looks at ``path`` if given, else at ``$MEDFUSION_LPIPS_WEIGHTS`` if set, else at
    ``weights/v0.1/vgg.pth`` inside the installed ``lpips`` package (found without importing it).

    Returns:
        The path of an existing file.
    Raises:
        FileNotFoundError: naming the places looked at and where to get the file.
    """
    how = (
        f"Install the lpips package (pip install lpips; it ships the file as "
        f"lpips/{'/'.join(LPIPS_PACKAGE_FILE)}) or take it from {LPIPS_URL}, and pass its path as "
        f"LPIPS.from_pretrained(linear=...) or set {LPIPS_ENV}."
    )
    return _find_file(
        "the LPIPS linear weights", "vgg.pth", path, "linear", LPIPS_ENV, _lpips_package_files(), how
    )


def _lpips_package_files() -> list[Path]:
    """Where the installed ``lpips`` package keeps ``vgg.pth``; its spec is looked up, not imported."""
    try:
        spec = importlib.util.find_spec("lpips")
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    roots = [Path(p) for p in spec.submodule_search_locations or []]
    if not roots and spec.origin:
        roots = [Path(spec.origin).parent]
    return [root.joinpath(*LPIPS_PACKAGE_FILE) for root in roots]


def _find_file(
    what: str,
    filename: str,
    path: str | os.PathLike | None,
    argument: str,
    env: str,
    defaults: list[Path],
    how: str,
) -> Path:
    """The first of: ``path``; ``$env``; the existing one of ``defaults``. A named but missing file raises."""
    if path is not None:
        if Path(path).is_file():
            return Path(path)
        raise FileNotFoundError(f"{what} ({filename}) not found at {argument}={str(path)!r}. {how}")
    if os.environ.get(env):
        if Path(os.environ[env]).is_file():
            return Path(os.environ[env])
        raise FileNotFoundError(f"{what} ({filename}) not found at {env}={os.environ[env]!r}. {how}")
    for candidate in defaults:
        if candidate.is_file():
            return candidate
    looked = (
        ", ".join(str(p) for p in defaults) or "(no default location: the lpips package is not installed)"
    )
    raise FileNotFoundError(
        f"{what} ({filename}) not found: no {argument}= argument, {env} is not set, "
        f"and it is not at {looked}. {how}"
    )


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a flat ``{name: tensor}`` dict from ``.safetensors`` or ``.pth``/``.pt``; never runs code."""
    suffix = full_suffix(path)
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except SafetensorError as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    if suffix in (".pth", ".pt"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
            raise ValueError(
                f"{path}: not a plain weights file that loads with weights_only=True ({e})"
            ) from e
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{path}: expected a state dict of tensors; got {type(state).__name__}")
        return dict(state)
    raise ValueError(f"{path}: unknown weight file type {suffix!r}; expected one of {_WEIGHT_SUFFIXES}")


def _vgg16_shapes() -> dict[str, torch.Size]:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        return {k: v.shape for k, v in VGG16Features().state_dict().items()}


def _linear_shapes() -> dict[str, torch.Size]:
    return {f"lin{i}.model.1.weight": torch.Size((1, c, 1, 1)) for i, c in enumerate(VGG16_TAP_CHANNELS)}


def _check_state_dict(state: dict[str, torch.Tensor], expected: dict[str, torch.Size], path: Path) -> None:
    """Raise ``ValueError`` naming ``path`` and the keys if ``state`` does not match ``expected``."""
    problems = []
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(s)})"
        for k, s in expected.items()
        if k in state and state[k].shape != s
    ]
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
        if keys:
            shown = ", ".join(keys[:8]) + (f", ... ({len(keys) - 8} more)" if len(keys) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise ValueError(f"{path}: not the expected weights; " + "; ".join(problems))
