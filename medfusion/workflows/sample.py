"""``medfusion sample`` as one call: :func:`run_sample`.

1. the model folder is opened as the generator its ``medfusion.json`` names
   (:func:`medfusion.samplers.load_generator`: diffusion, or any registered kind);
2. the synthetic dataset is written (:func:`medfusion.samplers.write_generated_dataset`: files in
   the training data's units and format, manifest, card and README; resumes);
3. when asked, it is evaluated against real images (:func:`~medfusion.workflows.run_evaluate`,
   with the memorisation audit when the training images are given), into a report folder beside
   the dataset (never inside it: it would read as a class), and the card records the summary.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from medfusion.samplers.synthetic import SampleResult

EVALUATION_SUFFIX = "-evaluation"  # the report folder of DIR is DIR-evaluation


def evaluation_folder(out: str | os.PathLike) -> Path:
    """Where :func:`run_sample` puts the evaluation of the dataset ``out``: beside it."""
    out = Path(out)
    return out.parent / f"{out.name}{EVALUATION_SUFFIX}"


def evaluation_summary(metrics: Mapping[str, Any], report: Path, real: Path, train: Path | None) -> dict:
    """The card's ``evaluation`` entry: the headline numbers against real images, the intensity
    check and the memorisation audit, with where the full report is."""
    from medfusion.metrics.evaluate import headline

    overall = metrics.get("overall", {})
    summary: dict[str, Any] = {
        "against": str(real),
        "extractor": metrics.get("extractor"),
        "headline": headline(metrics),
        **{key: overall[key] for key in ("fid", "kid", "precision", "recall") if key in overall},
        "report": str(report),
    }
    intensity = metrics.get("intensity", {}).get("overall") or metrics.get("intensity", {}).get("all")
    if isinstance(intensity, Mapping) and "relative_w1" in intensity:
        summary["intensity_relative_w1"] = intensity["relative_w1"]
    memorisation = metrics.get("memorisation")
    if memorisation:
        summary["memorisation"] = (
            f"{memorisation['flagged']} sample(s) ({memorisation['fraction_flagged']:.1%}) closer to a "
            f"training image of {train} than the {memorisation['quantile']:.0%} quantile of the held-out "
            "real images' distances"
        )
    else:
        summary["memorisation"] = "not audited (no training images given)"
    if metrics.get("warnings"):
        summary["warnings"] = list(metrics["warnings"])
    return summary


def run_sample(
    model: str | os.PathLike,
    out: str | os.PathLike,
    n: int,
    class_labels: str | Sequence[str] | None = None,
    seed: int = 0,
    batch_size: int = 16,
    file_format: str = "auto",
    intended_use: str | None = None,
    licence: str | None = None,
    evaluate_against: str | os.PathLike | None = None,
    train: str | os.PathLike | None = None,
    features: str | os.PathLike | None = None,
    generator_options: Mapping[str, Any] | None = None,
    dry_run: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[SampleResult, dict | None]:
    """Write ``n`` samples per class of the model folder ``model`` into ``out``, and evaluate them.

    Args:
        model: a model folder (``medfusion train`` writes ``RUN/model``).
        out: the synthetic dataset folder.
        n, class_labels, seed, batch_size, file_format, intended_use, licence: see
            :func:`medfusion.samplers.write_generated_dataset`.
        evaluate_against: real images held out from the model's training; None: no evaluation.
        train: the model's training images, for the memorisation audit (with
            ``evaluate_against``).
        features: the evaluation's feature extractor (default: a domain encoder trained on
            ``evaluate_against``; see :func:`~medfusion.workflows.run_evaluate`).
        generator_options: passed to the kind's loader (diffusion: ``sampler``, ``precision``,
            ``device``, ``slab``, ``channels_last``, ``compile_mode``).
        dry_run: check and print the plan; write nothing (and evaluate nothing).
        progress: progress bars.
        log: where messages go.

    Returns:
        What was written, and the card's evaluation summary (None without an evaluation).
    """
    import medfusion.baselines  # noqa: F401  (registers the GAN kinds with load_generator)
    from medfusion.samplers import load_generator, synthetic

    synthetic.check_request(Path(out), n, seed, batch_size)  # before the model is loaded
    if train is not None and evaluate_against is None:
        raise ValueError("train (the memorisation audit) needs evaluate_against (the real images)")
    if evaluate_against is not None and not Path(evaluate_against).is_dir():
        raise ValueError(f"evaluate_against {evaluate_against}: not a folder of real images")
    generator = load_generator(model, **dict(generator_options or {}))
    result = synthetic.write_generated_dataset(
        generator, out, n, class_labels=class_labels, seed=seed, batch_size=batch_size, progress=progress,
        log=log, dry_run=dry_run, file_format=file_format, intended_use=intended_use, licence=licence,
    )  # fmt: skip
    if evaluate_against is None or dry_run:
        return result, None
    from medfusion.samplers.card import update_card
    from medfusion.utils import process_state
    from medfusion.workflows.evaluate import run_evaluate

    if not process_state().is_main_process:
        return result, None
    report = evaluation_folder(out)
    real, train = Path(evaluate_against), Path(train) if train is not None else None
    metrics = run_evaluate(real, out, report, features=features, train=train, progress=progress, log=log)
    summary = evaluation_summary(metrics, report / "report.html", real, train)
    update_card(out, evaluation=summary)
    log(f"# the card of {out} records the evaluation ({report / 'report.html'})")
    return result, summary
