"""k-fold under one time budget (issue 26): the plan divides the command's budget over the folds and
the ensemble, and a fold that starts late gets a shorter allowance so the command still ends in time."""
import pytest

from segpipe.config import Config
from segpipe.planning.plan import Hardware
from segpipe.planning.planner import make_plan
from segpipe.planning.time_plan import (
    ENSEMBLE_SECONDS,
    ENSEMBLE_SECONDS_PER_FOLD,
    FOLD_MARGIN_SECONDS,
    FOLD_STEPS_ADVISED,
    MARGIN_SECONDS,
)

from .test_rules import GIB, fingerprint, flop_timer


def _plan(minutes=60, **kwargs):
    fp = fingerprint([[1.0, 1.0, 1.0]] * 20, [[48, 48, 48]] * 20)
    timer, _ = flop_timer()
    return make_plan(fp, hardware=Hardware("cpu", 8 * GIB), time_budget_minutes=minutes, step_timer=timer, **kwargs)


def test_the_budget_is_divided_over_the_folds_and_the_ensemble():
    single, folded = _plan(), _plan(folds=5)
    division = folded.choices["budget_division"].value
    spent = folded.measured["timing_seconds"]
    ensemble = ENSEMBLE_SECONDS + 5 * ENSEMBLE_SECONDS_PER_FOLD
    # the command's start-up margin once, then five equal shares
    assert division["fold_minutes"] == pytest.approx((3600 - spent - ensemble - MARGIN_SECONDS) / 5 / 60, abs=0.01)
    assert folded.predicted["ensemble_seconds"] == ensemble
    # a fold validates on its share of the cases: 20 / 5 = 4 (the single run: 20 % = 4 too) ...
    assert folded.predicted["final_evaluation"]["cases"] == 4
    # ... and its schedule and allowance fit the fold's share, not the whole hour
    limit = folded.choices["time_limit"].value
    final = folded.predicted["final_evaluation_seconds"]
    assert limit == pytest.approx(division["fold_minutes"] - (final + FOLD_MARGIN_SECONDS) / 60, abs=0.01)
    schedule = folded.choices["schedule"].value
    epoch = schedule["steps_per_epoch"] * folded.predicted["loop_step_seconds"] + folded.predicted["validation_seconds"]
    training = schedule["epochs"] * epoch
    share = division["fold_minutes"] * 60
    assert share - epoch < training + final + FOLD_MARGIN_SECONDS <= share
    single_epoch = (single.choices["schedule"].value["steps_per_epoch"] * single.predicted["loop_step_seconds"]
                    + single.predicted["validation_seconds"])
    assert single.choices["schedule"].value["epochs"] * single_epoch > 4 * training
    # the whole command: timings + 5 folds (training, evaluation, margin) + ensemble within 60 minutes
    assert spent + MARGIN_SECONDS + 5 * (limit * 60 + final + FOLD_MARGIN_SECONDS) + ensemble <= 3600 + 1e-6
    assert "budget_division" not in single.choices
    assert "5 folds" in folded.choices["budget_division"].reason


def test_a_budget_too_small_for_the_folds_is_refused_by_name():
    fp = fingerprint([[1.0, 1.0, 1.0]] * 20, [[48, 48, 48]] * 20)
    timer, _ = flop_timer()
    with pytest.raises(ValueError, match=r"train\.time_budget_minutes=2"):
        make_plan(fp, hardware=Hardware("cpu", 8 * GIB), time_budget_minutes=2, step_timer=timer, folds=5)
    with pytest.raises(ValueError, match=r"^Expected a number of folds >= 2\. Received: data\.folds=1"):
        make_plan(fp, hardware=Hardware("cpu", 8 * GIB), folds=1)


