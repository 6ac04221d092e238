"""The ``medfusion`` command: parse arguments, call the library, report. Nothing else lives here."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from medfusion import __version__


def _data_inspect(args: argparse.Namespace) -> int:
    from medfusion.data.inspect import inspect_dataset

    if args.masks is not None:
        return _inspect_pairs(args)
    if args.num_classes is not None:
        raise ValueError("--num-classes applies to image/mask pairs: give --masks")
    report = inspect_dataset(
        args.data,
        labels=args.labels,
        read_pixels=not args.headers_only,
        skip_bad=args.skip_bad,
        progress=not args.quiet,
    )
    print(report.format())
    if args.json:
        from medfusion.utils import atomic_write_text

        atomic_write_text(args.json, json.dumps(report.summary(), indent=2) + "\n")
    return 0 if report.usable else 1


def _inspect_pairs(args: argparse.Namespace) -> int:
    from medfusion.data.pairs import inspect_pairs

    given = [name for name in ("labels", "headers_only", "skip_bad") if getattr(args, name)]
    if given:
        options = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ValueError(f"{options}: not for image/mask pairs (--masks)")
    report = inspect_pairs(args.data, args.masks, num_classes=args.num_classes, progress=not args.quiet)
    print(report.format())
    if args.json:
        from medfusion.utils import atomic_write_text

        atomic_write_text(args.json, json.dumps(report.summary(), indent=2) + "\n")
    return 0 if report.usable else 1


def _data_demo(args: argparse.Namespace) -> int:
    from medfusion.data.demo import build_demo_data

    out = build_demo_data(
        args.out,
        crop_size=args.crop_size,
        per_class=args.per_class,
        seed=args.seed,
        force=args.force,
        progress=not args.quiet,
        datasets=args.datasets,
    )
    print(f"demo data in {out}")
    for dataset in sorted(p for p in out.iterdir() if p.is_dir() and (p / "train").is_dir()):
        classes = ", ".join(sorted(p.name for p in (dataset / "train").iterdir()))
        print(f"  {dataset}/train    {dataset}/heldout    classes: {classes}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from medfusion.metrics.evaluate import class_line, headline
    from medfusion.workflows.demo import run_demo
    from medfusion.workflows.segmentation_demo import SETS as SEGMENTATION_SETS

    if args.segmentation:
        return _segmentation_demo(args)
    if args.dataset in SEGMENTATION_SETS:
        raise ValueError(f"--dataset {args.dataset} is a set of image/mask pairs: add --segmentation")
    args.out = args.out or Path("medfusion-demo")
    phrases = {f"out {args.out}": f"--out {args.out}", "force=True": "--force", "three_d=True": "--3d"}
    phrases |= {f"{name} ": f"--{name} " for name in ("dataset", "minutes", "device")}
    with _naming_options(phrases):
        result = run_demo(
            args.out,
            three_d=args.three_d,
            dataset=args.dataset,
            minutes=args.minutes,
            data_dir=args.data_dir,
            device=args.device,
            force=args.force,
            seed=args.seed,
            progress=not args.quiet,
        )
    print(f"\ndemo finished in {result.seconds / 60:.1f} min")
    print(f"  {headline(result.metrics)}")
    for label, values in result.metrics["per_class"].items():
        print(f"  {class_line(label, values)}")
    for warning in result.metrics.get("warnings", []):
        print(f"  warning: {warning}")
    from medfusion.metrics.calibration import summary as calibration_summary

    if "calibration" in result.metrics:
        for line in calibration_summary(result.metrics["calibration"]):
            print(f"  {line}")
    if "tstr" in result.metrics:
        tstr = result.metrics["tstr"]
        scores = {k: tstr[k]["balanced_accuracy"] for k in ("tstr", "trtr")}
        print(
            "  balanced accuracy on held-out real images: trained on synthetic "
            f"{scores['tstr']['mean']:.3f} ± {scores['tstr']['std']:.3f}, on real "
            f"{scores['trtr']['mean']:.3f} ± {scores['trtr']['std']:.3f}"
        )
    print(f"  report: {result.report.resolve()}")
    print(f"  model folder: {result.out / 'model'} (medfusion sample {result.out / 'model'} --n N --out DIR)")
    return 0


def _seed(text: str) -> int:
    """An ``argparse`` type: a seed, an integer in 0 .. 2**64 - 1."""
    from medfusion.utils import MAX_SEED

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer in 0..{MAX_SEED}; got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer in 0..{MAX_SEED}; got {text}")
    return value


def _int_at_least(minimum: int):
    """An ``argparse`` type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}; got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}; got {text}")
        return value

    return parse


_non_negative_int = _int_at_least(0)
_positive_int = _int_at_least(1)


def _labels(text: str) -> str | Path:
    """An ``argparse`` type: a labels CSV (a path), or the words ``none`` and ``folders`` as they are."""
    return text if text in ("none", "folders") else Path(text)


# Options that several commands take, each declared once; a command adds its own help or default.
_OPTIONS: dict[str, dict] = {
    "--out": {"type": Path, "required": True, "metavar": "DIR"},
    "--data": {"type": Path, "required": True, "metavar": "DATA"},
    "--vae": {"type": Path, "required": True, "metavar": "RUN/vae"},
    "--labels": {
        "type": _labels,
        "metavar": "CSV",
        "help": "CSV with columns path,label ('none': unlabelled)",
    },
    "--skip-bad": {"action": "store_true", "help": "leave out bad files with a warning"},
    "--max-pixels": {
        "type": _positive_int,
        "metavar": "N",
        "help": "refuse images/volumes of more than N pixels/voxels before decoding them (default 2**28; "
        "also $MEDFUSION_MAX_PIXELS)",
    },
    "--batch-size": {"type": int},
    "--config": {"type": Path, "metavar": "YAML"},
    "--set": {"action": "append", "default": [], "metavar": "KEY=VALUE"},
    "--seed": {"type": _seed, "default": 0},
    "--device": {"help": "cpu, cuda, cuda:1 ... (default: CUDA when available)"},
    "--dry-run": {"action": "store_true", "help": "print the resolved config and stop"},
    "--force": {"action": "store_true"},
    "--quiet": {"action": "store_true", "help": "no progress bars"},
}


