"""``medfusion sample`` / ``write_synthetic_dataset``: the synthetic dataset folder (files per class,
manifest, dataset card) in 2D, 3D and unconditionally; file contents reproducible from the
manifest; class selection; resuming an interrupted run without rewriting a file; growing a folder;
two processes giving the single-process files; and refusal of bad input before anything is
written."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import medfusion.samplers.diffusion_generator as diffusion_generator
import medfusion.samplers.files as files_module
import medfusion.samplers.synthetic as synthetic
from medfusion.cli import main
from medfusion.data.writers import intensity_mapping
from medfusion.samplers import (
    CARD,
    MANIFEST,
    README,
    MedfusionPipeline,
    SamplerConfig,
    model_hash,
    save_model_folder,
    write_synthetic_dataset,
)
from tests.samplers._sampler_helpers import folder_unet, folder_vae, model_info, scheduler_config

STEPS = 2
SAMPLER = SamplerConfig(steps=STEPS)  # what the command makes of --steps 2
COLUMNS = ["file", "label", "seed", "sampler", "steps", "guidance", "guidance_rescale", "eta"]
# diffusers' sigma schedulers call np.array(tensor, copy=False) (numpy 2 deprecation): not ours
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny model folders: conditional 2D (uint16 and uint8 sources) and 3D, unconditional 2D."""
    torch.manual_seed(2)
    root = tmp_path_factory.mktemp("models")
    uint8 = dataclasses.replace(model_info(2), source_dtype="uint8")
    uncond = model_info(2, class_names=())
    return {
        "2d": save_model_folder(
            root / "2d", folder_unet(2), folder_vae(2), scheduler_config(), model_info(2)
        ),
        "uint8": save_model_folder(root / "uint8", folder_unet(2), folder_vae(2), scheduler_config(), uint8),
        "3d": save_model_folder(
            root / "3d", folder_unet(3), folder_vae(3), scheduler_config(), model_info(3)
        ),
        "uncond": save_model_folder(
            root / "uncond", folder_unet(2, num_classes=None), folder_vae(2), scheduler_config(), uncond
        ),
    }


def sample(model: Path, out: Path, *args) -> int:
    """``medfusion sample MODEL --out OUT --steps 2 --quiet ARGS``."""
    return main(["sample", str(model), "--out", str(out), "--steps", str(STEPS), "--quiet", *map(str, args)])


@pytest.fixture(scope="module")
def complete_2d(models, tmp_path_factory):
    """A complete dataset folder: ``--n 3 --batch-size 4`` from the uint16 2D model (read only!)."""
    out = tmp_path_factory.mktemp("complete") / "synthetic"
    assert sample(models["2d"], out, "--n", 3, "--batch-size", 4) == 0
    return out


def files_of(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def samples_of(root: Path) -> set[str]:
    return files_of(root) - {MANIFEST, CARD, README}


def snapshot(root: Path) -> dict | None:
    """Everything under ``root`` (files and folders) with size, inode and mtime; None: no ``root``."""
    if not root.exists():
        return None
    entries = [root, *root.rglob("*")]
    return {
        p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_ino, p.stat().st_mtime_ns)
        for p in entries
    }


def read_manifest(root: Path) -> list[dict]:
    with (root / MANIFEST).open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        return list(reader)


def read_card(root: Path) -> dict:
    return json.loads((root / CARD).read_text())


def read_array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def hidden(root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in root.rglob(".*")]


def assert_same_samples(a: Path, b: Path) -> None:
    """The same sample files and manifest, byte for byte."""
    assert files_of(a) == files_of(b)
    for name in sorted(files_of(a) - {CARD, README}):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def expected_images(model: Path, rows: list[dict], batch_size: int) -> np.ndarray:
    """The pipeline's images for the manifest's (label, seed) pairs, mapped as the files are."""
    pipe = MedfusionPipeline.from_pretrained(model, device="cpu")
    labels = [None if row["label"] == "none" else row["label"] for row in rows]
    seeds = [int(row["seed"]) for row in rows]
    images = pipe(labels, seeds=seeds, sampler=SAMPLER, batch_size=batch_size).numpy()
    suffix = ".nii.gz" if pipe.info.spatial_dims == 3 else ".png"
    mapping = intensity_mapping(suffix, pipe.info.source_dtype, pipe.info.normalization)
    return np.stack([mapping(image)[0] for image in images])


