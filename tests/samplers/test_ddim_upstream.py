"""``DDIMSampler`` wraps diffusers' ``DDIMScheduler.step``: the upstream source it relies on is
pinned (a change fails here, with what to re-check), and the wrapper leaves the scheduler's state
as it found it, also when the step raises."""

from __future__ import annotations

import hashlib
import inspect

import diffusers
import pytest
import torch
from diffusers import DDIMScheduler

from medfusion.diffusion.objective import DiffusionConfig
from medfusion.samplers import DDIMSampler, make_scheduler

# SHA-256 of inspect.getsource(...) of the upstream methods DDIMSampler.step relies on, as checked
# with diffusers 0.42.1
PINNED = {
    "step": "00121d2b78c919c1e531b7238270c5482c8479eae3dc6a8ddc80f2648d55ce40",
    "_get_variance": "35ab9a78643262a83aca9a86a339b2dd2dab528f9a02b59e655f9271a8c58dc8",
}
CHECKED_WITH = "0.42.1"


@pytest.mark.parametrize("name", sorted(PINNED))
def test_the_upstream_ddim_step_is_the_one_the_wrapper_was_checked_against(name):
    source = inspect.getsource(getattr(DDIMScheduler, name))
    digest = hashlib.sha256(source.encode()).hexdigest()
    assert digest == PINNED[name], (
        f"diffusers.schedulers.scheduling_ddim.DDIMScheduler.{name} changed (diffusers "
        f"{diffusers.__version__}; checked with {CHECKED_WITH}). Re-check DDIMSampler.step and "
        "DDIMSampler._true_previous_alpha in medfusion/samplers/schedulers.py: they assume that "
        "step reads α_{t-1} as alphas_cumprod[t - T // steps] (final_alpha_cumprod below 0), in "
        f"step and in _get_variance, and nothing else at that index. Then record the new hash: {digest}"
    )


def test_the_wrapper_uses_the_true_previous_timestep():
    """Where diffusers' previous timestep is not the next one (150 steps of 1000), the step
    equals diffusers' step on a schedule whose next timestep is that previous one."""
    schedule = DiffusionConfig().scheduler_config()
    scheduler = make_scheduler("ddim", schedule)
    scheduler.set_timesteps(150)
    index = next(
        i for i, (a, b) in enumerate(zip(scheduler.timesteps, scheduler.timesteps[1:])) if a - b != 6
    )
    t, t_prev = int(scheduler.timesteps[index]), int(scheduler.timesteps[index + 1])
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    prediction = 0.3 * x
    ours = scheduler.step(prediction, t, x).prev_sample
    # by hand, eq. (12) with eta = 0 and an epsilon prediction
    alpha_t, alpha_prev = scheduler.alphas_cumprod[t].double(), scheduler.alphas_cumprod[t_prev].double()
    x0 = (x.double() - (1 - alpha_t).sqrt() * prediction.double()) / alpha_t.sqrt()
    expected = alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * prediction.double()
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-6)


def test_the_wrapper_restores_the_schedule(monkeypatch):
    scheduler = make_scheduler("ddim", DiffusionConfig().scheduler_config())
    assert isinstance(scheduler, DDIMSampler)
    scheduler.set_timesteps(7)
    alphas, final = scheduler.alphas_cumprod.clone(), scheduler.final_alpha_cumprod.clone()
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    for t in scheduler.timesteps:  # the first step to the last (final_alpha_cumprod)
        x = scheduler.step(0.1 * x, t, x).prev_sample
        assert torch.equal(scheduler.alphas_cumprod, alphas) and torch.equal(
            scheduler.final_alpha_cumprod, final
        )

    def fail(*args, **kwargs):
        raise RuntimeError("upstream failed")

    monkeypatch.setattr(DDIMScheduler, "step", fail)
    with pytest.raises(RuntimeError, match="upstream failed"):
        scheduler.step(x, scheduler.timesteps[2], x)
    assert torch.equal(scheduler.alphas_cumprod, alphas) and torch.equal(scheduler.final_alpha_cumprod, final)


def test_step_before_set_timesteps_is_refused():
    scheduler = make_scheduler("ddim", DiffusionConfig().scheduler_config())
    with pytest.raises(ValueError, match="call set_timesteps before step"):
        scheduler.step(torch.zeros(1, 4, 4, 4), 999, torch.zeros(1, 4, 4, 4))
