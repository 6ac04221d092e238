"""Helpers of the training tests: a tiny dataset of real crops and a tiny VAE."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset


class _Sample:
    def __init__(self, path: str):
        self.path = path


class RetinaCrops(Dataset):
    """16x16 grey crops of scikit-image's fundus photograph, in [-1, 1], with two labels.

    ``nan_at`` puts NaN into one item (a corrupt file); ``samples`` names a fake path per item so
    that the loop can say which files a bad batch held.
    """

    def __init__(self, count: int = 32, size: int = 16, nan_at: int | None = None):
        from skimage import data

        retina = data.retina().mean(axis=2)
        rng = np.random.default_rng(0)
        h, w = retina.shape
        crops = []
        for _ in range(count):
            y, x = rng.integers(h // 4, 3 * h // 4 - size), rng.integers(w // 4, 3 * w // 4 - size)
            crops.append(retina[y : y + size, x : x + size])
        array = np.stack(crops)[:, None].astype(np.float32) / 127.5 - 1.0
        self.images = torch.from_numpy(array)
        if nan_at is not None:
            self.images[nan_at, 0, 0, 0] = float("nan")
        self.samples = tuple(_Sample(f"crop_{i:03d}.png") for i in range(count))
        self.epochs: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "label": index % 2, "index": index}
