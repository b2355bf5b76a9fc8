"""Fault injection, bounded: ``train.py`` and ``evaluate.py`` killed with SIGKILL once in each phase
(cache writes, a checkpoint swap, inside an epoch, the bundle export, evaluation writes), each
restart continuing with ``--resume``; after every kill nothing half-written is trusted, and the run
ends with the uninterrupted run's history and evaluation. The harness is ``tests/fault_harness.py``;
``benchmarks/fault_injection.py`` runs it with many more kill points (its figures: docs/training.md,
"Fault injection")."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys

import fault_harness as fi
import pytest
from process_helpers import REPO, read_history, shared_cache_dir

import evaluate
import train


def test_a_failpoint_kills_the_program_with_the_file_complete_under_its_temporary_name(tmp_path):
    script = ("import sys; from segpipe.io import write_text; d = sys.argv[1]; "
              "write_text(d + '/a.txt', 'a'); write_text(d + '/b.txt', 'one'); write_text(d + '/b.txt', 'two')")
    env = {**os.environ, "PYTHONPATH": str(REPO), "SEGPIPE_FAILPOINT": "atomic_write@b.txt#2"}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, cwd=REPO, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert (tmp_path / "a.txt").read_text() == "a" and (tmp_path / "b.txt").read_text() == "one"
    [temporary] = tmp_path.glob(".b.*.tmp.txt")
    assert temporary.read_text() == "two"


@pytest.fixture(scope="module")
def reference_evaluation(uninterrupted_run):
    assert evaluate.main([str(uninterrupted_run), "--no-report", "--workers", "1"]) == 0
    return uninterrupted_run / "evaluation" / "per_case.csv"


def test_killed_in_every_phase_the_run_resumes_to_the_uninterrupted_result(
        crash_overrides, uninterrupted_run, reference_evaluation, tmp_path, tmp_path_factory):
    cache, out = tmp_path / "cache", tmp_path / "out"
    overrides = [*(o for o in crash_overrides if not o.startswith("data.cache_dir=")), f"data.cache_dir={cache}",
                 "data.preprocess_workers=1", f"train.checkpoint_every_steps={fi.EVERY}", "train.export_bundle=true"]
    reference = fi.Reference(read_history(uninterrupted_run), shared_cache_dir(tmp_path_factory), reference_evaluation)
    points = [
        fi.KillPoint(fi.PREPROCESSING, failpoint="atomic_write@label.npy#3"),  # case 3: image.npy written, no meta
        fi.KillPoint(fi.SWAP, failpoint="checkpoint_swap#2"),  # epoch 1's end: only last.old/ and last.tmp/
        fi.KillPoint(fi.EPOCH, after=fi.mid_epoch_checkpoint, delay=(0.0, 0.4)),
        fi.KillPoint(fi.EXPORT, after=fi.exporting, delay=(0.0, 1.0)),
        fi.KillPoint(fi.EVALUATION, command="evaluate", failpoint="atomic_write@.nii.gz#2"),  # 1 of 2 predictions
    ]

    def finish_here(command):  # the last restarts run in this process (saves starting TensorFlow twice)
        if command == "train":
            code = train.main(fi.train_args(overrides, out)[1:])
        else:
            code = evaluate.main(fi.evaluate_args(out / "run", report=False, workers=1)[1:])
        return [] if code == 0 else [f"{command} after the last kill: exit {code}"]

    outcomes = fi.run_chain(points, overrides=overrides, output_dir=out, cache_dir=cache, reference=reference,
                            rng=random.Random(0), logs=tmp_path / "logs", report=False, workers=1,
                            finisher=finish_here)
    assert [o.killed for o in outcomes] == [True] * len(points), [(o.point.phase, o.landed) for o in outcomes]
    broken = [f"{o.point.phase} ({o.point.describe()}): {o.problems}" for o in outcomes if not o.held]
    assert not broken, "\n".join(broken)
    tried = {phase: n for phase, n, _ in fi.summarize(outcomes) if n}
    assert set(tried) >= {fi.PREPROCESSING, fi.SWAP, fi.EXPORT, fi.EVALUATION}  # the random epoch kill may land late
