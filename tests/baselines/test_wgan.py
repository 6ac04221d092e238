"""WGAN-GP: generator and critic shapes in 2D and 3D with and without classes, the gradient penalty
and the losses against hand calculations, the config round trip, the architecture registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medfusion.baselines.arch import ARCHITECTURES, architecture, with_options
from medfusion.baselines.wgan import WGAN_GP, WGANCritic, WGANGenerator, gradient_penalty

TINY = {"base_channels": 8, "levels": 2, "z_dim": 8, "norm_num_groups": 4}
SIZES = {2: (16, 12), 3: (8, 8, 8)}


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("num_classes", [None, 3])
def test_generator_and_critic_shapes(spatial_dims, num_classes):
    size = SIZES[spatial_dims]
    torch.manual_seed(0)
    generator, critic = WGAN_GP.build(spatial_dims, 2, size, num_classes, **TINY)
    z = torch.randn(5, 8)
    labels = torch.tensor([0, 1, 2, 0, 1]) if num_classes else None
    images = generator(z, labels)
    assert images.shape == (5, 2, *size)
    assert images.min() >= -1 and images.max() <= 1 and images.std() > 0
    scores = critic(images, labels)
    assert scores.shape == (5,)
    # each sample is made and judged on its own (no batch statistics)
    torch.testing.assert_close(generator(z[:2], None if labels is None else labels[:2]), images[:2])
    torch.testing.assert_close(critic(images[2:], None if labels is None else labels[2:]), scores[2:])


def test_the_label_changes_the_image_and_the_score():
    torch.manual_seed(0)
    generator, critic = WGAN_GP.build(2, 1, (16, 16), 2, **TINY)
    z = torch.randn(1, 8).repeat(2, 1)
    images = generator(z, torch.tensor([0, 1]))
    assert not torch.allclose(images[0], images[1])
    same = images[:1].repeat(2, 1, 1, 1)
    scores = critic(same, torch.tensor([0, 1]))
    assert not torch.allclose(scores[0], scores[1])


def test_labels_are_checked_against_the_conditioning():
    generator, _ = WGAN_GP.build(2, 1, (16, 16), 2, **TINY)
    with pytest.raises(ValueError, match="labels are required: the generator is class-conditional"):
        generator(torch.randn(1, 8), None)
    unconditional, _ = WGAN_GP.build(2, 1, (16, 16), None, **TINY)
    with pytest.raises(ValueError, match="labels must be None: the generator is unconditional"):
        unconditional(torch.randn(1, 8), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"z must have shape \(N, 8\); got \(1, 4\)"):
        unconditional(torch.randn(1, 4))


def test_widths_and_start_grid():
    generator = WGANGenerator(image_size=(64, 48), base_channels=16, levels=4, max_channel_mult=4)
    assert generator.start_size == (4, 3) and generator.start_width == 64
    critic = WGANCritic(image_size=(64, 48), base_channels=16, levels=4, max_channel_mult=4)
    assert critic.feature_dim == 64 * 4 * 3


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"image_size": (20, 16), "levels": 3},
            r"image_size \[20, 16\] cannot be made with levels=3: every side",
        ),
        ({"image_size": (16,)}, r"image_size must be 2 positive sizes; got \[16\]"),
        ({"norm_num_groups": 3}, r"norm_num_groups \(3\) must divide base_channels \(8\)"),
        ({"num_classes": 0}, "num_classes must be >= 1 or None"),
        ({"z_dim": 0}, "z_dim must be >= 1; got 0"),
        ({"spatial_dims": 1}, "spatial_dims must be 2 or 3"),
    ],
)
def test_bad_generator_arguments(changes, message):
    arguments = {"image_size": (16, 16), "base_channels": 8, "levels": 2, "norm_num_groups": 4} | changes
    with pytest.raises(ValueError, match=message):
        WGANGenerator(**arguments)


def test_generator_saves_and_loads_as_safetensors(tmp_path):
    torch.manual_seed(0)
    generator, _ = WGAN_GP.build(3, 1, (8, 8, 8), 2, **TINY)
    generator.save_pretrained(tmp_path / "g", safe_serialization=True)
    assert (tmp_path / "g" / "config.json").is_file() and list((tmp_path / "g").glob("*.safetensors"))
    assert not list((tmp_path / "g").glob("*.bin"))
    loaded = WGANGenerator.from_pretrained(tmp_path / "g", use_safetensors=True)
    assert loaded.z_dim == 8 and tuple(loaded.config.image_size) == (8, 8, 8)
    z, labels = torch.randn(2, 8), torch.tensor([1, 0])
    torch.testing.assert_close(loaded(z, labels), generator(z, labels))


# --- gradient penalty and losses ----------------------------------------------------------------


class LinearCritic(nn.Module):
    """``critic(x) = w . x``: its gradient is ``w`` everywhere."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x, labels=None):
        return x.flatten(1) @ self.w.flatten()


