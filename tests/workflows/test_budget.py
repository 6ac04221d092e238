"""The time budget of multi-stage workflows: shares, deadlines, and the work that fits."""

from __future__ import annotations

import random

import pytest

from medfusion.workflows.budget import TimeBudget, affordable, samples_per_class, stage_seconds, within

WEIGHTS = {"a": 0.2, "b": 0.3, "c": 0.1, "d": 0.3}
MARGIN = 0.1


class FakeClock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_on_plan_every_stage_gets_its_share_of_the_whole_budget():
    clock = FakeClock()
    budget = TimeBudget(600, WEIGHTS, MARGIN, clock)
    for name, weight in WEIGHTS.items():
        deadline = budget.deadline(name)
        assert deadline - clock.now == pytest.approx(600 * weight)
        clock.now = deadline  # the stage takes all its time
    assert budget.left() == pytest.approx(600 * MARGIN)


def test_later_stages_share_an_overrun_and_a_saving():
    clock = FakeClock()
    budget = TimeBudget(600, WEIGHTS, MARGIN, clock)
    clock.now += 600 * 0.2 + 60  # stage a ran 60 s over
    late = budget.deadline("b") - clock.now
    assert late == pytest.approx((600 * 0.8 - 60) * 0.3 / 0.8) and late < 600 * 0.3
    clock.now = budget.start + 600 * 0.2 - 60  # or 60 s under
    assert budget.deadline("b") - clock.now > 600 * 0.3


def test_a_deadline_is_never_past_the_end_minus_the_later_shares():
    rng = random.Random(0)
    names = list(WEIGHTS)
    for _ in range(200):
        left = rng.uniform(-50, 600)
        stage = rng.choice(names)
        later = sum(WEIGHTS[n] for n in names[names.index(stage) + 1 :]) + MARGIN
        seconds = stage_seconds(left, WEIGHTS, stage, MARGIN)
        assert 0 <= seconds <= max(0.0, left) * (1 - later / (later + WEIGHTS[stage])) + 1e-9


def test_no_time_left_gives_no_time():
    assert stage_seconds(-5, WEIGHTS, "c", MARGIN) == 0
    assert stage_seconds(0, WEIGHTS, "a") == 0


def test_the_budget_checks_its_arguments():
    with pytest.raises(ValueError, match="seconds must be > 0"):
        TimeBudget(0, WEIGHTS)
    with pytest.raises(ValueError, match="weights and margin must be >= 0"):
        TimeBudget(10, {"a": -1.0})
    with pytest.raises(ValueError, match="stage must be one of"):
        stage_seconds(10, WEIGHTS, "e")
    with pytest.raises(ValueError, match="unit_seconds must be > 0"):
        affordable(10, 0)
    with pytest.raises(ValueError, match="classes must be >= 1"):
        samples_per_class(10, 1, 0, 0, 1, 2)


def test_work_that_fits():
    assert affordable(10, 3) == 3 and affordable(-1, 3) == 0
    assert within(5, 1, 10) == 5 and within(0, 1, 10) == 1 and within(50, 1, 10) == 10
    assert within(5, 20, 10) == 10  # the cap wins over the floor


def test_samples_per_class_fit_the_time_between_the_floor_and_the_cap():
    # 4 classes, 4 per class done, 2 images/s: 60 s buy 120 more images, 30 a class
    assert samples_per_class(60, 2.0, 4, 4, 16, 64) == 34
    assert samples_per_class(1, 2.0, 4, 4, 16, 64) == 16  # the floor: fewer make no evaluation
    assert samples_per_class(1000, 2.0, 4, 4, 16, 64) == 64  # the cap: the held-out count
    assert samples_per_class(-10, 2.0, 4, 4, 16, 64) == 16  # past the deadline already
