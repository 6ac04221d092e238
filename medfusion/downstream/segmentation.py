"""Segmentation networks and their two training tasks: the restoration pretext task (self-supervised
pretraining on unlabelled real or synthetic images) and supervised segmentation (fine-tuning on
image/mask pairs), both for the shared training loop (:mod:`medfusion.training.loop`).

The networks are MONAI's (``UNet`` or ``SegResNet``) with group norm: no batch norm, so that small
batches, single volumes and differentially private training behave. Pretraining trains the whole
encoder-decoder to restore images (``out_channels`` = the image channels); fine-tuning starts from
those weights with a new output layer for the classes (:func:`transfer_weights`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medfusion.config import Config
from medfusion.downstream.restoration import Corruption, RestorationConfig
from medfusion.training.loop import TrainingTask
from medfusion.utils import MAX_SEED

NETWORKS = ("unet", "segresnet")


@dataclass(frozen=True)
class SegmenterConfig(Config):
    """The segmentation network.

    Attributes:
        network: ``unet`` (MONAI's residual U-Net) or ``segresnet`` (MONAI's SegResNet).
        channels: widths per level, the first at full resolution; each later level halves the
            size (so inputs need a multiple of ``2 ** (len(channels) - 1)`` voxels per axis).
            SegResNet uses the first as its initial filters and one level per entry.
        num_res_units: residual units per level of the U-Net.
        num_groups: groups of every group norm; must divide every width.
        dropout: of the U-Net's layers.
    """

    network: str = "unet"
    channels: tuple[int, ...] = (16, 32, 64, 128)
    num_res_units: int = 1
    num_groups: int = 8
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.network not in NETWORKS:
            raise ValueError(f"network must be one of {NETWORKS}; got {self.network!r}")
        if len(self.channels) < 2 or any(c < 1 for c in self.channels):
            raise ValueError(f"channels must be two or more positive widths; got {list(self.channels)}")
        if self.num_groups < 1 or any(c % self.num_groups for c in self.channels):
            raise ValueError(
                f"num_groups must divide every width of channels; got {self.num_groups} for "
                f"{list(self.channels)}"
            )
        if self.network == "segresnet" and any(
            c != self.channels[0] * 2**i for i, c in enumerate(self.channels)
        ):
            raise ValueError(
                "segresnet doubles its width per level: channels must be c, 2c, 4c ...; got "
                f"{list(self.channels)}"
            )
        if self.num_res_units < 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"num_res_units must be >= 0 and dropout in [0, 1); got {self.num_res_units}, "
                             f"{self.dropout}")  # fmt: skip

    @property
    def multiple(self) -> int:
        """Every input side must be a multiple of this."""
        return 2 ** (len(self.channels) - 1)


class Segmenter(nn.Module):
    """A MONAI body that ends at ``width`` channels and a 1x1 convolution to the outputs: the body
    keeps group norm on widths the groups divide (MONAI's U-Net normalises its top layer's
    outputs), and a pretrained body moves to another task by its head alone."""

    def __init__(self, body: nn.Module, width: int, out_channels: int, spatial_dims: int):
        super().__init__()
        from medfusion.nn.layers import conv_nd

        self.body, self.head = body, conv_nd(spatial_dims, width, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def build_segmenter(
    spatial_dims: int, in_channels: int, out_channels: int, config: SegmenterConfig
) -> Segmenter:
    """A MONAI network with group norm mapping (N, in_channels, *spatial) to (N, out_channels, *spatial)."""
    from monai.networks.nets import SegResNet, UNet

    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3; got {spatial_dims}")
    norm = ("group", {"num_groups": config.num_groups})
    width = config.channels[0]
    if config.network == "unet":
        body = UNet(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=width,
            channels=tuple(config.channels), strides=(2,) * (len(config.channels) - 1),
            num_res_units=config.num_res_units, norm=norm, dropout=config.dropout,
        )  # fmt: skip
    else:
        levels = len(config.channels)
        body = SegResNet(
            spatial_dims=spatial_dims, init_filters=width, in_channels=in_channels, out_channels=width,
            norm=norm, act=("RELU", {"inplace": False}), blocks_up=(1,) * (levels - 1),
            blocks_down=tuple(min(4, 1 + i) for i in range(levels)),
        )  # fmt: skip
    return Segmenter(body, width, out_channels, spatial_dims)


def transfer_weights(source: nn.Module, target: nn.Module) -> list[str]:
    """Copy every tensor of ``source`` into ``target`` where both have it under the same name and
    shape (a pretrained encoder-decoder into a segmenter with another output layer). Returns the
    names of ``target``'s tensors left as they were."""
    weights = source.state_dict()
    state = target.state_dict()
    kept = [
        name for name, value in state.items() if name not in weights or weights[name].shape != value.shape
    ]
    copied = {name: weights[name] for name in state if name not in kept}
    target.load_state_dict({**state, **copied})
    return kept


