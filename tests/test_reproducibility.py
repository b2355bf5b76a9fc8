"""Reproducibility: the run directory records what made the run, and two runs with the same config
and seed (two processes, TensorFlow op determinism on) give the same history."""
from __future__ import annotations

import json
import re

import pytest
import yaml
from process_helpers import TRAIN, running, shared_cache_dir, start, wait_until
from tiny_runs import tiny_run_overrides

from segpipe.training.run_info import PROJECT_ROOT

TIMEOUT = 240


@pytest.fixture(scope="module")
def two_runs(phantom_root, tmp_path_factory):
    """The same config and seed trained twice, in two processes, into two run directories.

    The second process starts once the first has filled the shared data cache (its run directory
    says "running"), so its TensorFlow start and tracing overlap the first one's training; neither
    writes a bundle (export has its own tests, and is not part of the history)."""
    out = tmp_path_factory.mktemp("repro")
    overrides = tiny_run_overrides(phantom_root, out, f"data.cache_dir={shared_cache_dir(tmp_path_factory)}",
                                   "data.preprocess_workers=2", "train.deterministic=true", "seed=7")
    first = start([str(TRAIN), "--set", *overrides, "name=first"], out / "first.log")
    with running(first):
        try:
            wait_until(lambda: (out / "first" / "status.json").is_file(), TIMEOUT, "the first run to start training",
                       (first,))
        except (TimeoutError, RuntimeError) as exc:
            raise AssertionError(f"{exc}\n{(out / 'first.log').read_text()[-3000:]}") from None
        with running(start([str(TRAIN), "--set", *overrides, "name=second"], out / "second.log")) as (second,):
            for proc, name in ((first, "first"), (second, "second")):
                assert proc.wait(timeout=TIMEOUT) == 0, (out / f"{name}.log").read_text()[-3000:]
    return out / "first", out / "second"


def test_same_config_and_seed_give_the_same_history(two_runs):
    first, second = two_runs
    history = (first / "history.csv").read_text()
    assert history.count("\n") == 3  # header + 2 epochs
    assert history == (second / "history.csv").read_text()  # identical to the printed digit


def test_run_info_records_seed_config_split_versions_and_commit(two_runs):
    run_dir = two_runs[0]
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["seed"] == 7 and info["deterministic"] is True
    assert info["config"] == yaml.safe_load((run_dir / "config.yaml").read_text())
    split = json.loads((run_dir / "splits.json").read_text())
    assert info["split"] == {"train": split["train"], "val": split["val"]}
    assert info["distribution"] == {"strategy": "none", "num_replicas": 1, "num_workers": 1, "global_batch": 2,
                                    "per_replica_batch": 2, "sync_batch_norm": False, "precision": "float32"}
    packages = info["environment"]["packages"]
    assert packages["tensorflow"] and packages["keras"] and packages["numpy"] and packages["segpipe"]
    git = info["environment"]["git"]
    if (PROJECT_ROOT / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}", git["commit"]) and isinstance(git["dirty"], bool)
    else:
        assert git is None
    assert info["resumes"] == []
