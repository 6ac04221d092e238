"""Are synthetic files in the training data's units? Train on real crops in source units with
per-image normalisation (``percentile``, what ``auto`` did before normalisations were fitted), with
``auto`` (fitted on the training set) and with ``auto`` fitted per class, and compare the values of
the samples with held-out real crops (Wasserstein-1 in the files' units and relative to the real
range).

The data: 32x32 crops of three pydicom-data files, each kept in its own units as 16-bit PNG, as a
user's export would be: CT (693_UNCI.dcm) as Hounsfield units + 1024, MR (MR2_UNCI.dcm) as its
stored values, a CR radiograph (RG1_UNCI.dcm) as its stored values. Also writes the ``auto``
model's samples as DICOM and checks that they read back with the PNG files' values. Usage::

    python scripts/units_check.py [--out DIR] [--vae-steps 300] [--unet-steps 600] [--n 32]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medfusion.data import read_image, write_image
from medfusion.metrics.intensity import compare_intensities, intensity_values
from medfusion.samplers import SamplerConfig, write_synthetic_dataset
from medfusion.training.diffusion import DiffusionRunConfig, train_diffusion
from medfusion.training.vae import VAERunConfig, train_vae

SOURCES = {"ct": ("693_UNCI.dcm", 1024), "mr": ("MR2_UNCI.dcm", 0), "xray": ("RG1_UNCI.dcm", 0)}
CROP = 32
CONFIGS = {  # the data config's normalisation: before, the default now, and fitted per class
    "percentile": {"normalization": "percentile"},
    "auto": {"normalization": "auto"},
    "auto-per-class": {"normalization": "auto", "fit_per_class": True},
}


def build_data(root: Path, per_class: int, heldout: int, seed: int = 0) -> None:
    """Crops of each source holding tissue (mean above the 40th percentile), in source units."""
    from pydicom.data import get_testdata_file

    rng = np.random.default_rng(seed)
    for label, (name, offset) in SOURCES.items():
        array = np.asarray(read_image(get_testdata_file(name)).array, dtype=np.float64)[0] + offset
        array = np.rint(np.clip(array, 0, 65535)).astype(np.uint16)
        level = np.percentile(array, 40)
        crops = []
        while len(crops) < per_class + heldout:
            y, x = (int(rng.integers(0, s - CROP)) for s in array.shape)
            crop = array[y : y + CROP, x : x + CROP]
            if crop.mean() > level:
                crops.append(crop)
        for i, crop in enumerate(crops):
            split = "train" if i < per_class else "heldout"
            write_image(root / split / label / f"{i:04d}.png", crop[None])


def train(data: Path, out: Path, normalization: dict, vae_steps: int, unet_steps: int) -> Path:
    common = {"batch_size": 16, "learning_rate": 1e-3, "num_workers": 0, "preview_every": 0, "log_every": 50}
    vae = VAERunConfig.from_dict(
        {
            "data": {**normalization, "flip_axes": [1]},
            "model": {"block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8},
            "loss": {"pixel_loss": "l1", "kl_weight": 1e-6},
            "train": {**common, "max_steps": vae_steps, "checkpoint_every": vae_steps},
        },
        source="units_check",
    )
    train_vae(data, out / "autoencoder", vae, progress=False, log=lambda m: None)
    fitted = VAERunConfig.load(out / "autoencoder" / "config.yaml").data
    unet = DiffusionRunConfig.from_dict(
        {
            "data": fitted.to_dict(),
            "model": {"block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 16,
                      "attention_levels": [False, True], "num_head_channels": 32},
            "cache_latents": True,
            "train": {**common, "max_steps": unet_steps, "checkpoint_every": unet_steps, "ema_decay": 0.99},
        },
        source="units_check",
    )  # fmt: skip
    train_diffusion(data, out / "autoencoder" / "vae", out, unet, progress=False, log=lambda m: None)
    return out / "model"


def compare(real: Path, fake: Path) -> dict:
    result = compare_intensities(intensity_values(real), intensity_values(fake))
    rows = {}
    for label, group in {"all": result["overall"], **result["per_class"]}.items():
        rows[label] = {
            "w1": round(group["w1"][0], 1),
            "relative_w1": round(group["relative_w1"][0], 3),
            "real_vs_real": round(group["reference"]["relative_w1"][0], 3)
            if group.get("reference")
            else None,
            "real_p1_p50_p99": [round(group["real"][k][0]) for k in ("p1", "p50", "p99")],
            "synthetic_p1_p50_p99": [round(group["fake"][k][0]) for k in ("p1", "p50", "p99")],
            "synthetic_dtype": group["fake"]["dtype"],
            "flagged": group["flagged"],
        }
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--vae-steps", type=int, default=300)
    parser.add_argument("--unet-steps", type=int, default=600)
    parser.add_argument("--n", type=int, default=32, help="samples per class")
    args = parser.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="medfusion-units-"))
    torch.manual_seed(0)
    build_data(work / "data", per_class=128, heldout=args.n)
    sampler = SamplerConfig("dpmpp-2m", steps=20)
    for name, normalization in CONFIGS.items():
        start = time.perf_counter()
        model = train(work / "data" / "train", work / name, normalization, args.vae_steps, args.unet_steps)
        synthetic = work / name / "synthetic"
        write_synthetic_dataset(
            model, synthetic, n=args.n, sampler=sampler, progress=False, log=lambda m: None
        )
        record = json.loads((model / "medfusion.json").read_text())["normalization"]
        fitted = {k: record.get(k) for k in ("normalization", "bounds", "class_bounds")}
        seconds = round(time.perf_counter() - start, 1)
        print(json.dumps({"config": name, "model": fitted, "seconds": seconds}))
        for label, row in compare(work / "data" / "heldout", synthetic).items():
            print(json.dumps({"config": name, "class": label, **row}))
    dicom = work / "auto" / "dicom"
    write_synthetic_dataset(work / "auto" / "model", dicom, n=2, sampler=sampler, progress=False,
                            log=lambda m: None, file_format="dicom")  # fmt: skip
    pngs = work / "auto" / "synthetic"
    same = all(
        np.array_equal(
            read_image(path).array, read_image(pngs / path.relative_to(dicom).with_suffix(".png")).array
        )
        for path in sorted(dicom.glob("*/*.dcm"))
    )
    print(
        json.dumps(
            {"dicom_files": len(list(dicom.glob("*/*.dcm"))), "same_values_as_png": same, "work": str(work)}
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
