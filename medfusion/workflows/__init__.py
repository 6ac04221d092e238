"""Multi-step commands as library functions: each composes data, training, sampling, metrics and
downstream steps into one call, which the command line only parses arguments for.

- :func:`~medfusion.workflows.evaluate.run_evaluate`: ``medfusion evaluate`` (the feature extractor,
  the metrics and report, train-on-synthetic-test-on-real, calibration).
- :func:`~medfusion.workflows.demo.run_demo`: ``medfusion demo`` (the whole pipeline on the bundled
  data within a time budget, :mod:`medfusion.workflows.budget`).
- :func:`~medfusion.workflows.benchmark.run_benchmark`: ``medfusion benchmark`` (the diffusion model
  and the GAN baselines trained for the same time, sampled and evaluated alike).
"""

from medfusion.workflows.benchmark import run_benchmark
from medfusion.workflows.demo import run_demo
from medfusion.workflows.evaluate import FEATURES_DIR, default_domain_encoder, run_evaluate

__all__ = ["FEATURES_DIR", "default_domain_encoder", "run_benchmark", "run_demo", "run_evaluate"]
