"""The GAN run machinery on WGAN-GP: tiny runs on real 2D crops and 3D volumes that write a model
folder, which ``load_generator`` + ``write_generated_dataset`` turn into a synthetic folder; exact
resume; the discriminator and generator updates kept apart; bad input refused before training."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.testing import data_path

import medfusion.baselines  # registers the GAN kinds
from medfusion.baselines import arch as arch_module
from medfusion.baselines.arch import GANArchitecture
from medfusion.baselines.gan import (
    GANRunConfig,
    GANTask,
    GANTrainConfig,
    load_gan_generator,
    prepare_gan_run,
    train_gan,
)
from medfusion.baselines.wgan import WGAN_GP, WGANGenerator
from medfusion.config import DataConfig
from medfusion.data import read_image, write_image
from medfusion.data.image import MedicalImage
from medfusion.samplers import MANIFEST, ModelFolderError, load_generator, write_generated_dataset
from medfusion.training.state_io import load_state

TINY_MODEL = {"base_channels": 8, "levels": 2, "z_dim": 8, "norm_num_groups": 4}


@pytest.fixture(scope="module")
def crops_2d(tmp_path_factory) -> Path:
    """16x16 grey crops of two real images (fundus, camera), 8 per class, 8-bit PNG."""
    from skimage import data

    root = tmp_path_factory.mktemp("gan2d")
    rng = np.random.default_rng(0)
    for name, image in (("fundus", data.retina().mean(axis=2)), ("camera", data.camera())):
        grey = image.astype(np.uint8)
        h, w = grey.shape
        for i in range(8):
            y, x = rng.integers(h // 4, 3 * h // 4 - 16), rng.integers(w // 4, 3 * w // 4 - 16)
            write_image(root / name / f"{i}.png", grey[None, y : y + 16, x : x + 16])
    return root


@pytest.fixture(scope="module")
def volumes_3d(tmp_path_factory) -> Path:
    """8^3 crops of nibabel's T1 test volume, unlabelled, 2 mm voxels."""
    root = tmp_path_factory.mktemp("gan3d")
    rng = np.random.default_rng(0)
    anat = np.asarray(nib.load(Path(data_path) / "anatomical.nii").dataobj, dtype=np.float32)
    for i in range(4):
        start = [rng.integers(0, s - 8 + 1) for s in anat.shape]
        crop = anat[tuple(slice(s, s + 8) for s in start)]
        write_image(root / f"{i}.nii.gz", MedicalImage.from_array(crop[None], spacing=(2.0, 2.0, 2.0)))
    return root


def _config(max_steps: int = 4, **changes) -> GANRunConfig:
    train = GANTrainConfig(
        max_steps=max_steps,
        batch_size=4,
        num_workers=0,
        checkpoint_every=2,
        log_every=1,
        preview_every=0,
        learning_rate=1e-3,
        ema_decay=0.9,
    )
    return GANRunConfig(**({"model": TINY_MODEL, "gan": {"critic_steps": 2}, "train": train} | changes))


def _weights(result) -> dict[str, torch.Tensor]:
    return {f"{m}.{k}": v.clone() for m, mod in result.models.items() for k, v in mod.state_dict().items()}


# --- whole runs ---------------------------------------------------------------------------------


def test_2d_run_writes_a_model_folder_that_samples_into_a_synthetic_folder(crops_2d, tmp_path):
    run = tmp_path / "run"
    result = train_gan(crops_2d, run, _config(), progress=False, log=lambda _: None)
    assert result.step == 4
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "step_000004").is_dir()
    assert list((run / "logs" / "images").glob("gan_step_*.png"))  # the final preview grid
    records = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    tags = {key for record in records for key in record}
    assert {"discriminator/loss", "discriminator/gradient_penalty", "generator/loss"} <= tags
    # 4 discriminator steps, and a generator step at every second of them
    final = run / "checkpoints" / "step_000004"
    assert load_state(final / "scheduler_discriminator")["last_epoch"] == 4
    assert load_state(final / "scheduler_generator")["last_epoch"] == 2

    model = run / "model"
    info = json.loads((model / "medfusion.json").read_text())
    assert info["kind"] == "wgan-gp" and info["latent_shape"] == []
    assert info["image_size"] == [16, 16] and info["class_names"] == ["camera", "fundus"]
    assert info["normalization"]["normalization"] == "dtype"
    assert info["training_data"]["files"] == 16
    assert (model / "generator" / "config.json").is_file()
    assert list((model / "generator").glob("*.safetensors"))

    # the folder holds the EMA generator of the run
    saved = WGANGenerator.from_pretrained(model / "generator", use_safetensors=True)
    for key, value in result.models["generator"].state_dict().items():
        torch.testing.assert_close(saved.state_dict()[key], value.cpu())

    generator = load_generator(model, device="cpu")
    assert generator.kind == "wgan-gp"
    out = tmp_path / "synthetic"
    write_generated_dataset(generator, out, n=3, seed=5, batch_size=2, progress=False, log=lambda _: None)
    rows = list(csv.DictReader((out / MANIFEST).open()))
    assert len(rows) == 6 and {r["label"] for r in rows} == {"camera", "fundus"}
    assert [int(r["seed"]) for r in rows] == list(range(5, 11))
    card = json.loads((out / "dataset_card.json").read_text())
    assert card["model"]["kind"] == "wgan-gp"
    first = read_image(out / rows[0]["file"])
    assert first.array.shape == (1, 16, 16) and first.array.dtype == np.uint8
    # each sample depends on its own seed and label only: another batch size gives the same files
    again = tmp_path / "again"
    write_generated_dataset(generator, again, n=3, seed=5, batch_size=4, progress=False, log=lambda _: None)
    for row in rows:
        np.testing.assert_array_equal(
            read_image(out / row["file"]).array, read_image(again / row["file"]).array
        )


