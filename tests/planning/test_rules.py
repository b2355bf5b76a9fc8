"""The planning rules on synthetic fingerprints, each result derived by hand in the comments."""
import numpy as np
import pytest

from segpipe.planning import network, rules
from segpipe.planning.plan import Hardware
from segpipe.planning.planner import make_plan
from segpipe.planning.time_plan import MARGIN_SECONDS, MIN_TOTAL_STEPS, RUN_MARGIN_SECONDS

GIB = 2**30


def fingerprint(spacings, shapes, channels=("MRI",), fractions=(0.9, 0.1)):
    cases = {f"case_{i:03d}": {"spacing_mm": list(map(float, sp)), "shape": list(sh), "cropped_shape": list(sh)}
             for i, (sp, sh) in enumerate(zip(spacings, shapes))}
    return {"dataset": "synthetic", "key": "k", "cases": cases, "channel_names": list(channels),
            "intensity": [{} for _ in channels],
            "classes": {str(v): {"voxel_fraction": f, "cases_present": len(cases)} for v, f in enumerate(fractions)}}


# ------------------------------------------------------------------ target spacing


def test_spacing_isotropic_is_the_median():
    spacings = [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [0.9, 1.1, 1.0]]
    choice = rules.plan_target_spacing(np.array(spacings), np.array([[40, 56, 40]] * 3))
    assert choice.value == [1.0, 1.0, 1.0]
    assert "median" in choice.reason and "anisotropy" not in choice.reason


def test_spacing_thick_slices_take_the_10th_percentile_of_the_coarse_axis():
    # z medians 4.0 mm (> 3 × 0.8) with 40 slices (40 × 3 < 320): the anisotropy rule applies;
    # the 10th percentile of [3, 3, 4, 4, 4, 4, 5, 5, 5, 5] is 3.0 (linear interpolation at index 0.9).
    z = [3, 3, 4, 4, 4, 4, 5, 5, 5, 5]
    spacings = np.array([[0.8, 0.8, s] for s in z])
    choice = rules.plan_target_spacing(spacings, np.array([[320, 320, 40]] * 10))
    assert choice.value == pytest.approx([0.8, 0.8, 3.0])
    assert "10th percentile" in choice.reason and "z" in choice.reason


def test_spacing_thick_slices_with_many_slices_keep_the_median():
    # same spacings, but z has 400 slices (400 × 3 > 320): not "few slices", the median 4.0 stays
    spacings = np.array([[0.8, 0.8, s] for s in [3, 3, 4, 4, 4, 4, 5, 5, 5, 5]])
    assert rules.plan_target_spacing(spacings, np.array([[320, 320, 400]] * 10)).value == pytest.approx([0.8, 0.8, 4.0])


def test_spacing_coarse_axis_never_finer_than_the_others():
    # 10th percentile of z = 0.5 mm < 0.8 mm in-plane: clamped to 0.8 mm (+1e-5)
    spacings = np.array([[0.8, 0.8, s] for s in [0.5] * 2 + [4.0] * 8])
    value = rules.plan_target_spacing(spacings, np.array([[320, 320, 40]] * 10)).value
    assert value[2] == pytest.approx(0.8 + 1e-5)


# ------------------------------------------------------------------ topology


def test_topology_isotropic_40x56x40():
    # 40,56,40 -> 20,28,20 -> 10,14,10 -> 5,7,5 (no axis >= 8 left): 3 pools per axis, 4 stages
    t = network.pool_and_kernels([40, 56, 40], [1.0, 1.0, 1.0])
    assert t.strides == ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2))
    assert t.kernel_sizes == ((3, 3, 3),) * 4
    assert t.pools_per_axis == (3, 3, 3) and t.divisor == (8, 8, 8)
    assert t.patch_size == (40, 56, 40)
    assert t.stage_shapes() == [(40, 56, 40), (20, 28, 20), (10, 14, 10), (5, 7, 5)]


