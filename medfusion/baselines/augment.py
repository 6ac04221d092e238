"""Differentiable augmentation for GANs on small datasets (DiffAugment; Zhao et al. 2020).

The same random transforms are applied to real AND generated images before the discriminator sees
them, and they are differentiable, so the generator's gradient passes through them. The
discriminator then cannot memorise the few real images, and the generator is not pushed to
reproduce the augmentations (each is applied to both sides alike).

A policy is a comma-separated list of operations, applied in the order given:

- ``color``: brightness (add U(-0.5, 0.5)), saturation (scale the deviation from the channel mean
  by U(0, 2); a no-op for one-channel images) and contrast (scale the deviation from the image
  mean by U(0.5, 1.5)).
- ``translation``: shift every spatial axis by an integer in ``[-r * side, r * side]``
  (r = :data:`TRANSLATION_RATIO`), filling with zeros.
- ``cutout``: set a box of ``r * side`` per axis (r = :data:`CUTOUT_RATIO`) at a random centre to 0.

Each image draws its own magnitudes. Every operation works on ``(N, C, *spatial)``: images and
volumes alike. Given a ``torch.Generator`` the result is deterministic; without one, the global RNG
of the input's device is used.
"""

from __future__ import annotations

import torch
from torch import nn

POLICY_OPERATIONS = ("color", "translation", "cutout")
DEFAULT_POLICY = "color,translation,cutout"
AUTO_MAX_IMAGES = 5000  # "auto" turns augmentation on for training sets smaller than this
TRANSLATION_RATIO = 0.125
CUTOUT_RATIO = 0.5


def parse_policy(policy: str | None) -> tuple[str, ...]:
    """The operations of a policy string, in order.

    Args:
        policy: comma-separated operations from :data:`POLICY_OPERATIONS`
            (``"color,translation,cutout"``); ``""``, ``"none"`` or None for no augmentation.
    Returns:
        the operation names, e.g. ``("color", "cutout")``; ``()`` for none.
    """
    if policy is None:
        return ()
    if not isinstance(policy, str):
        raise ValueError(f"augment policy must be a string such as {DEFAULT_POLICY!r}; got {policy!r}")
    text = policy.strip()
    if text in ("", "none"):
        return ()
    names = tuple(name.strip() for name in text.split(","))
    for name in names:
        if name not in POLICY_OPERATIONS:
            raise ValueError(
                f"augment policy {policy!r}: unknown operation {name!r}; use comma-separated names "
                f"from {', '.join(POLICY_OPERATIONS)} (e.g. {DEFAULT_POLICY!r}), or '' / 'none' for "
                "no augmentation"
            )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"augment policy {policy!r}: operation(s) {repeated} appear more than once")
    return names


def resolve_policy(augment: str | None = "auto", num_train_images: int | None = None) -> str:
    """The policy to train with, from a setting that may be ``"auto"``.

    Args:
        augment: ``"auto"``: :data:`DEFAULT_POLICY` when the training set has fewer than
            :data:`AUTO_MAX_IMAGES` images, or when its size is not known (``num_train_images``
            None; the medical datasets this is for are mostly small), otherwise none; None, ``""``
            or ``"none"``: none; any other string: that policy (checked).
        num_train_images: number of images in the training set, or None if not known.
    Returns:
        the policy in canonical form (``"color,translation,cutout"``), ``""`` for none.
    """
    if num_train_images is not None and num_train_images < 0:
        raise ValueError(f"num_train_images must be >= 0 or None; got {num_train_images}")
    if augment == "auto":
        small = num_train_images is None or num_train_images < AUTO_MAX_IMAGES
        return DEFAULT_POLICY if small else ""
    return ",".join(parse_policy(augment))