# the 2D dataset folder


def test_layout(complete_2d):
    expected = {f"{'ab'[i % 2]}/{i:06d}.png" for i in range(6)}
    assert files_of(complete_2d) == expected | {MANIFEST, CARD, README}
    assert sorted(p.name for p in complete_2d.iterdir() if p.is_dir()) == ["a", "b"]
    assert hidden(complete_2d) == []


def test_manifest(complete_2d):
    rows = read_manifest(complete_2d)
    assert [row["file"] for row in rows] == [f"{'ab'[i % 2]}/{i:06d}.png" for i in range(6)]
    assert [row["label"] for row in rows] == ["a", "b"] * 3
    assert [int(row["seed"]) for row in rows] == list(range(6))
    for row in rows:
        assert (complete_2d / row["file"]).is_file()
        assert row["sampler"] == "dpmpp-2m" and int(row["steps"]) == STEPS
        assert float(row["guidance"]) == 3.0
        assert float(row["guidance_rescale"]) == 0.0 and float(row["eta"]) == 0.0


def test_card(complete_2d, models):
    card = read_card(complete_2d)
    assert card["complete"] is True
    assert card["model"]["sha256"] == model_hash(models["2d"]) and card["model"]["kind"] == "diffusion"
    assert card["description"].startswith("synthetic images generated by a latent diffusion model")
    assert list(card["settings"]) == ["classes", "seed", "sampler", "precision", "decode_slab"]
    assert card["model"]["class_names"] == ["a", "b"] and card["model"]["image_size"] == [16, 8]
    assert card["n_per_class"] == 3 and card["counts"] == {"a": 3, "b": 3} and card["total"] == 6
    assert card["settings"]["classes"] == ["a", "b"] and card["settings"]["seed"] == 0
    assert card["settings"]["sampler"]["steps"] == STEPS and card["settings"]["precision"] == "fp32"
    assert card["files"]["suffix"] == ".png" and card["files"]["dtype"] == "uint16"


def test_files_are_the_pipeline_output_of_their_manifest_row(complete_2d, models):
    rows = read_manifest(complete_2d)
    arrays = np.stack([read_array(complete_2d / row["file"]) for row in rows])
    assert arrays.dtype == np.uint16 and arrays.shape == (6, 16, 8)
    assert arrays.std() > 100  # not a constant image
    np.testing.assert_array_equal(arrays, expected_images(models["2d"], rows, batch_size=4))
    # a sample alone, in a batch of one: the same up to rounding of the last unit
    alone = expected_images(models["2d"], rows[3:4], batch_size=1)
    assert np.abs(arrays[3:4].astype(int) - alone.astype(int)).max() <= 1


def test_uint8_model_writes_8_bit_pngs(models, tmp_path):
    out = tmp_path / "synthetic"
    assert sample(models["uint8"], out, "--n", 2, "--batch-size", 3) == 0
    rows = read_manifest(out)
    arrays = np.stack([read_array(out / row["file"]) for row in rows])
    assert arrays.dtype == np.uint8 and arrays.shape == (4, 16, 8)
    np.testing.assert_array_equal(arrays, expected_images(models["uint8"], rows, batch_size=3))
    assert read_card(out)["files"]["dtype"] == "uint8"


# 3D and unconditional


def test_volumes(models, tmp_path):
    out = tmp_path / "synthetic"
    assert sample(models["3d"], out, "--n", 1, "--batch-size", 2) == 0
    assert samples_of(out) == {"a/000000.nii.gz", "b/000001.nii.gz"}
    rows = read_manifest(out)
    for row in rows:
        image = sitk.ReadImage(str(out / row["file"]))
        assert image.GetSpacing() == pytest.approx((0.5, 0.25, 2.0))
        assert sitk.GetArrayFromImage(image).shape == (8, 8, 4)
    arrays = np.stack([read_array(out / row["file"]) for row in rows])
    np.testing.assert_array_equal(arrays, expected_images(models["3d"], rows, batch_size=2))
    card = read_card(out)
    assert card["files"]["suffix"] == ".nii.gz" and card["files"]["spacing"] == [0.5, 0.25, 2.0]


