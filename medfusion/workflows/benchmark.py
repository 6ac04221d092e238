"""``medfusion benchmark``: the latent diffusion model and the GAN baselines trained on the same data
for the same wall-clock time, sampled alike and measured with one yardstick.

Every model gets the same budget (``minutes`` of wall-clock time, the diffusion model's VAE and
U-Net together), the same training images, ``n`` samples per class, and the same evaluation: one
domain feature encoder trained once on the training images (for as long as each model trains), the
same held-out real images, real-vs-real references and intervals
(:func:`medfusion.metrics.evaluate.evaluate`), and, with two classes or more, the same classifier
trained on each synthetic set and tested on the held-out images (TSTR) beside one trained on the
real training images (TRTR). Sample folders made elsewhere join as ``external`` rows.

Before any training everything is checked: the model names, that each architecture supports the
data's dims, the external folders (classes, channels, image size), and that one training step of
every model fits its budget (timed here, on the very run it trains).

Each model trains as ``medfusion demo`` trains its stages: a step is timed, the steps its budget
buys are planned, and the loop stops at the deadline whatever the plan
(:func:`medfusion.workflows.demo.train_stage`); the diffusion model's budget is shared by its VAE
(:data:`DIFFUSION_SHARES`) and its U-Net (with the latent cache) by the same
:class:`~medfusion.workflows.budget.TimeBudget` as the demo's stages. Models are as small as the
demo's for the device (:data:`medfusion.workflows.demo.PROFILES`; the GANs at their defaults).

Everything lands in ``out``::

    OUT/features/                 the shared domain encoder
    OUT/models/NAME/              a trained model's run folders (diffusion: autoencoder/ and model/;
                                  a GAN: model/), synthetic/ (the samples), evaluation/
                                  (metrics.json, report.html) and record.json (what was done)
    OUT/models/NAME/evaluation/   an external row's evaluation
    OUT/trtr.json                 the classifier trained on the real training images
    OUT/benchmark.json            every row (see :func:`run_benchmark`)
    OUT/benchmark.html            the table, a grid per class (real | each model), precision/recall

The benchmark resumes: a model whose training (sampling, evaluation) finished is not trained
(sampled, evaluated) again; a model whose training was interrupted trains again from the start (its
budget is wall-clock time). A later call must give the same data, budget, samples and seed
(``settings.json``), or ``force`` to start over.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medfusion import __version__
from medfusion.config import DataConfig, merge_dicts
from medfusion.metrics.report import COLUMNS as REPORT_COLUMNS
from medfusion.runlock import earlier_settings, run_lock
from medfusion.utils import atomic_write_text, process_state
from medfusion.workflows import demo
from medfusion.workflows.budget import TimeBudget

if TYPE_CHECKING:
    from medfusion.training.run import PreparedRun

DIFFUSION = "diffusion"
DEFAULT_MINUTES = 5.0
# the diffusion model's budget: its VAE's share, then its U-Net's (which caches the latents first)
DIFFUSION_SHARES = {"autoencoder": 0.35, "diffusion": 0.65}
SETTINGS_FILE = "settings.json"
BENCHMARK_FILE = "benchmark.json"
REPORT_FILE = "benchmark.html"
TRTR_FILE = "trtr.json"
FEATURES_DIR = "features"
MODELS_DIR = "models"
RECORD_FILE = "record.json"
SYNTHETIC_DIR = "synthetic"
EVALUATION_DIR = "evaluation"
GRID_IMAGES = 8  # per class and model in the report
SAMPLE_BATCH = 16
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
SETTINGS = ("data", "heldout", "minutes", "n", "resize", "seed", "device")
COLUMNS = (  # (key of a row's metrics, title): the table's metric columns, the evaluation's first
    *REPORT_COLUMNS,
    ("diversity", "MS-SSIM in class"),
    ("memorisation", "memorised ↓"),
    ("tstr", "TSTR bal. acc. ↑"),
)
LOWER_BETTER = ("fid", "kid", "memorisation")
HIGHER_BETTER = ("precision", "recall", "coverage", "tstr")


@dataclass
class BenchmarkResult:
    """What :func:`run_benchmark` did: the run folder, the report and one row per model."""

    out: Path
    report: Path
    rows: dict[str, dict]
    reference: dict
    seconds: float = 0.0
    summary: dict = field(default_factory=dict)


def default_models(spatial_dims: int) -> tuple[str, ...]:
    """The diffusion model and every GAN architecture that supports ``spatial_dims``."""
    from medfusion.baselines.arch import ARCHITECTURES, architecture

    return (DIFFUSION, *(name for name in ARCHITECTURES if spatial_dims in architecture(name).spatial_dims))


def parse_external(items: Sequence[str]) -> dict[str, Path]:
    """``NAME=DIR`` items (``--external``) as ``{NAME: DIR}``; errors name the item."""
    out: dict[str, Path] = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ValueError(
                f"external {item!r}: give NAME=SAMPLES_DIR (e.g. stylegan3=/data/stylegan3-samples)"
            )
        if name in out:
            raise ValueError(f"external {item!r}: the name {name!r} is given twice")
        out[name] = Path(folder)
    return out


def models_given(models: Sequence[str] | None, spatial_dims: int) -> tuple[str, ...]:
    """``models``, or the default ones for ``spatial_dims`` when None."""
    return default_models(spatial_dims) if models is None else tuple(models)


def check_models(models: Sequence[str], spatial_dims: int, external: Mapping[str, Path]) -> tuple[str, ...]:
    """The trained models' names checked against what is known and supports the data, and the
    external rows' names against them. Returns the models as a tuple."""
    from medfusion.baselines.arch import ARCHITECTURES, architecture

    models = tuple(models)
    known = (DIFFUSION, *ARCHITECTURES)
    if not models and not external:
        raise ValueError("models: give at least one model to train or an external folder")
    for name in models:
        if name not in known:
            raise ValueError(f"models: unknown model {name!r}; known: {', '.join(known)}")
        if models.count(name) > 1:
            raise ValueError(f"models: {name!r} is given twice")
        if name != DIFFUSION and spatial_dims not in architecture(name).spatial_dims:
            dims = " or ".join(f"{d}D" for d in architecture(name).spatial_dims)
            raise ValueError(f"models: {name} supports {dims} images only; the data is {spatial_dims}D")
    for name in external:
        if not NAME.fullmatch(name):
            raise ValueError(
                f"external {name!r}: a name of letters, digits and . _ + - (it names a folder), "
                "starting with a letter or digit"
            )
        if name in models:
            raise ValueError(f"external {name!r}: the name of a model trained here; choose another")
    return models


