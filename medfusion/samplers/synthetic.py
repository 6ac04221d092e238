"""Write a synthetic dataset folder (see DESIGN.md) from any generator: ``medfusion sample``.

::

    OUT/
      <class>/<index>.png | .tif | .nii.gz   one file per sample (unconditional samples: OUT/<index>.*)
      manifest.csv                           file, label, seed, then the generator's columns
                                             (diffusion: sampler, steps, guidance, ...)
      dataset_card.json                      the model, its kind and hash, the settings, the counts

:func:`write_generated_dataset` writes the folder from an
:class:`~medfusion.samplers.generator.ImageGenerator` (a diffusion model, a GAN baseline, ...);
:func:`write_synthetic_dataset` is the same from a diffusion model folder.

Sample ``i`` (0-based over the whole dataset) has class ``classes[i % len(classes)]`` and seed
``seed + i``, so a sample is reproducible from (model, seed, settings), and asking for more
samples per class later only adds files. Every file is written under a temporary name and
renamed when complete. Re-running into the same folder resumes: files already there are kept
and not written again. Under several processes (``accelerate launch``/``torchrun``) the batches
of the dataset are dealt out round-robin; every batch is the same whichever process draws it, so
the union is the single-process result.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from medfusion import __version__
from medfusion.runlock import run_lock
from medfusion.samplers.card import CARD, sharing_fields, units, write_card
from medfusion.samplers.diffusion_generator import DiffusionGenerator
from medfusion.samplers.files import SampleFiles, format_suffix
from medfusion.samplers.generator import ImageGenerator
from medfusion.samplers.model_folder import DIFFUSION, ModelInfo, load_model_folder
from medfusion.samplers.pipeline import UNCONDITIONAL
from medfusion.samplers.schedulers import SamplerConfig
from medfusion.utils import MAX_SEED, atomic_write_text, inside, process_state

MANIFEST = "manifest.csv"
SAMPLE_COLUMNS = ("file", "label", "seed")  # the generator's own columns follow
# the columns of a diffusion model's manifest
MANIFEST_COLUMNS = (*SAMPLE_COLUMNS, "sampler", "steps", "guidance", "guidance_rescale", "eta")
CARD_FORMAT = 1
ALL_CLASSES = "all"
_WRITER_SETTINGS = ("classes", "seed")  # the card's settings that the writer decides


@dataclass(frozen=True)
class SampleSettings:
    """What decides the samples of a synthetic dataset folder (with the model and ``n``).

    Attributes:
        classes: the class names sampled, in order; ``("none",)`` for unconditional samples.
        seed: sample ``i`` has seed ``seed + i``.
        generator: the generator's own settings (:meth:`ImageGenerator.settings`), e.g. the
            sampler, precision and decode slab of a diffusion model.
    """

    classes: tuple[str, ...] = ()
    seed: int = 0
    generator: Mapping[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The card's ``settings``: ``classes``, ``seed`` and the generator's settings beside them."""
        return {"classes": list(self.classes), "seed": self.seed, **(self.generator or {})}


@dataclass(frozen=True)
class PlannedSample:
    index: int
    label: str  # a class name, or "none"
    seed: int
    file: str  # relative to the dataset folder


@dataclass(frozen=True)
class SampleResult:
    """What a ``write_synthetic_dataset`` / ``write_generated_dataset`` call did."""

    path: Path
    total: int  # samples in the dataset
    written: int  # files this call (all processes) wrote
    kept: int  # files already complete before this call
    seconds: float


def resolve_classes(info: ModelInfo, class_labels: str | Sequence[str] | None) -> tuple[str, ...]:
    """The class names to sample: ``all`` (the default for a conditional model), names, or
    ``none`` (unconditional; the only choice for an unconditional model).

    Args:
        info: the model's description (its ``class_names``).
        class_labels: ``all``, ``none``, a class name, or a sequence of them.
    Returns:
        the class names in the order given (``("none",)`` for unconditional samples).
    Raises:
        ValueError: naming ``class_labels``: an unknown class, a class on an unconditional
            model, a class named twice, or ``none`` mixed with classes.
    """
    names = tuple(info.class_names)
    if class_labels is None:
        class_labels = ALL_CLASSES if names else UNCONDITIONAL
    if isinstance(class_labels, str):
        class_labels = [class_labels]
    chosen: list[str] = []
    for label in class_labels:
        if label == ALL_CLASSES and names:
            chosen.extend(names)
        elif label == UNCONDITIONAL or label in names:
            chosen.append(label)
        elif not names:
            raise ValueError(
                f"class_labels {label!r}: the model is unconditional (no classes); use {UNCONDITIONAL!r}"
            )
        else:
            raise ValueError(
                f"class_labels {label!r}: unknown class; the model's classes are: {', '.join(names)}"
            )
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"class_labels: a class is named twice in {list(class_labels)}")
    if UNCONDITIONAL in chosen and len(chosen) > 1:
        raise ValueError(
            f"class_labels: {UNCONDITIONAL!r} (unconditional) cannot be mixed with classes in one folder"
        )
    return tuple(chosen)


