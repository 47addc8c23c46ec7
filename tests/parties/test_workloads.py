"""Commands take their workload from ``--workload`` (digits by default): a workload of 4x4 noise images
(``tests/parties/tiny_workload.py``) through the real ``heclave plan``, ``heclave assess`` and ``heclave demo``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HECLAVE = str(Path(sys.executable).parent / "heclave")
TINY = f"{Path(__file__).with_name('tiny_workload.py')}:tiny"


def _heclave(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([HECLAVE, *args], capture_output=True, text=True, timeout=300)


def test_plan_trains_and_shapes_the_model_from_the_workload(tmp_path):
    done = _heclave("plan", "tiny-net", "--workload", TINY, "--json", "--calibration", str(tmp_path / "none.json"))
    assert done.returncode == 0, done.stderr[-2000:]
    plan = json.loads(done.stdout)
    assert plan["model"] == "tiny-net" and plan["input_shape"] == [1, 4, 4] and len(plan["placements"]) == 2


def test_assess_attacks_the_workloads_images_at_its_input_shape(tmp_path):
    figure = tmp_path / "assessment.png"
    done = _heclave(
        "assess", "tiny-net", "--workload", TINY, "--epochs", "1", "--steps", "2", "--json", "--figure", str(figure)
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["cuts"][0]["cut"] == "input" and report["cuts"][0]["feature_size"] == 16
    assert report["attacks"][0]["budget"]["training_images"] == 60
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_deploys_the_workloads_model_and_classifies_its_held_out_inputs():
    done = _heclave("demo", "--workload", TINY, "--samples", "3", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["samples"] == 3
    assert report["max_abs_logit_error"] < 1e-3 + 6 * report["release_noise_sd"]


def test_a_workload_that_does_not_exist_is_refused_by_name():
    done = _heclave("plan", "digits-cnn", "--workload", "heclave.workloads:nothing")
    assert done.returncode == 2 and "has no 'nothing'" in done.stderr and "Traceback" not in done.stderr
