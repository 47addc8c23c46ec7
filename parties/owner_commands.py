"""``heclave keygen``, ``heclave model-owner`` and ``heclave data-owner``: the owners' identities and the two
clients, each talking to a server it pins under its identity."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import click
import numpy as np

from heclave.graph.placement import WeightForm
from heclave.graph.release import ReleaseMode, ReleasePolicy
from heclave.protocol.errors import PlanError
from heclave.protocol.evidence import VerifierPolicy
from heclave.protocol.identity import Identity, IdentityError, parse_public
from heclave.protocol.service import configure_logging

from .options import client_options, load_model, parse_shape


@click.command()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Where to write the new identity.")
def keygen(out: Path) -> None:
    """Make an owner's identity (readable by you only); prints the public identity and CURVE key to share."""
    identity = Identity.generate()
    try:
        identity.save(out)
    except IdentityError as exc:
        raise click.BadParameter(exc.message, param_hint="--out") from None
    click.echo(f"identity {identity.public_hex}")
    click.echo(f"curve    {identity.curve.public.decode()}")
    click.echo(f"wrote {out} (mode 600): give the identity to model owners, the curve key to server operators.")


READERS = click.option(
    "--reader",
    "readers",
    multiple=True,
    help="A data owner's identity (hex, from `heclave keygen`) that may query the model; repeat for more.",
)
ANYONE = click.option("--anyone", is_flag=True, help="Let any identity query the model.")


@click.group("model-owner")
def model_owner() -> None:
    """Model-owner commands."""


@model_owner.command()
@client_options
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
@READERS
@ANYONE
def deploy(
    endpoint: str,
    server_key: Path,
    policy: VerifierPolicy,
    identity: Identity,
    readers: tuple[str, ...],
    anyone: bool,
    model_spec: str,
    state_dict: Path | None,
    input_shape: str,
    weights: str,
    release: str,
    decimals: int,
    batch: int,
    plan_file: Path | None,
) -> None:
    """Plan a torch model and deploy it under your identity; prints the model id.

    Only you, the --reader identities and, with --anyone, every identity may query it."""
    from heclave.parties.model_owner import ModelOwner

    configure_logging(False)
    placements = None
    if plan_file is not None:
        from heclave.plan.plan_file import PlanFile

        try:
            chosen = PlanFile.read(plan_file)
        except PlanError as exc:
            raise click.BadParameter(exc.message, param_hint="--plan") from None
        placements, weights, batch = chosen.placements, chosen.weights, chosen.batch
    owner = ModelOwner(endpoint, server_key, identity, policy)
    plan = owner.plan(
        load_model(model_spec, state_dict),
        parse_shape(input_shape),
        weights,
        ReleasePolicy(ReleaseMode(release), decimals),
        batch=batch,
        placements=placements,
    )
    with _deploy_progress(weights) as progress:
        model_id = owner.deploy(plan, [parse_reader(r) for r in readers], anyone, progress)
    click.echo(model_id)


@contextmanager
def _deploy_progress(weights: str) -> Iterator[Callable[[str, int, int], None]]:
    """Bars on stderr for a deployment's steps (``ModelOwner.deploy``'s ``progress``) when it is a terminal, gone
    once it is done; the model id alone goes to stdout."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    labels = {"prepare": f"{'encrypting' if weights == 'encrypted' else 'preparing'} weights", "upload": "uploading"}
    columns = (TextColumn("model owner: {task.description}"), BarColumn(), TaskProgressColumn(), TimeRemainingColumn())
    console = Console(stderr=True)
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bars:
        tasks: dict[str, int] = {}

        def progress(step: str, done: int, total: int) -> None:
            if step not in tasks:
                tasks[step] = bars.add_task(labels.get(step, step), total=total)
            bars.update(tasks[step], completed=done, total=total)

        yield progress


def parse_reader(text: str) -> bytes:
    try:
        return parse_public(text)
    except IdentityError as exc:
        raise click.BadParameter(exc.message, param_hint="--reader") from None


@model_owner.command()
@client_options
@click.option("--model-id", required=True)
@READERS
@ANYONE
def grant(
    endpoint: str,
    server_key: Path,
    policy: VerifierPolicy,
    identity: Identity,
    model_id: str,
    readers: tuple[str, ...],
    anyone: bool,
) -> None:
    """Replace who may query one of your models (you always may)."""
    from heclave.parties.model_owner import ModelOwner

    configure_logging(False)
    ModelOwner(endpoint, server_key, identity, policy).grant(model_id, [parse_reader(r) for r in readers], anyone)
    click.echo(f"model {model_id}: {len(readers)} readers{', and anyone' if anyone else ''}")


@model_owner.command()
@client_options
@click.option("--model-id", required=True)
def undeploy(endpoint: str, server_key: Path, policy: VerifierPolicy, identity: Identity, model_id: str) -> None:
    """Remove one of your models: the enclave forgets its keys, the server stops serving it."""
    from heclave.parties.model_owner import ModelOwner

    configure_logging(False)
    ModelOwner(endpoint, server_key, identity, policy).undeploy(model_id)
    click.echo(f"undeployed {model_id}")


@click.group("data-owner")
def data_owner() -> None:
    """Data-owner commands."""


@data_owner.command()
@client_options
@click.option("--model-id", required=True)
@click.option(
    "--input",
    "input_file",
    type=click.Path(exists=True, path_type=Path),
    required=True,
    help=".npy file: one input, or a batch along the first axis.",
)
@click.option("--batch", default=1, show_default=True, help="Inputs sent per request.")
@click.option(
    "--allow-plain-input",
    is_flag=True,
    help="INSECURE for the input: let a model whose first layer is 'plain' show it to the server in the clear.",
)
def infer(
    endpoint: str,
    server_key: Path,
    policy: VerifierPolicy,
    identity: Identity,
    model_id: str,
    input_file: Path,
    batch: int,
    allow_plain_input: bool,
) -> None:
    """Classify private inputs; prints one JSON result per input."""
    from heclave.parties.data_owner import DataOwner

    configure_logging(False)
    owner = DataOwner(endpoint, server_key, identity, policy, allow_plain_input=allow_plain_input)
    x = np.load(input_file, allow_pickle=False)
    size = int(np.prod(owner.graph(model_id).input_shape))
    if x.size % size:
        raise click.BadParameter(f"{input_file} holds {x.size} values, not a whole number of {size}-value inputs")
    inputs = x.reshape(-1, size)
    for start in range(0, len(inputs), batch):
        inference = owner.infer_batch(model_id, inputs[start : start + batch])
        for result in inference.results:
            click.echo(json.dumps({**result, "latency_ms": round(inference.latency_ms, 2)}))
