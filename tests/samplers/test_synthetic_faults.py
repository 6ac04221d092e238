"""``medfusion sample`` under faults and hostile folders: a write that fails (or silently loses
data, as SimpleITK's writer does on a full disk) leaves no file under a final name and an
incomplete card; a rerun redoes exactly the missing or damaged files; no name leads outside
``--out``; a real full file system (a small tmpfs, where this machine lets us mount one)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from medfusion.cli import main
from medfusion.data import writers
from medfusion.data.writers import written_file_problem
from medfusion.samplers import CARD, MANIFEST, README, save_model_folder, write_synthetic_dataset
from medfusion.samplers.schedulers import SamplerConfig
from tests.samplers._sampler_helpers import folder_unet, folder_vae, model_info, scheduler_config

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
SAMPLER = SamplerConfig(steps=2)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(3)
    root = tmp_path_factory.mktemp("models")
    return {
        dims: save_model_folder(
            root / f"{dims}d", folder_unet(dims), folder_vae(dims), scheduler_config(), model_info(dims)
        )
        for dims in (2, 3)
    }


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory):
    """A clean run of each model, ``--n 3``: the bytes every other run must reproduce."""
    root = tmp_path_factory.mktemp("reference")
    for dims, model in models.items():
        write_synthetic_dataset(model, root / f"{dims}d", n=3, sampler=SAMPLER, batch_size=2, progress=False)
    return root


def sample_files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.name not in (CARD, MANIFEST, README)
    }


def run(model: Path, out: Path, *args) -> int:
    return main(
        ["sample", str(model), "--out", str(out), "--steps", "2", "--batch-size", "2", "--quiet", *args]
    )


def card(out: Path) -> dict:
    return json.loads((out / CARD).read_text())


def everything_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


@pytest.mark.parametrize("dims", [2, 3])
def test_resume_rewrites_exactly_the_damaged_files(models, reference, tmp_path, dims):
    out = tmp_path / "out"
    shutil.copytree(reference / f"{dims}d", out)
    names = sorted(sample_files(out))
    cut, empty, wrong = names[0], names[2], names[4]
    data = (out / cut).read_bytes()
    (out / cut).write_bytes(data[: len(data) // 2])  # killed mid-write by an old version, or damaged
    (out / empty).write_bytes(b"")  # what SimpleITK left on a full disk
    (out / wrong).unlink()
    writers.write_image(out / wrong, np.zeros((1,) + (4,) * dims, np.uint16))  # whole, other shape
    messages: list[str] = []

    result = write_synthetic_dataset(
        models[dims], out, n=3, sampler=SAMPLER, batch_size=2, progress=False, log=messages.append
    )

    assert (result.written, result.kept) == (3, len(names) - 3)
    assert "3 file(s) of an earlier run were not whole" in "\n".join(messages)
    assert sample_files(out) == sample_files(reference / f"{dims}d")  # bitwise what a clean run wrote
    assert card(out)["complete"] is True


def test_a_write_that_silently_loses_data_is_not_kept(models, reference, tmp_path, monkeypatch, capsys):
    real, calls = writers._write_png, []

    def full_disk_after_four(tmp: Path, image, array) -> None:
        calls.append(tmp)
        if len(calls) > 4:
            tmp.write_bytes(b"")  # no error, no data: SimpleITK on a full disk
        else:
            real(tmp, image, array)

    monkeypatch.setattr(writers, "_write_png", full_disk_after_four)
    out = tmp_path / "out"
    assert run(models[2], out, "--n", "3") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"medfusion: error: {out}")
    assert "cannot write: the file is empty after writing" in err[0]
    kept = sample_files(out)
    assert len(kept) == 4 and all(kept.values())  # nothing empty under a final name
    assert all(written_file_problem(out / name, (1, 16, 8), "uint16") is None for name in kept)
    assert card(out)["complete"] is False and not (out / MANIFEST).exists()
    assert not [p for p in out.rglob(".*") if p.name != ".medfusion.lock"]  # no temporary left

    monkeypatch.setattr(writers, "_write_png", real)  # space freed: the rerun finishes the job
    assert run(models[2], out, "--n", "3") == 0
    assert "wrote 2 new sample(s) (4 kept from before)" in capsys.readouterr().out
    assert sample_files(out) == sample_files(reference / "2d")
    assert card(out)["complete"] is True


def test_a_class_folder_leading_outside_is_refused_before_sampling(models, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    assert run(models[2], out, "--n", "1") == 0
    shutil.rmtree(out / "a")
    (out / "a").symlink_to(elsewhere, target_is_directory=True)  # OUT/a/000002.png would land elsewhere
    before = everything_under(out)
    capsys.readouterr()
    assert run(models[2], out, "--n", "2") == 1
    err = capsys.readouterr().err
    assert f"{out}: refusing to write 'a/000000.png': it leads outside the folder" in err
    assert list(elsewhere.iterdir()) == []
    assert everything_under(out) == before


@pytest.mark.parametrize("name", ["../../ESCAPED_REL", "/abs/x", "", "..", "none", "a/b"])
def test_class_names_from_a_model_folder_never_become_paths(models, tmp_path, name, capsys):
    model = tmp_path / "model"
    shutil.copytree(models[2], model)
    info = json.loads((model / "medfusion.json").read_text())
    info["class_names"] = [name, "b"]
    (model / "medfusion.json").write_text(json.dumps(info))
    out = tmp_path / "deep" / "er" / "out"
    before = everything_under(tmp_path)
    assert run(model, out, "--n", "2") == 1
    assert "medfusion.json" in capsys.readouterr().err
    assert everything_under(tmp_path) == before  # nothing written anywhere


def test_the_seed_range_is_named(models, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(models[2], tmp_path / "out", "--n", "1", "--seed", "99999999999999999999")
    assert "argument --seed: must be an integer in 0..18446744073709551615" in capsys.readouterr().err
    with pytest.raises(ValueError, match="passes the largest seed"):
        write_synthetic_dataset(models[2], tmp_path / "out", n=2, seed=2**64 - 2, progress=False)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# a real full file system: a tmpfs of a few pages (mounting needs root; skipped elsewhere)


@pytest.fixture
def small_tmpfs(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(mount)], capture_output=True, check=False
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("dims", [2, 3])
def test_full_disk_then_resume(models, reference, small_tmpfs, dims, capsys):
    out = small_tmpfs / "out"
    n = 12  # 24 files of at least one 4 KiB page each: more than 40 KiB holds
    assert run(models[dims], out, "--n", str(n)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"medfusion: error: {out}"), err
    assert "cannot write" in err[0] and ("disk full" in err[0] or "No space left" in err[0])
    kept = sample_files(out)
    shape = (1, *model_info(dims).image_size)
    dtype = writers.intensity_mapping(".png" if dims == 2 else ".nii.gz", "uint16", {}).dtype
    assert all(written_file_problem(out / name, shape, dtype) is None for name in kept)
    assert card(out)["complete"] is False

    subprocess.run(["mount", "-o", "remount,size=4m", str(small_tmpfs)], check=True)
    assert run(models[dims], out, "--n", str(n)) == 0
    assert f"({len(kept)} kept from before)" in capsys.readouterr().out
    assert card(out)["complete"] is True
    assert len(sample_files(out)) == 2 * n
    expected = sample_files(reference / f"{dims}d")  # the first 6 samples, as a clean run wrote them
    assert {name: data for name, data in sample_files(out).items() if name in expected} == expected


def test_steps_beyond_the_schedule_are_refused_before_anything_is_written(models, tmp_path, capsys):
    total = json.loads((models[2] / "scheduler" / "scheduler_config.json").read_text())["num_train_timesteps"]
    out = tmp_path / "out"
    argv = ["sample", str(models[2]), "--out", str(out), "--n", "1", "--sampler", "ddim"]
    assert main([*argv, "--steps", str(total + 1), "--quiet"]) == 1
    assert f"steps={total + 1} does not fit the model's noise schedule of {total} timesteps" in (
        capsys.readouterr().err
    )
    assert not out.exists()  # no card, no folder


def test_a_folder_in_use_by_another_sampling_run_is_refused(models, reference, tmp_path, capsys, lock_holder):
    out = tmp_path / "out"
    shutil.copytree(reference / "2d", out)
    holder = lock_holder(out, "medfusion sample")
    before = sample_files(out), (out / CARD).read_bytes()
    assert run(models[2], out, "--n", "4") == 1
    err = capsys.readouterr().err
    assert f"{out} is in use by another medfusion run: pid {holder.pid}" in err
    assert (sample_files(out), (out / CARD).read_bytes()) == before  # nothing touched
    holder.kill()
    holder.wait()
    assert run(models[2], out, "--n", "4") == 0  # the holder is gone (kill -9): taken over
    assert card(out)["complete"] is True and len(sample_files(out)) == 8
