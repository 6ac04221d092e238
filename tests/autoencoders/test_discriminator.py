"""PatchGAN discriminator, hinge losses and the adaptive adversarial weight."""

from __future__ import annotations

import pytest
import torch

from medfusion.autoencoders.discriminator import (
    PatchDiscriminator,
    adaptive_weight,
    hinge_d_loss,
    hinge_g_loss,
)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_output_shape_and_minimum_size(spatial_dims, num_layers):
    disc = PatchDiscriminator(
        spatial_dims, in_channels=2, channels=4, num_layers=num_layers, norm_num_groups=2
    )
    size = disc.min_size
    assert size == 3 * 2**num_layers
    out = disc(torch.randn(2, 2, *[size] * spatial_dims))
    assert out.shape == (2, 1, *[1] * spatial_dims)
    out = disc(torch.randn(1, 2, *[size + 2**num_layers] * spatial_dims))  # one more patch per side
    assert out.shape == (1, 1, *[2] * spatial_dims)
    small = torch.randn(1, 2, *[size] * (spatial_dims - 1), size - 1)
    with pytest.raises(ValueError, match=f"at least {size}"):
        disc(small)
    with pytest.raises(RuntimeError):  # the check is not stricter than the layers themselves
        disc.layers(small)


def test_default_2d_matches_pix2pix_receptive_layout():
    disc = PatchDiscriminator(2, in_channels=1, channels=8, norm_num_groups=8)
    assert disc(torch.randn(1, 1, 64, 40)).shape == (1, 1, 6, 3)
    widths = [m.out_channels for m in disc.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    assert widths == [8, 16, 32, 64, 1]
    strides = [m.stride[0] for m in disc.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    assert strides == [2, 2, 2, 1, 1]
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in disc.modules()) == 3


def test_gradient_flows_to_input_and_parameters():
    disc = PatchDiscriminator(3, in_channels=1, channels=4, num_layers=1, norm_num_groups=2)
    x = torch.randn(2, 1, 8, 8, 8, requires_grad=True)
    hinge_g_loss(disc(x)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in disc.parameters())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"spatial_dims": 1}, "spatial_dims must be 2 or 3"),
        ({"in_channels": 0}, "in_channels must be at least 1"),
        ({"num_layers": 0}, "num_layers must be at least 1"),
        ({"channels": 6, "norm_num_groups": 4}, r"norm_num_groups \(4\) must divide channels \(6\)"),
    ],
)
def test_bad_arguments(kwargs, message):
    args = {
        "spatial_dims": 2,
        "in_channels": 1,
        "channels": 8,
        "num_layers": 2,
        "norm_num_groups": 4,
    } | kwargs
    with pytest.raises(ValueError, match=message):
        PatchDiscriminator(**args)


def test_wrong_input_layout():
    disc = PatchDiscriminator(2, in_channels=3, channels=4, num_layers=1, norm_num_groups=2)
    with pytest.raises(ValueError, match="expects input"):
        disc(torch.zeros(1, 3, 8, 8, 8))
    with pytest.raises(ValueError, match="expects input"):
        disc(torch.zeros(1, 1, 8, 8))


def test_hinge_losses_on_known_values():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real) = 0, 0.5, 2   -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + fake) = 0, 1, 2     -> mean 1
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor(0.5 * (5 / 6 + 1)))
    torch.testing.assert_close(hinge_g_loss(fake), torch.tensor(1 / 3))
    assert hinge_d_loss(torch.ones(2, 1, 3, 3), -torch.ones(2, 1, 3, 3)) == 0


def test_adaptive_weight_hand_computed():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    rec_loss, g_loss = (2 * w).sum(), w.sum()  # gradients 2 and 1 in every entry
    weight = adaptive_weight(rec_loss, g_loss, w, eps=0.0)
    torch.testing.assert_close(weight, torch.tensor(2.0))
    assert not weight.requires_grad
    torch.testing.assert_close(
        adaptive_weight(rec_loss, g_loss, w), torch.tensor(2 * 3**0.5 / (3**0.5 + 1e-4))
    )
    assert adaptive_weight(rec_loss, 1e-9 * g_loss, w) == 1e4  # clamped to max_weight
    (rec_loss + weight * g_loss).backward()  # the graph was retained
    torch.testing.assert_close(w.grad, torch.full((3,), 4.0))


def test_adaptive_weight_errors():
    w = torch.nn.Parameter(torch.ones(2))
    other = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="g_loss does not depend on last_layer"):
        adaptive_weight(w.sum(), other.sum(), w)
    with torch.no_grad():
        detached = w.sum()
    with pytest.raises(ValueError, match="rec_loss does not require grad"):
        adaptive_weight(detached, w.sum(), w)
