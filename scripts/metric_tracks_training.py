"""Does the yardstick track training? The demo's U-Net again, trained only ``--steps`` steps.

Given a finished ``medfusion demo`` run, this trains the same U-Net (the run's own
``diffusion/config.yaml``, the same VAE and data) for ``--steps`` optimizer steps into
``RUN/early/diffusion``, samples as many images per class with the same sampler and seed, and
evaluates them with the demo's domain encoder against the same held-out images. It prints the
overall FID, its real-vs-real reference and precision/recall of both U-Nets: the briefly trained
one must score clearly worse. Usage::

    python scripts/metric_tracks_training.py medfusion-demo [--steps 50]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from medfusion.cli import main as medfusion


def summary(metrics: dict) -> str:
    overall, entry = metrics["overall"], metrics["overall"]["reference"]["fid"]
    return (
        f"FID {overall['fid']:.4g} (real vs real {entry['reference']:.4g}, {entry['ratio']:.3g}x), "
        f"precision {overall['precision']:.3f}, recall {overall['recall']:.3f}, "
        f"coverage {overall['coverage']:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished medfusion demo run folder")
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    demo = json.loads((args.run / "demo.json").read_text())
    data = Path(demo["stages"]["data"]["path"])
    early = args.run / "early"
    shutil.rmtree(early, ignore_errors=True)
    sample = demo["stages"]["sample"]
    steps = str(args.steps)
    train = ["train", "--data", str(data / "train"), "--vae", str(args.run / "autoencoder" / "vae")]
    train += ["--out", str(early / "diffusion"), "--config", str(args.run / "diffusion" / "config.yaml")]
    train += ["--max-steps", steps, "--set", f"train.checkpoint_every={steps}", "--quiet"]
    assert medfusion(train) == 0
    assert medfusion(["sample", str(early / "diffusion" / "model"), "--n", str(sample["per_class"]), "--out",
                      str(early / "synthetic"), "--sampler", sample["sampler"], "--steps",
                      str(sample["sampler_steps"]), "--quiet"]) == 0  # fmt: skip
    assert medfusion(["evaluate", "--real", str(data / "heldout"), "--fake", str(early / "synthetic"),
                      "--train", str(data / "train"), "--features", str(args.run / "features"),
                      "--out", str(early / "evaluation"), "--quiet"]) == 0  # fmt: skip
    full = json.loads((args.run / "metrics.json").read_text())
    brief = json.loads((early / "evaluation" / "metrics.json").read_text())
    print(f"U-Net after {demo['stages']['diffusion']['steps']} steps (the demo): {summary(full)}")
    print(f"U-Net after {args.steps} steps: {summary(brief)}")


if __name__ == "__main__":
    main()
