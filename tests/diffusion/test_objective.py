"""The noise schedule and the training objective: agreement with diffusers' schedulers, config
checks, per-sample label dropout, min-SNR weights, targets, the loss and a toy training run."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from medfusion.diffusion.objective import (
    BETA_SCHEDULES,
    DiffusionConfig,
    DiffusionObjective,
    NoiseSchedule,
    betas_from_scheduler_config,
)
from medfusion.diffusion.unet import UNet


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def reference_alphas_cumprod(config: DiffusionConfig) -> torch.Tensor:
    """``alpha_bar`` in float64, written out here independently of the code under test."""
    steps = config.num_train_timesteps
    if config.beta_schedule == "linear":
        betas = torch.linspace(config.beta_start, config.beta_end, steps, dtype=torch.float64)
    elif config.beta_schedule == "scaled_linear":
        betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, steps, dtype=torch.float64) ** 2
    else:  # cosine: alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2), betas capped at 0.999
        s = torch.arange(steps + 1, dtype=torch.float64) / steps
        f = torch.cos((s + 0.008) / 1.008 * torch.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, dim=0)


def latents(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 4, 8, 8)


# the schedule against diffusers


@pytest.mark.parametrize("schedule", BETA_SCHEDULES)
def test_betas_match_diffusers(schedule):
    config = DiffusionConfig(beta_schedule=schedule)
    scheduler_config = config.scheduler_config()
    reference = DDPMScheduler.from_config(scheduler_config)
    betas = betas_from_scheduler_config(scheduler_config)
    assert betas.dtype == torch.float64
    assert betas.shape == (config.num_train_timesteps,)
    torch.testing.assert_close(betas, reference.betas.double(), rtol=1e-6, atol=0)
    schedule_ = NoiseSchedule(scheduler_config)
    assert schedule_.alphas_cumprod.dtype == torch.float64
    assert schedule_.num_train_timesteps == config.num_train_timesteps
    # diffusers takes the cumulative product in float32: its error grows where alpha_bar is tiny
    torch.testing.assert_close(
        schedule_.alphas_cumprod, reference.alphas_cumprod.double(), rtol=1e-6, atol=1e-9
    )
    torch.testing.assert_close(schedule_.alphas_cumprod, reference_alphas_cumprod(config), rtol=1e-12, atol=0)
    # a sampler built from the same config has the same schedule
    ddim = DDIMScheduler.from_config(scheduler_config)
    torch.testing.assert_close(schedule_.alphas_cumprod, ddim.alphas_cumprod.double(), rtol=1e-6, atol=1e-9)


def test_scheduler_config_names_diffusers_schedules():
    assert DiffusionConfig(beta_schedule="cosine").scheduler_config()["beta_schedule"] == "squaredcos_cap_v2"
    config = DiffusionConfig(
        num_train_timesteps=50,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.03,
        prediction_type="v_prediction",
    ).scheduler_config()
    assert config["num_train_timesteps"] == 50 and config["beta_schedule"] == "linear"
    assert config["beta_start"] == 1e-4 and config["beta_end"] == 0.03
    assert config["prediction_type"] == "v_prediction"
    assert DDPMScheduler.from_config(config).config.prediction_type == "v_prediction"


def test_betas_defaults_follow_diffusers():
    """A config without schedule keys means diffusers' defaults (linear, 1e-4 .. 0.02)."""
    betas = betas_from_scheduler_config({"num_train_timesteps": 100})
    torch.testing.assert_close(
        betas, DDPMScheduler(num_train_timesteps=100).betas.double(), rtol=1e-6, atol=0
    )


def test_unsupported_schedule_raises():
    with pytest.raises(ValueError, match="beta_schedule 'sigmoid' is not supported"):
        betas_from_scheduler_config({"num_train_timesteps": 10, "beta_schedule": "sigmoid"})


@pytest.mark.parametrize("schedule", BETA_SCHEDULES)
def test_add_noise_and_velocity_match_diffusers(schedule):
    scheduler_config = DiffusionConfig(beta_schedule=schedule).scheduler_config()
    reference = DDPMScheduler.from_config(scheduler_config)
    noise_schedule = NoiseSchedule(scheduler_config)
    x0, noise = latents(6), latents(6)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    x_t = noise_schedule.add_noise(x0, noise, t)
    assert x_t.dtype == torch.float32 and x_t.shape == x0.shape
    torch.testing.assert_close(x_t, reference.add_noise(x0, noise, t), rtol=0, atol=1e-5)
    v = noise_schedule.velocity(x0, noise, t)
    assert v.dtype == torch.float32
    torch.testing.assert_close(v, reference.get_velocity(x0, noise, t), rtol=0, atol=1e-5)
    # 3D latents broadcast alike
    x0_3d, noise_3d = torch.randn(6, 2, 4, 4, 4), torch.randn(6, 2, 4, 4, 4)
    torch.testing.assert_close(
        noise_schedule.add_noise(x0_3d, noise_3d, t),
        reference.add_noise(x0_3d, noise_3d, t),
        rtol=0,
        atol=1e-5,
    )