def _option(parser: argparse.ArgumentParser, flag: str, **changes) -> None:
    """Add the shared option ``flag`` (see ``_OPTIONS``) with this command's ``changes`` (help, default)."""
    parser.add_argument(flag, **{**_OPTIONS[flag], **changes})


@contextlib.contextmanager
def _naming_options(phrases: Mapping[str, str]) -> Iterator[None]:
    """Re-word the library's errors about arguments (``ValueError``, and the folder errors
    ``FileExistsError`` and ``NotADirectoryError``) for the command line: each library phrase (an
    argument as a Python caller names it, e.g. ``fake /data/x``) becomes its option's
    (``--fake /data/x``)."""
    try:
        yield
    except (ValueError, FileExistsError, NotADirectoryError) as e:
        text = str(e)
        for phrase, option in phrases.items():
            text = text.replace(phrase, option)
        if text == str(e):
            raise
        raise type(e)(text) from e


def _given(options: Mapping) -> dict:
    """``options`` without the ones not given (None) and without empty sections."""
    kept = {k: _given(v) if isinstance(v, Mapping) else v for k, v in options.items()}
    return {k: v for k, v in kept.items() if v is not None and v != {}}


def _training_config(cls, args: argparse.Namespace, saved: Path, defaults: dict | None = None, **own):
    """The run config of a training command (:func:`medfusion.config.merge_config`): ``--config``
    (or, with ``--resume``, the run's saved config), the options, then ``--set``. ``own``: the
    command's own top-level options (None: not given); ``defaults``: sections the YAML leaves out."""

    file = args.config
    if file is None and args.resume and saved.is_file():
        file = saved
        print(f"# resuming with the run's own config {saved}")
    options = {
        "train": {key: getattr(args, key) for key in ("max_steps", "batch_size", "mixed_precision")},
        "data": {"labels": args.labels, "skip_bad": args.skip_bad or None},
        **own,
    }
    return _merged_config(cls, file, options, args.set, defaults)


def _merged_config(cls, file, options: Mapping, sets, defaults=None, named: tuple[str, ...] = ()):
    """:func:`medfusion.config.merge_config` of ``file``, the ``options`` given (None: not given) and
    ``--set``; its errors name ``--set`` and the top-level ``named`` options as the command line
    spells them."""
    from medfusion.config import merge_config

    phrases = {f"{key} ": f"--{key.replace('_', '-')} " for key in named}
    phrases |= {"assignments: expected": "--set expects", "assignments ": "--set "}
    with _naming_options(phrases):
        return merge_config(cls, file, _given(options), sets, defaults, source="command line")


def _train_vae(args: argparse.Namespace) -> int:
    from medfusion.training.vae import VAERunConfig, train_vae

    config = _training_config(VAERunConfig, args, args.out / "config.yaml", heldout=args.heldout)
    train_vae(args.data, args.out, config, resume=args.resume, dry_run=args.dry_run, progress=not args.quiet)
    return 0


def _train_gan(args: argparse.Namespace) -> int:
    from medfusion.baselines.gan import GANRunConfig, train_gan

    config = _training_config(GANRunConfig, args, args.out / "config.yaml", arch=args.arch)
    train_gan(args.data, args.out, config, resume=args.resume, dry_run=args.dry_run, progress=not args.quiet)
    return 0


def _vae_run_data(vae: Path) -> dict:
    """The data section of the VAE run's config (its size, normalisation ...), ``train``'s default."""
    from medfusion.config import load_mapping

    saved = vae.parent / "config.yaml"
    run = load_mapping(saved) if saved.is_file() else {}
    if not isinstance(run.get("data"), dict):
        return {}
    print(f"# data settings from the VAE run {saved} (a data: section in --config wins)")
    return {"data": run["data"]}


def _train(args: argparse.Namespace) -> int:
    from medfusion.training.diffusion import DIFFUSION_DIR, DiffusionRunConfig, train_diffusion

    saved, defaults = args.out / DIFFUSION_DIR / "config.yaml", _vae_run_data(args.vae)
    config = _training_config(
        DiffusionRunConfig, args, saved, defaults, cache_latents=args.cache_latents or None
    )
    train_diffusion(
        args.data,
        args.vae,
        args.out,
        config,
        resume=args.resume,
        dry_run=args.dry_run,
        progress=not args.quiet,
    )
    return 0


def _sampler_config(args: argparse.Namespace):
    """The sampler settings of ``sample``; errors name the options."""
    from medfusion.samplers.schedulers import SamplerConfig

    try:
        return SamplerConfig(
            name=args.sampler,
            steps=args.steps,
            guidance_scale=args.guidance,
            guidance_rescale=args.guidance_rescale,
            eta=args.eta,
            karras_sigmas=args.karras_sigmas,
        )
    except ValueError as e:
        options = "--sampler, --steps, --guidance, --guidance-rescale, --eta, --karras-sigmas"
        raise ValueError(f"sampler settings ({options}): {e}") from e


