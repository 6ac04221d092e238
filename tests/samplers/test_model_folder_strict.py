"""A model folder is untrusted input: every JSON file in it is checked against its schema before
any network is built or any weight read. Crafted edits of one tiny valid folder are refused with a
ModelFolderError naming the file and the key; ``medfusion sample`` then exits 1 and writes
nothing. Valid variants still load, and the same checks run when a folder is written."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from pathlib import Path

import pytest

from medfusion.autoencoders.vae import VAE
from medfusion.cli import main
from medfusion.diffusion.objective import BETA_SCHEDULES, PREDICTION_TYPES, DiffusionConfig
from medfusion.diffusion.unet import UNet
from medfusion.samplers import INFO_FILE, MODEL_INDEX, ModelFolderError, load_model_folder
from medfusion.samplers.model_folder import model_hash, save_model_folder
from tests.samplers._sampler_helpers import folder_unet, folder_vae, model_info, scheduler_config

SCHEDULER = "scheduler/scheduler_config.json"
UNET = "unet/config.json"
VAE_CONFIG = "vae/config.json"


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> Path:
    """One tiny valid 2D conditional model folder (read only: tests edit a copy)."""
    root = tmp_path_factory.mktemp("valid")
    return save_model_folder(root / "model", folder_unet(2), folder_vae(2), scheduler_config(), model_info(2))


@pytest.fixture
def model(valid, tmp_path) -> Path:
    return Path(shutil.copytree(valid, tmp_path / "model"))


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if any network weights are read."""

    def refuse(*args, **kwargs):
        raise AssertionError("weights were read from a folder that should have been refused")

    for cls in (UNet, VAE):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


def edit(path: Path, file: str, changes: dict) -> None:
    """Set ``changes`` in the JSON ``file`` of the model folder ``path``."""
    target = path / file
    data = json.loads(target.read_text())
    data.update(changes)
    target.write_text(json.dumps(data))


def case(file: str, key: str, **changes):
    """A crafted edit of ``file``; the error must name the file and ``key``."""
    shown = ",".join(f"{k}={v!r}" for k, v in changes.items())
    return pytest.param(file, changes, key, id=f"{file.split('/')[0]}:{shown}"[:80])


