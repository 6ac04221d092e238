"""Fixtures of the GAN baseline tests: those of the training tests (Accelerate's state reset)."""

from tests.training.conftest import fresh_accelerate_state  # noqa: F401  (autouse: every test here)