def test_3d_run_unconditional_keeps_the_volume_geometry(volumes_3d, tmp_path):
    run = tmp_path / "run"
    config = _config(max_steps=2, data=DataConfig(labels="none"))
    config = config.replace(model=TINY_MODEL | {"levels": 1})
    train_gan(volumes_3d, run, config, progress=False, log=lambda _: None)
    info = json.loads((run / "model" / "medfusion.json").read_text())
    assert info["spatial_dims"] == 3 and info["image_size"] == [8, 8, 8] and info["class_names"] == []
    assert info["spacing"] == [2.0, 2.0, 2.0]
    assert info["normalization"]["normalization"] == "dataset" and info["normalization"]["bounds"]

    out = tmp_path / "synthetic"
    write_generated_dataset(load_generator(run / "model", device="cpu"), out, n=2, progress=False, log=print)
    rows = list(csv.DictReader((out / MANIFEST).open()))
    assert [r["label"] for r in rows] == ["none", "none"]
    volume = read_image(out / rows[0]["file"])
    assert volume.array.shape == (1, 8, 8, 8)
    np.testing.assert_allclose(volume.spacing, (2.0, 2.0, 2.0))


def test_an_interrupted_and_resumed_run_equals_an_uninterrupted_one(crops_2d, tmp_path):
    config = _config(max_steps=6)
    straight = train_gan(crops_2d, tmp_path / "a", config, progress=False, log=lambda _: None)

    class Stop(Exception):
        pass

    def stop_at_3(step, scalars):
        if step == 3:
            raise Stop

    with pytest.raises(Stop):  # killed at step 3: the last checkpoint is step 2
        train_gan(crops_2d, tmp_path / "b", config, progress=False, log=lambda _: None, callback=stop_at_3)
    resumed = train_gan(crops_2d, tmp_path / "b", config, resume=True, progress=False, log=lambda _: None)
    assert resumed.step == 6
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    # the noise generator's state travels in the checkpoints
    noise_a = load_state(tmp_path / "a" / "checkpoints" / "step_000006" / "task")["noise"]
    noise_b = load_state(tmp_path / "b" / "checkpoints" / "step_000006" / "task")["noise"]
    assert torch.equal(noise_a, noise_b)
    # a run that restarts its noise from the seed diverges: the saved state matters
    first = load_state(tmp_path / "a" / "checkpoints" / "step_000002" / "task")["noise"]
    assert not torch.equal(first, noise_a)


def test_stylegan2_with_path_length_resumes_exactly(crops_2d, tmp_path):
    """The running mean of the path lengths travels in the checkpoints like the noise state."""
    model = {"channel_base": 64, "channel_max": 8, "z_dim": 8, "w_dim": 8}
    gan = {"pl_weight": 2.0, "pl_interval": 1, "r1_interval": 2}
    config = _config(max_steps=4).replace(arch="stylegan2", model=model, gan=gan)
    straight = train_gan(crops_2d, tmp_path / "a", config, progress=False, log=lambda _: None)

    class Stop(Exception):
        pass

    def stop_at_3(step, scalars):
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        train_gan(crops_2d, tmp_path / "b", config, progress=False, log=lambda _: None, callback=stop_at_3)
    resumed = train_gan(crops_2d, tmp_path / "b", config, resume=True, progress=False, log=lambda _: None)
    a, b = _weights(straight), _weights(resumed)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    states = [load_state(tmp_path / run / "checkpoints" / "step_000004" / "task") for run in ("a", "b")]
    assert float(states[0]["regularization"]["pl_mean"]) > 0
    assert "pl_penalty" in (tmp_path / "a" / "logs" / "metrics.jsonl").read_text()  # logged with the losses
    torch.testing.assert_close(states[0]["regularization"]["pl_mean"], states[1]["regularization"]["pl_mean"])


# --- the task -----------------------------------------------------------------------------------


def _tiny_task(critic_steps: int = 2) -> GANTask:
    torch.manual_seed(0)
    arch = medfusion.baselines.with_options(WGAN_GP, {"critic_steps": critic_steps})
    generator, critic = arch.build(2, 1, (16, 16), 2, **TINY_MODEL)
    return GANTask(arch, generator, critic, num_classes=2, seed=0)


