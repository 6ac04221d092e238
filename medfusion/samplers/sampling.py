"""The sampling loop: any diffusers scheduler, class labels, classifier-free guidance.

Symbols: ``x`` is the latent x_t being denoised, ``w`` the guidance scale; the guided prediction
is ``pred_null + w * (pred_cond - pred_null)`` (Ho & Salimans 2022), so ``w = 1`` is the plain
conditional model and ``w = 0`` the unconditional one. ``phi`` is the guidance rescale of Lin et
al. 2023 (eq. 15-16): the guided prediction is scaled to the per-sample standard deviation of the
conditional one and mixed back, ``phi * rescaled + (1 - phi) * guided`` (applied to the model
output, as diffusers does).

Randomness: one CPU generator per sample (or one for the batch). With a list of generators every
sample's initial noise and every noise the scheduler adds come from its own generator, so a sample
depends on its seed, not on which batch or process it was drawn in.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

Generators = torch.Generator | list[torch.Generator] | None


def _check_labels(labels: torch.Tensor, num_classes: int | None, n: int) -> None:
    if num_classes is None:
        raise ValueError("the model is unconditional (no classes): sample without class labels")
    if labels.shape != (n,):
        raise ValueError(f"class labels must have shape ({n},); got {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > num_classes):
        raise ValueError(
            f"class labels must be in [0, {num_classes}] ({num_classes} is the null class); "
            f"got values from {int(labels.min())} to {int(labels.max())}"
        )


def initial_noise(shape: tuple[int, ...], generator: Generators = None) -> torch.Tensor:
    """Standard normal noise of ``shape`` (N, ...), float32 on the CPU; with a list of generators
    sample ``i`` is drawn from ``generator[i]`` alone."""
    if isinstance(generator, list | tuple):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for {shape[0]} samples")
        return torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32) for g in generator])
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def rescale_guidance(guided: torch.Tensor, conditional: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, eq. 15-16): match ``guided``'s per-sample standard
    deviation to ``conditional``'s, then mix: ``phi * rescaled + (1 - phi) * guided``."""
    dims = tuple(range(1, guided.ndim))
    std_conditional = conditional.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True).clamp_min(torch.finfo(guided.dtype).tiny)
    return phi * guided * (std_conditional / std_guided) + (1 - phi) * guided


@torch.no_grad()
def sample_latents(
    unet: nn.Module,
    scheduler,
    shape: tuple[int, ...],
    labels: torch.Tensor | None = None,
    steps: int = 50,
    guidance_scale: float = 1.0,
    generator: Generators = None,
    progress: bool = False,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    guidance_rescale: float = 0.0,
) -> torch.Tensor:
    """Denoise Gaussian noise into latents with ``scheduler`` (a diffusers scheduler instance).

    The initial noise is drawn on the CPU from ``generator`` so that a seed gives the same
    samples on every device. With labels and ``guidance_scale != 1`` the conditional and
    null-class predictions come from one batched forward call.

    Args:
        unet: called as ``unet(x, t, labels)``; has ``num_classes`` and ``null_class``.
        scheduler: a fresh diffusers scheduler, e.g. from
            :func:`medfusion.samplers.make_scheduler` (``SamplerConfig.scheduler(schedule)``).
        shape: latent shape (N, C, *spatial).
        labels: (N,) class indices (``null_class`` for unconditional samples) or None: the null
            class for a conditional model, nothing for an unconditional one.
        steps: number of denoising steps (>= 1).
        guidance_scale: classifier-free guidance weight ``w``.
        generator: CPU generator for the initial noise and the schedulers' own noise, or a list
            of N generators, one per sample.
        progress: show a progress bar.
        callback: called with ``(step index, x)`` after every step.
        guidance_rescale: ``phi`` in [0, 1] (0: off); only used with guidance.
    Returns:
        the final latents (N, C, *spatial), float32, on the U-Net's device.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1; got {steps!r}")
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must be in [0, 1]; got {guidance_rescale}")
    parameter = next(unet.parameters())
    device, dtype = parameter.device, parameter.dtype
    n = shape[0]
    num_classes = getattr(unet, "num_classes", None)
    null_class = getattr(unet, "null_class", None)
    guided = False
    if labels is not None:
        labels = torch.as_tensor(labels)
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"class labels must be integers; got {labels.dtype}")
        labels = labels.long()
        _check_labels(labels, num_classes, n)
        labels = labels.to(device)
        guided = guidance_scale != 1.0
    elif num_classes is not None:  # unconditional samples of a conditional model: nothing to guide
        labels = torch.full((n,), null_class, dtype=torch.long, device=device)
    if guided:
        labels = torch.cat([labels, torch.full_like(labels, null_class)])

    if isinstance(generator, tuple):
        generator = list(generator)
    # not every diffusers scheduler takes a generator (UniPC, Heun ... are deterministic)
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    step_kwargs = {"generator": generator} if takes_generator else {}
    x = initial_noise(shape, generator).to(device)
    scheduler.set_timesteps(steps, device=device)
    x = x * scheduler.init_noise_sigma
    for i, t in enumerate(tqdm(scheduler.timesteps, desc="sampling", disable=not progress, leave=False)):
        model_input = scheduler.scale_model_input(x, t)
        if guided:
            model_input = torch.cat([model_input, model_input])
        timesteps = t.expand(model_input.shape[0]) if t.ndim == 0 else t
        prediction = unet(model_input.to(dtype), timesteps, labels).float()
        if guided:
            conditional, unconditional = prediction.chunk(2)
            prediction = unconditional + guidance_scale * (conditional - unconditional)
            if guidance_rescale > 0:
                prediction = rescale_guidance(prediction, conditional, guidance_rescale)
        x = scheduler.step(prediction, t, x, **step_kwargs).prev_sample
        if callback is not None:
            callback(i, x)
    return x