class HalfSquareCritic(nn.Module):
    """``critic(x) = ||x||^2 / 2``: its gradient is ``x``."""

    def forward(self, x, labels=None):
        return 0.5 * x.flatten(1).pow(2).sum(dim=1)


def test_gradient_penalty_of_a_linear_critic_is_exactly_the_norm_gap():
    w = torch.tensor([[2.0, 0.0], [1.0, 2.0]])  # ||w|| = 3
    critic = LinearCritic(w.view(1, 2, 2))
    real, fake = torch.randn(6, 1, 2, 2), torch.randn(6, 1, 2, 2)
    penalty = gradient_penalty(critic, real, fake)
    assert float(penalty.detach()) == pytest.approx((3.0 - 1.0) ** 2, rel=1e-6)
    # differentiable in the critic's weights: d/dw (||w|| - 1)^2 = 2 (||w|| - 1) w / ||w||
    penalty.backward()
    torch.testing.assert_close(critic.w.grad, (2 * 2 / 3 * w).view(1, 2, 2))
    unit = LinearCritic(torch.tensor([0.6, 0.8, 0.0, 0.0]).view(1, 2, 2))
    assert float(gradient_penalty(unit, real, fake).detach()) == pytest.approx(0.0, abs=1e-10)


def test_gradient_penalty_is_taken_at_the_interpolates():
    # real == fake: every interpolate is the image itself, whose gradient is the image
    x = torch.tensor([[3.0, 0.0], [0.0, 0.5]]).view(2, 1, 2)
    penalty = gradient_penalty(HalfSquareCritic(), x, x.clone())
    assert float(penalty.detach()) == pytest.approx(((3 - 1) ** 2 + (0.5 - 1) ** 2) / 2)
    # with real = 0, fake = x the interpolate is (1 - eps) x: penalty mean((1-eps)|x| - 1)^2 < 4
    torch.manual_seed(0)
    eps = torch.rand(2)
    torch.manual_seed(0)
    penalty = gradient_penalty(HalfSquareCritic(), torch.zeros_like(x), x)
    expected = (((1 - eps) * torch.tensor([3.0, 0.5]) - 1) ** 2).mean()
    assert float(penalty.detach()) == pytest.approx(float(expected), rel=1e-6)


def test_critic_and_generator_losses_by_hand():
    w = torch.tensor([0.0, 2.0, 0.0, 0.0])  # ||w|| = 2
    critic = LinearCritic(w.view(1, 2, 2))
    real, fake = torch.ones(2, 1, 2, 2), -torch.ones(2, 1, 2, 2)  # scores 2 and -2
    loss, terms = WGAN_GP.discriminator_loss(critic, real, fake, None, step=0)
    wasserstein = 2.0 - (-2.0)
    expected = -wasserstein + 10.0 * (2.0 - 1.0) ** 2 + 1e-3 * 2.0**2
    assert float(loss.detach()) == pytest.approx(expected)
    assert float(terms["wasserstein"]) == pytest.approx(4.0)
    assert float(terms["gradient_penalty"]) == pytest.approx(1.0)
    g_loss, _ = WGAN_GP.generator_loss(critic, fake, None, step=0)
    assert float(g_loss.detach()) == pytest.approx(2.0)
    plain = with_options(WGAN_GP, {"gp_weight": 0.0, "drift_weight": 0.0})
    loss, terms = plain.discriminator_loss(critic, real, fake, None, step=0)
    assert float(loss.detach()) == pytest.approx(-4.0) and "gradient_penalty" not in terms


# --- the registry -------------------------------------------------------------------------------


def test_registry_resolves_names_and_names_the_known_ones():
    assert architecture("wgan-gp") is WGAN_GP
    assert WGAN_GP.name == "wgan-gp" and WGAN_GP.spatial_dims == (2, 3) and WGAN_GP.critic_steps == 5
    with pytest.raises(
        ValueError, match="arch 'gan' is not a known GAN architecture; known: wgan-gp, stylegan2"
    ):
        architecture("gan")


def test_a_registered_module_that_is_not_installed_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(ARCHITECTURES, "missing", "medfusion.baselines.not_there:ARCH")
    with pytest.raises(
        ValueError, match=r"arch 'missing': its module medfusion\.baselines\.not_there is not available"
    ):
        architecture("missing")


def test_with_options_checks_names_and_values():
    changed = with_options(WGAN_GP, {"critic_steps": 2, "gp_weight": 5.0})
    assert (changed.critic_steps, changed.gp_weight) == (2, 5.0)
    assert WGAN_GP.critic_steps == 5  # the registered one is unchanged
    with pytest.raises(ValueError, match=r"gan: unknown option\(s\) \['lr'\]"):
        with_options(WGAN_GP, {"lr": 1.0})
    with pytest.raises(ValueError, match=r"gan\.gp_weight must be >= 0; got -1"):
        with_options(WGAN_GP, {"gp_weight": -1.0})
