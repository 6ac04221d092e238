"""`medfusion train` end to end: tiny VAE + U-Net on real 2D crops and 3D volumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medfusion.autoencoders.vae import VAE
from medfusion.cli import main
from medfusion.data import read_image
from medfusion.samplers import SamplerConfig, load_model_folder, sample_latents, write_synthetic_dataset

TINY = [
    "--set",
    "model.block_out_channels=[8, 16]",
    "--set",
    "model.layers_per_block=1",
    "--set",
    "model.norm_num_groups=4",
    "--set",
    "model.attention_levels=[false, true]",
    "--set",
    "model.num_head_channels=8",
    "--set",
    "train.num_workers=0",
    "--set",
    "train.warmup_steps=1",
    "--set",
    "train.checkpoint_every=2",
    "--set",
    "train.preview_every=2",
    "--set",
    "train.log_every=1",
    "--set",
    "preview.per_class=2",
    "--set",
    "preview.steps=2",
    "--batch-size",
    "4",
    "--quiet",
]


def _save_vae(folder: Path, spatial_dims: int, in_channels: int = 1, data: dict | None = None) -> Path:
    """A tiny untrained VAE (downsampling 2, 4 latent channels) saved as ``folder/vae``."""
    torch.manual_seed(0)
    vae = VAE(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        block_out_channels=(4, 8),
        layers_per_block=1,
        norm_num_groups=4,
    )
    vae.set_scaling_factor(0.5)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    if data is not None:  # the VAE run's config.yaml, whose data section `train` reuses
        (folder / "config.yaml").write_text(yaml.safe_dump({"data": data}))
    return folder / "vae"


def _train(data: Path, vae: Path, run: Path, *extra: str) -> int:
    return main(["train", "--data", str(data), "--vae", str(vae), "--out", str(run), *TINY, *extra])


def test_train_2d_writes_the_model_folder_and_class_conditional_grids(crops_2d, tmp_path, capsys):
    vae = _save_vae(tmp_path / "vae_run", 2)
    run = tmp_path / "run"
    assert _train(crops_2d, vae, run, "--max-steps", "4") == 0
    out = capsys.readouterr().out
    assert "classes: fundus, histology" in out and "latents (4, 8, 8)" in out
    assert sorted(p.name for p in (run / "diffusion" / "checkpoints").iterdir()) == [
        "step_000002",
        "step_000004",
    ]
    grids = sorted((run / "diffusion" / "logs" / "images").glob("unet_step_*.png"))
    assert [g.name for g in grids] == ["unet_step_0000002.png", "unet_step_0000004.png"]
    records = [
        json.loads(line) for line in (run / "diffusion" / "logs" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(0 < r["unet/loss"] < 10 for r in records)

    model = load_model_folder(run / "model")
    assert model.info.class_names == ("fundus", "histology")
    assert model.info.image_size == (16, 16) and model.info.latent_shape == (4, 8, 8)
    assert model.info.source_dtype == "uint8" and model.info.scaling_factor == pytest.approx(0.5)
    assert model.unet.num_classes == 2 and model.unet.config.in_channels == 4
    assert model.scheduler.config.prediction_type == "epsilon"
    saved = yaml.safe_load((run / "diffusion" / "config.yaml").read_text())
    assert saved["model"]["num_classes"] == 2 and saved["train"]["max_steps"] == 4
    # the folder samples on its own: latents -> images of the training size
    z = sample_latents(
        model.unet, model.scheduler, (2, 4, 8, 8), labels=torch.tensor([0, 1]), steps=2, guidance_scale=2.0
    )
    assert model.vae.decode_latents(z).shape == (2, 1, 16, 16)

    # --resume continues from the run's own config and last checkpoint
    capsys.readouterr()
    assert _train(crops_2d, vae, run, "--resume", "--max-steps", "6") == 0
    err = capsys.readouterr().err
    assert "resumed from" in err and "step_000004" in err
    assert (run / "diffusion" / "checkpoints" / "step_000006").is_dir()


def test_cached_latents_are_built_once_and_rebuilt_for_another_vae(crops_2d, tmp_path):
    vae = _save_vae(tmp_path / "vae_run", 2)
    run = tmp_path / "run"
    assert _train(crops_2d, vae, run, "--max-steps", "2", "--cache-latents") == 0
    cache = run / "diffusion" / "latents"
    meta = json.loads((cache / "latents.json").read_text())
    assert meta["items"] == 20 and meta["latent_shape"] == [4, 8, 8]
    written = (cache / "latents.safetensors").stat().st_mtime_ns
    # a resumed run with the same VAE and data reuses the cache
    assert _train(crops_2d, vae, run, "--resume", "--max-steps", "4", "--cache-latents") == 0
    assert (cache / "latents.safetensors").stat().st_mtime_ns == written
    # another VAE means other latents: the cache is rebuilt
    other = VAE.from_pretrained(vae)
    with torch.no_grad():
        other.encoder.blocks[0].weight.mul_(2.0)
    other.save_pretrained(vae, safe_serialization=True)
    assert _train(crops_2d, vae, tmp_path / "run2", "--max-steps", "2", "--cache-latents") == 0
    rebuilt = json.loads((tmp_path / "run2" / "diffusion" / "latents" / "latents.json").read_text())
    assert rebuilt["fingerprint"] != meta["fingerprint"]


def test_train_3d_volumes(crops_3d, tmp_path):
    vae = _save_vae(tmp_path / "vae_run", 3)
    run = tmp_path / "run3d"
    assert _train(crops_3d, vae, run, "--max-steps", "2", "--set", "train.channels_last=true") == 0
    model = load_model_folder(run / "model")
    assert model.unet.config.spatial_dims == 3 and model.info.image_size == (16, 16, 16)
    assert model.info.spacing == pytest.approx((2.0, 2.0, 2.0))
    assert model.info.class_names == ("anatomical", "epi")
    # the normalisation was fitted on the training files, so samples come back in their units
    record = model.info.normalization
    assert record["normalization"] == "dataset" and len(record["bounds"]) == 1
    values = np.concatenate(
        [np.asarray(read_image(f).array).ravel() for f in sorted(crops_3d.rglob("*.nii.gz"))]
    )
    np.testing.assert_allclose(record["bounds"][0], np.percentile(values, [0.5, 99.5]), rtol=1e-4)
    assert model.info.training_data["counts"] == {"anatomical": 6, "epi": 6}
    assert model.info.training_data["dtype"] == "float32"
    out = tmp_path / "synthetic"
    write_synthetic_dataset(run / "model", out, n=1, sampler=SamplerConfig("ddim", steps=2), progress=False)
    for path in sorted(out.glob("*/*.nii.gz")):
        image = read_image(path)
        assert image.array.dtype == np.float32 and image.spacing == pytest.approx((2.0, 2.0, 2.0))
        low, high = record["bounds"][0]
        assert low - 1e-3 <= image.array.min() and image.array.max() <= high + 1e-3
    card = json.loads((out / "dataset_card.json").read_text())
    assert card["files"]["units"].startswith("the training data's units") and card["synthetic"] is True
    assert "not acquired from any person" in (out / "README.md").read_text()


def test_data_settings_default_to_the_vae_run(crops_2d, tmp_path, capsys):
    vae = _save_vae(tmp_path / "vae_run", 2, data={"crop": [8, 8], "flip_axes": [1]})
    assert _train(crops_2d, vae, tmp_path / "run", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "data settings from the VAE run" in out
    resolved = yaml.safe_load(out.split("# data:")[0].split("resolved config\n", 1)[1])
    assert resolved["data"]["crop"] == [8, 8] and resolved["data"]["flip_axes"] == [1]
    assert "latents (4, 4, 4)" in out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("vae_setup", "extra", "message"),
    [
        ("missing", [], "no trained VAE here"),
        ("rgb", [], "the images are 2D with 1 channel(s), but the VAE"),
        ("grey", ["--set", "model.num_classes=5"], "model.num_classes is 5 but the data give 2"),
        ("grey", ["--set", "diffusion.prediction_type=x0"], "diffusion.prediction_type must be one of"),
        (
            "grey",
            ["--set", "model.block_out_channels=[8, 8, 8, 8, 8]", "--set", "model.attention_levels=null"],
            "must be divisible by 16",
        ),
        ("grey", ["--set", "train.compile_mode=fastest"], "train.compile_mode must be one of"),
    ],
)
def test_bad_input_is_a_clear_error(crops_2d, tmp_path, capsys, vae_setup, extra, message):
    if vae_setup == "missing":
        vae = tmp_path / "nowhere" / "vae"
    else:
        vae = _save_vae(tmp_path / "vae_run", 2, in_channels=3 if vae_setup == "rgb" else 1)
    assert _train(crops_2d, vae, tmp_path / "run", "--max-steps", "1", *extra) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "model").exists()


def test_two_processes_share_one_latent_cache(crops_2d, tmp_path):
    """DDP on CPU (gloo) under torchrun, as `accelerate launch -m medfusion train` on GPUs: the main
    process builds the cache, the other waits for it, both train one model."""
    import os
    import subprocess
    import sys

    vae = _save_vae(tmp_path / "vae_run", 2)
    run = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "medfusion", "train", "--data", str(crops_2d), "--vae", str(vae), "--out", str(run)]
    command += [*TINY, "--max-steps", "2", "--cache-latents"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    trainer = json.loads((run / "diffusion" / "checkpoints" / "step_000002" / "trainer.json").read_text())
    assert trainer["processes"] == 2
    assert done.stdout.count("saved the model folder") == 1
    assert load_model_folder(run / "model").unet.num_classes == 2