def _sample(args: argparse.Namespace) -> int:
    import medfusion.baselines  # noqa: F401  (registers the GAN kinds)
    from medfusion.samplers.diffusion_generator import DiffusionGenerator
    from medfusion.samplers.model_folder import DIFFUSION, read_model_kind
    from medfusion.samplers.synthetic import check_request
    from medfusion.utils import process_state
    from medfusion.workflows.sample import run_sample

    check_request(args.out, args.n, args.seed, args.batch_size)  # before the model folder is read
    options = {}
    if read_model_kind(args.model) == DIFFUSION:  # the sampler's options (other kinds take their defaults)
        DiffusionGenerator.check_options(args.precision, args.decode_slab, args.compile)
        options = dict(
            sampler=_sampler_config(args), precision=args.precision, device=args.device,
            slab=args.decode_slab, channels_last=args.channels_last, compile_mode=args.compile,
        )  # fmt: skip
    phrases = {f"{name} ": f"--{flag} " for name, flag in (("evaluate_against", "evaluate-against"),
               ("train", "train"), ("file_format", "format"))}  # fmt: skip
    with _naming_options(phrases):
        result, _ = run_sample(
            args.model, args.out, args.n, class_labels=args.class_label, seed=args.seed,
            batch_size=args.batch_size, file_format=args.file_format, intended_use=args.intended_use,
            licence=args.licence, evaluate_against=args.evaluate_against, train=args.train,
            features=args.features, generator_options=options, dry_run=args.dry_run, progress=not args.quiet,
        )  # fmt: skip
    if not args.dry_run and result.written + result.kept and process_state().is_main_process:
        rate = result.written / result.seconds if result.seconds > 0 else 0.0
        print(
            f"wrote {result.written} new sample(s) ({result.kept} kept from before) in "
            f"{result.seconds:.1f} s ({rate:.2f} images/s); {result.total} in {result.path}"
        )
    return 0


def _features_train(args: argparse.Namespace) -> int:
    from medfusion.training.features import FeaturesRunConfig, train_domain_encoder

    config = _training_config(FeaturesRunConfig, args, args.out / "config.yaml")
    train_domain_encoder(
        args.data, args.out, config, resume=args.resume, dry_run=args.dry_run, progress=not args.quiet
    )
    return 0


def _evaluate_phrases(args: argparse.Namespace) -> dict[str, str]:
    """How the library names ``evaluate``'s folders and extractor in errors, and the options' names."""
    phrases = {
        f"{name} {value}": f"--{name} {value}"
        for name, value in (("real", args.real), ("fake", args.fake), ("train", args.train))
        if value is not None
    }
    if args.features is not None:
        phrases[f"features {args.features!r}"] = f"--features {args.features!r}"
    return phrases


def _evaluate(args: argparse.Namespace) -> int:
    from medfusion.config import DataConfig
    from medfusion.workflows.evaluate import run_evaluate

    if args.tstr and args.train is None:
        raise ValueError("--tstr needs --train (the real training images the classifier is compared on)")
    data = DataConfig(
        normalization=args.normalization,
        resize=tuple(args.size) if args.size else None,
        labels=args.labels,
        skip_bad=args.skip_bad,
    )
    classifier = None
    if args.tstr_steps:
        from medfusion.downstream import ClassifierConfig

        classifier = ClassifierConfig(max_steps=args.tstr_steps)
    with _naming_options(_evaluate_phrases(args)):
        run_evaluate(
            args.real, args.fake, args.out, features=args.features, train=args.train, data=data,
            feature_steps=args.feature_steps, tstr=args.tstr, tstr_seeds=range(args.tstr_seeds),
            classifier=classifier, calibrate=args.calibrate, resamples=args.resamples, level=args.level,
            seed=args.seed, batch_size=args.batch_size, device=args.device, progress=not args.quiet,
        )  # fmt: skip
    return 0


def _evaluate_vae(args: argparse.Namespace) -> int:
    from medfusion.training.vae import evaluate_vae

    metrics = evaluate_vae(
        args.vae,
        args.data,
        max_images=args.max_images,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.quiet,
    )
    text = json.dumps(metrics, indent=2) + "\n"
    print(text, end="")
    if args.out is not None:
        from medfusion.utils import atomic_write_text

        atomic_write_text(args.out, text)
    return 0


def _add_training_options(parser: argparse.ArgumentParser, sections: str) -> None:
    _option(parser, "--data", help="training images/volumes")
    _option(parser, "--config", help=f"config with sections {sections}")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the latest valid checkpoint in RUN"
    )
    _option(parser, "--dry-run")
    _option(parser, "--labels")
    _option(parser, "--skip-bad")
    _option(parser, "--max-pixels")
    parser.add_argument("--max-steps", type=int, help="optimizer steps (train.max_steps)")
    _option(parser, "--batch-size", help="images per process and step (train.batch_size)")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), help="train.mixed_precision")
    _option(parser, "--set", help="override a config value, e.g. --set train.learning_rate=2e-4 (repeatable)")
    _option(parser, "--quiet")


def _add_data_parsers(commands) -> None:
    data = commands.add_parser("data", help="inspect datasets, prepare the demo data")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    inspect = data_commands.add_parser(
        "inspect",
        help="what the readers see in a folder; names every bad file",
        description="Read every file of DATA and report counts per class, shapes, channels, dtypes, "
        "spacing and value ranges, and every problem with its file. With --masks: DATA holds images "
        "and MASKS their label maps (matched by file name); report the pairs, unmatched names, label "
        "values, per-class voxel fractions, empty masks and every mask whose shape or spacing differs "
        "from its image's. Exit status 0 when the folder is usable for training, 1 when it is not.",
    )
    inspect.add_argument(
        "data", type=Path, metavar="DATA", help="folder of images/volumes (DATA/<class>/...)"
    )
    inspect.add_argument(
        "--masks", type=Path, metavar="MASKS", help="label maps of the images in DATA (image/mask pairs)"
    )
    inspect.add_argument(
        "--num-classes",
        type=_positive_int,
        help="with --masks: classes with background; a label >= it is a problem (default: the masks')",
    )
    _option(inspect, "--labels")
    _option(inspect, "--skip-bad", help="report bad files but call the rest usable")
    inspect.add_argument(
        "--headers-only", action="store_true", help="read headers only (fast; no value ranges)"
    )
    inspect.add_argument("--json", type=Path, metavar="FILE", help="also write the summary as JSON")
    _option(inspect, "--max-pixels")
    _option(inspect, "--quiet", help="no progress bar")
    inspect.set_defaults(run=_data_inspect)
    _add_data_demo_parser(data_commands)