def test_volumes_decoded_in_slabs(models, tmp_path):
    assert sample(models["3d"], tmp_path / "synthetic", "--n", 1, "--decode-slab", 3) == 0
    assert samples_of(tmp_path / "synthetic") == {"a/000000.nii.gz", "b/000001.nii.gz"}


def test_volumes_decoded_in_slabs_of_two(models, tmp_path, capsys):
    assert sample(models["3d"], tmp_path / "synthetic", "--n", 1, "--decode-slab", 2) == 0, (
        capsys.readouterr()
    )


def test_decode_slab_is_a_setting_of_the_folder(models, tmp_path):
    out = tmp_path / "synthetic"
    assert sample(models["3d"], out, "--n", 1, "--decode-slab", 3) == 0
    assert sample(models["3d"], out, "--n", 2) == 1


def test_unconditional(models, tmp_path):
    out = tmp_path / "synthetic"
    assert sample(models["uncond"], out, "--n", 3, "--batch-size", 2) == 0
    assert samples_of(out) == {f"{i:06d}.png" for i in range(3)}
    rows = read_manifest(out)
    assert [row["label"] for row in rows] == ["none"] * 3
    assert [row["seed"] for row in rows] == ["0", "1", "2"]
    card = read_card(out)
    assert card["counts"] == {"none": 3} and card["settings"]["classes"] == ["none"]
    arrays = np.stack([read_array(out / row["file"]) for row in rows])
    assert arrays.dtype == np.uint16
    np.testing.assert_array_equal(arrays, expected_images(models["uncond"], rows, batch_size=2))


@pytest.mark.parametrize("label, named", [("a", "class_labels 'a'"), ("all", "class_labels 'all'")])
def test_class_on_an_unconditional_model(models, tmp_path, capsys, label, named):
    out = tmp_path / "synthetic"
    assert sample(models["uncond"], out, "--n", 1, "--class-label", label) == 1
    err = capsys.readouterr().err
    assert err.startswith("medfusion: error:") and named in err and "unconditional (no classes)" in err
    assert not out.exists()


# choosing classes


def test_one_class(models, tmp_path):
    out = tmp_path / "synthetic"
    assert sample(models["2d"], out, "--n", 2, "--class-label", "b", "--seed", 10) == 0
    assert samples_of(out) == {"b/000000.png", "b/000001.png"}
    rows = read_manifest(out)
    assert [(row["label"], row["seed"]) for row in rows] == [("b", "10"), ("b", "11")]
    assert read_card(out)["counts"] == {"b": 2}
    arrays = np.stack([read_array(out / row["file"]) for row in rows])
    np.testing.assert_array_equal(arrays, expected_images(models["2d"], rows, batch_size=16))


def test_two_classes_in_the_order_given(models, tmp_path):
    out = tmp_path / "synthetic"
    assert sample(models["2d"], out, "--n", 1, "--class-label", "b", "--class-label", "a") == 0
    assert [row["file"] for row in read_manifest(out)] == ["b/000000.png", "a/000001.png"]
    assert read_card(out)["settings"]["classes"] == ["b", "a"]


def test_unconditional_samples_of_a_conditional_model(models, tmp_path):
    out = tmp_path / "synthetic"
    assert sample(models["2d"], out, "--n", 2, "--class-label", "none") == 0
    assert samples_of(out) == {"000000.png", "000001.png"}
    assert [row["label"] for row in read_manifest(out)] == ["none", "none"]


@pytest.mark.parametrize(
    "labels, message",
    [
        (["all", "none"], "cannot be mixed"),
        (["a", "none"], "cannot be mixed"),
        (["a", "a"], "named twice"),
        (["all", "b"], "named twice"),
        (["c"], "class_labels 'c': unknown class; the model's classes are: a, b"),
    ],
)
def test_bad_class_labels(models, tmp_path, capsys, labels, message):
    out = tmp_path / "synthetic"
    options = [x for label in labels for x in ("--class-label", label)]
    assert sample(models["2d"], out, "--n", 1, *options) == 1
    err = capsys.readouterr().err
    assert err.startswith("medfusion: error:") and message in err
    assert not out.exists()


