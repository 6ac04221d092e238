"""Model configs derived from the models' constructors (``medfusion.config.model_config``)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from medfusion.autoencoders.vae import VAE, VAEConfig
from medfusion.config import ModelConfig, model_config
from medfusion.diffusion.unet import UNet, UNetConfig
from medfusion.metrics.features import DomainEncoder
from medfusion.training.features import EncoderConfig


class Toy(nn.Module, ConfigMixin):
    config_name = "config.json"

    @register_to_config
    def __init__(self, spatial_dims: int = 2, widths: tuple[int, ...] = (4, 8), scale: float = 1.0):
        super().__init__()
        self.layer = nn.Linear(widths[0], widths[-1])


ToyConfig = model_config(Toy, "ToyConfig", from_data=("spatial_dims",), exclude=("scale",))


@pytest.mark.parametrize(
    ("config", "model", "excluded"),
    [(VAEConfig, VAE, {"scaling_factor"}), (UNetConfig, UNet, set()), (EncoderConfig, DomainEncoder, set())],
)
def test_a_model_config_has_every_constructor_argument(config, model, excluded):
    arguments = set(list(inspect.signature(model.__init__).parameters)[1:])
    assert {f.name for f in dataclasses.fields(config)} == arguments - excluded
    assert issubclass(config, ModelConfig) and config.model_class is model


def test_defaults_are_the_constructors_but_for_the_data_and_the_overrides():
    assert ToyConfig() == ToyConfig(spatial_dims=None, widths=(4, 8))
    assert (
        UNetConfig().block_out_channels
        == inspect.signature(UNet.__init__).parameters["block_out_channels"].default
    )
    assert EncoderConfig().pooling == "multiscale" and EncoderConfig().image_size is None


def test_yaml_lists_become_tuples_and_types_are_checked():
    config = ToyConfig.from_dict({"widths": [2, 3]})
    assert config.widths == (2, 3)
    with pytest.raises(ValueError, match="widths"):
        ToyConfig.from_dict({"widths": "wide"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['scale'\]"):
        ToyConfig.from_dict({"scale": 2.0})


def test_resolve_fills_in_the_data_and_checks_what_was_set():
    assert ToyConfig().resolve(3).spatial_dims == 3
    assert ToyConfig().resolve(spatial_dims=3).spatial_dims == 3
    assert ToyConfig(spatial_dims=3).resolve(3).spatial_dims == 3
    with pytest.raises(ValueError, match=r"model\.spatial_dims is 2 but the data give 3"):
        ToyConfig(spatial_dims=2).resolve(3)
    with pytest.raises(TypeError, match="resolve takes"):
        ToyConfig().resolve(2, 3)


def test_build_makes_the_model_with_the_config():
    toy = ToyConfig(widths=(2, 5)).build(2)
    assert toy.config.widths == (2, 5) and toy.config.spatial_dims == 2 and toy.layer.out_features == 5
    vae = VAEConfig(block_out_channels=(4, 8), latent_channels=2, norm_num_groups=4).build(2, 1)
    assert isinstance(vae, VAE) and vae(torch.zeros(1, 1, 8, 8)).reconstruction.shape == (1, 1, 8, 8)


def test_a_model_config_refuses_arguments_the_model_does_not_take():
    with pytest.raises(ValueError, match=r"takes no argument\(s\) \['depth'\]"):
        model_config(Toy, "Bad", from_data=("depth",))