def _add_data_demo_parser(data_commands) -> None:
    demo = data_commands.add_parser(
        "demo",
        help="write the demo datasets cut from real images shipped in PyPI packages",
        description="Cut the bundled real medical images (pydicom-data, scikit-image) into small "
        'class-labelled crops. Needs the demo extra: pip install "medfusion[demo]".',
    )
    _option(
        demo,
        "--out",
        required=False,
        metavar=None,
        help="target folder (default: ~/.cache/medfusion/demo-data)",
    )
    demo.add_argument("--crop-size", type=int, default=64, help="crop side in pixels (default 64)")
    demo.add_argument("--per-class", type=int, default=80, help="crops per class (default 80)")
    demo.add_argument(
        "--datasets",
        nargs="+",
        choices=("xray", "color", "volumes", "segmentation"),
        help="which datasets to build (default: all): xray, color (2D), volumes (3D), segmentation "
        "(image/mask pairs, 2D and 3D; its nuclei set needs stardist)",
    )
    _option(demo, "--seed", help="seed of the crop positions")
    _option(demo, "--force", help="rebuild even if the folder is complete")
    _option(demo, "--quiet", help="no progress bar")
    demo.set_defaults(run=_data_demo)


def _segmentation_demo(args: argparse.Namespace) -> int:
    from medfusion.workflows.segmentation_demo import SET_3D, SETS, run_segmentation_demo

    dataset = args.dataset or (SET_3D if args.three_d else SETS[0])
    if dataset not in SETS or (args.three_d and dataset != SET_3D):
        raise ValueError(
            f"--segmentation: --dataset must be one of {', '.join(SETS)} (--3d: {SET_3D}); got {dataset}"
        )
    out = args.out or Path("medfusion-segmentation-demo")
    phrases = {f"out {out}": f"--out {out}", "force=True": "--force"}
    phrases |= {f"{name} ": f"--{name} " for name in ("dataset", "minutes", "device")}
    with _naming_options(phrases):
        result = run_segmentation_demo(
            out,
            dataset=dataset,
            minutes=args.minutes,
            data_dir=args.data_dir,
            device=args.device,
            force=args.force,
            seed=args.seed,
            progress=not args.quiet,
        )
    print(f"\nsegmentation demo finished in {result.seconds / 60:.1f} min")
    print(f"  report: {result.report.resolve()}")
    return 0


def _add_demo_parser(commands) -> None:
    from medfusion.workflows.demo import DATASET_3D, DATASETS_2D, DEFAULT_MINUTES
    from medfusion.workflows.segmentation_demo import SETS

    demo_run = commands.add_parser(
        "demo",
        help="the whole pipeline on the bundled real data, ending in an HTML report",
        description="Build the bundled demo data, inspect it, train the VAE and the class-conditional "
        "latent diffusion U-Net, sample a synthetic dataset, train the domain feature extractor and "
        "evaluate: OUT/report.html. Every stage is planned to its share of --minutes on this machine "
        "and ends by its deadline (small models on a CPU, larger ones on a GPU). Needs the demo extra: "
        'pip install "medfusion[demo]".',
    )
    _option(
        demo_run, "--out", required=False, metavar=None, default=None,
        help="run folder (default: ./medfusion-demo, with --segmentation ./medfusion-segmentation-demo)",
    )  # fmt: skip
    demo_run.add_argument(
        "--3d", dest="three_d", action="store_true", help=f"the 3D demo ({DATASET_3D}: MRI volumes)"
    )
    demo_run.add_argument(
        "--segmentation",
        action="store_true",
        help="the segmentation story instead: train the generator on the training images of image/mask "
        "pairs without their masks, sample, pretrain segmentation networks on the synthetic (and on "
        "the real unlabelled) images, fine-tune with 2, 8 and all labelled cases: OUT/segment/"
        "segmentation.html. Needs the segmentation extra",
    )
    demo_run.add_argument(
        "--dataset",
        choices=(*DATASETS_2D, DATASET_3D, *SETS),
        help=f"bundled dataset (default {DATASETS_2D[0]}; {DATASETS_2D[1]}: fundus and histology); with "
        f"--segmentation one of {', '.join(SETS)} (default {SETS[0]}, --3d: {SETS[-1]})",
    )
    demo_run.add_argument(
        "--minutes",
        type=float,
        default=DEFAULT_MINUTES,
        help=f"time budget of the whole run, kept on any machine (default {DEFAULT_MINUTES:g})",
    )
    demo_run.add_argument(
        "--data-dir", type=Path, help="demo data cache (default: ~/.cache/medfusion/demo-data)"
    )
    _option(demo_run, "--device")
    _option(demo_run, "--seed", help="seed of the data, training and sampling")
    _option(demo_run, "--force", help="replace an earlier demo run in --out")
    _option(demo_run, "--quiet")
    demo_run.set_defaults(run=_demo)


