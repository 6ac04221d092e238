"""WGAN-GP (Gulrajani et al. 2017, "Improved Training of Wasserstein GANs"), class-conditional, for
images and volumes from one code path.

- :class:`WGANGenerator`: DCGAN-style. ``z`` (concatenated with a learned class embedding) is
  mapped linearly to a ``base_channels * 2**(levels-1)``-wide grid of ``image_size / 2**levels``, then
  ``levels`` blocks of nearest upsampling, a 3-wide convolution, GroupNorm and ReLU halve the width
  and double every side; a last convolution and ``tanh`` give the image in [-1, 1].
- :class:`WGANCritic`: ``levels`` strided 4-wide convolutions with LeakyReLU(0.2) and no batch
  normalisation (the gradient penalty is per sample; optionally a per-sample layer norm), then a
  linear score plus a class projection term ``<embed(y), phi(x)>`` (Miyato & Koyama 2018).
- :func:`gradient_penalty`: ``E[(||grad_x D(x_hat)||_2 - 1)^2]`` on random interpolates ``x_hat``.
- :data:`WGAN_GP`: the architecture (registered as ``wgan-gp``): critic loss
  ``D(fake) - D(real) + gp_weight * GP`` (+ a small drift term), generator loss ``-D(fake)``,
  ``critic_steps`` critic updates per generator update. The paper's Adam betas (0.0, 0.9) are the
  GAN runs' default ``train.adam_betas`` (the loop's optimizer takes its betas from there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from medfusion.baselines.arch import GANArchitecture
from medfusion.nn import check_spatial_dims, conv_nd, group_norm


def _check_common(
    spatial_dims: int, base_channels: int, image_size, levels: int, max_channel_mult: int, classes
):
    """The arguments generator and critic share; returns the image size as a tuple."""
    check_spatial_dims(spatial_dims)
    size = tuple(int(s) for s in image_size)
    if len(size) != spatial_dims or any(s < 1 for s in size):
        raise ValueError(f"image_size must be {spatial_dims} positive sizes; got {list(image_size)}")
    for name, value in (
        ("base_channels", base_channels),
        ("levels", levels),
        ("max_channel_mult", max_channel_mult),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1; got {value}")
    factor = 2**levels
    if any(s % factor for s in size):
        raise ValueError(
            f"image_size {list(size)} cannot be made with levels={levels}: every side must be a multiple "
            f"of 2**levels = {factor} (crop or resize the data to such a size, or lower levels)"
        )
    if classes is not None and classes < 1:
        raise ValueError(f"num_classes must be >= 1 or None (unconditional); got {classes}")
    return size


def _widths(base_channels: int, levels: int, max_channel_mult: int) -> list[int]:
    """Widths from the full resolution down: ``base_channels * min(2**i, max_channel_mult)``."""
    return [base_channels * min(2**i, max_channel_mult) for i in range(levels)]


class WGANGenerator(ModelMixin, ConfigMixin):
    """DCGAN-style class-conditional generator for 2D images or 3D volumes.

    Args:
        spatial_dims: 2 (images) or 3 (volumes).
        out_channels: channels of the images made.
        image_size: their size in array order; every side a multiple of ``2**levels``.
        num_classes: classes of the conditioning; None: unconditional.
        z_dim: size of the noise vector.
        base_channels: width at full resolution; the width doubles per level down to the start grid.
        levels: upsampling blocks (the start grid is ``image_size / 2**levels``).
        max_channel_mult: the widths stop doubling at ``base_channels * max_channel_mult``.
        class_embed_dim: size of the class embedding concatenated with ``z``; None: ``z_dim``.
        norm_num_groups: GroupNorm groups (must divide ``base_channels``).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        spatial_dims: int = 2,
        out_channels: int = 1,
        image_size: tuple[int, ...] = (64, 64),
        num_classes: int | None = None,
        z_dim: int = 128,
        base_channels: int = 32,
        levels: int = 4,
        max_channel_mult: int = 8,
        class_embed_dim: int | None = None,
        norm_num_groups: int = 8,
    ):
        super().__init__()
        size = _check_common(spatial_dims, base_channels, image_size, levels, max_channel_mult, num_classes)
        for name, value in (("out_channels", out_channels), ("z_dim", z_dim)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1; got {value}")
        if norm_num_groups < 1 or base_channels % norm_num_groups:
            raise ValueError(
                f"norm_num_groups ({norm_num_groups}) must divide base_channels ({base_channels})"
            )
        embed = z_dim if class_embed_dim is None else class_embed_dim
        if embed < 1:
            raise ValueError(f"class_embed_dim must be >= 1 or None; got {class_embed_dim}")
        self.z_dim, self.num_classes = z_dim, num_classes
        self.start_size = tuple(s // 2**levels for s in size)
        widths = _widths(base_channels, levels, max_channel_mult)[::-1]  # coarse to fine
        self.start_width = widths[0]
        self.embedding = nn.Embedding(num_classes, embed) if num_classes is not None else None
        inputs = z_dim + (embed if num_classes is not None else 0)
        self.project = nn.Linear(inputs, widths[0] * math.prod(self.start_size))
        self.project_norm = group_norm(widths[0], norm_num_groups)
        self.blocks = nn.ModuleList()
        for i, width in enumerate(widths):
            out = widths[i + 1] if i + 1 < len(widths) else base_channels
            self.blocks.append(
                nn.Sequential(
                    nn.Upsample(scale_factor=2.0, mode="nearest"),
                    conv_nd(spatial_dims, width, out, 3, padding=1),
                    group_norm(out, norm_num_groups),
                    nn.ReLU(inplace=True),
                )
            )
        self.out = conv_nd(spatial_dims, base_channels, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Args: ``z`` (N, z_dim); ``labels`` (N,) class indices (None only when unconditional).
        Returns: images (N, out_channels, *image_size) in [-1, 1]."""
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"z must have shape (N, {self.z_dim}); got {tuple(z.shape)}")
        h = z
        if self.embedding is not None:
            if labels is None:
                raise ValueError("labels are required: the generator is class-conditional")
            h = torch.cat([z, self.embedding(labels).to(z.dtype)], dim=1)  # (N, z_dim + embed)
        elif labels is not None:
            raise ValueError("labels must be None: the generator is unconditional")
        h = self.project(h).view(len(z), self.start_width, *self.start_size)  # (N, C0, *start)
        h = F.relu(self.project_norm(h))
        for block in self.blocks:
            h = block(h)  # (N, C', *spatial*2)
        return torch.tanh(self.out(h))  # (N, out_channels, *image_size)


class WGANCritic(ModelMixin, ConfigMixin):
    """The WGAN-GP critic: strided convolutions, no batch norm, a class projection term.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the images judged.
        image_size: their size; every side a multiple of ``2**levels``.
        num_classes: classes of the projection term; None: unconditional.
        base_channels: width of the first convolution; doubling per level up to
            ``base_channels * max_channel_mult``.
        levels: stride-2 convolutions (4-wide, each halving every side).
        max_channel_mult: see ``base_channels``.
        layer_norm: a per-sample layer norm (GroupNorm of one group) after each convolution but
            the first, as Gulrajani et al. suggest in place of batch norm.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        image_size: tuple[int, ...] = (64, 64),
        num_classes: int | None = None,
        base_channels: int = 32,
        levels: int = 4,
        max_channel_mult: int = 8,
        layer_norm: bool = False,
    ):
        super().__init__()
        size = _check_common(spatial_dims, base_channels, image_size, levels, max_channel_mult, num_classes)
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1; got {in_channels}")
        widths = _widths(base_channels, levels, max_channel_mult)
        layers: list[nn.Module] = []
        previous = in_channels
        for i, width in enumerate(widths):
            layers.append(conv_nd(spatial_dims, previous, width, 4, stride=2, padding=1))
            if layer_norm and i > 0:
                layers.append(group_norm(width, num_groups=1))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            previous = width
        self.features = nn.Sequential(*layers)
        self.feature_dim = widths[-1] * math.prod(s // 2**levels for s in size)
        self.score = nn.Linear(self.feature_dim, 1)
        self.embedding = nn.Embedding(num_classes, self.feature_dim) if num_classes is not None else None
        if self.embedding is not None:
            nn.init.normal_(self.embedding.weight, std=0.02)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Args: ``images`` (N, in_channels, *image_size); ``labels`` (N,) or None.
        Returns: scores (N,)."""
        h = self.features(images).flatten(1)  # (N, feature_dim)
        score = self.score(h).squeeze(1)  # (N,)
        if self.embedding is not None:
            if labels is None:
                raise ValueError("labels are required: the critic is class-conditional")
            score = score + (self.embedding(labels).to(h.dtype) * h).sum(dim=1)  # projection
        return score


def gradient_penalty(
    critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """Gulrajani et al.'s penalty: ``mean((||grad_x critic(x_hat)||_2 - 1)^2)`` over random
    interpolates ``x_hat = eps * real + (1 - eps) * fake``, ``eps ~ U[0, 1]`` per sample (drawn from
    the global generator, which the training loop seeds for every step).

    Args:
        critic: maps ``(images, labels)`` to scores (N,).
        real, fake: images (N, C, *spatial) (``fake`` detached).
        labels: (N,) class indices or None.
    Returns:
        the scalar penalty (unweighted), differentiable with respect to the critic's parameters.
    """
    if real.shape != fake.shape:
        raise ValueError(f"real {tuple(real.shape)} and fake {tuple(fake.shape)} differ in shape")
    eps = torch.rand(len(real), *([1] * (real.ndim - 1)), device=real.device, dtype=real.dtype)
    x_hat = (eps * real + (1 - eps) * fake.detach()).requires_grad_(True)
    scores = critic(x_hat, labels)
    (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)
    norm = grad.float().flatten(1).norm(2, dim=1)  # (N,)
    return (norm - 1).pow(2).mean()


@dataclass(frozen=True)
class WGANGP(GANArchitecture):
    """The WGAN-GP architecture: DCGAN-style generator, projection critic, gradient penalty.

    Attributes:
        gp_weight: lambda of the gradient penalty (10 in the paper).
        critic_steps: critic updates per generator update (5 in the paper).
        drift_weight: weight of ``mean(D(real)^2)``, which keeps the scores near 0 (Karras et al.
            2018 use 1e-3); 0: off.
    """

    gp_weight: float = 10.0
    critic_steps: int = 5
    drift_weight: float = 1e-3
    name = "wgan-gp"
    spatial_dims = (2, 3)
    generator_class = WGANGenerator

    def __post_init__(self) -> None:
        if not self.gp_weight >= 0:
            raise ValueError(f"gan.gp_weight must be >= 0; got {self.gp_weight}")
        if not self.drift_weight >= 0:
            raise ValueError(f"gan.drift_weight must be >= 0; got {self.drift_weight}")
        if (
            isinstance(self.critic_steps, bool)
            or not isinstance(self.critic_steps, int)
            or self.critic_steps < 1
        ):
            raise ValueError(f"gan.critic_steps must be an integer >= 1; got {self.critic_steps!r}")

    def build(
        self,
        spatial_dims: int,
        channels: int,
        image_size: tuple[int, ...],
        num_classes: int | None,
        **model: Any,
    ) -> tuple[WGANGenerator, WGANCritic]:
        """A :class:`WGANGenerator` and a :class:`WGANCritic`.

        ``model`` options: ``z_dim``, ``class_embed_dim``, ``norm_num_groups`` (generator only),
        ``layer_norm`` (critic only), ``base_channels``, ``levels``, ``max_channel_mult`` (both),
        and ``critic_base_channels`` (the critic's ``base_channels``; default: the generator's).
        """
        generator_only = {"z_dim", "class_embed_dim", "norm_num_groups"}
        shared = {"base_channels", "levels", "max_channel_mult"}
        allowed = generator_only | shared | {"layer_norm", "critic_base_channels"}
        unknown = sorted(set(model) - allowed)
        if unknown:
            raise ValueError(f"model: unknown option(s) {unknown} for wgan-gp; allowed: {sorted(allowed)}")
        common = dict(spatial_dims=spatial_dims, image_size=tuple(image_size), num_classes=num_classes)
        g_options = {k: v for k, v in model.items() if k in generator_only | shared}
        d_options = {k: v for k, v in model.items() if k in shared | {"layer_norm"}}
        if "critic_base_channels" in model:
            d_options["base_channels"] = model["critic_base_channels"]
        generator = WGANGenerator(out_channels=channels, **common, **g_options)
        critic = WGANCritic(in_channels=channels, **common, **d_options)
        return generator, critic

    def discriminator_loss(self, discriminator, real, fake, labels, step):
        """``mean(D(fake)) - mean(D(real)) + gp_weight * GP + drift_weight * mean(D(real)^2)``."""
        scores = discriminator(torch.cat([real, fake.detach()]), _twice(labels)).float()
        real_scores, fake_scores = scores.chunk(2)
        wasserstein = real_scores.mean() - fake_scores.mean()  # the critic's estimate
        loss = -wasserstein
        terms = {"wasserstein": wasserstein.detach()}
        if self.gp_weight > 0:
            penalty = gradient_penalty(discriminator, real, fake.detach(), labels)
            loss = loss + self.gp_weight * penalty
            terms["gradient_penalty"] = penalty.detach()
        if self.drift_weight > 0:
            loss = loss + self.drift_weight * real_scores.pow(2).mean()
        return loss, terms

    def generator_loss(self, discriminator, fake, labels, step):
        """``-mean(D(fake))``."""
        loss = -discriminator(fake, labels).float().mean()
        return loss, {}


def _twice(labels: torch.Tensor | None) -> torch.Tensor | None:
    return None if labels is None else torch.cat([labels, labels])


WGAN_GP = WGANGP()
