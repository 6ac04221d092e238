"""Samplers by name (``medfusion.samplers.schedulers``): every sampler on tiny 2D and 3D U-Nets
(shape, dtype, seeding), config round trips (SamplerConfig through dict/YAML/JSON, schedulers
through diffusers' save_config/from_pretrained), the model's noise schedule carried into every
sampler, name/alias/argument checks, DDIMSampler's true previous timestep against diffusers'
``t - T // steps`` quirk, full loops against known numbers with the exact denoiser of Gaussian
data (DDIM by hand, every sampler's output standard deviation), per-sample generators, and
guidance rescale."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

from medfusion.diffusion.objective import DiffusionConfig, betas_from_scheduler_config
from medfusion.samplers import (
    DEFAULT_STEPS,
    KARRAS_SAMPLERS,
    SAMPLERS,
    DDIMSampler,
    SamplerConfig,
    initial_noise,
    make_scheduler,
    rescale_guidance,
    sample_latents,
)
from tests.samplers._sampler_helpers import latent_shape, random_unet, seeded

NAMES = list(SAMPLERS)
SCHEDULE = DiffusionConfig().scheduler_config()
# diffusers' sigma schedulers call np.array(tensor, copy=False) (numpy 2 deprecation): not ours
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def alphas_cumprod64(schedule: dict = SCHEDULE) -> torch.Tensor:
    """bar-alpha_t of ``schedule`` computed here in float64: (T,)."""
    return torch.cumprod(1.0 - betas_from_scheduler_config(schedule), dim=0)


def public(config) -> dict:
    """A scheduler config without diffusers' bookkeeping keys (``_use_default_values`` ...)."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


class ZeroNoise(nn.Module):
    """A stand-in unconditional U-Net that predicts zero noise everywhere."""

    num_classes = None

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))  # sample_latents reads device and dtype from it

    def forward(self, x, t, labels=None):
        return torch.zeros_like(x)


class GaussianDenoiser(nn.Module):
    """The exact denoiser of Gaussian data x_0 ~ N(0, s^2 I) on the noise schedule ``schedule``.

    With a = bar-alpha_t, x_t = sqrt(a) x_0 + sqrt(1 - a) eps has variance a s^2 + 1 - a, so
    E[eps | x_t] = sqrt(1 - a) x_t / (a s^2 + 1 - a) and E[x_0 | x_t] = sqrt(a) s^2 x_t / (same);
    v = sqrt(a) eps - sqrt(1 - a) x_0. A (possibly fractional) timestep maps to a through the
    sigma interpolation of diffusers' Euler/Heun schedulers, sigma = sqrt((1 - a) / a); their
    model input x / sqrt(sigma^2 + 1) is exactly the DDPM x_t, so the same formula applies.
    """

    num_classes = None

    def __init__(self, s: float, schedule: dict = SCHEDULE):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))  # sample_latents reads device and dtype from it
        self.s = s
        self.prediction_type = schedule["prediction_type"]
        a = alphas_cumprod64(schedule).numpy()
        self.sigmas = np.sqrt((1 - a) / a)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        sigma = np.interp(t.detach().cpu().double().numpy(), np.arange(len(self.sigmas)), self.sigmas)
        return torch.from_numpy(1.0 / (1.0 + sigma**2))

    def forward(self, x, t, labels=None):
        a = self.alpha(t).view(-1, *[1] * (x.ndim - 1))
        xt = x.double()
        denominator = a * self.s**2 + 1 - a
        eps = torch.sqrt(1 - a) * xt / denominator
        if self.prediction_type == "epsilon":
            return eps.to(x.dtype)
        x0 = torch.sqrt(a) * self.s**2 * xt / denominator
        return (torch.sqrt(a) * eps - torch.sqrt(1 - a) * x0).to(x.dtype)


# every sampler on tiny U-Nets


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_every_sampler_shape_dtype_and_seeding(spatial_dims, name):
    unet, shape, labels = random_unet(spatial_dims), latent_shape(spatial_dims), torch.tensor([2, 0])
    config = SamplerConfig(name=name, steps=3, guidance_scale=3.0)

    def run(seed: int) -> torch.Tensor:
        return sample_latents(
            unet,
            config.scheduler(SCHEDULE),
            shape,
            labels,
            steps=config.steps,
            guidance_scale=config.guidance_scale,
            generator=seeded(seed),
        )

    first = run(0)
    assert first.shape == shape
    assert first.dtype == torch.float32
    assert torch.isfinite(first).all()
    torch.testing.assert_close(run(0), first, rtol=0, atol=0)
    assert not torch.allclose(run(1), first)


