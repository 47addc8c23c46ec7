"""The ``heclave`` command line: one subcommand per process or client, and the demo."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import click
import numpy as np

from he.graph import ReleaseMode, ReleasePolicy
from he.layout import ENCLAVE_FACTOR
from he.linear import WeightForm
from parties.bench import bench
from protocol.errors import HeclaveError
from protocol.evidence import Runtime, VerifierPolicy
from protocol.transport import stop_requested


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


POLICY_FLAGS = (
    "policy_file",
    "mrenclave",
    "mrsigner",
    "isv_prod_id",
    "min_isv_svn",
    "allow_debug",
    "allow_unattested",
    "pccs_url",
)


def _policy(policy_file: Path | None = None, **flags) -> VerifierPolicy:
    """The owner's verifier policy: the TOML file if given, with command-line flags taking precedence."""
    if policy_file is not None:
        return VerifierPolicy.from_toml(policy_file, **flags)
    return VerifierPolicy.from_mapping({k: v for k, v in flags.items() if v is not None})


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated shape such as 1,8,8") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """heclave: confidential inference with CKKS on the server and an enclave for the exact nonlinear steps."""


GRAMINE_DIR = Path(__file__).resolve().parents[1] / "tee" / "gramine"


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option(
    "--runtime",
    type=click.Choice([r.value for r in Runtime]),
    default=Runtime.NATIVE.value,
    show_default=True,
    help="native: this process; gramine-direct/gramine-sgx: the built Gramine enclave.",
)
@click.option("--measure", is_flag=True, help="Print MRENCLAVE, MRSIGNER and ISV ids of the built SGX enclave.")
@click.option("--gramine-dir", type=click.Path(path_type=Path), default=GRAMINE_DIR, show_default=True)
@click.pass_context
def enclave(ctx: click.Context, runtime: str, measure: bool, gramine_dir: Path) -> None:
    """Run the enclave process (native options such as --bind and --state-dir: `python -m tee -h`)."""
    if measure:
        from tee.measure import read_sigstruct

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
        return
    if runtime == Runtime.NATIVE.value:
        os.execv(sys.executable, [sys.executable, "-m", "tee", "--runtime", runtime, *ctx.args])
    if ctx.args:
        raise click.UsageError(
            "Under Gramine the enclave's arguments are part of its measured manifest: set them when building, "
            f"e.g. `make -C {gramine_dir} SGX=1 BIND=tcp://127.0.0.1:5556`, not here."
        )
    if shutil.which("make") is None:
        raise click.UsageError("`make` is needed to run the Gramine enclave; install it (and Gramine).")
    sgx = ["SGX=1"] if runtime == Runtime.GRAMINE_SGX.value else []
    os.execvp("make", ["make", "-C", str(gramine_dir), *sgx, "run"])


@main.command()
@click.option("--bind", default="tcp://127.0.0.1:5555", show_default=True, help="Endpoint for the parties (CURVE).")
@click.option("--enclave", "enclave_endpoint", default="tcp://127.0.0.1:5556", show_default=True)
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
@click.option("--ready-file", type=click.Path(path_type=Path), help="Write {endpoint, public_key} here once serving.")
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
    enclave_endpoint: str,
    key_file: Path,
    state_dir: Path | None,
    ready_file: Path | None,
    enclave_timeout: float,
    max_queue: int,
    queue_timeout: float,
    spawn_enclave: bool,
    workers: int | None,
    ray_address: str | None,
    verbose: bool,
) -> None:
    """Run the untrusted server: CKKS linear layers, relaying to the enclave."""
    from parties.serving import ServerConfig, run_server

    _logging(True if ready_file else verbose)
    should_stop = stop_requested()
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
    )
    click.echo(f"server starting on {bind}; its CURVE public key goes to {key_file}", err=True)
    run_server(config, should_stop)


def _load_model(spec: str, state_dict: Path | None):
    """A torch module from ``path/to/file.py:name`` or ``package.module:name`` (a module or a factory)."""
    import torch

    source, _, attr = spec.partition(":")
    if not attr:
        raise click.BadParameter("use FILE.py:NAME or MODULE:NAME", param_hint="--model")
    if source.endswith(".py"):
        module_spec = importlib.util.spec_from_file_location("heclave_user_model", source)
        if module_spec is None or module_spec.loader is None:
            raise click.BadParameter(f"cannot import {source}", param_hint="--model")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(source)
    obj = getattr(module, attr)
    model = obj if isinstance(obj, torch.nn.Module) else obj()
    if state_dict is not None:
        model.load_state_dict(torch.load(state_dict, weights_only=True))
    return model.eval()


def _client_options(f):
    """The server to reach and the policy its enclave must meet; the command receives ``policy``."""

    @functools.wraps(f)
    def command(**kwargs):
        kwargs["policy"] = _policy(**{k: kwargs.pop(k) for k in POLICY_FLAGS})
        return f(**kwargs)

    options = [
        click.option("--server", "endpoint", required=True, help="The server's party endpoint, e.g. tcp://host:5555."),
        click.option(
            "--server-key",
            type=click.Path(exists=True, path_type=Path),
            required=True,
            help="The server's CURVE public key file to pin.",
        ),
        click.option(
            "--policy",
            "policy_file",
            type=click.Path(exists=True, path_type=Path),
            help="Verifier policy (TOML); the flags below override its keys.",
        ),
        click.option("--mrenclave", help="Expected MRENCLAVE (hex)."),
        click.option("--mrsigner", help="Expected MRSIGNER (hex)."),
        click.option("--isv-prod-id", type=int, help="Expected ISV_PROD_ID."),
        click.option("--min-isv-svn", type=int, help="Lowest acceptable ISV_SVN."),
        click.option("--pccs-url", help="PCCS to fetch quote-verification collateral from."),
        click.option(
            "--allow-debug",
            is_flag=True,
            default=None,
            help="INSECURE: accept a debug enclave, whose memory the host can read.",
        ),
        click.option(
            "--allow-unattested",
            is_flag=True,
            default=None,
            help="DEVELOPMENT ONLY: accept an enclave that presents no SGX quote.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.group("model-owner")
def model_owner() -> None:
    """Model-owner commands."""


@model_owner.command()
@_client_options
@click.option("--model", "model_spec", required=True, help="FILE.py:NAME or MODULE:NAME of an nn.Module or factory.")
@click.option(
    "--state-dict", type=click.Path(exists=True, path_type=Path), help="Weights (torch.save of a state_dict)."
)
@click.option("--input-shape", required=True, help="Input shape without batch axis, e.g. 1,8,8.")
@click.option(
    "--weights",
    type=click.Choice([f.value for f in WeightForm]),
    default="encrypted",
    show_default=True,
    help="'plain' hands the server the weights in the clear.",
)
@click.option("--release", type=click.Choice([m.value for m in ReleaseMode]), default="logits", show_default=True)
@click.option("--decimals", default=4, show_default=True, help="Precision of released logits.")
@click.option(
    "--batch",
    default=1,
    show_default=True,
    help="Queries per request to plan for; above 1, layouts pack several queries per ciphertext.",
)
@click.option(
    "--plan",
    "plan_file",
    type=click.Path(exists=True, path_type=Path),
    help="A plan file from `heclave plan`: its placements, weight form and batch size are used.",
)
def deploy(
    endpoint: str,
    server_key: Path,
    policy: VerifierPolicy,
    model_spec: str,
    state_dict: Path | None,
    input_shape: str,
    weights: str,
    release: str,
    decimals: int,
    batch: int,
    plan_file: Path | None,
) -> None:
    """Plan a torch model and deploy it; prints the model id."""
    from parties.model_owner import ModelOwner

    _logging(False)
    placements = None
    if plan_file is not None:
        chosen = json.loads(plan_file.read_text())
        if chosen.get("format") != 1:
            raise click.BadParameter(f"{plan_file} is not a heclave plan file of format 1", param_hint="--plan")
        placements, weights, batch = chosen["placements"], chosen["weights"], chosen["batch"]
    owner = ModelOwner(endpoint, server_key, policy)
    plan = owner.plan(
        _load_model(model_spec, state_dict),
        _shape(input_shape),
        weights,
        ReleasePolicy(ReleaseMode(release), decimals),
        batch=batch,
        placements=placements,
    )
    click.echo(owner.deploy(plan))


@main.group("data-owner")
def data_owner() -> None:
    """Data-owner commands."""


@data_owner.command()
@_client_options
@click.option("--model-id", required=True)
@click.option(
    "--input",
    "input_file",
    type=click.Path(exists=True, path_type=Path),
    required=True,
    help=".npy file: one input, or a batch along the first axis.",
)
@click.option("--batch", default=1, show_default=True, help="Inputs sent per request.")
def infer(endpoint: str, server_key: Path, policy: VerifierPolicy, model_id: str, input_file: Path, batch: int) -> None:
    """Classify private inputs; prints one JSON result per input."""
    from parties.data_owner import DataOwner

    _logging(False)
    owner = DataOwner(endpoint, server_key, policy)
    x = np.load(input_file, allow_pickle=False)
    size = int(np.prod(owner.graph(model_id).input_shape))
    if x.size % size:
        raise click.BadParameter(f"{input_file} holds {x.size} values, not a whole number of {size}-value inputs")
    inputs = x.reshape(-1, size)
    for start in range(0, len(inputs), batch):
        inference = owner.infer_batch(model_id, inputs[start : start + batch])
        for result in inference.results:
            click.echo(json.dumps({**result, "latency_ms": round(inference.latency_ms, 2)}))


@main.command()
@click.option("--samples", default=100, show_default=True, help="Held-out digits to classify.")
@click.option("--weights", type=click.Choice([f.value for f in WeightForm]), default="encrypted", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option(
    "--require-attestation",
    is_flag=True,
    help="Use the default policy (SGX quote required) instead of accepting the development enclave.",
)
def demo(samples: int, weights: str, as_json: bool, require_attestation: bool) -> None:
    """Train a CNN on digits, start an enclave and a server, deploy, classify, report."""
    from parties.demo import run_demo

    run_demo(samples, WeightForm(weights), as_json, require_attestation)


main.add_command(bench)


@main.command()
@click.argument("model_spec", metavar="MODEL")
@click.option(
    "--data",
    type=click.Choice(["digits"]),
    default="digits",
    show_default=True,
    help="The attacker's auxiliary data and the images attacked (shipped with scikit-learn).",
)
@click.option("--state-dict", type=click.Path(exists=True, path_type=Path), help="Weights for MODEL.")
@click.option("--threshold", type=float, help="Mark the cuts whose best attack's SSIM is below this (owner's choice).")
@click.option(
    "--figure",
    "figure_path",
    type=click.Path(path_type=Path),
    default=Path("assessment.png"),
    show_default=True,
    help="Where to write the PNG of reconstructions and SSIM against depth.",
)
@click.option("--epochs", default=60, show_default=True, help="Training epochs of the decoder attack.")
@click.option("--steps", default=200, show_default=True, help="Gradient steps of the optimisation attack.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def assess(
    model_spec: str,
    data: str,
    state_dict: Path | None,
    threshold: float | None,
    figure_path: Path,
    epochs: int,
    steps: int,
    as_json: bool,
) -> None:
    """Train inversion attacks on the feature map at every candidate cut of MODEL and report SSIM and PSNR.

    MODEL is FILE.py:NAME or MODULE:NAME, or `digits-cnn` to train the demo's CNN first.
    """
    from rich.console import Console
    from rich.table import Table

    from examples.digits import INPUT_SHAPE, digits_split, train_digits_cnn
    from plan import from_pytorch
    from plan.assessment import Budget, figure
    from plan.assessment import assess as run_assessment

    _logging(False)
    x_train, x_test, _, _ = digits_split()
    model = train_digits_cnn()[0] if model_spec == "digits-cnn" else _load_model(model_spec, state_dict)
    with Console(stderr=True).status("assessing") as status:
        report = run_assessment(
            from_pytorch(model, INPUT_SHAPE),
            x_train,
            x_test,
            Budget(decoder_epochs=epochs, rmle_steps=steps),
            threshold,
            say=status.update,
        )
    figure(report, str(figure_path))
    public = {k: v for k, v in report.items() if k != "originals"}
    public["cuts"] = [{k: v for k, v in c.items() if k != "reconstructions"} for c in report["cuts"]]
    public["figure"] = str(figure_path)
    if as_json:
        click.echo(json.dumps(public))
        return
    table = Table(title=f"Inversion attacks on {model_spec} ({data}); figure: {figure_path}")
    for column in ("depth", "cut", "features", "decoder SSIM / PSNR", "optimisation SSIM / PSNR", "below threshold"):
        table.add_column(column)
    for c in public["cuts"]:
        d, o = c["attacks"]["decoder"], c["attacks"]["optimisation"]
        table.add_row(
            str(c["depth"]),
            c["cut"],
            str(c["feature_size"]),
            f"{d['ssim']:.2f} / {d['psnr_db']:.1f}",
            f"{o['ssim']:.2f} / {o['psnr_db']:.1f}",
            "-" if c["below_threshold"] is None else str(c["below_threshold"]),
        )
    Console().print(table)
    Console().print(public["note"])


@main.command()
@click.option(
    "--enclave-factor",
    default=ENCLAVE_FACTOR,
    show_default=True,
    help="What a millisecond of enclave work costs in server milliseconds: SGX's slowdown (which cannot be "
    "measured without SGX) times the server lanes one enclave serves.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Where to store the costs (default: ~/.config/heclave/costs.json).",
)
def calibrate(enclave_factor: float, out: Path | None) -> None:
    """Measure the cost model's unit costs on this machine and store them for `heclave plan`."""
    from plan.calibration import DEFAULT_PATH
    from plan.calibration import calibrate as measure

    with click.progressbar(length=1, label="measuring", file=sys.stderr) as bar:
        calibration = measure(enclave_factor)
        bar.update(1)
    path = out or DEFAULT_PATH
    calibration.save(path)
    click.echo(
        json.dumps({"path": str(path), "he": calibration.he.__dict__, "plaintext": calibration.plaintext.__dict__})
    )