# resuming


def write(model: Path, out: Path, n: int = 3, **kwargs):
    return write_synthetic_dataset(
        model, out, n=n, sampler=SAMPLER, batch_size=4, progress=False, log=lambda _: None, **kwargs
    )


def interrupt_after(batches: int):
    calls = []

    def callback(done: int, total: int) -> None:
        calls.append((done, total))
        if len(calls) == batches:
            raise KeyboardInterrupt

    return callback, calls


def test_resume_after_an_interruption(models, complete_2d, tmp_path):
    out = tmp_path / "synthetic"
    callback, calls = interrupt_after(1)
    with pytest.raises(KeyboardInterrupt):
        write(models["2d"], out, callback=callback)
    assert calls == [(4, 6)]
    first = {f"{'ab'[i % 2]}/{i:06d}.png" for i in range(4)}
    assert files_of(out) == first | {CARD, README}  # the first batch, no manifest
    assert hidden(out) == []
    card = read_card(out)
    assert card["complete"] is False and card["model"]["sha256"] == model_hash(models["2d"])
    before = snapshot(out)

    result = write(models["2d"], out)
    assert (result.total, result.kept, result.written) == (6, 4, 2)
    after = snapshot(out)
    for name in first:
        assert after[name] == before[name], f"{name} was written again"
    assert read_card(out)["complete"] is True
    assert hidden(out) == []
    assert_same_samples(out, complete_2d)  # as if never interrupted

    again = write(models["2d"], out)  # a complete folder: nothing to do
    assert (again.total, again.kept, again.written) == (6, 6, 0)
    after_again = snapshot(out)
    assert {k: v for k, v in after_again.items() if k in first} == {k: before[k] for k in first}
    assert_same_samples(out, complete_2d)


def test_resume_after_an_interruption_within_a_batch(models, complete_2d, tmp_path, monkeypatch):
    """Killed between two files of one batch: the complete file is kept, the batch redone."""
    out = tmp_path / "synthetic"
    write_image = files_module.write_image
    written = []

    def failing(path, image):
        if len(written) == 1:
            raise KeyboardInterrupt
        written.append(path)
        return write_image(path, image)

    monkeypatch.setattr(files_module, "write_image", failing)
    with pytest.raises(KeyboardInterrupt):
        write(models["2d"], out)
    monkeypatch.undo()
    assert samples_of(out) == {"a/000000.png"} and hidden(out) == []
    before = snapshot(out)["a/000000.png"]
    result = write(models["2d"], out)
    assert (result.kept, result.written) == (1, 5)
    assert snapshot(out)["a/000000.png"] == before
    assert_same_samples(out, complete_2d)


def test_rerun_of_a_complete_folder_writes_nothing(models, complete_2d, tmp_path, capsys):
    out = tmp_path / "synthetic"
    shutil.copytree(complete_2d, out)
    before = snapshot(out)
    capsys.readouterr()
    assert sample(models["2d"], out, "--n", 3, "--batch-size", 4) == 0
    assert "wrote 0 new sample(s) (6 kept from before)" in capsys.readouterr().out
    after = snapshot(out)
    assert {k: after[k] for k in samples_of(out)} == {k: before[k] for k in samples_of(out)}
    assert files_of(out) == files_of(complete_2d)


def test_stale_temporary_files_are_removed(models, complete_2d, tmp_path):
    out = tmp_path / "synthetic"
    callback, _ = interrupt_after(1)
    with pytest.raises(KeyboardInterrupt):
        write(models["2d"], out, callback=callback)
    # what a killed run leaves behind: temporaries of a sample and of the card
    (out / "a" / ".000000.png.xyz.tmp.png").write_bytes(b"half a png")
    (out / "b" / ".000005.png.k3j.tmp.png").write_bytes(b"")
    (out / f".{CARD}.q1w.tmp").write_text("{")
    assert sample(models["2d"], out, "--n", 3, "--batch-size", 4) == 0
    assert hidden(out) == []
    assert_same_samples(out, complete_2d)