# config round trips


@pytest.mark.parametrize("name", NAMES)
def test_sampler_config_round_trip(name, tmp_path):
    config = SamplerConfig(
        name=name, steps=7, guidance_scale=2.5, guidance_rescale=0.25, eta=0.5 if name == "ddim" else 0.0
    )
    assert SamplerConfig.from_dict(config.to_dict()) == config
    (tmp_path / "sampler.yaml").write_text(config.to_yaml())
    assert SamplerConfig.load(tmp_path / "sampler.yaml") == config
    (tmp_path / "sampler.json").write_text(json.dumps(config.to_dict()))
    assert SamplerConfig.load(tmp_path / "sampler.json") == config
    # a default step count is written out as the number it stands for
    default = SamplerConfig(name=name)
    assert default.to_dict()["steps"] == DEFAULT_STEPS[name]
    assert SamplerConfig.from_dict(default.to_dict()) == default


@pytest.mark.parametrize("name", NAMES)
def test_scheduler_save_and_load_gives_the_same_sampler(name, tmp_path):
    scheduler = make_scheduler(name, SCHEDULE)
    scheduler.save_config(tmp_path)
    cls = type(scheduler)
    loaded = cls.from_pretrained(tmp_path)
    from_config = cls.from_config(cls.load_config(tmp_path))
    assert type(loaded) is cls and type(from_config) is cls
    assert public(loaded.config) == public(scheduler.config)
    assert public(from_config.config) == public(scheduler.config)
    # a sampler made from the saved config (the model folder's schedule) is the same again
    assert public(make_scheduler(name, dict(loaded.config)).config) == public(scheduler.config)

    unet, shape, labels = random_unet(2), latent_shape(2), torch.tensor([1, 2])

    def run(s) -> torch.Tensor:
        return sample_latents(unet, s, shape, labels, steps=3, guidance_scale=2.0, generator=seeded(5))

    expected = run(scheduler)
    torch.testing.assert_close(run(loaded), expected, rtol=0, atol=0)
    torch.testing.assert_close(run(from_config), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear", "cosine"])
def test_make_scheduler_keeps_the_model_schedule(name, prediction_type, beta_schedule):
    schedule = DiffusionConfig(
        beta_schedule=beta_schedule, prediction_type=prediction_type, beta_start=0.0002, beta_end=0.03
    ).scheduler_config()
    scheduler = make_scheduler(name, {**schedule, "not_a_scheduler_setting": 1})
    assert isinstance(scheduler, SAMPLERS[name][0])
    torch.testing.assert_close(
        scheduler.alphas_cumprod, DDPMScheduler.from_config(schedule).alphas_cumprod, rtol=0, atol=0
    )
    # and diffusers' float32 schedule is the one computed here in float64 (float32 round-off
    # accumulates to 1.3e-5 relative at cosine's tiny last bar-alpha)
    torch.testing.assert_close(
        scheduler.alphas_cumprod.double(), alphas_cumprod64(schedule), rtol=1e-4, atol=0
    )
    for key in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end"):
        assert scheduler.config[key] == schedule[key]
    assert scheduler.config.prediction_type == prediction_type
    assert scheduler.config.timestep_spacing == "trailing"
    assert "not_a_scheduler_setting" not in scheduler.config
    for key, value in SAMPLERS[name][1].items():
        assert scheduler.config[key] == value


def test_samplers_own_settings():
    dpm = make_scheduler("dpmpp-2m", SCHEDULE)
    assert dpm.config.algorithm_type == "dpmsolver++"
    assert dpm.config.solver_order == 2
    unipc = make_scheduler("unipc", SCHEDULE)
    assert unipc.config.solver_order == 2 and unipc.config.solver_type == "bh2"
    # the sampler's settings win over the same keys in the saved schedule
    other = {**SCHEDULE, "algorithm_type": "dpmsolver", "solver_order": 3}
    assert make_scheduler("dpmpp-2m", other).config.algorithm_type == "dpmsolver++"
    assert make_scheduler("dpmpp-2m", other).config.solver_order == 2


def test_eta_is_an_attribute_of_a_fresh_ddim_sampler():
    scheduler = SamplerConfig(name="ddim", eta=1.0).scheduler(SCHEDULE)
    assert isinstance(scheduler, DDIMSampler) and scheduler.eta == 1.0
    assert "eta" not in scheduler.config
    assert make_scheduler("ddim", SCHEDULE).eta == 0.0
    assert DDIMSampler.eta == 0.0  # the class default is untouched


# names and argument checks


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("DPM-Solver++", "dpmpp-2m"),
        ("dpmsolver++", "dpmpp-2m"),
        ("dpmpp_2m", "dpmpp-2m"),
        ("DDIM", "ddim"),
        (" Euler ", "euler"),
        ("UniPC", "unipc"),
    ],
)
def test_aliases_resolve(alias, name):
    assert SamplerConfig(name=alias).name == name
    assert isinstance(make_scheduler(alias, SCHEDULE), SAMPLERS[name][0])


