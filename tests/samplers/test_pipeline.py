"""MedfusionPipeline: loading a model folder, sampling by class name/index/unconditionally in 2D
and 3D, per-sample reproducibility whatever the batching, bf16, the checks of its arguments, and
slab-wise decoding (``decode_in_slabs``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from medfusion.samplers import MedfusionPipeline, SamplerConfig, decode_in_slabs, save_model_folder
from tests.samplers._sampler_helpers import folder_unet, folder_vae, model_info, scheduler_config

SAMPLER = SamplerConfig(steps=2)
# diffusers' sigma schedulers call np.array(tensor, copy=False) (numpy 2 deprecation): not ours
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny model folders: conditional 2D and 3D (classes a, b), unconditional 2D."""
    torch.manual_seed(1)
    root = tmp_path_factory.mktemp("models")
    return {
        "2d": save_model_folder(
            root / "2d", folder_unet(2), folder_vae(2), scheduler_config(), model_info(2)
        ),
        "3d": save_model_folder(
            root / "3d", folder_unet(3), folder_vae(3), scheduler_config(), model_info(3)
        ),
        "uncond": save_model_folder(
            root / "uncond",
            folder_unet(2, num_classes=None),
            folder_vae(2),
            scheduler_config(),
            dataclasses.replace(model_info(2, class_names=()), source_dtype="uint8"),
        ),
    }


@pytest.fixture(scope="module")
def pipes(models):
    return {name: MedfusionPipeline.from_pretrained(path, device="cpu") for name, path in models.items()}


def check_images(images: torch.Tensor, n: int, image_size: tuple[int, ...]) -> None:
    assert images.shape == (n, 1, *image_size)
    assert images.dtype == torch.float32 and images.device.type == "cpu"
    assert torch.isfinite(images).all()
    assert images.min() >= -1 and images.max() <= 1
    assert images.std() > 0.01  # not constant: the perturbed networks do something


# loading and sampling


def test_from_pretrained(models, pipes):
    pipe = pipes["2d"]
    assert pipe.class_names == ("a", "b")
    assert pipe.info.image_size == (16, 8) and pipe.info.source_dtype == "uint16"
    assert pipe.device == torch.device("cpu") and pipe.dtype == torch.float32 and pipe.precision == "fp32"
    assert pipe.model.path == models["2d"]
    for net in (pipe.unet, pipe.vae):
        assert not net.training
        assert all(p.dtype == torch.float32 and not p.requires_grad for p in net.parameters())
    assert pipes["uncond"].class_names == ()
    assert pipes["3d"].info.spatial_dims == 3


@pytest.mark.parametrize("name", ["2d", "3d"])
def test_call_shapes_and_range(pipes, name):
    pipe = pipes[name]
    size = pipe.info.image_size
    check_images(pipe(["a", "b", "a"], seeds=0, sampler=SAMPLER), 3, size)
    check_images(pipe([0, 1, None], seeds=[3, 4, 5], sampler=SAMPLER, batch_size=2), 3, size)
    check_images(pipe(n=2, seeds=7, sampler=SAMPLER), 2, size)  # unconditional samples of a class model
    check_images(pipe(["none", "b"], sampler=SAMPLER), 2, size)


def test_unconditional_model(pipes):
    pipe = pipes["uncond"]
    check_images(pipe(n=3, sampler=SAMPLER, batch_size=2), 3, (16, 8))
    check_images(pipe([None, "none"], seeds=[1, 2], sampler=SAMPLER), 2, (16, 8))
    assert pipe.label_tensor([None, "none"]) is None


def test_class_index_and_label_tensor(pipes):
    pipe = pipes["2d"]
    assert [pipe.class_index(label) for label in ("a", "b", 0, 1, None, "none")] == [0, 1, 0, 1, None, None]
    null = pipe.unet.null_class
    assert pipe.label_tensor(["b", None, 0]).tolist() == [1, null, 0]


def test_class_name_and_index_give_the_same_sample(pipes):
    pipe = pipes["2d"]
    by_name = pipe(["b", "a"], seeds=[3, 4], sampler=SAMPLER)
    by_index = pipe([1, 0], seeds=[3, 4], sampler=SAMPLER)
    torch.testing.assert_close(by_name, by_index, rtol=0, atol=0)


# reproducibility