# growing a folder


def test_more_samples_are_added(models, complete_2d, tmp_path, capsys):
    out = tmp_path / "synthetic"
    shutil.copytree(complete_2d, out)
    before = snapshot(out)
    assert sample(models["2d"], out, "--n", 4, "--batch-size", 4) == 0
    assert "wrote 2 new sample(s) (6 kept from before)" in capsys.readouterr().out
    assert samples_of(out) == samples_of(complete_2d) | {"a/000006.png", "b/000007.png"}
    after = snapshot(out)
    for name in samples_of(complete_2d):
        assert after[name] == before[name], name
    rows = read_manifest(out)
    assert len(rows) == 8 and [int(row["seed"]) for row in rows] == list(range(8))
    card = read_card(out)
    assert card["complete"] is True and card["n_per_class"] == 4 and card["counts"] == {"a": 4, "b": 4}

    fresh = tmp_path / "fresh"  # the same as sampling --n 4 at once
    assert sample(models["2d"], fresh, "--n", 4, "--batch-size", 4) == 0
    assert_same_samples(out, fresh)

    unchanged = snapshot(out)
    capsys.readouterr()
    assert sample(models["2d"], out, "--n", 3, "--batch-size", 4) == 1
    err = capsys.readouterr().err
    assert "already planned for n=4 per class; give n >= 4" in err
    assert snapshot(out) == unchanged


# several processes


def test_two_processes_write_the_single_process_files(models, tmp_path):
    """Two CPU processes under torchrun (as `accelerate launch -m medfusion sample` on GPUs)."""
    args = ["--n", "5", "--batch-size", "2", "--steps", str(STEPS), "--quiet"]
    one = tmp_path / "one"
    assert main(["sample", str(models["2d"]), "--out", str(one), *args]) == 0

    two = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    # "--": torchrun's own parser would take --n for an ambiguous abbreviation of its options
    command += ["-m", "--", "medfusion", "sample", str(models["2d"]), "--out", str(two), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("# medfusion sample: 10 samples") == 1
    assert done.stdout.count("wrote 10 new sample(s) (0 kept from before)") == 1
    assert hidden(two) == []
    assert_same_samples(two, one)
    assert len(read_manifest(two)) == 10
    card = read_card(two)
    assert card["complete"] is True and card["total"] == 10 and card["counts"] == {"a": 5, "b": 5}
    assert [p.name for p in two.glob("*.json")] == [CARD]


# bad input: exit status 1, a message, nothing written


def assert_refused(capsys, out: Path, model: Path, *args, message: str) -> str:
    before = snapshot(out)
    capsys.readouterr()
    assert sample(model, out, *args) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("medfusion: error:"), captured.err
    assert message in captured.err, captured.err
    assert snapshot(out) == before
    assert "Traceback" not in captured.err
    return captured.err


def broken_copy(models, tmp_path, damage) -> Path:
    model = tmp_path / "model"
    shutil.copytree(models["2d"], model)
    damage(model)
    return model


def test_missing_unet_weights(models, tmp_path, capsys):
    model = broken_copy(models, tmp_path, lambda m: [p.unlink() for p in (m / "unet").glob("*.safetensors")])
    assert_refused(capsys, tmp_path / "out", model, "--n", 1, message="no *.safetensors weights")


def test_missing_model_index(models, tmp_path, capsys):
    model = broken_copy(models, tmp_path, lambda m: (m / "model_index.json").unlink())
    assert_refused(capsys, tmp_path / "out", model, "--n", 1, message="model_index.json: missing")


def test_missing_model_folder(tmp_path, capsys):
    assert_refused(capsys, tmp_path / "out", tmp_path / "nowhere", "--n", 1, message="not a folder")


def test_mismatched_model_parts(models, tmp_path, capsys):
    def other_unet(model: Path) -> None:
        shutil.rmtree(model / "unet")
        folder_unet(2, in_channels=3).save_pretrained(model / "unet", safe_serialization=True)

    model = broken_copy(models, tmp_path, other_unet)
    message = "the U-Net takes 3 latent channel(s) but the VAE makes 2"
    assert_refused(capsys, tmp_path / "out", model, "--n", 1, message=message)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--n", 0], "n must be an integer >= 1; got 0"),
        (["--n", 1, "--sampler", "plms"], "unknown sampler 'plms'"),
        (["--n", 1, "--steps", 0], "steps must be an integer >= 1; got 0"),
        (["--n", 1, "--eta", 0.5], "eta applies to the ddim sampler only"),
        (["--n", 1, "--sampler", "euler", "--eta", 1], "eta applies to the ddim sampler only"),
        (["--n", 1, "--sampler", "ddim", "--karras-sigmas"], "karras_sigmas applies to"),
        (["--n", 1, "--guidance", -1], "guidance_scale must be a number >= 0"),
        (["--n", 1, "--guidance-rescale", 2], "guidance_rescale must be in [0, 1]"),
        (["--n", 1, "--batch-size", 0], "batch_size must be an integer >= 1; got 0"),
        (["--n", 1, "--decode-slab", 0], "slab must be an integer >= 1 or None; got 0"),
        (["--n", 1, "--class-label", "c"], "unknown class"),
    ],
)
def test_bad_arguments(models, tmp_path, capsys, args, message):
    # (--steps 2 comes first, so a later --steps wins)
    assert_refused(capsys, tmp_path / "out", models["2d"], *args, message=message)
    assert not (tmp_path / "out").exists()


