"""The sampling loop: output shapes for several diffusers schedulers in 2D and 3D, seeding,
batched classifier-free guidance and its arithmetic, class-label handling and checks, the
per-step callback, and a full DDIM loop against a result computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from torch import nn

from medfusion.diffusion.objective import DiffusionConfig
from medfusion.samplers import sample_latents
from tests.samplers._sampler_helpers import NUM_CLASSES, latent_shape, random_unet, seeded

# diffusers' sigma schedulers call np.array(tensor, copy=False) (numpy 2 deprecation): not ours
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def scheduler(cls=DDIMScheduler):
    return cls.from_config(DiffusionConfig().scheduler_config())


class Recorder(nn.Module):
    """Wraps a denoiser and records every forward call: (batch size, timesteps, labels)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []

    @property
    def num_classes(self):
        return self.unet.num_classes

    @property
    def null_class(self):
        return self.unet.null_class

    def forward(self, x, t, labels=None):
        self.calls.append((x.shape[0], t.clone(), None if labels is None else labels.clone()))
        return self.unet(x, t, labels)


class FakeDenoiser(nn.Module):
    """A stand-in U-Net whose prediction is ``fn(x, t, labels)``; ``fn`` None predicts zeros."""

    def __init__(self, num_classes: int | None = None, fn=None):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))  # sample_latents reads device and dtype from it
        self.num_classes = num_classes
        self.fn = fn

    @property
    def null_class(self):
        return self.num_classes

    def forward(self, x, t, labels=None):
        if self.fn is None:
            return torch.zeros_like(x)
        return self.fn(x, t, labels)


# shapes and seeding


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize(
    "cls",
    [
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        UniPCMultistepScheduler,
        HeunDiscreteScheduler,
    ],
)
def test_output_shape_and_dtype(spatial_dims, cls):
    shape = latent_shape(spatial_dims)
    labels = torch.tensor([0, 2])
    out = sample_latents(
        random_unet(spatial_dims),
        scheduler(cls),
        shape,
        labels,
        steps=3,
        guidance_scale=2.0,
        generator=seeded(),
    )
    assert out.shape == shape
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("cls", [DDIMScheduler, DDPMScheduler])
def test_same_seed_same_samples(spatial_dims, cls):
    unet, shape, labels = random_unet(spatial_dims), latent_shape(spatial_dims), torch.tensor([1, 0])

    def run(seed: int) -> torch.Tensor:
        return sample_latents(
            unet, scheduler(cls), shape, labels, steps=3, guidance_scale=3.0, generator=seeded(seed)
        )

    first = run(0)
    torch.testing.assert_close(run(0), first, rtol=0, atol=0)
    assert not torch.allclose(run(1), first)


# classifier-free guidance


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_guidance_is_one_batched_call_per_step(spatial_dims):
    unet = Recorder(random_unet(spatial_dims))
    labels = torch.tensor([2, 0])
    steps = 4
    sample_latents(unet, scheduler(), latent_shape(spatial_dims), labels, steps=steps, guidance_scale=4.0)
    assert len(unet.calls) == steps
    for batch, t, call_labels in unet.calls:
        assert batch == 4
        assert t.shape == (4,) and (t == t[0]).all()
        assert call_labels.tolist() == [2, 0, NUM_CLASSES, NUM_CLASSES]  # conditional, then null
    assert [int(t[0]) for _, t, _ in unet.calls] == scheduler_timesteps(steps)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_no_guidance_is_one_plain_call_per_step(spatial_dims):
    unet = Recorder(random_unet(spatial_dims))
    steps = 3
    sample_latents(unet, scheduler(), latent_shape(spatial_dims), torch.tensor([1, 2]), steps=steps)
    assert len(unet.calls) == steps
    for batch, t, call_labels in unet.calls:
        assert batch == 2 and t.shape == (2,)
        assert call_labels.tolist() == [1, 2]


def scheduler_timesteps(steps: int) -> list[int]:
    s = scheduler()
    s.set_timesteps(steps)
    return [int(t) for t in s.timesteps]


@pytest.mark.parametrize(
    "cls", [DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler]
)
@pytest.mark.parametrize("guidance_scale", [0.0, 2.5, -1.0])
def test_guided_step_matches_the_formula(cls, guidance_scale):
    def fn(x, t, labels):
        level = (labels.float() + 1.0).view(-1, 1, 1, 1)
        return 0.3 * x + 0.1 * level + 1e-4 * t.float().view(-1, 1, 1, 1)

    shape = (2, 4, 8, 4)
    labels = torch.tensor([0, 2])
    null = torch.full_like(labels, NUM_CLASSES)

    def by_hand(combine) -> torch.Tensor:
        """One step of ``cls`` done here: the same noise, scaling and scheduler step."""
        s = scheduler(cls)
        s.set_timesteps(1)
        (t,) = s.timesteps
        generator = seeded(7)
        x = torch.randn(shape, generator=generator) * s.init_noise_sigma
        model_input, ts = s.scale_model_input(x, t), t.expand(2)
        prediction = combine(fn(model_input, ts, labels), fn(model_input, ts, null))
        return s.step(prediction, t, x, generator=generator).prev_sample

    def sample(w: float) -> torch.Tensor:
        unet = FakeDenoiser(NUM_CLASSES, fn)
        return sample_latents(
            unet, scheduler(cls), shape, labels, steps=1, guidance_scale=w, generator=seeded(7)
        )

    out = sample(guidance_scale)
    expected = by_hand(lambda cond, uncond: uncond + guidance_scale * (cond - uncond))
    torch.testing.assert_close(out, expected)
    # w = 1 is the conditional prediction alone
    plain = sample(1.0)
    torch.testing.assert_close(plain, by_hand(lambda cond, uncond: cond))
    assert not torch.allclose(plain, out)