@main.command("plan")
@click.argument("model_spec", metavar="MODEL")
@click.option("--input-shape", default="1,8,8", show_default=True)
@click.option("--state-dict", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--protect",
    default="input,weights",
    show_default=True,
    help="What the server must not see: any of input, weights (comma-separated; empty for nothing).",
)
@click.option(
    "--ssim-threshold",
    type=float,
    help="Allow plain layers after cuts whose best inversion attack scores below this SSIM (runs "
    "`heclave assess` on digits). Without it, protecting the input forbids plain layers.",
)
@click.option(
    "--enclave-budget",
    default=1.0,
    show_default=True,
    help="Largest predicted share of compute the enclave may do (its work counted with the SGX "
    "slowdown factor of the calibration); lower it to keep the scarce enclave free.",
)
@click.option("--weights", type=click.Choice([f.value for f in WeightForm]), default="encrypted", show_default=True)
@click.option("--batch", default=1, show_default=True)
@click.option("--calibration", type=click.Path(path_type=Path), help="Costs from `heclave calibrate`.")
@click.option("--out", type=click.Path(path_type=Path), help="Write the plan file the deployment uses.")
@click.option("--json", "as_json", is_flag=True)
def plan_command(
    model_spec: str,
    input_shape: str,
    state_dict: Path | None,
    protect: str,
    ssim_threshold: float | None,
    enclave_budget: float,
    weights: str,
    batch: int,
    calibration: Path | None,
    out: Path | None,
    as_json: bool,
) -> None:
    """The cheapest placement of every layer of MODEL that meets the protections asked for."""
    from examples.digits import digits_split, train_digits_cnn
    from plan import from_pytorch
    from plan.calibration import DEFAULT_PATH, Calibration
    from plan.exposure import exposure
    from plan.planner import plan_model
    from plan.search import cheapest

    _logging(False)
    shape = _shape(input_shape)
    model = train_digits_cnn()[0] if model_spec == "digits-cnn" else _load_model(model_spec, state_dict)
    imported = from_pytorch(model, shape)
    cut_ssim = None
    if ssim_threshold is not None:
        from plan.assessment import Budget
        from plan.assessment import assess as run_assessment

        x_train, x_test, _, _ = digits_split()
        report = run_assessment(imported, x_train, x_test, Budget(decoder_epochs=20, rmle_steps=100))
        cut_ssim = {c["depth"]: c["max_ssim"] for c in report["cuts"]}
    costs = Calibration.load(calibration or DEFAULT_PATH)
    wanted = {p.strip() for p in protect.split(",") if p.strip()}
    best = cheapest(imported, wanted, costs, WeightForm(weights), enclave_budget, cut_ssim, ssim_threshold, batch)
    graph = plan_model(imported, weights, batch=batch, placements=best.placements).graph
    result = {
        "format": 1,
        "model": model_spec,
        "input_shape": list(shape),
        "weights": weights,
        "batch": batch,
        "placements": [p.value for p in best.placements],
        "protect": sorted(wanted),
        "predicted_latency_ms": best.latency_ms,
        "predicted_enclave_share": best.enclave_share,
        "exposes": exposure(graph),
        "cut_ssim": cut_ssim,
    }
    if out is not None:
        out.write_text(json.dumps(result, indent=2))
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"placements: {', '.join(result['placements'])}")
    click.echo(f"predicted latency {best.latency_ms:.1f} ms per query, enclave share {best.enclave_share:.2f}")
    click.echo("the server sees: " + ("; ".join(result["exposes"]) or "shapes, sizes and timings only"))


@main.command("loadtest")
@click.option("--clients", default=8, show_default=True, help="Concurrent data owners.")
@click.option("--requests", default=25, show_default=True, help="Requests each data owner sends.")
@click.option("--weights", type=click.Choice([f.value for f in WeightForm]), default="encrypted", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def loadtest_command(clients: int, requests: int, weights: str, as_json: bool) -> None:
    """Start the processes, run many data owners at once, and check every answer against plaintext."""
    from rich.console import Console
    from rich.table import Table

    from benchmarks.loadtest import loadtest

    _logging(False)
    logging.getLogger("protocol.evidence").setLevel(logging.ERROR)
    with Console(stderr=True).status("load test") as status:
        report = loadtest(clients, requests, weights, say=status.update)
    if as_json:
        click.echo(json.dumps(report))
        return
    table = Table(title=f"heclave loadtest: {clients} clients x {requests} requests, {weights} weights")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in report.items():
        table.add_row(key, f"{value:.1f}" if isinstance(value, float) else str(value))
    Console().print(table)


def run() -> None:
    """Console entry point that turns heclave's errors into one clear line and exit code 1."""
    try:
        main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except HeclaveError as exc:
        click.echo(f"error [{exc.code.value}]: {exc.message}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    run()
