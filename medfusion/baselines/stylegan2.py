"""A class-conditional StyleGAN2 for 2D images (Karras et al. 2020, "Analyzing and Improving the
Image Quality of StyleGAN"), small and readable, without custom CUDA ops.

Generator: a mapping network turns ``z`` and a class embedding into ``w``; the synthesis network
starts from a learned constant at the base size (4x4; 8x4 for a 64x32 image), doubles the size per
block with modulated, demodulated 3x3 convolutions plus per-pixel noise, and sums the upsampled
RGB outputs of every block (the "skip" generator). Discriminator: residual blocks that halve the
size down to the base, minibatch standard deviation, and projection conditioning on the class
(Miyato & Koyama 2018). Losses: non-saturating logistic for both, R1 on real images with lazy
regularisation, and on request (``pl_weight`` > 0) the path length regularisation of the generator,
lazy too. Every layer uses the equalised learning rate (weights drawn N(0, 1) and scaled by
``1/sqrt(fan_in)`` at run time).

Code names and the paper's symbols:

==================  ==========================================================================
code                paper
==================  ==========================================================================
``z``, ``w``        latent and intermediate latent (mapping network f: z -> w)
``styles``          s = A(w), the per-input-channel scales of a modulated convolution
``demodulate``      w''_ijk = w'_ijk / sqrt(sum_ik w'_ijk^2 + eps)   (Eq. 3)
``noise_strength``  the learned per-layer scale of the noise input B
``r1_gamma``        gamma in R1 = gamma/2 * E ||grad_x D(x)||^2 over real x
``r1_interval``     k of lazy regularisation (R1 every k steps, weighted by k)
``pl_weight``       w_pl of the path length regularisation E (||J_w^T y|| - a)^2   (Eq. 4)
``pl_mean``         a, the running mean of the path lengths (the task's state, in checkpoints)
==================  ==========================================================================

Simplifications against the paper: resampling is bilinear upsampling (the [1, 3, 3, 1] filter,
replicated at the borders) and 2x2 average pooling, not upfirdn with a blur filter; no style
mixing (one ``w`` for every layer, so the path length is taken in that one ``w``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from medfusion.baselines.arch import GANArchitecture
from medfusion.baselines.augment import DiffAugment, resolve_policy

_LRELU_GAIN = math.sqrt(2.0)  # keeps the activations' second moment through leaky ReLU(0.2)
_MAPPING_LR_MUL = 0.01
_DEMOD_EPS = 1e-8
R1_GAMMA_PER_PIXEL = 0.0002  # StyleGAN2-ADA's heuristic: gamma = 0.0002 * H * W / batch size
NOISE_MODES = ("random", "none")


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2) * _LRELU_GAIN


def _normalize_2nd_moment(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + eps)


def _upsample(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)  # (N, C, 2H, 2W)


def resolution_levels(image_size: tuple[int, ...] | list[int]) -> list[tuple[int, int]]:
    """The sizes the networks work at, from the base (smaller side 4) up to ``image_size``.

    Args:
        image_size: (H, W), each a power of two and at least 8; sides may differ ((64, 32)).
    Returns:
        [(H / 2**k, W / 2**k), ..., (H, W)] with the smaller side of the first equal to 4.
    """
    size = tuple(image_size)
    if len(size) != 2 or any(not isinstance(s, int) or s < 8 or s & (s - 1) for s in size):
        raise ValueError(
            f"image_size must be (H, W) with each side a power of two >= 8, e.g. (64, 64) or (64, 32); "
            f"got {tuple(image_size)}"
        )
    num_levels = int(math.log2(min(size))) - 1  # 4, 8, ..., min(size)
    return [(size[0] >> k, size[1] >> k) for k in reversed(range(num_levels))]


def _width(size: tuple[int, int], channel_base: int, channel_max: int) -> int:
    return max(1, min(channel_base // min(size), channel_max))


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1; got {value!r}")


def _check_num_classes(num_classes: int | None) -> None:
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be >= 1 or None (unconditional); got {num_classes!r}")


def _check_labels(labels: torch.Tensor | None, num_classes: int | None, n: int) -> None:
    if num_classes is None:
        if labels is not None:
            raise ValueError("labels must be None: this model is unconditional (num_classes=None)")
        return
    if labels is None:
        raise ValueError(f"labels are required: this model is conditional on {num_classes} classes")
    if labels.shape != (n,) or labels.dtype.is_floating_point:
        raise ValueError(
            f"labels must be integer class indices of shape ({n},); got {labels.dtype} {tuple(labels.shape)}"
        )


class EqualLinear(nn.Module):
    """A linear layer with the equalised learning rate, optionally followed by leaky ReLU.

    Args:
        in_features: input width.
        out_features: output width.
        bias_init: initial value of every bias.
        lr_mul: learning-rate multiplier (0.01 in the mapping network).
        activate: apply leaky ReLU (slope 0.2, gain sqrt(2)).
    """

    def __init__(
        self, in_features: int, out_features: int, bias_init: float = 0.0, lr_mul: float = 1.0, activate=False
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init) / lr_mul))
        self.weight_gain = lr_mul / math.sqrt(in_features)
        self.lr_mul = lr_mul
        self.activate = activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (N, in_features). Returns (N, out_features)."""
        x = F.linear(x, self.weight * self.weight_gain, self.bias * self.lr_mul)
        return _lrelu(x) if self.activate else x