BAD = [
    # scheduler/scheduler_config.json
    case(SCHEDULER, "num_train_timesteps", num_train_timesteps=0),
    case(SCHEDULER, "num_train_timesteps", num_train_timesteps=-1),
    case(SCHEDULER, "num_train_timesteps", num_train_timesteps="10"),
    case(SCHEDULER, "num_train_timesteps", num_train_timesteps=True),
    case(SCHEDULER, "num_train_timesteps", num_train_timesteps=10.0),
    case(SCHEDULER, "trained_betas", trained_betas=[0.5, 0.5]),
    case(SCHEDULER, "trained_betas", num_train_timesteps=4, trained_betas=[0.1, 0.2, 1.0, 0.3]),
    case(SCHEDULER, "trained_betas", num_train_timesteps=4, trained_betas=[0, 0.1, 0.2, 0.3]),
    case(SCHEDULER, "trained_betas", num_train_timesteps=2, trained_betas=[0.1, "0.2"]),
    case(SCHEDULER, "beta_end", beta_end=2.0),
    case(SCHEDULER, "beta_start", beta_start=0.0),
    case(SCHEDULER, "beta_start", beta_start=0.02, beta_end=0.01),
    case(SCHEDULER, "beta_schedule", beta_schedule="sigmoid"),
    case(SCHEDULER, "beta_schedule", beta_schedule="evil"),
    case(SCHEDULER, "prediction_type", prediction_type="sample"),
    case(SCHEDULER, "variance_type", variance_type="learned"),
    case(SCHEDULER, "clip_sample", clip_sample="no"),
    case(SCHEDULER, "thresholding", thresholding=1),
    case(SCHEDULER, "steps_offset", steps_offset=1000),
    case(SCHEDULER, "evil", evil=1),
    case(SCHEDULER, "_use_default_values", _use_default_values=["prediction_type"]),
    case(SCHEDULER, "_class_name", _class_name="DDIMScheduler"),
    case(SCHEDULER, "alphas_cumprod", rescale_betas_zero_snr=True),
    # unet/config.json
    case(UNET, "evil", evil=1),
    case(UNET, "layers_per_block", layers_per_block="1"),
    case(UNET, "num_classes", num_classes=True),
    case(UNET, "in_channels", in_channels=2.0),
    case(UNET, "block_out_channels", block_out_channels=[8, "8"]),
    case(UNET, "block_out_channels", block_out_channels=8),
    case(UNET, "attention_levels", attention_levels=[1, 0]),
    case(UNET, "dropout", dropout="0"),
    case(UNET, "layers_per_block", layers_per_block=0),  # the constructor's own check
    case(UNET, "norm_num_groups", norm_num_groups=3),
    case(UNET, "_class_name", _class_name="VAE"),
    # vae/config.json
    case(VAE_CONFIG, "evil", evil=1),
    case(VAE_CONFIG, "_use_default_values", _use_default_values=["latent_channels"]),
    case(VAE_CONFIG, "scaling_factor", scaling_factor="NaN"),
    case(VAE_CONFIG, "latent_channels", latent_channels=False),
    # medfusion.json
    case(INFO_FILE, "source_dtype", source_dtype="object"),
    case(INFO_FILE, "source_dtype", source_dtype="str"),
    case(INFO_FILE, "source_dtype", source_dtype="V8"),
    case(INFO_FILE, "source_dtype", source_dtype="complex64"),
    case(INFO_FILE, "source_dtype", source_dtype="evil"),
    case(INFO_FILE, "normalization", normalization={"normalization": "evil"}),
    case(INFO_FILE, "normalization", normalization="percentile"),
    case(INFO_FILE, "normalization", normalization={"normalization": "window", "evil": 1}),
    case(INFO_FILE, "window", normalization={"normalization": "window", "window": [5, 1]}),
    case(INFO_FILE, "window", normalization={"normalization": "window", "window": [-math.inf, 1]}),
    case(INFO_FILE, "window", normalization={"normalization": "window", "window": [1, 2, 3]}),
    case(INFO_FILE, "window", normalization={"normalization": "window", "window": [-1e39, 0]}),
    case(INFO_FILE, "percentiles", normalization={"percentiles": [1, 200]}),
    case(INFO_FILE, "per_channel", normalization={"per_channel": "yes"}),
    case(INFO_FILE, "class_names", class_names=["a", "../../ESCAPED_REL"]),
    case(INFO_FILE, "class_names", class_names=["a", "/abs/x"]),
    case(INFO_FILE, "class_names", class_names=["a", ""]),
    case(INFO_FILE, "class_names", class_names=["a", ".."]),
    case(INFO_FILE, "class_names", class_names=["a", "none"]),
    case(INFO_FILE, "class_names", class_names=["a", "ALL"]),
    case(INFO_FILE, "class_names", class_names=["a", "a/b"]),
    case(INFO_FILE, "class_names", class_names=["a", "x\u0000y"]),
    case(INFO_FILE, "class_names", class_names=["a", "a"]),
    case(INFO_FILE, "class_names", class_names=["a", "A"]),
    case(INFO_FILE, "class_names", class_names=["a", 1]),
    case(INFO_FILE, "spatial_dims", spatial_dims=4),
    case(INFO_FILE, "image_size", image_size=[16, 0]),
    case(INFO_FILE, "latent_shape", latent_shape=[2, 8]),
    case(INFO_FILE, "channels", channels=0),
    case(INFO_FILE, "scaling_factor", scaling_factor=0),
    case(INFO_FILE, "scaling_factor", scaling_factor="NaN"),
    case(INFO_FILE, "scaling_factor", scaling_factor=math.nan),
    case(INFO_FILE, "spacing", spacing=[-0.5, 0.25]),
    case(INFO_FILE, "spacing", spacing=[0.5, 0.25, 1.0]),
    case(INFO_FILE, "format", format=99),
    case(INFO_FILE, "format", format=0),
    case(INFO_FILE, "version", version=1),
    # model_index.json
    case(MODEL_INDEX, "evil", evil=["os", "system"]),
    case(MODEL_INDEX, "_class_name", _class_name="StableDiffusionPipeline"),
    case(MODEL_INDEX, "vae", vae=["medfusion.autoencoders", "../VAE"]),
]


@pytest.mark.parametrize(("file", "changes", "key"), BAD)
def test_crafted_file_is_refused_naming_file_and_key(model, no_weights, file, changes, key):
    edit(model, file, changes)
    with pytest.raises(ModelFolderError) as error:
        load_model_folder(model)
    message = str(error.value)
    assert str(model / file) in message
    assert key in message


def test_newer_format_says_so(model, no_weights):
    edit(model, INFO_FILE, {"format": 2, "a_key_of_format_2": [1]})
    with pytest.raises(ModelFolderError, match=r"medfusion\.json: format 2 was written by a newer medfusion"):
        load_model_folder(model)


