"""The README's by-hand walkthrough, executed as written (ports moved to free ones)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from heclave.workloads import digits_cnn

README = Path(__file__).resolve().parents[2] / "README.md"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _walkthrough() -> str:
    text = README.read_text()
    section = text[text.index("## Running the parties by hand") :]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def test_readme_walkthrough_runs_and_agrees_with_plaintext(tmp_path):
    script = _walkthrough().replace("5555", str(_free_port())).replace("5556", str(_free_port()))
    bindir = Path(sys.executable).parent
    wrapped = f"set -euo pipefail\nexport PATH={bindir}:$PATH\ntrap 'kill $(jobs -p) 2>/dev/null' EXIT\n{script}"
    done = subprocess.run(["bash", "-c", wrapped], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    digits = np.load(tmp_path / "digits.npy")
    model = digits_cnn()
    model.load_state_dict(torch.load(tmp_path / "cnn.pt", weights_only=True))
    with torch.no_grad():
        reference = model.eval().double()(torch.from_numpy(digits).double()).numpy()
    assert len(results) == len(digits)
    got = np.array([r["logits"] for r in results])
    assert (got.argmax(1) == reference.argmax(1)).all()
    assert np.abs(got - reference).max() < 1e-3 * (reference.max() - reference.min())


def test_readme_first_program_runs_and_agrees_with_plaintext(tmp_path):
    text = README.read_text()
    section = text[text.index("## From Python") :]
    program = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    done = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    numbers = [float(v) for v in re.findall(r"-?\d+\.\d+(?:e[-+]\d+)?", done.stdout)]
    assert len(numbers) == 6, done.stdout
    encrypted, plaintext = np.array(numbers[:3]), np.array(numbers[3:])
    assert np.abs(encrypted - plaintext).max() < 1e-2, done.stdout


def test_import_heclave_exports_its_public_api_and_nothing_it_does_not_have():
    probe = "import heclave, json; print(json.dumps([n for n in heclave.__all__ if getattr(heclave, n, None) is None]))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and json.loads(done.stdout) == [], done.stdout + done.stderr
