"""The KL autoencoder: shapes in 2D and 3D, argument and input checks, the Gaussian posterior,
saving and loading, latent scaling, gradient checkpointing and its typed config."""

from __future__ import annotations

import json
import math

import pytest
import torch

from medfusion.autoencoders.vae import (
    LOGVAR_RANGE,
    VAE,
    DiagonalGaussian,
    VAEConfig,
    VAEOutput,
    reconstruction_loss,
)
from medfusion.nn import AttentionBlock
from tests.tiny import TINY_VAE, VAE_WIDTHS, tiny_vae

TINY = TINY_VAE | {"block_out_channels": VAE_WIDTHS[:3]}  # three levels: downsampling by 4


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def images(spatial_dims: int, channels: int = 1, n: int = 2, size: int = 8) -> torch.Tensor:
    sizes = (size, size + 8, size)[:spatial_dims]  # not all sides equal: axes must not be mixed up
    return torch.rand(n, channels, *sizes) * 2 - 1


def randomize_attention(vae: VAE) -> None:
    """Give the zero-initialised attention projections random weights (else nothing reaches qkv)."""
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, AttentionBlock):
                m.proj.weight.normal_(0.0, 0.1)


# shapes and gradients


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("in_channels", [1, 3, 2])
@pytest.mark.parametrize("widths", [(4,), (4, 8), (4, 8, 8)])
def test_forward_backward_shapes(spatial_dims, in_channels, widths):
    vae = tiny_vae(spatial_dims, in_channels, block_out_channels=widths, levels=3)
    factor = 2 ** (len(widths) - 1)
    assert vae.downsampling_factor == factor
    x = images(spatial_dims, in_channels)
    latent_spatial = tuple(s // factor for s in x.shape[2:])
    assert vae.latent_shape(tuple(x.shape[2:])) == (2, *latent_spatial)
    out = vae(x)
    assert isinstance(out, VAEOutput)
    assert out.reconstruction.shape == x.shape
    assert out.posterior.mean.shape == out.posterior.logvar.shape == (2, 2, *latent_spatial)
    loss = (out.reconstruction - x).abs().mean() + out.posterior.kl().mean()
    loss.backward()
    assert all(p.grad is not None for p in vae.parameters())


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_out_channels_and_last_layer(spatial_dims):
    vae = tiny_vae(spatial_dims, 1, out_channels=3, levels=3)
    assert vae(images(spatial_dims, 1)).reconstruction.shape[1] == 3
    assert vae.last_layer_weight() is vae.decoder.blocks[-1].weight
    assert vae.last_layer_weight().shape == (3, 4, *[3] * spatial_dims)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_gradients_reach_every_parameter_with_mid_attention(spatial_dims):
    vae = tiny_vae(spatial_dims, 2, mid_attention=True, num_head_channels=4, levels=3)
    blocks = [m for m in vae.modules() if isinstance(m, AttentionBlock)]
    assert len(blocks) == 2 and all(b.num_heads == 2 for b in blocks)  # encoder and decoder
    randomize_attention(vae)
    x = images(spatial_dims, 2)
    out = vae(x, generator=torch.Generator().manual_seed(0))
    assert out.reconstruction.shape == x.shape
    ((out.reconstruction - x).square().mean() + out.posterior.kl().mean()).backward()
    no_grad = [name for name, p in vae.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad


# argument and input checks


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"block_out_channels": ()}, r"block_out_channels must hold 1 to 5 positive widths .*got \(\)"),
        ({"block_out_channels": (4,) * 6}, r"block_out_channels must hold 1 to 5 positive widths"),
        ({"block_out_channels": (4, 0)}, r"block_out_channels must hold 1 to 5 positive widths"),
        ({"latent_channels": 0}, "latent_channels must be >= 1; got 0"),
        ({"in_channels": 0}, "in_channels must be >= 1; got 0"),
        ({"layers_per_block": 0}, "layers_per_block must be >= 1; got 0"),
        ({"scaling_factor": 0.0}, "scaling_factor must be a positive number; got 0.0"),
        ({"scaling_factor": -1.0}, "scaling_factor must be a positive number"),
        ({"scaling_factor": math.inf}, "scaling_factor must be a positive number"),
        ({"scaling_factor": math.nan}, "scaling_factor must be a positive number"),
        ({"norm_num_groups": 3}, "norm_num_groups=3 must divide the channel count 4"),
        ({"spatial_dims": 1}, "spatial_dims must be 2 or 3; got 1"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        (
            {"mid_attention": True, "num_head_channels": 3},
            r"num_head_channels \(3\) must be a positive divisor of the lowest level's width 8",
        ),
        (
            {"mid_attention": False, "num_head_channels": 3},
            r"num_head_channels \(3\) must be a positive divisor",
        ),
        (
            {"out_channels": 0},
            r"out_channels must be >= 1",
        ),
    ],
)
def test_bad_arguments(kwargs, message):
    args = {"spatial_dims": 2, "in_channels": 1} | TINY | kwargs
    with pytest.raises(ValueError, match=message):
        VAE(**args)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_wrong_inputs(spatial_dims):
    vae = tiny_vae(spatial_dims, 2, levels=3)  # factor 4
    other_dims = 5 - spatial_dims
    with pytest.raises(ValueError, match=rf"takes \(N, 2, \*spatial\) with {spatial_dims} spatial axes"):
        vae(images(other_dims, 2))
    with pytest.raises(ValueError, match=rf"takes \(N, 2, \*spatial\) with {spatial_dims} spatial axes"):
        vae(images(spatial_dims, 3))
    bad_size = torch.zeros(1, 2, *[8] * (spatial_dims - 1), 10)
    with pytest.raises(ValueError, match="whose sides are multiples of 4; got spatial shape"):
        vae.encode(bad_size)
    with pytest.raises(ValueError, match="whose sides are multiples of 4"):
        vae.latent_shape((8,) * (spatial_dims - 1) + (6,))
    with pytest.raises(ValueError, match=f"takes {spatial_dims}D inputs"):
        vae.latent_shape((8,) * other_dims)
    with pytest.raises(ValueError, match=r"decodes latents \(N, 2, \*spatial\)"):
        vae.decode(torch.zeros(1, 3, *[2] * spatial_dims))
    with pytest.raises(ValueError, match=r"decodes latents \(N, 2, \*spatial\)"):
        vae.decode(torch.zeros(1, 2, *[2] * other_dims))


