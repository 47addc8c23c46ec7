"""Imports point one way between heclave's layers, and the server side loads nothing of the enclave."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("protocol", "graph", "arith", "he", "tee", "plan", "parties", "examples", "benchmarks")
# What each layer may import from heclave (``workloads`` is the leaf module heclave/workloads.py).
ALLOWED = {
    "protocol": set(),
    "graph": {"protocol"},
    "arith": {"protocol", "graph"},
    "he": {"protocol", "graph"},
    "tee": {"protocol", "graph", "arith", "he"},
    "plan": {"protocol", "graph", "arith", "he"},
    "parties": {"protocol", "graph", "arith", "he", "plan", "tee", "workloads"},
    "examples": {"protocol", "graph", "arith", "he", "plan", "parties", "workloads"},
    "benchmarks": {"protocol", "graph", "arith", "he", "plan", "parties", "examples", "workloads"},
}
SERVER_SIDE = ("heclave.parties.serving", "heclave.parties.server", "heclave.parties.worker")


def _imported(path: Path) -> set[str]:
    """The heclave layers a module imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("heclave."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("heclave.")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in LAYERS:
            found.add(f"bare {node.module}")  # the folder's own name is not importable once installed
    return found


def test_layers_import_only_the_layers_below_them():
    wrong = {}
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            extra = _imported(path) - ALLOWED[layer] - {layer}
            if extra:
                wrong[str(path.relative_to(ROOT))] = sorted(extra)
    assert not wrong, f"imports against the layering: {wrong}"


def test_the_workloads_module_is_a_leaf():
    assert _imported(ROOT / "heclave" / "workloads.py") == set()


def test_the_server_side_loads_nothing_of_the_enclave():
    probe = (
        f"import json, sys, {', '.join(SERVER_SIDE)};"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('heclave.tee'))))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def test_no_module_is_over_400_lines():
    long = {
        str(path.relative_to(ROOT)): n
        for layer in (*LAYERS, "heclave")
        for path in (ROOT / layer).rglob("*.py")
        if (n := len(path.read_text().splitlines())) > 400
    }
    assert not long, f"split these by responsibility: {long}"