def _add_training_parsers(commands) -> None:
    vae = commands.add_parser(
        "train-vae",
        help="train the autoencoder that maps images/volumes to latents",
        description="Train a KL-regularised VAE on DATA. Writes RUN/vae (the model), RUN/checkpoints, "
        "RUN/logs (TensorBoard, metrics.jsonl, reconstruction grids), RUN/config.yaml and "
        "RUN/vae_eval.json (PSNR, SSIM, MS-SSIM on held-out images). Multi-GPU: "
        "accelerate launch -m medfusion train-vae ...",
    )
    _option(vae, "--out", metavar="RUN", help="run folder")
    vae.add_argument("--heldout", type=Path, metavar="DIR", help="held-out images for the evaluation")
    _add_training_options(vae, "data, model, loss, train")
    vae.set_defaults(run=_train_vae)

    diffusion = commands.add_parser(
        "train",
        help="train the class-conditional latent diffusion model",
        description="Train a class-conditional diffusion U-Net on the latents of DATA under the trained "
        "VAE. Writes RUN/diffusion (config.yaml, checkpoints, logs with TensorBoard, metrics.jsonl and "
        "grids of class-conditional samples) and, at the end, the model folder RUN/model. Data settings "
        "default to those of the VAE run. Multi-GPU: accelerate launch -m medfusion train ...",
    )
    _option(diffusion, "--vae", help="the VAE folder written by train-vae")
    _option(diffusion, "--out", metavar="RUN", help="run folder")
    diffusion.add_argument(
        "--cache-latents",
        action="store_true",
        help="encode the data once into RUN/diffusion/latents and train from there (no random crops/flips)",
    )
    _add_training_options(diffusion, "data, model, diffusion, train, preview")
    diffusion.set_defaults(run=_train)

    from medfusion.baselines.arch import ARCHITECTURES

    gan = commands.add_parser(
        "train-gan",
        help="train a class-conditional GAN baseline (WGAN-GP, StyleGAN2)",
        description="Train a GAN baseline on DATA with the same data handling and training loop as the "
        "diffusion model. Writes RUN/checkpoints, RUN/logs (TensorBoard, metrics.jsonl, sample grids), "
        "RUN/config.yaml and, at the end, the model folder RUN/model, which medfusion sample reads like a "
        "diffusion model's. train.max_steps counts discriminator steps.",
    )
    _option(gan, "--out", metavar="RUN", help="run folder")
    gan.add_argument("--arch", choices=tuple(ARCHITECTURES), help="architecture (default wgan-gp)")
    _add_training_options(gan, "data, arch, model, gan, train, preview")
    gan.set_defaults(run=_train_gan)


def _add_features_parsers(commands) -> None:
    features = commands.add_parser("features", help="feature extractors of the evaluators")
    features_commands = features.add_subparsers(dest="features_command", required=True, metavar="ACTION")
    features_train = features_commands.add_parser(
        "train",
        help="train a domain feature encoder on real images (offline, any modality, 2D or 3D)",
        description="Train a small encoder on the real reference images DATA (contrastive views, plus "
        "the classes when there are any). Writes FEAT/encoder (config.json + safetensors), used by "
        "medfusion evaluate --features FEAT, and FEAT/checkpoints, FEAT/logs, FEAT/config.yaml.",
    )
    _option(features_train, "--out", metavar="FEAT", help="run folder")
    _add_training_options(features_train, "data, model, train, temperature, class_weight")
    features_train.set_defaults(run=_features_train)


def _add_evaluate_parser(commands) -> None:
    evaluate = commands.add_parser(
        "evaluate",
        help="compare synthetic with real images: FID, KID, precision/recall, diversity, memorisation",
        description="Read REAL and FAKE (and TRAIN) the same way, extract features, and write "
        "DIR/metrics.json and DIR/report.html (self-contained: grids, metric table, precision/recall "
        "plot, memorisation histogram and closest pairs). Without --features a domain encoder is "
        "trained on REAL into DIR/features first (offline, any modality).",
    )
    evaluate.add_argument("--real", type=Path, required=True, help="real reference images (held out)")
    evaluate.add_argument(
        "--fake", type=Path, required=True, help="synthetic images (a medfusion sample folder)"
    )
    evaluate.add_argument("--train", type=Path, help="the generator's training images: memorisation audit")
    _option(evaluate, "--out", help="report folder")
    evaluate.add_argument(
        "--features",
        help="FEAT (from medfusion features train), 'inception', 'torchvision:NAME[@FILE]', "
        "'timm:NAME[@FILE]' (weights from local files), or a .pt/.ts/.onnx file; default: a domain "
        "encoder trained on --real into OUT/features",
    )
    evaluate.add_argument("--feature-steps", type=int, help="training steps of the default domain encoder")
    evaluate.add_argument(
        "--size", type=int, nargs="+", help="resize every image to this (default: the first real)"
    )
    evaluate.add_argument(
        "--normalization", default="auto", help="intensity normalisation of every folder (default auto)"
    )
    _option(evaluate, "--labels", help="labels CSV for REAL ('none': unlabelled)")
    _option(evaluate, "--skip-bad", help="leave unreadable files out of every folder (with a warning)")
    _option(evaluate, "--max-pixels")
    _add_evaluate_extras(evaluate)
    _option(evaluate, "--batch-size", default=32)
    _option(evaluate, "--device", default="cpu", help="e.g. cuda (default cpu)")
    _option(evaluate, "--quiet")
    evaluate.set_defaults(run=_evaluate)


def _add_evaluate_extras(evaluate: argparse.ArgumentParser) -> None:
    from medfusion.metrics.evaluate import BOOTSTRAP_LEVEL, BOOTSTRAP_RESAMPLES

    evaluate.add_argument(
        "--tstr",
        action="store_true",
        help="also train a classifier on FAKE and on TRAIN and test both on REAL (train on synthetic, "
        'test on real; needs --train and the downstream extra: pip install "medfusion[downstream]")',
    )
    evaluate.add_argument(
        "--tstr-seeds", type=_positive_int, default=3, help="classifiers per side (default 3)"
    )
    evaluate.add_argument(
        "--tstr-steps", type=_positive_int, help="training steps of each classifier (default 200)"
    )
    evaluate.add_argument(
        "--calibrate",
        action="store_true",
        help="also score known degradations of real images (blur, noise, patch shuffle, inversion, "
        "copies) with the same features: what this yardstick can see",
    )
    evaluate.add_argument(
        "--resamples",
        type=_non_negative_int,
        default=BOOTSTRAP_RESAMPLES,
        help=f"half-samples per interval (default {BOOTSTRAP_RESAMPLES}, fewer for large sets; "
        "0: no intervals)",
    )
    evaluate.add_argument(
        "--level",
        type=float,
        default=BOOTSTRAP_LEVEL,
        help=f"of the intervals, in (0, 1) (default {BOOTSTRAP_LEVEL:g})",
    )
    _option(evaluate, "--seed", help="of the reference draws, intervals and calibration (default 0)")