def test_snr():
    config = DiffusionConfig()
    ab = reference_alphas_cumprod(config)
    t = torch.tensor([0, 5, 999])
    snr = NoiseSchedule(config.scheduler_config()).snr(t)
    assert snr.dtype == torch.float64
    torch.testing.assert_close(snr, ab[t] / (1 - ab[t]))
    assert (snr.diff() < 0).all()


# config checks


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"beta_schedule": "quadratic"}, "diffusion.beta_schedule"),
        ({"prediction_type": "sample"}, "diffusion.prediction_type"),
        ({"loss": "huber"}, "diffusion.loss"),
        ({"label_dropout": 1.0}, "diffusion.label_dropout"),
        ({"label_dropout": -0.1}, "diffusion.label_dropout"),
        ({"min_snr_gamma": 0.0}, "diffusion.min_snr_gamma"),
        ({"min_snr_gamma": -5.0}, "diffusion.min_snr_gamma"),
        ({"beta_start": 0.02, "beta_end": 0.01}, "diffusion.beta_start"),
        ({"beta_start": 0.01, "beta_end": 0.01}, "diffusion.beta_start"),
        ({"beta_start": 0.0}, "diffusion.beta_start"),
        ({"beta_end": 1.0}, "beta_end"),
        ({"num_train_timesteps": 1}, "diffusion.num_train_timesteps"),
    ],
)
def test_config_validation(fields, message):
    with pytest.raises(ValueError, match=message):
        DiffusionConfig(**fields)


def test_config_dict_round_trip():
    config = DiffusionConfig(
        beta_schedule="cosine", prediction_type="v_prediction", min_snr_gamma=5, loss="l1"
    )
    assert DiffusionConfig.from_dict(config.to_dict()) == config
    assert config.min_snr_gamma == 5
    with pytest.raises(ValueError, match="label_dropout"):
        DiffusionConfig.from_dict({"label_dropout": 1.5})


# label dropout


def test_drop_labels_is_per_sample():
    objective = DiffusionObjective(DiffusionConfig(label_dropout=0.5))
    labels = torch.randint(0, 3, (4000,))
    original = labels.clone()
    dropped = objective.drop_labels(labels, null_class=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(labels, original)  # not in place
    assert dropped.dtype == labels.dtype and dropped.shape == labels.shape
    is_dropped = dropped != labels
    assert (dropped[is_dropped] == 3).all()  # dropped entries are the null class
    assert torch.equal(dropped[~is_dropped], labels[~is_dropped])
    assert 0.45 <= is_dropped.float().mean().item() <= 0.55
    # within one small batch some labels are dropped and some kept (not all or nothing per batch)
    for seed in range(5):
        batch = torch.zeros(32, dtype=torch.long)
        out = objective.drop_labels(batch, null_class=3, generator=torch.Generator().manual_seed(seed))
        assert 0 < (out == 3).sum() < 32, seed
    # reproducible with a generator
    again = objective.drop_labels(labels, null_class=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again, dropped)


def test_drop_labels_without_dropout_changes_nothing():
    objective = DiffusionObjective(DiffusionConfig(label_dropout=0.0))
    labels = torch.randint(0, 3, (1000,))
    assert torch.equal(objective.drop_labels(labels, null_class=3), labels)


# min-SNR weights and targets


@pytest.mark.parametrize("schedule", BETA_SCHEDULES)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights(schedule, prediction_type, gamma):
    config = DiffusionConfig(beta_schedule=schedule, prediction_type=prediction_type, min_snr_gamma=gamma)
    objective = DiffusionObjective(config)
    t = torch.arange(0, 1000, 7)
    ab = reference_alphas_cumprod(config)[t]
    snr = ab / (1 - ab)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    expected = clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1)
    weights = objective.weights(t)
    assert weights.dtype == torch.float32 and weights.shape == t.shape
    torch.testing.assert_close(weights.double(), expected, rtol=1e-6, atol=0)
    assert (weights > 0).all() and (weights <= 1).all()
    if prediction_type == "epsilon":  # full weight where the SNR is below gamma
        assert (weights[snr <= gamma] == 1).all()


def test_no_min_snr_means_no_weights():
    assert DiffusionObjective(DiffusionConfig()).weights(torch.arange(10)) is None