def run_benchmark(
    data: str | os.PathLike,
    heldout: str | os.PathLike,
    out: str | os.PathLike,
    minutes: float = DEFAULT_MINUTES,
    models: Sequence[str] | None = None,
    external: Mapping[str, str | os.PathLike] | None = None,
    n: int | None = None,
    resize: Sequence[int] | None = None,
    tstr: bool = True,
    gan_configs: Mapping[str, Mapping[str, Any]] | None = None,
    device: str | None = None,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> BenchmarkResult:
    """Train every model on ``data`` for ``minutes`` each, sample ``n`` per class from each, and
    evaluate them all (and the ``external`` sample folders) against ``heldout`` alike.

    Args:
        data: the training images, ``<class>/<file>`` (or unlabelled).
        heldout: held-out real images of the same classes: the evaluation's reference.
        out: the benchmark folder (new, empty, an earlier benchmark of the same settings to resume,
            or any earlier benchmark with ``force``).
        minutes: wall-clock training time of each model (> 0).
        models: ``diffusion`` and GAN architectures (``stylegan2``, ``wgan-gp``); default: all
            that support the data's dims (:func:`default_models`).
        external: ``{name: folder}`` of sample folders made elsewhere, evaluated as rows; they
            must hold the training data's classes, channels and image size.
        n: samples per class of every model; default: the held-out images of the largest class
            (at least :data:`medfusion.workflows.demo.MIN_PER_CLASS`).
        resize: resize every image to this size first (array order); default: their own size.
        tstr: train a classifier on each synthetic set and one on the real training images, all
            tested on ``heldout`` (with 2 classes or more).
        gan_configs: per GAN, config sections over the benchmark's (e.g. ``{"wgan-gp": {"model":
            {"base_channels": 64}}}``; see :class:`~medfusion.baselines.gan.GANRunConfig`); the
            diffusion model's sizes follow the device (see the module docstring).
        device: ``cpu``, ``cuda``...; default: CUDA when available.
        seed: of the training runs, the samples, the evaluation's draws and the classifiers.
        force: remove an earlier benchmark in ``out`` first.
        progress: progress bars.
        log: where stage headers and summaries go.

    Returns:
        The rows (also in ``benchmark.json``): per model ``source`` (``trained``/``external``),
        ``kind``, ``metrics`` (overall ``fid``, ``kid``, ``precision``, ``recall``, ``density``,
        ``coverage`` with intervals where computed, ``diversity``, ``memorisation``, ``tstr``),
        ``within_band``, ``parameters`` (the weights of the model folder), ``training_seconds``,
        ``steps``, ``sampling_images_per_second``, ``n_per_class`` and where its files are; and the
        real-vs-real reference row.

    Raises:
        ValueError, FileNotFoundError, FileExistsError: before any training (see the module
            docstring).
    """
    import medfusion.baselines  # noqa: F401  (registers the GAN model folders' kinds)

    if not minutes > 0:
        raise ValueError(f"minutes must be > 0; got {minutes}")
    if n is not None and n < 1:
        raise ValueError(f"n must be >= 1; got {n}")
    if process_state().num_processes > 1:
        raise RuntimeError(
            "medfusion benchmark runs in one process; use the single commands under a launcher"
        )
    start = time.monotonic()
    external = {name: Path(folder) for name, folder in (external or {}).items()}
    bench = _Benchmark(
        Path(out),
        Path(data),
        Path(heldout),
        float(minutes),
        resize,
        demo.pick_device(device),
        seed,
        progress,
        log,
    )
    bench.gan_configs = {name: dict(config) for name, config in (gan_configs or {}).items()}
    with run_lock(bench.out, "medfusion benchmark"):
        bench.open(models, external, n)
        bench.check_out(force)
        plans = bench.plan_training()
        atomic_write_text(bench.out / SETTINGS_FILE, json.dumps(bench.settings, indent=2) + "\n")
        bench.train_features()
        for name in bench.models:
            bench.train_and_sample(name, plans.get(name))
        trtr = bench.train_on_real() if tstr else None
        rows = {name: bench.evaluate(name, trtr) for name in bench.rows()}
        reference = bench.reference_row(rows, trtr)
        summary = bench.write(rows, reference, trtr, time.monotonic() - start)
    for line in table_lines(rows, reference):
        log(line)
    log(f"wrote {bench.out / BENCHMARK_FILE} and {bench.out / REPORT_FILE}")
    return BenchmarkResult(bench.out, bench.out / REPORT_FILE, rows, reference, summary["seconds"], summary)


@dataclass
class _Plan:
    """A model's prepared first run and its timed step (None: the diffusion model's U-Net, which
    needs the trained VAE)."""

    run: PreparedRun
    seconds_per_step: float


class _Benchmark:
    """The state of one benchmark: folders, data, settings; one method per stage."""

    def __init__(self, out, data, heldout, minutes, resize, device, seed, progress, log):
        self.out, self.data_dir, self.heldout_dir = out, data, heldout
        self.minutes, self.seconds = minutes, 60.0 * minutes
        self.resize = tuple(int(v) for v in resize) if resize else None
        self.device, self.seed, self.progress, self.log = device, seed, progress, log
        self.data_config = DataConfig(resize=self.resize)
        self.stage = 0

    # --- inputs -----------------------------------------------------------------------------
    def open(self, models, external: dict[str, Path], n: int | None) -> None:
        """Open the folders alike and check every input (no training yet)."""
        from medfusion.data.dataset import open_alike

        for name, folder in (("data", self.data_dir), ("heldout", self.heldout_dir), *external.items()):
            where = name if name in ("data", "heldout") else f"external {name}"
            if not folder.is_dir():
                raise FileNotFoundError(f"{where} {folder}: not a folder")
        folders = {"data": self.data_dir, "heldout": self.heldout_dir, **external}
        names = {name: f"external {name}" for name in external}
        datasets, _ = open_alike(folders, self.data_config, names)
        self.stage_data = demo.StageData.from_folders(self.data_dir, self.heldout_dir, self.resize)
        classes = list(datasets["data"].class_names)
        for name, dataset in datasets.items():
            if name == "data":
                continue
            where = "heldout" if name == "heldout" else f"external {name}"
            if list(dataset.class_names) != classes:
                missing = sorted(set(classes) - set(dataset.class_names))
                extra = sorted(set(dataset.class_names) - set(classes))
                raise ValueError(
                    f"{where} {folders[name]}: its classes {list(dataset.class_names)} differ from those "
                    f"of data {self.data_dir}: {classes} (missing: {missing}, extra: {extra})"
                )
            if name != "heldout" and tuple(dataset.info.shape) != self.stage_data.size:
                raise ValueError(
                    f"external {name} {folders[name]}: images of size {list(dataset.info.shape)}, but the "
                    f"models here make {list(self.stage_data.size)} (the training images' size); resample "
                    "the samples to it first, or train at their size (resize)"
                )
        self.external = external
        self.models = check_models(models_given(models, self.stage_data.dims), self.stage_data.dims, external)
        gans = [name for name in self.models if name != DIFFUSION]
        for name in self.gan_configs:
            if name not in gans:
                raise ValueError(f"gan_configs: {name!r} is not a GAN trained here; GANs here: {gans}")
        self.n = n or max(demo.MIN_PER_CLASS, self.stage_data.heldout_per_class)
        kind = "cuda" if self.device.startswith("cuda") else "cpu"
        self.profile = demo.PROFILES[(self.stage_data.dims, kind)]
        self.settings = {
            "data": str(self.data_dir.resolve()),
            "heldout": str(self.heldout_dir.resolve()),
            "minutes": self.minutes,
            "n": self.n,
            "resize": list(self.resize) if self.resize else None,
            "seed": self.seed,
            "device": kind,
        }

    def check_out(self, force: bool) -> None:
        """``out`` must be new, empty (but for its lock), or an earlier benchmark: of the same settings
        (resumed) or, with ``force``, any (removed)."""
        out = self.out
        not_ours = f"out {out} is not empty and not a medfusion benchmark; choose another folder"
        earlier = earlier_settings(out, SETTINGS_FILE, force, not_ours)
        if earlier is None:
            return
        differ = [k for k in SETTINGS if earlier.get(k) != self.settings[k]]
        if differ:
            changes = ", ".join(f"{k} {earlier.get(k)!r} -> {self.settings[k]!r}" for k in differ)
            raise FileExistsError(
                f"out {out} holds a benchmark of other settings ({changes}); every model must get the same "
                "data and budget: give another folder, the same settings to resume, or force=True to start "
                "over"
            )
        self.log(f"resuming the benchmark in {out}: finished stages are kept")

    # --- training ---------------------------------------------------------------------------
    def model_dir(self, name: str) -> Path:
        return self.out / MODELS_DIR / name

    def record(self, name: str) -> dict:
        file = self.model_dir(name) / RECORD_FILE
        return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}

    def save_record(self, name: str, record: dict) -> None:
        atomic_write_text(self.model_dir(name) / RECORD_FILE, json.dumps(record, indent=2) + "\n")

    def header(self, text: str) -> None:
        self.stage += 1
        self.log(f"\n[benchmark {self.stage}] {text}")

    def plan_training(self) -> dict[str, _Plan]:
        """Prepare every model still to train and time one step of it here; a budget that does not
        buy one step (with the work around it) is an error, before any training."""
        from medfusion.training.run import time_one_step

        plans = {}
        todo = [name for name in self.models if "training" not in self.record(name)]
        if todo:
            self.header(f"timing a training step of {', '.join(todo)} (each gets {self.minutes:g} min)")
        for name in todo:
            if name == DIFFUSION:
                run, stage, seconds = (
                    self.autoencoder_run(),
                    "autoencoder",
                    self.seconds * DIFFUSION_SHARES["autoencoder"] / sum(DIFFUSION_SHARES.values()),
                )
            else:
                run, stage, seconds = self.gan_run(name), "gan", self.seconds
            per_step = time_one_step(run, **demo.PROBE)
            needed = per_step * (demo.AROUND_STEPS[stage] + demo.OVERHEAD)
            what = "its VAE's share" if name == DIFFUSION else "its budget"
            self.log(f"{name}: {per_step:.3f} s per step here; {what}: {seconds:.0f} s")
            if needed > seconds:
                least = math.ceil(needed / seconds * self.minutes * 10) / 10
                raise ValueError(
                    f"minutes {self.minutes:g} is too small for {name}: one training step takes "
                    f"{per_step:.2f} s here, {needed:.0f} s with the work around it, more than {what} "
                    f"({seconds:.0f} s); give minutes >= {least:g}"
                )
            plans[name] = _Plan(run, per_step)
        return plans

    def autoencoder_run(self) -> PreparedRun:
        return demo.autoencoder_run(
            self.stage_data, self.model_dir(DIFFUSION), self.profile, self.seed, self.progress
        )

    def gan_run(self, name: str) -> PreparedRun:
        from medfusion.baselines.gan import GANRunConfig, prepare_gan_run

        profile = self.profile
        base = {
            "data": self.stage_data.section(),
            "arch": name,
            "train": {
                "max_steps": demo.STEP_BOUNDS["gan"][1],
                "batch_size": min(64, profile.unet_batch),
                "mixed_precision": profile.mixed_precision,
                "keep_checkpoints": 1,
                "log_every": 10,
                "num_workers": profile.num_workers,
                "seed": self.seed,
            },
        }
        base = merge_dicts(base, self.gan_configs.get(name, {}))
        config = GANRunConfig.from_dict(base, source="medfusion benchmark")
        return prepare_gan_run(self.stage_data.train, self.model_dir(name), config, progress=self.progress)

    def train_features(self) -> None:
        """The domain encoder of every evaluation, trained once on the training images for as long as
        each model trains (or the one trained already)."""
        from medfusion.metrics.features import ENCODER_DIR

        folder = self.out / FEATURES_DIR
        if (folder / ENCODER_DIR / "config.json").is_file():
            return
        if folder.exists():
            shutil.rmtree(folder)
        self.header(f"training the domain feature encoder on {self.data_dir} ({self.minutes:g} min at most)")
        deadline = time.monotonic() + self.seconds
        demo.train_features_stage(
            self.stage_data, folder, self.profile, deadline, self.seed, self.progress, self.log
        )

    def train_and_sample(self, name: str, plan: _Plan | None) -> None:
        record = self.record(name)
        if "training" not in record:
            self.header(f"training {name} for {self.minutes:g} min")
            if self.model_dir(name).exists():
                self.log(f"{name}: an interrupted training starts over (its budget is wall-clock time)")
                shutil.rmtree(self.model_dir(name))
            record = {}  # what was made from an earlier training is gone with it
            started = time.monotonic()
            if name == DIFFUSION:
                stages, path = self._train_diffusion(plan)
            else:
                stages = {"gan": self._train_gan(plan)}
                path = self.model_dir(name) / "model"
            record["training"] = {
                "seconds": round(time.monotonic() - started, 1),
                "budget_seconds": self.seconds,
                "stages": stages,
                "model": str(path),
            }
            self.save_record(name, record)
        if "sampling" not in record:
            self.header(f"sampling {self.n} per class from {name}")
            record["sampling"] = self._sample(name, Path(record["training"]["model"]))
            self.save_record(name, record)

    def _train_diffusion(self, plan: _Plan) -> tuple[dict, Path]:
        budget = TimeBudget(self.seconds, DIFFUSION_SHARES)
        vae_path, vae = demo.train_autoencoder_stage(
            plan.run, budget.deadline("autoencoder"), self.progress, self.log, plan.seconds_per_step
        )
        model_path, unet = demo.train_unet_stage(
            self.stage_data,
            vae_path,
            self.model_dir(DIFFUSION),
            self.profile,
            budget.deadline("diffusion"),
            self.seed,
            self.progress,
            self.log,
        )
        return {"autoencoder": vae, "diffusion": unet}, model_path

    def _train_gan(self, plan: _Plan) -> dict:
        deadline = time.monotonic() + self.seconds
        return demo.train_stage(
            plan.run,
            "gan",
            deadline,
            self.progress,
            self.log,
            plan.seconds_per_step,
            until_deadline=True,  # a constant learning rate: every second of the budget is used
            warmup_steps=lambda steps: 0,
            preview_every=lambda steps: steps,
        )

    def _sample(self, name: str, model: Path) -> dict:
        from medfusion.samplers.generator import load_generator
        from medfusion.samplers.synthetic import write_generated_dataset

        generator = load_generator(model, device=self.device)
        folder = self.model_dir(name) / SYNTHETIC_DIR
        result = write_generated_dataset(
            generator,
            folder,
            n=self.n,
            seed=self.seed,
            batch_size=SAMPLE_BATCH,
            progress=self.progress,
            log=self.log,
        )
        rate = result.written / result.seconds if result.written and result.seconds > 0 else None
        return {
            "folder": str(folder),
            "n_per_class": self.n,
            "images": result.total,
            "seconds": round(result.seconds, 2),
            "images_per_second": None if rate is None else round(rate, 2),
            "generator": generator.description(),
            "parameters": count_parameters(model),
        }

    # --- evaluation -------------------------------------------------------------------------
    def rows(self) -> list[str]:
        return [*self.models, *self.external]

    def synthetic(self, name: str) -> Path:
        return self.external[name] if name in self.external else self.model_dir(name) / SYNTHETIC_DIR

    def classifier_config(self):
        from medfusion.downstream import ClassifierConfig

        dims = self.stage_data.dims
        return ClassifierConfig(max_steps=demo.TSTR_STEPS[dims], batch_size=32 if dims == 2 else 16)

    def tstr_seeds(self) -> tuple[int, ...]:
        return tuple(range(self.seed, self.seed + demo.TSTR_SEEDS))

    def classify(self, synthetic: Path, regime: str) -> dict:
        """One regime of :func:`medfusion.downstream.tstr` (``tstr``: trained on ``synthetic``;
        ``trtr``: on the training images), with the benchmark's classifier and seeds."""
        from medfusion.downstream import tstr

        return tstr(
            self.data_dir,
            synthetic,
            self.heldout_dir,
            self.data_config,
            self.classifier_config(),
            seeds=self.tstr_seeds(),
            device=self.device,
            progress=self.progress,
            log=self.log,
            regimes=(regime,),
        )

    def train_on_real(self) -> dict | None:
        """TRTR once: the classifier trained on the real training images (None with fewer than 2
        classes)."""

        if len(self.stage_data.classes) < 2:
            self.log("no TSTR: it needs 2 classes or more")
            return None
        file = self.out / TRTR_FILE
        if file.is_file():
            return json.loads(file.read_text(encoding="utf-8"))
        self.header("a classifier trained on the real training images, tested on the held-out ones (TRTR)")
        result = self.classify(self.synthetic(self.rows()[0]), "trtr")
        atomic_write_text(file, json.dumps(result, indent=2) + "\n")
        return result

    def evaluate(self, name: str, trtr: dict | None) -> dict:
        """TSTR and the evaluation of one row (or those done already); returns its row."""
        import medfusion.metrics.evaluate as evaluation
        from medfusion.metrics.features import load_extractor

        record = self.record(name)
        folder = self.model_dir(name) / EVALUATION_DIR
        if trtr is not None and "tstr" not in record:
            self.header(
                f"a classifier trained on the samples of {name}, tested on the held-out images (TSTR)"
            )
            result = self.classify(self.synthetic(name), "tstr")
            record["tstr"] = {"tstr": result["tstr"], "n_train": result["n_train"]["tstr"]}
            self.save_record(name, record)
        if not record.get("evaluated") or not (folder / evaluation.METRICS_FILE).is_file():
            self.header(f"evaluating {name} against the held-out images")
            utility = None
            if trtr is not None:
                utility = {
                    **trtr,
                    "tstr": record["tstr"]["tstr"],
                    "n_train": {**trtr["n_train"], "tstr": record["tstr"]["n_train"]},
                }
            extractor = load_extractor(self.out / FEATURES_DIR, self.device)
            pipeline = {
                "model": name,
                "budget_minutes": self.minutes,
                "device": self.device,
                "stages": {
                    **record.get("training", {}).get("stages", {}),
                    **({"sample": record["sampling"]} if "sampling" in record else {}),
                },
                "medfusion_version": __version__,
            }
            evaluation.evaluate(
                self.heldout_dir,
                self.synthetic(name),
                folder,
                extractor,
                train=self.data_dir,
                data=self.data_config,
                device=self.device,
                progress=self.progress,
                log=self.log,
                pipeline=pipeline,
                seed=self.seed,
                utility=utility,
            )
            record["evaluated"] = True
            self.save_record(name, record)
        metrics = json.loads((folder / evaluation.METRICS_FILE).read_text(encoding="utf-8"))
        return self.row(name, record, metrics, folder)

    def row(self, name: str, record: dict, metrics: dict, folder: Path) -> dict:
        overall = metrics["overall"]
        values: dict[str, Any] = {}
        for key in ("fid", "kid", "precision", "recall", "density", "coverage"):
            if key in overall:
                values[key] = {"value": overall[key], "interval": overall.get("interval", {}).get(key)}
        if "kid_std" in overall:
            values["kid"]["std"] = overall["kid_std"]
        diversity = [
            entry["diversity"]["value"] for entry in metrics["per_class"].values() if "diversity" in entry
        ]
        if not diversity and "fake" in metrics.get("diversity", {}):
            diversity = list(metrics["diversity"]["fake"].values())
        if diversity:
            values["diversity"] = {"value": sum(diversity) / len(diversity), "classes": len(diversity)}
        if "memorisation" in metrics:
            memo = metrics["memorisation"]
            values["memorisation"] = {"value": memo["fraction_flagged"], "flagged": memo["flagged"]}
        if "tstr" in record:
            accuracy = record["tstr"]["tstr"]["balanced_accuracy"]
            values["tstr"] = {"value": accuracy["mean"], "std": accuracy["std"]}
        training = record.get("training", {})
        sampling = record.get("sampling", {})
        return {
            "source": "external" if name in self.external else "trained",
            "kind": _kind(self.synthetic(name)),
            "synthetic": str(self.synthetic(name)),
            "metrics": values,
            "n_real": overall["n_real"],
            "n_fake": overall["n_fake"],
            "within_band": metrics.get("verdict", {}).get("within_band"),
            "verdict": metrics.get("verdict", {}).get("text"),
            "reference": overall.get("reference"),
            "diversity_real": _mean(metrics.get("diversity", {}).get("real", {}).values()),
            "parameters": sampling.get("parameters"),
            "training_seconds": training.get("seconds"),
            "steps": {stage: info.get("steps_run") for stage, info in training.get("stages", {}).items()},
            "sampling_images_per_second": sampling.get("images_per_second"),
            "n_per_class": sampling.get("n_per_class"),
            "extractor": metrics["extractor"],
            "evaluation": str(folder),
            "report": str(folder / "report.html"),
        }

    def reference_row(self, rows: dict[str, dict], trtr: dict | None) -> dict:
        """The real-vs-real row: held-out real images against as many training images, at the n of the
        first row's reference (every row has the same n per class when it samples the same n)."""
        out: dict[str, Any] = {"definition": "held-out real images against training images, at the same n"}
        first = next((row for row in rows.values() if row.get("reference")), None)
        if first is not None:
            reference = first["reference"]
            out["n_real"], out["n_other"] = reference["n_real"], reference["n_other"]
            out["metrics"] = {
                key: {"value": entry["reference"], "interval": entry.get("reference_interval")}
                for key, entry in reference.items()
                if isinstance(entry, dict) and "reference" in entry
            }
            diversity = first.get("diversity_real")
            if diversity is not None:
                out["metrics"]["diversity"] = {"value": diversity}
        if trtr is not None:
            accuracy = trtr["trtr"]["balanced_accuracy"]
            out.setdefault("metrics", {})["tstr"] = {"value": accuracy["mean"], "std": accuracy["std"]}
        return out

    def write(self, rows: dict[str, dict], reference: dict, trtr: dict | None, seconds: float) -> dict:
        summary = {
            **self.settings,
            "models": list(self.models),
            "external": {name: str(folder) for name, folder in self.external.items()},
            "classes": list(self.stage_data.classes),
            "image_size": list(self.stage_data.size),
            "spatial_dims": self.stage_data.dims,
            "budget": "wall-clock training time of each model (the diffusion model: its VAE and its U-Net)",
            "rows": rows,
            "real_vs_real": reference,
            "trtr_note": None if trtr is not None else "no TSTR (off, or fewer than 2 classes)",
            "medfusion_version": __version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "seconds": round(seconds, 1),
        }
        atomic_write_text(self.out / BENCHMARK_FILE, json.dumps(summary, indent=2) + "\n")
        grids = self.grid_images()
        atomic_write_text(self.out / REPORT_FILE, benchmark_html(summary, grids, self.out))
        return summary

    def grid_images(self) -> dict[str, dict[str, Any]]:
        """Per class (None: unlabelled), the first images of the held-out set and of each row."""
        import torch

        from medfusion.data.dataset import open_alike

        folders = {"real": self.heldout_dir, **{name: self.synthetic(name) for name in self.rows()}}
        datasets, _ = open_alike(folders, self.data_config)
        grids: dict[str, dict[str, Any]] = {}
        for name, dataset in datasets.items():
            names = dataset.class_names
            for index, sample in enumerate(dataset.samples):
                label = sample.label if names else None
                held = grids.setdefault(str(label) if label is not None else "all", {}).setdefault(name, [])
                if len(held) < GRID_IMAGES:
                    held.append(dataset[index]["image"])
        return {
            label: {name: torch.stack(images) for name, images in per.items()} for label, per in grids.items()
        }


