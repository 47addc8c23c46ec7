"""``heclave assess``, ``heclave calibrate`` and ``heclave plan``: where a model owner decides placements."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from heclave.graph.placement import WeightForm
from heclave.protocol.service import configure_logging

from .options import load_model, parse_shape, workload_option

if TYPE_CHECKING:
    import torch

    from heclave.workloads import Workload


def _model(spec: str, state_dict: Path | None, workload: Workload) -> torch.nn.Module:
    """MODEL as given, or the workload's own model, trained first, when MODEL is its name."""
    return workload.train()[0] if spec == workload.model_name else load_model(spec, state_dict)


@click.command()
@click.argument("model_spec", metavar="MODEL")
@workload_option("--data")
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
    workload: Workload,
    state_dict: Path | None,
    threshold: float | None,
    figure_path: Path,
    epochs: int,
    steps: int,
    as_json: bool,
) -> None:
    """Train inversion attacks on the feature map at every candidate cut of MODEL and report SSIM and PSNR.

    MODEL is FILE.py:NAME or MODULE:NAME, or the workload's model name (`digits-cnn` by default) to train
    that model first. The workload's data are the attacker's auxiliary data and the images attacked.
    """
    from rich.console import Console
    from rich.table import Table

    from heclave.plan import from_pytorch
    from heclave.plan.assessment import Budget, figure
    from heclave.plan.assessment import assess as run_assessment

    configure_logging(False)
    x_train, x_test, _, _ = workload.data()
    model = _model(model_spec, state_dict, workload)
    with Console(stderr=True).status("assessing") as status:
        report = run_assessment(
            from_pytorch(model, workload.input_shape),
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
    table = Table(title=f"Inversion attacks on {model_spec} ({workload.name}); figure: {figure_path}")
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


def _enclave_factor() -> float:
    from heclave.plan.costs import ENCLAVE_FACTOR  # on use: importing the planner loads torch

    return ENCLAVE_FACTOR


@click.command()
@click.option(
    "--enclave-factor",
    type=float,
    default=lambda: _enclave_factor(),
    show_default="the cost model's ENCLAVE_FACTOR",
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
    from heclave.plan.calibration import DEFAULT_PATH
    from heclave.plan.calibration import calibrate as measure

    with click.progressbar(length=1, label="measuring", file=sys.stderr) as bar:
        calibration = measure(enclave_factor)
        bar.update(1)
    path = out or DEFAULT_PATH
    calibration.save(path)
    click.echo(
        json.dumps({"path": str(path), "he": calibration.he.__dict__, "plaintext": calibration.plaintext.__dict__})
    )


@click.command("plan")
@click.argument("model_spec", metavar="MODEL")
@workload_option()
@click.option("--input-shape", show_default="the workload's", help="MODEL's input shape, e.g. 1,8,8.")
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
    "`heclave assess` on the workload's data). Without it, protecting the input forbids plain layers.",
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
    workload: Workload,
    input_shape: str | None,
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
    from heclave.plan import from_pytorch
    from heclave.plan.calibration import DEFAULT_PATH, Calibration
    from heclave.plan.exposure import exposure
    from heclave.plan.plan_file import PlanFile
    from heclave.plan.planner import plan_model
    from heclave.plan.search import cheapest

    configure_logging(False)
    shape = parse_shape(input_shape) if input_shape else workload.input_shape
    model = _model(model_spec, state_dict, workload)
    imported = from_pytorch(model, shape)
    cut_ssim = None
    if ssim_threshold is not None:
        from heclave.plan.assessment import Budget
        from heclave.plan.assessment import assess as run_assessment

        x_train, x_test, _, _ = workload.data()
        report = run_assessment(imported, x_train, x_test, Budget(decoder_epochs=20, rmle_steps=100))
        cut_ssim = {c["depth"]: c["max_ssim"] for c in report["cuts"]}
    costs = Calibration.load(calibration or DEFAULT_PATH)
    wanted = {p.strip() for p in protect.split(",") if p.strip()}
    best = cheapest(imported, wanted, costs, WeightForm(weights), enclave_budget, cut_ssim, ssim_threshold, batch)
    graph = plan_model(imported, weights, batch=batch, placements=best.placements).graph
    planned = PlanFile(
        model=model_spec,
        input_shape=list(shape),
        weights=weights,
        batch=batch,
        placements=[p.value for p in best.placements],
        protect=sorted(wanted),
        predicted_latency_ms=best.latency_ms,
        predicted_enclave_share=best.enclave_share,
        exposes=exposure(graph),
        cut_ssim=cut_ssim,
    )
    result = planned.to_json()
    if out is not None:
        planned.write(out)
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"placements: {', '.join(result['placements'])}")
    click.echo(f"predicted latency {best.latency_ms:.1f} ms per query, enclave share {best.enclave_share:.2f}")
    click.echo("the server sees: " + ("; ".join(result["exposes"]) or "shapes, sizes and timings only"))
