"""Tests of the feature extractors of the distribution metrics: the domain encoder, the image
preparation (channels, size, value range), 2.5D features of volumes under a 2D network, and the
loaders by name or path (domain encoder folders, Inception from local weights, TorchScript, ONNX)."""

from __future__ import annotations

import importlib.util
import socket
import time

import pytest
import torch
from torch import nn

from medfusion.metrics.features import (
    ENCODER_DIR,
    INCEPTION_ENV,
    INCEPTION_WEIGHTS_FILE,
    DomainEncoder,
    FeatureExtractor,
    domain_extractor,
    expand_channels,
    inception_extractor,
    inception_weights_path,
    load_extractor,
    slices_25d,
)

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
def no_inception_weights(monkeypatch, tmp_path):
    """No weights anywhere: no environment variable, an empty torch hub cache, no network."""
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))

    def no_network(*args, **kwargs):
        raise AssertionError("the inception loader must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    return hub / "checkpoints" / INCEPTION_WEIGHTS_FILE


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