def test_folder_of_another_model(models, complete_2d, tmp_path, capsys):
    out = tmp_path / "synthetic"
    shutil.copytree(complete_2d, out)
    message = f"out {out}: holds samples of a different model"
    assert_refused(capsys, out, models["uint8"], "--n", 3, "--batch-size", 4, message=message)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", 3], "sampler.steps 2 -> 3"),
        (["--seed", 1], "seed 0 -> 1"),
        (["--guidance", 1.5], "sampler.guidance_scale 3.0 -> 1.5"),
        (["--sampler", "ddim"], "sampler.name 'dpmpp-2m' -> 'ddim'"),
        (["--precision", "bf16"], "precision 'fp32' -> 'bf16'"),
        (["--class-label", "b"], "classes ['a', 'b'] -> ['b']"),
    ],
)
def test_folder_of_other_settings(models, complete_2d, tmp_path, capsys, args, message):
    out = tmp_path / "synthetic"
    shutil.copytree(complete_2d, out)
    err = assert_refused(capsys, out, models["2d"], "--n", 3, *args, message="made with other settings")
    assert message in err


def test_non_empty_folder_without_a_card(models, tmp_path, capsys):
    out = tmp_path / "synthetic"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_refused(
        capsys, out, models["2d"], "--n", 1, message=f"out {out}: the folder is not empty and holds no {CARD}"
    )


def test_empty_folder_or_one_with_hidden_files_only_is_fine(models, tmp_path):
    out = tmp_path / "synthetic"
    out.mkdir()
    (out / ".DS_Store").write_bytes(b"")
    assert sample(models["2d"], out, "--n", 1) == 0
    assert samples_of(out) == {".DS_Store", "a/000000.png", "b/000001.png"}


def test_broken_card(models, tmp_path, capsys):
    out = tmp_path / "synthetic"
    out.mkdir()
    (out / CARD).write_text("{not json")
    assert_refused(capsys, out, models["2d"], "--n", 1, message="not valid JSON")


def test_out_is_a_file(models, tmp_path, capsys):
    out = tmp_path / "file.png"
    out.write_bytes(b"x")
    assert_refused(capsys, out, models["2d"], "--n", 1, message=f"out {out}: exists and is not a folder")
    assert out.read_bytes() == b"x"


def test_out_below_a_file(models, tmp_path, capsys):
    (tmp_path / "file").write_bytes(b"x")
    out = tmp_path / "file" / "out"
    assert_refused(
        capsys, out, models["2d"], "--n", 1, message=f"out {out}: {tmp_path / 'file'} is not a folder"
    )


