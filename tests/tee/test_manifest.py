"""The Gramine manifest template, rendered as gramine-manifest would, and its Makefile.

Gramine is not installed here: the template is rendered with jinja2 and
stand-ins for Gramine's template helpers, strictly (a missing variable is an
error, as in gramine-manifest), then parsed as TOML and checked key by key.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

jinja2 = pytest.importorskip("jinja2")
from jinja2 import meta  # noqa: E402

GRAMINE_DIR = Path(__file__).resolve().parents[2] / "tee" / "gramine"
TEMPLATE = GRAMINE_DIR / "heclave-enclave.manifest.template"
MAKEFILE = GRAMINE_DIR / "Makefile"

# What Gramine itself provides to templates (gramine-manifest's globals).
GRAMINE_GLOBALS = {
    "gramine": SimpleNamespace(
        libos="/usr/lib/x86_64-linux-gnu/gramine/libsysdb.so",
        runtimedir=lambda libc="glibc": f"/usr/lib/x86_64-linux-gnu/gramine/runtime/{libc}",
    ),
    "python": SimpleNamespace(
        stdlib="/usr/lib/python3.12",
        platstdlib="/usr/lib/python3.12",
        purelib="/usr/local/lib/python3.12/dist-packages",
        distlib="/usr/lib/python3/dist-packages",
        get_path=lambda name, *a, **k: f"/usr/lib/python3.12/{name}",
        get_paths=lambda *a, **k: {},
        implementation=SimpleNamespace(name="cpython"),
    ),
    "env": {},
    "ldd": lambda *executables: [],
}

PYTHON_EXE = "/opt/python/3.11/bin/python3.11"
VENV = "/srv/heclave/tee/gramine/venv"
VENV_SITE = f"{VENV}/lib/python3.11/site-packages"
APP = "/srv/heclave/tee/gramine/app"

# What the Makefile passes with -D (debug is optional and defaults to false).
VARIABLES = {
    "log_level": "error",
    "arch_libdir": "/lib/x86_64-linux-gnu",
    "python_exe": PYTHON_EXE,
    "python_prefix": "/opt/python/3.11",
    "python_stdlib": "/opt/python/3.11/lib/python3.11",
    "libpython": "/opt/python/3.11/lib/libpython3.11.so.1.0",
    "venv": VENV,
    "venv_site": VENV_SITE,
    "project_dir": APP,
    "sealed_dir": "/srv/heclave/tee/gramine/sealed",
    "keys_dir": "/srv/heclave/tee/gramine/keys",
    "enclave_size": "2G",
    "max_threads": "16",
    "isvprodid": "1",
    "isvsvn": "3",
    "enclave_args": "--bind tcp://127.0.0.1:5556 --state-dir /sealed --runtime gramine-sgx "
    "--link-token /keys/link.token",
}


def environment() -> jinja2.Environment:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.globals.update(GRAMINE_GLOBALS)
    return env


def render(**overrides: str) -> str:
    variables = {k: v for k, v in (VARIABLES | overrides).items() if v is not None}
    return environment().from_string(TEMPLATE.read_text()).render(**variables)


@pytest.fixture(scope="module")
def manifest() -> dict:
    return tomllib.loads(render())


def trusted(manifest: dict) -> list[str]:
    entries = manifest["sgx"]["trusted_files"]
    return [e if isinstance(e, str) else e["uri"] for e in entries]


def covered(uri_list: list[str], path: str) -> bool:
    """Whether ``path`` is a trusted file or lies under a trusted directory."""
    for uri in uri_list:
        target = uri.removeprefix("file:")
        if target == path or (target.endswith("/") and path.startswith(target)):
            return True
    return False


def all_keys(table: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in table.items():
        keys.append(prefix + key)
        if isinstance(value, dict):
            keys += all_keys(value, f"{prefix}{key}.")
    return keys


def test_template_renders_to_valid_toml(manifest):
    assert manifest["sgx"]["remote_attestation"] == "dcap"


def test_production_enclave_by_default(manifest):
    assert manifest["sgx"]["debug"] is False


def test_debug_only_when_asked():
    assert tomllib.loads(render(debug="true"))["sgx"]["debug"] is True
    assert tomllib.loads(render(debug="false"))["sgx"]["debug"] is False


@pytest.mark.parametrize("name", sorted(VARIABLES))
def test_missing_variable_is_an_error(name):
    with pytest.raises(jinja2.UndefinedError):
        render(**{name: None})


def test_sizes_threads_and_isv_ids(manifest):
    sgx = manifest["sgx"]
    size = re.fullmatch(r"(\d+)([KMG])", sgx["enclave_size"])
    assert size, sgx["enclave_size"]
    value = int(size[1]) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[size[2]]
    assert value & (value - 1) == 0, "SGX enclave sizes are powers of two"
    assert isinstance(sgx["max_threads"], int) and sgx["max_threads"] >= 4
    assert sgx["isvprodid"] == 1 and sgx["isvsvn"] == 3
    assert sgx["edmm_enable"] is False


def test_entrypoint_runs_the_enclave_module(manifest):
    assert manifest["libos"]["entrypoint"] == PYTHON_EXE
    argv = manifest["loader"]["argv"]
    assert argv[0] == PYTHON_EXE
    i = argv.index("-m")
    assert argv[i + 1] == "heclave.tee"
    assert argv[i + 2 :] == VARIABLES["enclave_args"].split()


def test_no_host_environment_or_command_line(manifest):
    keys = all_keys(manifest)
    assert "loader.insecure__use_host_env" not in keys
    assert not [k for k in keys if "insecure__" in k], "no insecure__ option belongs in a production manifest"
    for name, value in manifest["loader"]["env"].items():
        assert isinstance(value, str) or "passthrough" not in value, f"{name} passes a host value through"
    assert "env_src_file" not in manifest["loader"] and "argv_src_file" not in manifest["loader"]


def test_environment_is_the_listed_one(manifest):
    env = manifest["loader"]["env"]
    assert env["PYTHONPATH"].split(":") == [APP, VENV_SITE]
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["OMP_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == "1"
    assert "/lib" in env["LD_LIBRARY_PATH"].split(":")
    assert "/opt/python/3.11/lib" in env["LD_LIBRARY_PATH"].split(":")


def test_static_interpreter_needs_no_libpython():
    rendered = tomllib.loads(render(libpython=""))
    assert not [u for u in trusted(rendered) if "libpython" in u]
    assert rendered["loader"]["env"]["LD_LIBRARY_PATH"] == "/lib:/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu"


def test_scratch_directory_is_in_enclave_memory(manifest):
    """he/serialize.py writes SEAL objects (the secret key too) through tempfile: it must land in a tmpfs."""
    mounts = manifest["fs"]["mounts"]
    tmp = [m for m in mounts if m["path"] == "/tmp"]
    assert tmp and tmp[0]["type"] == "tmpfs"
    assert manifest["loader"]["env"]["TMPDIR"] == "/tmp"
    assert not [m for m in mounts if m["path"].startswith("/dev/shm")]


def test_sealed_state_is_an_encrypted_mrenclave_mount(manifest):
    encrypted = [m for m in manifest["fs"]["mounts"] if m.get("type") == "encrypted"]
    assert len(encrypted) == 1
    mount = encrypted[0]
    assert mount["key_name"] == "_sgx_mrenclave"
    assert mount["uri"] == "file:" + VARIABLES["sealed_dir"]
    argv = manifest["loader"]["argv"]
    state_dir = argv[argv.index("--state-dir") + 1]
    assert state_dir == mount["path"] or state_dir.startswith(mount["path"] + "/")
    assert "fs" not in manifest or "insecure__keys" not in manifest["fs"]


def test_trusted_files_cover_interpreter_venv_and_enclave_code(manifest):
    uris = trusted(manifest)
    assert covered(uris, PYTHON_EXE)
    assert covered(uris, VARIABLES["libpython"])
    assert covered(uris, VARIABLES["python_stdlib"] + "/os.py")
    assert covered(uris, VENV_SITE + "/numpy/__init__.py")
    assert covered(uris, f"{APP}/heclave/__init__.py")
    for package in ("protocol", "he", "tee"):
        assert covered(uris, f"{APP}/heclave/{package}/__init__.py"), package
    for outside in ("plan", "parties"):
        assert not covered(uris, f"{APP}/heclave/{outside}/__init__.py"), (
            "only protocol/, he/ and tee/ are enclave code"
        )
    assert covered(uris, GRAMINE_GLOBALS["gramine"].runtimedir() + "/libc.so.6")


def test_every_python_path_is_mounted_and_holds_trusted_code(manifest):
    mounts = [m["path"] for m in manifest["fs"]["mounts"]]
    directories = [u.removeprefix("file:") for u in trusted(manifest) if u.endswith("/")]
    for entry in manifest["loader"]["env"]["PYTHONPATH"].split(":"):
        assert any(entry == m or entry.startswith(m + "/") for m in mounts), entry
        assert any(d.startswith(entry.rstrip("/") + "/") for d in directories), entry


def test_makefile_passes_exactly_the_template_variables():
    """Every -D the Makefile passes is used, and every variable the template needs is passed."""
    env = environment()
    needed = meta.find_undeclared_variables(env.parse(TEMPLATE.read_text())) - set(GRAMINE_GLOBALS)
    passed = set(re.findall(r"-D(\w+)=", MAKEFILE.read_text()))
    assert passed == needed | {"debug"} and needed - {"debug"} == set(VARIABLES)


def test_makefile_state_dir_is_the_encrypted_mount(manifest):
    text = MAKEFILE.read_text()
    state_dir = re.search(r"^STATE_DIR \?= (\S+)$", text, re.M)[1]
    assert re.search(r"^ARGS \?= .*--state-dir \$\(STATE_DIR\)", text, re.M)
    encrypted = next(m for m in manifest["fs"]["mounts"] if m.get("type") == "encrypted")
    assert state_dir == encrypted["path"]


def test_the_enclave_admits_only_the_holder_of_the_token_in_the_hosts_keys_directory(manifest):
    """Under SGX the enclave's socket admits the holder of the link token, kept in a mounted host directory
    that is allowed (neither hashed nor encrypted: the host holds the token anyway), never trusted code."""
    text = MAKEFILE.read_text()
    assert re.search(r"^ARGS \?= .* --link-token /keys/link.token$", text, re.M)
    keys = next(m for m in manifest["fs"]["mounts"] if m["path"] == "/keys")
    assert keys["uri"] == "file:" + VARIABLES["keys_dir"] and "type" not in keys
    assert manifest["sgx"]["allowed_files"] == ["file:" + VARIABLES["keys_dir"] + "/"]
    assert not covered(trusted(manifest), VARIABLES["keys_dir"] + "/link.token")
    argv = manifest["loader"]["argv"]
    assert argv[argv.index("--link-token") + 1].startswith("/keys/")


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.skipif(shutil.which("gramine-manifest") is not None, reason="Gramine is installed here")
def test_makefile_says_plainly_when_gramine_is_missing(tmp_path):
    result = subprocess.run(
        ["make", "-C", str(GRAMINE_DIR), "SGX=1", "check-gramine"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "Gramine tools not found" in result.stderr and "gramine-sgx-sign" in result.stderr
    assert "Install Gramine" in result.stderr