def count_parameters(folder: str | os.PathLike) -> int:
    """Weights in the safetensors files of a model folder (read from their headers)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(Path(folder).rglob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle is not a mapping)
                total += math.prod(handle.get_slice(key).get_shape())
    return total


def _kind(folder: Path) -> str | None:
    """The generator kind a synthetic folder's card records (None: no card)."""
    from medfusion.samplers.card import CARD

    file = folder / CARD
    if not file.is_file():
        return None
    try:
        card = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    generator = card.get("model") or {}
    return generator.get("kind") if isinstance(generator, dict) else None


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


# --- the table and the report -------------------------------------------------------------------
def _number(value: float | None, digits: int = 3) -> str:
    from medfusion.metrics.evaluate import significant

    return significant(value, digits)


def _metric_text(key: str, entry: dict | None) -> str:
    if entry is None:
        return "–"
    if key == "memorisation":
        return f"{100 * entry['value']:.1f}%"
    text = _number(entry["value"])
    if entry.get("std", 0.0) >= 1e-9:  # not 0 but for rounding (KID on subsets that are the whole sets)
        text += f" ± {_number(entry['std'], 2)}"
    return text


def _best(rows: dict[str, dict], key: str) -> set[str]:
    """The rows with the best value of ``key`` (none for metrics without a direction)."""
    values = {name: row["metrics"][key]["value"] for name, row in rows.items() if key in row["metrics"]}
    if not values or key not in LOWER_BETTER + HIGHER_BETTER:
        return set()
    best = min(values.values()) if key in LOWER_BETTER else max(values.values())
    return {name for name, value in values.items() if value == best}


