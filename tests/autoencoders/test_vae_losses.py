"""The VAE objective: config checks, the weighted sum of its terms computed by hand, the switch-on of
the adversarial term, which network each loss sends gradients to, and the perceptual term."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medfusion.autoencoders import perceptual
from medfusion.autoencoders.discriminator import PatchDiscriminator, adaptive_weight, hinge_d_loss
from medfusion.autoencoders.losses import VAELoss, VAELossConfig, frozen
from medfusion.autoencoders.vae import VAE, DiagonalGaussian, VAEOutput
from tests.tiny import tiny_vae


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_discriminator(spatial_dims: int, in_channels: int = 1) -> PatchDiscriminator:
    return PatchDiscriminator(spatial_dims, in_channels, channels=4, num_layers=1, norm_num_groups=2)


def batch(spatial_dims: int, in_channels: int = 1, size: int = 8) -> torch.Tensor:
    return torch.rand(2, in_channels, *[size] * spatial_dims) * 2 - 1


def run_vae(vae: VAE, x: torch.Tensor) -> VAEOutput:
    return vae(x, generator=torch.Generator().manual_seed(0))


def kl_by_hand(output: VAEOutput) -> torch.Tensor:
    mean, logvar = output.posterior.mean, output.posterior.logvar
    return (0.5 * (mean**2 + logvar.exp() - 1 - logvar)).flatten(1).sum(1).mean()


# config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pixel_loss": "huber"}, r"loss.pixel_loss must be one of \('l1', 'mse'\); got 'huber'"),
        ({"pixel_weight": -1.0}, "loss.pixel_weight must be >= 0; got -1.0"),
        ({"kl_weight": -1e-6}, "loss.kl_weight must be >= 0"),
        ({"perceptual_weight": -0.5}, "loss.perceptual_weight must be >= 0"),
        ({"adversarial_weight": -0.1}, "loss.adversarial_weight must be >= 0"),
        ({"adversarial_start": -1}, "loss.adversarial_start must be >= 0; got -1"),
        ({"perceptual_slices": 0}, "loss.perceptual_slices must be >= 1; got 0"),
        ({"discriminator_layers": 0}, "loss.discriminator_layers must be >= 1; got 0"),
        ({"discriminator_norm_groups": 0}, "loss.discriminator_norm_groups must be >= 1; got 0"),
        ({"discriminator_learning_rate": -1.0}, "loss.discriminator_learning_rate must be > 0 or null"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VAELossConfig(**kwargs)
    with pytest.raises(ValueError, match=message):  # also when read from a file
        VAELossConfig.from_dict(kwargs)


def test_config_defaults_and_unknown_key():
    config = VAELossConfig()
    assert config.pixel_loss == "l1" and not config.uses_discriminator
    assert VAELossConfig(adversarial_weight=0.1).uses_discriminator
    assert VAELossConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['gan_weight'\] for VAELossConfig"):
        VAELossConfig.from_dict({"gan_weight": 0.5})


# the weighted sum


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("pixel_loss", ["l1", "mse"])
def test_generator_loss_is_the_weighted_sum(spatial_dims, pixel_loss):
    config = VAELossConfig(pixel_loss=pixel_loss, pixel_weight=2.0, kl_weight=0.01)
    criterion = VAELoss(config, spatial_dims, 2)
    vae = tiny_vae(spatial_dims, 2)
    x = batch(spatial_dims, 2)
    output = run_vae(vae, x)
    loss, terms = criterion.generator_loss(x, output, step=0)
    assert set(terms) == {"pixel", "kl"}
    assert all(not t.requires_grad for t in terms.values())
    diff = output.reconstruction - x
    pixel = diff.abs().mean() if pixel_loss == "l1" else diff.square().mean()
    kl = kl_by_hand(output)
    torch.testing.assert_close(terms["pixel"], pixel.detach())
    torch.testing.assert_close(terms["kl"], kl.detach())
    torch.testing.assert_close(loss, 2.0 * pixel + 0.01 * kl)
    loss.backward()
    assert all(p.grad is not None for p in vae.parameters())


@pytest.mark.parametrize(("pixel_loss", "pixel"), [("mse", 1.0), ("l1", 0.75)])
def test_generator_loss_on_known_values(pixel_loss, pixel):
    criterion = VAELoss(VAELossConfig(pixel_loss=pixel_loss, pixel_weight=3.0, kl_weight=0.5), 2, 1)
    x = torch.zeros(2, 1, 2, 2)
    reconstruction = torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0, 0.0, 0.0, 0.0]).view(2, 1, 2, 2)
    # KL of N(1, 1) to N(0, 1) is 1/2 per element: 1 per sample of two latent elements
    posterior = DiagonalGaussian(torch.ones(2, 2, 1, 1), torch.zeros(2, 2, 1, 1))
    loss, terms = criterion.generator_loss(x, VAEOutput(reconstruction, posterior), step=0)
    torch.testing.assert_close(terms["pixel"], torch.tensor(pixel))
    torch.testing.assert_close(terms["kl"], torch.tensor(1.0))
    torch.testing.assert_close(loss, torch.tensor(3.0 * pixel + 0.5 * 1.0))


# the adversarial term


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_adversarial_term_switches_on_at_adversarial_start(spatial_dims):
    config = VAELossConfig(pixel_weight=1.0, kl_weight=1e-3, adversarial_weight=0.5, adversarial_start=5)
    criterion = VAELoss(config, spatial_dims, 1)
    vae, disc = tiny_vae(spatial_dims), tiny_discriminator(spatial_dims)
    x = batch(spatial_dims)
    output = run_vae(vae, x)
    pixel, kl = (output.reconstruction - x).abs().mean(), kl_by_hand(output)

    assert not criterion.adversarial_active(4) and criterion.adversarial_active(5)
    before, terms = criterion.generator_loss(x, output, step=4, discriminator=disc)
    assert set(terms) == {"pixel", "kl"}
    torch.testing.assert_close(before, pixel + 1e-3 * kl)

    loss, terms = criterion.generator_loss(
        x, output, 5, discriminator=disc, last_layer=vae.last_layer_weight()
    )
    assert set(terms) == {"pixel", "kl", "generator", "adaptive_weight"}
    g = -disc(output.reconstruction).mean()
    weight = adaptive_weight(pixel, g, vae.last_layer_weight())
    torch.testing.assert_close(terms["generator"], g.detach())
    torch.testing.assert_close(terms["adaptive_weight"], weight)
    assert terms["adaptive_weight"] > 0
    torch.testing.assert_close(loss, pixel + 1e-3 * kl + 0.5 * weight * g)
    later, _ = criterion.generator_loss(
        x, output, 1000, discriminator=disc, last_layer=vae.last_layer_weight()
    )
    torch.testing.assert_close(later, loss)


def test_adversarial_term_without_adaptive_weight():
    config = VAELossConfig(kl_weight=0.0, adversarial_weight=0.5, adversarial_start=0, adaptive_weight=False)
    criterion = VAELoss(config, 2, 1)
    vae, disc = tiny_vae(2), tiny_discriminator(2)
    x = batch(2)
    output = run_vae(vae, x)
    loss, terms = criterion.generator_loss(x, output, step=0, discriminator=disc)  # no last_layer needed
    assert terms["adaptive_weight"] == 1.0
    g = -disc(output.reconstruction).mean()
    torch.testing.assert_close(loss, (output.reconstruction - x).abs().mean() + 0.5 * g)


def test_adversarial_term_needs_its_inputs():
    criterion = VAELoss(VAELossConfig(adversarial_weight=0.5, adversarial_start=0), 2, 1)
    vae = tiny_vae(2)
    x = batch(2)
    output = run_vae(vae, x)
    with pytest.raises(ValueError, match="the adversarial term is active but no discriminator was given"):
        criterion.generator_loss(x, output, step=0)
    with pytest.raises(ValueError, match="adaptive_weight needs the decoder's last layer"):
        criterion.generator_loss(x, output, step=0, discriminator=tiny_discriminator(2))


def test_no_adversarial_term_when_its_weight_is_zero():
    criterion = VAELoss(VAELossConfig(adversarial_weight=0.0, adversarial_start=0), 2, 1)
    assert criterion.make_discriminator() is None
    assert not criterion.adversarial_active(10**6)
    x = batch(2)
    _, terms = criterion.generator_loss(x, run_vae(tiny_vae(2), x), step=10**6)  # no discriminator needed
    assert set(terms) == {"pixel", "kl"}


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_make_discriminator(spatial_dims):
    config = VAELossConfig(adversarial_weight=0.5, discriminator_channels=32, discriminator_layers=1)
    disc = VAELoss(config, spatial_dims, 3).make_discriminator()
    assert isinstance(disc, PatchDiscriminator)
    assert (disc.spatial_dims, disc.in_channels, disc.num_layers) == (spatial_dims, 3, 1)
    assert disc.layers[0].out_channels == 32
    assert disc(torch.zeros(1, 3, *[8] * spatial_dims)).shape == (1, 1, *[2] * spatial_dims)
    assert VAELoss(config, spatial_dims, 3).make_discriminator() is not disc  # a new one each time


# which network each loss trains


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_generator_loss_gives_no_gradient_to_the_discriminator(spatial_dims):
    config = VAELossConfig(adversarial_weight=1.0, adversarial_start=0)
    criterion = VAELoss(config, spatial_dims, 1)
    vae, disc = tiny_vae(spatial_dims), tiny_discriminator(spatial_dims)
    disc.layers[0].bias.requires_grad_(False)  # a frozen flag that must survive
    x = batch(spatial_dims)
    loss, _ = criterion.generator_loss(
        x, run_vae(vae, x), 0, discriminator=disc, last_layer=vae.last_layer_weight()
    )
    loss.backward()
    assert all(p.grad is None for p in disc.parameters())
    assert [p.requires_grad for p in disc.parameters()] == [
        p is not disc.layers[0].bias for p in disc.parameters()
    ]
    assert all(p.grad is not None for p in vae.parameters())

    # the discriminator's judgement does reach the VAE: its gradients differ from the loss without it
    grads = [p.grad.clone() for p in vae.parameters()]
    vae.zero_grad(set_to_none=True)
    plain = VAELoss(VAELossConfig(), spatial_dims, 1)
    plain.generator_loss(x, run_vae(vae, x), step=0)[0].backward()
    assert not all(torch.allclose(a, p.grad) for a, p in zip(grads, vae.parameters()))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_discriminator_loss_trains_the_discriminator_only(spatial_dims):
    criterion = VAELoss(VAELossConfig(adversarial_weight=1.0), spatial_dims, 1)
    vae, disc = tiny_vae(spatial_dims), tiny_discriminator(spatial_dims)
    x = batch(spatial_dims).requires_grad_(True)
    output = run_vae(vae, x)
    assert output.reconstruction.requires_grad
    loss, terms = criterion.discriminator_loss(disc, x, output.reconstruction)
    logits_real, logits_fake = disc(x), disc(output.reconstruction)
    torch.testing.assert_close(loss, hinge_d_loss(logits_real, logits_fake))
    torch.testing.assert_close(terms["logits_real"], logits_real.detach().mean())
    torch.testing.assert_close(terms["logits_fake"], logits_fake.detach().mean())
    loss.backward()
    assert all(p.grad is not None for p in disc.parameters())
    assert sum(p.grad.abs().sum() for p in disc.parameters()) > 0
    assert all(p.grad is None for p in vae.parameters())
    assert x.grad is None


def test_frozen_restores_flags_even_on_error():
    module = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    module[1].bias.requires_grad_(False)
    flags = [p.requires_grad for p in module.parameters()]
    with pytest.raises(RuntimeError, match="boom"), frozen(module):
        assert not any(p.requires_grad for p in module.parameters())
        raise RuntimeError("boom")
    assert [p.requires_grad for p in module.parameters()] == flags


# the perceptual term


def test_perceptual_weight_needs_the_weight_files(monkeypatch, tmp_path):
    monkeypatch.setenv(perceptual.VGG16_ENV, str(tmp_path / "missing" / "vgg16.pth"))
    monkeypatch.setenv(perceptual.LPIPS_ENV, str(tmp_path / "missing" / "vgg.pth"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(FileNotFoundError, match="MEDFUSION_VGG16_WEIGHTS"):
        VAELoss(VAELossConfig(perceptual_weight=0.1), 2, 1)
    monkeypatch.delenv(perceptual.VGG16_ENV)  # the torchvision cache under TORCH_HOME is empty too
    with pytest.raises(FileNotFoundError, match="VGG16 backbone weights"):
        VAELoss(VAELossConfig(perceptual_weight=0.1), 2, 1)
    with pytest.raises(FileNotFoundError, match="backbone="):
        VAELoss(VAELossConfig(perceptual_weight=0.1, perceptual_backbone=str(tmp_path / "nope.pth")), 2, 1)
    assert VAELoss(VAELossConfig(perceptual_weight=0.0), 2, 1).lpips is None  # nothing is looked up


class SquaredDistance(nn.Module):
    """Stands in for LPIPS: mean squared difference per image; records the shapes it was given."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        return (x - y).square().flatten(1).mean(1)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_perceptual_term_is_weighted_and_sliced(spatial_dims, monkeypatch):
    stub = SquaredDistance()
    monkeypatch.setattr(perceptual.LPIPS, "from_pretrained", classmethod(lambda cls, backbone, linear: stub))
    config = VAELossConfig(pixel_weight=1.0, kl_weight=1e-3, perceptual_weight=0.3, perceptual_slices=3)
    criterion = VAELoss(config, spatial_dims, 1)
    assert criterion.lpips is stub
    x = torch.rand(2, 1, *(8, 16, 16)[-spatial_dims:]) * 2 - 1  # 3D: only the first axis has 16x16 slices
    output = run_vae(tiny_vae(spatial_dims), x)
    loss, terms = criterion.generator_loss(x, output, step=0)
    assert set(terms) == {"pixel", "kl", "perceptual"}
    assert stub.shapes == ([(2, 1, 16, 16)] if spatial_dims == 2 else [(2 * 3, 1, 16, 16)])
    if spatial_dims == 2:
        perceptual_term = (output.reconstruction - x).square().flatten(1).mean(1).mean()
        torch.testing.assert_close(terms["perceptual"], perceptual_term.detach())
    pixel = (output.reconstruction - x).abs().mean()
    torch.testing.assert_close(loss, pixel + 0.3 * terms["perceptual"] + 1e-3 * kl_by_hand(output))


def test_discriminator_norm_groups_come_from_the_config():
    config = VAELossConfig(adversarial_weight=0.5, discriminator_channels=12, discriminator_norm_groups=4)
    discriminator = VAELoss(config, 2, 1).make_discriminator()
    norms = [m for m in discriminator.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 4 for m in norms)