def test_topology_thick_slices_0_8x0_8x3():
    # z spacing 3.75× the finest: stage 0 kernel 3×3×1 and only x, y pool (64,64,16 -> 32,32,16;
    # spacing 1.6,1.6,3: now within 2×). Then all pool twice (16,16,8 -> 8,8,4) and z stops (< 8 voxels);
    # x, y pool once more to 4,4,4 (two axes left, so >= 8 suffices). 5 stages.
    t = network.pool_and_kernels([64, 64, 16], [0.8, 0.8, 3.0])
    assert t.strides == ((1, 1, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2), (2, 2, 1))
    assert t.kernel_sizes == ((3, 3, 1), (3, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3))
    assert t.pools_per_axis == (4, 4, 2) and t.patch_size == (64, 64, 16)


def test_topology_kernel_stays_1_while_the_axis_is_more_than_2x_coarser():
    # 0.5×0.5×3 mm: ratio 6 -> 3 -> 1.5: kernels 1 along z in stages 0 and 1, 3 from stage 2
    t = network.pool_and_kernels([128, 128, 32], [0.5, 0.5, 3.0])
    assert [k[2] for k in t.kernel_sizes[:3]] == [1, 1, 3]
    assert t.strides[1] == (2, 2, 1) and t.strides[2] == (2, 2, 1) and t.strides[3] == (2, 2, 2)


def test_topology_single_axis_needs_12_voxels():
    # 8,8,20 at 1,1,1: all pool -> 4,4,10; now only z is >= 8 but < 12: stop. 2 stages.
    t = network.pool_and_kernels([8, 8, 20], [1.0, 1.0, 1.0])
    assert t.strides == ((1, 1, 1), (2, 2, 2))
    # 8,8,24 -> 4,4,12: z alone has 12 >= 12 voxels: pools once more
    assert network.pool_and_kernels([8, 8, 24], [1.0, 1.0, 1.0]).strides[-1] == (1, 1, 2)


def test_topology_pads_to_the_divisor_and_caps_stages():
    t = network.pool_and_kernels([37, 50, 35], [1.0, 1.0, 1.0])
    # 37 -> 19 -> 10 -> 5; 50 -> 25 -> 13 -> 7; 35 -> 18 -> 9 -> 5: 3 pools, padded to multiples of 8
    assert t.patch_size == (40, 56, 40)
    capped = network.pool_and_kernels([256, 256, 256], [1.0, 1.0, 1.0], max_stages=4)
    assert capped.num_stages == 4 and capped.kernel_sizes[-1] == (3, 3, 3)


def test_tiny_volumes_smaller_than_any_patch():
    # 12×10×6: x, y pool once (6×5×6), then nothing has 8 voxels: 2 stages, patch = the volume
    fp = fingerprint([[1, 1, 1]] * 4, [[12, 10, 6]] * 4)
    plan = make_plan(fp, hardware=Hardware("cpu", 4 * GIB))
    assert plan.choices["patch_size"].value == [12, 10, 6]
    assert plan.choices["strides"].value == [[1, 1, 1], [2, 2, 1]]
    assert plan.choices["kernel_sizes"].value == [[3, 3, 3], [3, 3, 3]]
    assert plan.choices["stages"].value == 2
    # 6×6×6: no axis can pool: a single stage
    tiny = make_plan(fingerprint([[1, 1, 1]] * 3, [[6, 6, 6]] * 3), hardware=Hardware("cpu", 4 * GIB))
    assert tiny.choices["patch_size"].value == [6, 6, 6] and tiny.config["model.depth"] == 1


# ------------------------------------------------------------------ memory estimate


