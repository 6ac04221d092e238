"""Fixtures of the training tests: Accelerate's global state reset, a tiny dataset of real crops."""

from __future__ import annotations

import pytest
from _training_helpers import RetinaCrops


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each test builds its own Accelerator."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="session")
def retina_crops() -> RetinaCrops:
    return RetinaCrops()