@pytest.mark.parametrize("name", ["lms", "dpm", "", "ddim2"])
def test_unknown_names_raise_naming_the_allowed_ones(name):
    allowed = ", ".join(SAMPLERS)
    assert allowed == "ddpm, ddim, dpmpp-2m, euler, heun, unipc"
    with pytest.raises(ValueError, match=f"unknown sampler.*{allowed}"):
        make_scheduler(name, SCHEDULE)
    with pytest.raises(ValueError, match=f"unknown sampler.*{allowed}"):
        SamplerConfig(name=name)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "ddim"])
def test_eta_with_another_sampler_raises(name):
    with pytest.raises(ValueError, match="ddim sampler only"):
        make_scheduler(name, SCHEDULE, eta=0.5)
    with pytest.raises(ValueError, match="ddim sampler only"):
        SamplerConfig(name=name, eta=1.0)


@pytest.mark.parametrize("eta", [-0.5, -1e-9, 1.5, math.nan, math.inf])  # above 1: no real DDIM step
def test_bad_eta_raises(eta):
    with pytest.raises(ValueError, match=r"eta must be >= 0 and <= 1"):
        make_scheduler("ddim", SCHEDULE, eta=eta)
    with pytest.raises(ValueError, match=r"eta must be >= 0 and <= 1"):
        SamplerConfig(name="ddim", eta=eta)


@pytest.mark.parametrize("name", NAMES)
def test_steps_none_picks_the_default(name):
    assert SamplerConfig(name=name).steps == DEFAULT_STEPS[name]
    assert SamplerConfig(name=name, steps=None).steps == DEFAULT_STEPS[name]
    assert SamplerConfig(name=name, steps=1).steps == 1
    assert set(DEFAULT_STEPS) == set(SAMPLERS)


@pytest.mark.parametrize("steps", [0, -1, 2.5, True, "10"])
def test_bad_steps_raise(steps):
    with pytest.raises(ValueError, match="steps must be"):
        SamplerConfig(name="ddim", steps=steps)


@pytest.mark.parametrize("guidance_scale", [-0.5, math.nan, math.inf])
def test_bad_guidance_scale_raises(guidance_scale):
    with pytest.raises(ValueError, match="guidance_scale"):
        SamplerConfig(guidance_scale=guidance_scale)


def test_guidance_scale_zero_and_one_are_allowed():
    assert SamplerConfig(guidance_scale=0.0).guidance_scale == 0.0
    assert SamplerConfig(guidance_scale=1.0).guidance_scale == 1.0


@pytest.mark.parametrize("guidance_rescale", [-0.1, 1.01, math.nan])
def test_bad_guidance_rescale_raises(guidance_rescale):
    with pytest.raises(ValueError, match="guidance_rescale"):
        SamplerConfig(guidance_rescale=guidance_rescale)


@pytest.mark.parametrize("guidance_rescale", [0.0, 1.0])
def test_guidance_rescale_bounds_are_allowed(guidance_rescale):
    assert SamplerConfig(guidance_rescale=guidance_rescale).guidance_rescale == guidance_rescale


# DDIM's previous timestep