def test_targets():
    x0, noise, t = latents(), latents(), torch.tensor([0, 100, 500, 999])
    eps = DiffusionObjective(DiffusionConfig(prediction_type="epsilon"))
    assert torch.equal(eps.target(x0, noise, t), noise)
    config = DiffusionConfig(prediction_type="v_prediction")
    ab = reference_alphas_cumprod(config)[t][:, None, None, None]  # float64
    expected = ab.sqrt().float() * noise - (1 - ab).sqrt().float() * x0
    torch.testing.assert_close(DiffusionObjective(config).target(x0, noise, t), expected, rtol=0, atol=1e-6)


# the loss


class Recorder(torch.nn.Module):
    """A fake denoiser that records its inputs and returns a fixed function of them."""

    def __init__(self, scale: float = 0.5, shape: tuple[int, ...] | None = None):
        super().__init__()
        self.scale = scale
        self.shape = shape
        self.calls: list[tuple] = []

    def forward(self, x_t, t, labels):
        self.calls.append((x_t, t, labels))
        return self.scale * x_t if self.shape is None else torch.zeros(self.shape)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("loss", ["mse", "l1"])
@pytest.mark.parametrize("gamma", [None, 5.0])
def test_loss_replays_the_documented_recipe(prediction_type, loss, gamma):
    """The loss draws t, then the noise, then the label dropout from the global generator."""
    config = DiffusionConfig(
        prediction_type=prediction_type, loss=loss, min_snr_gamma=gamma, label_dropout=0.5
    )
    objective = DiffusionObjective(config)
    x0, labels = latents(8), torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    model = Recorder()
    torch.manual_seed(123)
    value, logs = objective.loss(model, x0, labels, null_class=2)

    torch.manual_seed(123)
    t = torch.randint(0, 1000, (8,))
    noise = torch.randn_like(x0)
    dropped = torch.where(torch.rand(8) < 0.5, torch.full_like(labels, 2), labels)
    x_t_seen, t_seen, labels_seen = model.calls[0]
    assert torch.equal(t_seen, t)
    assert torch.equal(labels_seen, dropped)
    ab = reference_alphas_cumprod(config)[t][:, None, None, None]  # float64
    signal, sigma = ab.sqrt().float(), (1 - ab).sqrt().float()
    x_t = signal * x0 + sigma * noise
    torch.testing.assert_close(x_t_seen, x_t, rtol=0, atol=1e-6)
    target = noise if prediction_type == "epsilon" else signal * noise - sigma * x0
    diff = 0.5 * x_t_seen - target
    per_sample = (diff.square() if loss == "mse" else diff.abs()).flatten(1).mean(1)
    weights = objective.weights(t)
    expected = per_sample.mean() if weights is None else (per_sample * weights).mean()
    assert value.ndim == 0
    torch.testing.assert_close(value, expected)
    assert set(logs) == {loss}
    torch.testing.assert_close(logs[loss], per_sample.mean())


def test_loss_is_reproducible_with_a_seed():
    objective = DiffusionObjective(DiffusionConfig(label_dropout=0.3))
    model = UNet(
        spatial_dims=2,
        in_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        num_classes=2,
    )
    x0, labels = latents(), torch.tensor([0, 1, 1, 0])
    torch.manual_seed(7)
    first, _ = objective.loss(model, x0, labels, null_class=2)
    torch.manual_seed(7)
    second, _ = objective.loss(model, x0, labels, null_class=2)
    assert first.item() == second.item()
    third, _ = objective.loss(model, x0, labels, null_class=2)
    assert third.item() != first.item()


def test_loss_without_labels_passes_none():
    model = Recorder()
    DiffusionObjective(DiffusionConfig()).loss(model, latents())
    assert model.calls[0][2] is None


def test_loss_with_labels_needs_a_null_class():
    with pytest.raises(ValueError, match="null_class"):
        DiffusionObjective(DiffusionConfig()).loss(Recorder(), latents(), torch.tensor([0, 1, 0, 1]))


def test_loss_rejects_a_prediction_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"predicted \(4, 4, 4, 4\) for latents \(4, 4, 8, 8\)"):
        DiffusionObjective(DiffusionConfig()).loss(Recorder(shape=(4, 4, 4, 4)), latents())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_decreases_on_a_toy_problem(prediction_type):
    """A tiny conditional U-Net learns two classes of constant latents (+1 and -1); about 1.5 s."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1] * 8)
    x0 = (1.0 - 2.0 * labels.float())[:, None, None, None] + 0.05 * torch.randn(
        16, 4, 8, 8, generator=generator
    )
    model = UNet(
        spatial_dims=2,
        in_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        num_classes=2,
    ).train()
    objective = DiffusionObjective(DiffusionConfig(prediction_type=prediction_type, label_dropout=0.1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss, _ = objective.loss(model, x0, labels, null_class=model.null_class)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert torch.isfinite(torch.tensor(losses)).all()
    assert last < 0.7 * first, (first, last)
