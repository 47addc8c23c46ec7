"""``heclave bench`` and ``heclave loadtest``: heclave against TenSEAL and plaintext torch, and under load,
measured in one run on this machine."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.table import Table

from heclave.graph.placement import WeightForm
from heclave.parties.options import workload_option

if TYPE_CHECKING:
    from heclave.workloads import Workload

WEIGHT_CHOICE = click.Choice([f.value for f in WeightForm])


def _machine() -> str:
    """The CPU model and core count, for the table's caption."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def _emit(report: dict, as_json: bool, title: str, rows: list[tuple[str, str]]) -> None:
    if as_json:
        click.echo(json.dumps(report))
        return
    table = Table(title=title, caption=f"{time.strftime('%Y-%m-%d')} on {_machine()}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)


@click.group()
def bench() -> None:
    """Benchmarks against TenSEAL and plaintext torch (every number measured in the same run)."""


@bench.command()
@click.option("--in", "n_in", default=784, show_default=True, help="Inputs of the dense layer.")
@click.option("--out", "n_out", default=128, show_default=True, help="Outputs of the dense layer.")
@click.option(
    "--weights",
    type=WEIGHT_CHOICE,
    default="encrypted",
    show_default=True,
    help="heclave's weight form; TenSEAL's matmul always has plaintext weights.",
)
@click.option("--runs", default=10, show_default=True, help="Timed runs of heclave's layer (the median is reported).")
@click.option("--tenseal-runs", default=2, show_default=True, help="Timed runs of TenSEAL's matmul (seconds each).")
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def linear(n_in: int, n_out: int, weights: str, runs: int, tenseal_runs: int, seed: int, as_json: bool) -> None:
    """One encrypted dense layer: heclave's kernel, TenSEAL's CKKSVector.matmul, and the rotation/multiply floor."""
    from .linear import bench_linear

    with Console(stderr=True).status(f"timing a {n_out}x{n_in} dense layer"):
        r = bench_linear(n_in, n_out, WeightForm(weights), runs, tenseal_runs, seed)
    rows = [
        ("heclave (server kernel)", f"{r['ours_ms']:.1f} ms"),
        ("TenSEAL matmul (plaintext weights)", f"{r['tenseal_ms']:.0f} ms"),
        ("floor (rotations + multiplications)", f"{r['floor_ms']:.1f} ms"),
        ("speedup over TenSEAL", f"{r['speedup_vs_tenseal']:.0f}x"),
        ("heclave / floor", f"{r['ours_over_floor']:.2f}x"),
        ("rotations (baby + giant)", f"{r['rotations']} ({r['baby_rotations']} + {r['giant_rotations']})"),
        ("multiplications", f"{r['multiplications']}"),
        (
            "unit times: rotation, rotation a level down, multiply",
            f"{r['t_rotation_ms']:.2f}, {r['t_rotation_rescaled_ms']:.2f}, {r['t_multiply_ms']:.2f} ms",
        ),
        ("max relative error (heclave / TenSEAL)", f"{r['max_rel_err']:.1e} / {r['tenseal_max_rel_err']:.1e}"),
        ("layout", r["layout"]),
    ]
    _emit(r, as_json, f"dense {n_out}x{n_in}, {weights} weights, N = 8192", rows)


@bench.command()
@click.option(
    "--weights",
    type=WEIGHT_CHOICE,
    default="encrypted",
    show_default=True,
    help="heclave's weight form; TenSEAL's recipe always has plaintext weights.",
)
@click.option("--samples", default=20, show_default=True, help="Random 28x28 images heclave classifies.")
@click.option(
    "--batch",
    default=1,
    show_default=True,
    help="Images per request; the model is planned for it (throughput mode packs several images per "
    "ciphertext where the slots allow). ours_ms is then the latency of a whole batch.",
)
@click.option("--tenseal-runs", default=2, show_default=True, help="Images through TenSEAL's recipe (seconds each).")
@click.option(
    "--verification-rounds",
    default=3,
    show_default=True,
    help="Times every image goes through heclave with and without the enclave's checks of the server's "
    "layers (a second cluster whose enclave skips them), alternating, for the verification overhead.",
)
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def cnn(
    weights: str, samples: int, batch: int, tenseal_runs: int, verification_rounds: int, seed: int, as_json: bool
) -> None:
    """TenSEAL's tutorial CNN through heclave's four processes, against TenSEAL's recipe and plaintext torch.

    DEVELOPMENT RUN: the enclave runs natively and presents no SGX quote; the owners accept it only here.
    """
    from .cnn import bench_cnn

    with Console(stderr=True).status("starting") as status:
        r = bench_cnn(WeightForm(weights), samples, batch, tenseal_runs, seed, verification_rounds, say=status.update)
    rows = [
        ("heclave, four processes (p50 latency per request)", f"{r['ours_ms']:.1f} ms"),
        ("TenSEAL recipe (x^2, plaintext weights)", f"{r['tenseal_recipe_ms']:.0f} ms"),
        ("plaintext torch", f"{r['plaintext_ms']:.2f} ms"),
        ("speedup over TenSEAL", f"{r['speedup_vs_tenseal']:.1f}x"),
        ("slowdown against plaintext", f"{r['slowdown_vs_plaintext']:.0f}x"),
        ("  server HE work per image", f"{r['server_he_ms_per_image']:.1f} ms"),
        (
            "  enclave work per image, request path / precomputed",
            f"{r['enclave_ms_per_image']:.1f} / {r['enclave_offline_ms_per_image']:.1f} ms",
        ),
        ("  data-owner encryption per image", f"{r['client_encrypt_ms_per_image']:.1f} ms"),
        (
            "enclave share: request path / with precomputation",
            f"{r['enclave_share']:.2f} / {r['enclave_share_with_offline']:.2f}",
        ),
        ("label agreement with plaintext", f"{r['agreement']:.3f} ({r['samples']} images)"),
        ("images per second", f"{r['images_per_s']:.1f} (batch {r['batch']})"),
        (
            "public context (base + Galois keys)",
            f"{r['public_context_mb']:.1f} MB ({r['base_context_mb']:.1f} + {r['galois_keys_mb']:.1f}); "
            f"TenSEAL {r['tenseal_public_context_mb']:.1f} MB",
        ),
        ("peak RSS server / enclave", f"{r['server_peak_rss_mb']:.0f} / {r['enclave_peak_rss_mb']:.0f} MB"),
        ("rotations per image", f"{r['rotations_per_image']:.0f}"),
        _verification_row(r["verification"]),
    ]
    _emit(r, as_json, f"TenSEAL's tutorial CNN, {weights} weights", rows)


def _verification_row(v: dict) -> tuple[str, str]:
    """What verifying the server's layers costs: p50 latency and enclave ms per image, against the bounds."""
    verdict = "within" if v["within_bounds"] else "OUTSIDE"
    return (
        "verification overhead: p50 latency / enclave ms per image",
        f"{v['latency_overhead']:+.1%} ({v['latency_ms_verified']:.1f} vs {v['latency_ms_unverified']:.1f} ms) / "
        f"{v['enclave_overhead']:+.1%} ({v['enclave_ms_verified']:.2f} vs {v['enclave_ms_unverified']:.2f} ms); "
        f"{verdict} 5% / 10%",
    )


@bench.command()
@click.option("--workers", default="1,2", show_default=True, help="Comma-separated worker counts to compare.")
@click.option(
    "--backend",
    "backends",
    multiple=True,
    type=click.Choice(["processes", "ray"]),
    default=("processes", "ray"),
    show_default=True,
    help="Where the HE work runs (repeatable).",
)
@click.option(
    "--model",
    "models",
    multiple=True,
    type=click.Choice(["tutorial-cnn", "vgg-32"]),
    default=("tutorial-cnn", "vgg-32"),
    show_default=True,
)
@click.option("--clients", default=4, show_default=True, help="Concurrent data owners.")
@click.option("--requests", default=3, show_default=True, help="Batch requests per data owner.")
@click.option("--batch", default=8, show_default=True, help="Images per request (the models are planned for it).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def scale(
    workers: str,
    backends: tuple[str, ...],
    models: tuple[str, ...],
    clients: int,
    requests: int,
    batch: int,
    as_json: bool,
) -> None:
    """Throughput and latency against the number of HE workers, on local processes and on Ray.

    Without Ray installed (the `ray` extra) the Ray rows are skipped, and the output says so.
    """
    from .scale import bench_scale

    counts = [int(w) for w in workers.split(",")]
    with Console(stderr=True).status("starting") as status:
        report = bench_scale(counts, list(backends), list(models), clients, requests, batch, say=status.update)
    if as_json:
        click.echo(json.dumps(report))
    else:
        _print_scale(report, f"HE workers: {clients} data owners x {requests} requests of {batch} images")
    _say_skipped(report["skipped"])


def _print_scale(report: dict, title: str) -> None:
    """The measured rows as a table, then where the enclave stops more workers from helping."""
    table = Table(title=title, caption=f"{time.strftime('%Y-%m-%d')} on {_machine()}")
    for column in ("model", "backend", "workers", "images/s", "p50 latency (ms)", "speedup", "agreement"):
        table.add_column(column, justify="right")
    for r in report["runs"]:
        table.add_row(
            r["model"],
            r["backend"],
            str(r["workers"]),
            f"{r['images_per_s']:.1f}",
            f"{r['latency_ms_p50']:.0f}",
            f"{r['speedup_vs_first']:.2f}x",
            f"{r['agreement']:.3f}",
        )
    Console().print(table)
    for p in report["projection"]:
        Console().print(
            f"{p['model']}: {p['he_ms_per_image']:.1f} ms HE and {p['enclave_ms_per_image']:.2f} ms enclave per image; "
            f"the enclave bounds throughput at {p['enclave_limit_images_per_s']:.0f} images/s, reached near "
            f"{p['enclave_bound_at_workers']:.0f} workers (64 workers: {p['images_per_s_at_64_workers']:.0f} images/s)."
        )


def _say_skipped(skipped: list[dict]) -> None:
    """One sentence per backend that could not run: which rows are missing from the report, and why."""
    for backend in dict.fromkeys(s["backend"] for s in skipped):
        rows = [s for s in skipped if s["backend"] == backend]
        models = ", ".join(dict.fromkeys(s["model"] for s in rows))
        counts = ", ".join(dict.fromkeys(str(s["workers"]) for s in rows))
        click.echo(
            f"Skipped the {len(rows)} {backend} row(s) ({models} at {counts} worker(s)): {rows[0]['reason']}", err=True
        )


@bench.command()
@click.option("--requests", default=5, show_default=True, help="Images timed per strategy.")
@click.option(
    "--weights", type=WEIGHT_CHOICE, default="encrypted", show_default=True, help="Weight form of heclave's he layers."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def placements(requests: int, weights: str, as_json: bool) -> None:
    """The seed systems' partitions of one VGG-style model, side by side through the real processes."""
    from .placements import bench_placements

    logging.getLogger("heclave.parties.model_owner").setLevel(logging.ERROR)
    with Console(stderr=True).status("starting") as status:
        report = bench_placements(requests, weights, say=status.update)
    if as_json:
        click.echo(json.dumps(report))
        return
    table = Table(
        title=f"Placements of a VGG-style CNN (32x32x3), {requests} images",
        caption=f"{time.strftime('%Y-%m-%d')} on {_machine()}",
    )
    columns = ("strategy", "latency (ms)", "enclave share (request path / all)", "MB moved", "agreement")
    for column in (*columns, "the server sees"):
        table.add_column(column)
    for r in report["strategies"]:
        table.add_row(
            r["name"],
            f"{r['latency_ms']:.1f}",
            f"{r['enclave_share']:.2f} / {r['enclave_share_with_offline']:.2f}",
            f"{r['bytes_per_image'] / 1e6:.2f}",
            f"{r['agreement']:.2f}",
            "; ".join(r["exposes"]) or "shapes and timings only",
        )
    Console().print(table)


@bench.command()
@click.option(
    "--model",
    "models",
    multiple=True,
    metavar="NAME",
    help="A model of heclave.examples.zoo.ZOO (repeatable; default: every one): resnet20, vgg16, mobilenetv2, "
    "resnet18, resnet50, digits-cnn, breast-cancer-mlp.",
)
@click.option("--weights", type=WEIGHT_CHOICE, default="encrypted", show_default=True, help="Weight form deployed.")
@click.option("--batch", default=1, show_default=True, help="Inputs per request; the models are planned for it.")
@click.option("--samples", default=20, show_default=True, help="Random inputs each deployed model classifies.")
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def zoo(models: tuple[str, ...], weights: str, batch: int, samples: int, seed: int, as_json: bool) -> None:
    """Import and plan each zoo model; deploy the ones that plan and compare them with plaintext torch.

    A model the planner refuses is a row saying why. DEVELOPMENT RUN: the enclave runs natively and presents
    no SGX quote; the owners accept it only here.
    """
    from .zoo import ZOO, bench_zoo

    with Console(stderr=True).status("starting") as status:
        report = bench_zoo(models or tuple(ZOO), WeightForm(weights), batch, samples, seed, say=status.update)
    if as_json:
        click.echo(json.dumps(report))
        return
    table = Table(
        title=f"The model zoo: {weights} weights, batch {batch}, {samples} random inputs per deployed model",
        caption=f"{time.strftime('%Y-%m-%d')} on {_machine()}",
    )
    columns = ("plan s", "deploy s", "p50 ms/request", "HE ms/input", "enclave ms/input", "share", "agree")
    for column in ("model", "trained", "params", *columns, "err/range", "torch ms"):
        table.add_column(column, justify="left" if column in ("model", "trained") else "right")
    refusals = []
    for r in report["models"]:
        common = (r["model"], "yes" if r["trained"] else "random", _count(r["parameters"]))
        if r["status"] != "planned":
            refusals.append(f"{r['model']}, refused at {r['refused_at']}: {r['reason']}")
            if r["refused_at"] == "planning":
                table.add_row(*common, f"refused ({r['import_plan_s']:.1f})")
            else:
                table.add_row(*common, f"{r['import_plan_s']:.1f}", "refused")
            continue
        table.add_row(
            *common,
            f"{r['import_plan_s']:.1f}",
            f"{r['deploy_s']:.1f}",
            f"{r['latency_ms_p50']:.1f}",
            f"{r['server_he_ms_per_image']:.1f}",
            f"{r['enclave_ms_per_image']:.1f}",
            f"{r['enclave_share']:.2f}",
            f"{r['agreement']:.2f}",
            f"{r['max_logit_error_over_range']:.0e}",
            f"{r['plaintext_ms']:.2f}",
        )
    Console().print(table)
    for line in refusals:
        Console().print(line, highlight=False)


def _count(n: int) -> str:
    """A parameter count the way papers give it: 530, 4.6k, 272k, 11.7M."""
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.{1 if n < 100 * size else 0}f}{unit}"
    return str(n)


@click.command("loadtest")
@click.option("--clients", default=8, show_default=True, help="Concurrent data owners.")
@click.option("--requests", default=25, show_default=True, help="Requests each data owner sends.")
@click.option("--weights", type=WEIGHT_CHOICE, default="encrypted", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@workload_option()
def loadtest_command(clients: int, requests: int, weights: str, as_json: bool, workload: Workload) -> None:
    """Start the processes, run many data owners at once, and check every answer against plaintext."""
    from heclave.protocol.service import configure_logging

    from .loadtest import loadtest

    configure_logging(False)
    logging.getLogger("heclave.protocol.evidence").setLevel(logging.ERROR)
    with Console(stderr=True).status("load test") as status:
        report = loadtest(clients, requests, weights, workload, say=status.update)
    if as_json:
        click.echo(json.dumps(report))
        return
    table = Table(title=f"heclave loadtest: {clients} clients x {requests} requests, {weights} weights")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in report.items():
        table.add_row(key, f"{value:.1f}" if isinstance(value, float) else str(value))
    Console().print(table)
