"""What the default yardstick can see on the bundled data: ``evaluate --calibrate``'s table.

For each bundled dataset (xray, color, volumes) this trains the domain encoder on the training
images as ``medfusion demo`` does on this machine (the demo profile's widths and batch, the
validation stop, at most ``--max-steps`` steps), then scores the five degradations of training
images against the held-out images (:mod:`medfusion.metrics.calibration`) and prints one line
per degradation with the checks. Usage::

    python scripts/calibrate_bundled.py [--datasets xray color volumes] [--max-steps N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from medfusion.data.demo import build_demo_data
from medfusion.metrics.evaluate import evaluate
from medfusion.metrics.features import load_extractor
from medfusion.training.features import VALIDATION_FILE, FeaturesRunConfig, train_domain_encoder
from medfusion.workflows.demo import PROFILES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["xray", "color", "volumes"])
    parser.add_argument("--max-steps", type=int, default=300, help="2D; volumes take half")
    parser.add_argument("--out", type=Path, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--data", type=Path, help="demo data folder (default: the demo's cache)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    root = build_demo_data(args.data, datasets=args.datasets, progress=False)
    work = args.out or Path(tempfile.mkdtemp(prefix="medfusion-calibration-"))
    rows = []
    for name in args.datasets:
        train, heldout = root / name / "train", root / name / "heldout"
        dims = 3 if name == "volumes" else 2
        profile = PROFILES[(dims, "cpu")]
        steps = args.max_steps if dims == 2 else max(1, args.max_steps // 2)
        config = FeaturesRunConfig.from_dict(
            {
                "model": {
                    "block_out_channels": list(profile.encoder_channels),
                    "norm_num_groups": min(16, profile.encoder_channels[0]),
                },
                "train": {
                    "max_steps": steps,
                    "batch_size": profile.encoder_batch,
                    "learning_rate": 1e-3,
                    "ema_decay": None,
                    "num_workers": 0,
                    "preview_every": 0,
                    "checkpoint_every": steps,
                },
            },
            source="calibrate_bundled",
        )
        start = time.perf_counter()
        train_domain_encoder(train, work / name / "features", config, progress=False, log=lambda m: None)
        trained = time.perf_counter() - start
        record = json.loads((work / name / "features" / VALIDATION_FILE).read_text())
        metrics = evaluate(
            heldout, heldout, work / name / "evaluation", load_extractor(work / name / "features"),
            train=train, progress=False, log=lambda m: None, calibrate=True, resamples=0,
        )  # fmt: skip
        calibration = metrics["calibration"]
        print(
            f"\n{name}: encoder {trained:.0f} s, steps {record['last_step']} (kept {record['kept_step']}); "
            f"n {calibration['n']}; real vs real FD {calibration['reference']['fid']:.3g}, "
            f"precision {calibration['reference']['precision']:.3g}"
        )
        for degradation, entry in calibration["degradations"].items():
            if "flagged" in entry:
                print(f"  {degradation:10s} flagged {entry['flagged']:.3f}")
            else:
                print(
                    f"  {degradation:10s} FD {entry['fid']:9.4g} = {entry['fid_ratio']:7.3g}x  precision "
                    f"{entry['precision']:.3f}  recall {entry['recall']:.3f}"
                )
        for check in calibration["checks"]:
            print(f"  {'pass' if check['passed'] else 'FAIL'}  {check['check']}: {check['value']:.3g}")
        rows.append({"dataset": name, "calibration": calibration, "encoder_seconds": trained, **record})
    print(f"\nruns in {work}")


if __name__ == "__main__":
    main()