def _add_evaluate_vae_parser(commands) -> None:
    evaluate_vae = commands.add_parser(
        "evaluate-vae",
        help="reconstruction metrics of a trained VAE on a folder of images",
        description="PSNR, SSIM and MS-SSIM of the VAE's posterior-mean reconstructions of DATA (data "
        "settings from the VAE run's config.yaml). Prints JSON; --out also writes it.",
    )
    _option(evaluate_vae, "--vae", help="the trained VAE")
    _option(evaluate_vae, "--data", metavar=None, help="images to reconstruct (held out)")
    _option(evaluate_vae, "--out", required=False, metavar="FILE", help="also write the JSON here")
    evaluate_vae.add_argument("--max-images", type=int, default=1000)
    _option(evaluate_vae, "--max-pixels")
    _option(evaluate_vae, "--batch-size", default=16)
    _option(evaluate_vae, "--device", default="cpu", help="e.g. cuda (default cpu)")
    _option(evaluate_vae, "--quiet", help="no progress bar")
    evaluate_vae.set_defaults(run=_evaluate_vae)


def _add_sample_parser(commands) -> None:
    sample = commands.add_parser(
        "sample",
        help="write a synthetic dataset from a trained model folder",
        description="Sample N images/volumes per class from MODEL into DIR: DIR/<class>/<index>.png (or "
        ".nii.gz for volumes, with the training data's spacing), DIR/manifest.csv and DIR/dataset_card.json. "
        "Sample i has seed SEED+i. Re-running into DIR resumes (complete files are kept). Several GPUs: "
        "accelerate launch -m medfusion sample ... (same files as one process).",
    )
    sample.add_argument(
        "model", type=Path, metavar="MODEL", help="model folder (RUN/model from medfusion train)"
    )
    sample.add_argument("--n", "--num-samples", dest="n", type=int, required=True, help="samples per class")
    _option(sample, "--out", help="synthetic dataset folder")
    sample.add_argument(
        "--class-label",
        action="append",
        metavar="NAME",
        help="class to sample (repeatable); 'all' (default) or 'none' (unconditional)",
    )
    _add_sampler_options(sample)
    _option(sample, "--seed", help="seed of sample 0 (sample i: SEED+i)")
    _option(sample, "--batch-size", default=16, help="samples per batch and process (default 16)")
    sample.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="network precision")
    _option(sample, "--device", help="e.g. cpu, cuda:1 (default: this process's GPU, else CPU)")
    _add_speed_options(sample)
    _add_card_options(sample)
    _option(sample, "--dry-run", help="check everything, print the plan, write nothing")
    _option(sample, "--quiet", help="no progress bar")
    sample.set_defaults(run=_sample)


def _add_card_options(sample: argparse.ArgumentParser) -> None:
    from medfusion.samplers.files import FILE_FORMATS

    sample.add_argument(
        "--format",
        dest="file_format",
        choices=("auto", *FILE_FORMATS),
        default="auto",
        help="file format (default auto: like the training data, PNG/TIFF of its bit depth for images, "
        "NIfTI for volumes); values are in the training data's units where its normalisation allows",
    )
    sample.add_argument("--licence", "--license", dest="licence", help="licence, for the dataset card")
    sample.add_argument(
        "--evaluate-against",
        type=Path,
        metavar="REAL",
        help="after sampling, evaluate against these held-out real images (report in DIR-evaluation; "
        "the card records the summary)",
    )
    sample.add_argument(
        "--train", type=Path, help="with --evaluate-against: the model's training images (memorisation audit)"
    )
    sample.add_argument(
        "--features", help="with --evaluate-against: the feature extractor (default: a domain encoder)"
    )
    sample.add_argument(
        "--intended-use", help="what the dataset is for, for the card (default: research, not clinical use)"
    )


def _add_sampler_options(sample: argparse.ArgumentParser) -> None:
    from medfusion.samplers.schedulers import DEFAULT_STEPS, SAMPLERS

    sample.add_argument(
        "--sampler",
        default="dpmpp-2m",
        metavar="NAME",
        help=f"one of {', '.join(SAMPLERS)} (default dpmpp-2m)",
    )
    steps_help = ", ".join(f"{name} {steps}" for name, steps in DEFAULT_STEPS.items())
    sample.add_argument("--steps", type=int, help=f"denoising steps (default per sampler: {steps_help})")
    sample.add_argument(
        "--guidance", type=float, default=3.0, help="classifier-free guidance scale (1: none; default 3)"
    )
    sample.add_argument(
        "--guidance-rescale", type=float, default=0.0, help="guidance rescale phi in [0, 1] (default 0: off)"
    )
    sample.add_argument("--eta", type=float, default=0.0, help="DDIM noise weight (ddim only; default 0)")
    sample.add_argument(
        "--karras-sigmas",
        action="store_true",
        help="Karras et al.'s noise levels (dpmpp-2m, euler, heun, unipc): DPM++ 2M Karras",
    )


