"""The restoration pretext task corrupts as it says (boxes of noise, the outside of boxes, shuffled
boxes), seeded; Dice per class against a hand calculation."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("monai", reason="the segmentation tools need MONAI (the segmentation extra)")

from medfusion.downstream.restoration import Corruption, RestorationConfig, dice_per_class

SIZE = (40, 48)
ONE_BOX = {"holes": 1, "max_holes": 1}


def _image(size=SIZE) -> torch.Tensor:
    """Distinct values everywhere (a changed pixel is always visible), in [-1, 1]."""
    n = math.prod(size)
    return (torch.randperm(n, generator=torch.Generator().manual_seed(0)).float() / (n - 1) * 2 - 1).reshape(
        1, *size
    )


def _box_of(mask: torch.Tensor) -> tuple[slice, ...]:
    index = mask.nonzero()
    return tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(index.min(0).values, index.max(0).values))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_inpainting_fills_one_box_with_noise_in_the_image_range(seed):
    config = RestorationConfig(
        inpaint_probability=1.0, shuffle_probability=0.0, inpaint_size=(0.1, 0.4), **ONE_BOX
    )
    image = _image()
    out, done = Corruption(config, SIZE, seed)(image)
    assert done == {"inpaint": True, "outpaint": False, "shuffle": False}
    changed = (out != image)[0]
    box = _box_of(changed)
    assert changed[box].all() and changed.sum() == changed[box].numel()  # exactly one box
    for side, s in zip(box, SIZE):
        assert math.floor(0.1 * s) <= side.stop - side.start <= math.floor(0.4 * s)
    assert out.min() >= image.min() and out.max() <= image.max()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_outpainting_keeps_one_box_and_replaces_the_rest(seed):
    config = RestorationConfig(
        inpaint_probability=0.0, shuffle_probability=0.0, outpaint_size=(0.3, 0.6), **ONE_BOX
    )
    image = _image()
    out, done = Corruption(config, SIZE, seed)(image)
    assert done["outpaint"] and not done["inpaint"]
    kept = (out == image)[0]
    box = _box_of(kept)
    assert kept[box].all() and kept.sum() == kept[box].numel()
    for side, s in zip(box, SIZE):
        assert math.floor(0.3 * s) <= side.stop - side.start <= math.floor(0.6 * s)


def test_local_shuffling_moves_values_only_within_small_boxes():
    config = RestorationConfig(
        paint_probability=0.0, shuffle_probability=1.0, shuffle_holes=1, shuffle_size=0.25
    )
    image = _image()
    out, done = Corruption(config, SIZE, 0)(image)
    assert done == {"inpaint": False, "outpaint": False, "shuffle": True}
    changed = (out != image)[0]
    box = _box_of(changed)
    assert all(side.stop - side.start <= math.floor(0.25 * s) for side, s in zip(box, SIZE))
    # the same values, moved around inside the box
    inside = (slice(None), *box)
    assert torch.equal(out[inside].flatten().sort().values, image[inside].flatten().sort().values)
    assert changed.any()


def test_corruption_is_seeded_and_works_on_volumes_and_batches():
    volume = torch.rand(1, 16, 16, 16)
    a, b, c = (Corruption(RestorationConfig(), (16, 16, 16), seed)(volume)[0] for seed in (5, 5, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == volume.shape
    batch = Corruption(RestorationConfig(), SIZE, 0).batch(torch.stack([_image(), _image()]))
    assert batch.shape == (2, 1, *SIZE) and not torch.equal(batch[0], batch[1])  # one draw per image
    with pytest.raises(ValueError, match=r"image of spatial size \(16, 16, 16\); this corruption is for"):
        Corruption(RestorationConfig(), SIZE, 0)(volume)


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"inpaint_probability": 1.5}, "inpaint_probability must be in"),
        ({"holes": 3, "max_holes": 2}, "holes and max_holes"),
        ({"inpaint_size": (0.5, 0.2)}, "inpaint_size must be"),
        ({"shuffle_size": 0.0}, "shuffle_size must be in"),
    ],
)
def test_bad_settings_are_refused(changes, error):
    with pytest.raises(ValueError, match=error):
        RestorationConfig(**changes)


def test_dice_per_class_against_a_hand_calculation():
    target = torch.tensor([[[1, 1, 0, 0], [1, 1, 2, 2], [0, 0, 2, 2], [0, 0, 0, 0]]])
    prediction = torch.tensor([[[1, 0, 0, 0], [1, 1, 2, 2], [0, 2, 2, 2], [0, 0, 0, 2]]])
    # class 1: 3 predicted, 4 true, 3 shared -> 6/7; class 2: 6 predicted, 4 true, 4 shared -> 8/10
    scores = dice_per_class(prediction, target, num_classes=3)
    torch.testing.assert_close(scores, torch.tensor([[6 / 7, 0.8]]))
    with_background = dice_per_class(prediction, target, num_classes=3, include_background=True)
    # background: 7 predicted, 8 true, 6 shared -> 12/15
    torch.testing.assert_close(with_background[0, 0], torch.tensor(12 / 15))
    # a class absent from the target gets no score
    empty = dice_per_class(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 4, dtype=torch.long), 2)
    assert torch.isnan(empty).all()
    with pytest.raises(ValueError, match="differ"):
        dice_per_class(prediction, target[:, :3], 3)
