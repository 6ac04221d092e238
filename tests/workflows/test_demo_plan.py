"""The plan of ``medfusion demo`` as pure functions, and the whole demo simulated on machines slower
than the one its costs were measured on: it must end within its budget on every one."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from medfusion.workflows import demo
from medfusion.workflows.budget import TimeBudget, samples_per_class
from medfusion.workflows.demo import (
    AROUND_STEPS,
    OVERHEAD,
    STEP_BOUNDS,
    plan_classifier_steps,
    plan_steps,
    time_table,
    training_deadline,
)


def test_plan_steps_spends_the_stage_time_within_bounds():
    low, high = STEP_BOUNDS["diffusion"]
    seconds = 0.1
    expected = int((200 - AROUND_STEPS["diffusion"] * seconds) / (seconds * OVERHEAD))
    assert low < expected < high
    assert plan_steps("diffusion", seconds, 200) == expected
    assert plan_steps("diffusion", 100.0, 200) == low  # the floor (the deadline wins over it)
    assert plan_steps("diffusion", 1e-6, 200) == high
    assert training_deadline("diffusion", 500.0, seconds) == 500.0 - AROUND_STEPS["diffusion"] * seconds


def test_the_classifier_steps_fit_their_time_down_to_a_quarter():
    assert plan_classifier_steps(1000, 0.01, 200, 6) == 200
    steps = plan_classifier_steps(20, 0.02, 200, 6)
    assert steps == int(20 / 6 / (0.02 * OVERHEAD)) - demo.TSTR_AROUND_STEPS and 50 < steps < 200
    assert plan_classifier_steps(1, 1.0, 200, 6) == 50
    assert plan_classifier_steps(1, 1.0, 2, 6) == 1


def test_the_calibration_adds_to_the_expected_evaluation():
    without = demo.evaluation_seconds(0.01, 1280, 256, calibrate=False)
    assert without == pytest.approx(0.01 * demo.EVALUATE_PASSES * 1280)
    assert demo.evaluation_seconds(0.01, 1280, 256, calibrate=True) > without


def test_the_time_table_says_how_the_time_went():
    stages = {
        "data": {"seconds": 1.0},
        "autoencoder": {
            "seconds": 80.0,
            "planned_seconds": 90.0,
            "steps": 100,
            "steps_run": 60,
            "stopped_at_deadline": True,
        },
        "sample": {"seconds": 20.0, "planned_seconds": 30.0, "per_class": 16},
        "tstr": {"seconds": 9.0, "planned_seconds": 10.0, "steps": 50, "seeds": 3},
        "evaluate": {"seconds": 9.0, "planned_seconds": 10.0, "calibrate": False},
    }
    lines = time_table(stages, 600, 119)
    assert lines[0] == "time: 119 s of the 600 s budget"
    assert lines[2].split() == ["data", "-", "1.0"]
    assert "60 of 100 planned steps, stopped at its deadline" in lines[3]
    assert lines[4].endswith("16 samples per class") and lines[5].endswith("50 steps x 6 fits")
    assert lines[6].endswith("without the calibration")


# What the stages of the default 2D demo cost on the machine of the measurements (2 CPU threads;
# from demo.json of `medfusion demo`, see scripts/demo_budget.py), in seconds: a simulated machine
# `slowdown` times slower takes `slowdown` times each.
MEASURED = {
    "data": 0.5,  # the data in the cache, and its inspection
    "prepare": {"autoencoder": 2.0, "diffusion": 2.0, "features": 2.5},  # reading data, building models
    "step": {"autoencoder": 0.19, "diffusion": 0.1, "features": 0.3},  # a timed step
    "loop": {"autoencoder": 1.11, "diffusion": 1.07, "features": 1.22},  # a step in the loop over it
    "around": {"autoencoder": 3.7, "diffusion": 3.0, "features": 3.1},  # the work around the loop
    "sample_load": 0.6,  # loading the model folder, once per call of the writer
    "images_per_second": 14.0,
    "classifier_probe": 2.0,  # timing a classifier step (three short fits)
    "classifier_step": 0.03,
    "tstr_fixed": 2.0,  # reading the three folders, building and testing six classifiers
    "extractor_image": 0.004,  # per image through the domain encoder (reading it included)
    "evaluate": 17.0,  # without the calibration
    "calibration": 3.0,
}
CLASSES, HELD_OUT, TRAIN = 4, 64, 768


@dataclass
class Machine:
    """The measured costs times ``slowdown``, spent on a fake clock; training steps in the loop
    take ``busy`` times longer than when they were timed (other work started meanwhile)."""

    slowdown: float
    busy: float = 1.0
    now: float = 0.0

    def __call__(self) -> float:
        return self.now

    def spend(self, seconds: float) -> None:
        self.now += seconds * self.slowdown


def _train(machine: Machine, budget: TimeBudget, stage: str) -> dict:
    start, deadline = machine.now, budget.deadline(stage)
    machine.spend(MEASURED["prepare"][stage])
    per_step = MEASURED["step"][stage] * machine.slowdown
    machine.spend(MEASURED["step"][stage] * sum(demo.PROBE.values()))
    steps = plan_steps(stage, per_step, deadline - machine.now)
    stop = training_deadline(stage, deadline, per_step)
    run = 0
    while run < steps:  # the loop stops after the first step past its deadline
        machine.spend(MEASURED["step"][stage] * MEASURED["loop"][stage] * machine.busy)
        run += 1
        if machine.now > stop:
            break
    machine.spend(MEASURED["around"][stage])
    return {"planned": deadline - start, "spent": machine.now - start, "steps": steps, "run": run}


def _sample(machine: Machine, budget: TimeBudget) -> dict:
    start, deadline = machine.now, budget.deadline("sample")
    first = demo.SAMPLE_BATCH // CLASSES
    machine.spend(MEASURED["sample_load"] + first * CLASSES / MEASURED["images_per_second"])
    rate = first * CLASSES / (machine.now - start)
    n = samples_per_class(deadline - machine.now, rate, CLASSES, first, demo.MIN_PER_CLASS, HELD_OUT)
    if n > first:
        machine.spend(MEASURED["sample_load"] + (n - first) * CLASSES / MEASURED["images_per_second"])
    return {"planned": deadline - start, "spent": machine.now - start, "per_class": n}


def _tstr(machine: Machine, budget: TimeBudget) -> dict:
    start, deadline = machine.now, budget.deadline("tstr")
    machine.spend(MEASURED["classifier_probe"])
    per_step = MEASURED["classifier_step"] * machine.slowdown
    steps = plan_classifier_steps(deadline - machine.now, per_step, demo.TSTR_STEPS[2], 2 * demo.TSTR_SEEDS)
    machine.spend(MEASURED["tstr_fixed"] + 2 * demo.TSTR_SEEDS * steps * MEASURED["classifier_step"])
    return {"planned": deadline - start, "spent": machine.now - start, "steps": steps}


def _evaluate(machine: Machine, budget: TimeBudget, per_class: int) -> dict:
    start, deadline = machine.now, budget.deadline("evaluate")
    machine.spend(MEASURED["extractor_image"] * 64)  # timing the extractor on a batch, twice
    per_image = MEASURED["extractor_image"] * machine.slowdown
    images = HELD_OUT * CLASSES + per_class * CLASSES + TRAIN
    needed = demo.evaluation_seconds(per_image, images, HELD_OUT * CLASSES, calibrate=True)
    calibrate = machine.now + needed <= deadline
    machine.spend(MEASURED["evaluate"] + (MEASURED["calibration"] if calibrate else 0.0))
    return {"planned": deadline - start, "spent": machine.now - start, "calibrate": calibrate}


def simulate(slowdown: float, busy: float = 1.0, minutes: float = demo.DEFAULT_MINUTES) -> tuple[dict, float]:
    """The default 2D demo on a machine ``slowdown`` times slower than the measured one (``busy``:
    see :class:`Machine`): what each stage was given and did, and the seconds of the whole run."""
    machine = Machine(slowdown, busy)
    budget = TimeBudget(60 * minutes, demo.WEIGHTS, demo.MARGIN, clock=machine)
    machine.spend(MEASURED["data"])
    stages = {name: _train(machine, budget, name) for name in ("autoencoder", "diffusion")}
    stages["sample"] = _sample(machine, budget)
    stages["features"] = _train(machine, budget, "features")
    stages["tstr"] = _tstr(machine, budget)
    stages["evaluate"] = _evaluate(machine, budget, stages["sample"]["per_class"])
    return stages, machine.now - budget.start


def test_on_the_measured_machine_the_plan_is_kept_and_nothing_is_cut():
    stages, seconds = simulate(1.0)
    assert seconds <= 600
    for name in ("autoencoder", "diffusion", "features"):
        assert stages[name]["run"] == stages[name]["steps"]  # the plan fits: no deadline stop
        assert stages[name]["spent"] <= stages[name]["planned"]
    assert stages["sample"]["per_class"] == HELD_OUT and stages["evaluate"]["calibrate"]
    assert stages["tstr"]["steps"] == demo.TSTR_STEPS[2]


@pytest.mark.parametrize("slowdown", [2, 4, 6])
def test_a_slower_machine_ends_within_the_budget_with_less_trained_models(slowdown):
    stages, seconds = simulate(slowdown)
    assert seconds <= 600
    fast, _ = simulate(1.0)
    for name in ("autoencoder", "diffusion", "features"):
        assert 0 < stages[name]["run"] < fast[name]["run"]
    assert stages["sample"]["per_class"] >= demo.MIN_PER_CLASS


def test_at_four_times_slower_the_floors_give_way_to_the_deadlines():
    stages, seconds = simulate(4)
    assert seconds <= 600
    floors = {name: STEP_BOUNDS[name][0] for name in ("autoencoder", "diffusion", "features")}
    assert any(stages[name]["run"] < floors[name] for name in floors)
    assert all(stages[name]["spent"] <= stages[name]["planned"] + 5 for name in floors)
    assert stages["sample"]["per_class"] < HELD_OUT  # fewer samples, to fit
    assert stages["tstr"]["steps"] < demo.TSTR_STEPS[2]


@pytest.mark.parametrize("slowdown", [1, 4])
def test_training_slower_than_timed_stops_at_the_deadlines(slowdown):
    stages, seconds = simulate(slowdown, busy=1.6)
    assert seconds <= 600
    for name in ("autoencoder", "diffusion", "features"):
        assert stages[name]["run"] < stages[name]["steps"]  # stopped at its deadline
        assert stages[name]["spent"] <= stages[name]["planned"] + 1