def _add_speed_options(sample: argparse.ArgumentParser) -> None:
    from medfusion.utils import COMPILE_MODES

    sample.add_argument(
        "--decode-slab", type=int, metavar="PLANES", help="decode volumes PLANES latent slices at a time"
    )
    sample.add_argument("--channels-last", action="store_true", help="channels-last networks (GPU speed)")
    sample.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        metavar="MODE",
        help=f"torch.compile the U-Net: {', '.join(COMPILE_MODES)} (GPU speed; compiles on the first batch)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``medfusion`` argument parser: one subcommand per step of the pipeline."""
    parser = argparse.ArgumentParser(
        prog="medfusion", description="Latent diffusion for medical image synthesis, 2D and 3D."
    )
    parser.add_argument("--version", action="version", version=f"medfusion {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_data_parsers(commands)
    _add_demo_parser(commands)
    _add_training_parsers(commands)
    _add_features_parsers(commands)
    _add_evaluate_parser(commands)
    _add_evaluate_vae_parser(commands)
    _add_sample_parser(commands)
    _add_benchmark_parser(commands)
    _add_segment_parser(commands)
    _add_classify_parser(commands)
    return parser


def _add_segment_parser(commands) -> None:
    seg = commands.add_parser(
        "segment",
        help="segmentation with few labels, from scratch and pretrained on synthetic images",
        description="A learning-curve experiment: pretrain the whole segmentation network on each --pretrain "
        "folder (restoration of corrupted images, self-supervised), then for every --n-labelled count and "
        "seed fine-tune on that many labelled pairs from scratch and from each pretrained network, and score "
        "every model on the test pairs (Dice per class). Writes OUT/segmentation.json, OUT/segmentation.html "
        "(table, learning curve, overlays), the models and the predicted masks. Needs MONAI: "
        'pip install "medfusion[segmentation]".',
    )
    seg.add_argument("--images", type=Path, required=True, help="labelled training images")
    seg.add_argument("--masks", type=Path, required=True, help="their label maps, matched by file name")
    seg.add_argument("--test-images", type=Path, required=True, help="test images")
    seg.add_argument("--test-masks", type=Path, required=True, help="test label maps")
    _option(seg, "--out", help="experiment folder (a rerun reuses its finished runs)")
    seg.add_argument(
        "--pretrain",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="unlabelled images to pretrain on, e.g. a medfusion sample folder (repeatable)",
    )
    seg.add_argument(
        "--n-labelled", default="all", help="labelled-case counts, e.g. 2,5,10,all (default all)"
    )
    seg.add_argument("--seeds", type=_positive_int, default=3, help="draws per count (default 3)")
    seg.add_argument(
        "--num-classes", type=_positive_int, help="classes with background (default: the masks')"
    )
    _add_experiment_options(seg, "data, network, restoration, pretrain, finetune", "finetune.max_steps=500")
    seg.set_defaults(run=_segment)


def _segment(args: argparse.Namespace) -> int:
    from medfusion.downstream.segment import SegmentConfig, run_segment

    config = _merged_config(SegmentConfig, args.config, {"num_classes": args.num_classes}, args.set)
    phrases = {"n_labelled:": "--n-labelled:", "seeds must": "--seeds must", "pretrain ": "--pretrain "}
    phrases |= {"test_images:": "--test-images:", "force=True": "--force"}
    with _naming_options(phrases):
        result = run_segment(
            args.images,
            args.masks,
            args.test_images,
            args.test_masks,
            args.out,
            pretrain=args.pretrain,
            n_labelled=args.n_labelled,
            seeds=args.seeds,
            config=config,
            device=args.device,
            seed=args.seed,
            force=args.force,
            progress=not args.quiet,
        )
    print(f"\nreport: {result.report.resolve()}")
    return 0


def _add_classify_parser(commands) -> None:
    cls = commands.add_parser(
        "classify",
        help="differentially private classifiers, with and without pretraining on synthetic images",
        description="For every --epsilon and seed, train the group-norm DenseNet classifier on TRAIN with "
        "DP-SGD (Opacus: Poisson sampling, per-sample clipping, noise calibrated to the epsilon by the "
        "PRV accountant; inf = the same training without privacy), from scratch and, with --pretrain, "
        "from a non-private pretraining on synthetic images; score every model on TEST (AUROC macro and "
        "per class, accuracy, balanced accuracy). Writes OUT/classification.json, OUT/classification.html "
        "(table, AUROC against epsilon) and the models with their privacy parameters. Run it again to "
        'resume: finished runs are kept. Needs pip install "medfusion[dp]".',
    )
    _option(cls, "--data", metavar="TRAIN", help="real training images (<class>/<file>)")
    cls.add_argument("--test", type=Path, required=True, help="held-out real images of the same classes")
    _option(cls, "--out", help="experiment folder (a rerun reuses its finished runs)")
    cls.add_argument(
        "--pretrain",
        type=Path,
        metavar="SYNTH_DIR",
        help="synthetic images to pretrain on without privacy (e.g. a medfusion sample folder)",
    )
    cls.add_argument("--epsilon", default="1,8,inf", help="privacy budgets, e.g. 1,4,8,inf (default 1,8,inf)")
    cls.add_argument("--delta", type=float, help="delta of (epsilon, delta)-DP (default 1/(10 N))")
    cls.add_argument("--max-grad-norm", type=float, help="per-sample clipping norm (default 1.0)")
    cls.add_argument("--epochs", type=_positive_int, help="epochs on the real training images (default 15)")
    cls.add_argument("--seeds", type=_positive_int, default=3, help="runs per epsilon (default 3)")
    _add_experiment_options(cls, "data, classifier and the training keys", "batch_size=256")
    cls.set_defaults(run=_classify)


def _add_experiment_options(parser: argparse.ArgumentParser, sections: str, example: str) -> None:
    """The options of an experiment command (``segment``, ``classify``): its config, where it runs,
    its first seed, starting over."""
    _option(parser, "--config", help=f"sections {sections}")
    _option(parser, "--set", help=f"override a config value, e.g. --set {example} (repeatable)")
    _option(parser, "--device", default="cpu", help="e.g. cuda (default cpu)")
    _option(parser, "--seed", help="the first seed")
    _option(parser, "--force", help="start over in an --out that holds an experiment of other settings")
    _option(parser, "--quiet")


def _classify(args: argparse.Namespace) -> int:
    from medfusion.downstream.classify import ClassifyConfig, run_classify

    given = {"delta": args.delta, "max_grad_norm": args.max_grad_norm, "epochs": args.epochs}
    config = _merged_config(ClassifyConfig, args.config, given, args.set, named=tuple(given))
    phrases = {
        "epsilons:": "--epsilon:",
        "pretrain ": "--pretrain ",
        "test ": "--test ",
        "force=True": "--force",
    }
    with _naming_options(phrases):
        result = run_classify(
            args.data,
            args.test,
            args.out,
            pretrain=args.pretrain,
            epsilons=args.epsilon,
            seeds=args.seeds,
            config=config,
            device=args.device,
            seed=args.seed,
            force=args.force,
            progress=not args.quiet,
        )
    print(f"\nreport: {result.report.resolve()}")
    return 0


def _add_benchmark_parser(commands) -> None:
    from medfusion.workflows.benchmark import DEFAULT_MINUTES

    bench = commands.add_parser(
        "benchmark",
        help="train the diffusion model and the GAN baselines for the same time and compare them",
        description="Train every model on DATA for the same wall-clock time (the diffusion model's VAE "
        "and U-Net together), sample N per class from each, and evaluate all of them (and --external "
        "sample folders) against HELDOUT with one domain encoder trained on DATA: FID, KID, "
        "precision/recall, density/coverage, diversity, memorisation, TSTR. Writes OUT/benchmark.json "
        "and OUT/benchmark.html (table, a grid per class, precision/recall plot). Run it again to "
        "resume: finished models are kept.",
    )
    _option(bench, "--data", metavar="TRAIN", help="training images (<class>/<file>)")
    bench.add_argument("--heldout", type=Path, required=True, help="held-out real images of the same classes")
    _option(bench, "--out", help="benchmark folder")
    bench.add_argument(
        "--minutes",
        type=float,
        default=DEFAULT_MINUTES,
        help=f"training time of each model (default {DEFAULT_MINUTES:g})",
    )
    bench.add_argument(
        "--models",
        help="comma-separated: diffusion, stylegan2, wgan-gp (default: all that support the data's dims; "
        "'none': external rows only)",
    )
    bench.add_argument(
        "--external",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a sample folder made elsewhere, evaluated as a row (repeatable)",
    )
    bench.add_argument(
        "--n", type=_positive_int, help="samples per class (default: held-out images per class)"
    )
    bench.add_argument("--size", type=int, nargs="+", help="resize every image to this first (array order)")
    bench.add_argument("--no-tstr", dest="tstr", action="store_false", help="no classifiers (TSTR/TRTR)")
    _option(bench, "--device")
    _option(bench, "--seed", help="seed of the training, sampling and evaluation")
    _option(bench, "--force", help="start over in an --out of an earlier benchmark")
    _option(bench, "--quiet")
    bench.set_defaults(run=_benchmark)


def _benchmark(args: argparse.Namespace) -> int:
    from medfusion.workflows.benchmark import parse_external, run_benchmark

    models = None
    if args.models is not None:
        models = (
            [] if args.models.strip() == "none" else [m.strip() for m in args.models.split(",") if m.strip()]
        )
    phrases = {f"out {args.out}": f"--out {args.out}", "force=True": "--force", "models:": "--models:"}
    phrases |= {"minutes ": "--minutes ", "external ": "--external ", "n must": "--n must"}
    phrases |= {
        f"{name} {getattr(args, name)}": f"--{name} {getattr(args, name)}" for name in ("data", "heldout")
    }
    phrases |= {"(resize)": "(--size)"}
    with _naming_options(phrases):
        result = run_benchmark(
            args.data,
            args.heldout,
            args.out,
            minutes=args.minutes,
            models=models,
            external=parse_external(args.external),
            n=args.n,
            resize=args.size,
            tstr=args.tstr,
            device=args.device,
            seed=args.seed,
            force=args.force,
            progress=not args.quiet,
        )
    print(f"\nbenchmark finished in {result.seconds / 60:.1f} min; report: {result.report.resolve()}")
    return 0


def _os_error(e: OSError) -> str:
    from medfusion.utils import PathError

    if isinstance(e, PathError) or not e.filename or not e.strerror:
        return str(e)
    where = f"{e.filename} -> {e.filename2}" if e.filename2 else str(e.filename)
    return f"{where}: {e.strerror}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medfusion`` command; returns the exit status."""
    from medfusion.data.errors import DataError

    args = build_parser().parse_args(argv)
    if getattr(args, "max_pixels", None) is not None:  # read by every reader, DataLoader workers too
        from medfusion.data.readers import MAX_PIXELS_ENV

        os.environ[MAX_PIXELS_ENV] = str(args.max_pixels)
    try:
        return args.run(args)
    except OSError as e:  # a full disk, no permission ...: one line naming the path
        print(f"medfusion: error: {_os_error(e)}", file=sys.stderr)
        return 1
    except (DataError, ValueError, RuntimeError) as e:
        print(f"medfusion: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        hints = {
            "sample": " (complete files are kept: run the same command again to resume)",
            "train": " (continue from the last checkpoint with --resume)",
            "train-vae": " (continue from the last checkpoint with --resume)",
            "train-gan": " (continue from the last checkpoint with --resume)",
            "features": " (continue from the last checkpoint with --resume)",
            "demo": " (run it again with --force to start over)",
            "benchmark": " (run the same command again to resume: finished models are kept)",
            "segment": " (run the same command again to resume: finished runs are kept)",
            "classify": " (run the same command again to resume: finished runs are kept)",
        }
        print(f"medfusion: interrupted{hints.get(args.command, '')}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
