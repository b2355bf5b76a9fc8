"""One writer per run, cache entry and evaluation folder (segpipe.locks): live holders refuse or make wait,
stale locks of dead processes are taken over, and the commands use them."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from process_helpers import REPO, kill, running, wait_until

from segpipe.locks import LockHeldError, hold, lock_file, read_holder

DEAD_PID = 999_999_999  # above any pid_max: no such process
TIMEOUT = 60


def start_holder(folder: Path, log: Path, *, seconds: float = 120.0) -> subprocess.Popen:
    """A live process holding the lock of ``folder`` for ``seconds`` (then it releases and exits)."""
    code = textwrap.dedent(f"""
        import sys, time
        from segpipe.locks import hold
        with hold({str(folder)!r}, what="test folder"):
            print("held", flush=True)
            time.sleep({seconds})
    """)
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    try:
        wait_until(lambda: "held" in log.read_text(), TIMEOUT, "the holder to take the lock", procs=(proc,))
    except Exception:
        kill(proc)
        raise RuntimeError(log.read_text()) from None
    return proc


def write_lock(folder: Path, **fields) -> Path:
    path = lock_file(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": DEAD_PID, "host": socket.gethostname(), "since": "2026-01-01T00:00:00+00:00",
                                "command": "train.py", **fields}))
    return path


# ---------------------------------------------------------------- the lock itself


def test_the_lock_file_names_this_process_and_goes_on_exit_also_after_an_error(tmp_path):
    folder = tmp_path / "runs" / "x"
    with pytest.raises(RuntimeError, match="boom"):
        with hold(folder, what="run directory") as me:
            holder = read_holder(tmp_path / "runs" / ".x.lock")
            assert holder == me and holder.pid == os.getpid() and holder.host == socket.gethostname()
            assert holder.since.startswith("20") and holder.command
            raise RuntimeError("boom")
    assert not lock_file(folder).exists() and not folder.exists()  # the folder itself is not created
    with hold(folder, what="run directory"):  # free again
        pass


def test_a_lock_that_cannot_be_written_is_one_storage_error_naming_it(tmp_path):
    from segpipe.errors import StorageError

    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(StorageError, match=rf"Received: path={tmp_path / 'a_file' / 'runs' / '.x.lock'} "):
        with hold(tmp_path / "a_file" / "runs" / "x", what="run directory"):
            pass


def test_a_live_holder_refuses_a_second_process_at_once_naming_it(tmp_path):
    folder = tmp_path / "run"
    holder = start_holder(folder, tmp_path / "holder.log")
    with running(holder):
        began = time.monotonic()
        with pytest.raises(LockHeldError) as info:
            with hold(folder, what="run directory"):
                pass
        assert time.monotonic() - began < 2
        message = str(info.value)
        assert f"process {holder.pid} on host {socket.gethostname()} since " in message
        assert str(folder) in message and "Only one process writes a run directory" in message
        assert read_holder(lock_file(folder)).pid == holder.pid  # the refused process left it alone


def test_a_waiting_process_takes_the_lock_when_the_holder_releases_it(tmp_path, capsys):
    folder = tmp_path / "entry"
    holder = start_holder(folder, tmp_path / "holder.log", seconds=1.5)
    with running(holder):
        began = time.monotonic()
        with hold(folder, what="cache entry", wait_seconds=TIMEOUT, poll_seconds=0.2) as me:
            assert time.monotonic() - began > 1.0  # it waited for the holder's 1.5 s
            assert read_holder(lock_file(folder)) == me
        assert holder.wait(timeout=TIMEOUT) == 0  # which released the lock itself
    assert f"Waiting for process {holder.pid}" in capsys.readouterr().err


def test_waiting_is_bounded(tmp_path):
    folder = tmp_path / "entry"
    holder = start_holder(folder, tmp_path / "holder.log")
    with running(holder):
        began = time.monotonic()
        with pytest.raises(LockHeldError, match=r"Waited 0\.5 s"):
            with hold(folder, what="cache entry", wait_seconds=0.5, poll_seconds=0.1):
                pass
        assert time.monotonic() - began < 3


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_message(tmp_path, capsys):
    folder = tmp_path / "run"
    write_lock(folder)
    with hold(folder, what="run directory") as me:
        assert read_holder(lock_file(folder)) == me
    err = capsys.readouterr().err
    assert f"Taking over the lock of the run directory {folder} from process {DEAD_PID}" in err
    assert "which no longer runs" in err


def test_a_reused_process_id_does_not_keep_a_lock_alive(tmp_path, capsys):
    """The recorded start time of the holder differs from that of the process now under its id."""
    folder = tmp_path / "run"
    if not Path(f"/proc/{os.getpid()}/stat").is_file():
        pytest.skip("no /proc: process start times are not known here")
    write_lock(folder, pid=os.getppid(), start_ticks="1")  # the parent runs, but started later than tick 1
    with hold(folder, what="run directory"):
        pass
    assert "Taking over" in capsys.readouterr().err


def test_a_lock_of_another_host_is_never_taken_over(tmp_path):
    folder = tmp_path / "run"
    path = write_lock(folder, host="some-other-host")
    with pytest.raises(LockHeldError, match=rf"process {DEAD_PID} on host some-other-host .*delete {path} by hand"):
        with hold(folder, what="run directory"):
            pass
    assert path.is_file()


def test_a_lock_replaced_meanwhile_is_not_removed_by_the_first_holder(tmp_path):
    folder = tmp_path / "run"
    with hold(folder, what="run directory"):
        write_lock(folder, pid=os.getpid(), token="someone-else")  # e.g. taken over by mistake
    assert read_holder(lock_file(folder)).token == "someone-else"


def test_processes_racing_for_one_lock_hold_it_one_at_a_time(tmp_path):
    """O_CREAT | O_EXCL: of several processes starting together (and finding a stale lock), exactly one
    holds the lock at any time."""
    folder, log = tmp_path / "entry", tmp_path / "intervals.txt"
    write_lock(folder)  # all of them find a stale lock first
    code = textwrap.dedent(f"""
        import os, time
        from segpipe.locks import hold
        while not os.path.exists({str(tmp_path / 'go')!r}):
            time.sleep(0.01)
        with hold({str(folder)!r}, what="cache entry", wait_seconds=60, poll_seconds=0.05):
            begin = time.time(); time.sleep(0.2); end = time.time()
        with open({str(log)!r}, "a") as f:
            f.write(f"{{begin}} {{end}}\\n")
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for _ in range(4)]
    try:
        time.sleep(2)  # let them import
        (tmp_path / "go").touch()
        errors = [p.communicate(timeout=TIMEOUT)[1] for p in procs]
    finally:
        for p in procs:
            kill(p)
    assert all(p.returncode == 0 for p in procs), errors
    intervals = sorted(tuple(map(float, line.split())) for line in log.read_text().splitlines())
    assert len(intervals) == 4
    assert all(a[1] <= b[0] for a, b in zip(intervals, intervals[1:])), intervals
    assert sum("Taking over" in e for e in errors) == 1  # one took the stale lock over; the others waited
    assert not lock_file(folder).exists()