@pytest.mark.parametrize("name", ["2d", "3d"])
def test_a_sample_depends_on_its_seed_and_class_only(pipes, name):
    pipe = pipes[name]
    labels, seeds = ["a", "b", "a"], [5, 6, 7]
    together = pipe(labels, seeds=seeds, sampler=SAMPLER, batch_size=3)
    one_by_one = pipe(labels, seeds=seeds, sampler=SAMPLER, batch_size=1)
    alone = pipe(["b"], seeds=[6], sampler=SAMPLER)
    torch.testing.assert_close(together, one_by_one, rtol=0, atol=1e-4)
    torch.testing.assert_close(together[1:2], alone, rtol=0, atol=1e-4)
    # a first seed s gives seeds s, s+1, ...
    torch.testing.assert_close(pipe(labels, seeds=5, sampler=SAMPLER), together, rtol=0, atol=1e-4)
    # the same call twice: the same images (no global random state involved)
    torch.manual_seed(123)
    torch.testing.assert_close(pipe(labels, seeds=seeds, sampler=SAMPLER, batch_size=3), together)

    assert (together[0] - together[2]).abs().max() > 1e-2  # seeds 5 and 7, same class
    other_class = pipe(["a"], seeds=[6], sampler=SAMPLER)
    assert (other_class - alone).abs().max() > 1e-2  # seed 6, class a vs b


def test_sampler_settings_change_the_sample(pipes):
    pipe = pipes["2d"]
    base = pipe(["a"], seeds=[0], sampler=SAMPLER)
    # (not deterministic DDIM: with 2 steps DPM-Solver++ 2M takes two first-order steps, i.e. DDIM's)
    others = (SamplerConfig(steps=3), SamplerConfig(steps=2, guidance_scale=1.0), SamplerConfig("ddpm", 2))
    for sampler in others:
        assert (pipe(["a"], seeds=[0], sampler=sampler) - base).abs().max() > 1e-3, sampler


def test_bf16(models, pipes):
    pipe = MedfusionPipeline.from_pretrained(models["2d"], device="cpu", precision="bf16")
    assert pipe.dtype == torch.bfloat16 and pipe.precision == "bf16"
    assert all(p.dtype == torch.bfloat16 for p in pipe.unet.parameters())
    assert all(p.dtype == torch.bfloat16 for p in pipe.vae.parameters())
    half = pipe(["a", "b"], seeds=[0, 1], sampler=SAMPLER)
    full = pipes["2d"](["a", "b"], seeds=[0, 1], sampler=SAMPLER)
    check_images(half, 2, (16, 8))
    assert (half - full).abs().mean() < 0.1


def test_bf16_3d(models):
    pipe = MedfusionPipeline.from_pretrained(models["3d"], device="cpu", precision="bf16")
    check_images(pipe(["a", None], seeds=[0, 1], sampler=SAMPLER), 2, (8, 8, 4))


# argument checks


def test_unknown_class_name(pipes):
    with pytest.raises(ValueError, match=r"unknown class 'c'.*classes are: a, b"):
        pipes["2d"](["a", "c"], sampler=SAMPLER)


def test_class_on_an_unconditional_model(pipes):
    for label in ("a", 0):
        with pytest.raises(ValueError, match="unconditional"):
            pipes["uncond"]([label], sampler=SAMPLER)


@pytest.mark.parametrize("label", [2, -1, True, 1.0])
def test_bad_class_index(pipes, label):
    with pytest.raises(ValueError, match=r"class index must be an int in \[0, 2\)"):
        pipes["2d"]([label], sampler=SAMPLER)


def test_labels_are_checked_before_any_sampling(pipes, monkeypatch):
    pipe = pipes["2d"]
    calls = []
    monkeypatch.setattr(pipe, "sample_latents", lambda *args, **kwargs: calls.append(args))
    with pytest.raises(ValueError, match="unknown class"):
        pipe(["a", "b", "a", "x"], sampler=SAMPLER, batch_size=1)
    assert calls == []


@pytest.mark.parametrize("n", [None, 0, -2])
def test_no_labels_and_no_n(pipes, n):
    with pytest.raises(ValueError, match="give labels or n >= 1"):
        pipes["2d"](n=n, sampler=SAMPLER)


