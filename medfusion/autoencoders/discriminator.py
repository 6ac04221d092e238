"""PatchGAN discriminator and the adversarial losses of the autoencoder (taming-transformers style).

The discriminator is pix2pix's ``NLayerDiscriminator`` as used by taming-transformers and latent
diffusion, for images and volumes alike, with GroupNorm in place of BatchNorm (BatchNorm statistics
are unreliable with the tiny per-GPU batches of 3D training and need syncing under DDP).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medfusion.nn import check_spatial_dims, conv_nd, group_norm

_KERNEL = 4
_MAX_CHANNEL_MULT = 8


class PatchDiscriminator(nn.Module):
    """PatchGAN: a fully convolutional classifier whose outputs are logits of overlapping patches.

    ``num_layers`` 4-wide convolutions of stride 2 (the first without normalisation), one of stride 1,
    then a stride-1 convolution to one channel; widths ``channels * min(2**i, 8)``, LeakyReLU(0.2).
    With the defaults a 256x256 image gives a 30x30 map of logits, each seeing a 70x70 patch.

    Args:
        spatial_dims: 2 (images) or 3 (volumes).
        in_channels: channels of the images judged.
        channels: width of the first convolution.
        num_layers: number of stride-2 convolutions (at least 1).
        norm_num_groups: groups of each GroupNorm; must divide ``channels`` (and so every width).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        channels: int = 64,
        num_layers: int = 3,
        norm_num_groups: int = 32,
    ):
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        for name, value in (("in_channels", in_channels), ("channels", channels), ("num_layers", num_layers)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1; got {value}")
        if norm_num_groups < 1 or channels % norm_num_groups:
            raise ValueError(f"norm_num_groups ({norm_num_groups}) must divide channels ({channels})")
        self.in_channels = in_channels
        self.num_layers = num_layers

        def conv(c_in: int, c_out: int, stride: int, bias: bool) -> nn.Module:
            return conv_nd(spatial_dims, c_in, c_out, _KERNEL, stride=stride, padding=1, bias=bias)

        layers = [conv(in_channels, channels, 2, True), nn.LeakyReLU(0.2, inplace=True)]
        width = channels
        for i in range(1, num_layers + 1):
            out = channels * min(2**i, _MAX_CHANNEL_MULT)
            stride = 2 if i < num_layers else 1  # the last of these keeps the size
            layers += [conv(width, out, stride, False), group_norm(out, norm_num_groups)]
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            width = out
        layers.append(conv(width, 1, 1, True))
        self.layers = nn.Sequential(*layers)
        self.apply(_init_weights)

    @property
    def min_size(self) -> int:
        """Smallest spatial side the network accepts: ``3 * 2**num_layers``.

        Each stride-2 convolution (kernel 4, padding 1) halves a side (rounding down), each stride-1
        one shrinks it by 1, and the last two need at least 3 then 2 positions.
        """
        return 3 * 2**self.num_layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: ``x`` (N, in_channels, *spatial), every side at least :attr:`min_size`.
        Returns: (N, 1, *patches) logits, ``patches = spatial // 2**num_layers - 2`` per side."""
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"PatchDiscriminator(spatial_dims={self.spatial_dims}, in_channels={self.in_channels}) "
                f"expects input (N, {self.in_channels}, *spatial) with {self.spatial_dims} spatial axes; "
                f"got shape {tuple(x.shape)}"
            )
        if min(x.shape[2:]) < self.min_size:
            raise ValueError(
                f"PatchDiscriminator with num_layers={self.num_layers} needs every spatial side to be at "
                f"least {self.min_size}; got {tuple(x.shape[2:])}"
            )
        return self.layers(x)


def _init_weights(module: nn.Module) -> None:
    """taming-transformers' ``weights_init``: conv weights N(0, 0.02), norm scales N(1, 0.02)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.GroupNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator: ``0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))``.

    Args:
        logits_real, logits_fake: discriminator outputs for real and reconstructed inputs, any shape.
    Returns:
        Scalar loss.
    """
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator (autoencoder) adversarial loss: ``-mean(logits_fake)``.

    Args:
        logits_fake: discriminator outputs for reconstructed inputs, any shape.
    Returns:
        Scalar loss.
    """
    return -logits_fake.mean()


def adaptive_weight(
    rec_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer: torch.Tensor,
    max_weight: float = 1e4,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Weight of the adversarial loss that balances its gradient against the reconstruction loss.

    taming-transformers' ``calculate_adaptive_weight``: ``|grad rec_loss| / (|grad g_loss| + eps)``,
    gradients taken with respect to ``last_layer`` (the decoder's last weight), clamped to
    ``[0, max_weight]`` and detached. The graph is retained so that the caller can still backward.

    Args:
        rec_loss: scalar reconstruction (+ perceptual) loss.
        g_loss: scalar adversarial generator loss.
        last_layer: a tensor both losses depend on, usually the weight of the decoder's output conv.
        max_weight: upper clamp.
        eps: added to the denominator.
    Returns:
        Scalar weight, detached.
    """
    if max_weight < 0 or eps < 0:
        raise ValueError(f"max_weight and eps must be non-negative; got {max_weight} and {eps}")
    grads = []
    for name, loss in (("rec_loss", rec_loss), ("g_loss", g_loss)):
        if not loss.requires_grad:
            raise ValueError(f"adaptive_weight: {name} does not require grad (computed under no_grad?)")
        (grad,) = torch.autograd.grad(loss, last_layer, retain_graph=True, allow_unused=True)
        if grad is None:
            raise ValueError(f"adaptive_weight: {name} does not depend on last_layer")
        grads.append(grad)
    weight = torch.linalg.vector_norm(grads[0]) / (torch.linalg.vector_norm(grads[1]) + eps)
    return weight.clamp(0.0, max_weight).detach()
