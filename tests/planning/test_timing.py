"""The real step timer: a tiny planned network timed in a subprocess."""
from segpipe.planning import network
from segpipe.planning.timing import time_steps


def test_time_steps_measures_a_tiny_anisotropic_network():
    t = network.pool_and_kernels([16, 16, 8], [0.8, 0.8, 3.0])
    keys = {"data.patch_size": list(t.patch_size), "data.batch_size": 2, "model.name": "resenc_unet",
            "model.depth": t.num_stages, "model.base_filters": 4, "model.strides": [list(s) for s in t.strides],
            "model.kernel_sizes": [list(k) for k in t.kernel_sizes],
            "model.blocks_per_stage": [1, 2, 2][: t.num_stages],
            "model.init": "he_normal", "_in_channels": 2, "_num_classes": 3}
    result = time_steps(keys, timeout=300)
    assert result["steps_timed"] == 3
    assert 0 < result["window_seconds"] and 0 < result["step_seconds"] < 60
    assert result["peak_bytes"] >= result["baseline_bytes"] > 0
    assert result["parameters"] > 0


def test_time_steps_in_a_mixed_precision():
    keys = {"data.patch_size": [16, 16, 16], "data.batch_size": 2, "model.name": "unet3d", "model.depth": 2,
            "model.base_filters": 4, "model.init": "he_normal", "_in_channels": 1, "_num_classes": 2,
            "train.precision": "mixed_float16"}  # loss scaling included
    result = time_steps(keys, timeout=300)
    assert result["precision"] == "mixed_float16" and 0 < result["step_seconds"] < 60
