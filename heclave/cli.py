"""The ``heclave`` command line: the processes, the owners' commands, planning, and the benchmarks.

It sits above every layer (the parties, the planner and the benchmarks each
define their own commands), so none of them imports another to be reachable
from the one command.
"""

from __future__ import annotations

import sys

import click

from heclave.benchmarks.commands import bench, loadtest_command
from heclave.parties.owner_commands import data_owner, keygen, model_owner
from heclave.parties.planning_commands import assess, calibrate, plan_command
from heclave.parties.process_commands import demo, enclave, server
from heclave.protocol.errors import HeclaveError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """heclave: confidential inference with CKKS on the server and an enclave for the exact nonlinear steps."""


for command in (enclave, server, demo, keygen, model_owner, data_owner, assess, calibrate, plan_command, bench):
    main.add_command(command)
main.add_command(loadtest_command, "loadtest")


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
