"""The interface every GAN baseline implements, and the registry of the architectures by name.

An architecture builds a class-conditional generator and its discriminator for the data's spatial
dims, channels, image size and classes, and owns the two adversarial losses; the run machinery
(:mod:`medfusion.baselines.gan`) trains any architecture through the one training loop and writes
the same model folder for all of them.

A generator module maps ``(z: (N, z_dim) float, labels: (N,) long or None)`` to images
``(N, C, *image_size)`` in [-1, 1] and has a ``z_dim`` attribute (and config key); it is a diffusers
``ModelMixin, ConfigMixin`` so that it saves as ``config.json`` + safetensors. A discriminator maps
``(images, labels)`` to scores ``(N,)``.

Architectures are found by name in :data:`ARCHITECTURES` (``"module:ATTRIBUTE"``, imported on first
use): a model folder or a config names an architecture, never code.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from torch import Tensor, nn

# name -> "module:ATTRIBUTE" of a GANArchitecture instance, imported when first asked for
ARCHITECTURES: dict[str, str] = {
    "wgan-gp": "medfusion.baselines.wgan:WGAN_GP",
    "stylegan2": "medfusion.baselines.stylegan2:STYLEGAN2",
}


class GANArchitecture:
    """Base class of the GAN baselines: how to build the two networks and their losses.

    Attributes:
        name: the architecture's registry name (``wgan-gp``, ``stylegan2``); also the ``kind`` of
            the model folders its runs write.
        spatial_dims: the spatial dims it supports, e.g. ``(2, 3)`` or ``(2,)``.
        critic_steps: discriminator updates per generator update.
        generator_class: the class a model folder's ``generator/`` loads into; None: the class
            that ``generator/config.json`` names (``_class_name``), looked up in the module this
            architecture is registered from (never elsewhere).
    """

    name: str = ""
    spatial_dims: tuple[int, ...] = (2, 3)
    critic_steps: int = 1
    generator_class: ClassVar[type | None] = None

    def build(
        self,
        spatial_dims: int,
        channels: int,
        image_size: tuple[int, ...],
        num_classes: int | None,
        **model: Any,
    ) -> tuple[nn.Module, nn.Module]:
        """A new (generator, discriminator) pair.

        Args:
            spatial_dims: 2 or 3.
            channels: image channels.
            image_size: size of an image in array order ``(H, W)`` / ``(D, H, W)``.
            num_classes: classes of the conditioning; None: unconditional.
            **model: the architecture's own options (widths, depth, ``z_dim`` ...).
        Returns:
            the generator and the discriminator.
        Raises:
            ValueError: an option is out of range, or the generator cannot make ``image_size``.
        """
        raise NotImplementedError

    def data_options(self, num_train_images: int) -> dict[str, Any]:
        """Options of :meth:`build` that come from the training data (e.g. whether a small dataset
        gets differentiable augmentation); default none."""
        return {}

    def discriminator_loss(
        self, discriminator: nn.Module, real: Tensor, fake: Tensor, labels: Tensor | None, step: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The discriminator's loss on real and (detached) fake images, and terms to log.

        Args:
            discriminator: the (possibly wrapped) discriminator.
            real, fake: images (N, C, *spatial); ``fake`` carries no generator graph.
            labels: (N,) class indices or None.
            step: optimizer steps done so far (for lazy regularisation).
        Returns:
            the scalar loss and detached scalar terms.
        """
        raise NotImplementedError

    def generator_loss(
        self, discriminator: nn.Module, fake: Tensor, labels: Tensor | None, step: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The generator's loss on fake images through a discriminator whose weights are frozen.

        Args:
            discriminator: the discriminator (its parameters do not require grad here).
            fake: generated images (N, C, *spatial) with the generator's graph.
            labels: (N,) class indices or None.
            step: optimizer steps done so far.
        Returns:
            the scalar loss and detached scalar terms.
        """
        raise NotImplementedError

    def generator_regularization(
        self, generator: nn.Module, z: Tensor, labels: Tensor | None, step: int, state: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]] | None:
        """An extra term of the generator's loss on some steps (StyleGAN2's path length), from a
        pass of its own; default none.

        Args:
            generator: the (possibly wrapped) generator, in training mode.
            z, labels: the step's noise (N, z_dim) and class indices (or None).
            step: generator steps done so far (for lazy regularisation).
            state: tensors the term keeps across steps (e.g. a running mean); saved with the
                task in checkpoints, so that a resumed run goes on exactly.
        Returns:
            None, or the scalar term (added to the generator's loss) and detached terms to log.
        """
        return None


def architecture(name: str) -> GANArchitecture:
    """The architecture registered as ``name`` in :data:`ARCHITECTURES` (its module imported now).

    Raises:
        ValueError: ``name`` is not registered (the message lists the known names), or its module
            is not installed.
    """
    if not isinstance(name, str) or name not in ARCHITECTURES:
        raise ValueError(f"arch {name!r} is not a known GAN architecture; known: {', '.join(ARCHITECTURES)}")
    module_name, _, attribute = ARCHITECTURES[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is None or not module_name.startswith(e.name):
            raise  # the module exists but needs something missing: that error says what
        raise ValueError(
            f"arch {name!r}: its module {module_name} is not available in this installation "
            f"(known architectures: {', '.join(ARCHITECTURES)})"
        ) from e
    found = getattr(module, attribute, None)
    if not isinstance(found, GANArchitecture):
        raise ValueError(f"arch {name!r}: {ARCHITECTURES[name]} is not a GANArchitecture")
    return found


def architecture_module(name: str) -> str:
    """The module an architecture is registered from (where its generator classes live)."""
    architecture(name)
    return ARCHITECTURES[name].partition(":")[0]


def with_options(arch: GANArchitecture, options: Mapping[str, Any]) -> GANArchitecture:
    """A copy of ``arch`` with some of its public settings changed (``critic_steps``, a penalty
    weight ...); a dataclass architecture checks the new values in its ``__post_init__``.

    Raises:
        ValueError: naming an option that is not a setting of ``arch`` (and the allowed ones).
    """
    if not options:
        return arch
    if dataclasses.is_dataclass(arch):
        allowed = [f.name for f in dataclasses.fields(arch) if f.init]
    else:
        allowed = [k for k in vars(arch) if not k.startswith("_")] + ["critic_steps"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"gan: unknown option(s) {unknown} for the {arch.name} architecture; allowed: {allowed}"
        )
    if dataclasses.is_dataclass(arch):
        return dataclasses.replace(arch, **options)
    changed = copy.copy(arch)
    for key, value in options.items():
        setattr(changed, key, value)
    return changed