def _images_to_show(x: torch.Tensor) -> torch.Tensor:
    """Images clamped to [-1, 1] with one channel (the first) for the preview grids."""
    return x[:, :1].float().clamp(-1, 1)


class RestorationTask(TrainingTask):
    """Self-supervised pretraining: the network restores images corrupted by :class:`Corruption`,
    trained with the L1 loss against the clean images. The corruption of step ``s`` is drawn from
    ``seed`` and ``s`` alone, so a resumed run corrupts as an uninterrupted one.

    Args:
        network: maps (N, C, *spatial) to (N, C, *spatial).
        corruption: the pretext task's settings.
        spatial_size: of the training crops.
        seed: of the corruptions.
    """

    name = "restoration"
    preview_nrow = 3  # corrupted | restored | clean

    def __init__(
        self, network: nn.Module, corruption: RestorationConfig, spatial_size: Sequence[int], seed: int = 0
    ):
        if not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer in 0..{MAX_SEED}; got {seed}")
        self.network, self.corruption, self.spatial_size, self.seed = (
            network,
            corruption,
            tuple(spatial_size),
            seed,
        )

    def modules(self) -> dict[str, nn.Module]:
        return {"segmenter": self.network}

    def corrupt(self, images: torch.Tensor, step: int) -> torch.Tensor:
        """The corrupted copies of the batch of step ``step``."""
        seed = (self.seed * 1_000_003 + step) % (MAX_SEED + 1)
        return Corruption(self.corruption, self.spatial_size, seed).batch(images)

    def training_step(
        self, models: Mapping[str, nn.Module], batch: dict, step: int
    ) -> Iterator[tuple[str, torch.Tensor, dict[str, torch.Tensor]]]:
        clean = batch["image"]
        restored = models["segmenter"](self.corrupt(clean, step))
        loss = F.l1_loss(restored.float(), clean.float())
        yield "segmenter", loss, {"l1": loss.detach()}

    @torch.no_grad()
    def preview(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        clean = batch["image"][:4].to(next(model.parameters()).device)
        corrupted = self.corrupt(clean, 0)
        restored = model(corrupted)
        rows = [_images_to_show(x) for x in (corrupted, restored, clean)]
        grid = torch.stack(rows, dim=1).flatten(0, 1)  # per image: corrupted, restored, clean
        return grid, {"l1": float(F.l1_loss(restored.float(), clean.float()))}


class SegmentationTask(TrainingTask):
    """Supervised segmentation with MONAI's ``DiceCELoss`` (softmax over the classes, background
    included in the cross-entropy, the Dice over every class).

    Args:
        network: maps (N, C, *spatial) to logits (N, num_classes, *spatial).
        num_classes: classes, background included.
    """

    name = "segmentation"
    preview_nrow = 3  # image | prediction | mask

    def __init__(self, network: nn.Module, num_classes: int):
        from monai.losses import DiceCELoss

        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background included); got {num_classes}")
        self.network, self.num_classes = network, num_classes
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True)

    def modules(self) -> dict[str, nn.Module]:
        return {"segmenter": self.network}

    def training_step(
        self, models: Mapping[str, nn.Module], batch: dict, step: int
    ) -> Iterator[tuple[str, torch.Tensor, dict[str, torch.Tensor]]]:
        logits = models["segmenter"](batch["image"])
        loss = self.loss(logits.float(), batch["mask"].unsqueeze(1))
        yield "segmenter", loss, {"dice_ce": loss.detach()}

    @torch.no_grad()
    def preview(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        device = next(model.parameters()).device
        images, masks = batch["image"][:4].to(device), batch["mask"][:4].to(device)
        predicted = model(images).argmax(1)
        scale = max(1, self.num_classes - 1)

        def as_image(labels: torch.Tensor) -> torch.Tensor:
            return (labels.unsqueeze(1).float() / scale) * 2 - 1

        grid = torch.stack([_images_to_show(images), as_image(predicted), as_image(masks)], dim=1).flatten(
            0, 1
        )
        return grid, {"pixel_accuracy": float((predicted == masks).float().mean())}


@torch.no_grad()
def predict_masks(
    model: nn.Module,
    images: torch.Tensor,
    roi_size: Sequence[int],
    batch_size: int = 4,
    overlap: float = 0.25,
) -> torch.Tensor:
    """Label maps (N, *spatial) of images (N, C, *spatial): the whole image where it fits the
    training crop ``roi_size``, else MONAI's sliding-window inference over crops of that size
    (Gaussian-weighted, ``overlap``)."""
    from monai.inferers import sliding_window_inference

    model.eval()
    if tuple(images.shape[2:]) == tuple(roi_size):
        return model(images).argmax(1)
    logits = sliding_window_inference(
        images, roi_size=tuple(roi_size), sw_batch_size=batch_size, predictor=model, overlap=overlap,
        mode="gaussian",
    )  # fmt: skip
    return logits.argmax(1)