def diff_augment(
    x: torch.Tensor,
    policy: str | None,
    generator: torch.Generator | None = None,
    translation_ratio: float = TRANSLATION_RATIO,
    cutout_ratio: float = CUTOUT_RATIO,
) -> torch.Tensor:
    """Apply a DiffAugment policy to a batch.

    Args:
        x: images (N, C, *spatial); any float dtype.
        policy: see :func:`parse_policy`.
        generator: source of the random magnitudes (any device); None: the global RNG.
        translation_ratio: largest shift as a fraction of each side.
        cutout_ratio: side of the cut-out box as a fraction of each side.
    Returns:
        the augmented batch, same shape and dtype, differentiable with respect to ``x``.
    """
    operations = parse_policy(policy)
    if x.ndim < 3:
        raise ValueError(f"x must have shape (N, C, *spatial); got {tuple(x.shape)}")
    for name, ratio in (("translation_ratio", translation_ratio), ("cutout_ratio", cutout_ratio)):
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"{name} must be in [0, 1]; got {ratio}")
    for operation in operations:
        if operation == "color":
            x = _contrast(_saturation(_brightness(x, generator), generator), generator)
        elif operation == "translation":
            x = _translation(x, translation_ratio, generator)
        elif operation == "cutout":
            x = _cutout(x, cutout_ratio, generator)
        else:  # parse_policy admits only the names above
            raise ValueError(f"unknown augment operation {operation!r}")
    return x


class DiffAugment(nn.Module):
    """:func:`diff_augment` with a fixed policy, as a module (it holds no parameters).

    Args:
        policy: see :func:`parse_policy`.
        translation_ratio: largest shift as a fraction of each side.
        cutout_ratio: side of the cut-out box as a fraction of each side.
    """

    def __init__(
        self,
        policy: str | None = DEFAULT_POLICY,
        translation_ratio: float = TRANSLATION_RATIO,
        cutout_ratio: float = CUTOUT_RATIO,
    ):
        super().__init__()
        self.policy = ",".join(parse_policy(policy))
        self.translation_ratio = translation_ratio
        self.cutout_ratio = cutout_ratio

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``x``: (N, C, *spatial). Returns the augmented batch of the same shape."""
        return diff_augment(x, self.policy, generator, self.translation_ratio, self.cutout_ratio)

    def extra_repr(self) -> str:
        return f"policy={self.policy!r}"


def _per_sample_shape(x: torch.Tensor) -> tuple[int, ...]:
    return (x.shape[0],) + (1,) * (x.ndim - 1)  # (N, 1, ..., 1)


def _uniform(shape: tuple[int, ...], x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else x.device
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    return u.to(device=x.device, dtype=x.dtype)


def _randint(low: int, high: int, n: int, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else x.device
    return torch.randint(low, high, (n,), generator=generator, device=device).to(x.device)


def _brightness(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return x + (_uniform(_per_sample_shape(x), x, generator) - 0.5)


def _saturation(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if x.shape[1] == 1:  # grey: the deviation from the channel mean is zero
        return x
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (_uniform(_per_sample_shape(x), x, generator) * 2.0) + mean


def _contrast(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    mean = x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)
    return (x - mean) * (_uniform(_per_sample_shape(x), x, generator) + 0.5) + mean


def _axis_shape(x: torch.Tensor, axis: int) -> tuple[int, ...]:
    """(N, 1, ..., size of ``axis``, ..., 1): a per-sample index along one axis."""
    return tuple(x.shape[i] if i in (0, axis) else 1 for i in range(x.ndim))


def _translation(x: torch.Tensor, ratio: float, generator: torch.Generator | None) -> torch.Tensor:
    n = x.shape[0]
    for axis in range(2, x.ndim):
        size = x.shape[axis]
        max_shift = int(size * ratio + 0.5)
        shift = _randint(-max_shift, max_shift + 1, n, x, generator)  # (N,)
        zeros = torch.zeros_like(x.narrow(axis, 0, 1))
        padded = torch.cat([zeros, x, zeros], dim=axis)  # one zero slice each side
        # output position i reads input position i + shift (index 0 / size + 1: the zero slices)
        index = (torch.arange(size, device=x.device)[None] + shift[:, None] + 1).clamp(0, size + 1)  # (N, S)
        index = index.reshape(_axis_shape(x, axis)).expand(x.shape)
        x = torch.gather(padded, axis, index)
    return x


def _cutout(x: torch.Tensor, ratio: float, generator: torch.Generator | None) -> torch.Tensor:
    n = x.shape[0]
    inside = torch.ones(_per_sample_shape(x), dtype=torch.bool, device=x.device)
    for axis in range(2, x.ndim):
        size = x.shape[axis]
        box = int(size * ratio + 0.5)
        centre = _randint(0, size + (1 - box % 2), n, x, generator)  # (N,)
        start = (centre - box // 2)[:, None]
        position = torch.arange(size, device=x.device)[None]  # (1, S)
        in_box = (position >= start) & (position < start + box)  # (N, S)
        inside = inside & in_box.reshape(_axis_shape(x, axis))
    return x * (~inside).to(x.dtype)