# ---------------------------------------------------------------- where the commands use it


def _fake_run(tmp_path: Path, tiny_overrides: list[str], name: str = "held") -> Path:
    """A run directory with its config (enough for train.py --resume and evaluate.py to start)."""
    from segpipe.config import load_config
    from segpipe.runs.rundir import RunDir

    config = load_config(None, [*tiny_overrides, f"name={name}"])
    run = RunDir.of(config)
    run.create()
    run.write_config(config)
    run.write_status("interrupted")
    return run.path


def test_resume_of_a_run_still_training_exits_at_once_naming_the_holder(tmp_path, tiny_overrides, capsys):
    import train

    run_dir = _fake_run(tmp_path, tiny_overrides)
    before = {p: p.read_bytes() for p in run_dir.rglob("*")}
    holder = start_holder(run_dir, tmp_path / "holder.log")  # stands in for the training (same lock)
    with running(holder):
        began = time.monotonic()
        assert train.main(["--resume", str(run_dir)]) == 1
        assert time.monotonic() - began < 30  # TensorFlow's start; no data is read
    err = capsys.readouterr().err
    assert f"locked by process {holder.pid} on host {socket.gethostname()}" in err
    assert {p: p.read_bytes() for p in run_dir.rglob("*")} == before  # nothing written
    assert not (tmp_path / "runs" / ".cache").exists()  # the data cache was not touched


