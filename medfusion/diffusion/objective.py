"""Noise schedule and training objective of the latent diffusion model.

The schedule *is* a diffusers scheduler config (:meth:`DiffusionConfig.scheduler_config`): it is
saved in the model folder and every sampler is built from it, so training and sampling use the
same ``alphas_cumprod`` by construction. Here it is recomputed in float64 and cast only where it
multiplies a tensor.

Symbols (DDPM / "Progressive Distillation" papers):

============  =========================================
code          paper
============  =========================================
``x0``        x_0, the clean latent
``noise``     epsilon ~ N(0, I)
``t``         timestep t in {0, ..., T-1}
``alpha_bar`` bar-alpha_t = prod_{s<=t} (1 - beta_s)
``x_t``       sqrt(bar-alpha_t) x_0 + sqrt(1 - bar-alpha_t) epsilon
``v``         sqrt(bar-alpha_t) epsilon - sqrt(1 - bar-alpha_t) x_0
``snr``       bar-alpha_t / (1 - bar-alpha_t)
============  =========================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medfusion.config import Config
from medfusion.nn.layers import append_dims

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTION_TYPES = ("epsilon", "v_prediction")
LOSS_TYPES = ("mse", "l1")
# our schedule names -> diffusers' beta_schedule names
_DIFFUSERS_SCHEDULE = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


@dataclass(frozen=True)
class DiffusionConfig(Config):
    """The noise schedule and the training objective.

    Attributes:
        num_train_timesteps: T, the number of noise levels.
        beta_schedule: ``linear`` (DDPM), ``scaled_linear`` (latent diffusion) or ``cosine``
            (improved DDPM; diffusers' ``squaredcos_cap_v2``).
        beta_start, beta_end: first and last beta of the linear schedules.
        prediction_type: ``epsilon`` (the noise) or ``v_prediction`` (the velocity).
        loss: ``mse`` or ``l1`` between prediction and target.
        min_snr_gamma: weight each timestep by min-SNR-gamma (Hang et al. 2023); None: no weighting.
        label_dropout: probability that a sample's label is replaced by the null class during
            training (classifier-free guidance); drawn per sample.
    """

    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: str = "epsilon"
    loss: str = "mse"
    min_snr_gamma: float | None = None
    label_dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 2:
            raise ValueError(f"diffusion.num_train_timesteps must be >= 2; got {self.num_train_timesteps}")
        for name, value, allowed in (
            ("beta_schedule", self.beta_schedule, BETA_SCHEDULES),
            ("prediction_type", self.prediction_type, PREDICTION_TYPES),
            ("loss", self.loss, LOSS_TYPES),
        ):
            if value not in allowed:
                raise ValueError(f"diffusion.{name} must be one of {allowed}; got {value!r}")
        if not 0.0 < self.beta_start < self.beta_end < 1.0:
            raise ValueError(
                f"diffusion.beta_start and beta_end must satisfy 0 < start < end < 1; "
                f"got {self.beta_start}, {self.beta_end}"
            )
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            raise ValueError(f"diffusion.min_snr_gamma must be > 0 or null; got {self.min_snr_gamma}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"diffusion.label_dropout must be in [0, 1); got {self.label_dropout}")

    def scheduler_config(self) -> dict:
        """The schedule as a diffusers scheduler config (``DDPMScheduler.from_config`` takes it,
        and so does every other diffusers scheduler)."""
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_schedule": _DIFFUSERS_SCHEDULE[self.beta_schedule],
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "prediction_type": self.prediction_type,
            "clip_sample": False,  # latents are not bounded to [-1, 1]
            "timestep_spacing": "trailing",  # includes t = T-1 for any number of sampling steps
        }


def betas_from_scheduler_config(scheduler_config: dict) -> torch.Tensor:
    """The betas of a diffusers scheduler config, computed in float64: (T,).

    Supports the ``linear``, ``scaled_linear`` and ``squaredcos_cap_v2`` schedules with the same
    formulas as diffusers (which computes them in float32).
    """
    steps = int(scheduler_config["num_train_timesteps"])
    kind = scheduler_config.get("beta_schedule", "linear")
    start = float(scheduler_config.get("beta_start", 0.0001))
    end = float(scheduler_config.get("beta_end", 0.02))
    if kind == "linear":
        return torch.linspace(start, end, steps, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2
    if kind == "squaredcos_cap_v2":

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)]
        return torch.tensor(betas, dtype=torch.float64)
    raise ValueError(
        f"beta_schedule {kind!r} is not supported; use one of {sorted(_DIFFUSERS_SCHEDULE.values())}"
    )


class NoiseSchedule:
    """``alpha_bar`` of a scheduler config in float64, and the quantities derived from it.

    The tables are computed once; each is copied to a device once, on first use there, so a
    training step does no host-to-device copy.
    """

    def __init__(self, scheduler_config: dict):
        self.scheduler_config = dict(scheduler_config)
        betas = betas_from_scheduler_config(scheduler_config)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # (T,) float64
        self.num_train_timesteps = len(betas)
        self._tables = {
            "alpha_bar": self.alphas_cumprod,
            "sqrt_alpha_bar": self.alphas_cumprod.sqrt(),
            "sqrt_one_minus_alpha_bar": (1.0 - self.alphas_cumprod).sqrt(),
        }
        self._on_device: dict[tuple[str, torch.device], torch.Tensor] = {}

    def _table(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, device)
        if key not in self._on_device:
            self._on_device[key] = self._tables[name].to(device)
        return self._on_device[key]

    def _at(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        picked = self._table(name, t.device)[t.long()]  # float64, (N,)
        return append_dims(picked.to(like.dtype), like.ndim)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ``alpha_bar / (1 - alpha_bar)`` at ``t``: (N,) float64."""
        a = self._table("alpha_bar", t.device)[t.long()]
        return a / (1.0 - a)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) noise``; shapes (N, C, *spatial)."""
        return self._at("sqrt_alpha_bar", t, x0) * x0 + self._at("sqrt_one_minus_alpha_bar", t, x0) * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``v = sqrt(alpha_bar) noise - sqrt(1 - alpha_bar) x0``."""
        return self._at("sqrt_alpha_bar", t, x0) * noise - self._at("sqrt_one_minus_alpha_bar", t, x0) * x0