def test_activation_units_by_hand():
    t = network.pool_and_kernels([40, 56, 40], [1.0, 1.0, 1.0])
    spec = network.unet_spec(t, in_channels=1, num_classes=3, base=16)
    assert spec.features == (16, 32, 64, 128)
    v = [40 * 56 * 40, 20 * 28 * 20, 10 * 14 * 10, 5 * 7 * 5]
    expected = (v[0] * 1  # input
                + 2 * (v[0] * 16 + v[1] * 32 + v[2] * 64 + v[3] * 128)  # two convs per encoder stage
                + (1 + 2 + 2) * (v[0] * 16 + v[1] * 32 + v[2] * 64)  # up-conv, concat (2×), two convs
                + 2 * v[0] * 3)  # logits and softmax
    assert network.activation_units(t, spec) == expected == 13_843_200
    memory = network.estimate_training_memory(t, spec, 2)
    assert memory == (2 * expected * 4 * network.TENSORS_PER_UNIT + 16 * network.parameter_count(t, spec)
                      + network.FIXED_OVERHEAD_BYTES)


def test_parameter_count_matches_keras(tmp_path):
    pytest.importorskip("keras")
    from segpipe.models.unet3d import build_unet3d

    t = network.pool_and_kernels([64, 64, 16], [0.8, 0.8, 3.0])
    spec = network.unet_spec(t, 2, 3, base=8)
    model = build_unet3d(2, 3, depth=t.num_stages, base_filters=8, strides=t.strides,
                         kernel_sizes=t.kernel_sizes, norm="none")
    biases = sum(int(np.prod(w.shape)) for w in model.weights if w.path.endswith("bias"))
    # parameter_count neglects biases (and the transposed convolutions' are the only extra ones)
    assert model.count_params() - biases == network.parameter_count(t, spec)


# ------------------------------------------------------------------ patch under a memory budget


def test_patch_shrinks_along_the_axis_most_out_of_proportion():
    # median 80×64×16 at 0.8×0.8×3: start 80×64×16 (pools 4,4,2; divisor 16,16,4).
    spacing, median = [0.8, 0.8, 3.0], [80, 64, 16]
    kwargs = dict(in_channels=1, num_classes=2, base_features=8)

    def estimate(patch):
        t = network.pool_and_kernels(patch, spacing)
        return network.estimate_training_memory(t, network.unet_spec(t, 1, 2, base=8), 2)

    unshrunk = network.fit_patch(spacing, median, budget_bytes=estimate([80, 64, 16]), **kwargs)
    assert unshrunk.topology.patch_size == (80, 64, 16) and unshrunk.shrunk == ()
    # one byte less: the ratios patch/median are all 1, x comes first: 80 - 16 = 64
    one = network.fit_patch(spacing, median, budget_bytes=estimate([80, 64, 16]) - 1, **kwargs)
    assert one.topology.patch_size == (64, 64, 16) and one.shrunk == ((0, 64),)
    # below that: ratios 0.8, 1, 1 -> y. 64 - 16 = 48 would pool y only 3 times (divisor 8), so y
    # steps by 8 instead of 16 (no valid size skipped): 56.
    two = network.fit_patch(spacing, median, budget_bytes=estimate([64, 64, 16]) - 1, **kwargs)
    assert two.topology.patch_size == (64, 56, 16)
    assert two.topology.strides[-1] == (2, 2, 2) and two.topology.pools_per_axis == (3, 3, 2)
    assert "shrunk along xy" in two.reason and two.memory_bytes <= estimate([64, 64, 16]) - 1
    with pytest.raises(ValueError,
                       match=r"Expected a memory budget that a patch of at least one voxel per axis fits "
                             r".*Received: memory budget="):
        network.fit_patch(spacing, median, budget_bytes=1000, **kwargs)