def zero_noise_factor(timesteps: list[int]) -> float:
    """x_0 / x_T of deterministic DDIM with a zero noise prediction: prod sqrt(a_prev / a_t) over
    consecutive timesteps, with a = 1 after the last step (set_alpha_to_one); float64."""
    alphas = alphas_cumprod64()
    factor = 1.0
    for t, t_prev in zip(timesteps, [*timesteps[1:], None]):
        a_prev = 1.0 if t_prev is None else float(alphas[t_prev])
        factor *= math.sqrt(a_prev / float(alphas[t]))
    return factor


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return float((out.double() - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("steps", [3, 7, 150])
def test_ddim_uses_the_true_previous_timestep(steps):
    shape = (2, 4, 4, 4)
    scheduler = make_scheduler("ddim", SCHEDULE)
    assert SCHEDULE["prediction_type"] == "epsilon" and scheduler.config.set_alpha_to_one
    out = sample_latents(ZeroNoise(), scheduler, shape, steps=steps, generator=seeded(3))
    timesteps = [int(t) for t in scheduler.timesteps]
    assert len(timesteps) == steps and timesteps[0] == 999
    gaps = {a - b for a, b in itertools.pairwise(timesteps)}
    assert gaps != {1000 // steps}  # the case diffusers gets wrong: not every gap is T // steps
    x_T = torch.randn(shape, generator=seeded(3)).double()  # drawn as sample_latents draws it
    expected = x_T * zero_noise_factor(timesteps)
    assert relative_error(out, expected) < 1e-6
    # diffusers' own DDIM steps to t - T // steps and lands elsewhere
    theirs = sample_latents(
        ZeroNoise(), DDIMScheduler.from_config(SCHEDULE), shape, steps=steps, generator=seeded(3)
    )
    assert relative_error(theirs, expected) > 1e-3


@pytest.mark.parametrize("steps", [1, 4, 10, 8])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_agrees_with_diffusers_when_steps_divide_T(steps, prediction_type):
    schedule = DiffusionConfig(prediction_type=prediction_type).scheduler_config()
    shape = (2, 4, 4, 4)
    scheduler = make_scheduler("ddim", schedule)
    out = sample_latents(ZeroNoise(), scheduler, shape, steps=steps, generator=seeded(3))
    theirs = sample_latents(
        ZeroNoise(), DDIMScheduler.from_config(schedule), shape, steps=steps, generator=seeded(3)
    )
    torch.testing.assert_close(out, theirs, rtol=1e-6, atol=1e-6)
    if prediction_type == "epsilon":
        x_T = torch.randn(shape, generator=seeded(3)).double()
        timesteps = [int(t) for t in scheduler.timesteps]
        assert relative_error(out, x_T * zero_noise_factor(timesteps)) < 1e-6

    # a model that is not zero, and eta = 1 (diffusers takes eta per step)
    unet = GaussianDenoiser(0.7, schedule)
    ours = make_scheduler("ddim", schedule, eta=1.0)
    out = sample_latents(unet, ours, shape, steps=steps, generator=seeded(4))
    theirs = DDIMScheduler.from_config(schedule)
    generator = seeded(4)
    x = initial_noise(shape, generator)
    theirs.set_timesteps(steps)
    for t in theirs.timesteps:
        x = theirs.step(unet(x, t.expand(shape[0])), t, x, eta=1.0, generator=generator).prev_sample
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)


# full loops against known numbers: the exact denoiser of Gaussian data


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_deterministic_ddim_with_the_exact_denoiser(prediction_type, spatial_dims):
    """Deterministic DDIM with the exact Gaussian denoiser is linear: x_prev = k_t x_t with
    k_t = sqrt(a_prev / a_t) (1 - sqrt(1 - a_t) c_t) + sqrt(1 - a_prev) c_t and
    c_t = sqrt(1 - a_t) / (a_t s^2 + 1 - a_t), the same for epsilon and v prediction."""
    s, steps = 0.5, 150
    schedule = DiffusionConfig(prediction_type=prediction_type).scheduler_config()
    shape = latent_shape(spatial_dims, n=3)
    scheduler = make_scheduler("ddim", schedule)
    out = sample_latents(GaussianDenoiser(s, schedule), scheduler, shape, steps=steps, generator=seeded(9))

    alphas = alphas_cumprod64(schedule)
    timesteps = [int(t) for t in scheduler.timesteps]
    assert len(timesteps) == steps and len({a - b for a, b in itertools.pairwise(timesteps)}) == 2
    factor = 1.0
    for t, t_prev in zip(timesteps, [*timesteps[1:], None]):
        a, a_prev = float(alphas[t]), 1.0 if t_prev is None else float(alphas[t_prev])
        c = math.sqrt(1 - a) / (a * s**2 + 1 - a)
        factor *= math.sqrt(a_prev / a) * (1 - math.sqrt(1 - a) * c) + math.sqrt(1 - a_prev) * c
    x_T = torch.randn(shape, generator=seeded(9)).double()
    assert relative_error(out, x_T * factor) < 1e-5
    # x_T (variance ~1) is shrunk to about the data's scale s (150 Euler-like steps, and the last
    # step returns E[x_0 | x_6], a little narrower than the data)
    assert 0.95 * s < factor < s


# (name, steps, eta, relative tolerance of the output std): about twice the largest deviation
# measured over seeds 0-3 (first order: 3.4%, ddim with eta 1: 6.8%, second order: 1.2%)
STATISTICAL = [
    ("ddpm", 250, 0.0, 0.07),
    ("ddim", 50, 0.0, 0.07),
    ("ddim", 50, 1.0, 0.13),
    ("dpmpp-2m", 25, 0.0, 0.03),
    ("unipc", 25, 0.0, 0.03),
    ("euler", 50, 0.0, 0.07),
    ("heun", 25, 0.0, 0.03),
]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize(("name", "steps", "eta", "tolerance"), STATISTICAL)
def test_every_sampler_reproduces_gaussian_data(name, steps, eta, tolerance, prediction_type):
    """Sampling with the exact denoiser of x_0 ~ N(0, s^2 I) gives samples of standard deviation
    about s. Every sampler's last step returns the denoiser's E[x_0 | x_t] at the last timestep t,
    whose standard deviation is s^2 sqrt(a_t / (a_t s^2 + 1 - a_t)) < s: that is the reference."""
    s = 0.5
    schedule = DiffusionConfig(prediction_type=prediction_type).scheduler_config()
    unet = GaussianDenoiser(s, schedule)
    scheduler = make_scheduler(name, schedule, eta=eta)
    out = sample_latents(unet, scheduler, (2048, 1, 2, 2), steps=steps, generator=seeded(0))
    assert torch.isfinite(out).all()
    a = float(unet.alpha(scheduler.timesteps[-1:]))
    reference = s**2 * math.sqrt(a / (a * s**2 + 1 - a))
    assert 0.93 * s < reference <= s
    std = float(out.double().std())
    assert abs(std - reference) < tolerance * reference, (std, reference)
    assert abs(float(out.double().mean())) < 0.02  # standard error 0.5 / sqrt(8192) = 0.0055
    # and the four entries of a sample are independent, as in the data
    correlation = torch.corrcoef(out.double().reshape(-1, 4).T)
    assert (correlation - torch.eye(4, dtype=torch.float64)).abs().max() < 0.1


# per-sample generators


@pytest.mark.parametrize(("name", "eta"), [("ddpm", 0.0), ("ddim", 1.0), ("euler", 0.0), ("dpmpp-2m", 0.0)])
def test_a_sample_depends_on_its_own_generator_only(name, eta):
    unet, labels, seeds = random_unet(2), torch.tensor([0, 2, 1]), [11, 12, 13]
    shape = latent_shape(2, n=3)

    def run(shape, labels, generator) -> torch.Tensor:
        scheduler = make_scheduler(name, SCHEDULE, eta=eta)
        return sample_latents(
            unet, scheduler, shape, labels, steps=3, guidance_scale=2.0, generator=generator
        )

    batch = run(shape, labels, [seeded(seed) for seed in seeds])
    for i, seed in enumerate(seeds):
        alone = run((1, *shape[1:]), labels[i : i + 1], seeded(seed))
        torch.testing.assert_close(batch[i : i + 1], alone, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(batch[i], batch[(i + 1) % 3])
    # a tuple works like a list
    again = run(shape, labels, tuple(seeded(seed) for seed in seeds))
    torch.testing.assert_close(again, batch, rtol=0, atol=0)


@pytest.mark.parametrize(("name", "eta"), [("ddpm", 0.0), ("ddim", 1.0)])
def test_stochastic_samplers_draw_their_noise_from_the_generators(name, eta):
    """The noise a stochastic sampler adds at every step comes from the given generators: not
    from torch's global generator, and reseeding them after the initial noise changes it."""
    shape = (2, 4, 4, 4)

    class Reseeder(nn.Module):
        """Predicts 0.1 x; reseeds ``generators`` at its first call (after the initial noise)."""

        num_classes = None

        def __init__(self, generators=()):
            super().__init__()
            self.dummy = nn.Parameter(torch.zeros(()))
            self.generators, self.calls = generators, 0

        def forward(self, x, t, labels=None):
            if self.calls == 0:
                for g in self.generators:
                    g.manual_seed(99)
            self.calls += 1
            return 0.1 * x

    def run(reseed: bool = False) -> torch.Tensor:
        generators = [seeded(1), seeded(2)]
        unet = Reseeder(generators if reseed else ())
        scheduler = make_scheduler(name, SCHEDULE, eta=eta)
        return sample_latents(unet, scheduler, shape, steps=4, generator=generators)

    plain = run()
    torch.manual_seed(123)
    torch.testing.assert_close(run(), plain, rtol=0, atol=0)
    assert not torch.allclose(run(reseed=True), plain)


def test_initial_noise_with_a_list_of_generators():
    shape = (3, 4, 5, 2)
    noise = initial_noise(shape, [seeded(7), seeded(8), seeded(7)])
    assert noise.shape == shape and noise.dtype == torch.float32
    for i, seed in enumerate([7, 8, 7]):
        torch.testing.assert_close(noise[i : i + 1], torch.randn((1, *shape[1:]), generator=seeded(seed)))
    torch.testing.assert_close(noise[0], noise[2], rtol=0, atol=0)
    assert not torch.allclose(noise[0], noise[1])
    # a single generator draws the batch at once
    torch.testing.assert_close(initial_noise(shape, seeded(7)), torch.randn(shape, generator=seeded(7)))


@pytest.mark.parametrize("count", [1, 3])
def test_wrong_number_of_generators_raises(count):
    generators = [seeded(i) for i in range(count)]
    with pytest.raises(ValueError, match=f"got {count} generators for 2 samples"):
        initial_noise((2, 4, 4), generators)
    with pytest.raises(ValueError, match="generators for 2 samples"):
        sample_latents(
            ZeroNoise(), make_scheduler("ddpm", SCHEDULE), (2, 4, 4, 4), steps=2, generator=generators
        )


# guidance rescale


def test_rescale_guidance_arithmetic():
    guided = torch.randn(3, 4, 5, 6) * torch.tensor([3.0, 0.5, 1.0]).view(-1, 1, 1, 1) + 0.2
    conditional = torch.randn(3, 4, 5, 6) * torch.tensor([1.0, 2.0, 0.1]).view(-1, 1, 1, 1)
    torch.testing.assert_close(rescale_guidance(guided, conditional, 0.0), guided, rtol=0, atol=0)
    full = rescale_guidance(guided, conditional, 1.0)
    dims = (1, 2, 3)
    torch.testing.assert_close(full.std(dim=dims), conditional.std(dim=dims))
    # a per-sample scaling of the guided prediction, not a shift
    ratio = full / guided
    torch.testing.assert_close(ratio, ratio[:, :1, :1, :1].expand_as(ratio))
    half = rescale_guidance(guided, conditional, 0.5)
    torch.testing.assert_close(half, 0.5 * full + 0.5 * guided)
    # 3D latents: the standard deviation over all of a sample's entries
    guided3, conditional3 = torch.randn(2, 4, 3, 4, 5) * 4, torch.randn(2, 4, 3, 4, 5)
    full3 = rescale_guidance(guided3, conditional3, 1.0)
    torch.testing.assert_close(full3.std(dim=(1, 2, 3, 4)), conditional3.std(dim=(1, 2, 3, 4)))
    # a constant guided prediction (std 0) stays finite
    assert torch.isfinite(rescale_guidance(torch.zeros(2, 3), torch.randn(2, 3), 1.0)).all()


@pytest.mark.parametrize("guidance_rescale", [-0.1, 1.5, math.nan])
def test_sample_latents_refuses_a_bad_guidance_rescale(guidance_rescale):
    with pytest.raises(ValueError, match="guidance_rescale"):
        sample_latents(
            random_unet(2),
            make_scheduler("ddim", SCHEDULE),
            latent_shape(2),
            torch.tensor([0, 1]),
            steps=2,
            guidance_scale=3.0,
            guidance_rescale=guidance_rescale,
        )


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_guidance_rescale_changes_guided_samples_deterministically(spatial_dims):
    unet, shape, labels = random_unet(spatial_dims), latent_shape(spatial_dims), torch.tensor([1, 0])

    def run(phi: float, guidance_scale: float = 3.0) -> torch.Tensor:
        scheduler = make_scheduler("dpmpp-2m", SCHEDULE)
        return sample_latents(
            unet,
            scheduler,
            shape,
            labels,
            steps=3,
            guidance_scale=guidance_scale,
            guidance_rescale=phi,
            generator=seeded(2),
        )

    plain, rescaled = run(0.0), run(0.7)
    assert torch.isfinite(rescaled).all()
    assert not torch.allclose(rescaled, plain)
    torch.testing.assert_close(run(0.7), rescaled, rtol=0, atol=0)
    # without guidance there is nothing to rescale
    torch.testing.assert_close(run(0.7, guidance_scale=1.0), run(0.0, guidance_scale=1.0), rtol=0, atol=0)


def test_ddim_sampler_step_takes_diffusers_ddim_arguments():
    """DDIMScheduler.step's keywords work on DDIMSampler: eta per call (None: the attribute),
    and explicit variance noise instead of a generator."""
    scheduler = make_scheduler("ddim", DiffusionConfig().scheduler_config())
    scheduler.set_timesteps(4)
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    prediction = 0.3 * x
    t = scheduler.timesteps[1]
    deterministic = scheduler.step(prediction, t, x).prev_sample
    noisy = scheduler.step(prediction, t, x, eta=1.0, generator=torch.Generator().manual_seed(1)).prev_sample
    scheduler.eta = 1.0
    by_attribute = scheduler.step(prediction, t, x, generator=torch.Generator().manual_seed(1)).prev_sample
    torch.testing.assert_close(noisy, by_attribute, rtol=0, atol=0)
    assert not torch.allclose(noisy, deterministic)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        scheduler.step(prediction, t, x, variance_noise=noise).prev_sample, by_attribute
    )
    with pytest.raises(ValueError, match="either generator or variance_noise"):
        scheduler.step(prediction, t, x, generator=torch.Generator(), variance_noise=noise)


# Karras et al.'s noise levels


@pytest.mark.parametrize("name", sorted(KARRAS_SAMPLERS))
def test_karras_sigmas_change_the_noise_levels_and_keep_the_loop_working(name):
    """ "DPM++ 2M Karras" and friends: other timesteps than the schedule's trailing spacing, the
    same end points (pure noise first, x_0 last), deterministic samples of the right shape."""
    plain, karras = make_scheduler(name, SCHEDULE), make_scheduler(name, SCHEDULE, karras_sigmas=True)
    plain.set_timesteps(10)
    karras.set_timesteps(10)
    assert karras.config.use_karras_sigmas and not plain.config.use_karras_sigmas
    assert not torch.equal(plain.timesteps.float(), karras.timesteps.float())
    assert float(karras.timesteps[0]) == pytest.approx(float(plain.timesteps[0]), abs=1.0)
    sampler = SamplerConfig(name, steps=4, karras_sigmas=True)
    assert SamplerConfig.from_dict(sampler.to_dict()) == sampler
    unet, shape, labels = random_unet(2), latent_shape(2), torch.tensor([0, 2])

    def draw(config):
        return sample_latents(unet, config.scheduler(SCHEDULE), shape, labels, 4, 3.0, seeded(5))

    first, second = draw(sampler), draw(sampler)
    assert first.shape == shape and torch.isfinite(first).all()
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert not torch.allclose(first, draw(SamplerConfig(name, steps=4)))


@pytest.mark.parametrize("name", sorted(set(SAMPLERS) - KARRAS_SAMPLERS))
def test_karras_sigmas_are_refused_where_they_do_not_apply(name):
    with pytest.raises(ValueError, match=f"karras_sigmas applies to .*; not to {name}"):
        SamplerConfig(name, karras_sigmas=True)
    with pytest.raises(ValueError, match="karras_sigmas applies to"):
        make_scheduler(name, SCHEDULE, karras_sigmas=True)
