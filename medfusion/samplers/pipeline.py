"""``MedfusionPipeline``: a model folder in, images or volumes out; no training code needed.

::

    pipe = MedfusionPipeline.from_pretrained("RUN/model", device="cuda", precision="bf16")
    images = pipe(["chest", "mr"], seeds=[0, 1], sampler=SamplerConfig("dpmpp-2m", steps=25))
    # (2, C, *image_size) float32 in [-1, 1] on the CPU

Sample ``i`` is a function of (model, ``labels[i]``, ``seeds[i]``, sampler settings, precision)
alone: its noise comes from its own generator, so batch size and batch mates do not change it
(beyond floating-point rounding of batched kernels).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from medfusion.nn.layers import to_channels_last
from medfusion.samplers.model_folder import ModelFolder, load_model_folder
from medfusion.samplers.sampling import sample_latents
from medfusion.samplers.schedulers import SamplerConfig
from medfusion.utils import COMPILE_MODES

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
UNCONDITIONAL = "none"  # the label name of unconditional samples

Label = str | int | None


def precision_dtype(precision: str) -> torch.dtype:
    """The torch dtype of ``fp32`` / ``bf16``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    return PRECISIONS[precision]


def decode_in_slabs(
    decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, factor: int, slab: int, overlap: int = 2
) -> torch.Tensor:
    """Decode latents piece by piece along the first spatial axis, blending the overlaps.

    Bounds the decoder's activation memory to ``slab`` latent planes (a large 3D volume need not
    be decoded at once). Pieces overlap by ``overlap`` planes and are blended with linear ramps.
    The decoder's group norms and attention see one piece at a time, so the result is close to,
    not equal to, decoding at once (for the 64x64 demo VAE, slabs of 8 of 16 latent rows differ by
    0.05 RMS on the [-1, 1] scale); ``slab`` >= the axis length decodes at once, exactly.

    Args:
        decode: maps latents (N, L, *spatial) to images (N, C, *spatial * factor).
        z: latents (N, L, S, ...).
        factor: the decoder's upsampling factor per axis.
        slab: latent planes per piece (>= 1).
        overlap: planes shared by neighbouring pieces (0 <= overlap < slab).
    Returns:
        images (N, C, S * factor, ...), float32.
    """
    size = z.shape[2]
    if slab < 1 or not 0 <= overlap < slab:
        raise ValueError(f"need slab >= 1 and 0 <= overlap < slab; got slab={slab}, overlap={overlap}")
    if slab >= size:
        return decode(z).float()
    starts = list(range(0, size - slab + 1, slab - overlap))
    if starts[-1] + slab < size:
        starts.append(size - slab)
    out = weights = None
    ramp = torch.arange(1, overlap * factor + 1, dtype=torch.float32) / (overlap * factor + 1)
    for start in starts:
        piece = decode(z[:, :, start : start + slab]).float()  # (N, C, slab * factor, ...)
        if out is None:
            out = piece.new_zeros((*piece.shape[:2], size * factor, *piece.shape[3:]))
            weights = torch.zeros(size * factor, device=piece.device)
        w = torch.ones(slab * factor, device=piece.device)
        if overlap and start > 0:
            w[: overlap * factor] = ramp.to(w.device)
        if overlap and start + slab < size:
            w[-overlap * factor :] = ramp.flip(0).to(w.device)
        region = slice(start * factor, (start + slab) * factor)
        out[:, :, region] += piece * w.view(-1, *([1] * (piece.ndim - 3)))
        weights[region] += w
    return out / weights.view(-1, *([1] * (out.ndim - 3)))


