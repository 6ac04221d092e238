"""The model folder: a save/load round trip in 2D and 3D (weights, configs, info, schedule, file
layout, eval mode, dtype), sampling from a loaded folder, refusal of broken or mismatched folders,
and atomic replacement of an existing folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from medfusion.autoencoders.vae import VAE
from medfusion.diffusion.unet import UNet
from medfusion.samplers import (
    INFO_FILE,
    MODEL_INDEX,
    ModelFolderError,
    load_model_folder,
    sample_latents,
    save_model_folder,
)
from tests.samplers._sampler_helpers import (
    LATENT_CHANNELS,
    folder_unet,
    folder_vae,
    model_info,
    scheduler_config,
)

PICKLES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def plain_config(model) -> dict:
    """A model's config without diffusers' bookkeeping keys, tuples as lists."""
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in model.config.items() if not k.startswith("_")
    }


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        torch.testing.assert_close(sa[name], sb[name], rtol=0, atol=0, msg=name)


@pytest.fixture(params=[2, 3], ids=["2d", "3d"])
def spatial_dims(request) -> int:
    return request.param


@pytest.fixture
def saved(tmp_path, spatial_dims):
    """A model folder written from tiny models: (path, unet, vae, info)."""
    unet, vae, info = folder_unet(spatial_dims), folder_vae(spatial_dims), model_info(spatial_dims)
    path = save_model_folder(tmp_path / "model", unet, vae, scheduler_config(), info)
    return path, unet, vae, info


# the round trip


def test_round_trip(saved):
    path, unet, vae, info = saved
    assert path.is_dir()
    folder = load_model_folder(path)
    assert folder.path == path
    assert isinstance(folder.unet, UNet) and isinstance(folder.vae, VAE)
    assert_same_weights(folder.unet, unet)
    assert_same_weights(folder.vae, vae)
    assert plain_config(folder.unet) == plain_config(unet)
    assert plain_config(folder.vae) == plain_config(vae)
    assert folder.vae.scaling_factor == 0.75
    assert folder.info == info
    assert folder.info.spacing == info.spacing and folder.info.source_dtype == "uint16"
    assert folder.info.class_names == ("a", "b") and folder.unet.num_classes == 2

    assert isinstance(folder.scheduler, DDPMScheduler)
    expected = DDPMScheduler.from_config(scheduler_config())
    torch.testing.assert_close(folder.scheduler.alphas_cumprod, expected.alphas_cumprod, rtol=0, atol=0)
    for key, value in scheduler_config().items():
        assert folder.scheduler_config[key] == value, key

    for module in (folder.unet, folder.vae):
        assert not module.training
        assert not any(m.training for m in module.modules())
        assert not any(p.requires_grad for p in module.parameters())


def test_folder_layout(saved):
    path = saved[0]
    files = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    for required in (
        MODEL_INDEX,
        INFO_FILE,
        "vae/config.json",
        "unet/config.json",
        "scheduler/scheduler_config.json",
    ):
        assert required in files
    assert any(f.startswith("vae/") and f.endswith(".safetensors") for f in files)
    assert any(f.startswith("unet/") and f.endswith(".safetensors") for f in files)
    assert not [f for f in files if f.endswith(PICKLES)]
    index = json.loads((path / MODEL_INDEX).read_text())
    assert index["unet"] == ["medfusion.diffusion", "UNet"]
    assert index["vae"] == ["medfusion.autoencoders", "VAE"]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    info = json.loads((path / INFO_FILE).read_text())
    assert info["class_names"] == ["a", "b"] and info["source_dtype"] == "uint16"


def test_load_casts_to_dtype(saved):
    path = saved[0]
    folder = load_model_folder(path, device="cpu", dtype=torch.bfloat16)
    for module in (folder.unet, folder.vae):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
        assert not module.training
    # sampling with a bfloat16 U-Net still gives float32 latents
    latents = sample_latents(
        folder.unet,
        DDIMScheduler.from_config(folder.scheduler_config),
        (1, *folder.info.latent_shape),
        steps=1,
    )
    assert latents.dtype == torch.float32 and latents.shape == (1, *folder.info.latent_shape)


def test_sampling_from_the_folder_matches_the_models_in_memory(saved):
    path, unet, _, info = saved
    folder = load_model_folder(path)
    shape = (2, *info.latent_shape)

    def sample(model, config):
        return sample_latents(
            model,
            DDIMScheduler.from_config(config),
            shape,
            torch.tensor([0, 1]),
            steps=3,
            guidance_scale=2.0,
            generator=torch.Generator().manual_seed(11),
        )

    in_memory = sample(unet, scheduler_config())
    loaded = sample(folder.unet, folder.scheduler_config)
    assert in_memory.shape == shape
    torch.testing.assert_close(loaded, in_memory, rtol=0, atol=0)
    images = folder.vae.decode_latents(loaded)
    assert images.shape == (2, info.channels, *info.image_size)


# broken folders


def _remove_index(path: Path) -> None:
    (path / MODEL_INDEX).unlink()


def _index_names_os_system(path: Path) -> None:
    index = json.loads((path / MODEL_INDEX).read_text())
    index["unet"] = ["os", "system"]
    (path / MODEL_INDEX).write_text(json.dumps(index))


def _corrupt_index(path: Path) -> None:
    (path / MODEL_INDEX).write_text("{not json")


def _remove_unet_weights(path: Path) -> None:
    for weights in (path / "unet").glob("*.safetensors"):
        weights.unlink()


def _unet_weights_as_pickle(path: Path) -> None:
    """Only a pickled checkpoint: must not be loaded (loading runs no code from the folder)."""
    unet = UNet.from_pretrained(path / "unet")
    shutil.rmtree(path / "unet")
    unet.save_pretrained(path / "unet", safe_serialization=False)
    assert any(p.suffix == ".bin" for p in (path / "unet").iterdir())


def _corrupt_info(path: Path) -> None:
    (path / INFO_FILE).write_text("spatial_dims: 2  # YAML, not JSON")


def _info_not_an_object(path: Path) -> None:
    (path / INFO_FILE).write_text("[1, 2]")


def _info_unknown_key(path: Path) -> None:
    info = json.loads((path / INFO_FILE).read_text())
    info["colour"] = "blue"
    (path / INFO_FILE).write_text(json.dumps(info))


def _remove_vae_config(path: Path) -> None:
    (path / "vae" / "config.json").unlink()


def _remove_scheduler(path: Path) -> None:
    shutil.rmtree(path / "scheduler")


def _truncate_unet_weights(path: Path) -> None:
    (weights,) = (path / "unet").glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:100])


def _unet_latent_channels_mismatch(path: Path) -> None:
    unet = folder_unet(
        json.loads((path / INFO_FILE).read_text())["spatial_dims"], in_channels=LATENT_CHANNELS + 1
    )
    shutil.rmtree(path / "unet")
    unet.save_pretrained(path / "unet", safe_serialization=True)


def _three_class_names(path: Path) -> None:
    info = json.loads((path / INFO_FILE).read_text())
    info["class_names"] = ["a", "b", "c"]
    (path / INFO_FILE).write_text(json.dumps(info))


BROKEN = [
    (_remove_index, rf"{MODEL_INDEX}: missing"),
    (_index_names_os_system, rf"{MODEL_INDEX}: unet must be .*'os', 'system'"),
    (_corrupt_index, rf"{MODEL_INDEX}: not valid JSON"),
    (_remove_unet_weights, r"unet: no \*\.safetensors"),
    (_unet_weights_as_pickle, r"unet: no \*\.safetensors"),
    (_truncate_unet_weights, r"unet: cannot load the unet"),
    (_corrupt_info, rf"{INFO_FILE}: not valid JSON"),
    (_info_not_an_object, rf"{INFO_FILE}: expected a JSON object"),
    (_info_unknown_key, rf"{INFO_FILE}: unknown key.*colour"),
    (_remove_vae_config, r"vae[/\\]config\.json: missing"),
    (_remove_scheduler, r"scheduler_config\.json: missing"),
    (_unet_latent_channels_mismatch, r"U-Net takes 3 latent channel\(s\) but the VAE makes 2"),
    (_three_class_names, rf"U-Net has 2 class\(es\) but {INFO_FILE} names 3"),
]


@pytest.mark.parametrize(("breaks", "message"), BROKEN, ids=[b.__name__.strip("_") for b, _ in BROKEN])
def test_broken_folder_is_refused(saved, breaks, message):
    path = saved[0]
    breaks(path)
    with pytest.raises(ModelFolderError, match=message):
        load_model_folder(path)


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(ModelFolderError, match="not a folder"):
        load_model_folder(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelFolderError, match="not a folder"):
        load_model_folder(tmp_path / "file")


def test_save_refuses_parts_that_do_not_fit(tmp_path):
    vae, info = folder_vae(2), model_info(2)
    cases = [
        (folder_unet(2, in_channels=LATENT_CHANNELS + 1), vae, info, "U-Net takes 3 latent channel"),
        (folder_unet(2, num_classes=3), vae, info, r"U-Net has 3 class\(es\) but medfusion.json names 2"),
        (folder_unet(2, num_classes=None), vae, info, r"U-Net has None class\(es\)"),
        (folder_unet(2, num_classes=2), vae, model_info(2, class_names=()), r"names 0"),
        (folder_unet(3), vae, info, "U-Net is 3D but the VAE 2D"),
        (folder_unet(3), folder_vae(3), info, "says 2D with 1 channel"),
    ]
    for unet, vae_, info_, message in cases:
        with pytest.raises(ModelFolderError, match=message):
            save_model_folder(tmp_path / "model", unet, vae_, scheduler_config(), info_)
        assert not list(tmp_path.iterdir())  # nothing written, no temporary folder left


def test_unconditional_model_round_trip(tmp_path):
    unet, vae, info = folder_unet(2, num_classes=None), folder_vae(2), model_info(2, class_names=())
    folder = load_model_folder(save_model_folder(tmp_path / "model", unet, vae, scheduler_config(), info))
    assert folder.unet.num_classes is None and folder.info.class_names == ()
    assert_same_weights(folder.unet, unet)


# atomic replacement


def test_save_over_an_existing_folder_replaces_it(tmp_path):
    parent = tmp_path / "models"
    first = folder_unet(2)
    path = save_model_folder(parent / "model", first, folder_vae(2), scheduler_config(), model_info(2))
    (path / "stale.txt").write_text("from the first save")
    second = folder_unet(2)
    assert not torch.equal(second.conv_out.weight, first.conv_out.weight)
    save_model_folder(path, second, folder_vae(2), scheduler_config(), model_info(2))

    assert [p.name for p in parent.iterdir()] == ["model"]  # no temporary or old folder beside it
    assert not (path / "stale.txt").exists()
    assert_same_weights(load_model_folder(path).unet, second)

    with pytest.raises(FileExistsError):
        save_model_folder(path, first, folder_vae(2), scheduler_config(), model_info(2), overwrite=False)
    assert_same_weights(load_model_folder(path).unet, second)


def test_failed_save_leaves_the_old_folder(tmp_path, monkeypatch):
    parent = tmp_path / "models"
    unet = folder_unet(2)
    path = save_model_folder(parent / "model", unet, folder_vae(2), scheduler_config(), model_info(2))
    vae = folder_vae(2)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(vae, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        save_model_folder(path, folder_unet(2), vae, scheduler_config(), model_info(2))
    assert [p.name for p in parent.iterdir()] == ["model"]
    assert_same_weights(load_model_folder(path).unet, unet)