def test_one_huge_volume():
    fp = fingerprint([[0.7, 0.7, 0.7]], [[512, 512, 512]])
    budget = 4 * GIB
    plan = make_plan(fp, hardware=Hardware("cpu", budget))
    patch = plan.choices["patch_size"].value
    assert plan.predicted["memory_bytes"] <= budget
    # isotropic: the shrinking keeps the patch near-cubic (axes differ by at most one divisor step)
    assert max(patch) - min(patch) <= 32
    assert all(s % 2 ** (plan.choices["stages"].value - 1) == 0 for s in patch)
    # 256³ shrinks x, y, z in turn by 32 (the divisor of 5 pools) down to 128³, then by 16 (4 pools):
    # 96 -> 48 -> 24 -> 12 -> 6 pools 4 times, 5 stages
    assert patch == [96, 96, 96] and plan.choices["stages"].value == 5
    t = network.pool_and_kernels([96, 96, 112], [0.7] * 3)  # the patch before the last step did not fit
    assert network.estimate_training_memory(t, network.unet_spec(t, 1, 2, base=16), 2) > budget
    # one case of 512³ is hundreds of patches: validate on patches, whole volumes only at the end
    assert plan.config["data.validation"] == "patches"
    assert plan.choices["batch_size"].value == 2


# ------------------------------------------------------------------ batch


