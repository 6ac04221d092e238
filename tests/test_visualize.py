import numpy as np
import pytest
import torch
from PIL import Image

from medfusion.visualize import make_grid, mid_slices, reconstruction_grid, save_grid, to_uint8


def test_mid_slices_pick_the_middle_indices():
    depth, height, width = 4, 6, 8
    x = torch.zeros(2, 1, depth, height, width)
    x[:, :, depth // 2] = 1.0  # the axial middle plane
    out = mid_slices(x)
    assert out.shape == (2, 1, max(depth, height), 2 * width + height)
    axial, coronal, sagittal = out[..., :width], out[..., width : 2 * width], out[..., 2 * width :]
    assert (axial[..., :height, :] == 1).all()
    # in the coronal (D x W) and sagittal (D x H) views the plane is row D // 2, padding below is -1
    for view in (coronal, sagittal):
        expected = torch.zeros(max(depth, height), view.shape[-1])
        expected[depth // 2] = 1.0
        expected[depth:] = -1.0
        assert torch.equal(view[0, 0], expected)


def test_mid_slices_place_each_view():
    x = torch.randn(1, 2, 7, 5, 3)  # D > H: the axial view is the one padded
    out = mid_slices(x, pad_value=-5.0)
    assert out.shape == (1, 2, 7, 3 + 3 + 5)
    assert torch.equal(out[:, :, :5, :3], x[:, :, 3])
    assert (out[:, :, 5:, :3] == -5.0).all()
    assert torch.equal(out[:, :, :, 3:6], x[:, :, :, 2])
    assert torch.equal(out[:, :, :, 6:], x[:, :, :, :, 1])


def test_mid_slices_leave_images_alone_and_reject_other_shapes():
    images = torch.randn(2, 1, 8, 8)
    assert mid_slices(images) is images
    with pytest.raises(ValueError, match=r"\(1, 8, 8\)"):
        mid_slices(torch.zeros(1, 8, 8))


def test_make_grid_layout():
    images = torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1).expand(5, 2, 4, 6) / 10
    grid = make_grid(images, nrow=3, padding=2, pad_value=-1.0)
    assert grid.shape == (2, 2 * (4 + 2) + 2, 3 * (6 + 2) + 2)
    for i in range(5):
        top, left = (i // 3) * 6 + 2, (i % 3) * 8 + 2
        assert (grid[:, top : top + 4, left : left + 6] == i / 10).all()
    assert (grid[:, 8:12, 18:24] == -1).all()  # the unused last cell
    assert (grid[:, :2] == -1).all() and (grid[:, :, :2] == -1).all()  # the frame
    assert (grid == -1).sum() == grid.numel() - 5 * 2 * 4 * 6


def test_make_grid_without_padding_and_short_rows():
    images = torch.randn(3, 1, 4, 4)
    grid = make_grid(images, nrow=8, padding=0)
    assert grid.shape == (1, 4, 12)  # fewer images than nrow: one row of 3
    assert torch.equal(grid[:, :, 4:8], images[1])


def test_make_grid_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mid_slices"):
        make_grid(torch.zeros(1, 1, 4, 4, 4))
    with pytest.raises(ValueError, match="nrow"):
        make_grid(torch.zeros(1, 1, 4, 4), nrow=0)
    with pytest.raises(ValueError, match="empty"):
        make_grid(torch.zeros(0, 1, 4, 4))


def test_to_uint8_grey_rgb_and_other_channel_counts():
    grey = torch.tensor([[[-1.0, 0.0, 1.0, 3.0]]])
    assert to_uint8(grey).tolist() == [[0, 128, 255, 255]]
    rgb = torch.stack([torch.full((2, 3), v) for v in (-1.0, 0.0, 1.0)])
    out = to_uint8(rgb)
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == [0, 128, 255]
    latents = torch.stack([torch.full((2, 3), float(c)) for c in range(4)])  # 4 channels
    out = to_uint8(latents, value_range=None)  # own min/max: 0 -> 0, 3 -> 255
    assert out.shape == (2, 4 * 3)
    assert out[0].tolist() == [0] * 3 + [85] * 3 + [170] * 3 + [255] * 3
    with pytest.raises(ValueError, match="value_range"):
        to_uint8(grey, value_range=(1.0, 1.0))


@pytest.mark.parametrize(
    ("shape", "size", "mode"), [((5, 1, 8, 8), (42, 22), "L"), ((2, 3, 4, 6, 8), (50, 10), "RGB")]
)
def test_save_grid_writes_png(tmp_path, shape, size, mode):
    images = torch.rand(shape) * 2 - 1
    path = save_grid(images, tmp_path / "sub" / "grid.png", nrow=4)
    assert path == tmp_path / "sub" / "grid.png"
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == size and image.mode == mode
        array = np.asarray(image)
    np.testing.assert_array_equal(array, to_uint8(make_grid(mid_slices(images), nrow=4)))


def test_save_grid_requires_png_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"\.png"):
        save_grid(torch.zeros(1, 1, 4, 4), tmp_path / "grid.jpg")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("shape", [(3, 1, 8, 8), (3, 2, 4, 6, 8)])
def test_reconstruction_grid_interleaves_pairs(shape):
    inputs, reconstructions = torch.randn(shape), torch.randn(shape)
    out = reconstruction_grid(inputs, reconstructions)
    expected_input, expected_recon = mid_slices(inputs), mid_slices(reconstructions)
    assert out.shape == (6, *expected_input.shape[1:])
    for i in range(3):
        assert torch.equal(out[2 * i], expected_input[i])
        assert torch.equal(out[2 * i + 1], expected_recon[i])


def test_reconstruction_grid_rejects_shape_mismatch():
    with pytest.raises(ValueError, match=r"\(2, 1, 8, 8\).*\(2, 1, 8, 4\)"):
        reconstruction_grid(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 4))
