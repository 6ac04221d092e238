"""Tests of the feature extractors of the distribution metrics: the domain encoder, the image
preparation (channels, size, value range), 2.5D features of volumes under a 2D network, and the
loaders by name or path (domain encoder folders, Inception from local weights, TorchScript, ONNX,
torchvision and timm models by name, tested with stand-in packages since neither is installed)."""

from __future__ import annotations

import importlib.util
import socket
import sys
import time
import types
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from medfusion.metrics.features import (
    ENCODER_DIR,
    IMAGENET_MEAN,
    IMAGENET_STD,
    INCEPTION_ENV,
    INCEPTION_WEIGHTS_FILE,
    TIMM_WEIGHTS_FILE,
    DomainEncoder,
    FeatureExtractor,
    domain_extractor,
    expand_channels,
    inception_extractor,
    inception_weights_path,
    load_extractor,
    slices_25d,
    timm_extractor,
    torchscript_extractor,
    torchvision_extractor,
)
from medfusion.nn.layers import conv_nd

JIT_DEPRECATED = pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:DeprecationWarning")
TINY = {"block_out_channels": (8, 16), "norm_num_groups": 4, "num_features": 16}


def _encoder(spatial_dims: int = 2, size: int = 16, in_channels: int = 1, seed: int = 0) -> DomainEncoder:
    torch.manual_seed(seed)
    return DomainEncoder(
        spatial_dims=spatial_dims, in_channels=in_channels, image_size=(size,) * spatial_dims, **TINY
    ).eval()