# class labels


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_no_labels_sample_the_null_class(spatial_dims):
    unet = Recorder(random_unet(spatial_dims))
    shape = latent_shape(spatial_dims)
    out = sample_latents(unet, scheduler(), shape, None, steps=2, generator=seeded())
    assert len(unet.calls) == 2
    for batch, _, call_labels in unet.calls:
        assert batch == 2
        assert call_labels.tolist() == [NUM_CLASSES, NUM_CLASSES]
    explicit = sample_latents(
        unet, scheduler(), shape, torch.full((2,), NUM_CLASSES), steps=2, generator=seeded()
    )
    torch.testing.assert_close(out, explicit, rtol=0, atol=0)
    conditional = sample_latents(unet, scheduler(), shape, torch.tensor([0, 1]), steps=2, generator=seeded())
    assert not torch.allclose(conditional, out)


def test_unconditional_model_samples_without_labels():
    unet = Recorder(random_unet(2, num_classes=None))
    out = sample_latents(unet, scheduler(), latent_shape(2), steps=2, guidance_scale=3.0)
    assert out.shape == latent_shape(2)
    assert [(batch, labels) for batch, _, labels in unet.calls] == [(2, None), (2, None)]
    with pytest.raises(ValueError, match="unconditional"):
        sample_latents(unet, scheduler(), latent_shape(2), torch.tensor([0, 1]), steps=2)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([0, NUM_CLASSES + 1], "must be in"),
        ([-1, 0], "must be in"),
        ([0, 1, 2], "shape"),
        ([0], "shape"),
        ([[0], [1]], "shape"),
        (0, "shape"),
    ],
)
def test_bad_labels_raise(labels, message):
    unet = Recorder(random_unet(2))
    with pytest.raises(ValueError, match=message):
        sample_latents(unet, scheduler(), latent_shape(2), torch.tensor(labels), steps=2)
    assert not unet.calls


def test_null_class_label_is_allowed_and_lists_are_taken():
    unet = Recorder(random_unet(2))
    sample_latents(unet, scheduler(), latent_shape(2), [NUM_CLASSES, 0], steps=1, guidance_scale=2.0)
    assert unet.calls[0][2].tolist() == [NUM_CLASSES, 0, NUM_CLASSES, NUM_CLASSES]


@pytest.mark.parametrize("steps", [0, -1])
def test_bad_steps_raise(steps):
    with pytest.raises(ValueError, match="steps"):
        sample_latents(FakeDenoiser(), scheduler(), (1, 4, 4, 4), steps=steps)


# callback


def test_callback_once_per_step():
    seen = []
    steps = 5
    out = sample_latents(
        random_unet(2),
        scheduler(),
        latent_shape(2),
        torch.tensor([0, 1]),
        steps=steps,
        generator=seeded(),
        callback=lambda i, x: seen.append((i, x.clone())),
    )
    assert [i for i, _ in seen] == list(range(steps))
    assert all(x.shape == out.shape for _, x in seen)
    torch.testing.assert_close(seen[-1][1], out, rtol=0, atol=0)


# a full loop against a known result


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("steps", [1, 4, 10])
def test_ddim_with_zero_noise_prediction_rescales_x_t(spatial_dims, steps):
    """With eps = 0 the deterministic DDIM update is x_prev = sqrt(a_prev / a_t) x_t, with a = 1
    after the last step (set_alpha_to_one)."""
    shape = latent_shape(spatial_dims)
    s = scheduler()
    assert s.config.set_alpha_to_one and s.config.num_train_timesteps % steps == 0
    out = sample_latents(FakeDenoiser(), s, shape, steps=steps, generator=seeded(3))

    alphas = DDIMScheduler.from_config(DiffusionConfig().scheduler_config()).alphas_cumprod.double()
    T = len(alphas)
    timesteps = [T - 1 - k * (T // steps) for k in range(steps)]  # trailing spacing: 999, ...
    assert [int(t) for t in s.timesteps] == timesteps
    factor = 1.0
    for t, t_prev in zip(timesteps, [*timesteps[1:], None]):
        a_prev = 1.0 if t_prev is None else float(alphas[t_prev])
        factor *= math.sqrt(a_prev / float(alphas[t]))
    x_T = torch.randn(shape, generator=seeded(3)).double()  # drawn as sample_latents draws it
    torch.testing.assert_close(out.double(), x_T * factor, rtol=1e-5, atol=1e-6)
    assert factor > 10  # x_T is scaled up to the (noise-free) x_0 estimate


def test_float_labels_are_refused():
    with pytest.raises(ValueError, match="class labels must be integers"):
        labels = torch.tensor([0.7, 1.0])
        sample_latents(random_unet(2), scheduler(DDIMScheduler), latent_shape(2), labels, steps=1)


def test_unconditional_samples_of_a_conditional_model_are_not_doubled():
    unet = random_unet(2)
    sizes = []
    unet.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    sample_latents(unet, scheduler(DDIMScheduler), latent_shape(2), None, steps=2, guidance_scale=3.0)
    assert sizes == [latent_shape(2)[0]] * 2