# dry run


def test_dry_run_prints_the_plan_and_writes_nothing(models, complete_2d, tmp_path, capsys):
    out = tmp_path / "synthetic"
    capsys.readouterr()
    assert sample(models["2d"], out, "--n", 3, "--dry-run") == 0
    printed = capsys.readouterr().out
    assert "6 samples (3 per class of a, b)" in printed and "0 already there" in printed
    assert "dpmpp-2m, 2 steps" in printed and "seeds 0..5" in printed and ".png" in printed
    assert not out.exists()

    shutil.copytree(complete_2d, out)
    before = snapshot(out)
    assert sample(models["2d"], out, "--n", 4, "--batch-size", 4, "--dry-run") == 0
    printed = capsys.readouterr().out
    assert "8 samples (4 per class of a, b)" in printed and "6 already there" in printed
    assert "wrote" not in printed
    assert snapshot(out) == before

    # and checks like a real run
    assert_refused(capsys, out, models["2d"], "--n", 3, "--steps", 5, "--dry-run", message="other settings")


def test_ctrl_c_exits_130_with_a_resume_hint(models, tmp_path, monkeypatch, capsys):
    """An interrupted `medfusion sample` (Ctrl-C after the first batch) keeps its complete files,
    says how to resume, and exits with the shell's status for SIGINT; the rerun completes."""
    out = tmp_path / "synthetic"
    original = synthetic.write_generated_dataset

    def interrupted(*args, **kwargs):
        def stop(done, total):
            raise KeyboardInterrupt

        return original(*args, **{**kwargs, "callback": stop})

    monkeypatch.setattr(synthetic, "write_generated_dataset", interrupted)
    assert sample(models["2d"], out, "--n", 3, "--batch-size", 2) == 130
    assert (
        "interrupted (complete files are kept: run the same command again to resume)"
        in capsys.readouterr().err
    )
    assert samples_of(out) == {"a/000000.png", "b/000001.png"}
    monkeypatch.setattr(synthetic, "write_generated_dataset", original)
    assert sample(models["2d"], out, "--n", 3, "--batch-size", 2) == 0
    assert len(samples_of(out)) == 6 and read_card(out)["complete"] is True


def test_karras_sigmas_are_a_setting_of_the_folder(models, tmp_path):
    out = tmp_path / "synthetic"
    assert sample(models["2d"], out, "--n", 1, "--karras-sigmas") == 0
    assert read_card(out)["settings"]["sampler"]["karras_sigmas"] is True
    assert sample(models["2d"], out, "--n", 2) == 1  # without: other settings, refused
    assert sample(models["2d"], out, "--n", 2, "--karras-sigmas") == 0
    assert len(samples_of(out)) == 4


def test_speed_options_reach_the_pipeline_and_keep_the_samples(models, complete_2d, tmp_path, monkeypatch):
    """--channels-last gives the same files up to rounding (not a setting of the folder: it may
    change between resumed runs); --compile MODE reaches MedfusionPipeline (compiling itself is a
    GPU matter, measured by scripts/bench_sample.py)."""
    out = tmp_path / "synthetic"
    assert sample(models["2d"], out, "--n", 3, "--batch-size", 4, "--channels-last") == 0
    for row in read_manifest(out):
        a, b = read_array(out / row["file"]).astype(int), read_array(complete_2d / row["file"]).astype(int)
        assert np.abs(a - b).max() <= 1
    seen = {}

    class Capture(MedfusionPipeline):
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)
            super().__init__(*args, **{**kwargs, "compile_mode": None})

    monkeypatch.setattr(diffusion_generator, "MedfusionPipeline", Capture)
    assert sample(models["2d"], tmp_path / "compiled", "--n", 1, "--compile", "max-autotune") == 0
    assert seen["compile_mode"] == "max-autotune" and seen["channels_last"] is False
    with pytest.raises(SystemExit):
        main(["sample", str(models["2d"]), "--out", str(tmp_path / "x"), "--n", "1", "--compile", "fast"])
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        MedfusionPipeline.from_pretrained(models["2d"], compile_mode="fast")