# the posterior


def test_kl_of_standard_normal_is_zero():
    posterior = DiagonalGaussian(torch.zeros(3, 2, 4, 4), torch.zeros(3, 2, 4, 4))
    torch.testing.assert_close(posterior.kl(), torch.zeros(3), rtol=0, atol=0)


def test_kl_matches_closed_form():
    mean = torch.tensor([1.0, -2.0, 0.0, 0.5]).view(2, 1, 2)
    logvar = torch.tensor([math.log(2.0), 0.0, math.log(0.5), -1.0]).view(2, 1, 2)
    posterior = DiagonalGaussian(mean, logvar)
    # KL(N(m, s^2) || N(0, 1)) = (m^2 + s^2 - 1 - log s^2) / 2, summed over a sample's elements
    by_hand = torch.tensor(
        [
            0.5 * (1 + 2 - 1 - math.log(2.0)) + 0.5 * (4 + 1 - 1 - 0),
            0.5 * (0 + 0.5 - 1 - math.log(0.5)) + 0.5 * (0.25 + math.exp(-1) - 1 + 1),
        ]
    )
    torch.testing.assert_close(posterior.kl(), by_hand)
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, posterior.std), torch.distributions.Normal(0.0, 1.0)
    )
    torch.testing.assert_close(posterior.kl(), reference.flatten(1).sum(1))
    assert posterior.mode() is mean
    torch.testing.assert_close(posterior.std, torch.exp(0.5 * logvar))


def test_sample_is_reparameterised():
    mean = torch.randn(2, 3, 4, 4, requires_grad=True)
    logvar = torch.randn(2, 3, 4, 4, requires_grad=True)
    posterior = DiagonalGaussian(mean, logvar)
    z = posterior.sample(torch.Generator().manual_seed(7))
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(z, mean + torch.exp(0.5 * logvar) * eps)
    z.sum().backward()
    torch.testing.assert_close(mean.grad, torch.ones_like(mean))
    torch.testing.assert_close(logvar.grad, 0.5 * torch.exp(0.5 * logvar.detach()) * eps)


