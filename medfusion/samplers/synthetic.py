"""Write a synthetic dataset folder (see DESIGN.md) from a model folder: ``medfusion sample``.

::

    OUT/
      <class>/<index>.png | .tif | .nii.gz   one file per sample (unconditional samples: OUT/<index>.*)
      manifest.csv                           file, label, seed, sampler, steps, guidance, ...
      dataset_card.json                      the model and its hash, the settings, the counts

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from tqdm.auto import tqdm

from medfusion import __version__
from medfusion.config import Config
from medfusion.data.image import MedicalImage
from medfusion.data.writers import intensity_mapping, write_image, written_file_problem
from medfusion.runlock import run_lock
from medfusion.samplers.model_folder import ModelFolder, load_model_folder, model_hash
from medfusion.samplers.pipeline import PRECISIONS, UNCONDITIONAL, MedfusionPipeline
from medfusion.samplers.schedulers import SamplerConfig, make_scheduler
from medfusion.utils import MAX_SEED, atomic_write_text, inside, process_state

MANIFEST = "manifest.csv"
CARD = "dataset_card.json"
MANIFEST_COLUMNS = ("file", "label", "seed", "sampler", "steps", "guidance", "guidance_rescale", "eta")
CARD_FORMAT = 1
ALL_CLASSES = "all"


@dataclass(frozen=True)
class SampleSettings(Config):
    """What decides the samples of a synthetic dataset folder (with the model and ``n``).

    Attributes:
        classes: the class names sampled, in order; ``("none",)`` for unconditional samples.
        seed: sample ``i`` has seed ``seed + i``.
        sampler: sampler, steps, guidance.
        precision: ``fp32`` or ``bf16``.
        decode_slab: volumes decoded this many latent planes at a time (changes the decoded
            values slightly); None: at once.
    """

    classes: tuple[str, ...] = ()
    seed: int = 0
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    precision: str = "fp32"
    decode_slab: int | None = None


@dataclass(frozen=True)
class PlannedSample:
    index: int
    label: str  # a class name, or "none"
    seed: int
    file: str  # relative to the dataset folder


@dataclass(frozen=True)
class SampleResult:
    """What a ``write_synthetic_dataset`` call did."""

    path: Path
    total: int  # samples in the dataset
    written: int  # files this call (all processes) wrote
    kept: int  # files already complete before this call
    seconds: float


def resolve_classes(model: ModelFolder, class_labels: str | Sequence[str] | None) -> tuple[str, ...]:
    """The class names to sample: ``all`` (the default for a conditional model), names, or
    ``none`` (unconditional; the only choice for an unconditional model)."""
    names = tuple(model.info.class_names)
    if class_labels is None:
        class_labels = ALL_CLASSES if names else UNCONDITIONAL
    if isinstance(class_labels, str):
        class_labels = [class_labels]
    chosen: list[str] = []
    for label in class_labels:
        if label == ALL_CLASSES:
            if not names:
                raise ValueError("--class-label all: the model is unconditional (no classes); use none")
            chosen.extend(names)
        elif label == UNCONDITIONAL or label in names:
            chosen.append(label)
        elif not names:
            raise ValueError(f"--class-label {label!r}: the model is unconditional (no classes); use none")
        else:
            raise ValueError(
                f"--class-label {label!r}: unknown class; the model's classes are: {', '.join(names)}"
            )
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"--class-label: a class is named twice in {list(class_labels)}")
    if UNCONDITIONAL in chosen and len(chosen) > 1:
        raise ValueError("--class-label none (unconditional) cannot be mixed with classes in one folder")
    return tuple(chosen)


def output_suffix(model: ModelFolder) -> str:
    """``.nii.gz`` for volumes, ``.png`` for 1/3/4-channel images, ``.tif`` for other channel counts."""
    if model.info.spatial_dims == 3:
        return ".nii.gz"
    return ".png" if model.info.channels in (1, 3, 4) else ".tif"


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
    if not isinstance(card, dict) or "settings" not in card or "model" not in card:
        raise ValueError(f"{path}: not a medfusion dataset card (no model/settings)")
    return card


def _check_out_path(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    for parent in out.parents:  # the first existing ancestor must be a writable folder
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--out {out}: {parent} is not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ValueError(f"--out {out}: cannot create folders in {parent} (permission denied)")
            break


def _flat(settings: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _check_existing(out: Path, card: dict | None, digest: str, settings: SampleSettings, n: int) -> None:
    """Refuse an output folder that holds something else than (a part of) this dataset (``out``
    itself was checked by :func:`_check_out_path`)."""
    if card is None:
        if out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()):
            raise ValueError(
                f"--out {out}: the folder is not empty and holds no {CARD}; choose a new or empty folder"
            )
        return
    their = str(card["model"].get("sha256"))
    if their != digest:
        raise ValueError(
            f"--out {out}: holds samples of a different model (sha256 {their[:12]}..., this model "
            f"{digest[:12]}...); choose another folder"
        )
    before, now = _flat(card["settings"]), _flat(settings.to_dict())
    changed = [f"{key} {before.get(key)!r} -> {now[key]!r}" for key in now if before.get(key) != now[key]]
    if changed:
        raise ValueError(
            f"--out {out}: holds samples made with other settings ({'; '.join(changed)}); rerun with "
            "the same settings to resume, or choose another folder"
        )
    if int(card.get("n_per_class", 0)) > n:
        raise ValueError(
            f"--out {out}: already planned for --n {card['n_per_class']} per class; give --n >= "
            f"{card['n_per_class']} (more samples are added) or choose another folder"
        )


def _card(
    model: ModelFolder,
    model_path: Path,
    digest: str,
    settings: SampleSettings,
    n: int,
    suffix: str,
    complete: bool,
    created: str,
) -> dict:
    info = model.info
    mapping = intensity_mapping(suffix, info.source_dtype, info.normalization)
    return {
        "format": CARD_FORMAT,
        "description": "synthetic images generated by a latent diffusion model (medfusion); no patient data",
        "medfusion_version": __version__,
        "model": {
            "path": str(model_path.resolve()),
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
            "suffix": suffix,
            "intensity": mapping.describe(),
            "dtype": mapping.dtype,
            "spacing": list(info.spacing) if info.spacing is not None else None,
        },
        "complete": complete,
        "created": created,
        "updated": _now(),
    }


def _manifest(plan: Sequence[PlannedSample], sampler: SamplerConfig) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    for sample in plan:
        writer.writerow(
            [
                sample.file,
                sample.label,
                sample.seed,
                sampler.name,
                sampler.steps,
                sampler.guidance_scale,
                sampler.guidance_rescale,
                sampler.eta,
            ]
        )
    return buffer.getvalue()


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary files of a killed run (a clean interruption removes its own)."""
    for tmp in out.rglob(".*.tmp*"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)