def _images(*shape: int, seed: int = 0) -> torch.Tensor:
    """Random images in [-1, 1]."""
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _linear_network(seed: int = 0, features: int = 5) -> nn.Module:
    """A deterministic 2D network: (N, 3, H, W) -> 2x2 average pool -> linear -> (N, features)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, features)).eval()


class _TinyScripted(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.linear = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.pool(x).flatten(1))


# --- the domain encoder -------------------------------------------------------------------------


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_domain_encoder_gives_finite_float32_features_that_tell_images_apart(spatial_dims):
    encoder = _encoder(spatial_dims)
    x = _images(3, 1, *(16,) * spatial_dims)
    with torch.no_grad():
        features = encoder(x)
    assert features.shape == (3, 16) and features.dtype == torch.float32
    assert encoder.num_features == 16
    assert torch.isfinite(features).all()
    assert not torch.allclose(features[0], features[1]) and not torch.allclose(features[1], features[2])


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_domain_encoder_round_trip_is_exact_and_safetensors_only(spatial_dims, tmp_path):
    encoder = _encoder(spatial_dims, in_channels=2)
    encoder.save_pretrained(tmp_path / "enc", safe_serialization=True)
    files = sorted(p.name for p in (tmp_path / "enc").iterdir())
    assert "config.json" in files
    assert all(name == "config.json" or name.endswith(".safetensors") for name in files), files
    assert any(name.endswith(".safetensors") for name in files)
    loaded = DomainEncoder.from_pretrained(tmp_path / "enc", use_safetensors=True).eval()
    assert loaded.config.spatial_dims == spatial_dims and loaded.config.in_channels == 2
    assert tuple(loaded.config.image_size) == (16,) * spatial_dims
    x = _images(2, 2, *(16,) * spatial_dims, seed=1)
    with torch.no_grad():
        assert torch.equal(encoder(x), loaded(x))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"spatial_dims": 4, "image_size": (8, 8, 8, 8)}, "spatial_dims"),
        ({"spatial_dims": 2, "image_size": (16, 16, 16)}, "image_size"),
        ({"spatial_dims": 3, "image_size": (16, 16)}, "image_size"),
        ({"norm_num_groups": 3}, "norm_num_groups"),
        ({"block_out_channels": (8, 12), "norm_num_groups": 8}, "norm_num_groups"),
    ],
)
def test_domain_encoder_rejects_bad_arguments(changes, message):
    with pytest.raises(ValueError, match=message):
        DomainEncoder(**{**TINY, "spatial_dims": 2, "image_size": (16, 16), **changes})


# --- preparing images ---------------------------------------------------------------------------


def test_prepare_repeats_grayscale_into_three_channels():
    extractor = FeatureExtractor(lambda x: x.flatten(1), "identity", 3 * 64, channels=3)
    x = _images(2, 1, 8, 8)
    prepared = extractor.prepare(x)
    assert prepared.shape == (2, 3, 8, 8)
    for c in range(3):
        assert torch.equal(prepared[:, c], x[:, 0])
    assert torch.equal(expand_channels(x, 3)[:, 2], x[:, 0])


def test_prepare_passes_three_channels_through_and_refuses_two():
    extractor = FeatureExtractor(lambda x: x.flatten(1), "identity", 3 * 64, channels=3)
    rgb = _images(2, 3, 8, 8)
    assert torch.equal(extractor.prepare(rgb), rgb)
    with pytest.raises(ValueError, match="only grayscale is expanded") as info:
        extractor.prepare(_images(2, 2, 8, 8))
    assert "2" in str(info.value) and "3 channel" in str(info.value)
    with pytest.raises(ValueError, match="only grayscale is expanded"):
        expand_channels(_images(1, 4, 8, 8), 3)


def test_prepare_resizes_to_the_input_size_2d_and_3d():
    flat = FeatureExtractor(lambda x: x.flatten(1), "id", 1, channels=1, input_size=(12, 20))
    assert flat.prepare(_images(2, 1, 16, 16)).shape == (2, 1, 12, 20)
    constant = torch.full((1, 1, 16, 16), 0.25)
    assert torch.allclose(flat.prepare(constant), torch.full((1, 1, 12, 20), 0.25))
    volume = FeatureExtractor(
        lambda x: x.flatten(1), "id", 1, spatial_dims=3, channels=1, input_size=(8,) * 3
    )
    assert volume.prepare(_images(2, 1, 16, 16, 16)).shape == (2, 1, 8, 8, 8)
    same = FeatureExtractor(lambda x: x.flatten(1), "id", 1, channels=1, input_size=(16, 16))
    x = _images(1, 1, 16, 16)
    assert torch.equal(same.prepare(x), x)


@pytest.mark.parametrize("value_range", [(0.0, 1.0), (-2.0, 6.0), (0.0, 255.0)])
def test_prepare_maps_minus_one_and_one_to_the_value_range(value_range):
    low, high = value_range
    extractor = FeatureExtractor(lambda x: x, "id", 1, channels=1, value_range=value_range)
    x = torch.tensor([-1.0, 0.0, 1.0, -3.0, 2.0]).view(1, 1, 1, 5)
    prepared = extractor.prepare(x).flatten()
    middle = (low + high) / 2
    assert prepared.tolist() == pytest.approx([low, middle, high, low, high])  # out of range: clamped


# --- 2.5D features of volumes -------------------------------------------------------------------


def test_slices_25d_shapes_and_centre_slices():
    volumes = _images(2, 1, 8, 10, 12)
    planes = slices_25d(volumes, per_axis=3)
    assert [tuple(p.shape) for p in planes] == [(6, 1, 10, 12), (6, 1, 8, 12), (6, 1, 8, 10)]
    centre = slices_25d(volumes, per_axis=1)
    assert [tuple(p.shape) for p in centre] == [(2, 1, 10, 12), (2, 1, 8, 12), (2, 1, 8, 10)]
    assert torch.equal(centre[0], volumes[:, :, 4])
    assert torch.equal(centre[1], volumes[:, :, :, 5])
    assert torch.equal(centre[2], volumes[:, :, :, :, 6])


@pytest.mark.parametrize("per_axis", [2, 3, 4])
def test_slices_25d_are_item_major_and_spread_over_the_middle_half(per_axis):
    n, sizes = 2, (16, 12, 20)
    d, h, w = torch.meshgrid(*(torch.arange(s, dtype=torch.float32) for s in sizes), indexing="ij")
    for axis, index in enumerate((d, h, w)):
        # each voxel holds 1000 * item + its index along this axis
        volumes = torch.stack([1000.0 * i + index for i in range(n)])[:, None]
        plane = slices_25d(volumes, per_axis)[axis]
        assert plane.shape[0] == n * per_axis
        values = plane.flatten(1)
        assert (values == values[:, :1]).all()  # a slice is constant: one position of this axis
        codes = values[:, 0].view(n, per_axis)
        positions = codes[0]
        items = 1000.0 * torch.arange(n, dtype=torch.float32)[:, None]
        assert torch.equal(codes - positions, items.expand(n, per_axis))
        assert (positions[1:] > positions[:-1]).all()
        size = sizes[axis]
        assert positions.min() >= round(size * 0.25) and positions.max() <= size * 0.75 - 1


def test_a_2d_network_over_volumes_gives_per_axis_means_of_slice_features():
    network = _linear_network()
    extractor = FeatureExtractor(network, "linear", 5, spatial_dims=2, channels=3, value_range=(0.0, 1.0))
    volumes = _images(2, 1, 16, 16, 16, seed=3)
    features = extractor(volumes)
    assert features.shape == (2, 15) and extractor.output_features(volumes) == 15
    assert extractor.output_features(volumes[:, :, 0]) == 5

    def hand(slices: torch.Tensor) -> torch.Tensor:  # (M, 1, H, W) -> network features
        with torch.no_grad():
            return network((slices.expand(-1, 3, -1, -1) + 1) / 2)

    expected = torch.cat([hand(p).view(2, 3, 5).mean(1) for p in slices_25d(volumes, 3)], dim=1)
    assert torch.allclose(features, expected, atol=1e-6)

    centre = FeatureExtractor(network, "linear", 5, channels=3, value_range=(0.0, 1.0), slices_per_axis=1)
    by_hand = torch.cat([hand(volumes[:, :, 8]), hand(volumes[:, :, :, 8]), hand(volumes[..., 8])], dim=1)
    assert torch.allclose(centre(volumes), by_hand, atol=1e-6)


def test_channel_means_network_over_volumes_matches_closed_form():
    """With per-image channel means as the network, 2.5D features are means of slice means."""
    extractor = FeatureExtractor(
        lambda x: x.mean(dim=(2, 3)), "means", 3, channels=3, value_range=(-1.0, 1.0), slices_per_axis=1
    )
    volumes = _images(3, 1, 16, 16, 16, seed=4)
    features = extractor(volumes)
    assert features.shape == (3, 9)
    expected = [
        volumes[:, 0, 8].mean((1, 2)),
        volumes[:, 0, :, 8].mean((1, 2)),
        volumes[:, 0, ..., 8].mean((1, 2)),
    ]
    for axis, values in enumerate(expected):
        for c in range(3):  # grayscale repeated: every channel alike
            assert torch.allclose(features[:, 3 * axis + c], values, atol=1e-6)


def test_a_3d_extractor_refuses_2d_images():
    extractor = FeatureExtractor(_encoder(3), "domain:test", 16, spatial_dims=3, channels=1)
    assert extractor(_images(2, 1, 16, 16, 16)).shape == (2, 16)
    with pytest.raises(ValueError, match=r"takes 3D images; got shape \(2, 1, 16, 16\)"):
        extractor(_images(2, 1, 16, 16))
    flat = FeatureExtractor(_linear_network(), "linear", 5)
    with pytest.raises(ValueError, match="takes 2D images"):
        flat(_images(2, 3, 16))


# --- domain encoder folders ---------------------------------------------------------------------


def test_domain_extractor_loads_the_run_folder_and_the_encoder_folder(tmp_path):
    encoder = _encoder(2)
    run = tmp_path / "FEAT"
    encoder.save_pretrained(run / ENCODER_DIR, safe_serialization=True)
    x = _images(3, 1, 16, 16, seed=5)
    with torch.no_grad():
        expected = encoder(x)
    for spec in (run, run / ENCODER_DIR, str(run)):
        extractor = load_extractor(spec)
        assert extractor.num_features == 16 and extractor.spatial_dims == 2 and extractor.channels == 1
        assert extractor.input_size == (16, 16) and extractor.name.startswith("domain:")
        assert not extractor.network.training  # the encoder runs in eval mode
        features = extractor(x)
        assert features.shape == (3, 16) and features.dtype == torch.float32
        assert torch.allclose(features, expected, atol=1e-6)
    # other sizes are resized to the encoder's; volumes under a 2D encoder give 2.5D features
    assert domain_extractor(run)(_images(2, 1, 24, 24)).shape == (2, 16)
    assert domain_extractor(run)(_images(2, 1, 16, 16, 16)).shape == (2, 48)


def test_domain_extractor_3d(tmp_path):
    encoder = _encoder(3)
    encoder.save_pretrained(tmp_path / "FEAT" / ENCODER_DIR, safe_serialization=True)
    extractor = load_extractor(tmp_path / "FEAT")
    assert extractor.spatial_dims == 3 and extractor.input_size == (16, 16, 16)
    x = _images(2, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(extractor(x), encoder(x), atol=1e-6)
    with pytest.raises(ValueError, match="3D"):
        extractor(_images(2, 1, 16, 16))


def test_domain_extractor_refuses_a_folder_without_an_encoder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="medfusion features train"):
        domain_extractor(empty)
    with pytest.raises(ValueError, match="medfusion features train"):
        load_extractor(empty)
    half = tmp_path / "half"
    _encoder(2).save_pretrained(half, safe_serialization=True)
    for weights in half.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ValueError, match=r"config.json and \*.safetensors"):
        load_extractor(half)


# --- Inception from local weights ---------------------------------------------------------------


@pytest.fixture
def offline_hub(monkeypatch, tmp_path) -> Path:
    """An empty torch hub cache (its folder returned) and no network."""
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))

    def no_network(*args, **kwargs):
        raise AssertionError("the loaders must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    return hub


@pytest.fixture
def no_inception_weights(monkeypatch, offline_hub):
    """No weights anywhere: no environment variable, an empty torch hub cache, no network."""
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    return offline_hub / "checkpoints" / INCEPTION_WEIGHTS_FILE


def test_inception_weights_missing_says_what_and_where(no_inception_weights):
    with pytest.raises(FileNotFoundError) as info:
        inception_weights_path()
    message = str(info.value)
    assert INCEPTION_WEIGHTS_FILE in message
    assert str(no_inception_weights) in message
    assert INCEPTION_ENV in message
    assert "https://" in message  # where to download it (elsewhere)

    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_FILE):
        load_extractor("inception")
    assert time.perf_counter() - start < 2.0
    assert not no_inception_weights.parent.exists()  # nothing was downloaded or created


def test_inception_weights_missing_explicit_path_is_listed(no_inception_weights, tmp_path):
    missing = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(FileNotFoundError) as info:
        inception_weights_path(missing)
    assert str(missing) in str(info.value) and str(no_inception_weights) in str(info.value)


def test_inception_weights_from_the_environment_and_the_hub_cache(
    no_inception_weights, monkeypatch, tmp_path
):
    dummy = tmp_path / "weights" / INCEPTION_WEIGHTS_FILE
    dummy.parent.mkdir()
    dummy.write_bytes(b"not really weights")
    monkeypatch.setenv(INCEPTION_ENV, str(dummy))
    assert inception_weights_path() == dummy
    explicit = tmp_path / "explicit.pth"
    explicit.write_bytes(b"x")
    assert inception_weights_path(explicit) == explicit  # an explicit path comes first

    monkeypatch.delenv(INCEPTION_ENV)
    no_inception_weights.parent.mkdir(parents=True)
    no_inception_weights.write_bytes(b"cached")
    assert inception_weights_path() == no_inception_weights


def test_inception_extractor_without_torch_fidelity_names_the_extra(
    no_inception_weights, monkeypatch, tmp_path
):
    if importlib.util.find_spec("torch_fidelity") is not None:
        pytest.skip("torch-fidelity is installed")
    dummy = tmp_path / INCEPTION_WEIGHTS_FILE
    dummy.write_bytes(b"not really weights")
    monkeypatch.setenv(INCEPTION_ENV, str(dummy))
    with pytest.raises(ImportError, match=r"medfusion\[inception\]"):
        inception_extractor()
    with pytest.raises(ImportError, match="torch-fidelity"):
        load_extractor("inception")


# --- TorchScript and ONNX files -----------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".ts"])
@JIT_DEPRECATED
def test_torchscript_extractor(tmp_path, suffix):
    torch.manual_seed(0)
    module = torch.jit.script(_TinyScripted().eval())
    path = tmp_path / f"net{suffix}"
    torch.jit.save(module, str(path))
    extractor = load_extractor(path)
    assert extractor.num_features == 5 and extractor.channels == 3 and extractor.value_range == (0.0, 1.0)
    assert extractor.name == f"torchscript:{path}"
    x = _images(4, 1, 32, 32)
    features = extractor(x)
    assert features.shape == (4, 5) and features.dtype == torch.float32
    with torch.no_grad():
        expected = module((x.expand(-1, 3, -1, -1) + 1) / 2)
    assert torch.allclose(features, expected, atol=1e-6)
    assert extractor(_images(2, 1, 16, 16, 16)).shape == (2, 15)  # volumes: 2.5D


@JIT_DEPRECATED
def test_torchscript_extractor_refuses_a_module_without_per_image_features(tmp_path):
    class Scalar(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean()

    path = tmp_path / "scalar.pt"
    torch.jit.save(torch.jit.script(Scalar()), str(path))
    with pytest.raises(ValueError, match=r"expected \(N, D\) features"):
        load_extractor(path)


@pytest.mark.parametrize("name", ["missing.pt", "missing_folder", "weights.txt", "inception-v3"])
def test_load_extractor_names_the_accepted_kinds(tmp_path, name):
    (tmp_path / "weights.txt").write_text("not a network")
    with pytest.raises(ValueError) as info:
        load_extractor(tmp_path / name if name != "inception-v3" else name)
    message = str(info.value)
    for kind in ("'inception'", "domain encoder folder", ".pt", ".ts", ".onnx"):
        assert kind in message, message


def test_onnx_without_onnxruntime_says_so(tmp_path):
    if importlib.util.find_spec("onnxruntime") is not None:
        pytest.skip("onnxruntime is installed")
    path = tmp_path / "net.onnx"
    path.write_bytes(b"not really a model")
    with pytest.raises(ImportError, match="onnxruntime"):
        load_extractor(path)


def test_extractor_output_is_float32_for_a_half_precision_network():
    network = _linear_network()
    extractor = FeatureExtractor(lambda x: network(x).to(torch.bfloat16), "bf16", 5, channels=3)
    x = _images(2, 1, 8, 8)
    features = extractor(x)
    assert features.dtype == torch.float32 and features.shape == (2, 5)
    with torch.no_grad():
        assert torch.allclose(features, network(x.expand(-1, 3, -1, -1)), atol=5e-2)


@JIT_DEPRECATED
def test_torchscript_extractor_with_an_input_size(tmp_path):
    torch.manual_seed(0)
    module = torch.jit.script(_TinyScripted().eval())
    path = tmp_path / "net.pt"
    torch.jit.save(module, str(path))
    extractor = torchscript_extractor(path, input_size=(24, 20))
    assert extractor.input_size == (24, 20) and extractor.num_features == 5
    assert extractor.prepare(_images(2, 1, 16, 16)).shape == (2, 3, 24, 20)


# --- torchvision and timm models by name (stand-in packages) ------------------------------------

TV_URL = "https://download.example.org/models/tinynet-0123abcd.pth"
TV_FILE = "tinynet-0123abcd.pth"
HF_REPO = "timm/tinynet.test"


class _TinyClassifier(nn.Module):
    """A stand-in classifier: conv -> batch norm -> ReLU -> mean pool (6 features) -> its head
    (``fc`` Linear, a ``classifier`` Sequential, or ``out``: none torchvision knows). Records the
    shapes it is called on."""

    def __init__(self, head: str = "fc", seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = conv_nd(2, 3, 6, 3, padding=1)
        self.norm = nn.BatchNorm2d(6)
        self.norm.running_mean.uniform_(-0.5, 0.5)  # statistics of its own: loading must copy them
        self.norm.running_var.uniform_(0.5, 2.0)
        self.head_name = head
        if head == "classifier":
            self.classifier = nn.Sequential(nn.Dropout(0.0), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 10))
        else:
            setattr(self, head, nn.Linear(6, 10))
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(x.shape))
        h = torch.relu(self.norm(self.conv(x))).mean((2, 3))  # (N, 6)
        return getattr(self, self.head_name)(h)

    def headless(self) -> _TinyClassifier:
        """Itself without its classifier's last Linear, in eval mode."""
        if self.head_name == "classifier":
            self.classifier[-1] = nn.Identity()
        else:
            setattr(self, self.head_name, nn.Identity())
        return self.eval()


