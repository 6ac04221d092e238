"""The training objective of the VAE: pixel, KL, perceptual and adversarial terms.

``total = pixel_weight * pixel + kl_weight * KL + perceptual_weight * LPIPS
          + adversarial_weight * lambda * hinge_G`` (the last only from ``adversarial_start`` on),
where ``pixel`` is averaged over channels and positions, ``KL`` is summed over the latent elements
of a sample (the usual definition) and averaged over the batch, and ``lambda`` is the adaptive
weight of Esser et al. 2021 (ratio of the gradient norms of the reconstruction and adversarial
terms at the decoder's last layer). The discriminator is trained with the hinge loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from medfusion.autoencoders.discriminator import (
    PatchDiscriminator,
    adaptive_weight,
    hinge_d_loss,
    hinge_g_loss,
)
from medfusion.autoencoders.vae import VAEOutput, reconstruction_loss
from medfusion.config import Config

PIXEL_LOSSES = ("l1", "mse")


@dataclass(frozen=True)
class VAELossConfig(Config):
    """Weights and switches of the VAE objective (see the module docstring).

    Attributes:
        pixel_loss: ``l1`` or ``mse``, averaged over channels and positions.
        pixel_weight: weight of the pixel term.
        kl_weight: weight of the KL term (summed over latent elements, averaged over the batch).
        perceptual_weight: weight of LPIPS; > 0 needs the VGG16 and LPIPS weights on disk.
        perceptual_backbone: VGG16 weights file (default: the torchvision cache); see
            :meth:`medfusion.autoencoders.perceptual.LPIPS.from_pretrained`.
        perceptual_linear: LPIPS linear-layer weights file (default: the ``lpips`` package).
        perceptual_slices: for volumes, LPIPS is applied to this many random slices per volume.
        adversarial_weight: weight of the adversarial term; 0 disables the discriminator.
        adversarial_start: optimizer step from which the adversarial terms are on.
        adaptive_weight: scale the adversarial term by the gradient-norm ratio.
        discriminator_channels: width of the first discriminator layer.
        discriminator_layers: strided layers of the patch discriminator (inputs must be at least
            ``3 * 2**layers`` a side).
        discriminator_norm_groups: GroupNorm groups of the discriminator (must divide its widths).
        discriminator_learning_rate: None uses the training learning rate.
    """

    pixel_loss: str = "l1"
    pixel_weight: float = 1.0
    kl_weight: float = 1e-6
    perceptual_weight: float = 0.0
    perceptual_backbone: str | None = None
    perceptual_linear: str | None = None
    perceptual_slices: int = 8
    adversarial_weight: float = 0.0
    adversarial_start: int = 10_000
    adaptive_weight: bool = True
    discriminator_channels: int = 64
    discriminator_layers: int = 3
    discriminator_norm_groups: int = 32
    discriminator_learning_rate: float | None = None

    def __post_init__(self) -> None:
        if self.pixel_loss not in PIXEL_LOSSES:
            raise ValueError(f"loss.pixel_loss must be one of {PIXEL_LOSSES}; got {self.pixel_loss!r}")
        for name in ("pixel_weight", "kl_weight", "perceptual_weight", "adversarial_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name} must be >= 0; got {getattr(self, name)}")
        if self.adversarial_start < 0:
            raise ValueError(f"loss.adversarial_start must be >= 0; got {self.adversarial_start}")
        for name in ("discriminator_channels", "discriminator_layers", "discriminator_norm_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"loss.{name} must be >= 1; got {getattr(self, name)}")
        lr = self.discriminator_learning_rate
        if lr is not None and not lr > 0:
            raise ValueError(f"loss.discriminator_learning_rate must be > 0 or null; got {lr}")
        if self.perceptual_slices < 1:
            raise ValueError(f"loss.perceptual_slices must be >= 1; got {self.perceptual_slices}")

    @property
    def uses_discriminator(self) -> bool:
        return self.adversarial_weight > 0


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Turn off ``requires_grad`` of ``module``'s parameters inside the block (inputs still get grads)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


class VAELoss(nn.Module):
    """Computes the VAE's and the discriminator's losses; owns the frozen LPIPS network if used.

    Args:
        config: the loss weights.
        spatial_dims, in_channels: of the images, to build the discriminator.
    """

    def __init__(self, config: VAELossConfig, spatial_dims: int, in_channels: int):
        super().__init__()
        self.config = config
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.lpips = None
        if config.perceptual_weight > 0:
            from medfusion.autoencoders.perceptual import LPIPS

            self.lpips = LPIPS.from_pretrained(config.perceptual_backbone, config.perceptual_linear)

    def make_discriminator(self) -> PatchDiscriminator | None:
        """A new patch discriminator, or None when the adversarial term is off."""
        if not self.config.uses_discriminator:
            return None
        return PatchDiscriminator(
            self.spatial_dims,
            self.in_channels,
            channels=self.config.discriminator_channels,
            num_layers=self.config.discriminator_layers,
            norm_num_groups=self.config.discriminator_norm_groups,
        )

    def adversarial_active(self, step: int) -> bool:
        return self.config.uses_discriminator and step >= self.config.adversarial_start

    def generator_loss(
        self,
        x: torch.Tensor,
        output: VAEOutput,
        step: int,
        discriminator: nn.Module | None = None,
        last_layer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The VAE's loss and its detached terms for logging.

        Args:
            x: the input images (N, C, *spatial).
            output: what the VAE made of them.
            step: the optimizer step (switches the adversarial term on).
            discriminator: needed once the adversarial term is active; its parameters get no
                gradient from this loss.
            last_layer: the decoder's last weight, for the adaptive weight.
        Returns:
            (loss, terms)
        """
        cfg = self.config
        recon = output.reconstruction
        pixel = reconstruction_loss(recon, x, cfg.pixel_loss).mean()
        kl = output.posterior.kl().mean()
        rec = cfg.pixel_weight * pixel
        terms = {"pixel": pixel.detach(), "kl": kl.detach()}
        if self.lpips is not None:
            from medfusion.autoencoders.perceptual import perceptual_distance

            perceptual = perceptual_distance(self.lpips, recon, x, max_slices=cfg.perceptual_slices).mean()
            rec = rec + cfg.perceptual_weight * perceptual
            terms["perceptual"] = perceptual.detach()
        loss = rec + cfg.kl_weight * kl
        if self.adversarial_active(step):
            if discriminator is None:
                raise ValueError("the adversarial term is active but no discriminator was given")
            with frozen(discriminator):
                g = hinge_g_loss(discriminator(recon))
            weight = torch.ones((), device=recon.device)
            if cfg.adaptive_weight:
                if last_layer is None:
                    raise ValueError("adaptive_weight needs the decoder's last layer")
                weight = adaptive_weight(rec, g, last_layer)
            loss = loss + cfg.adversarial_weight * weight * g
            terms |= {"generator": g.detach(), "adaptive_weight": weight.detach()}
        return loss, terms

    def discriminator_loss(
        self, discriminator: nn.Module, x: torch.Tensor, reconstruction: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hinge loss of the discriminator on real ``x`` and (detached) reconstructions."""
        logits_real = discriminator(x.detach())
        logits_fake = discriminator(reconstruction.detach())
        loss = hinge_d_loss(logits_real, logits_fake)
        return loss, {
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
