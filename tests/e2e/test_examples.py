"""The examples run as a user runs them."""

from __future__ import annotations

import subprocess
import sys


def test_plan_and_deploy_example_agrees_with_plaintext():
    done = subprocess.run(
        [sys.executable, "-m", "heclave.examples.plan_and_deploy"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "plaintext agrees on 100%" in done.stdout
    assert "best attack SSIM" in done.stdout and "plan: [" in done.stdout
