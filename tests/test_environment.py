"""segpipe switches TensorFlow's oneDNN kernels on before TensorFlow loads, unless the user chose."""
import os
import subprocess
import sys

import pytest

PROBE = "import segpipe, os; print(os.environ['TF_ENABLE_ONEDNN_OPTS'])"


@pytest.mark.parametrize("user_value, expected", [(None, "1"), ("0", "0"), ("1", "1")])
def test_onednn_default_and_the_users_setting_wins(user_value, expected):
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    if user_value is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = user_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


def test_the_suite_runs_with_the_same_setting_as_training():
    # conftest imports segpipe first, so the tests train with the kernels users get
    assert os.environ["TF_ENABLE_ONEDNN_OPTS"] == "1"
