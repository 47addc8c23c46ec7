"""``heclave enclave``, ``heclave server`` and ``heclave demo``: the commands that run heclave's processes."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from heclave.graph.placement import WeightForm
from heclave.parties.options import service_options, workload_option
from heclave.protocol import service
from heclave.protocol.evidence import Runtime

if TYPE_CHECKING:
    from heclave.workloads import Workload

GRAMINE_DIR = Path(__file__).resolve().parents[1] / "tee" / "gramine"
SERVER_OPTIONS = service.options(
    "tcp://127.0.0.1:5555", "Endpoint for the parties (CURVE).", "{endpoint, public_key}", exit_with_parent=False
)


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option(
    "--runtime",
    type=click.Choice([r.value for r in Runtime]),
    default=Runtime.NATIVE.value,
    show_default=True,
    help="native: this process; gramine-direct/gramine-sgx: the built Gramine enclave.",
)
@click.option("--measure", is_flag=True, help="Print MRENCLAVE, MRSIGNER and ISV ids of the built SGX enclave.")
@click.option(
    "--policy-out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="With --measure: also write the owners' verifier policy pinning this enclave to this TOML file.",
)
@click.option("--gramine-dir", type=click.Path(path_type=Path), default=GRAMINE_DIR, show_default=True)
@click.pass_context
def enclave(ctx: click.Context, runtime: str, measure: bool, policy_out: Path | None, gramine_dir: Path) -> None:
    """Run the enclave process (its own options, such as --bind and --link-token: `python -m heclave.tee -h`)."""
    if policy_out is not None and not measure:
        raise click.UsageError("--policy-out writes what --measure reads: give both.")
    if measure:
        from heclave.protocol.storage import PUBLIC_MODE, write_atomic
        from heclave.tee.measure import policy_text, read_sigstruct

        sig = read_sigstruct(gramine_dir)
        click.echo(
            json.dumps(
                {
                    "mrenclave": sig.mrenclave.hex(),
                    "mrsigner": sig.mrsigner.hex(),
                    "isv_prod_id": sig.isv_prod_id,
                    "isv_svn": sig.isv_svn,
                    "debug": sig.debug,
                }
            )
        )
        if policy_out is not None:
            write_atomic(policy_out, policy_text(sig, gramine_dir).encode(), PUBLIC_MODE)
            click.echo(f"policy pinning this enclave written to {policy_out}; owners pass it with --policy", err=True)
            if sig.debug:
                click.echo("WARNING: a debug enclave, which the policy refuses; build it without DEBUG=1.", err=True)
        return
    if runtime == Runtime.NATIVE.value:
        os.execv(sys.executable, [sys.executable, "-m", "heclave.tee", "--runtime", runtime, *ctx.args])
    if ctx.args:
        raise click.UsageError(
            "Under Gramine the enclave's arguments are part of its measured manifest: set them when building, "
            f"e.g. `make -C {gramine_dir} SGX=1 BIND=tcp://127.0.0.1:5556`, not here."
        )
    if shutil.which("make") is None:
        raise click.UsageError("`make` is needed to run the Gramine enclave; install it (and Gramine).")
    sgx = ["SGX=1"] if runtime == Runtime.GRAMINE_SGX.value else []
    os.execvp("make", ["make", "-C", str(gramine_dir), *sgx, "run"])


@click.command()
@service_options(SERVER_OPTIONS)
@click.option("--enclave", "enclave_endpoint", default="tcp://127.0.0.1:5556", show_default=True)
@click.option(
    "--enclave-token",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The enclave's link token (the file its --link-token wrote); not needed with --spawn-enclave.",
)
@click.option(
    "--allow-clients",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    multiple=True,
    help="Accept only the CURVE client keys listed in this file (one Z85 public key per line, # comments), "
    "re-read when it changes; repeatable. Without it any client key may connect.",
)
@click.option(
    "--key-file",
    type=click.Path(path_type=Path),
    default=Path("server.key"),
    show_default=True,
    help="Where to write the server's CURVE public key for the parties to pin.",
)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    help="Keep deployed models and the CURVE identity here, so a restart keeps serving them.",
)
@click.option("--enclave-timeout", default=60.0, show_default=True, help="Seconds to wait for the enclave.")
@click.option("--max-queue", default=32, show_default=True, help="Requests queued before new ones get 'busy'.")
@click.option(
    "--queue-timeout",
    default=60.0,
    show_default=True,
    help="Seconds a request may wait in the queue before it is answered 'busy'.",
)
@click.option(
    "--spawn-enclave",
    is_flag=True,
    help="Run the enclave as this server's child and restart it whenever it dies (ignores --enclave).",
)
@click.option(
    "--workers",
    type=int,
    help="HE worker processes (lanes); 0 runs the HE work in the server process. Default: one per core.",
)
@click.option("--ray", "ray_address", help="Run the HE work on a Ray cluster: its address, or 'local'.")
@click.option("-v", "--verbose", is_flag=True)
def server(
    bind: str,
    ready_file: Path | None,
    enclave_endpoint: str,
    enclave_token: Path | None,
    allow_clients: tuple[Path, ...],
    key_file: Path,
    state_dir: Path | None,
    enclave_timeout: float,
    max_queue: int,
    queue_timeout: float,
    spawn_enclave: bool,
    workers: int | None,
    ray_address: str | None,
    verbose: bool,
) -> None:
    """Run the untrusted server: CKKS linear layers, relaying to the enclave."""
    from heclave.parties.serving import ServerConfig, run_server

    if enclave_token is None and not spawn_enclave:
        raise click.UsageError("Give the enclave's link token with --enclave-token FILE, or use --spawn-enclave.")
    if ray_address:
        from heclave.parties.ray_executor import ray_missing

        if reason := ray_missing():
            raise click.UsageError(reason)
    service.configure_logging(True if ready_file else verbose)
    should_stop = service.stop_requested()
    config = ServerConfig(
        bind,
        enclave_endpoint,
        key_file,
        state_dir,
        ready_file,
        enclave_timeout,
        max_queue,
        queue_timeout,
        spawn_enclave,
        workers,
        ray_address,
        enclave_token,
        allow_clients,
    )
    click.echo(f"server starting on {bind}; its CURVE public key goes to {key_file}", err=True)
    run_server(config, should_stop)


@click.command()
@click.option("--samples", default=100, show_default=True, help="Held-out inputs of the workload to classify.")
@click.option("--weights", type=click.Choice([f.value for f in WeightForm]), default="encrypted", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option(
    "--require-attestation",
    is_flag=True,
    help="Require an SGX quote from the enclave signed in tee/gramine, pinned by its SIGSTRUCT, instead of "
    "accepting the development enclave.",
)
@workload_option()
def demo(samples: int, weights: str, as_json: bool, require_attestation: bool, workload: Workload) -> None:
    """Train the workload's model (a CNN on digits by default), start an enclave and a server, deploy, classify,
    report."""
    from heclave.parties.demo import run_demo

    run_demo(samples, WeightForm(weights), as_json, require_attestation, workload)
