"""Does ``medfusion demo`` keep its time budget on a slower machine? Run it and see.

Runs ``medfusion demo --minutes M`` in a child process with ``--threads`` torch threads (one:
``torch.set_num_threads(1)``, through ``OMP_NUM_THREADS``) and, with ``--slowdown F``, on a
machine F times slower: the child is stopped (SIGSTOP) for ``(F - 1) / F`` of every 50 ms, so
every stage (training, sampling, the evaluation, reading files) takes F times the wall-clock time.
Then prints one JSON line per stage of ``OUT/demo.json`` (planned and spent seconds, planned and
run steps, whether it stopped at its deadline) and a last line with the whole wall time against
the budget and the train-on-synthetic accuracy against chance. Usage::

    python scripts/demo_budget.py [--minutes 10] [--threads 1] [--slowdown 4] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

KEYS = ("planned_seconds", "seconds", "steps", "steps_run", "stopped_at_deadline", "per_class", "calibrate")


def throttled(process: subprocess.Popen, slowdown: float, period: float = 0.05) -> int:
    """Wait for ``process``, letting it run ``1 / slowdown`` of every ``period`` seconds."""
    running = period / slowdown
    while process.poll() is None:
        time.sleep(running)
        if slowdown > 1:
            os.killpg(process.pid, signal.SIGSTOP)
            time.sleep(period - running)
            os.killpg(process.pid, signal.SIGCONT)
    return process.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="the demo's budget (default 10)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the demo (default 1)")
    parser.add_argument("--slowdown", type=float, default=1.0, help="run F times slower (default 1)")
    parser.add_argument("--out", type=Path, default=Path("demo-budget"), help="the demo's run folder")
    parser.add_argument("--dataset", help="xray (default), color or volumes")
    args = parser.parse_args()
    if args.slowdown < 1 or args.threads < 1:
        parser.error("--slowdown must be >= 1 and --threads >= 1")
    command = [sys.executable, "-m", "medfusion", "demo", "--out", str(args.out), "--force", "--quiet"]
    command += ["--minutes", str(args.minutes)] + (["--dataset", args.dataset] if args.dataset else [])
    threads = str(args.threads)
    env = os.environ | {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    start = time.monotonic()
    process = subprocess.Popen(command, env=env, start_new_session=True, stdout=sys.stderr)
    try:
        code = throttled(process, args.slowdown)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGCONT)
            process.terminate()
    wall = time.monotonic() - start
    if code != 0:
        print(json.dumps({"error": f"medfusion demo exited with {code}", "wall_seconds": round(wall, 1)}))
        return 1
    summary = json.loads((args.out / "demo.json").read_text(encoding="utf-8"))
    for name, stage in summary["stages"].items():
        print(json.dumps({"stage": name} | {k: stage[k] for k in KEYS if k in stage}))
    metrics = json.loads((args.out / "metrics.json").read_text(encoding="utf-8"))
    tstr = metrics.get("tstr", {})
    result = {
        "wall_seconds": round(wall, 1),
        "budget_seconds": 60 * args.minutes,
        "demo_seconds": summary["seconds"],
        "threads": args.threads,
        "slowdown": args.slowdown,
        "tstr_balanced_accuracy": tstr.get("tstr", {}).get("balanced_accuracy", {}).get("mean"),
        "trtr_balanced_accuracy": tstr.get("trtr", {}).get("balanced_accuracy", {}).get("mean"),
        "chance": 1 / len(tstr["classes"]) if tstr.get("classes") else None,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
