"""The house style a tool keeps: ruff (configured in pyproject.toml) finds nothing in the repository."""
import shutil
import subprocess
import sys

from process_helpers import REPO


def test_ruff_is_clean():
    command = [shutil.which("ruff")] if shutil.which("ruff") else [sys.executable, "-m", "ruff"]
    result = subprocess.run([*command, "check", "--no-cache", str(REPO)], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
