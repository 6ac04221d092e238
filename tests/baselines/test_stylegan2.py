"""StyleGAN2 baseline: shapes, modulated convolution, losses, R1, training steps, save and load."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medfusion.baselines.stylegan2 import (
    STYLEGAN2,
    ModulatedConv,
    StyleGAN2Architecture,
    StyleGAN2Discriminator,
    StyleGAN2Generator,
    discriminator_logistic_loss,
    generator_nonsaturating_loss,
    minibatch_stddev,
    r1_penalty,
    resolution_levels,
)

TINY = {"channel_base": 64, "channel_max": 8, "z_dim": 8, "w_dim": 8}


def tiny(num_classes: int | None = 3, image_size=(16, 16), channels: int = 1, **changes):
    torch.manual_seed(0)
    return STYLEGAN2.build(2, channels, image_size, num_classes, **(TINY | changes))


class LinearCritic(nn.Module):
    """``D(x) = sum(w * x)``: its input gradient is ``w`` for every sample."""

    def __init__(self, shape):
        super().__init__()
        self.w = nn.Parameter(torch.randn(1, *shape))

    def forward(self, x, labels=None):
        return (self.w * x).flatten(1).sum(1)


@pytest.mark.parametrize("num_classes", [None, 3])
@pytest.mark.parametrize("image_size", [(16, 16), (16, 8), (8, 32)])
def test_shapes_conditional_and_unconditional(num_classes, image_size):
    generator, discriminator = tiny(num_classes, image_size, channels=3)
    z = torch.randn(4, generator.config.z_dim)
    labels = torch.tensor([0, 1, 2, 0]) if num_classes else None
    images = generator(z, labels)
    assert images.shape == (4, 3, *image_size)
    assert discriminator(images, labels).shape == (4,)
    generator.eval()
    images = generator(z, labels)
    assert images.min() >= -1 and images.max() <= 1
    assert generator.const.shape[1:] == resolution_levels(image_size)[0]
    assert min(generator.const.shape[1:]) == 4


def test_widths_follow_channel_base_and_max():
    generator, discriminator = tiny(None, (32, 32), channel_base=128, channel_max=16)
    assert [b.conv1.bias.numel() for b in generator.blocks] == [16, 16, 8, 4]  # 4, 8, 16, 32 px
    assert discriminator.from_rgb.weight.shape[0] == 4


@pytest.mark.parametrize("image_size", [(12, 12), (4, 4), (16, 24), (16, 16, 16), (16,)])
def test_sizes_that_are_not_powers_of_two_are_refused(image_size):
    with pytest.raises(ValueError, match=r"image_size must be \(H, W\) with each side a power of two >= 8"):
        StyleGAN2Generator(image_size=image_size)
    with pytest.raises(ValueError, match="power of two"):
        StyleGAN2Discriminator(image_size=image_size)


def test_build_refuses_volumes_and_unknown_options():
    with pytest.raises(ValueError, match=r"spatial_dims=3.*wgan-gp"):
        STYLEGAN2.build(3, 1, (16, 16, 16), None)
    with pytest.raises(ValueError, match=r"no model option\(s\) \['depth'\]"):
        STYLEGAN2.build(2, 1, (16, 16), None, depth=3)
    with pytest.raises(ValueError, match="z_dim must be an integer >= 1"):
        STYLEGAN2.build(2, 1, (16, 16), None, z_dim=0)
    with pytest.raises(ValueError, match="num_classes must be >= 1 or None"):
        STYLEGAN2.build(2, 1, (16, 16), 0)
    with pytest.raises(ValueError, match="r1_interval must be an integer >= 1"):
        StyleGAN2Architecture(r1_interval=0)


def test_build_turns_augmentation_on_for_small_datasets():
    assert STYLEGAN2.name == "stylegan2" and STYLEGAN2.spatial_dims == (2,)
    _, small = tiny(num_train_images=500)
    _, large = tiny(num_train_images=50_000)
    _, chosen = tiny(augment="cutout", num_train_images=50_000)
    _, off = tiny(augment=None, num_train_images=10)
    assert small.config.augment_policy == "color,translation,cutout"
    assert large.config.augment_policy == ""
    assert chosen.config.augment_policy == "cutout"
    assert off.config.augment_policy == ""


def test_labels_are_checked():
    generator, discriminator = tiny(3)
    z = torch.randn(2, 8)
    with pytest.raises(ValueError, match="labels are required: this model is conditional on 3 classes"):
        generator(z)
    with pytest.raises(ValueError, match=r"integer class indices of shape \(2,\)"):
        discriminator(torch.zeros(2, 1, 16, 16), torch.zeros(2))
    unconditional, _ = tiny(None)
    with pytest.raises(ValueError, match="labels must be None"):
        unconditional(z, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"z must have shape \(N, 8\)"):
        generator(torch.randn(2, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"images must have shape \(N, 1, 16, 16\)"):
        discriminator(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))


def test_weight_demodulation_keeps_unit_variance():
    torch.manual_seed(0)
    conv = ModulatedConv(32, 16, 3, w_dim=8)
    x = torch.randn(4, 32, 40, 40)
    w = torch.randn(4, 8)
    inner = conv(x, w)[:, :, 1:-1, 1:-1]  # away from the zero padding
    assert inner.std(dim=(0, 2, 3)).sub(1).abs().max() < 0.1
    # the styles' scale is normalised away ...
    with torch.no_grad():
        conv.affine.bias.mul_(10.0)
    assert conv(x, w)[:, :, 1:-1, 1:-1].std(dim=(0, 2, 3)).sub(1).abs().max() < 0.1
    # ... which modulation alone does not do
    plain = ModulatedConv(32, 16, 3, w_dim=8, demodulate=False)
    plain.load_state_dict(conv.state_dict())
    assert plain(x, w).std() > 3


def test_modulated_convolution_is_a_per_sample_convolution():
    torch.manual_seed(0)
    conv = ModulatedConv(4, 2, 3, w_dim=8, demodulate=False, upsample=True)
    x, w = torch.randn(2, 4, 5, 5), torch.randn(2, 8)
    out = conv(x, w)
    assert out.shape == (2, 2, 10, 10)
    up = nn.functional.interpolate(x[1:], scale_factor=2.0, mode="bilinear", align_corners=False)
    weight = conv.weight * conv.weight_gain * conv.affine(w[1:])[0][None, :, None, None]
    assert torch.allclose(out[1:], nn.functional.conv2d(up, weight, padding=1), atol=1e-5)


def test_r1_penalty_of_a_linear_critic_is_the_squared_weight_norm():
    critic = LinearCritic((1, 4, 4))
    real = torch.randn(5, 1, 4, 4)
    r1 = r1_penalty(critic, real, None)
    assert torch.allclose(r1, critic.w.square().sum())
    r1.backward()  # differentiable in the critic's parameters: d||w||^2/dw = 2w
    assert torch.allclose(critic.w.grad, 2 * critic.w.detach())


def test_r1_penalty_averages_over_the_batch():
    class Quadratic(nn.Module):
        def forward(self, x, labels=None):
            return 0.5 * x.square().flatten(1).sum(1)  # gradient: x

    real = torch.randn(3, 2, 4, 4)
    expected = real.square().flatten(1).sum(1).mean()
    assert torch.allclose(r1_penalty(Quadratic(), real, None), expected)


def test_logistic_losses_against_softplus_by_hand():
    real = torch.tensor([-2.0, 0.0, 3.0])
    fake = torch.tensor([1.0, -1.0])

    def softplus(v):
        return math.log1p(math.exp(v))

    d_expected = sum(softplus(-v) for v in real.tolist()) / 3 + sum(softplus(v) for v in fake.tolist()) / 2
    g_expected = sum(softplus(-v) for v in fake.tolist()) / 2
    assert discriminator_logistic_loss(real, fake).item() == pytest.approx(d_expected, rel=1e-6)
    assert generator_nonsaturating_loss(fake).item() == pytest.approx(g_expected, rel=1e-6)
    # non-saturating: the generator's gradient stays large where D is sure the image is fake
    scores = torch.tensor([-10.0], requires_grad=True)
    generator_nonsaturating_loss(scores).backward()
    assert scores.grad.item() == pytest.approx(-1.0, abs=1e-4)


def test_discriminator_loss_adds_lazy_r1():
    torch.manual_seed(0)
    critic = LinearCritic((1, 4, 4))
    real, fake = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4, requires_grad=True)
    arch = StyleGAN2Architecture(r1_gamma=0.5, r1_interval=4)
    logistic = discriminator_logistic_loss(critic(real), critic(fake)).item()
    loss, logs = arch.discriminator_loss(critic, real, fake, None, step=1)
    assert loss.item() == pytest.approx(logistic, rel=1e-6) and "r1" not in logs
    loss, logs = arch.discriminator_loss(critic, real, fake, None, step=8)
    r1 = critic.w.square().sum().item()
    assert logs["r1"].item() == pytest.approx(r1, rel=1e-5)
    assert loss.item() == pytest.approx(logistic + 0.5 * 0.5 * 4 * r1, rel=1e-5)
    loss.backward()
    assert fake.grad is None  # the generator gets nothing from the discriminator's loss


def test_default_r1_gamma_is_the_ada_heuristic():
    critic = LinearCritic((1, 16, 16))
    real = torch.randn(4, 1, 16, 16)
    base = discriminator_logistic_loss(critic(real), critic(real)).item()
    loss, logs = STYLEGAN2.discriminator_loss(critic, real, real, None, step=0)
    gamma = 0.0002 * 16 * 16 / 4
    assert loss.item() == pytest.approx(base + 0.5 * gamma * 16 * logs["r1"].item(), rel=1e-5)


def test_minibatch_stddev():
    x = torch.randn(1, 3, 4, 4).repeat(6, 1, 1, 1)
    out = minibatch_stddev(x, group_size=4)  # 6 samples: groups of 3
    assert out.shape == (6, 4, 4, 4)
    assert torch.allclose(out[:, 3], torch.full((6, 4, 4), 1e-4), atol=1e-6)  # identical samples
    y = torch.randn(4, 2, 2, 2)
    out = minibatch_stddev(y, group_size=2)
    # sample i is grouped with sample i + 2
    expected = ((y[0] - y[2]) / 2).square().add(1e-8).sqrt().mean()  # std of two values
    assert out[0, 2, 0, 0].item() == pytest.approx(expected.item(), rel=1e-4)
    assert out[2, 2, 0, 0].item() == pytest.approx(expected.item(), rel=1e-4)


def test_projection_conditioning_and_training_mode_augmentation():
    _, discriminator = tiny(3, num_train_images=10)
    images = torch.randn(2, 1, 16, 16)
    discriminator.eval()
    a = discriminator(images, torch.tensor([0, 0]))
    b = discriminator(images, torch.tensor([1, 1]))
    assert not torch.allclose(a, b)  # the class changes the score
    assert torch.equal(a, discriminator(images, torch.tensor([0, 0])))  # no augmentation in eval
    discriminator.train()
    assert not torch.allclose(discriminator(images, torch.tensor([0, 0])), a)


def test_noise_is_reproducible_given_a_generator():
    generator, _ = tiny(None)
    with torch.no_grad():
        for module in generator.modules():
            if hasattr(module, "noise_strength"):
                module.noise_strength.fill_(1.0)
    generator.eval()
    z = torch.randn(2, 8)

    def run(seed=None, **kwargs):
        return generator(z, generator=None if seed is None else torch.Generator().manual_seed(seed), **kwargs)

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))
    assert torch.equal(run(noise_mode="none"), run(noise_mode="none"))
    with pytest.raises(ValueError, match="noise_mode must be one of"):
        run(noise_mode="const")


@pytest.mark.parametrize("num_classes", [None, 2])
def test_a_few_training_steps(num_classes):
    generator, discriminator = tiny(num_classes, num_train_images=8)
    before_g = [p.detach().clone() for p in generator.parameters()]
    before_d = [p.detach().clone() for p in discriminator.parameters()]
    opt_g = torch.optim.Adam(generator.parameters(), lr=2e-3, betas=(0.0, 0.99))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=2e-3, betas=(0.0, 0.99))
    real = torch.rand(4, 1, 16, 16) * 2 - 1
    labels = torch.tensor([0, 1, 0, 1]) if num_classes else None
    for step in range(3):
        fake = generator(torch.randn(4, 8), labels)
        loss_d, logs_d = STYLEGAN2.discriminator_loss(discriminator, real, fake, labels, step)
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        fake = generator(torch.randn(4, 8), labels)
        loss_g, logs_g = STYLEGAN2.generator_loss(discriminator, fake, labels, step)
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        assert torch.isfinite(loss_d) and torch.isfinite(loss_g)
        assert all(torch.isfinite(v) for v in (logs_d | logs_g).values())
    assert all(torch.isfinite(p).all() for p in [*generator.parameters(), *discriminator.parameters()])
    changed_g = [not torch.equal(a, b) for a, b in zip(before_g, generator.parameters())]
    changed_d = [not torch.equal(a, b) for a, b in zip(before_d, discriminator.parameters())]
    assert all(changed_d)
    assert all(changed_g)
    assert generator.w_avg.abs().sum() > 0  # the running mean of w is tracked in training mode


def test_save_and_load_round_trip(tmp_path):
    generator, discriminator = tiny(3, num_train_images=10)
    generator(torch.randn(8, 8), torch.zeros(8, dtype=torch.long))  # moves w_avg
    assert generator.w_avg.abs().sum() > 0
    with torch.no_grad():
        for parameter in [*generator.parameters(), *discriminator.parameters()]:
            parameter.add_(0.1 * torch.randn_like(parameter))  # non-zero noise strengths and biases
    generator.save_pretrained(tmp_path / "generator")
    discriminator.save_pretrained(tmp_path / "discriminator")
    assert (tmp_path / "generator" / "diffusion_pytorch_model.safetensors").is_file()
    loaded_g = StyleGAN2Generator.from_pretrained(tmp_path / "generator")
    loaded_d = StyleGAN2Discriminator.from_pretrained(tmp_path / "discriminator")
    assert loaded_d.config.augment_policy == "color,translation,cutout"
    assert tuple(loaded_g.config.image_size) == (16, 16)
    assert torch.equal(loaded_g.w_avg, generator.w_avg)
    for model in (generator, discriminator, loaded_g, loaded_d):
        model.eval()
    z, labels = torch.randn(2, 8), torch.tensor([1, 2])
    seed = torch.Generator().manual_seed
    expected = generator(z, labels, truncation_psi=0.7, generator=seed(0))
    assert torch.equal(loaded_g(z, labels, truncation_psi=0.7, generator=seed(0)), expected)
    assert torch.equal(loaded_d(expected, labels), discriminator(expected, labels))


def test_registered_architecture_and_its_options():
    from medfusion.baselines.arch import GANArchitecture, architecture, with_options

    assert architecture("stylegan2") is STYLEGAN2 and isinstance(STYLEGAN2, GANArchitecture)
    assert STYLEGAN2.generator_class is StyleGAN2Generator
    changed = with_options(STYLEGAN2, {"r1_gamma": 2.0, "r1_interval": 1})
    assert (changed.r1_gamma, changed.r1_interval, STYLEGAN2.r1_interval) == (2.0, 1, 16)
    with pytest.raises(ValueError, match=r"gan\.r1_gamma must be >= 0"):
        with_options(STYLEGAN2, {"r1_gamma": -1.0})


class LinearGenerator(nn.Module):
    """``w = s z`` (s = 1, a parameter), ``images = A w`` (reshaped): the path length of a sample is
    ``||A^T y||``."""

    def __init__(self, z_dim: int = 3, shape=(1, 4, 4)):
        super().__init__()
        self.shape = shape
        self.a = nn.Parameter(torch.randn(math.prod(shape), z_dim))
        self.s = nn.Parameter(torch.ones(()))

    def forward(self, z, labels=None, return_w=False):
        w = z * self.s
        images = (w @ self.a.T).reshape(len(z), *self.shape)
        return (images, w) if return_w else images


def test_path_length_penalty_against_a_hand_calculation():
    torch.manual_seed(0)
    generator, z = LinearGenerator(), torch.randn(6, 3)
    arch = StyleGAN2Architecture(pl_weight=2.0, pl_interval=4, pl_decay=0.1, pl_batch_shrink=2)
    state: dict = {}
    torch.manual_seed(1)
    loss, logs = arch.generator_regularization(generator, z, None, 0, state)
    torch.manual_seed(1)
    y = torch.randn(3, 1, 4, 4) / 4.0  # the first 6 / 2 samples; noise over 4 x 4 pixels, / sqrt(16)
    lengths = (y.flatten(1) @ generator.a.detach()).norm(dim=1)  # ||A^T y|| per sample
    mean = 0.1 * lengths.mean()  # the running mean starts at 0
    penalty = (lengths - mean).square().mean()
    torch.testing.assert_close(loss, 2.0 * 4 * penalty)
    torch.testing.assert_close(state["pl_mean"], mean)
    torch.testing.assert_close(logs["pl_penalty"], penalty)
    assert loss.requires_grad  # it trains the generator
    loss.backward()
    assert generator.a.grad is not None and generator.a.grad.abs().sum() > 0
    # lazy: nothing on the steps between, then the running mean moves on from where it was
    assert arch.generator_regularization(generator, z, None, 1, state) is None
    torch.manual_seed(2)
    arch.generator_regularization(generator, z, None, 4, state)
    torch.manual_seed(2)
    y = torch.randn(3, 1, 4, 4) / 4.0
    later = (y.flatten(1) @ generator.a.detach()).norm(dim=1).mean()
    torch.testing.assert_close(state["pl_mean"], mean + 0.1 * (later - mean))
    # off by default
    assert STYLEGAN2.generator_regularization(generator, z, None, 0, {}) is None


def test_path_length_of_the_stylegan2_generator_is_its_gradient_norm_in_w():
    generator, _ = tiny()
    generator.train()
    z, labels = torch.randn(4, 8), torch.tensor([0, 1, 2, 0])
    arch = StyleGAN2Architecture(pl_weight=1.0, pl_interval=1, pl_batch_shrink=1)
    state: dict = {}
    torch.manual_seed(3)
    loss, logs = arch.generator_regularization(generator, z, labels, 0, state)
    assert torch.isfinite(loss) and logs["pl_mean"] > 0
    images, w = generator(z, labels, return_w=True)
    assert w.shape == (4, 8) and images.shape == (4, 1, 16, 16)
    with pytest.raises(ValueError, match=r"gan.pl_weight must be >= 0"):
        StyleGAN2Architecture(pl_weight=-1.0)
    with pytest.raises(ValueError, match=r"gan.pl_interval must be an integer >= 1"):
        StyleGAN2Architecture(pl_interval=0)
