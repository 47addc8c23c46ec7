"""What several ``heclave`` commands share: the long-running processes' and the owners' options, and loading
the models and workloads users name."""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path

import click

from heclave.protocol.evidence import VerifierPolicy
from heclave.protocol.identity import Identity, IdentityError
from heclave.protocol.service import Option

DEFAULT_WORKLOAD = "heclave.workloads:digits"


def service_options(common: Sequence[Option]) -> Callable:
    """A long-running process's common options (``protocol.service.options``) as click options."""

    def decorate(command: Callable) -> Callable:
        for option in reversed(common):
            if option.switch:
                command = click.option(option.flag, is_flag=True, help=option.help)(command)
                continue
            kind = click.Path(path_type=Path) if option.path else str
            shown = option.default is not None
            command = click.option(
                option.flag, type=kind, default=option.default, show_default=shown, help=option.help
            )(command)
        return command

    return decorate


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


def policy_from(policy_file: Path | None = None, **flags) -> VerifierPolicy:
    """The owner's verifier policy: the TOML file if given, with command-line flags taking precedence."""
    if policy_file is not None:
        return VerifierPolicy.from_toml(policy_file, **flags)
    return VerifierPolicy.from_mapping({k: v for k, v in flags.items() if v is not None})


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated shape such as 1,8,8") from None


def _named(spec: str, hint: str, module_name: str) -> object:
    """The object ``path/to/file.py:NAME`` or ``package.module:NAME`` names; a file is imported as
    ``module_name``, since it belongs to no package."""
    source, _, attr = spec.partition(":")
    if not attr:
        raise click.BadParameter("use FILE.py:NAME or MODULE:NAME", param_hint=hint)
    if source.endswith(".py"):
        module_spec = importlib.util.spec_from_file_location(module_name, source)
        if module_spec is None or module_spec.loader is None:
            raise click.BadParameter(f"cannot import {source}", param_hint=hint)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(source)
    if not hasattr(module, attr):
        raise click.BadParameter(f"{source} has no {attr!r}", param_hint=hint)
    return getattr(module, attr)


def load_model(spec: str, state_dict: Path | None):
    """A torch module from ``path/to/file.py:name`` or ``package.module:name`` (a module or a factory)."""
    import torch

    obj = _named(spec, "--model", "heclave_user_model")
    model = obj if isinstance(obj, torch.nn.Module) else obj()
    if state_dict is not None:
        model.load_state_dict(torch.load(state_dict, weights_only=True))
    return model.eval()


def load_workload(spec: str):
    """The :class:`heclave.workloads.Workload` that ``MODULE:FUNCTION`` or ``FILE.py:FUNCTION`` returns (or
    names directly); a bare ``NAME`` is ``heclave.workloads:NAME``, so ``digits`` is the default one."""
    from heclave.workloads import Workload  # on use: the workloads load torch and scikit-learn

    obj = _named(spec if ":" in spec else f"heclave.workloads:{spec}", "--workload", "heclave_user_workload")
    workload = obj() if callable(obj) else obj
    if not isinstance(workload, Workload):
        raise click.BadParameter(f"{spec} gives a {type(workload).__name__}, not a Workload", param_hint="--workload")
    return workload


def workload_option(*aliases: str) -> Callable:
    """``--workload MODULE:FUNCTION``: the task a command runs on, its model's input shape and its data; the
    command receives the loaded ``workload``."""
    return click.option(
        "--workload",
        *aliases,
        "workload",
        default=DEFAULT_WORKLOAD,
        show_default=True,
        metavar="MODULE:FUNCTION",
        callback=lambda _ctx, _param, value: load_workload(value),
        help="The workload: a function returning a heclave.workloads.Workload (input shape, data, and the "
        "model it trains), as MODULE:FUNCTION or FILE.py:FUNCTION; a bare NAME is one of heclave.workloads.",
    )


def client_options(f):
    """The server to reach, the policy its enclave must meet and the owner's identity; the command receives
    ``policy`` and ``identity``."""

    @functools.wraps(f)
    def command(**kwargs):
        kwargs["policy"] = policy_from(**{k: kwargs.pop(k) for k in POLICY_FLAGS})
        try:
            kwargs["identity"] = Identity.load(kwargs.pop("identity_file"))
        except IdentityError as exc:
            raise click.BadParameter(exc.message, param_hint="--identity") from None
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
            "--identity",
            "identity_file",
            type=click.Path(path_type=Path),
            required=True,
            help="This owner's identity file (from `heclave keygen`).",
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
