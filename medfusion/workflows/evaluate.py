"""``medfusion evaluate`` as one call: :func:`run_evaluate`.

The steps, in order:

1. the feature extractor: the one named (see :func:`medfusion.metrics.features.load_extractor`),
   or by default a domain encoder trained on the real reference images into ``OUT/features``
   (:func:`default_domain_encoder`; offline, any modality, reused when it is already there);
2. when asked, train on synthetic, test on real: a classifier trained on the synthetic and on the
   real training images, both tested on the real reference images (:func:`medfusion.downstream.tstr`);
3. the metrics and the report of :func:`medfusion.metrics.evaluate.evaluate` (which imports no
   training: the classifier's numbers reach it as a result), with the calibration when asked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

import medfusion.metrics.evaluate as evaluation
import medfusion.metrics.features as extractors
from medfusion.config import DataConfig

if TYPE_CHECKING:
    from medfusion.downstream import ClassifierConfig

FEATURES_DIR = "features"  # the default domain encoder's run folder, inside the report folder


def default_domain_encoder(
    real: str | Path,
    folder: str | Path,
    data: DataConfig | None = None,
    max_steps: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """The domain encoder of an evaluation that names no extractor: trained on the real reference
    images ``real`` into ``folder``, or the one already there (an interrupted training resumes).

    Args:
        real: the real reference images (the evaluation's ``real``).
        folder: the encoder's run folder (``OUT/features`` for :func:`run_evaluate`).
        data: how files become tensors (the evaluation's); default :class:`DataConfig`.
        max_steps: training steps at most; None: the default of
            :class:`~medfusion.training.features.FeaturesRunConfig`.
        progress: show progress bars.
        log: receives the lines that say what happens.

    Returns:
        ``folder``, as a path :func:`~medfusion.metrics.features.load_extractor` takes.
    """
    folder, data = Path(folder), data or DataConfig()
    if (folder / extractors.ENCODER_DIR / "config.json").is_file():
        return folder
    from medfusion.data.discovery import discover
    from medfusion.training.features import FeaturesRunConfig, train_domain_encoder

    log(f"# no feature extractor given: training a domain encoder on {real} into {folder}")
    config = FeaturesRunConfig(data=data)
    train = config.train.to_dict()
    if max_steps is not None:
        train["max_steps"] = max_steps
    real_count = len(discover(real, data.labels).samples)
    if real_count < train["batch_size"]:  # a small real set: one batch holds it all
        train["batch_size"] = max(2, real_count)
    resume = (folder / "checkpoints").is_dir()
    train_domain_encoder(real, folder, config.replace(train=train), resume=resume, progress=progress, log=log)
    return folder


def run_evaluate(
    real: str | Path,
    fake: str | Path,
    out: str | Path,
    features: str | Path | None = None,
    train: str | Path | None = None,
    data: DataConfig | None = None,
    feature_steps: int | None = None,
    tstr: bool = False,
    tstr_seeds: Sequence[int] = (0, 1, 2),
    classifier: ClassifierConfig | None = None,
    calibrate: bool = False,
    resamples: int = evaluation.BOOTSTRAP_RESAMPLES,
    level: float = evaluation.BOOTSTRAP_LEVEL,
    seed: int = 0,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Evaluate the synthetic folder ``fake`` against the real folder ``real``: resolve the
    feature extractor, train the TSTR classifiers when asked, and write ``out/metrics.json`` and
    ``out/report.html``.

    Args:
        real: real reference images (held out from the training of the generator).
        fake: synthetic images (e.g. a ``medfusion sample`` folder).
        out: the report folder.
        features: the extractor, as :func:`~medfusion.metrics.features.load_extractor` takes it (a
            domain encoder folder, ``inception``, ``torchvision:NAME[@FILE]``, ``timm:NAME[@FILE]``,
            a ``.pt``/``.ts``/``.pth``/``.onnx`` file); None: a domain encoder trained on ``real``
            into ``out/features`` (:func:`default_domain_encoder`).
        train: the generator's training images: the memorisation audit and the real side of TSTR.
        data: how files become tensors in every folder; default :class:`DataConfig`.
        feature_steps: training steps of the default domain encoder (None: its default).
        tstr: also train a classifier on ``fake`` and one on ``train`` and test both on ``real``
            (needs ``train`` and the downstream extra).
        tstr_seeds: one classifier per seed and side.
        classifier: the classifier and its training; None: ``ClassifierConfig()``.
        calibrate: also score known degradations of real images with the same features.
        resamples: half-samples per interval (fewer for large sets; 0: no intervals).
        level: of the intervals, in (0, 1).
        seed: of the reference draws, the intervals and the calibration.
        batch_size: images per feature batch.
        device: where the extractor and the classifiers run.
        progress: show progress bars.
        log: receives the lines that say what happens and the summary.

    Returns:
        The metrics (what ``metrics.json`` holds; see :func:`medfusion.metrics.evaluate.evaluate`),
        with ``tstr`` when ``tstr`` is set.
    """
    evaluation.check_interval_options(resamples, level)
    if tstr and train is None:
        raise ValueError("tstr needs train (the real training images the classifier is compared on)")
    data = data or DataConfig()
    if features is None:
        features = default_domain_encoder(real, Path(out) / FEATURES_DIR, data, feature_steps, progress, log)
    extractor = extractors.load_extractor(features, device)
    utility = None
    if tstr:  # the classifier is trained here, above metrics/: evaluate only keeps its numbers
        from medfusion.downstream import ClassifierConfig
        from medfusion.downstream import tstr as train_on_synthetic

        log(f"# tstr: a classifier trained on {fake} and on {train}, tested on {real}")
        utility = train_on_synthetic(
            train, fake, real, data, classifier or ClassifierConfig(), seeds=tuple(tstr_seeds),
            device=device, progress=progress, log=log,
        )  # fmt: skip
    return evaluation.evaluate(
        real, fake, out, extractor, train=train, data=data, batch_size=batch_size, device=device,
        progress=progress, log=log, utility=utility, calibrate=calibrate, resamples=resamples,
        level=level, seed=seed,
    )  # fmt: skip
