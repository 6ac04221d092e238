"""Latents encoded once by the frozen VAE and cached on disk (``medfusion train --cache-latents``).

The cache keeps the posterior of every item, mean and standard deviation, so each epoch still
draws a fresh latent ``mean + std * noise`` without running the encoder. It is written once
(atomically) as ``latents.safetensors`` + ``latents.json``; the JSON holds a fingerprint of the
VAE weights, the files and the data settings, and a cache whose fingerprint differs is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from medfusion.autoencoders.vae import VAE
from medfusion.utils import atomic_dir

CACHE_FORMAT = 1


def cache_fingerprint(vae: VAE, dataset: Dataset, settings: dict) -> str:
    """SHA-256 over the VAE's weights and config, the dataset's files (path, size, mtime) and labels,
    and ``settings`` (the data config): any change means a new cache."""
    digest = hashlib.sha256()
    digest.update(json.dumps({**vae.config, "_settings": settings}, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    samples = getattr(dataset, "samples", ())
    labels = getattr(dataset, "labels", [])
    for sample, label in zip(samples, labels):
        stat = os.stat(sample.path)
        digest.update(f"{sample.path}|{stat.st_size}|{stat.st_mtime_ns}|{label}\n".encode())
    digest.update(f"items={len(dataset)}".encode())
    return digest.hexdigest()


def _read_meta(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "latents.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


@torch.no_grad()
def build_latent_cache(
    vae: VAE,
    dataset: Dataset,
    folder: str | Path,
    fingerprint: str,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    progress: bool = True,
) -> Path:
    """Encode every item of ``dataset`` (dicts with ``image``, ``label``, ``index``) into ``folder``.

    Reuses an existing cache with the same ``fingerprint``; otherwise (re)writes it atomically.
    Returns the folder.
    """
    folder = Path(folder)
    meta = _read_meta(folder)
    if (
        meta is not None
        and meta.get("fingerprint") == fingerprint
        and (folder / "latents.safetensors").is_file()
    ):
        return folder
    vae = vae.to(device).eval()
    means, stds, labels, indices = [], [], [], []
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    for batch in tqdm(loader, desc="caching latents", unit="batch", disable=not progress):
        posterior = vae.encode(batch["image"].to(device))
        means.append((posterior.mean * vae.scaling_factor).float().cpu())
        stds.append((posterior.std * vae.scaling_factor).float().cpu())
        labels.append(torch.as_tensor(batch["label"]).long())
        indices.append(torch.as_tensor(batch["index"]).long())
    tensors = {
        "mean": torch.cat(means),
        "std": torch.cat(stds),
        "label": torch.cat(labels),
        "index": torch.cat(indices),
    }
    meta = {
        "format": CACHE_FORMAT,
        "fingerprint": fingerprint,
        "items": len(dataset),
        "latent_shape": list(tensors["mean"].shape[1:]),
        "scaling_factor": vae.scaling_factor,
    }
    with atomic_dir(folder, overwrite=True) as tmp:
        save_file(tensors, tmp / "latents.safetensors")
        (tmp / "latents.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return folder


class LatentDataset(Dataset):
    """Items of a latent cache: ``latent_mean``, ``latent_std`` (C, *spatial), ``label``, ``index``.

    ``samples`` (for error messages naming files) is taken from the dataset the cache was built from.
    """

    def __init__(self, folder: str | Path, samples=()):
        folder = Path(folder)
        meta = _read_meta(folder)
        if meta is None or meta.get("format") != CACHE_FORMAT:
            raise ValueError(f"{folder}: not a latent cache of this medfusion version (latents.json)")
        if type(meta.get("items")) is not int or meta["items"] < 0:
            raise ValueError(
                f"{folder / 'latents.json'}: items must be an integer >= 0; got {meta.get('items')!r}"
            )
        tensors = load_file(folder / "latents.safetensors")
        self.mean, self.std = tensors["mean"], tensors["std"]
        self.label, self.index = tensors["label"], tensors["index"]
        if len(self.mean) != meta["items"]:
            raise ValueError(f"{folder}: holds {len(self.mean)} latents, latents.json says {meta['items']}")
        self.samples = samples
        self.folder = folder

    def __len__(self) -> int:
        return len(self.mean)

    def __getitem__(self, i: int) -> dict:
        return {
            "latent_mean": self.mean[i],
            "latent_std": self.std[i],
            "label": int(self.label[i]),
            "index": int(self.index[i]),
        }