def test_a_real_training_holds_its_run_and_a_second_train_py_is_refused(tmp_path, tiny_overrides, tmp_path_factory,
                                                                       capsys):
    """``train.py`` in another process, mid-training: ``--resume``, a second ``train.py`` and ``--overwrite`` of
    the run exit at once naming it (its pid, also in status.json); the training is not disturbed."""
    from process_helpers import TRAIN, shared_cache_dir, start

    import train

    overrides = [*tiny_overrides, f"data.cache_dir={shared_cache_dir(tmp_path_factory)}", "name=live",
                 "train.epochs=1000", "train.steps_per_epoch=2"]  # trains until killed
    run_dir = tmp_path / "runs" / "live"
    training = start([str(TRAIN), "--set", *overrides, "--no-plan"], tmp_path / "training.log")
    with running(training):
        try:
            wait_until(lambda: (run_dir / "history.csv").is_file(), 240, "the training's first epoch", (training,))
        except (TimeoutError, RuntimeError) as exc:
            raise AssertionError(f"{exc}\n{(tmp_path / 'training.log').read_text()[-3000:]}") from None
        assert json.loads((run_dir / "status.json").read_text())["pid"] == training.pid
        for args in (["--resume", str(run_dir)], ["--set", *overrides, "--no-plan", "--resume"],
                     ["--set", *overrides, "--no-plan", "--overwrite"]):  # a live run is not deleted either
            began = time.monotonic()
            assert train.main(args) == 1
            assert time.monotonic() - began < 30
            err = capsys.readouterr().err
            assert f"locked by process {training.pid} on host {socket.gethostname()}" in err, err
        assert training.poll() is None  # still training
        assert (run_dir / "history.csv").is_file() and (run_dir / "config.yaml").is_file()


def test_status_json_names_the_training_process(tmp_path):
    from segpipe.runs.rundir import RunDir

    run = RunDir(tmp_path / "run")
    run.write_status("running")
    assert json.loads(run.status_json.read_text()) == {"status": "running", "pid": os.getpid(),
                                                        "host": socket.gethostname()}
    assert run.status() == "running"


def test_a_second_evaluation_of_a_run_exits_at_once_naming_the_first(tmp_path, tiny_overrides, capsys):
    import evaluate

    run_dir = _fake_run(tmp_path, tiny_overrides)
    holder = start_holder(run_dir / "evaluation", tmp_path / "holder.log")
    with running(holder):
        began = time.monotonic()
        assert evaluate.main([str(run_dir), "--workers", "1"]) == 1
        assert time.monotonic() - began < 30
    err = capsys.readouterr().err
    assert f"locked by process {holder.pid}" in err and err.count("\n") == 1
    assert not (run_dir / "predictions").exists() and not (run_dir / "evaluation").exists()


def test_evaluating_a_folder_that_is_no_run_creates_nothing(tmp_path, capsys):
    import evaluate

    assert evaluate.main([str(tmp_path / "typo"), "--workers", "1"]) == 1
    assert "Expected a run directory with config.yaml" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no folder made for a lock


def test_the_reference_link_is_replaced_in_one_step(tmp_path):
    from segpipe.evaluation.predictions import _link

    a, b = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    a.write_text("a")
    b.write_text("b")
    link = tmp_path / "refs" / "x.nii.gz"
    link.parent.mkdir()
    _link(link, a)
    _link(link, b)  # an existing link (another evaluation's) is no FileExistsError
    assert link.resolve() == b.resolve() and sorted(p.name for p in link.parent.iterdir()) == ["x.nii.gz"]


BUILD_LOGGED = """
import os, sys, time
from pathlib import Path
import segpipe.data.cache as cache
from segpipe.data.layouts import load_dataset
from segpipe.data.preprocess import PreprocessSettings

log, root, cache_dir, go = sys.argv[1:5]
build = cache._build_case
def logged(case, *args):
    with open(log, "a") as f:
        f.write(f"{os.getpid()} {case.case_id}\\n")
    time.sleep(0.3)  # so the two processes overlap
    return build(case, *args)
cache._build_case = logged
while not os.path.exists(go):
    time.sleep(0.01)
cached = cache.build_cache(load_dataset(root), cache_dir, PreprocessSettings(target_spacing_mm=(1.0, 1.0, 1.5)),
                           progress=False)
assert all(cache.load_cached_case(c.directory) is not None for c in cached)
print("ok", len(cached))
"""


def test_two_processes_build_each_cache_entry_once(tmp_path, phantom_root):
    """Two trainings on one dataset at once: each case is preprocessed by one of them, the other waits and
    reads it (before: a rebuild deleted the other's temporary files, FileNotFoundError)."""
    log, go = tmp_path / "built.txt", tmp_path / "go"
    args = [sys.executable, "-c", BUILD_LOGGED, str(log), str(phantom_root), str(tmp_path / "cache"), str(go)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for _ in range(2)]
    try:
        time.sleep(3)  # let both import
        go.touch()
        outputs = [p.communicate(timeout=TIMEOUT * 2) for p in procs]
    finally:
        for p in procs:
            kill(p)
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert all(out.strip() == "ok 6" for out, _ in outputs)
    built = [line.split() for line in log.read_text().splitlines()]
    assert sorted(case for _, case in built) == sorted({case for _, case in built}) and len(built) == 6
    assert not list((tmp_path / "cache").glob(".*.lock"))
