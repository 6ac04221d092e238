"""Samplers by name: adapters over diffusers schedulers, all built from the model's noise schedule.

Every sampler is a diffusers scheduler made from the training schedule saved in the model folder
(``scheduler/scheduler_config.json``), so it works on 2D and 3D latents alike and is driven by one
loop, :func:`medfusion.samplers.sample_latents`:

=========== ========================================================== ===================
name        what it is                                                  model calls/step
=========== ========================================================== ===================
ddpm        ancestral DDPM (Ho et al. 2020) on a strided chain          1
ddim        DDIM (Song et al. 2021); ``eta`` 0 = deterministic, 1 ≈ DDPM 1
dpmpp-2m    DPM-Solver++ 2M, multistep (Lu et al. 2022)                 1
euler       Euler's method on the probability-flow ODE (Karras 2022)    1
heun        Heun's 2nd-order method (Karras et al. 2022)                2 (1 on the last)
unipc       UniPC multistep, bh2 (Zhao et al. 2023)                     1
=========== ========================================================== ===================
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

from medfusion.config import Config


class DDIMSampler(DDIMScheduler):
    """diffusers' DDIM with the true previous timestep in every step, and ``eta`` as an attribute.

    diffusers' ``DDIMScheduler.step`` takes ``t - T // steps`` as the previous timestep. With the
    ``trailing`` spacing of our schedules and a step count that does not divide ``T`` (150 steps
    of 1000: gaps of 6 and 7) that is not the next timestep the loop runs, so every other step
    lands on the wrong noise level. :meth:`step` runs diffusers' own step (its arithmetic, its
    clipping and thresholding, its noise) with the cumulative α it reads for the previous
    timestep replaced, for that one call, by the α of the next entry of ``self.timesteps``.
    ``tests/samplers/test_ddim_upstream.py`` pins the upstream source this relies on.

    ``eta`` (0: deterministic DDIM, 1: DDPM-like noise) is a setting of the sampler, not of the
    noise schedule, so it is an attribute set by :func:`make_scheduler` and kept out of the config.
    """

    eta: float = 0.0

    def _previous(self, timestep: torch.Tensor | int) -> int:
        index = int((self.timesteps == int(timestep)).nonzero()[0, 0])
        return int(self.timesteps[index + 1]) if index + 1 < len(self.timesteps) else -1

    @contextlib.contextmanager
    def _true_previous_alpha(self, timestep: torch.Tensor | int) -> Iterator[None]:
        """For the duration of one upstream step: the α_{t-1} diffusers reads at its previous
        timestep ``t - T // steps`` (``alphas_cumprod[t - T // steps]``, or ``final_alpha_cumprod``
        below 0) is the α of the true previous timestep; both are restored afterwards."""
        theirs = int(timestep) - self.config.num_train_timesteps // self.num_inference_steps
        ours = self._previous(timestep)
        alpha_prev = self.alphas_cumprod[ours] if ours >= 0 else self.final_alpha_cumprod
        saved = self.alphas_cumprod, self.final_alpha_cumprod
        if theirs >= 0:
            self.alphas_cumprod = self.alphas_cumprod.clone()
            self.alphas_cumprod[theirs] = alpha_prev
        else:
            self.final_alpha_cumprod = alpha_prev
        try:
            yield
        finally:
            self.alphas_cumprod, self.final_alpha_cumprod = saved

    def step(
        self,
        model_output: torch.Tensor,
        timestep: torch.Tensor | int,
        sample: torch.Tensor,
        eta: float | None = None,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | list[torch.Generator] | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DDIMSchedulerOutput | tuple:
        """One DDIM update, eqs. (12) and (16) of Song et al. 2021: ``DDIMScheduler.step`` from
        the true previous timestep.

        The arguments are those of ``DDIMScheduler.step``; ``eta=None`` takes ``self.eta``.
        """
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        eta = float(self.eta if eta is None else eta)
        if eta > 0 and variance_noise is not None and generator is not None:
            raise ValueError("give either generator or variance_noise, not both")
        with self._true_previous_alpha(timestep):
            return super().step(
                model_output,
                int(timestep),  # an index into the schedule on the CPU, whatever the device
                sample,
                eta=eta,
                use_clipped_model_output=use_clipped_model_output,
                generator=generator,
                variance_noise=variance_noise,
                return_dict=return_dict,
            )


# name -> (scheduler class, settings over the model's schedule)
SAMPLERS: dict[str, tuple[type, dict]] = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMSampler, {}),
    "dpmpp-2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": (EulerDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {"solver_order": 2, "solver_type": "bh2"}),
}
ALIASES = {
    "dpm-solver++": "dpmpp-2m",
    "dpmsolver++": "dpmpp-2m",
    "dpm++2m": "dpmpp-2m",
    "dpmpp2m": "dpmpp-2m",
}
# the samplers that can step through Karras et al.'s noise levels
KARRAS_SAMPLERS = frozenset({"dpmpp-2m", "euler", "heun", "unipc"})
# a sensible step count per sampler when none is given
DEFAULT_STEPS = {"ddpm": 250, "ddim": 50, "dpmpp-2m": 25, "euler": 50, "heun": 25, "unipc": 20}


def sampler_name(name: str) -> str:
    """The canonical sampler name for ``name`` (case and aliases allowed)."""
    key = str(name).strip().lower().replace("_", "-")
    key = ALIASES.get(key, key)
    if key not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return key


def _check_options(name: str, eta: float, karras_sigmas: bool) -> None:
    if not (math.isfinite(eta) and 0 <= eta <= 1):  # above 1 the DDIM step has no real solution
        raise ValueError(f"eta must be >= 0 and <= 1 (0: deterministic DDIM, 1: DDPM-like); got {eta}")
    if eta and name != "ddim":
        raise ValueError(f"eta applies to the ddim sampler only; got eta={eta} with {name}")
    if karras_sigmas and name not in KARRAS_SAMPLERS:
        raise ValueError(f"karras_sigmas applies to {', '.join(sorted(KARRAS_SAMPLERS))}; not to {name}")


def make_scheduler(name: str, schedule: dict, eta: float = 0.0, karras_sigmas: bool = False) -> object:
    """A fresh diffusers scheduler for sampler ``name`` on the noise schedule ``schedule``.

    Args:
        name: one of :data:`SAMPLERS` (or an alias such as ``dpm-solver++``).
        schedule: the model's scheduler config (betas, prediction type, timestep spacing ...).
        eta: DDIM's noise weight in [0, 1]; only the ``ddim`` sampler takes it.
        karras_sigmas: step through the noise levels of Karras et al. 2022 (ρ = 7) instead of
            the schedule's timestep spacing (``dpmpp-2m``, ``euler``, ``heun``, ``unipc``).
    Returns:
        the scheduler (it keeps state while sampling: make one per sampling run).
    """
    name = sampler_name(name)
    _check_options(name, eta, karras_sigmas)
    cls, settings = SAMPLERS[name]
    accepted = set(inspect.signature(cls.__init__).parameters)
    config = {k: v for k, v in dict(schedule).items() if k in accepted}  # no warnings for the rest
    if karras_sigmas:
        settings = {**settings, "use_karras_sigmas": True}
    scheduler = cls.from_config({**config, **settings})
    if isinstance(scheduler, DDIMSampler):
        scheduler.eta = float(eta)
    return scheduler


@dataclass(frozen=True)
class SamplerConfig(Config):
    """How to sample: everything besides the model, class label and seed that decides a sample.

    Attributes:
        name: sampler, one of ``ddpm``, ``ddim``, ``dpmpp-2m``, ``euler``, ``heun``, ``unipc``.
        steps: denoising steps (>= 1); None picks the sampler's default (:data:`DEFAULT_STEPS`).
        guidance_scale: classifier-free guidance weight ``w`` (1 = plain conditional model,
            0 = unconditional).
        guidance_rescale: φ of Lin et al. 2023 in [0, 1]: pull the guided prediction's standard
            deviation back to the conditional one's (0 = off).
        eta: DDIM's noise weight in [0, 1] (``ddim`` only).
        karras_sigmas: the noise levels of Karras et al. 2022 (``dpmpp-2m``, ``euler``, ``heun``,
            ``unipc``): "DPM++ 2M Karras" is ``dpmpp-2m`` with this on.
    """

    name: str = "dpmpp-2m"
    steps: int | None = None
    guidance_scale: float = 3.0
    guidance_rescale: float = 0.0
    eta: float = 0.0
    karras_sigmas: bool = False

    def __post_init__(self) -> None:
        name = sampler_name(self.name)
        object.__setattr__(self, "name", name)
        if self.steps is None:
            object.__setattr__(self, "steps", DEFAULT_STEPS[name])
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1; got {self.steps!r}")
        if isinstance(self.guidance_scale, bool) or not (
            math.isfinite(self.guidance_scale) and self.guidance_scale >= 0
        ):
            raise ValueError(f"guidance_scale must be a number >= 0; got {self.guidance_scale}")
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1]; got {self.guidance_rescale}")
        _check_options(name, self.eta, self.karras_sigmas)

    def scheduler(self, schedule: dict) -> object:
        """A fresh scheduler for these settings on the model's noise ``schedule``."""
        return make_scheduler(self.name, schedule, eta=self.eta, karras_sigmas=self.karras_sigmas)
