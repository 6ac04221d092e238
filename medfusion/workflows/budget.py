"""A wall-clock budget shared by the stages of a workflow (``medfusion demo``), and how much work
fits in a stage's time.

:class:`TimeBudget` gives every stage, when it starts, a share of the time left: its weight over
the weights of the stages still to come (itself included) and of the margin kept free at the end
(:func:`stage_seconds`). A run on plan gives each stage its weight's share of the whole budget;
after a stage that ran over, the later stages share the loss; after one that ended early, they
share the gain; a stage's deadline is never past the budget's end minus the later stages' shares.

The other functions are pure: from a stage's seconds and a cost measured on this machine to an
amount of work (optimizer steps, samples).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping


def stage_seconds(left: float, weights: Mapping[str, float], stage: str, margin: float = 0.0) -> float:
    """Seconds that ``stage`` gets of the ``left`` seconds of a budget.

    Args:
        left: seconds left in the budget when the stage starts (<= 0: none).
        weights: every stage's weight, in the order the stages run.
        stage: the stage starting now.
        margin: the weight of the time kept free at the end of the budget.
    Returns:
        ``left * weights[stage] / (margin + the weights of stage and every later stage)``.
    """
    if stage not in weights:
        raise ValueError(f"stage must be one of {list(weights)}; got {stage!r}")
    if margin < 0 or any(w < 0 for w in weights.values()):
        raise ValueError(f"weights and margin must be >= 0; got {dict(weights)} and {margin}")
    names = list(weights)
    later = sum(weights[name] for name in names[names.index(stage) :]) + margin
    return max(0.0, left) * weights[stage] / later if later > 0 else 0.0


class TimeBudget:
    """``seconds`` of wall-clock time from now, shared by stages by weight (see the module docstring).

    Args:
        seconds: the whole budget (> 0).
        weights: every budgeted stage's weight, in the order the stages run.
        margin: the weight of the time kept free at the end.
        clock: seconds on a clock that only moves forward; ``time.monotonic`` (what the training
            loop's ``deadline`` is measured on).
    """

    def __init__(
        self,
        seconds: float,
        weights: Mapping[str, float],
        margin: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not seconds > 0:
            raise ValueError(f"seconds must be > 0; got {seconds}")
        stage_seconds(seconds, weights, next(iter(weights)), margin)  # checks the weights and margin
        self.seconds, self.weights, self.margin, self.clock = float(seconds), dict(weights), margin, clock
        self.start = clock()
        self.end = self.start + self.seconds

    def now(self) -> float:
        return self.clock()

    def left(self) -> float:
        """Seconds to the end of the budget (negative once it is past)."""
        return self.end - self.clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def deadline(self, stage: str) -> float:
        """The instant (on ``clock``) by which ``stage``, starting now, should end."""
        now = self.clock()
        return now + stage_seconds(self.end - now, self.weights, stage, self.margin)


def affordable(seconds: float, unit_seconds: float) -> int:
    """How many units of work of ``unit_seconds`` each fit in ``seconds`` (0 when none do)."""
    if not unit_seconds > 0:
        raise ValueError(f"unit_seconds must be > 0; got {unit_seconds}")
    return max(0, math.floor(seconds / unit_seconds))


def within(count: int, low: int, high: int) -> int:
    """``count`` raised to ``low`` and capped at ``high`` (``high`` wins when ``low > high``)."""
    return min(high, max(low, count))


def samples_per_class(
    seconds: float, images_per_second: float, classes: int, done: int, low: int, high: int
) -> int:
    """Samples per class of a synthetic set that ``done`` per class already exist of, when the
    remaining ones are made at ``images_per_second`` in ``seconds``: at least ``low`` (a set
    too small to evaluate is worth no time saved) and at most ``high``."""
    if classes < 1:
        raise ValueError(f"classes must be >= 1; got {classes}")
    more = math.floor(max(0.0, seconds) * max(0.0, images_per_second) / classes)
    return within(done + more, low, high)