def test_sample_is_the_mean_when_std_vanishes():
    mean = torch.randn(2, 3, 4, 4, 4)
    posterior = DiagonalGaussian(mean, torch.full_like(mean, LOGVAR_RANGE[0]))
    torch.testing.assert_close(posterior.sample(), mean, rtol=0, atol=1e-5)


def test_sample_is_deterministic_with_a_generator():
    posterior = DiagonalGaussian(torch.zeros(2, 2, 4, 4), torch.zeros(2, 2, 4, 4))
    a = posterior.sample(torch.Generator().manual_seed(1))
    b = posterior.sample(torch.Generator().manual_seed(1))
    c = posterior.sample(torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    vae = tiny_vae(2, levels=3).eval()
    x = images(2)
    first = vae(x, generator=torch.Generator().manual_seed(3)).reconstruction
    second = vae(x, generator=torch.Generator().manual_seed(3)).reconstruction
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_logvar_is_clamped():
    vae = tiny_vae(2, levels=3)
    with torch.no_grad():
        vae.quant_conv.bias[2:].fill_(1e3)  # the logvar half
    logvar = vae.encode(images(2)).logvar
    assert logvar.max() == LOGVAR_RANGE[1]


# saving, loading, scaling


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_save_and_load_round_trip(spatial_dims, tmp_path):
    vae = tiny_vae(spatial_dims, 2, mid_attention=True, levels=3).eval()
    randomize_attention(vae)
    vae.set_scaling_factor(0.25)
    assert vae.scaling_factor == 0.25
    vae.save_pretrained(tmp_path / "vae")
    files = sorted(p.name for p in (tmp_path / "vae").iterdir())
    assert "config.json" in files
    assert any(name.endswith(".safetensors") for name in files)
    assert not [n for n in files if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"))]
    saved = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert saved["scaling_factor"] == 0.25
    assert saved["spatial_dims"] == spatial_dims and saved["block_out_channels"] == [4, 8, 8]

    loaded = VAE.from_pretrained(tmp_path / "vae")
    assert loaded.scaling_factor == 0.25
    assert loaded.config.spatial_dims == spatial_dims and loaded.config.mid_attention
    x = images(spatial_dims, 2)
    with torch.no_grad():
        expected = vae(x, sample_posterior=False)
        got = loaded(x, sample_posterior=False)
    torch.testing.assert_close(got.reconstruction, expected.reconstruction, rtol=0, atol=0)
    torch.testing.assert_close(got.posterior.mean, expected.posterior.mean, rtol=0, atol=0)


@pytest.mark.parametrize("value", [0.0, -2.0, math.inf, math.nan])
def test_set_scaling_factor_rejects_bad_values(value):
    vae = tiny_vae(2, levels=3)
    with pytest.raises(ValueError, match="scaling_factor must be a positive number"):
        vae.set_scaling_factor(value)
    assert vae.scaling_factor == 1.0


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_encode_and_decode_latents_apply_the_scaling_factor(spatial_dims):
    vae = tiny_vae(spatial_dims, scaling_factor=0.5, levels=3)
    vae.set_scaling_factor(2.5)
    x = images(spatial_dims)
    with torch.no_grad():
        posterior = vae.encode(x)
        latents = vae.encode_latents(x, sample=False)
        torch.testing.assert_close(latents, posterior.mean * 2.5)
        sampled = vae.encode_latents(x, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(sampled, posterior.sample(torch.Generator().manual_seed(0)) * 2.5)
        torch.testing.assert_close(vae.decode_latents(latents), vae.decode(posterior.mean))
        torch.testing.assert_close(vae.decode_latents(sampled), vae.decode(sampled / 2.5))


# gradient checkpointing


def loss_and_grads(vae: VAE, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    vae.zero_grad(set_to_none=True)
    out = vae(x, generator=torch.Generator().manual_seed(0))
    loss = (out.reconstruction - x).abs().mean() + 1e-3 * out.posterior.kl().mean()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in vae.named_parameters()}


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_gradient_checkpointing_gives_the_same_gradients(spatial_dims, monkeypatch):
    vae = tiny_vae(spatial_dims, 2, mid_attention=True, levels=3)
    randomize_attention(vae)
    x = images(spatial_dims, 2)
    loss, grads = loss_and_grads(vae, x)

    calls = []
    real_checkpoint = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    vae.enable_gradient_checkpointing()
    assert vae.encoder.gradient_checkpointing and vae.decoder.gradient_checkpointing
    loss_ckpt, grads_ckpt = loss_and_grads(vae, x)
    n_blocks = len(vae.encoder.blocks) + len(vae.decoder.blocks)
    assert len(calls) == n_blocks  # every block ran under checkpointing, once
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads_ckpt.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], msg=name)
    with torch.no_grad():  # no checkpointing (nor its cost) when no gradient is taken
        vae(x)
    assert len(calls) == n_blocks


# the typed config


def test_config_resolve_and_build():
    config = VAEConfig(**TINY)
    assert config.spatial_dims is None and config.in_channels is None
    resolved = config.resolve(3, 2)
    assert (resolved.spatial_dims, resolved.in_channels) == (3, 2)
    assert resolved.block_out_channels == (4, 8, 8)
    assert VAEConfig(spatial_dims=3, in_channels=2, **TINY).resolve(3, 2) == resolved
    vae = config.build(3, 2)
    assert isinstance(vae, VAE)
    assert vae.config.spatial_dims == 3 and vae.config.in_channels == 2
    assert tuple(vae.config.block_out_channels) == (4, 8, 8) and vae.config.latent_channels == 2
    assert vae(images(3, 2)).reconstruction.shape == (2, 2, 8, 16, 8)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"spatial_dims": 2}, "model.spatial_dims is 2 but the data give 3"),
        ({"in_channels": 1}, "model.in_channels is 1 but the data give 2"),
    ],
)
def test_config_mismatch_names_the_key(fields, message):
    config = VAEConfig(**(TINY | fields))
    with pytest.raises(ValueError, match=message):
        config.resolve(3, 2)
    with pytest.raises(ValueError, match=message):
        config.build(3, 2)


