"""The mirroring rule: mirror only along axes where no two foreground classes lie in a fixed order."""
import json

import numpy as np
import pytest

from segpipe.data.fingerprint import class_positions
from segpipe.planning.rules import plan_mirror_axes

RAS = np.array([[0, 1], [1, 1], [2, 1]])


def test_positions_by_hand():
    label = np.zeros((10, 4, 6), np.uint8)
    label[0:2, :, :] = 1  # x voxels 0-1 of a 10-voxel box: centroid 0.5 -> (0.5 + 0.5) / 10
    label[8:10, 0:2, 3:6] = 2  # x (8.5 + 0.5) / 10, y (0.5 + 0.5) / 4, z (4 + 0.5) / 6
    positions = class_positions(label, RAS)
    assert positions == {1: [0.1, 0.5, 0.5], 2: [0.9, 0.25, 0.75]}


def test_positions_follow_the_orientation_to_ras():
    label = np.zeros((10, 4, 6), np.uint8)
    label[0:2] = 1
    label[8:10] = 2
    # source axis 0 is RAS y, flipped; source axis 1 is RAS x; axis 2 stays z
    ornt = np.array([[1, -1], [0, 1], [2, 1]])
    assert class_positions(label, ornt) == {1: [0.5, 0.9, 0.5], 2: [0.5, 0.1, 0.5]}


def test_all_background_has_no_positions():
    assert class_positions(np.zeros((4, 4, 4), np.uint8), RAS) == {}


def _cases(rows):
    # through JSON, as the fingerprint file stores them (class keys become strings)
    return json.loads(json.dumps({f"c{i}": {"class_positions": p} for i, p in enumerate(rows)}))


def test_hippocampus_like_layout_mirrors_only_along_x():
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(40):  # anterior before posterior along y (0.3 vs 0.7), and along z by a smaller gap
        jitter = rng.normal(0, 0.03, size=(2, 3))
        rows.append({1: (np.array([0.5, 0.3, 0.4]) + jitter[0]).tolist(),
                     2: (np.array([0.5, 0.7, 0.6]) + jitter[1]).tolist()})
    choice = plan_mirror_axes(_cases(rows), {"1": "Anterior", "2": "Posterior"})
    assert choice.value == [0]
    assert "y: Anterior before Posterior" in choice.reason and "z: Anterior before Posterior" in choice.reason


def test_order_must_hold_in_nine_of_ten_cases():
    # the gap is large, but in 2 of 10 cases the classes lie the other way round: no fixed order
    rows = [{1: [0.5, 0.2, 0.5], 2: [0.5, 0.8, 0.5]}] * 8 + [{1: [0.5, 0.8, 0.5], 2: [0.5, 0.2, 0.5]}] * 2
    assert plan_mirror_axes(_cases(rows)).value == [0, 1, 2]
    rows = [{1: [0.5, 0.2, 0.5], 2: [0.5, 0.8, 0.5]}] * 9 + [{1: [0.5, 0.8, 0.5], 2: [0.5, 0.2, 0.5]}]
    assert plan_mirror_axes(_cases(rows)).value == [0, 2]


def test_small_gaps_do_not_fix_an_order():
    rows = [{1: [0.5, 0.45, 0.5], 2: [0.5, 0.55, 0.5]}] * 10  # always before, but by 0.10 < 0.15
    assert plan_mirror_axes(_cases(rows)).value == [0, 1, 2]


@pytest.mark.parametrize("rows", [
    [{1: [0.5, 0.5, 0.5]}] * 5,  # one foreground class
    [{}] * 3,  # all-background cases
    [{1: [0.5, 0.5, 0.5], 2: [0.52, 0.49, 0.5]}] * 5,  # a lesion inside an organ: same centre
])
def test_every_axis_without_an_ordered_pair(rows):
    assert plan_mirror_axes(_cases(rows)).value == [0, 1, 2]


def test_an_old_fingerprint_without_positions_mirrors_every_axis():
    choice = plan_mirror_axes({"c0": {"class_voxels": {"0": 5}}})
    assert choice.value == [0, 1, 2] and "no class positions" in choice.reason


def test_test_time_mirroring_uses_only_the_trained_axes():
    from segpipe.planning.rules import plan_inference
    # 10 cases × 27 windows × 0.1 s = 27 s per pass: 4 passes (2 axes) would fit 110 s, but only x is allowed
    overlap, mirror, cost = plan_inference(median_shape=[80] * 3, patch=[40] * 3, num_cases=10,
                                           window_seconds=0.1, budget_seconds=110, mirror_axes=[0])
    assert overlap.value == 0.5 and mirror.value == [0] and cost == pytest.approx(54)


def test_the_plan_mirrors_along_the_rule_axes_and_limits_training_time():
    from segpipe.planning.plan import Hardware
    from segpipe.planning.planner import make_plan
    from segpipe.planning.time_plan import RUN_MARGIN_SECONDS
    from tests.planning.test_rules import GIB, fingerprint, flop_timer

    fp = fingerprint([[1.0, 1.0, 1.0]] * 20, [[40, 56, 40]] * 20, fractions=(0.9, 0.05, 0.05))
    for case in fp["cases"].values():  # class 1 before class 2 along y in every case
        case["class_positions"] = {"1": [0.5, 0.25, 0.5], "2": [0.5, 0.75, 0.5]}
    timer, _ = flop_timer()
    plan = make_plan(fp, hardware=Hardware("cpu", 8 * GIB), time_budget_minutes=30, step_timer=timer)
    assert plan.config["data.augment.mirror.axes"] == [0, 2]
    assert set(plan.config["inference.mirror_axes"]) <= {0, 2}
    final = plan.predicted["final_evaluation_seconds"]
    assert plan.config["train.max_train_minutes"] == pytest.approx(30 - (final + RUN_MARGIN_SECONDS) / 60, abs=0.01)
    assert "mirror_axes" in plan.table() and "time_limit" in plan.table()