class EqualConv(nn.Module):
    """A convolution with the equalised learning rate; optionally halves the size first (2x2 mean)
    and applies leaky ReLU after.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: odd kernel side (the padding keeps the size).
        bias: add a learned bias.
        activate: apply leaky ReLU (slope 0.2, gain sqrt(2)).
        down: average-pool by 2 before the convolution.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        bias: bool = True,
        activate: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size**2)
        self.activate = activate
        self.down = down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (N, C_in, H, W). Returns (N, C_out, H, W), or (N, C_out, H/2, W/2) with ``down``."""
        if self.down:
            x = F.avg_pool2d(x, 2)
        x = F.conv2d(x, self.weight * self.weight_gain, self.bias, padding=self.weight.shape[-1] // 2)
        return _lrelu(x) if self.activate else x


class ModulatedConv(nn.Module):
    """StyleGAN2's modulated convolution: the weight is scaled per sample and input channel by the
    style ``A(w)``, then (with ``demodulate``) normalised per output channel so that unit-variance
    inputs give unit-variance outputs; run as one grouped convolution over the batch.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: odd kernel side (the padding keeps the size).
        w_dim: width of ``w``.
        demodulate: normalise the modulated weight (off for the toRGB layers).
        upsample: double the size (bilinear) before the convolution.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        w_dim: int,
        demodulate: bool = True,
        upsample: bool = False,
    ):
        super().__init__()
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)  # styles start near 1
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size**2)
        self.demodulate = demodulate
        self.upsample = upsample

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``x``: (N, C_in, H, W); ``w``: (N, w_dim). Returns (N, C_out, H, W) (2H, 2W with upsample)."""
        n, c_in = x.shape[:2]
        c_out, _, k, _ = self.weight.shape
        styles = self.affine(w)  # (N, C_in)
        # (N, C_out, C_in, k, k)
        weight = self.weight[None] * self.weight_gain * styles[:, None, :, None, None]
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.square().sum(dim=(2, 3, 4), keepdim=True) + _DEMOD_EPS)
        if self.upsample:
            x = _upsample(x)  # (N, C_in, 2H, 2W)
        x = x.reshape(1, n * c_in, *x.shape[2:])  # the batch as groups
        out = F.conv2d(x, weight.reshape(n * c_out, c_in, k, k).to(x.dtype), padding=k // 2, groups=n)
        return out.reshape(n, c_out, *out.shape[2:])


class _StyleLayer(nn.Module):
    """Modulated 3x3 convolution, scaled noise, bias, leaky ReLU."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, upsample: bool):
        super().__init__()
        self.conv = ModulatedConv(in_channels, out_channels, 3, w_dim, upsample=upsample)
        self.noise_strength = nn.Parameter(torch.zeros(1))
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x, w, noise_mode: str, generator: torch.Generator | None) -> torch.Tensor:
        x = self.conv(x, w)  # (N, C_out, H, W)
        if noise_mode == "random":
            shape = (x.shape[0], 1, *x.shape[2:])
            noise = randn_tensor(shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + noise * self.noise_strength
        return _lrelu(x + self.bias[None, :, None, None])


class _ToRGB(nn.Module):
    """Modulated 1x1 convolution to the image channels, without demodulation."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int):
        super().__init__()
        self.conv = ModulatedConv(in_channels, out_channels, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.conv(x, w) + self.bias[None, :, None, None]


class _SynthesisBlock(nn.Module):
    """One size of the synthesis network: (upsampling) style layer, style layer, toRGB."""

    def __init__(self, in_channels: int, out_channels: int, image_channels: int, w_dim: int, first: bool):
        super().__init__()
        self.conv0 = None if first else _StyleLayer(in_channels, out_channels, w_dim, upsample=True)
        self.conv1 = _StyleLayer(out_channels, out_channels, w_dim, upsample=False)
        self.torgb = _ToRGB(out_channels, image_channels, w_dim)

    def forward(self, x, rgb, w, noise_mode, generator) -> tuple[torch.Tensor, torch.Tensor]:
        if self.conv0 is not None:
            x = self.conv0(x, w, noise_mode, generator)  # (N, C, 2H, 2W)
        x = self.conv1(x, w, noise_mode, generator)
        y = self.torgb(x, w)  # (N, image_channels, H, W)
        return x, (y if rgb is None else _upsample(rgb) + y)


class MappingNetwork(nn.Module):
    """z (and the class) to w: normalised ``z`` concatenated with a normalised class embedding,
    then ``num_layers`` equalised linear layers (learning rate x0.01) with leaky ReLU.

    Args:
        z_dim: width of ``z``.
        w_dim: width of ``w`` (and of the class embedding).
        num_classes: number of classes, or None for an unconditional mapping.
        num_layers: number of linear layers.
    """

    def __init__(self, z_dim: int, w_dim: int, num_classes: int | None, num_layers: int):
        super().__init__()
        self.embed = nn.Embedding(num_classes, w_dim) if num_classes is not None else None
        widths = [z_dim + (w_dim if num_classes is not None else 0)] + [w_dim] * num_layers
        self.layers = nn.Sequential(
            *(
                EqualLinear(widths[i], widths[i + 1], lr_mul=_MAPPING_LR_MUL, activate=True)
                for i in range(num_layers)
            )
        )

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """``z``: (N, z_dim); ``labels``: (N,) long, or None when unconditional. Returns w (N, w_dim)."""
        x = _normalize_2nd_moment(z)
        if self.embed is not None:
            x = torch.cat([x, _normalize_2nd_moment(self.embed(labels))], dim=1)
        return self.layers(x)


class StyleGAN2Generator(ModelMixin, ConfigMixin):
    """StyleGAN2 generator (mapping + skip synthesis network) for 2D images.

    Widths follow StyleGAN2's rule: a block whose smaller side is ``r`` has
    ``min(channel_base // r, channel_max)`` channels (the defaults give 64 up to 32 px, 32 at 64 px,
    16 at 128 px: small enough for a CPU).

    Args:
        spatial_dims: must be 2 (kept in the config so that readers of a saved model can check).
        out_channels: channels of the images (1 grey, 3 RGB).
        image_size: (H, W), each side a power of two >= 8.
        num_classes: number of classes, or None for an unconditional generator.
        z_dim: width of the latent ``z``.
        w_dim: width of the intermediate latent ``w``.
        mapping_layers: layers of the mapping network (8 in the paper, 2 for small datasets).
        channel_base: see above.
        channel_max: see above.
        w_avg_beta: decay of the running mean of ``w`` (for truncation), updated by the forward
            passes in training mode with gradients enabled.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        spatial_dims: int = 2,
        out_channels: int = 1,
        image_size: tuple[int, ...] = (64, 64),
        num_classes: int | None = None,
        z_dim: int = 64,
        w_dim: int = 64,
        mapping_layers: int = 2,
        channel_base: int = 2048,
        channel_max: int = 64,
        w_avg_beta: float = 0.995,
    ):
        super().__init__()
        if spatial_dims != 2:
            raise ValueError(f"spatial_dims must be 2 (StyleGAN2 is for 2D images); got {spatial_dims!r}")
        _check_positive(
            out_channels=out_channels,
            z_dim=z_dim,
            w_dim=w_dim,
            mapping_layers=mapping_layers,
            channel_base=channel_base,
            channel_max=channel_max,
        )
        _check_num_classes(num_classes)
        if not 0.0 <= w_avg_beta <= 1.0:
            raise ValueError(f"w_avg_beta must be in [0, 1]; got {w_avg_beta}")
        levels = resolution_levels(image_size)
        widths = [_width(size, channel_base, channel_max) for size in levels]
        self.mapping = MappingNetwork(z_dim, w_dim, num_classes, mapping_layers)
        self.register_buffer("w_avg", torch.zeros(w_dim))
        self.const = nn.Parameter(torch.randn(widths[0], *levels[0]))  # (C, *base)
        self.blocks = nn.ModuleList(
            _SynthesisBlock(widths[max(i - 1, 0)], width, out_channels, w_dim, first=i == 0)
            for i, width in enumerate(widths)
        )

    @property
    def z_dim(self) -> int:
        return int(self.config.z_dim)

    def forward(
        self,
        z: torch.Tensor,
        labels: torch.Tensor | None = None,
        truncation_psi: float = 1.0,
        noise_mode: str = "random",
        generator: torch.Generator | None = None,
        return_w: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Generate images.

        Args:
            z: latents (N, z_dim), standard normal.
            labels: (N,) class indices, or None for an unconditional generator.
            truncation_psi: ``w = w_avg + psi * (w - w_avg)``; 1 (default) is no truncation.
            noise_mode: ``"random"`` (fresh noise inputs) or ``"none"`` (no noise).
            generator: source of the noise inputs (deterministic output given ``z``).
            return_w: also return the intermediate latents ``w`` (N, w_dim), attached to the graph
            (for the path length regularisation, a gradient with respect to them).
        Returns:
            images (N, out_channels, H, W). In eval mode they are clamped to [-1, 1]; in training
            mode they are not (as in StyleGAN2, so that the discriminator's gradient reaches every
            pixel). With ``return_w``: (images, w).
        """
        if z.ndim != 2 or z.shape[1] != self.config.z_dim:
            raise ValueError(f"z must have shape (N, {self.config.z_dim}); got {tuple(z.shape)}")
        _check_labels(labels, self.config.num_classes, z.shape[0])
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}; got {noise_mode!r}")
        w = self.mapping(z, labels)  # (N, w_dim)
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                self.w_avg.copy_(w.detach().float().mean(0).lerp(self.w_avg, self.config.w_avg_beta))
        if truncation_psi != 1.0:
            w = self.w_avg.to(w.dtype).lerp(w, truncation_psi)
        x = self.const[None].expand(z.shape[0], -1, -1, -1).to(w.dtype)  # (N, C, *base)
        rgb = None
        for block in self.blocks:
            x, rgb = block(x, rgb, w, noise_mode, generator)  # x: (N, C_level, 2H, 2W)
        images = rgb if self.training else rgb.clamp(-1.0, 1.0)
        return (images, w) if return_w else images


def minibatch_stddev(x: torch.Tensor, group_size: int = 4) -> torch.Tensor:
    """Append one feature map: the standard deviation of the features over groups of samples,
    averaged over features and positions (StyleGAN's minibatch standard deviation layer).

    Args:
        x: features (N, C, H, W).
        group_size: samples per group; the largest divisor of N not above it is used.
    Returns:
        (N, C + 1, H, W).
    """
    n, c, h, w = x.shape
    g = max(d for d in range(1, min(group_size, n) + 1) if n % d == 0)
    y = x.float().reshape(g, n // g, c, h, w)  # sample i is in group i % (N / G)
    y = (y.var(dim=0, unbiased=False) + 1e-8).sqrt()  # (N/G, C, H, W)
    y = y.mean(dim=(1, 2, 3)).reshape(-1, 1, 1, 1).repeat(g, 1, h, w)  # (N, 1, H, W)
    return torch.cat([x, y.to(x.dtype)], dim=1)


class _DiscriminatorBlock(nn.Module):
    """Residual block that halves the size: two 3x3 convolutions beside a 1x1 skip, summed / sqrt(2)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv0 = EqualConv(in_channels, in_channels, 3, activate=True)
        self.conv1 = EqualConv(in_channels, out_channels, 3, activate=True, down=True)
        self.skip = EqualConv(in_channels, out_channels, 1, bias=False, down=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.skip(x) + self.conv1(self.conv0(x))) / math.sqrt(2.0)  # (N, C_out, H/2, W/2)


class StyleGAN2Discriminator(ModelMixin, ConfigMixin):
    """StyleGAN2's residual discriminator with projection class conditioning.

    ``score = psi(phi(x)) + <embed(y), phi(x)> / sqrt(C)`` where ``phi(x)`` (N, C) are the features
    after the last layer and ``embed`` a learned vector per class (Miyato & Koyama 2018). In
    training mode the images first pass through DiffAugment with ``augment_policy`` (real and
    generated alike, as every call goes through here); in eval mode they do not.

    Args:
        spatial_dims: must be 2.
        in_channels: channels of the images judged.
        image_size: (H, W), each side a power of two >= 8.
        num_classes: number of classes, or None for an unconditional discriminator.
        channel_base: widths as in :class:`StyleGAN2Generator`.
        channel_max: widths as in :class:`StyleGAN2Generator`.
        mbstd_group_size: group size of the minibatch standard deviation layer.
        augment_policy: DiffAugment policy applied in training mode (see
            :func:`medfusion.baselines.augment.parse_policy`); ``""`` for none.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        image_size: tuple[int, ...] = (64, 64),
        num_classes: int | None = None,
        channel_base: int = 2048,
        channel_max: int = 64,
        mbstd_group_size: int = 4,
        augment_policy: str = "",
    ):
        super().__init__()
        if spatial_dims != 2:
            raise ValueError(f"spatial_dims must be 2 (StyleGAN2 is for 2D images); got {spatial_dims!r}")
        _check_positive(
            in_channels=in_channels,
            channel_base=channel_base,
            channel_max=channel_max,
            mbstd_group_size=mbstd_group_size,
        )
        _check_num_classes(num_classes)
        levels = resolution_levels(image_size)[::-1]  # full size first
        widths = [_width(size, channel_base, channel_max) for size in levels]
        self.diff_augment = DiffAugment(augment_policy)
        self.from_rgb = EqualConv(in_channels, widths[0], 1, activate=True)
        self.blocks = nn.Sequential(*(_DiscriminatorBlock(a, b) for a, b in itertools.pairwise(widths)))
        c, base = widths[-1], levels[-1]
        self.conv = EqualConv(c + 1, c, 3, activate=True)
        self.fc = EqualLinear(c * base[0] * base[1], c, activate=True)
        self.out = EqualLinear(c, 1)
        self.embed = nn.Embedding(num_classes, c) if num_classes is not None else None

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Score images (higher: more real).

        Args:
            images: (N, in_channels, H, W) in [-1, 1], (H, W) = ``image_size``.
            labels: (N,) class indices, or None for an unconditional discriminator.
        Returns:
            scores (N,) (logits of "real").
        """
        expected = (self.config.in_channels, *self.config.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images must have shape (N, {', '.join(map(str, expected))}); got {tuple(images.shape)}"
            )
        _check_labels(labels, self.config.num_classes, images.shape[0])
        if self.training:
            images = self.diff_augment(images)
        h = self.blocks(self.from_rgb(images))  # (N, C, *base)
        h = self.conv(minibatch_stddev(h, self.config.mbstd_group_size))
        h = self.fc(h.flatten(1))  # (N, C)
        score = self.out(h)[:, 0]
        if self.embed is not None:
            score = score + (self.embed(labels) * h).sum(dim=1) / math.sqrt(h.shape[1])
        return score


def discriminator_logistic_loss(score_real: torch.Tensor, score_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's logistic loss: ``mean softplus(-D(real)) + mean softplus(D(fake))``.

    Args:
        score_real: scores of real images (N,).
        score_fake: scores of generated images (M,).
    Returns:
        a scalar (float32).
    """
    return F.softplus(-score_real.float()).mean() + F.softplus(score_fake.float()).mean()


def generator_nonsaturating_loss(score_fake: torch.Tensor) -> torch.Tensor:
    """The generator's non-saturating logistic loss: ``mean softplus(-D(G(z)))``.

    Args:
        score_fake: scores of generated images (N,).
    Returns:
        a scalar (float32).
    """
    return F.softplus(-score_fake.float()).mean()


def _gradient_square_norm(scores: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(scores.sum(), inputs, create_graph=True)
    return grad.float().square().flatten(1).sum(dim=1).mean()


def r1_penalty(discriminator: nn.Module, real: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """R1: the mean over the batch of ``||grad_x D(x)||^2`` at real images (differentiable in D's
    parameters). The loss adds ``r1_gamma / 2`` times it.

    Args:
        discriminator: any ``(images, labels) -> (N,)`` scorer.
        real: real images (N, C, H, W); they are detached.
        labels: (N,) class indices, or None.
    Returns:
        a scalar (float32).
    """
    real = real.detach().requires_grad_(True)
    return _gradient_square_norm(discriminator(real, labels), real)


@dataclass(frozen=True)
class StyleGAN2Architecture(GANArchitecture):
    """The StyleGAN2 baseline: its networks and losses.

    Attributes:
        r1_gamma: weight gamma of R1 (the loss adds ``gamma / 2 * R1``); None: StyleGAN2-ADA's
            heuristic ``0.0002 * H * W / N`` for a real batch of N images of H x W; 0: no R1.
        r1_interval: lazy regularisation: R1 on the steps divisible by it, weighted by it (1:
            every step). The paper also scales Adam's learning rate and betas by k / (k + 1) for the
            discriminator; that is the optimiser's business.
        critic_steps: discriminator updates per generator update (1 in the paper).
        pl_weight: weight of the path length regularisation of the generator (2 in StyleGAN2; 0,
            the default, is off: it costs a second generator pass with a double backward, and
            StyleGAN2-ADA leaves it out of its small-data configurations).
        pl_interval: lazy: on the generator steps divisible by it, weighted by it (4 in StyleGAN2).
        pl_decay: of the running mean of the path lengths (0.01).
        pl_batch_shrink: the regularisation's batch is the generator's over this (2).
    """

    r1_gamma: float | None = None
    r1_interval: int = 16
    critic_steps: int = 1
    pl_weight: float = 0.0
    pl_interval: int = 4
    pl_decay: float = 0.01
    pl_batch_shrink: int = 2
    name = "stylegan2"
    spatial_dims = (2,)
    generator_class = StyleGAN2Generator
    generator_options = ("z_dim", "w_dim", "mapping_layers", "w_avg_beta")
    discriminator_options = ("mbstd_group_size",)
    shared_options = ("channel_base", "channel_max")

    def __post_init__(self) -> None:
        gamma = self.r1_gamma
        if gamma is not None and (isinstance(gamma, bool) or not (math.isfinite(gamma) and gamma >= 0)):
            raise ValueError(f"gan.r1_gamma must be >= 0, or None for the heuristic; got {gamma!r}")
        for name in ("pl_weight", "pl_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, int | float) and math.isfinite(value)):
                raise ValueError(f"gan.{name} must be a number; got {value!r}")
        if self.pl_weight < 0 or not 0 < self.pl_decay <= 1:
            raise ValueError(
                f"gan.pl_weight must be >= 0 and gan.pl_decay in (0, 1]; got {self.pl_weight} and "
                f"{self.pl_decay}"
            )
        for name in ("r1_interval", "critic_steps", "pl_interval", "pl_batch_shrink"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"gan.{name} must be an integer >= 1; got {value!r}")

    def data_options(self, num_train_images: int) -> dict[str, Any]:
        """The training set's size, for ``augment="auto"`` (DiffAugment below 5000 images)."""
        return {"num_train_images": int(num_train_images)}

    def build(
        self,
        spatial_dims: int,
        channels: int,
        image_size: tuple[int, ...],
        num_classes: int | None,
        **model: Any,
    ) -> tuple[StyleGAN2Generator, StyleGAN2Discriminator]:
        """The generator and discriminator for a dataset.

        Args:
            spatial_dims: must be 2 (for volumes use the ``wgan-gp`` architecture).
            channels: channels of the images.
            image_size: (H, W), each side a power of two >= 8.
            num_classes: number of classes, or None for unconditional models.
            **model: ``augment`` (``"auto"`` (default): DiffAugment ``color,translation,cutout``
                when ``num_train_images`` is below 5000 or not given, none otherwise; None or
                ``""``: none; a policy string: that policy), ``num_train_images``, and the
                networks' options: ``z_dim``, ``w_dim``, ``mapping_layers``, ``w_avg_beta``
                (generator), ``mbstd_group_size`` (discriminator), ``channel_base``,
                ``channel_max`` (both).
        Returns:
            (generator, discriminator).
        """
        if spatial_dims not in self.spatial_dims:
            raise ValueError(
                f"the stylegan2 architecture is for 2D images (spatial_dims=2); got spatial_dims="
                f"{spatial_dims!r}. For volumes use the wgan-gp architecture"
            )
        options = dict(model)
        policy = resolve_policy(options.pop("augment", "auto"), options.pop("num_train_images", None))
        known = self.generator_options + self.discriminator_options + self.shared_options
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(
                f"stylegan2 takes no model option(s) {unknown}; it takes augment, num_train_images, "
                f"{', '.join(known)}"
            )

        def pick(names: tuple[str, ...]) -> dict[str, Any]:
            return {name: options[name] for name in names if name in options}

        common = dict(spatial_dims=spatial_dims, image_size=tuple(image_size), num_classes=num_classes)
        generator = StyleGAN2Generator(
            out_channels=channels, **common, **pick(self.generator_options + self.shared_options)
        )
        discriminator = StyleGAN2Discriminator(
            in_channels=channels,
            augment_policy=policy,
            **common,
            **pick(self.discriminator_options + self.shared_options),
        )
        return generator, discriminator

    def discriminator_loss(
        self,
        discriminator: nn.Module,
        real: torch.Tensor,
        fake: torch.Tensor,
        labels: torch.Tensor | None,
        step: int,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logistic loss on real and generated images, plus lazy R1 on the real ones.

        Args:
            discriminator: the discriminator (augments its inputs itself in training mode).
            real: real images (N, C, H, W).
            fake: generated images (N, C, H, W); detached here (no gradient reaches the generator).
            labels: (N,) class indices of both batches, or None.
            step: the discriminator step; R1 is added when ``step % r1_interval == 0``.
        Returns:
            (loss, logs): a scalar and detached scalars ``loss_d``, ``score_real``, ``score_fake``,
            and ``r1`` on the steps that compute it.
        """
        gamma = R1_GAMMA_PER_PIXEL * real.shape[-2] * real.shape[-1] / real.shape[0]
        gamma = gamma if self.r1_gamma is None else self.r1_gamma
        do_r1 = gamma > 0 and step % self.r1_interval == 0
        real = real.detach().requires_grad_(do_r1)
        score_real = discriminator(real, labels)
        score_fake = discriminator(fake.detach(), labels)
        loss = discriminator_logistic_loss(score_real, score_fake)
        logs = {
            "loss_d": loss.detach(),
            "score_real": score_real.detach().float().mean(),
            "score_fake": score_fake.detach().float().mean(),
        }
        if do_r1:
            r1 = _gradient_square_norm(score_real, real)
            loss = loss + 0.5 * gamma * self.r1_interval * r1
            logs["r1"] = r1.detach()
        return loss, logs

    def generator_loss(
        self, discriminator: nn.Module, fake: torch.Tensor, labels: torch.Tensor | None, step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The non-saturating logistic loss of the generator.

        Args:
            discriminator: the discriminator.
            fake: generated images (N, C, H, W), attached to the generator's graph.
            labels: (N,) class indices, or None.
            step: the generator step (unused: no lazy path length regularisation).
        Returns:
            (loss, logs): a scalar and the detached ``loss_g``.
        """
        loss = generator_nonsaturating_loss(discriminator(fake, labels))
        return loss, {"loss_g": loss.detach()}

    def generator_regularization(
        self,
        generator: nn.Module,
        z: torch.Tensor,
        labels: torch.Tensor | None,
        step: int,
        state: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """StyleGAN2's path length regularisation, on the generator steps divisible by
        ``pl_interval`` (None on the others, and when ``pl_weight`` is 0).

        For the first ``N / pl_batch_shrink`` latents: ``a = ||J_w^T y||`` with ``y`` normal noise
        over the image scaled by ``1 / sqrt(H W)``; the loss is ``pl_weight * pl_interval`` times the
        mean of ``(a - mean_a)^2``, where ``mean_a`` (``state["pl_mean"]``) is the running mean of
        the path lengths, updated here with ``pl_decay``.
        """
        if self.pl_weight == 0 or step % self.pl_interval != 0:
            return None
        n = max(1, z.shape[0] // self.pl_batch_shrink)
        images, w = generator(z[:n], labels[:n] if labels is not None else None, return_w=True)
        noise = torch.randn_like(images) / math.sqrt(math.prod(images.shape[2:]))
        (grad,) = torch.autograd.grad((images * noise).sum(), w, create_graph=True)
        lengths = grad.float().square().sum(dim=1).sqrt()  # (n,)
        mean = state.get("pl_mean", torch.zeros((), device=lengths.device)).to(lengths.device)
        mean = mean.lerp(lengths.detach().mean(), self.pl_decay)
        state["pl_mean"] = mean.detach()
        penalty = (lengths - mean).square().mean()
        loss = penalty * self.pl_weight * self.pl_interval
        return loss, {"pl_penalty": penalty.detach(), "pl_mean": mean.detach()}


STYLEGAN2 = StyleGAN2Architecture()