def test_batch_size_memory_bound_and_5_percent_cap():
    t = network.pool_and_kernels([40, 56, 40], [1.0, 1.0, 1.0])
    spec = network.unet_spec(t, 1, 3, base=32)
    per_sample = network.activation_units(t, spec) * 4 * network.TENSORS_PER_UNIT
    fixed = 16 * network.parameter_count(t, spec) + network.FIXED_OVERHEAD_BYTES
    budget = 8 * GIB
    by_memory = int((budget - fixed) // per_sample)  # largest b with b × per_sample + fixed <= budget

    def memory(b):
        return network.estimate_training_memory(t, spec, b)

    voxels = 40 * 56 * 40
    big = rules.plan_batch_size(memory, budget, patch_voxels=voxels, dataset_voxels=voxels * 10_000)
    assert big.value == by_memory and "fits" in big.reason
    # 20 cases of one patch each: 5 % of 20 patches is 1 -> the minimum 2
    small = rules.plan_batch_size(memory, budget, patch_voxels=voxels, dataset_voxels=voxels * 20)
    assert small.value == 2
    # 200 cases: round(200 × 0.05) = 10
    assert rules.plan_batch_size(memory, budget, patch_voxels=voxels, dataset_voxels=voxels * 200).value == 10
    # a hardware cap
    assert rules.plan_batch_size(memory, budget, patch_voxels=voxels, dataset_voxels=voxels * 1e4,
                                 max_batch=2).value == 2
    # never below 2, even when 2 does not fit
    assert rules.plan_batch_size(memory, memory(1), patch_voxels=voxels, dataset_voxels=voxels * 1e4).value == 2


def test_gpu_plan_uses_nnunet_width_and_larger_batches():
    fp = fingerprint([[1, 1, 1]] * 200, [[40, 56, 40]] * 200)
    plan = make_plan(fp, hardware=Hardware("gpu", 8 * GIB))
    assert plan.choices["features"].value == [32, 64, 128, 256]
    assert plan.choices["patch_size"].value == [40, 56, 40]
    assert plan.choices["batch_size"].value == 10  # round(200 × 0.05): the 5 % cap binds before memory
    assert "5%" in plan.choices["batch_size"].reason


# ------------------------------------------------------------------ data choices


def test_two_channels_ct_and_mr():
    fp = fingerprint([[1, 1, 1]] * 5, [[40, 40, 40]] * 5, channels=("CT", "T2"))
    plan = make_plan(fp, hardware=Hardware("cpu", 4 * GIB))
    assert plan.config["data.normalization"] == ["ct", "zscore"]
    assert "CT: ct" in plan.choices["normalization"].reason and "T2: zscore" in plan.choices["normalization"].reason
    # the input has 2 channels: it counts twice in the activation units
    t = network.pool_and_kernels([40, 40, 40], [1, 1, 1])
    one = network.activation_units(t, network.unet_spec(t, 1, 2, base=16))
    assert plan.predicted["activation_units"] == one + 40 * 40 * 40


def test_single_mr_channel_is_zscore_and_defaults():
    plan = make_plan(fingerprint([[1, 1, 1]] * 5, [[32, 32, 32]] * 5), hardware=Hardware("cpu", 4 * GIB))
    assert plan.config["data.normalization"] == "zscore"
    assert plan.config["data.foreground_fraction"] == 0.33
    assert [t["name"] for t in plan.config["loss"]["terms"]] == ["dice", "ce"]


# ------------------------------------------------------------------ time budget


def test_schedule_by_hand():
    # available 3600 - 300 - 120 = 3180 s; steps min(250, ceil(9 × 20 / 0.5) = 360) = 250;
    # an epoch 250 × 0.5 + 20 = 145 s; floor(3180 / 145) = 21 epochs
    s = rules.plan_schedule(budget_minutes=60, step_seconds=0.5, validation_seconds=20, final_seconds=300,
                            overhead_seconds=120)
    assert s.value == {"epochs": 21, "steps_per_epoch": 250}
    # available 600 - 60 - 120 = 420 s; 135 steps (ceil(270 / 2)) give 300-s epochs: 1 < 4 epochs, so
    # steps = floor((420 / 4 - 30) / 2) = 37 and epochs = floor(420 / 104) = 4
    s = rules.plan_schedule(budget_minutes=10, step_seconds=2, validation_seconds=30, final_seconds=60,
                            overhead_seconds=120)
    assert s.value == {"epochs": 4, "steps_per_epoch": 37}
    with pytest.raises(ValueError,
                       match=r"Expected at least .* minutes for one step, one validation and the final evaluation. "
                             r"Received: train.time_budget_minutes="):
        rules.plan_schedule(budget_minutes=1, step_seconds=5, validation_seconds=30, final_seconds=60)


def test_inference_settings_by_hand():
    # 80×80×80 with 40³ windows: overlap 0.5 -> step 20 -> 3 windows per axis = 27 windows
    assert rules.sliding_windows([80, 80, 80], [40, 40, 40], 0.5) == 27
    assert rules.sliding_windows([80, 80, 80], [40, 40, 40], 0.0) == 8
    assert rules.sliding_windows([30, 30, 30], [40, 40, 40], 0.5) == 1
    # 10 cases × 27 windows × 0.1 s = 27 s per mirroring pass; a 100-s budget allows 2 passes (1 axis)
    overlap, mirror, cost = rules.plan_inference(median_shape=[80] * 3, patch=[40] * 3, num_cases=10,
                                                 window_seconds=0.1, budget_seconds=100)
    assert overlap.value == 0.5 and mirror.value == [0] and cost == pytest.approx(54)


def flop_timer(gflops_per_second=20.0):
    """A fake step timer: seconds = FLOPs / rate, for the network the keys describe."""
    calls = []

    def timer(keys):
        t = network.pool_and_kernels(keys["data.patch_size"], keys["data.target_spacing_mm"],
                                     max_stages=keys["model.depth"])
        spec = network.unet_spec(t, keys["_in_channels"], keys["_num_classes"], base=keys["model.base_filters"])
        flops = keys["data.batch_size"] * network.training_flops(t, spec)
        calls.append(keys["data.patch_size"])
        return {"step_seconds": flops / (gflops_per_second * 1e9),
                "window_seconds": flops / 6 / (gflops_per_second * 1e9),
                "peak_bytes": 1, "baseline_bytes": 0}

    return timer, calls


def test_time_budget_schedule_fits_and_shrinks_the_patch():
    fp = fingerprint([[0.8, 0.8, 3.0]] * 20, [[256, 256, 48]] * 20)
    timer, calls = flop_timer()
    budget = 30
    plan = make_plan(fp, hardware=Hardware("cpu", 8 * GIB), time_budget_minutes=budget, step_timer=timer)
    assert calls[0] == [32, 32, 32] and len(calls) == 2  # the reference network, then the planned one
    # predicted = measured (the fake timer is exactly FLOP-proportional)
    assert plan.predicted["step_seconds"] == pytest.approx(plan.measured["step_seconds"])
    sched = plan.choices["schedule"].value
    # the schedule costs a loop step as the isolated step × 1.1 + 0.15 s (loader, bookkeeping)
    step = plan.measured["step_seconds"] * 1.1 + 0.15
    assert plan.predicted["loop_step_seconds"] == pytest.approx(step)
    val, final = plan.predicted["validation_seconds"], plan.predicted["final_evaluation_seconds"]
    used = sched["epochs"] * (sched["steps_per_epoch"] * step + val) + final + RUN_MARGIN_SECONDS
    assert used <= budget * 60 < used + sched["steps_per_epoch"] * step + val  # fits; one more epoch would not
    # the memory-fitted patch was too slow for 1000 steps in the budget: the time rule shrank it further
    untimed = make_plan(fp, hardware=Hardware("cpu", 8 * GIB))
    assert np.prod(plan.choices["patch_size"].value) < np.prod(untimed.choices["patch_size"].value)
    train_seconds = budget * 60 * 0.85 - MARGIN_SECONDS
    assert plan.measured["step_seconds"] * MIN_TOTAL_STEPS <= train_seconds
    assert plan.config["train.epochs"] == sched["epochs"] and "inference.mirror_axes" in plan.config
    assert all(key in plan.table() for key in ("schedule", "inference_overlap", "inference_mirror_axes"))


def test_resenc_activation_units_by_hand():
    t = network.pool_and_kernels([40, 56, 40], [1.0, 1.0, 1.0])
    spec = network.unet_spec(t, 1, 3, base=16, blocks_per_stage=[1, 3, 4, 6, 6])
    v, f, b = [89600, 11200, 1400, 175], [16, 32, 64, 128], [1, 3, 4, 6]
    # per stage: 2 convs per block + stem/projection, + 1 kept sum per block; decoder: 1 conv per stage
    expected = (v[0] + sum((3 * b[s] + 1) * v[s] * f[s] for s in range(4)) + sum(4 * v[s] * f[s] for s in range(3))
                + 6 * v[0])
    assert network.activation_units(t, spec) == expected
    with pytest.raises(ValueError, match="Expected a block count for each of 4 stages"):
        network.unet_spec(t, 1, 3, base=16, blocks_per_stage=[1, 3])


def test_a_step_slower_than_predicted_re_plans_with_the_measured_rate():
    fp = fingerprint([[0.8, 0.8, 3.0]] * 20, [[256, 256, 48]] * 20)
    fast, _ = flop_timer(20.0)
    slow, _ = flop_timer(10.0)  # the planned networks run at half the reference's FLOP rate

    def timer(keys):
        return fast(keys) if keys["data.patch_size"] == [32, 32, 32] and keys["model.depth"] == 4 else slow(keys)

    plan = make_plan(fp, hardware=Hardware("cpu", 8 * GIB), time_budget_minutes=30, step_timer=timer)
    attempts = plan.measured["attempts"]
    max_step = (30 * 60 * 0.85 - MARGIN_SECONDS) / MIN_TOTAL_STEPS
    assert len(attempts) == 2
    assert attempts[0]["step_seconds"] == pytest.approx(2 * attempts[0]["predicted_step_seconds"])
    assert attempts[0]["step_seconds"] > 1.1 * max_step
    assert attempts[1]["step_seconds"] == pytest.approx(attempts[1]["predicted_step_seconds"])
    assert attempts[1]["step_seconds"] <= max_step
    assert np.prod(attempts[1]["patch_size"]) < np.prod(attempts[0]["patch_size"])
    assert plan.measured["step_seconds"] == attempts[1]["step_seconds"]