def _check_steps(model: ModelFolder, sampler: SamplerConfig) -> None:
    """The sampler's steps fit the model's noise schedule (before anything is written)."""
    scheduler = make_scheduler(sampler.name, model.scheduler_config, sampler.eta, sampler.karras_sigmas)
    try:
        scheduler.set_timesteps(sampler.steps)
    except ValueError as e:
        total = model.scheduler_config.get("num_train_timesteps")
        raise ValueError(
            f"steps={sampler.steps} does not fit the model's noise schedule of {total} timesteps: {e}"
        ) from e


def _remove_broken(out: Path, files: Sequence[Path], shape: tuple[int, ...], dtype: str, log) -> None:
    """Files of an earlier run that are not whole (cut short, empty, of another shape) are
    removed, so that they are written again."""
    broken = []
    for path in files:
        if path.exists() or path.is_symlink():
            problem = written_file_problem(path, shape, dtype)
            if problem is not None:
                broken.append(f"{path.relative_to(out).as_posix()} ({problem})")
                if path.is_dir() and not path.is_symlink():
                    raise ValueError(f"{path}: a folder stands where a sample file goes; remove it")
                path.unlink()
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
) -> SampleResult:
    """Sample ``n`` images/volumes per class from the model folder into the dataset folder ``out``.

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
    Returns:
        what was written.
    """
    start_time = time.perf_counter()
    model_path, out = Path(model_path), Path(out)
    sampler = sampler or SamplerConfig()
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"--n must be an integer >= 1; got {n!r}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {batch_size}")
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if slab is not None and slab < 1:
        raise ValueError(f"--decode-slab must be >= 1; got {slab}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer in 0..{MAX_SEED}; got {seed!r}")
    _check_out_path(out)
    model = load_model_folder(model_path)
    settings = SampleSettings(resolve_classes(model, class_labels), int(seed), sampler, precision, slab)
    if settings.seed + n * len(settings.classes) - 1 > MAX_SEED:
        raise ValueError(
            f"seed {seed} + {n * len(settings.classes)} samples passes the largest seed {MAX_SEED}; "
            "choose a smaller seed"
        )
    _check_steps(model, sampler)
    digest = model_hash(model_path)
    card = _read_card(out) if out.is_dir() else None
    _check_existing(out, card, digest, settings, n)
    suffix = output_suffix(model)
    mapping = intensity_mapping(suffix, model.info.source_dtype, model.info.normalization)
    plan = plan_samples(settings.classes, n, settings.seed, suffix)
    targets = {s.file: inside(out, s.file) for s in plan}  # no name leads outside ``out``

    state = process_state()
    if state.is_main_process:
        present = sum(target.is_file() for target in targets.values())
        log(
            f"# medfusion sample: {len(plan)} samples ({n} per class of {', '.join(settings.classes)}) into "
            f"{out}, {present} already there\n# sampler {sampler.name}, {sampler.steps} steps, guidance "
            f"{sampler.guidance_scale} (rescale {sampler.guidance_rescale}), seeds {settings.seed}.."
            f"{settings.seed + len(plan) - 1}, {precision}, {state.num_processes} process(es)\n"
            f"# files {suffix}: {mapping.describe()}"
        )
    if dry_run:
        return SampleResult(out, len(plan), 0, 0, time.perf_counter() - start_time)
    with run_lock(out, "medfusion sample"):  # one run per folder; the processes of one launch share it
        created = card["created"] if card else _now()
        if state.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            _remove_stale_temporaries(out)
            atomic_write_text(
                out / CARD,
                json.dumps(_card(model, model_path, digest, settings, n, suffix, False, created), indent=2)
                + "\n",
            )
            shape = (model.info.channels, *model.info.image_size)
            _remove_broken(out, [targets[s.file] for s in plan], shape, mapping.dtype, log)
        state.wait_for_everyone()
        kept = sum(targets[s.file].is_file() for s in plan)  # every process, before any writes
        state.wait_for_everyone()

        batches = [plan[i : i + batch_size] for i in range(0, len(plan), batch_size)]
        mine = [b for k, b in enumerate(batches) if k % state.num_processes == state.process_index]
        todo = [b for b in mine if not all(targets[s.file].is_file() for s in b)]
        my_total = sum(len(b) for b in mine)
        my_done = my_total - sum(len(b) for b in todo)
        pipe = MedfusionPipeline(
            model,
            device=device or state.device,
            precision=precision,
            channels_last=channels_last,
            compile_mode=compile_mode,
        )
        spacing = model.info.spacing
        written = 0
        with tqdm(
            total=my_total,
            initial=my_done,
            unit="img",
            desc="sampling",
            disable=not (progress and state.is_main_process),
        ) as bar:
            for batch in todo:
                latents = pipe.sample_latents([s.label for s in batch], [s.seed for s in batch], sampler)
                images = pipe.decode(latents, slab=slab).numpy()
                for sample, image in zip(batch, images):
                    target = targets[sample.file]
                    if target.is_file():  # written by an earlier run: never twice
                        continue
                    array = mapping(image)
                    write_image(target, MedicalImage.from_array(array, spacing=spacing) if spacing else array)
                    written += 1
                bar.update(len(batch))
                my_done += len(batch)
                if callback is not None:
                    callback(my_done, my_total)

        written = _sum_over_processes(state, written)
        if state.is_main_process:
            missing = [s.file for s in plan if not targets[s.file].is_file()]
            if missing:
                raise RuntimeError(
                    f"{out}: {len(missing)} sample(s) missing after sampling, e.g. {missing[0]}"
                )
            atomic_write_text(out / MANIFEST, _manifest(plan, sampler))
            atomic_write_text(
                out / CARD,
                json.dumps(_card(model, model_path, digest, settings, n, suffix, True, created), indent=2)
                + "\n",
            )
        state.wait_for_everyone()
    seconds = time.perf_counter() - start_time
    return SampleResult(out, len(plan), written, kept, seconds)


def _sum_over_processes(state, value: int) -> int:
    if state.num_processes == 1:
        return value
    import torch
    import torch.distributed as dist

    total = torch.tensor([value], dtype=torch.long, device=state.device)
    dist.all_reduce(total)
    return int(total.item())
