"""The command-line entry points live in the package: they run without the repository's scripts or configs."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import evaluate
import predict
import train
from segpipe.cli import evaluate as cli_evaluate
from segpipe.cli import predict as cli_predict
from segpipe.cli import train as cli_train


def test_scripts_are_thin_wrappers_of_the_package():
    assert (train.main, evaluate.main, predict.main) == (cli_train.main, cli_evaluate.main, cli_predict.main)


def test_console_scripts_work_outside_a_checkout(tmp_path):
    """The package alone (as a wheel installs it) runs train/evaluate; no default config is a clear error."""
    site = tmp_path / "site"
    shutil.copytree(Path(__file__).resolve().parents[1] / "segpipe", site / "segpipe",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = ("import importlib, sys; c = importlib.import_module('segpipe.cli.' + sys.argv[2]); "
            "assert c.__file__.startswith(sys.argv[1]), c.__file__; "
            "sys.argv[0] = 'segpipe-' + sys.argv[2]; sys.exit(c.main(sys.argv[3:]))")

    def run(*args):
        return subprocess.run([sys.executable, "-c", code, str(site), *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)

    for tool in ("train", "evaluate"):
        result = run(tool, "--help")
        assert result.returncode == 0 and f"usage: segpipe-{tool}" in result.stdout, result.stderr
    result = run("train")
    assert result.returncode == 2 and ("Expected --config FILE" in result.stderr
                                      and "Received: --config=<not given>, and neither file exists. " in result.stderr
                                      and "Pass --config" in result.stderr)
    result = run("evaluate", "--pred", "p", "--ref", "r")
    assert result.returncode == 1 and "segpipe-evaluate: error:" in result.stderr
