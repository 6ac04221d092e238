"""``medfusion evaluate-vae``: reconstruction metrics of a saved VAE on a folder, equal to the
metrics computed directly; the run's data settings are used; mismatched images are refused."""

from __future__ import annotations

import json

import pytest
import torch

from medfusion.autoencoders.vae import VAE
from medfusion.cli import main
from medfusion.config import DataConfig
from medfusion.data.dataset import ImageFolderDataset, build_transform
from medfusion.training.vae import VAERunConfig, evaluate_reconstruction, evaluate_vae
from medfusion.utils import atomic_write_text


@pytest.fixture
def saved_vae(tmp_path):
    torch.manual_seed(0)
    vae = VAE(spatial_dims=2, in_channels=1, block_out_channels=(4, 8), layers_per_block=1, norm_num_groups=4)
    vae.set_scaling_factor(0.5)
    vae.save_pretrained(tmp_path / "run" / "vae", safe_serialization=True)
    return tmp_path / "run" / "vae"


def test_metrics_equal_a_direct_computation_with_the_runs_data_settings(
    saved_vae, crops_2d, tmp_path, capsys
):
    data = DataConfig(normalization="minmax", resize=(8, 8))
    atomic_write_text(saved_vae.parent / "config.yaml", VAERunConfig(data=data).to_yaml())
    out = tmp_path / "eval.json"
    assert (
        main(["evaluate-vae", "--vae", str(saved_vae), "--data", str(crops_2d), "--out", str(out), "--quiet"])
        == 0
    )
    written = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == written
    dataset = ImageFolderDataset(crops_2d, labels="none", transform=build_transform(data))
    vae = VAE.from_pretrained(saved_vae).eval()
    direct = evaluate_reconstruction(vae, dataset, 1000, 16, "cpu", progress=False)
    assert written["count"] == written["images"] == 20
    for key in ("psnr", "ssim", "ms_ssim"):
        assert written[key] == pytest.approx(direct[key], rel=1e-6)
    # without the run's config the defaults apply: another size, other numbers
    (saved_vae.parent / "config.yaml").unlink()
    assert evaluate_vae(saved_vae, crops_2d, progress=False)["psnr"] != pytest.approx(written["psnr"])


def test_volumes_for_a_2d_vae_and_a_missing_vae_are_refused(saved_vae, crops_3d, tmp_path, capsys):
    assert main(["evaluate-vae", "--vae", str(saved_vae), "--data", str(crops_3d), "--quiet"]) == 1
    assert "3D images with 1 channel(s); the VAE takes 2D with 1" in capsys.readouterr().err
    assert main(["evaluate-vae", "--vae", str(tmp_path / "nothing"), "--data", str(crops_3d), "--quiet"]) == 1
    assert "no trained VAE here" in capsys.readouterr().err
