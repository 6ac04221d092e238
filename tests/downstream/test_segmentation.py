"""Segmentation networks (group norm, 2D/3D), the transfer of pretrained weights, the restoration and
segmentation tasks' losses against independent computations, a few steps that learn, and
sliding-window prediction."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("monai", reason="the segmentation tools need MONAI (the segmentation extra)")

from medfusion.downstream.restoration import Corruption, RestorationConfig, dice_per_class
from medfusion.downstream.segmentation import (
    RestorationTask,
    SegmentationTask,
    SegmenterConfig,
    build_segmenter,
    predict_masks,
    transfer_weights,
)

TINY = SegmenterConfig(channels=(8, 16), num_res_units=1, num_groups=4)


@pytest.mark.parametrize("network", ["unet", "segresnet"])
@pytest.mark.parametrize("spatial", [(16, 16), (8, 8, 8)])
def test_networks_map_images_to_class_logits_with_group_norm(network, spatial):
    config = TINY.replace(network=network)
    model = build_segmenter(len(spatial), 2, 3, config)
    out = model(torch.randn(2, 2, *spatial))
    assert out.shape == (2, 3, *spatial)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    assert not norms  # no batch norm anywhere
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())


def test_bad_network_settings_are_refused():
    with pytest.raises(ValueError, match="network must be one of"):
        SegmenterConfig(network="vnet")
    with pytest.raises(ValueError, match="num_groups must divide every width"):
        SegmenterConfig(channels=(8, 12), num_groups=8)
    with pytest.raises(ValueError, match="segresnet doubles its width"):
        SegmenterConfig(network="segresnet", channels=(8, 24))


def test_transfer_copies_everything_but_the_output_layer():
    torch.manual_seed(0)
    pretrained = build_segmenter(2, 1, 1, TINY)  # restoration: as many outputs as image channels
    segmenter = build_segmenter(2, 1, 3, TINY)
    before = {k: v.clone() for k, v in segmenter.state_dict().items()}
    kept = transfer_weights(pretrained, segmenter)
    assert kept and all(before[k].shape != pretrained.state_dict()[k].shape for k in kept)
    for name, value in segmenter.state_dict().items():
        expected = before[name] if name in kept else pretrained.state_dict()[name]
        assert torch.equal(value, expected), name
    assert kept == ["head.weight", "head.bias"]


def test_restoration_loss_is_l1_of_the_restored_corruption_and_seeded_by_step():
    torch.manual_seed(0)
    model = build_segmenter(2, 1, 1, TINY)
    config = RestorationConfig()
    task = RestorationTask(model, config, (16, 16), seed=3)
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    ((_, loss, _),) = list(task.training_step({"segmenter": model}, {"image": images}, 7))
    corrupted = Corruption(config, (16, 16), 3 * 1_000_003 + 7).batch(images)
    torch.testing.assert_close(loss, F.l1_loss(model(corrupted), images))
    assert torch.equal(task.corrupt(images, 7), corrupted) and not torch.equal(
        task.corrupt(images, 8), corrupted
    )
    grid, scalars = task.preview(model, {"image": images})
    assert grid.shape == (6, 1, 16, 16) and scalars["l1"] >= 0


def test_segmentation_loss_is_dice_ce_and_a_few_steps_learn_a_simple_pattern():
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    images = torch.rand(8, 1, 16, 16) * 2 - 1
    masks = (images[:, 0] > 0.2).long() + (images[:, 0] > 0.6).long()  # 3 classes by intensity
    model = build_segmenter(2, 1, 3, TINY)
    task = SegmentationTask(model, 3)
    ((_, loss, _),) = list(task.training_step({"segmenter": model}, {"image": images, "mask": masks}, 0))
    expected = DiceCELoss(to_onehot_y=True, softmax=True)(model(images), masks.unsqueeze(1))
    torch.testing.assert_close(loss, expected)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(60):
        ((_, loss, _),) = list(
            task.training_step({"segmenter": model}, {"image": images, "mask": masks}, step)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    predicted = predict_masks(model, images, (16, 16))
    assert dice_per_class(predicted, masks, 3).nanmean() > 0.8
    grid, _ = task.preview(model, {"image": images, "mask": masks})
    assert grid.shape == (12, 1, 16, 16) and grid.min() >= -1 and grid.max() <= 1


def test_volumes_larger_than_the_crop_are_predicted_by_sliding_windows():
    torch.manual_seed(0)
    model = build_segmenter(3, 1, 2, TINY)
    volume = torch.randn(1, 1, 16, 16, 12)
    labels = predict_masks(model, volume, (8, 8, 8))
    assert labels.shape == (1, 16, 16, 12) and labels.dtype == torch.long
    # a window that covers the whole volume gives the direct prediction
    whole = predict_masks(model, torch.randn(1, 1, 8, 8, 8), (8, 8, 8))
    assert whole.shape == (1, 8, 8, 8)