def test_a_fold_starting_late_or_early_gets_what_is_left(monkeypatch, capsys):
    from segpipe.cli import train as cli

    runs = []
    for fold in range(3):
        # the plan's allowance: (1800 - 120 - 3 × (30 + 30)) / 3 = 500 s
        config = Config.from_dict({"name": f"x_fold{fold}", "data": {"folds": 3, "fold": fold},
                                   "train": {"time_budget_minutes": 30, "max_train_minutes": 8.33}})
        runs.append(config)
    plan = {"predicted": {"final_evaluation_seconds": 30.0, "ensemble_seconds": 120.0}}
    now = [1000.0]
    monkeypatch.setattr(cli.time, "monotonic", lambda: now[0])
    before_run = cli._training_deadline(plan, runs, started=1000.0)
    # on time: the plan's allowance stands (the same object: nothing to change)
    assert before_run(runs[0], 0) is runs[0]
    # 20 of 30 minutes gone before fold 1: (1800 - 1200 - 120 - 2 × (30 + 30)) / 2 = 180 s each
    now[0] = 1000.0 + 1200
    late = before_run(runs[1], 1)
    assert late.train.max_train_minutes == pytest.approx(3.0) and runs[1].train.max_train_minutes == 8.33
    assert "8.33 -> 3 (the command so far took longer than planned" in capsys.readouterr().out
    # fold 0 ended early, after 400 s: the time it left is shared, (1800 - 400 - 120 - 120) / 2 = 580 s each
    now[0] = 1000.0 + 400
    early = before_run(runs[1], 1)
    assert early.train.max_train_minutes == pytest.approx(9.67) and runs[1].train.max_train_minutes == 8.33
    assert "8.33 -> 9.67 (the command so far left time unused" in capsys.readouterr().out
    # past the budget: a minimal allowance (the run still saves a checkpoint), never zero or negative
    now[0] = 1000.0 + 1800
    assert before_run(runs[2], 2).train.max_train_minutes == 0.5


def test_a_single_run_gets_what_its_start_up_left(monkeypatch, capsys):
    """One planned run: its allowance is the budget less the command so far, its final evaluation and its
    export, measured when it starts (the plan kept RUN_MARGIN_SECONDS for start-up and export)."""
    from segpipe.cli import train as cli

    # the plan's allowance: 600 - 48 (timings) - 20 (final evaluation) - 60 = 472 s
    config = Config.from_dict({"name": "one", "train": {"time_budget_minutes": 10, "max_train_minutes": 7.87}})
    plan = {"predicted": {"final_evaluation_seconds": 20.0}}
    now = [1000.0]
    monkeypatch.setattr(cli.time, "monotonic", lambda: now[0])
    before_run = cli._training_deadline(plan, [config], started=1000.0)
    now[0] = 1000.0 + 60  # 60 s of start-up and timings: (600 - 60 - 20 - 30) / 60 = 8.17 min
    assert before_run(config, 0).train.max_train_minutes == pytest.approx(8.17)
    assert "one: train.max_train_minutes 7.87 -> 8.17 (the command so far left time unused" in capsys.readouterr().out
    now[0] = 1000.0 + 300  # a slow start-up (a large dataset's fingerprint): (600 - 300 - 50) / 60
    assert before_run(config, 0).train.max_train_minutes == pytest.approx(4.17)
    assert config.train.max_train_minutes == 7.87


def test_a_fold_share_too_small_for_one_epoch_names_the_budget_and_the_share():
    fp = fingerprint([[1.0, 1.0, 1.0]] * 20, [[48, 48, 48]] * 20)
    timer, _ = flop_timer(gflops_per_second=0.02)  # a very slow machine: one epoch does not fit a fold's share
    with pytest.raises(ValueError, match=r"^Expected at least [\d.]+ minutes per fold .* Received: "
                                         r"train\.time_budget_minutes=8 \([\d.]+ min per fold of 4, after the timings"):
        make_plan(fp, hardware=Hardware("cpu", 8 * GIB), time_budget_minutes=8, step_timer=timer, folds=4,
                  patch_size=[32, 32, 32])


def test_folds_with_few_steps_each_are_advised_against_with_the_measured_reason():
    small, large = _plan(folds=5), _plan(minutes=6000, folds=5)

    def steps(plan):
        return plan.choices["schedule"].value["epochs"] * plan.choices["schedule"].value["steps_per_epoch"]

    assert steps(small) < FOLD_STEPS_ADVISED <= steps(large)
    advice = small.choices["folds_advice"]
    assert advice.value == "one network" and f"5 folds of {steps(small)} planned steps each in 60 min" in advice.reason
    assert "0.877" in advice.reason and "0.884" in advice.reason  # the measurement it rests on
    assert large.choices["folds_advice"].value == "folds"
    assert "folds_advice" not in _plan().choices  # a single run gets no advice about folds
    assert small.to_dict()["choices"]["folds_advice"]["value"] == "one network"  # plan.json carries it