def _normalised(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Images in [-1, 1] as the wrapped network takes them: 3 channels, [0, 1], normalised."""
    x = (x.expand(-1, 3, *x.shape[2:]) + 1) / 2
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.fixture
def fake_torchvision(monkeypatch):
    """torchvision.models as a stand-in: ``get_model`` calls ``fake_torchvision.build`` (a fresh
    :class:`_TinyClassifier`, seed 0, with the head named by ``fake_torchvision.head``) and keeps
    the model in ``fake_torchvision.built``; the DEFAULT weights name :data:`TV_URL` and a crop of
    ``fake_torchvision.crop_size``."""
    models = types.ModuleType("torchvision.models")
    models.head, models.built, models.crop_size = "fc", [], [32]
    models.build = lambda: _TinyClassifier(models.head, seed=0)

    def get_model(name, weights=None, **kwargs):
        assert weights is None and not kwargs, "the loader must build the model without weights"
        if name != "tinynet":
            raise ValueError(f"Unknown model {name}")
        models.built.append(models.build())
        return models.built[-1]

    def get_state_dict(*args, **kwargs):
        raise AssertionError("the loader must not let torchvision download weights")

    def get_model_weights(name):
        if name != "tinynet":
            raise ValueError(f"Unknown model {name}")
        transforms = (lambda: types.SimpleNamespace(crop_size=models.crop_size)) if models.crop_size else None
        default = types.SimpleNamespace(url=TV_URL, transforms=transforms, get_state_dict=get_state_dict)
        return types.SimpleNamespace(DEFAULT=default)

    models.get_model, models.get_model_weights = get_model, get_model_weights
    package = types.ModuleType("torchvision")
    package.models = models
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    return models


def _save_weights(model: nn.Module, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def test_torchvision_extractor_from_the_hub_cache_gives_headless_normalised_features(
    fake_torchvision, offline_hub
):
    trained = _TinyClassifier(seed=1)
    _save_weights(trained, offline_hub / "checkpoints" / TV_FILE)
    extractor = load_extractor("torchvision:tinynet")
    assert extractor.name == "torchvision:tinynet" and extractor.num_features == 6
    assert extractor.channels == 3 and extractor.input_size == (32, 32)
    assert extractor.value_range == (0.0, 1.0) and extractor.spatial_dims == 2
    model = fake_torchvision.built[-1]
    assert isinstance(model.fc, nn.Identity) and not model.training
    assert model.seen == [(1, 3, 32, 32)]  # the probe, at the crop size of the weights
    for channels in (1, 3):  # grayscale is repeated into three channels
        x = _images(3, channels, 32, 32, seed=channels)
        features = extractor(x)
        assert features.shape == (3, 6) and features.dtype == torch.float32
        with torch.no_grad():
            expected = trained.headless()(_normalised(x, IMAGENET_MEAN, IMAGENET_STD))
        assert torch.allclose(features, expected, atol=1e-5)
    assert extractor(_images(2, 1, 16, 16)).shape == (2, 6) and model.seen[-1] == (2, 3, 32, 32)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_torchvision_extractor_from_a_named_file(fake_torchvision, offline_hub, tmp_path, suffix):
    fake_torchvision.head = "classifier"
    trained = _TinyClassifier("classifier", seed=2)
    path = _save_weights(trained, tmp_path / "mine @ home" / f"weights{suffix}")
    extractor = load_extractor(f"torchvision:tinynet@{path}")
    assert extractor.num_features == 4  # a Sequential classifier loses only its last Linear
    model = fake_torchvision.built[-1]
    assert isinstance(model.classifier[-1], nn.Identity) and isinstance(model.classifier[1], nn.Linear)
    x = _images(2, 3, 32, 32, seed=7)
    with torch.no_grad():
        expected = trained.headless()(_normalised(x, IMAGENET_MEAN, IMAGENET_STD))
    assert torch.allclose(extractor(x), expected, atol=1e-5)
    assert not (offline_hub / "checkpoints").exists()  # the hub cache is not looked into or made


def test_torchvision_extractor_renames_the_legacy_densenet_keys(fake_torchvision, tmp_path):
    class Dense(_TinyClassifier):
        def __init__(self, seed: int = 0):
            super().__init__("classifier", seed)
            self.denselayer1 = nn.Module()
            self.denselayer1.norm1 = nn.BatchNorm2d(2)

    fake_torchvision.head = "classifier"
    fake_torchvision.build = Dense
    trained = Dense(seed=3)
    state = {k.replace("norm1.", "norm.1."): v for k, v in trained.state_dict().items()}
    assert "denselayer1.norm.1.running_mean" in state
    torch.save(state, tmp_path / "densenet.pth")
    torchvision_extractor("tinynet", tmp_path / "densenet.pth")
    loaded = fake_torchvision.built[-1].denselayer1.norm1
    assert torch.equal(loaded.running_mean, trained.denselayer1.norm1.running_mean)


def test_torchvision_extractor_sets_transform_input_as_torchvision_does_with_weights(
    fake_torchvision, offline_hub
):
    class Inception(_TinyClassifier):
        transform_input = False  # GoogLeNet and Inception-v3 built without weights

    fake_torchvision.build = Inception
    _save_weights(Inception(seed=1), offline_hub / "checkpoints" / TV_FILE)
    torchvision_extractor("tinynet")
    assert fake_torchvision.built[-1].transform_input is True


def test_torchvision_input_size_is_224_when_the_weights_name_no_crop(fake_torchvision, offline_hub):
    fake_torchvision.crop_size = None
    _save_weights(_TinyClassifier(seed=1), offline_hub / "checkpoints" / TV_FILE)
    extractor = torchvision_extractor("tinynet")
    assert extractor.input_size == (224, 224) and fake_torchvision.built[-1].seen == [(1, 3, 224, 224)]


def test_torchvision_extractor_over_volumes_gives_25d_features(fake_torchvision, offline_hub):
    _save_weights(_TinyClassifier(seed=1), offline_hub / "checkpoints" / TV_FILE)
    extractor = load_extractor("torchvision:tinynet")
    volumes = _images(2, 1, 16, 16, 16, seed=8)
    features = extractor(volumes)
    assert features.shape == (2, 18) and extractor.output_features(volumes) == 18
    assert torch.isfinite(features).all()


def test_torchvision_weights_missing_says_what_and_where_without_the_network(fake_torchvision, offline_hub):
    expected = offline_hub / "checkpoints" / TV_FILE
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as info:
        load_extractor("torchvision:tinynet")
    assert time.perf_counter() - start < 2.0
    message = str(info.value)
    assert str(expected) in message and TV_URL in message and "torchvision:tinynet@FILE" in message
    assert not fake_torchvision.built  # it failed before building the model
    assert not expected.parent.exists()  # nothing was downloaded or created
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pth"):
        load_extractor("torchvision:tinynet@nowhere.pth")


def test_torchvision_weights_that_do_not_fit_name_the_file(fake_torchvision, offline_hub, tmp_path):
    state = {f"renamed.{k}": v for k, v in _TinyClassifier(seed=1).state_dict().items()}
    wrong_keys = tmp_path / "wrong_keys.pth"
    torch.save(state, wrong_keys)
    with pytest.raises(ValueError, match=r"wrong_keys\.pth: the weights do not fit torchvision:tinynet"):
        load_extractor(f"torchvision:tinynet@{wrong_keys}")
    wrong_shapes = _save_weights(_TinyClassifier("classifier"), tmp_path / "wrong_shapes.safetensors")
    with pytest.raises(ValueError, match=r"wrong_shapes\.safetensors: the weights do not fit"):
        torchvision_extractor("tinynet", wrong_shapes)
    not_a_state_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_state_dict)
    with pytest.raises(ValueError, match=r"list\.pth: expected a state dict"):
        torchvision_extractor("tinynet", not_a_state_dict)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not really weights")
    with pytest.raises(ValueError, match=r"garbage\.safetensors: not a readable weights file"):
        torchvision_extractor("tinynet", garbage)


def test_torchvision_model_without_a_known_classifier_is_refused(fake_torchvision, offline_hub):
    fake_torchvision.head = "out"
    _save_weights(_TinyClassifier("out", seed=1), offline_hub / "checkpoints" / TV_FILE)
    with pytest.raises(ValueError, match=r"torchvision:tinynet: found no classifier to remove") as info:
        load_extractor("torchvision:tinynet")
    assert "fc, classifier, heads, head" in str(info.value)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("torchvision:", "expected torchvision:NAME or torchvision:NAME@WEIGHTS_FILE"),
        ("torchvision:tinynet@", "expected torchvision:NAME"),
        ("timm:@weights.pth", "expected timm:NAME or timm:NAME@WEIGHTS_FILE"),
        ("torchvision:nonet", "torchvision names no default weights"),
    ],
)
def test_named_specs_are_checked(fake_torchvision, offline_hub, spec, message):
    with pytest.raises(ValueError, match=message):
        load_extractor(spec)


@pytest.mark.parametrize(
    ("spec", "modules", "message"),
    [
        ("torchvision:resnet18", ("torchvision", "torchvision.models"), "pip install torchvision"),
        ("timm:resnet18", ("timm",), "pip install timm"),
    ],
)
def test_named_extractors_without_their_package_say_what_to_install(monkeypatch, spec, modules, message):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=message) as info:
        load_extractor(spec)
    assert spec in str(info.value)


@pytest.fixture
def fake_timm(monkeypatch):
    """timm and the Hugging Face cache as stand-ins: ``create_model`` builds a
    :class:`_TinyClassifier` (seed 0) with a ``pretrained_cfg`` and ``reset_classifier``;
    ``fake_timm.cache`` maps (repo, file) to the path ``try_to_load_from_cache`` returns."""
    timm = types.ModuleType("timm")
    timm.built, timm.cache, timm.lookups = [], {}, []
    config = {
        "hf_hub_id": HF_REPO,
        "mean": (0.5, 0.4, 0.3),
        "std": (0.2, 0.25, 0.3),
        "input_size": (3, 24, 20),
    }

    class TimmTiny(_TinyClassifier):
        pretrained_cfg = config

        def reset_classifier(self, num_classes: int) -> None:
            self.reset_to = num_classes
            self.fc = nn.Identity()

    def create_model(name, pretrained=True, **kwargs):
        assert pretrained is False and not kwargs, "the loader must build the model without weights"
        timm.built.append(TimmTiny(seed=0))
        return timm.built[-1]

    def try_to_load_from_cache(repo_id, filename, cache_dir=None, revision=None, repo_type=None):
        timm.lookups.append((repo_id, filename, revision))
        return timm.cache.get((repo_id, filename))

    timm.create_model, timm.TimmTiny, timm.config = create_model, TimmTiny, config
    monkeypatch.setitem(sys.modules, "timm", timm)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", try_to_load_from_cache)
    return timm


def test_timm_extractor_from_the_hugging_face_cache_honours_its_pretrained_cfg(
    fake_timm, offline_hub, tmp_path
):
    trained = fake_timm.TimmTiny(seed=4)
    fake_timm.cache[(HF_REPO, TIMM_WEIGHTS_FILE)] = str(
        _save_weights(trained, tmp_path / "hf" / "snapshots" / "abc" / TIMM_WEIGHTS_FILE)
    )
    extractor = load_extractor("timm:tinynet.test")
    assert fake_timm.lookups == [(HF_REPO, TIMM_WEIGHTS_FILE, None)]
    assert extractor.name == "timm:tinynet.test" and extractor.num_features == 6
    assert extractor.input_size == (24, 20) and extractor.channels == 3
    model = fake_timm.built[-1]
    assert model.reset_to == 0 and not model.training
    assert model.seen == [(1, 3, 24, 20)]  # the probe, at the input size of the pretrained_cfg
    x = _images(3, 1, 24, 20, seed=9)
    with torch.no_grad():
        expected = trained.headless()(_normalised(x, fake_timm.config["mean"], fake_timm.config["std"]))
    assert torch.allclose(extractor(x), expected, atol=1e-5)
    extractor(_images(2, 1, 16, 16))
    assert model.seen[-1] == (2, 3, 24, 20)  # other sizes are resized
    assert extractor(_images(2, 1, 16, 16, 16)).shape == (2, 18)  # volumes: 2.5D


def test_timm_extractor_from_a_named_file(fake_timm, offline_hub, tmp_path):
    trained = fake_timm.TimmTiny(seed=5)
    path = _save_weights(trained, tmp_path / "timm.pth")
    extractor = timm_extractor("tinynet.test", path)
    assert not fake_timm.lookups  # the cache is not asked
    x = _images(2, 3, 24, 20, seed=10)
    with torch.no_grad():
        expected = trained.headless()(_normalised(x, fake_timm.config["mean"], fake_timm.config["std"]))
    assert torch.allclose(extractor(x), expected, atol=1e-5)
    broken = tmp_path / "broken.pth"
    torch.save({"conv.weight": torch.zeros(1)}, broken)
    with pytest.raises(ValueError, match=r"broken\.pth: the weights do not fit timm:tinynet\.test"):
        timm_extractor("tinynet.test", broken)


@pytest.mark.parametrize("cached", [None, "no-exist"])
def test_timm_weights_missing_say_which_repository_and_how_to_fetch_them(fake_timm, offline_hub, cached):
    if cached:  # the cache knows the file is not in the repository
        fake_timm.cache[(HF_REPO, TIMM_WEIGHTS_FILE)] = huggingface_hub.file_download._CACHED_NO_EXIST
    with pytest.raises(FileNotFoundError) as info:
        load_extractor("timm:tinynet.test")
    message = str(info.value)
    for part in (
        HF_REPO,
        TIMM_WEIGHTS_FILE,
        f"hf download {HF_REPO} {TIMM_WEIGHTS_FILE}",
        "timm:tinynet.test@FILE",
    ):
        assert part in message, message


def test_timm_weights_revision_and_models_without_a_hub_id(fake_timm, offline_hub):
    fake_timm.config["hf_hub_id"] = f"{HF_REPO}@v2"
    with pytest.raises(FileNotFoundError, match=HF_REPO):
        timm_extractor("tinynet.test")
    assert fake_timm.lookups == [(HF_REPO, TIMM_WEIGHTS_FILE, "v2")]
    fake_timm.config["hf_hub_id"] = None
    with pytest.raises(FileNotFoundError, match="names no Hugging Face hub repository"):
        timm_extractor("tinynet.test")
    with pytest.raises(ValueError, match="not hf-hub:"):
        load_extractor("timm:hf-hub:timm/tinynet.test")