class DiffusionObjective:
    """The training loss of a denoiser: noise, predict, compare (eps or v, L1 or MSE, min-SNR).

    Args:
        config: schedule and objective.
    """

    def __init__(self, config: DiffusionConfig):
        self.config = config
        self.schedule = NoiseSchedule(config.scheduler_config())

    def drop_labels(
        self, labels: torch.Tensor, null_class: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Replace each label by ``null_class`` with probability ``label_dropout``, per sample."""
        if self.config.label_dropout == 0.0:
            return labels
        u = torch.rand(labels.shape, generator=generator, device=labels.device)
        return torch.where(u < self.config.label_dropout, torch.full_like(labels, null_class), labels)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network should predict at ``t``."""
        if self.config.prediction_type == "epsilon":
            return noise
        if self.config.prediction_type == "v_prediction":
            return self.schedule.velocity(x0, noise, t)
        raise ValueError(f"unknown prediction_type {self.config.prediction_type!r}")

    def weights(self, t: torch.Tensor) -> torch.Tensor | None:
        """Per-sample loss weights (N,) for min-SNR-gamma, or None without weighting."""
        gamma = self.config.min_snr_gamma
        if gamma is None:
            return None
        snr = self.schedule.snr(t)
        clipped = snr.clamp(max=gamma)
        weight = clipped / snr if self.config.prediction_type == "epsilon" else clipped / (snr + 1.0)
        return weight.float()

    def loss(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        labels: torch.Tensor | None = None,
        null_class: int | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One Monte-Carlo estimate of the loss on a batch of clean latents.

        Timesteps, noise and label dropout are drawn from torch's global generator (which the
        training loop seeds per micro-batch).

        Args:
            model: called as ``model(x_t, t, labels)``.
            x0: clean latents (N, C, *spatial).
            labels: (N,) class indices, or None for an unconditional model.
            null_class: the label that stands for "no class" (dropout target); needed with labels.
        Returns:
            the scalar loss and its unweighted per-element error (for logging).
        """
        n = x0.shape[0]
        t = torch.randint(0, self.schedule.num_train_timesteps, (n,), device=x0.device)
        noise = torch.randn_like(x0)
        x_t = self.schedule.add_noise(x0, noise, t)
        if labels is not None:
            if null_class is None:
                raise ValueError("null_class is needed to drop labels for classifier-free guidance")
            labels = self.drop_labels(labels, null_class)
        prediction = model(x_t, t, labels)
        target = self.target(x0, noise, t)
        if prediction.shape != target.shape:
            raise ValueError(
                f"the model predicted {tuple(prediction.shape)} for latents {tuple(target.shape)}"
            )
        if self.config.loss == "mse":
            error = F.mse_loss(prediction.float(), target.float(), reduction="none")
        elif self.config.loss == "l1":
            error = F.l1_loss(prediction.float(), target.float(), reduction="none")
        else:
            raise ValueError(f"unknown loss {self.config.loss!r}")
        per_sample = error.flatten(1).mean(dim=1)  # (N,)
        weights = self.weights(t)
        loss = (per_sample * weights).mean() if weights is not None else per_sample.mean()
        return loss, {self.config.loss: per_sample.detach().mean()}
