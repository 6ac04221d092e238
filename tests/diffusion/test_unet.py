"""The diffusion U-Net: shapes and gradients in 2D and 3D, attention, class conditioning and the
null class, timesteps, gradient checkpointing, saving and loading, argument checks and its typed
config."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from medfusion.diffusion.unet import UNet, UNetConfig
from medfusion.nn import AttentionBlock, ResBlock
from tests.tiny import TINY_UNET, perturb, tiny_unet


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def latents(spatial_dims: int, channels: int = 4, n: int = 2) -> torch.Tensor:
    return torch.randn(n, channels, *(8, 16, 8)[:spatial_dims])


def plain_config(model: UNet) -> dict:
    """The model's config without diffusers' bookkeeping keys, tuples as lists."""
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in model.config.items() if not k.startswith("_")
    }


# shapes, zero initialisation and gradients


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"attention_levels": (False, True), "mid_attention": True},
        {"attention_levels": (True, True), "num_head_channels": None, "num_classes": 3},
        {"block_out_channels": (8, 8, 16), "layers_per_block": 2, "num_classes": 1},
    ],
    ids=["plain", "attention", "all-attention-conditional", "three-levels"],
)
def test_forward_shape_and_zero_output_at_init(spatial_dims, kwargs):
    model = tiny_unet(spatial_dims, **kwargs)
    x = latents(spatial_dims)
    out = model(x, torch.tensor([3, 500]))
    assert out.shape == x.shape
    assert out.dtype == x.dtype
    # conv_out and every residual branch start at zero: the initial prediction is exactly zero
    assert torch.equal(out, torch.zeros_like(out))
    n_attention = sum(isinstance(m, AttentionBlock) for m in model.modules())
    widths = model.config.block_out_channels
    levels = len(widths)
    attention = kwargs.get("attention_levels") or (False,) * levels
    layers = model.config.layers_per_block
    expected_attention = sum(a * (2 * layers + 1) for a in attention) + bool(kwargs.get("mid_attention"))
    assert n_attention == expected_attention
    n_res = sum(isinstance(m, ResBlock) for m in model.modules())
    assert n_res == levels * layers + 2 + levels * (layers + 1)
    assert model.downsampling_factor == 2 ** (levels - 1)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_out_channels(spatial_dims):
    model = perturb(tiny_unet(spatial_dims, out_channels=6))
    assert model(latents(spatial_dims), 10).shape == (2, 6, *(8, 16, 8)[:spatial_dims])


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("attention", [False, True])
def test_gradients_reach_every_parameter_after_a_few_steps(spatial_dims, attention):
    kwargs = {"attention_levels": (True, True), "mid_attention": True} if attention else {}
    model = tiny_unet(spatial_dims, num_classes=2, **kwargs).train()
    x = latents(spatial_dims, n=4)
    t = torch.tensor([1, 200, 600, 999])
    labels = torch.tensor([0, 1, 2, 1])  # 2 is the null class
    target = torch.randn_like(x)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    # zero-initialised layers: the gradient needs a couple of steps to reach the first layers
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x, t, labels), target).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(model(x, t, labels), target).backward()
    for name, p in model.named_parameters():
        assert p.requires_grad
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert not torch.equal(model(x, t, labels), torch.zeros_like(x))


# class conditioning and timesteps


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_unconditional_model_rejects_class_labels(spatial_dims):
    model = tiny_unet(spatial_dims)
    assert model.class_embedding is None
    assert model.num_classes is None and model.null_class is None
    x = latents(spatial_dims)
    with pytest.raises(ValueError, match="unconditional"):
        model(x, 10, torch.tensor([0, 1]))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_class_labels_condition_the_output(spatial_dims):
    model = perturb(tiny_unet(spatial_dims, num_classes=3)).eval()
    assert model.num_classes == 3 and model.null_class == 3
    x = latents(spatial_dims)
    t = torch.tensor([100, 100])
    with torch.no_grad():
        outs = [model(x, t, torch.full((2,), c)) for c in range(4)]
        for i in range(4):
            for j in range(i + 1, 4):
                assert not torch.allclose(outs[i], outs[j], atol=1e-6), (i, j)
        # per sample: each sample's output depends on its own label only
        mixed = model(x, t, torch.tensor([0, 2]))
        torch.testing.assert_close(mixed[0], outs[0][0])
        torch.testing.assert_close(mixed[1], outs[2][1])


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_no_class_labels_means_the_null_class(spatial_dims):
    model = perturb(tiny_unet(spatial_dims, num_classes=2)).eval()
    x = latents(spatial_dims)
    with torch.no_grad():
        unconditional = model(x, 50)
        null = model(x, 50, torch.full((2,), model.null_class))
        labelled = model(x, 50, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(unconditional, null, rtol=0, atol=0)
    assert not torch.allclose(unconditional, labelled)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("step", [0, 37, 999, 12.5])
def test_scalar_timestep_equals_a_batch_of_timesteps(spatial_dims, step):
    model = perturb(tiny_unet(spatial_dims)).eval()
    x = latents(spatial_dims, n=3)
    dtype = torch.float32 if isinstance(step, float) else torch.long
    with torch.no_grad():
        batch = model(x, torch.full((3,), step, dtype=dtype))
        torch.testing.assert_close(model(x, step), batch, rtol=0, atol=0)
        torch.testing.assert_close(model(x, torch.tensor(step, dtype=dtype)), batch, rtol=0, atol=0)
        torch.testing.assert_close(model(x, torch.tensor([step], dtype=dtype)), batch, rtol=0, atol=0)
        other = model(x, torch.full((3,), step + 100, dtype=dtype))
    assert not torch.allclose(batch, other)


def test_per_sample_timesteps_are_independent():
    model = perturb(tiny_unet(2)).eval()
    x = latents(2, n=2)
    with torch.no_grad():
        mixed = model(x, torch.tensor([5, 900]))
        torch.testing.assert_close(mixed[0], model(x, 5)[0])
        torch.testing.assert_close(mixed[1], model(x, 900)[1])


# gradient checkpointing


def loss_and_grads(model: UNet, x, t, labels) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks in both runs
    out = model(x, t, labels)
    loss = (out - 1.0).square().mean()
    loss.backward()
    return out.detach(), loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_gradient_checkpointing_gives_the_same_outputs_and_gradients(spatial_dims, monkeypatch):
    model = tiny_unet(
        spatial_dims, num_classes=2, attention_levels=(False, True), mid_attention=True, dropout=0.1
    )
    perturb(model).train()
    x, t, labels = latents(spatial_dims), torch.tensor([10, 700]), torch.tensor([1, 2])
    out, loss, grads = loss_and_grads(model, x, t, labels)

    calls = []
    real_checkpoint = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    assert not model.gradient_checkpointing
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    out_ckpt, loss_ckpt, grads_ckpt = loss_and_grads(model, x, t, labels)
    n_res = sum(isinstance(m, ResBlock) for m in model.modules())
    assert len(calls) == n_res  # every residual block ran under checkpointing, once
    torch.testing.assert_close(out_ckpt, out)
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads_ckpt.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], msg=name)
    with torch.no_grad():  # no checkpointing when no gradient is taken
        model(x, t, labels)
    assert len(calls) == n_res
    model.disable_gradient_checkpointing()
    assert not model.gradient_checkpointing


# saving and loading


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_save_and_load_round_trip(spatial_dims, tmp_path):
    model = tiny_unet(spatial_dims, num_classes=2, attention_levels=(True, False), mid_attention=True)
    perturb(model).eval()
    model.save_pretrained(tmp_path / "unet", safe_serialization=True)
    files = sorted(p.name for p in (tmp_path / "unet").iterdir())
    assert "config.json" in files
    assert any(name.endswith(".safetensors") for name in files)
    assert not [n for n in files if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"))]

    loaded = UNet.from_pretrained(tmp_path / "unet").eval()
    assert plain_config(loaded) == plain_config(model)
    assert loaded.num_classes == 2 and loaded.downsampling_factor == 2
    x = latents(spatial_dims)
    with torch.no_grad():
        for labels in (None, torch.tensor([0, 1])):
            torch.testing.assert_close(loaded(x, 123, labels), model(x, 123, labels), rtol=0, atol=0)


# argument and input checks


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"spatial_dims": 1}, "spatial_dims"),
        ({"block_out_channels": ()}, "block_out_channels"),
        ({"block_out_channels": (8, 0)}, "block_out_channels"),
        ({"block_out_channels": (-8, 16)}, "block_out_channels"),
        ({"layers_per_block": 0}, "layers_per_block"),
        ({"in_channels": 0}, "in_channels"),
        ({"attention_levels": (True,)}, "attention_levels"),
        ({"attention_levels": (False, False, True)}, "attention_levels"),
        ({"num_classes": 0}, "num_classes"),
        ({"norm_num_groups": 3}, "norm_num_groups"),
        ({"block_out_channels": (8, 12), "norm_num_groups": 8}, "norm_num_groups"),
        ({"attention_levels": (False, True), "num_head_channels": 3}, "num_head_channels"),
        ({"time_embed_dim": 1}, "time_embed_dim"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    args = {"spatial_dims": 2, "in_channels": 4} | TINY_UNET | kwargs
    with pytest.raises(ValueError, match=message):
        UNet(**args)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_bad_inputs_raise(spatial_dims):
    model = tiny_unet(spatial_dims, block_out_channels=(8, 8, 16))  # downsampling factor 4
    with pytest.raises(ValueError, match=r"expects latents \(N, 4"):
        model(latents(spatial_dims, channels=3), 1)
    with pytest.raises(ValueError, match="spatial axes"):
        model(latents(5 - spatial_dims), 1)  # 3D input to a 2D model and vice versa
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.randn(1, 4, *(8, 6, 8)[:spatial_dims]), 1)
    assert model(torch.randn(1, 4, *(4, 12, 8)[:spatial_dims]), 1).shape == (1, 4, *(4, 12, 8)[:spatial_dims])


# the typed config


def test_config_resolve_fills_and_checks():
    config = UNetConfig(**TINY_UNET)
    assert config.spatial_dims is None and config.in_channels is None and config.num_classes is None
    resolved = config.resolve(3, 4, 2)
    assert (resolved.spatial_dims, resolved.in_channels, resolved.num_classes) == (3, 4, 2)
    assert resolved.block_out_channels == (8, 16) and resolved.norm_num_groups == 4
    assert config.resolve(2, 4, None).num_classes is None
    assert UNetConfig(spatial_dims=3, in_channels=4, num_classes=2, **TINY_UNET).resolve(3, 4, 2) == resolved
    for field, args in [
        ("spatial_dims", (3, 4, 2)),
        ("in_channels", (2, 8, 2)),
        ("num_classes", (2, 4, 5)),
        ("num_classes", (2, 4, None)),
    ]:
        configured = UNetConfig(spatial_dims=2, in_channels=4, num_classes=2, **TINY_UNET)
        with pytest.raises(ValueError, match=rf"model\.{field}"):
            configured.resolve(*args)


def test_config_build():
    model = UNetConfig(mid_attention=True, **TINY_UNET).build(2, 4, 3)
    assert isinstance(model, UNet)
    assert model.config.spatial_dims == 2 and model.config.in_channels == 4 and model.num_classes == 3
    assert tuple(model.config.block_out_channels) == (8, 16) and model.config.mid_attention
    assert model(latents(2), 5, torch.tensor([0, 3])).shape == (2, 4, 8, 16)
    with pytest.raises(ValueError, match=r"model\.in_channels"):
        UNetConfig(in_channels=2, **TINY_UNET).build(2, 4, None)


def test_config_dict_round_trip():
    config = UNetConfig(spatial_dims=3, attention_levels=(False, True), num_classes=2, **TINY_UNET)
    data = config.to_dict()
    assert data["block_out_channels"] == [8, 16] and data["attention_levels"] == [False, True]
    assert UNetConfig.from_dict(data) == config
    assert UNetConfig.from_dict({}) == UNetConfig()
    with pytest.raises(ValueError, match="widths"):
        UNetConfig.from_dict({"widths": [8]})


def test_config_defaults_match_the_model():
    """The typed config and the model agree on every default they share."""
    signature = inspect.signature(UNet.__init__).parameters
    for field in dataclasses.fields(UNetConfig):
        if field.name in ("spatial_dims", "in_channels"):
            continue  # filled from the VAE
        assert field.name in signature, field.name
        assert signature[field.name].default == field.default, field.name