def test_each_loss_updates_only_its_own_network():
    task = _tiny_task(critic_steps=2)
    models = task.modules()
    batch = {"image": torch.rand(4, 1, 16, 16) * 2 - 1, "label": torch.tensor([0, 1, 0, 1])}
    steps = list(task.training_step(models, batch, step=1))  # the second of two critic steps
    assert [name for name, _, _ in steps] == ["discriminator"]
    assert all(p.grad is None for m in models.values() for p in m.parameters())  # nothing backed yet

    losses = task.training_step(models, batch, step=2)  # the first of the next two: and the generator
    name, d_loss, terms = next(losses)
    assert name == "discriminator" and set(terms) == {"wasserstein", "gradient_penalty"}
    d_loss.backward()
    assert all(p.grad is None for p in models["generator"].parameters())  # fakes were detached
    assert all(p.grad is not None for p in models["discriminator"].parameters())
    for p in models["discriminator"].parameters():
        p.grad = None
    name, g_loss, _ = next(losses)
    assert name == "generator"
    g_loss.backward()
    assert all(p.grad is None for p in models["discriminator"].parameters())  # it was frozen
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in models["generator"].parameters())
    assert all(p.requires_grad for p in models["discriminator"].parameters())  # and is trainable again
    assert list(losses) == []


def test_the_noise_state_restores_the_same_draws():
    task = _tiny_task()
    state = task.state_dict()
    first = task.draw_noise(3, torch.device("cpu"))
    task.load_state_dict({"noise": state["noise"].clone()})
    torch.testing.assert_close(task.draw_noise(3, torch.device("cpu")), first)
    assert not torch.equal(task.draw_noise(3, torch.device("cpu")), first)


def test_each_process_draws_its_own_slice_of_one_noise_stream():
    whole = _tiny_task().draw_noise(4, torch.device("cpu"))
    parts = []
    for rank in (0, 1):
        task = _tiny_task()
        task.rank, task.world = rank, 2
        parts.append(task.draw_noise(2, torch.device("cpu")))
    torch.testing.assert_close(torch.cat(parts), whole)


# --- bad input ----------------------------------------------------------------------------------


class _Only2D(GANArchitecture):
    name = "only2d"
    spatial_dims = (2,)


ONLY_2D = _Only2D()


def test_unknown_arch_is_refused_before_reading_data(tmp_path):
    with pytest.raises(ValueError, match=r"arch 'bigan' is not a known GAN architecture; known: wgan-gp"):
        prepare_gan_run(tmp_path / "absent", tmp_path / "run", _config(arch="bigan"), progress=False)


def test_an_arch_without_3d_refuses_volumes(volumes_3d, tmp_path, monkeypatch):
    monkeypatch.setitem(arch_module.ARCHITECTURES, "only2d", f"{__name__}:ONLY_2D")
    config = _config(arch="only2d", gan={}, data=DataConfig(labels="none"))
    with pytest.raises(
        ValueError, match=r"the images are 3D; the only2d architecture \(arch\) supports 2D only"
    ):
        prepare_gan_run(volumes_3d, tmp_path / "run", config, progress=False)


def test_a_size_the_generator_cannot_make_is_refused_before_training(crops_2d, tmp_path):
    config = _config().replace(model=TINY_MODEL | {"levels": 5})  # 16 is no multiple of 32
    with pytest.raises(ValueError, match=r"image_size \[16, 16\] cannot be made with levels=5"):
        train_gan(crops_2d, tmp_path / "run", config, progress=False, log=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_unknown_options_are_named(crops_2d, tmp_path):
    with pytest.raises(ValueError, match=r"model: unknown option\(s\) \['depth'\] for wgan-gp"):
        prepare_gan_run(crops_2d, tmp_path / "run", _config().replace(model={"depth": 3}), progress=False)
    with pytest.raises(ValueError, match=r"gan: unknown option\(s\) \['r1_gamma'\] for the wgan-gp"):
        prepare_gan_run(crops_2d, tmp_path / "run", _config(gan={"r1_gamma": 1.0}), progress=False)
    with pytest.raises(ValueError, match=r"gan\.critic_steps must be an integer >= 1; got 0"):
        prepare_gan_run(crops_2d, tmp_path / "run", _config(gan={"critic_steps": 0}), progress=False)


def test_a_folder_whose_generator_does_not_fit_its_info_is_refused(crops_2d, tmp_path):
    run = tmp_path / "run"
    train_gan(crops_2d, run, _config(max_steps=2), progress=False, log=lambda _: None)
    info_file = run / "model" / "medfusion.json"
    info = json.loads(info_file.read_text())
    info_file.write_text(json.dumps(info | {"image_size": [32, 32]}))
    with pytest.raises(ModelFolderError, match=r"makes images of shape \[1, 16, 16\], not the \[1, 32, 32\]"):
        load_gan_generator(run / "model")
    info_file.write_text(json.dumps(info | {"class_names": ["a", "b", "c"]}))
    with pytest.raises(ModelFolderError, match="the generator has 2 class"):
        load_gan_generator(run / "model")
    info_file.write_text(json.dumps(info))
    config = run / "model" / "generator" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"activation": "os.system"}))
    with pytest.raises(ModelFolderError, match=r"unknown key\(s\) \['activation'\]"):
        load_gan_generator(run / "model")