def test_seeds_must_match_labels(pipes):
    with pytest.raises(ValueError, match="got 1 seeds for 2 samples"):
        pipes["2d"](["a", "b"], seeds=[1], sampler=SAMPLER)
    with pytest.raises(ValueError, match="got 2 labels but 1 seeds"):
        pipes["2d"].sample_latents(["a", "b"], [1], SAMPLER)


@pytest.mark.parametrize("batch_size", [0, -1])
def test_bad_batch_size(pipes, batch_size):
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        pipes["2d"](["a"], sampler=SAMPLER, batch_size=batch_size)


@pytest.mark.parametrize("precision", ["fp16", "float32", ""])
def test_bad_precision(models, precision):
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16"):
        MedfusionPipeline.from_pretrained(models["2d"], device="cpu", precision=precision)


# decoding in slabs


def nearest(factor: int):
    """A pointwise decoder: mixes the latent channels per voxel and repeats every latent voxel
    ``factor`` times along each spatial axis (nearest-neighbour upsampling)."""

    def decode(z: torch.Tensor) -> torch.Tensor:
        x = z[:, :1] * 0.5 - z[:, 1:2] ** 2 + 0.25
        for axis in range(2, z.ndim):
            x = x.repeat_interleave(factor, dim=axis)
        return x

    return decode


@pytest.mark.parametrize("shape", [(2, 2, 7, 3), (2, 2, 7, 3, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("factor", [1, 2, 3])
@pytest.mark.parametrize("slab, overlap", [(1, 0), (2, 0), (2, 1), (3, 1), (3, 2), (4, 2), (5, 3), (6, 1)])
def test_slabs_of_a_pointwise_decoder_equal_decoding_at_once(shape, factor, slab, overlap):
    z = torch.randn(shape)
    decode = nearest(factor)
    full = decode(z)
    sizes = []

    def recording(piece):
        sizes.append(piece.shape[2])
        return decode(piece)

    pieces = decode_in_slabs(recording, z, factor, slab, overlap)
    assert pieces.shape == full.shape == (2, 1, *(s * factor for s in shape[2:]))
    assert pieces.dtype == torch.float32
    # the blending weights of every plane sum to one: pieces that agree give the same result
    torch.testing.assert_close(pieces, full, rtol=1e-6, atol=1e-6)  # up to rounding
    assert set(sizes) == {slab}  # no piece is larger than a slab
    assert len(sizes) >= -(-shape[2] // slab)


def test_slab_at_least_the_depth_decodes_at_once(pipes):
    pipe = pipes["3d"]
    latents = pipe.sample_latents(["a", "b"], [0, 1], SAMPLER)
    depth = latents.shape[2]
    at_once = pipe.decode(latents)
    for slab in (depth, depth + 3):
        torch.testing.assert_close(pipe.decode(latents, slab=slab), at_once, rtol=0, atol=0)
        direct = decode_in_slabs(pipe.vae.decode_latents, latents, 2, slab)
        torch.testing.assert_close(direct, pipe.vae.decode_latents(latents).float(), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["2d", "3d"])
@pytest.mark.parametrize("slab, overlap", [(1, 0), (3, 1), (3, 2)])
def test_smaller_slabs_of_the_vae(pipes, name, slab, overlap):
    pipe = pipes[name]
    latents = pipe.sample_latents(["a"], [0], SAMPLER)
    images = pipe.decode(latents, slab=slab, overlap=overlap)
    check_images(images, 1, pipe.info.image_size)
    check_images(pipe(["a", "b"], sampler=SAMPLER, slab=3), 2, pipe.info.image_size)


@pytest.mark.parametrize("slab, overlap", [(0, 0), (-1, 0), (2, 2), (2, 3), (3, -1)])
def test_bad_slab_or_overlap(slab, overlap):
    z = torch.zeros(1, 2, 6, 4)
    with pytest.raises(ValueError, match="need slab >= 1 and 0 <= overlap < slab"):
        decode_in_slabs(nearest(2), z, 2, slab, overlap)


@pytest.mark.parametrize("slab", [1, 2])
def test_small_slab_with_the_default_overlap(pipes, slab):
    pipe = pipes["3d"]
    latents = pipe.sample_latents(["a"], [0], SAMPLER)
    check_images(pipe.decode(latents, slab=slab), 1, pipe.info.image_size)