class MedfusionPipeline:
    """Class-conditional sampling from a model folder.

    Args:
        model: a loaded model folder (:func:`medfusion.samplers.load_model_folder`).
        device: where to run (default: CUDA if available, else CPU).
        precision: ``fp32`` or ``bf16`` (networks cast to bfloat16; the sampler's arithmetic
            stays float32).
        channels_last: channels-last memory format for the networks (faster on GPUs).
        compile_mode: ``torch.compile`` the U-Net with this mode (e.g. ``max-autotune``); None: eager.
    """

    def __init__(
        self,
        model: ModelFolder,
        device: torch.device | str | None = None,
        precision: str = "fp32",
        channels_last: bool = False,
        compile_mode: str | None = None,
    ):
        self.dtype = precision_dtype(precision)
        self.precision = precision
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model
        # nn.Module.to: diffusers' ModelMixin.to warns about fp32-kept modules on every dtype cast,
        # even when a model has none
        self.unet = (
            nn.Module.to(model.unet, device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        )
        self.vae = nn.Module.to(model.vae, device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        if channels_last:
            to_channels_last(self.unet)
            to_channels_last(self.vae)
        if compile_mode is not None and compile_mode not in COMPILE_MODES:
            raise ValueError(
                f"compile_mode must be one of {', '.join(COMPILE_MODES)} or None; got {compile_mode!r}"
            )
        self.denoiser = torch.compile(self.unet, mode=compile_mode) if compile_mode else self.unet

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> MedfusionPipeline:
        """Load the model folder at ``path``; keyword arguments as for the constructor."""
        return cls(load_model_folder(path), **kwargs)

    @property
    def info(self):
        return self.model.info

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.model.info.class_names)

    def class_index(self, label: Label) -> int | None:
        """The class index of a class name or index; None (or ``"none"``) is unconditional."""
        if label is None or label == UNCONDITIONAL:
            return None
        names = self.class_names
        if not names:
            raise ValueError(f"the model is unconditional (no classes): cannot sample class {label!r}")
        if isinstance(label, str):
            if label in names:
                return names.index(label)
            raise ValueError(f"unknown class {label!r}; the model's classes are: {', '.join(names)}")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(names):
            raise ValueError(f"class index must be an int in [0, {len(names)}); got {label!r}")
        return int(label)

    def label_tensor(self, labels: Sequence[Label]) -> torch.Tensor | None:
        """Class indices (the null class for unconditional entries), or None for an unconditional model."""
        indices = [self.class_index(label) for label in labels]
        if self.unet.num_classes is None:
            return None
        return torch.tensor([self.unet.null_class if i is None else i for i in indices], dtype=torch.long)

    @torch.no_grad()
    def sample_latents(
        self, labels: Sequence[Label], seeds: Sequence[int], sampler: SamplerConfig, progress: bool = False
    ) -> torch.Tensor:
        """Latents (N, *latent_shape), float32 on the pipeline's device, for one batch."""
        if len(labels) != len(seeds):
            raise ValueError(f"got {len(labels)} labels but {len(seeds)} seeds")
        label_tensor = self.label_tensor(labels)
        # all unconditional: no labels, so no guidance doubling
        conditional = label_tensor is not None and bool((label_tensor != self.unet.null_class).any())
        generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        return sample_latents(
            self.denoiser,
            sampler.scheduler(self.model.scheduler_config),
            (len(seeds), *self.info.latent_shape),
            labels=label_tensor if conditional else None,
            steps=sampler.steps,
            guidance_scale=sampler.guidance_scale,
            guidance_rescale=sampler.guidance_rescale,
            generator=generators,
            progress=progress,
        )

    @torch.no_grad()
    def decode(
        self, latents: torch.Tensor, slab: int | None = None, overlap: int | None = None
    ) -> torch.Tensor:
        """Images (N, C, *image_size) in [-1, 1], float32 on the CPU, from diffusion latents.

        Args:
            latents: (N, *latent_shape) scaled latents, as the sampler returns them.
            slab: decode ``slab`` latent planes along the first spatial axis at a time (bounds
                memory for large volumes; see :func:`decode_in_slabs`); None: all at once.
            overlap: planes shared by neighbouring slabs (default: 2, at most ``slab - 1``).
        """
        z = latents.to(device=self.device, dtype=self.dtype)
        if slab is None:
            images = self.vae.decode_latents(z).float()
        else:
            overlap = min(2, slab - 1) if overlap is None else overlap
            images = decode_in_slabs(self.vae.decode_latents, z, self.vae.downsampling_factor, slab, overlap)
        return images.clamp(-1, 1).cpu()

    def __call__(
        self,
        labels: Sequence[Label] | None = None,
        n: int | None = None,
        seeds: int | Sequence[int] = 0,
        sampler: SamplerConfig | None = None,
        batch_size: int = 16,
        slab: int | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Sample images/volumes.

        Args:
            labels: one class (name, index or None for unconditional) per sample; None: ``n``
                unconditional samples.
            n: number of samples when ``labels`` is None.
            seeds: one seed per sample, or a first seed ``s`` (sample ``i`` gets ``s + i``).
            sampler: sampler settings (default: ``SamplerConfig()``).
            batch_size: samples per forward pass.
            slab: see :meth:`decode`.
            progress: show a progress bar over the samples.
        Returns:
            images (N, C, *image_size) in [-1, 1], float32 on the CPU.
        """
        if labels is None:
            if n is None or n < 1:
                raise ValueError(f"give labels or n >= 1; got n={n!r}")
            labels = [None] * n
        labels = list(labels)
        seeds = [seeds + i for i in range(len(labels))] if isinstance(seeds, int) else [int(s) for s in seeds]
        if len(seeds) != len(labels):
            raise ValueError(f"got {len(seeds)} seeds for {len(labels)} samples")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        sampler = sampler or SamplerConfig()
        for label in set(labels):  # every label checked before any sampling
            self.class_index(label)
        out = []
        with tqdm(total=len(labels), unit="img", desc="sampling", disable=not progress) as bar:
            for start in range(0, len(labels), batch_size):
                batch = slice(start, start + batch_size)
                latents = self.sample_latents(labels[batch], seeds[batch], sampler)
                out.append(self.decode(latents, slab=slab))
                bar.update(len(out[-1]))
        return torch.cat(out)
