"""`medfusion train-vae` end to end on tiny folders of real 2D crops and 3D volumes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from medfusion.autoencoders.vae import VAE
from medfusion.cli import main

TINY = [
    "--set",
    "model.block_out_channels=[4, 8]",
    "--set",
    "model.layers_per_block=1",
    "--set",
    "model.norm_num_groups=4",
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
    "--batch-size",
    "4",
    "--quiet",
]


def test_dry_run_prints_the_resolved_config_and_writes_nothing(crops_2d, tmp_path, capsys):
    assert (
        main(["train-vae", "--data", str(crops_2d), "--out", str(tmp_path / "run"), "--dry-run", *TINY]) == 0
    )
    out = capsys.readouterr().out
    resolved = yaml.safe_load(out.split("# data:")[0])
    assert resolved["model"]["spatial_dims"] == 2 and resolved["model"]["in_channels"] == 1
    assert resolved["model"]["block_out_channels"] == [4, 8]
    assert "latents (4, 8, 8)" in out
    assert not (tmp_path / "run").exists()


def test_train_vae_2d_writes_model_checkpoints_logs_and_eval(crops_2d, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train-vae", "--data", str(crops_2d), "--out", str(run), "--max-steps", "4", *TINY]) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_000002",
        "step_000004",
    ]
    assert (run / "logs" / "metrics.jsonl").is_file() and list((run / "logs" / "images").glob("*.png"))
    report = json.loads((run / "vae_eval.json").read_text())
    assert report["count"] == 2  # 10% of each class of 10 held out
    assert all(np.isfinite(report[k]) for k in ("psnr", "ssim", "ms_ssim", "scaling_factor"))
    vae = VAE.from_pretrained(run / "vae")
    assert vae.scaling_factor == pytest.approx(report["scaling_factor"])
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 4
    assert not [p for p in (run / "vae").iterdir() if p.suffix in (".bin", ".pt", ".pkl")]

    # without --resume the run is refused before anything of it is replaced
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["train-vae", "--data", str(crops_2d), "--out", str(run), "--max-steps", "3", *TINY]) == 1
    assert "already holds checkpoints: pass --resume" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before

    # --resume continues the same run from its own config (here: to a higher step count)
    capsys.readouterr()
    assert (
        main(["train-vae", "--data", str(crops_2d), "--out", str(run), "--resume", "--max-steps", "6", *TINY])
        == 0
    )
    err = capsys.readouterr().err
    assert "resumed from" in err and "step_000004" in err
    assert (run / "checkpoints" / "step_000006").is_dir()


def test_train_vae_3d_volumes(crops_3d, tmp_path):
    run = tmp_path / "run3d"
    assert main(["train-vae", "--data", str(crops_3d), "--out", str(run), "--max-steps", "2", *TINY]) == 0
    vae = VAE.from_pretrained(run / "vae")
    assert vae.config.spatial_dims == 3
    with torch.no_grad():
        assert vae(torch.zeros(1, 1, 16, 16, 16)).reconstruction.shape == (1, 1, 16, 16, 16)
    assert json.loads((run / "vae_eval.json").read_text())["count"] == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "train.max_steps"], "--set expects KEY=VALUE"),
        (["--set", "train.nonsense=1"], "unknown key(s) ['nonsense']"),
        (["--set", "model.spatial_dims=3"], "model.spatial_dims is 3 but the data give 2"),
        (["--set", "model.block_out_channels=[4, 8, 8, 8, 8, 8]"], "1 to 5 positive widths"),
        (["--set", "data.crop=[12, 12]", "--set", "model.block_out_channels=[4, 8, 8, 8]"], "multiples of 8"),
        (["--set", "train.batch_size=64"], "fewer than one global batch"),
    ],
)
def test_bad_settings_are_clear_errors(crops_2d, tmp_path, capsys, extra, message):
    args = [
        "train-vae",
        "--data",
        str(crops_2d),
        "--out",
        str(tmp_path / "run"),
        "--max-steps",
        "2",
        *TINY,
        *extra,
    ]
    assert main(args) == 1
    assert message in capsys.readouterr().err


def test_missing_data_folder(tmp_path, capsys):
    assert main(["train-vae", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "run")]) == 1
    assert "nope" in capsys.readouterr().err


def test_config_file_is_read_strictly(crops_2d, tmp_path, capsys):
    config = tmp_path / "vae.yaml"
    config.write_text("model:\n  latent_channel: 8\n")
    assert (
        main(["train-vae", "--data", str(crops_2d), "--out", str(tmp_path / "run"), "--config", str(config)])
        == 1
    )
    err = capsys.readouterr().err
    assert str(config) in err and "latent_channel" in err


def test_two_processes_train_one_model(crops_2d, tmp_path):
    """DDP on CPU (gloo) under torchrun: what `accelerate launch -m medfusion train-vae` does on GPUs."""
    import os
    import subprocess
    import sys

    run = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "medfusion", "train-vae", "--data", str(crops_2d), "--out", str(run)]
    command += ["--max-steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*command, *TINY], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    trainer = json.loads((run / "checkpoints" / "step_000002" / "trainer.json").read_text())
    assert trainer["processes"] == 2
    assert done.stdout.count("saved ") == 1  # the main process alone saves and evaluates
    assert VAE.from_pretrained(run / "vae").config.in_channels == 1


def test_a_run_folder_in_use_is_refused_and_left_alone(crops_2d, tmp_path, capsys, lock_holder):
    """The first of two `train-vae --out RUN` keeps RUN; the second stops before writing anything."""
    run = tmp_path / "run"
    holder = lock_holder(run, "medfusion train-vae")
    before = sorted(p.name for p in run.iterdir())
    args = ["train-vae", "--data", str(crops_2d), "--out", str(run), "--max-steps", "1", *TINY]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"{run} is in use by another medfusion run: pid {holder.pid} on host " in err
    assert "choose another folder" in err
    assert sorted(p.name for p in run.iterdir()) == before == [".medfusion.lock"]


def test_every_file_of_a_run_follows_the_umask(crops_2d, tmp_path):
    """One file mode policy: weights (safetensors' writer makes them owner-only) like the rest.
    The files of RUN/vae rely on utils.atomic_dir applying the umask to the files it publishes."""
    import os

    run = tmp_path / "run"
    old = os.umask(0o027)
    try:
        assert main(["train-vae", "--data", str(crops_2d), "--out", str(run), "--max-steps", "2", *TINY]) == 0
    finally:
        os.umask(old)
    modes = {p.relative_to(run).as_posix(): p.stat().st_mode & 0o777 for p in run.rglob("*")}
    assert "checkpoints/step_000002/model_vae.safetensors" in modes and "vae/config.json" in modes
    assert any(name.startswith("logs/") for name in modes)
    wrong = {
        name: oct(mode) for name, mode in modes.items() if mode != (0o750 if (run / name).is_dir() else 0o640)
    }
    assert wrong == {}
    assert not (run / ".medfusion.lock").exists()  # released with the run


def test_a_full_disk_when_saving_the_vae_names_the_folder(crops_2d, tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(VAE, "save_pretrained", full)
    run = tmp_path / "run"
    assert main(["train-vae", "--data", str(crops_2d), "--out", str(run), "--max-steps", "2", *TINY]) == 1
    err = capsys.readouterr().err
    assert f"medfusion: error: {run / 'vae'}: cannot write: " in err and "Traceback" not in err
    assert not (run / "vae").exists() and not [p for p in run.iterdir() if p.name.startswith(".vae")]
    assert (run / "checkpoints" / "step_000002" / "checkpoint.json").is_file()  # the run can be resumed