def plan_samples(classes: Sequence[str], n: int, seed: int, suffix: str) -> list[PlannedSample]:
    """The ``n * len(classes)`` samples of a dataset: index, label, seed and file of each."""
    plan = []
    for index in range(n * len(classes)):
        label = classes[index % len(classes)]
        name = f"{index:06d}{suffix}"
        plan.append(
            PlannedSample(index, label, seed + index, name if label == UNCONDITIONAL else f"{label}/{name}")
        )
    return plan


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _read_card(out: Path) -> dict | None:
    path = out / CARD
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{path}: not valid JSON ({e}); is this a medfusion synthetic dataset folder?"
        ) from e
    if (
        not isinstance(card, dict)
        or not isinstance(card.get("settings"), dict)
        or not isinstance(card.get("model"), dict)
    ):
        raise ValueError(f"{path}: not a medfusion dataset card (no model/settings)")
    return card


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_request(out: Path, n: Any, seed: Any, batch_size: Any) -> None:
    """The writer's own arguments, before any model is loaded."""
    if not _is_int(n) or n < 1:
        raise ValueError(f"n must be an integer >= 1; got {n!r}")
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}")
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer in 0..{MAX_SEED}; got {seed!r}")
    _check_out_path(out)


def _check_out_path(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {out}: exists and is not a folder")
    for parent in out.parents:  # the first existing ancestor must be a writable folder
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"out {out}: {parent} is not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ValueError(f"out {out}: cannot create folders in {parent} (permission denied)")
            break


def _flat(settings: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _check_existing(
    out: Path, card: dict | None, kind: str, digest: str, settings: SampleSettings, n: int
) -> None:
    """Refuse an output folder that holds something else than (a part of) this dataset (``out``
    itself was checked by :func:`_check_out_path`)."""
    if card is None:
        if out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()):
            raise ValueError(
                f"out {out}: the folder is not empty and holds no {CARD}; choose a new or empty folder"
            )
        return
    their_kind = str(card["model"].get("kind", DIFFUSION))  # cards before kinds: diffusion
    if their_kind != kind:
        raise ValueError(
            f"out {out}: holds samples of a {their_kind} model, this is a {kind} model; choose another folder"
        )
    their = str(card["model"].get("sha256"))
    if their != digest:
        raise ValueError(
            f"out {out}: holds samples of a different model (sha256 {their[:12]}..., this model "
            f"{digest[:12]}...); choose another folder"
        )
    _check_same_settings(out, card["settings"], settings.to_dict())
    if int(card.get("n_per_class", 0)) > n:
        planned = card["n_per_class"]
        raise ValueError(
            f"out {out}: already planned for n={planned} per class; give n >= {planned} (more "
            "samples are added) or choose another folder"
        )


def _check_same_settings(out: Path, before: dict, now: dict) -> None:
    before, now = _flat(before), _flat(now)
    keys = [*now, *(key for key in before if key not in now)]
    changed = [
        f"{key} {before.get(key)!r} -> {now.get(key)!r}" for key in keys if before.get(key) != now.get(key)
    ]
    if changed:
        raise ValueError(
            f"out {out}: holds samples made with other settings ({'; '.join(changed)}); rerun with "
            "the same settings to resume, or choose another folder"
        )


def _card(
    generator: ImageGenerator,
    digest: str,
    settings: SampleSettings,
    n: int,
    files: SampleFiles,
    complete: bool,
    created: str,
    sharing: Mapping[str, Any],
) -> dict:
    info, mapping = generator.info, files.mapping
    modality = str(info.training_data.get("modality") or "")
    return {
        "format": CARD_FORMAT,
        "description": f"synthetic images generated by {generator.title} (medfusion); no patient data",
        **sharing,
        "medfusion_version": __version__,
        "model": {
            "path": str(generator.path.resolve()) if generator.path is not None else None,
            "kind": generator.kind,
            "sha256": digest,
            "spatial_dims": info.spatial_dims,
            "image_size": list(info.image_size),
            "channels": info.channels,
            "class_names": list(info.class_names),
            "version": info.version,
        },
        "settings": settings.to_dict(),
        "n_per_class": n,
        "counts": {label: n for label in settings.classes},
        "total": n * len(settings.classes),
        "files": {
            "suffix": files.suffix,
            "format": "dicom" if files.dicom else files.suffix.lstrip("."),
            "intensity": mapping.describe(),
            "intensity_per_class": {c: m.describe() for c, m in sorted(files.class_mappings.items())} or None,
            "units": units(mapping.physical, modality),
            "dtype": mapping.dtype,
            "source_dtype": info.source_dtype,
            "spacing": list(info.spacing) if info.spacing is not None else None,
            "direction": list(info.direction) if info.direction is not None else None,
        },
        "complete": complete,
        "created": created,
        "updated": _now(),
    }


def _manifest(plan: Sequence[PlannedSample], fields: Mapping[str, Any]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*SAMPLE_COLUMNS, *fields])
    for sample in plan:
        writer.writerow([sample.file, sample.label, sample.seed, *fields.values()])
    return buffer.getvalue()


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary files of a killed run (a clean interruption removes its own)."""
    for tmp in out.rglob(".*.tmp*"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)


def _remove_broken(out: Path, paths: Sequence[Path], files: SampleFiles, log) -> None:
    """Samples of an earlier run that are not whole (cut short, empty, of another shape) are
    removed, so that they are written again."""
    broken = []
    for path in paths:
        if path.exists() or path.is_symlink():
            problem = files.problem(path)
            if problem is not None:
                broken.append(f"{path.relative_to(out).as_posix()} ({problem})")
                files.remove(path)
    if broken:
        log(f"# {len(broken)} file(s) of an earlier run were not whole and are written again: {broken[0]}")


def write_synthetic_dataset(
    model_path: str | Path,
    out: str | Path,
    n: int,
    class_labels: str | Sequence[str] | None = None,
    sampler: SamplerConfig | None = None,
    seed: int = 0,
    batch_size: int = 16,
    precision: str = "fp32",
    device: str | None = None,
    slab: int | None = None,
    channels_last: bool = False,
    compile_mode: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    callback: Callable[[int, int], None] | None = None,
    dry_run: bool = False,
    file_format: str = "auto",
    intended_use: str | None = None,
    licence: str | None = None,
) -> SampleResult:
    """Sample ``n`` images/volumes per class from a diffusion model folder into the dataset folder
    ``out``: :func:`write_generated_dataset` with a :class:`DiffusionGenerator`.

    Everything is checked before sampling starts: the model folder, the classes, the settings, and
    that ``out`` is new, empty, or this same dataset (then it resumes).

    Args:
        model_path: a model folder written by ``medfusion train``.
        out: the synthetic dataset folder.
        n: samples per class (>= 1).
        class_labels: ``all``, ``none`` (unconditional) or class names; default ``all`` for a
            conditional model.
        sampler: sampler settings (default ``SamplerConfig()``).
        seed: sample ``i`` gets seed ``seed + i``.
        batch_size: samples per batch and process.
        precision: ``fp32`` or ``bf16``.
        device: e.g. ``cuda:1``; default: this process's device (one GPU per process).
        slab: decode volumes ``slab`` latent planes at a time (bounds memory); None: at once.
        channels_last: channels-last networks (faster on GPUs; the same samples up to rounding).
        compile_mode: ``torch.compile`` the U-Net with this mode (e.g. ``max-autotune``,
            ``reduce-overhead``); None: eager.
        progress: progress bar (samples of the main process, with images/s).
        log: where messages go.
        callback: called with ``(samples done by this process, its total)`` after every batch.
        dry_run: check everything, print the plan, write nothing.
        file_format, intended_use, licence: the files' format and the card's entries (see
            :func:`write_generated_dataset`).
    Returns:
        what was written.
    Raises:
        ValueError: naming the argument (``n``, ``out``, ``class_labels``, ...) that is wrong;
            :class:`~medfusion.samplers.ModelFolderError` for a broken model folder.
    """
    out = Path(out)
    check_request(out, n, seed, batch_size)
    DiffusionGenerator.check_options(precision=precision, slab=slab, compile_mode=compile_mode)
    generator = DiffusionGenerator(
        load_model_folder(model_path),
        sampler=sampler,
        precision=precision,
        slab=slab,
        device=device,
        channels_last=channels_last,
        compile_mode=compile_mode,
    )
    return write_generated_dataset(
        generator,
        out,
        n,
        class_labels=class_labels,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
        log=log,
        callback=callback,
        dry_run=dry_run,
        file_format=file_format,
        intended_use=intended_use,
        licence=licence,
    )


def write_generated_dataset(
    generator: ImageGenerator,
    out: str | Path,
    n: int,
    class_labels: str | Sequence[str] | None = None,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
    log: Callable[[str], None] = print,
    callback: Callable[[int, int], None] | None = None,
    dry_run: bool = False,
    file_format: str = "auto",
    intended_use: str | None = None,
    licence: str | None = None,
) -> SampleResult:
    """Write ``n`` samples per class of ``generator`` into the dataset folder ``out``.

    Everything is checked before anything is written: the arguments, the classes, and that ``out``
    is new, empty, or this same dataset (the same kind of generator, model and settings; then it
    resumes and only missing or damaged files are written). Under several processes each process
    passes its own generator (on its own device) and the batches are dealt out among them.

    Args:
        generator: what makes the images (e.g. :class:`DiffusionGenerator`, or one from
            :func:`medfusion.samplers.load_generator`).
        out: the synthetic dataset folder.
        n: samples per class (>= 1).
        class_labels: ``all``, ``none`` (unconditional) or class names; default ``all`` for a
            conditional model.
        seed: sample ``i`` gets seed ``seed + i``.
        batch_size: samples per batch and process.
        progress: progress bar (samples of the main process, with images/s).
        log: where messages go.
        callback: called with ``(samples done by this process, its total)`` after every batch.
        dry_run: check everything, print the plan, write nothing.
        file_format: ``auto`` (like the training data: PNG or TIFF of its bit depth for images,
            NIfTI for volumes), ``png``, ``tif``, ``nifti`` or ``dicom``
            (see :mod:`medfusion.samplers.files`).
        intended_use: what the dataset is for, in the card (default: research, not clinical use).
        licence: the licence, in the card (default: not stated).
    Returns:
        what was written.
    Raises:
        ValueError: naming the argument (``n``, ``out``, ``class_labels``, ``seed``,
            ``batch_size``, ``file_format``) that is wrong, or the folder's conflict with this
            dataset.
    """
    start_time = time.perf_counter()
    out = Path(out)
    check_request(out, n, seed, batch_size)
    settings = SampleSettings(resolve_classes(generator.info, class_labels), int(seed), generator.settings())
    _check_generator_keys(generator, settings)
    if settings.seed + n * len(settings.classes) - 1 > MAX_SEED:
        raise ValueError(
            f"seed {seed} + {n * len(settings.classes)} samples passes the largest seed {MAX_SEED}; "
            "choose a smaller seed"
        )
    digest = generator.sha256()
    card = _read_card(out) if out.is_dir() else None
    _check_existing(out, card, generator.kind, digest, settings, n)
    suffix = format_suffix(generator.info, file_format)
    sharing = sharing_fields(intended_use, licence, None, generator.info.training_data)
    created = card["created"] if card else _now()
    dataset = _Dataset(generator, out, n, settings, digest, created, suffix, sharing)
    state = process_state()
    if state.is_main_process:
        log(dataset.announce(state.num_processes))
    if dry_run:
        return SampleResult(out, len(dataset.plan), 0, 0, time.perf_counter() - start_time)
    with run_lock(out, "medfusion sample"):  # one run per folder; the processes of one launch share it
        written, kept = dataset.write(state, batch_size, progress, log, callback)
    return SampleResult(out, len(dataset.plan), written, kept, time.perf_counter() - start_time)


def _check_generator_keys(generator: ImageGenerator, settings: SampleSettings) -> None:
    """The generator's settings and manifest columns do not take the writer's names."""
    clash = sorted(set(settings.generator or {}) & set(_WRITER_SETTINGS))
    if clash:
        raise ValueError(f"{type(generator).__name__}.settings() must not hold {clash}: the writer's keys")
    clash = sorted(set(generator.manifest_fields()) & set(SAMPLE_COLUMNS))
    if clash:
        raise ValueError(
            f"{type(generator).__name__}.manifest_fields() must not hold {clash}: the writer's columns"
        )


class _Dataset:
    """One dataset folder being written: its plan, its files and its card."""

    def __init__(
        self,
        generator: ImageGenerator,
        out: Path,
        n: int,
        settings: SampleSettings,
        digest: str,
        created: str,
        suffix: str,
        sharing: Mapping[str, Any],
    ):
        info = generator.info
        self.generator, self.out, self.n, self.settings = generator, out, n, settings
        self.digest, self.created, self.sharing = digest, created, sharing
        self.suffix = suffix
        self.files = SampleFiles(info, suffix, digest, settings.seed, generator.title)
        self.shape = (info.channels, *info.image_size)
        self.plan = plan_samples(settings.classes, n, settings.seed, self.suffix)
        self.targets = {s.file: inside(out, s.file) for s in self.plan}  # no name leads outside ``out``

    def announce(self, num_processes: int) -> str:
        """The plan, for the log."""
        present = sum(self.files.present(target) for target in self.targets.values())
        classes, first = self.settings.classes, self.settings.seed
        return (
            f"# medfusion sample: {len(self.plan)} samples ({self.n} per class of {', '.join(classes)}) "
            f"into {self.out}, {present} already there\n# {self.generator.description()}, seeds {first}.."
            f"{first + len(self.plan) - 1}, {num_processes} process(es)\n"
            f"# files {self.files.describe()}"
        )

    def write_card(self, complete: bool) -> None:
        card = _card(self.generator, self.digest, self.settings, self.n, self.files, complete, self.created,
                     self.sharing)  # fmt: skip
        write_card(self.out, card)

    def write(self, state, batch_size: int, progress: bool, log, callback) -> tuple[int, int]:
        """Write the missing files (this process's share of the batches) and, on the main
        process, the manifest and the complete card. Returns (written by all processes, kept)."""
        if state.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            _remove_stale_temporaries(self.out)
            self.write_card(complete=False)
            _remove_broken(self.out, list(self.targets.values()), self.files, log)
        state.wait_for_everyone()
        kept = sum(self.files.present(t) for t in self.targets.values())  # every process, before any writes
        state.wait_for_everyone()
        batches = [self.plan[i : i + batch_size] for i in range(0, len(self.plan), batch_size)]
        mine = [b for k, b in enumerate(batches) if k % state.num_processes == state.process_index]
        written = _sum_over_processes(
            state, self._write_batches(mine, progress and state.is_main_process, callback)
        )
        if state.is_main_process:
            self._finish()
        state.wait_for_everyone()
        return written, kept

    def _write_batches(self, mine: list[list[PlannedSample]], progress: bool, callback) -> int:
        todo = [b for b in mine if not all(self.files.present(self.targets[s.file]) for s in b)]
        my_total = sum(len(b) for b in mine)
        my_done = my_total - sum(len(b) for b in todo)
        written = 0
        with tqdm(total=my_total, initial=my_done, unit="img", desc="sampling", disable=not progress) as bar:
            for batch in todo:
                written += self._write_batch(batch)
                bar.update(len(batch))
                my_done += len(batch)
                if callback is not None:
                    callback(my_done, my_total)
        return written

    def _write_batch(self, batch: list[PlannedSample]) -> int:
        names = self.generator.info.class_names
        labels = [None if s.label == UNCONDITIONAL else names.index(s.label) for s in batch]
        images = self.generator.generate(labels, [s.seed for s in batch])
        images = _checked_images(images, len(batch), self.shape, self.generator.kind)
        written = 0
        for sample, image in zip(batch, images):
            target = self.targets[sample.file]
            if self.files.present(target):  # written by an earlier run: never twice
                continue
            self.files.write(target, image, sample.label, sample.seed, sample.index)
            written += 1
        return written

    def _finish(self) -> None:
        missing = [s.file for s in self.plan if not self.files.present(self.targets[s.file])]
        if missing:
            raise RuntimeError(
                f"{self.out}: {len(missing)} sample(s) missing after sampling, e.g. {missing[0]}"
            )
        atomic_write_text(self.out / MANIFEST, _manifest(self.plan, self.generator.manifest_fields()))
        self.write_card(complete=True)


def _checked_images(images: Any, n: int, shape: tuple[int, ...], kind: str):
    """The generator's batch as a float32 numpy array, after checking its shape."""
    if not isinstance(images, torch.Tensor) or tuple(images.shape) != (n, *shape):
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise RuntimeError(f"the {kind} generator returned {got} for {n} sample(s); expected {(n, *shape)}")
    return images.detach().to(device="cpu", dtype=torch.float32).numpy()


def _sum_over_processes(state, value: int) -> int:
    if state.num_processes == 1:
        return value
    import torch.distributed as dist

    total = torch.tensor([value], dtype=torch.long, device=state.device)
    dist.all_reduce(total)
    return int(total.item())