def test_parts_are_checked_before_weights_are_read(model, no_weights):
    edit(model, UNET, {"in_channels": 3})
    with pytest.raises(ModelFolderError, match=r"U-Net takes 3 latent channel\(s\) but the VAE makes 2"):
        load_model_folder(model)


SAMPLED = [
    (SCHEDULER, {"num_train_timesteps": 0}),
    (INFO_FILE, {"class_names": ["a", "../../ESCAPED_REL"]}),
    (INFO_FILE, {"class_names": ["a", "none"]}),
    (INFO_FILE, {"source_dtype": "object"}),
    (UNET, {"evil": 1}),
]


@pytest.mark.parametrize(("file", "changes"), SAMPLED, ids=[f"{f}:{next(iter(c))}" for f, c in SAMPLED])
def test_sample_command_refuses_and_writes_nothing(model, tmp_path, capsys, file, changes):
    edit(model, file, changes)
    digest = model_hash(model)
    before = sorted(tmp_path.parent.rglob("*"))
    out = tmp_path / "work" / "out"
    assert main(["sample", str(model), "--n", "1", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert str(model / file) in err and next(iter(changes)) in err
    assert not out.exists() and not out.parent.exists()
    assert sorted(tmp_path.parent.rglob("*")) == before  # nothing written anywhere near
    assert model_hash(model) == digest


ACCEPTED = [
    (SCHEDULER, {"num_train_timesteps": 4, "trained_betas": [0.1, 0.2, 0.3, 0.4]}),
    (SCHEDULER, {"beta_start": 0.01, "beta_end": 0.01, "beta_schedule": "linear"}),
    (SCHEDULER, {"variance_type": "fixed_large", "thresholding": True, "clip_sample": True}),
    (UNET, {"_name_or_path": "/somewhere/unet", "dropout": 0}),  # written when re-saving a loaded net
    (VAE_CONFIG, {"_name_or_path": "RUN/vae"}),
    (INFO_FILE, {"normalization": {"normalization": "window", "window": [-1000, 1000], "range": [-1, 1]}}),
    (INFO_FILE, {"source_dtype": "int16", "spacing": None}),
    (INFO_FILE, {"source_dtype": "float32"}),
    (INFO_FILE, {"class_names": ["no finding", "Pneumonia-2"]}),
]


@pytest.mark.parametrize(("file", "changes"), ACCEPTED, ids=[f"{f}:{','.join(c)}" for f, c in ACCEPTED])
def test_valid_variants_load(model, file, changes):
    edit(model, file, changes)
    folder = load_model_folder(model)
    if file == INFO_FILE:
        assert folder.info.to_dict() == {**model_info(2).to_dict(), **changes}


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_every_schedule_medfusion_trains_loads(model, beta_schedule, prediction_type):
    config = DiffusionConfig(beta_schedule=beta_schedule, prediction_type=prediction_type)
    (model / SCHEDULER).write_text(json.dumps(config.scheduler_config()))
    assert load_model_folder(model).scheduler_config["prediction_type"] == prediction_type


def test_save_refuses_what_load_would_refuse(tmp_path):
    unet, vae = folder_unet(2), folder_vae(2)
    bad_schedule = {**scheduler_config(), "prediction_type": "sample"}
    with pytest.raises(ModelFolderError, match=r"scheduler_config: prediction_type must be one of"):
        save_model_folder(tmp_path / "model", unet, vae, bad_schedule, model_info(2))
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match=re.escape("class_names: class name '..' is a path")):
        model_info(2, class_names=("a", ".."))
    for changes, message in [
        ({"source_dtype": "object"}, "source_dtype must name a numeric numpy dtype"),
        ({"spatial_dims": 4}, "spatial_dims must be 2 or 3"),
        ({"scaling_factor": math.inf}, "scaling_factor must be a finite number > 0"),
        ({"normalization": {"normalization": "evil"}}, "normalization.normalization must be one of"),
    ]:
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(model_info(2), **changes)


def test_a_vae_config_with_the_earlier_name_of_num_head_channels_loads(model):
    """Folders written before the VAE's attention_head_channels became num_head_channels load."""
    target = model / VAE_CONFIG
    data = json.loads(target.read_text())
    data["attention_head_channels"] = data.pop("num_head_channels")
    target.write_text(json.dumps(data))
    assert load_model_folder(model).vae.config.num_head_channels == data["attention_head_channels"]
