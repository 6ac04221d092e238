"""LPIPS written by hand: weight loading from local files, distance properties, channels and volumes.

The published weights are not available offline: random weights are saved in the layouts of
torchvision's ``vgg16-397923af.pth`` and lpips' ``vgg.pth`` and loaded from there.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from medfusion.autoencoders.perceptual import (
    LPIPS,
    LPIPS_ENV,
    VGG16_ENV,
    VGG16_TAP_CHANNELS,
    VGG16Features,
    find_lpips_weights,
    find_vgg16_weights,
    perceptual_distance,
    to_rgb_images,
)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """Random VGG16 and linear weights saved as .pth and .safetensors; returns their paths."""
    root = tmp_path_factory.mktemp("lpips_weights")
    gen = torch.Generator().manual_seed(0)
    backbone = {f"features.{k}": v for k, v in VGG16Features().features.state_dict().items()}
    backbone["classifier.0.weight"] = torch.zeros(4, 2)  # torchvision files carry a classifier
    linear = {
        f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=gen)
        for i, c in enumerate(VGG16_TAP_CHANNELS)
    }
    paths = {
        "backbone_pth": root / "vgg16-397923af.pth",
        "backbone_st": root / "vgg16.safetensors",
        "linear_pth": root / "vgg.pth",
        "linear_st": root / "vgg.safetensors",
    }
    torch.save(backbone, paths["backbone_pth"])
    save_file(backbone, paths["backbone_st"])
    torch.save(linear, paths["linear_pth"])
    save_file(linear, paths["linear_st"])
    return paths


@pytest.fixture(scope="module")
def lpips(weights) -> LPIPS:
    return LPIPS.from_pretrained(backbone=weights["backbone_pth"], linear=weights["linear_pth"])


@pytest.fixture(autouse=True)
def no_env(monkeypatch, tmp_path):
    """No weights from the machine running the tests: empty env vars, torch cache and lpips package."""
    monkeypatch.delenv(VGG16_ENV, raising=False)
    monkeypatch.delenv(LPIPS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    fake_lpips_spec(monkeypatch, None)


def fake_lpips_spec(monkeypatch, package_dir: Path | None) -> None:
    """Make ``importlib.util.find_spec("lpips")`` answer as if lpips were installed at ``package_dir``."""
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name != "lpips":
            return real(name, *args, **kwargs)
        if package_dir is None:
            return None
        spec = importlib.machinery.ModuleSpec("lpips", None, origin=str(package_dir / "__init__.py"))
        spec.submodule_search_locations = [str(package_dir)]
        return spec

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def images(n=2, c=3, size=32, seed=0) -> torch.Tensor:
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_vgg16_taps_follow_torchvision_indices():
    vgg = VGG16Features()
    taps = vgg(torch.zeros(1, 3, 32, 32))
    assert [t.shape[1:] for t in taps] == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 2, 2)]
    convs = [i for i, m in enumerate(vgg.features) if isinstance(m, torch.nn.modules.conv._ConvNd)]
    assert convs == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]


def test_from_pretrained_loads_the_files(lpips, weights):
    backbone = torch.load(weights["backbone_pth"], weights_only=True)
    linear = torch.load(weights["linear_pth"], weights_only=True)
    state = lpips.state_dict()
    for key in ("features.0.weight", "features.28.bias"):
        torch.testing.assert_close(state[f"net.{key}"], backbone[key], rtol=0, atol=0)
    torch.testing.assert_close(state["lin4.model.1.weight"], linear["lin4.model.1.weight"], rtol=0, atol=0)
    assert not lpips.training
    assert not any(p.requires_grad for p in lpips.parameters())
    lpips.train()
    assert not lpips.training


def test_from_pretrained_safetensors_through_env_vars(lpips, weights, monkeypatch):
    monkeypatch.setenv(VGG16_ENV, str(weights["backbone_st"]))
    monkeypatch.setenv(LPIPS_ENV, str(weights["linear_st"]))
    other = LPIPS.from_pretrained()
    x, y = images(seed=1), images(seed=2)
    torch.testing.assert_close(other(x, y), lpips(x, y))


def test_distance_properties(lpips):
    x, y = images(seed=1), images(seed=2)
    d = lpips(x, y)
    assert d.shape == (2,)
    assert (d > 0).all()
    torch.testing.assert_close(lpips(x, x), torch.zeros(2))
    torch.testing.assert_close(lpips(y, x), d)


def test_gradient_reaches_input_not_parameters(lpips):
    x = images(seed=1).requires_grad_()
    lpips(x, images(seed=2)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    assert all(p.grad is None for p in lpips.parameters())


def test_to_rgb_images():
    x = torch.arange(2 * 4 * 2 * 2, dtype=torch.float32).view(2, 4, 2, 2)
    rgb = to_rgb_images(x)
    assert rgb.shape == (8, 3, 2, 2)
    torch.testing.assert_close(rgb[5], x[1, 1].expand(3, 2, 2))
    assert to_rgb_images(x[:, :3]).data_ptr() == x.data_ptr()  # RGB is kept as it is


@pytest.mark.parametrize("channels", [1, 4])
def test_channels_are_compared_as_grey_images(lpips, channels):
    x, y = images(c=channels, seed=1), images(c=channels, seed=2)
    d = lpips(x, y)
    assert d.shape == (2,)
    per_channel = torch.stack([lpips(x[:, [k] * 3], y[:, [k] * 3]) for k in range(channels)], dim=1)
    torch.testing.assert_close(d, per_channel.mean(dim=1))


def test_perceptual_distance_of_images_is_lpips(lpips):
    x, y = images(c=1, seed=1), images(c=1, seed=2)
    torch.testing.assert_close(perceptual_distance(lpips, x, y), lpips(x, y))


def test_perceptual_distance_of_volumes_uses_slices(lpips):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 16, 16, 16, generator=gen) * 2 - 1
    y = torch.rand(2, 1, 16, 16, 16, generator=gen) * 2 - 1
    d = perceptual_distance(lpips, x, y, max_slices=2, generator=torch.Generator().manual_seed(3))
    assert d.shape == (2,) and (d > 0).all()
    again = perceptual_distance(lpips, x, y, max_slices=2, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(d, again)
    torch.testing.assert_close(perceptual_distance(lpips, x, x, max_slices=2), torch.zeros(2))
    # Thin volumes (D=4) constant along D: only slices along D are 16x16, so that axis is the one
    # chosen, and every slice is the same image.
    plane_x, plane_y = x[:, :, 0], y[:, :, 0]
    thin_x = plane_x.unsqueeze(2).expand(-1, -1, 4, -1, -1)
    thin_y = plane_y.unsqueeze(2).expand(-1, -1, 4, -1, -1)
    torch.testing.assert_close(perceptual_distance(lpips, thin_x, thin_y), lpips(plane_x, plane_y))


def test_bad_inputs(lpips):
    with pytest.raises(ValueError, match="at least 16x16"):
        lpips(images(size=8), images(size=8))
    with pytest.raises(ValueError, match="differ in shape"):
        lpips(images(c=1), images(c=3))
    with pytest.raises(ValueError, match="no slice of a volume"):
        perceptual_distance(lpips, torch.zeros(1, 1, 8, 8, 32), torch.zeros(1, 1, 8, 8, 32))
    with pytest.raises(ValueError, match="max_slices"):
        perceptual_distance(lpips, torch.zeros(1, 1, 16, 16, 16), torch.zeros(1, 1, 16, 16, 16), max_slices=0)


def test_missing_files_say_what_and_where():
    with pytest.raises(FileNotFoundError) as e:
        find_vgg16_weights()
    for text in ("vgg16-397923af.pth", VGG16_ENV, "https://download.pytorch.org/models/vgg16-397923af.pth"):
        assert text in str(e.value)
    assert "torch_home" in str(e.value)  # the cache folder looked at
    with pytest.raises(FileNotFoundError) as e:
        LPIPS.from_pretrained(backbone=__file__)
    for text in ("vgg.pth", LPIPS_ENV, "lpips", "github.com/richzhang/PerceptualSimilarity", "linear="):
        assert text in str(e.value)
    with pytest.raises(FileNotFoundError, match=r"backbone='/nowhere/vgg16\.pth'"):
        find_vgg16_weights("/nowhere/vgg16.pth")


def test_env_var_to_a_missing_file_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv(LPIPS_ENV, str(tmp_path / "gone.pth"))
    with pytest.raises(FileNotFoundError, match=f"{LPIPS_ENV}=.*gone.pth"):
        find_lpips_weights()


def test_default_locations(monkeypatch, tmp_path, weights):
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / "vgg16-397923af.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert find_vgg16_weights() == cached
    monkeypatch.setenv(VGG16_ENV, str(weights["backbone_st"]))  # the env var comes first
    assert find_vgg16_weights() == weights["backbone_st"]
    assert find_vgg16_weights(weights["backbone_pth"]) == weights["backbone_pth"]  # then the argument

    package = tmp_path / "site-packages" / "lpips"
    shipped = package / "weights" / "v0.1" / "vgg.pth"
    shipped.parent.mkdir(parents=True)
    shipped.write_bytes(b"")
    fake_lpips_spec(monkeypatch, package)
    assert find_lpips_weights() == shipped


def test_wrong_keys_and_shapes_name_file_and_keys(weights, tmp_path):
    linear = torch.load(weights["linear_pth"], weights_only=True)
    linear["lin0.model.1.weight"] = torch.zeros(1, 3, 1, 1)
    linear["lin9.model.1.weight"] = linear.pop("lin4.model.1.weight")
    bad = tmp_path / "bad_vgg.pth"
    torch.save(linear, bad)
    with pytest.raises(ValueError) as e:
        LPIPS.from_pretrained(backbone=weights["backbone_st"], linear=bad)
    message = str(e.value)
    assert str(bad) in message
    for text in ("missing keys: lin4.model.1.weight", "unexpected keys: lin9.model.1.weight", "(1, 3, 1, 1)"):
        assert text in message

    backbone = tmp_path / "backbone.safetensors"
    save_file({"features.0.weight": torch.zeros(64, 3, 3, 3)}, backbone)
    with pytest.raises(ValueError, match=r"backbone.safetensors.*missing keys: features.0.bias"):
        LPIPS.from_pretrained(backbone=backbone, linear=weights["linear_pth"])


def test_unsafe_or_unknown_files_are_refused(weights, tmp_path):
    pickled = tmp_path / "module.pth"
    torch.save({"lin0.model.1.weight": torch.nn.Identity()}, pickled)  # a pickled module, not tensors
    with pytest.raises(ValueError, match=r"module\.pth: not a plain weights file"):
        LPIPS.from_pretrained(backbone=weights["backbone_pth"], linear=pickled)
    other = tmp_path / "weights.npz"
    other.write_bytes(b"")
    with pytest.raises(ValueError, match=r"weights.npz: unknown weight file type"):
        LPIPS.from_pretrained(backbone=other, linear=weights["linear_pth"])