def test_config_from_dict():
    config = VAEConfig.from_dict({"block_out_channels": [4, 8], "latent_channels": 2, "norm_num_groups": 4})
    assert config.block_out_channels == (4, 8)  # lists from YAML/JSON become tuples
    assert VAEConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['latent_dim'\] for VAEConfig"):
        VAEConfig.from_dict({"latent_dim": 4}, source="model.yaml")
    with pytest.raises(ValueError, match=r"model\.yaml: latent_channels: expected an integer"):
        VAEConfig.from_dict({"latent_channels": "4"}, source="model.yaml")


# pixel loss


def test_reconstruction_loss():
    x = torch.zeros(2, 1, 2, 2)
    y = torch.tensor([1.0, -1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0]).view(2, 1, 2, 2)
    torch.testing.assert_close(reconstruction_loss(x, y, "l1"), torch.tensor([1.0, 0.75]))
    torch.testing.assert_close(reconstruction_loss(x, y, "mse"), torch.tensor([1.5, 2.25]))
    with pytest.raises(ValueError, match="pixel loss must be 'l1' or 'mse'; got 'huber'"):
        reconstruction_loss(x, y, "huber")


def test_a_vae_saved_with_the_earlier_name_of_num_head_channels_loads(tmp_path):
    """config.json of earlier versions says attention_head_channels; it loads as num_head_channels."""
    import json

    vae = tiny_vae(2, 1, mid_attention=True, num_head_channels=4, levels=3)
    vae.save_pretrained(tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["attention_head_channels"] = config.pop("num_head_channels")
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = VAE.from_pretrained(tmp_path, use_safetensors=True)
    assert loaded.config.num_head_channels == 4
    x = torch.rand(1, 1, 16, 16) * 2 - 1
    torch.testing.assert_close(
        loaded(x, sample_posterior=False).reconstruction, vae(x, sample_posterior=False).reconstruction
    )