def _seconds_text(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds / 60:.1f} min"


def table_lines(rows: dict[str, dict], reference: dict) -> list[str]:
    """The table as text lines (what the command prints), columns as wide as their widest cell."""
    keys = [key for key, _ in COLUMNS]
    table = [["model", *keys, "params", "train", "img/s"]]
    for name, row in rows.items():
        params = "–" if row["parameters"] is None else f"{row['parameters'] / 1e6:.2f}M"
        rate = row["sampling_images_per_second"]
        table.append(
            [name, *(_metric_text(key, row["metrics"].get(key)) for key in keys), params,
             _seconds_text(row["training_seconds"]), "–" if rate is None else f"{rate:.1f}"]
        )  # fmt: skip
    if reference.get("metrics"):
        table.append(["real vs real", *(_metric_text(key, reference["metrics"].get(key)) for key in keys)])
    widths = [max(len(line[i]) for line in table if i < len(line)) for i in range(len(table[0]))]
    lines = [""]
    for line in table:
        cells = [line[0].ljust(widths[0]), *(cell.rjust(width) for cell, width in zip(line[1:], widths[1:]))]
        lines.append("  ".join(cells).rstrip())
    return lines


STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:8px 0;font-size:92%}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}.best{font-weight:bold;background:#e8f5e9}
.ref td{color:#555;font-style:italic}.note{color:#555;font-size:90%}.interval{color:#777;font-size:85%}
.grid{display:flex;flex-wrap:wrap;gap:12px}.grid figure{margin:0}
.grid img{image-rendering:pixelated;width:200px}
figcaption{font-size:90%;text-align:center}.in{color:#1b5e20}.out{color:#b71c1c}
"""


def _cell(key: str, entry: dict | None, best: bool) -> str:
    if entry is None:
        return "<td>–</td>"
    from medfusion.metrics.evaluate import interval_text

    interval = entry.get("interval")
    extra = f"<div class='interval'>{html.escape(interval_text(interval))}</div>" if interval else ""
    css = " class='best'" if best else ""
    return f"<td{css}>{html.escape(_metric_text(key, entry))}{extra}</td>"


def _html_table(summary: dict, out: Path) -> str:
    rows, reference = summary["rows"], summary["real_vs_real"]
    best = {key: _best(rows, key) for key, _ in COLUMNS}
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in COLUMNS)
    body = []
    for name, row in rows.items():
        cells = "".join(_cell(key, row["metrics"].get(key), name in best[key]) for key, _ in COLUMNS)
        band = {True: ("in", "✓ within"), False: ("out", "✗ outside"), None: ("", "–")}[row["within_band"]]
        params = "–" if row["parameters"] is None else f"{row['parameters'] / 1e6:.2f} M"
        rate = row["sampling_images_per_second"]
        steps = ", ".join(f"{k} {v}" for k, v in row["steps"].items() if v is not None) or "–"
        link = os.path.relpath(row["report"], out)
        source = row["source"] if row["kind"] is None else f"{row['source']} ({row['kind']})"
        body.append(
            f"<tr><td><a href='{html.escape(link)}'>{html.escape(name)}</a><div class='note'>"
            f"{html.escape(source)}</div></td>{cells}<td class='{band[0]}'>{band[1]}</td><td>{params}</td>"
            f"<td>{_seconds_text(row['training_seconds'])}<div class='note'>{html.escape(steps)}</div></td>"
            f"<td>{'–' if rate is None else f'{rate:.1f}'}</td></tr>"
        )
    if reference.get("metrics"):
        cells = "".join(_cell(key, reference["metrics"].get(key), False) for key, _ in COLUMNS)
        n = f"n {reference['n_real']}/{reference['n_other']}" if "n_real" in reference else ""
        body.append(
            f"<tr class='ref'><td>real vs real<div class='note'>{n}</div></td>{cells}"
            "<td></td><td></td><td></td><td></td></tr>"
        )
    tail = "<th>FID band</th><th>param&shy;eters</th><th>training (steps)</th><th>sampling img/s</th>"
    return f"<table><tr><th>model</th>{head}{tail}</tr>{''.join(body)}</table>"


PALETTE = ("#c0392b", "#1f6fb2", "#1e8449", "#8e44ad", "#b9770e", "#148f77", "#7b241c", "#2e4053")


def _colour(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def _pr_plot(summary: dict, size: int = 360) -> str:
    """Precision (y) against recall (x) of every row, with their intervals, and real vs real."""
    margin, inner = 44, size - 64
    marks = []

    def point(name, metrics, colour, shape="circle", index=0):
        if "precision" not in metrics or "recall" not in metrics:
            return
        p, r = metrics["precision"], metrics["recall"]
        x, y = margin + r["value"] * inner, size - margin - p["value"] * inner
        for entry, horizontal in ((r, True), (p, False)):
            low_high = entry.get("interval")
            if not low_high:
                continue
            if horizontal:
                x0, x1 = (margin + v * inner for v in low_high)
                marks.append(
                    f'<line x1="{x0:.1f}" y1="{y:.1f}" x2="{x1:.1f}" y2="{y:.1f}" stroke="{colour}"/>'
                )
            else:
                y0, y1 = (size - margin - v * inner for v in low_high)
                marks.append(
                    f'<line x1="{x:.1f}" y1="{y0:.1f}" x2="{x:.1f}" y2="{y1:.1f}" stroke="{colour}"/>'
                )
        if shape == "circle":
            marks.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{colour}"/>')
        else:
            marks.append(f'<rect x="{x - 5:.1f}" y="{y - 5:.1f}" width="10" height="10" fill="{colour}"/>')
        anchor, dx = ("end", -8) if r["value"] > 0.7 else ("start", 8)  # labels stay inside the plot
        dy = -6 if index % 2 == 0 else 16  # neighbours' labels above and below their points
        marks.append(
            f'<text x="{x + dx:.1f}" y="{y + dy:.1f}" font-size="12" fill="{colour}" text-anchor="{anchor}">'
            f"{html.escape(name)}</text>"
        )

    for index, (name, row) in enumerate(summary["rows"].items()):
        point(name, row["metrics"], _colour(index), index=index)
    point("real vs real", summary["real_vs_real"].get("metrics", {}), "#555", "square")
    ticks = "".join(
        f'<text x="{margin + t * inner:.1f}" y="{size - margin + 16}" font-size="10" '
        f'text-anchor="middle">{t:g}</text><text x="{margin - 6}" y="{size - margin - t * inner + 4:.1f}" '
        f'font-size="10" text-anchor="end">{t:g}</text>'
        for t in (0, 0.25, 0.5, 0.75, 1)
    )
    axes = (
        f'<rect x="{margin}" y="{size - margin - inner}" width="{inner}" height="{inner}" fill="none" '
        'stroke="#999"/>'
        f'<text x="{margin + inner / 2}" y="{size - 8}" font-size="13" text-anchor="middle">recall</text>'
        f'<text x="14" y="{size / 2}" font-size="13" transform="rotate(-90 14 {size / 2})" '
        f'text-anchor="middle">precision</text>{ticks}'
    )
    return (
        f'<svg width="{size}" height="{size}" xmlns="http://www.w3.org/2000/svg">{axes}{"".join(marks)}</svg>'
    )


def _grids(grids: dict[str, dict[str, Any]], rows: Sequence[str]) -> str:
    from medfusion.metrics.report import png_data_uri

    parts = []
    for label, per in grids.items():
        figures = []
        for name in ("real", *rows):
            images = per.get(name)
            title = "real (held out)" if name == "real" else name
            if images is None:
                figures.append(f"<figure><figcaption>{html.escape(title)}: none</figcaption></figure>")
                continue
            uri = png_data_uri(images, nrow=4)
            figures.append(
                f'<figure><img alt="{html.escape(f"{title} {label}")}" src="{uri}">'
                f"<figcaption>{html.escape(title)}</figcaption></figure>"
            )
        parts.append(f"<h3>{html.escape(label)}</h3><div class='grid'>{''.join(figures)}</div>")
    return "".join(parts)


def benchmark_html(summary: dict, grids: dict[str, dict[str, Any]], out: Path) -> str:
    """The self-contained report: every image a data URI, the plot inline SVG, no scripts."""
    rows = summary["rows"]
    extractor = next((row["extractor"] for row in rows.values()), "–")
    trained = ", ".join(summary["models"]) or "none"
    external = ", ".join(f"{k} ({v})" for k, v in summary["external"].items()) or "none"
    title = "medfusion benchmark"
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title>",
        f"<style>{STYLE}</style></head>",
        f"<body><h1>{title}</h1>",
        f"<p>Training data <code>{html.escape(summary['data'])}</code> · held out "
        f"<code>{html.escape(summary['heldout'])}</code> · {summary['spatial_dims']}D, size "
        f"{summary['image_size']} · classes {html.escape(', '.join(summary['classes']) or 'none')} · "
        f"device {html.escape(summary['device'])} · {html.escape(summary['created'])}</p>",
        f"<p><b>Budget: {summary['minutes']:g} min of training per model</b> (wall clock; the diffusion "
        f"model's VAE and U-Net together) · {summary['n']} samples per class from each · trained: "
        f"{html.escape(trained)} · external: {html.escape(external)}</p>",
        f"<p><b>Features: {html.escape(extractor)}</b> (one domain encoder trained on the training images, "
        "for every row). <span class='note'>FIDs from different extractors are not comparable.</span></p>",
        "<h2>Results</h2>",
        _html_table(summary, out),
        "<p class='note'>All held-out images against all samples, with 90% half-sample intervals; best of "
        "each column in bold. MS-SSIM within class: mean pairwise MS-SSIM of the first images of each class "
        "(lower is more diverse; far above real's means mode collapse). Memorised: the share of samples "
        "closer to a training image than 99% of held-out real images are. TSTR: a classifier trained on "
        "the samples, tested on the held-out images (mean ± std over seeds); the real-vs-real row holds "
        "the one trained on the real training images (TRTR). Band: the FID at the real-vs-real n against "
        "the real-vs-real interval. Parameters: every weight in the model folder (the diffusion model's "
        "VAE and U-Net). Each model's name links to its full evaluation report.</p>",
        "<h2>Precision and recall</h2>",
        _pr_plot(summary),
        "<h2>Real and synthetic images</h2>",
        _grids(grids, list(rows)),
        "</body></html>",
    ]
    return "\n".join(parts)
