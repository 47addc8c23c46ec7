"""The README's claims that drift as the code moves: the commands and flags it shows, which packages import
torch, and what the enclave runs."""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest

from heclave.cli import main
from tests.helpers import enclave_modules

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
FOLDERS = ("protocol", "graph", "arith", "he", "tee", "plan", "parties", "examples", "benchmarks", "heclave")
# Import names of the enclave's libraries as the README names them (their distributions).
DISTRIBUTIONS = {"zmq": "pyzmq"}
FOLDER_LIST = r"((?:`[a-z]+/`(?:,\s+|\s+and\s+)?)+)"


def _code() -> list[str]:
    """Every fenced block and inline code span of the README, continuation lines joined."""
    fenced = re.findall(r"```[a-z]*\n(.*?)```", README, re.S)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", README, flags=re.S))
    return [text.replace("\\\n", " ") for text in fenced + inline]


def _invocations() -> list[list[str]]:
    """Each ``heclave ...`` command line the README shows, as words; ``[--a x|y]`` and ``...`` are notation."""
    found = []
    for text in _code():
        for line in text.splitlines():
            for match in re.finditer(r"(?:^|[\s($|;&])heclave ((?:[^|;&#)`]|\|(?=[a-z]))+)", line):
                words = shlex.split(re.sub(r"[\[\]]", " ", match.group(1)), comments=True)
                found.append([w for w in words if w != "..."])
    return found


def _resolve(words: list[str]) -> tuple[click.Command, list[str], list[str]]:
    """The command the words name, its path, and the words after it."""
    command, path = main, []
    while isinstance(command, click.Group) and words and words[0] in command.commands:
        path.append(words[0])
        command, words = command.commands[words[0]], words[1:]
    return command, path, words


def _enclave_flags() -> str:
    done = subprocess.run([sys.executable, "-m", "heclave.tee", "-h"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_readme_shows_commands_in_use():
    assert len(_invocations()) > 30


@pytest.mark.parametrize("words", _invocations(), ids=lambda words: " ".join(words)[:60])
def test_every_command_and_flag_the_readme_shows_exists(words):
    command, path, rest = _resolve(words)
    assert path, f"`heclave {' '.join(words)}` names no command"
    assert not isinstance(command, click.Group) or not rest, f"`heclave {' '.join(path)}` has no {rest[0]!r}"
    known = {opt for param in command.params for opt in param.opts + param.secondary_opts} | {"-h", "--help"}
    flags = {w.split("=")[0] for w in rest if w.startswith("--")}
    unknown = flags - known
    if path == ["enclave"]:
        unknown = {flag for flag in unknown if not re.search(rf"(^|[\s,]){flag}\b", _enclave_flags())}
    assert not unknown, f"`heclave {' '.join(path)}` has no {sorted(unknown)}"


def _imports_torch(folder: str) -> bool:
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            if any(name == "torch" or name.startswith("torch.") for name in names):
                return True
    return False


def _listed(sentence: str) -> set[str]:
    match = re.search(sentence, README)
    assert match, f"the README no longer says {sentence!r}"
    return set(re.findall(r"`([a-z]+)/`", match.group(1)))


def test_the_readme_names_exactly_the_packages_that_import_torch():
    importing = {folder for folder in FOLDERS if _imports_torch(folder)}
    assert _listed(r"torch is imported only in " + FOLDER_LIST) == importing
    assert _listed(r"never import it: " + FOLDER_LIST) == set(FOLDERS) - importing


def test_the_readme_names_exactly_what_the_enclave_runs():
    modules = enclave_modules()
    libraries = {m.split(".")[0] for m in modules} - set(sys.stdlib_module_names) - {"heclave", "cython_runtime"}
    ours = {m.split(".")[1] for m in modules if m.startswith("heclave.")}
    claim = re.search(
        r"What the enclave runs is ((?:`[a-z]+/`(?:,\s+|\s+and\s+)?)+) with ([a-z,\s]+?),\s+never torch", README
    )
    assert claim, "the README no longer says what the enclave runs"
    assert set(re.findall(r"`([a-z]+)/`", claim.group(1))) == ours
    named = set(re.split(r",\s*|\s+and\s+", claim.group(2).strip()))
    assert named == {DISTRIBUTIONS.get(lib, lib) for lib in libraries}


def test_every_test_path_the_docs_and_the_code_name_exists():
    """The README, ``docs/`` and the code's docstrings point at test files that are there (tests move)."""
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    texts += [path for folder in FOLDERS for path in sorted((ROOT / folder).rglob("*.py"))]
    named = {(text, path) for text in texts for path in re.findall(r"`(tests/[\w/.-]*)`", text.read_text())}
    assert len(named) > 10
    missing = sorted(f"{text.relative_to(ROOT)}: {path}" for text, path in named if not (ROOT / path).exists())
    assert not missing, f"these name test paths that do not exist: {missing}"
