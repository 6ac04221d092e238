"""The self-supervised restoration pretext task of segmentation pretraining, and Dice scores.

Pretraining (Models Genesis, Zhou et al. 2021; MONAI's self-supervised tutorial) teaches a whole
encoder-decoder to undo a corruption of unlabelled images, with an L1 loss against the clean image:

- **in-painting**: a few boxes of the image are replaced with noise (the network fills the holes
  from their context);
- **out-painting**: everything but a few boxes is replaced with noise (the network extends what it
  sees);
- **local pixel shuffling**: the voxels inside a few small boxes are shuffled (the network restores
  local texture).

Each corruption draws in-painting or out-painting (one of the two), then shuffles with a probability,
as MONAI's tutorial composes ``RandCoarseDropout`` and ``RandCoarseShuffle``; those are the MONAI
transforms used here. Hole sizes are fractions of the image side, so the same config suits 64x64
slices and 96^3 volumes. Noise is drawn uniformly within each image's own value range.

:func:`dice_per_class` scores label maps with MONAI's ``DiceMetric``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from medfusion.config import Config
from medfusion.utils import MAX_SEED


@dataclass(frozen=True)
class RestorationConfig(Config):
    """How the restoration pretext task corrupts an image.

    Attributes:
        paint_probability: of in- or out-painting (1: always one of the two, as in MONAI's tutorial).
        inpaint_probability: of in-painting where there is painting; out-painting otherwise.
        holes: boxes of in-painting, and boxes kept by out-painting, at least.
        max_holes: at most (drawn per image).
        inpaint_size: (smallest, largest) side of an in-painting box, as a fraction of the image side.
        outpaint_size: (smallest, largest) side of a box out-painting keeps, as a fraction.
        shuffle_probability: of the local pixel shuffling (after the painting).
        shuffle_holes: boxes whose voxels are shuffled.
        shuffle_size: side of a shuffled box, as a fraction of the image side.
    """

    paint_probability: float = 1.0
    inpaint_probability: float = 0.5
    holes: int = 4
    max_holes: int = 8
    inpaint_size: tuple[float, float] = (0.05, 0.3)
    outpaint_size: tuple[float, float] = (0.2, 0.6)
    shuffle_probability: float = 0.8
    shuffle_holes: int = 10
    shuffle_size: float = 0.08

    def __post_init__(self) -> None:
        for name in ("paint_probability", "inpaint_probability", "shuffle_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]; got {getattr(self, name)}")
        if not 1 <= self.holes <= self.max_holes:
            raise ValueError(f"holes and max_holes must satisfy 1 <= holes <= max_holes; got {self.holes}, "
                             f"{self.max_holes}")  # fmt: skip
        if self.shuffle_holes < 1:
            raise ValueError(f"shuffle_holes must be >= 1; got {self.shuffle_holes}")
        for name in ("inpaint_size", "outpaint_size"):
            low, high = getattr(self, name)
            if not 0.0 < low <= high <= 1.0:
                raise ValueError(f"{name} must be (low, high) with 0 < low <= high <= 1; got {(low, high)}")
        if not 0.0 < self.shuffle_size <= 1.0:
            raise ValueError(f"shuffle_size must be in (0, 1]; got {self.shuffle_size}")


def _sides(fraction: float, size: Sequence[int]) -> tuple[int, ...]:
    return tuple(max(1, math.floor(fraction * side)) for side in size)


class Corruption:
    """Corrupts images of one spatial size as :class:`RestorationConfig` says; seeded.

    Args:
        config: the corruption.
        spatial_size: the images' spatial size (array order).
        seed: of every draw (the same seed corrupts the same images the same way).
    """

    def __init__(self, config: RestorationConfig, spatial_size: Sequence[int], seed: int = 0):
        from monai.transforms import RandCoarseDropout, RandCoarseShuffle

        if not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer in 0..{MAX_SEED}; got {seed}")
        self.config, self.spatial_size = config, tuple(int(s) for s in spatial_size)
        low, high = config.inpaint_size
        self.inpaint = RandCoarseDropout(
            holes=config.holes, max_holes=config.max_holes, spatial_size=_sides(low, self.spatial_size),
            max_spatial_size=_sides(high, self.spatial_size), dropout_holes=True, prob=1.0,
        )  # fmt: skip
        low, high = config.outpaint_size
        self.outpaint = RandCoarseDropout(
            holes=config.holes, max_holes=config.max_holes, spatial_size=_sides(low, self.spatial_size),
            max_spatial_size=_sides(high, self.spatial_size), dropout_holes=False, prob=1.0,
        )  # fmt: skip
        self.shuffle = RandCoarseShuffle(
            holes=config.shuffle_holes, spatial_size=_sides(config.shuffle_size, self.spatial_size), prob=1.0
        )
        self.random = np.random.RandomState(seed % 2**32)
        for transform in (self.inpaint, self.outpaint, self.shuffle):
            transform.set_random_state(state=self.random)

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, dict[str, bool]]:
        """One corrupted copy of ``image`` (C, *spatial) and which corruptions it got."""
        if tuple(image.shape[1:]) != self.spatial_size:
            raise ValueError(
                f"image of spatial size {tuple(image.shape[1:])}; this corruption is for {self.spatial_size}"
            )
        low, high = float(image.min()), float(image.max())
        paint = bool(self.random.uniform() < self.config.paint_probability)
        inpaint = bool(self.random.uniform() < self.config.inpaint_probability)
        out = image.detach().cpu().float().clone()
        if paint:
            painter = self.inpaint if inpaint else self.outpaint
            painter.fill_value = (low, high if high > low else low + 1e-6)
            out = torch.as_tensor(painter(out)).float()
        shuffle = bool(self.random.uniform() < self.config.shuffle_probability)
        if shuffle:
            out = torch.as_tensor(self.shuffle(out)).float()
        done = {"inpaint": paint and inpaint, "outpaint": paint and not inpaint, "shuffle": shuffle}
        return out.to(image.device, image.dtype), done

    def batch(self, images: torch.Tensor) -> torch.Tensor:
        """Corrupt every image of a batch (N, C, *spatial), each with its own draw."""
        return torch.stack([self(image)[0] for image in images])


def dice_per_class(
    prediction: torch.Tensor, target: torch.Tensor, num_classes: int, include_background: bool = False
) -> torch.Tensor:
    """Dice of every class between label maps, per image: MONAI's ``DiceMetric`` on one-hot maps.

    Args:
        prediction, target: (N, *spatial) integer label maps.
        num_classes: classes, background (0) included.
        include_background: also score class 0.
    Returns:
        (N, classes scored) float; NaN where a class is absent from an image's target (MONAI's
        ``ignore_empty``: no score there, whatever the prediction).
    """
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background included); got {num_classes}")
    metric = DiceMetric(include_background=include_background, reduction="none", ignore_empty=True)
    as_one_hot = [
        one_hot(x.long().unsqueeze(1), num_classes=num_classes, dim=1) for x in (prediction, target)
    ]
    return metric(*as_one_hot).float()
