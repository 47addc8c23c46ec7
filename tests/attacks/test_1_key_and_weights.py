"""A malicious server operator after a model's secret key or encrypted weights: refused, nothing secret out."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from heclave.arith.sparse import SparseMatrix
from heclave.he.slots import SlotCodec
from heclave.parties.data_owner import DataOwner
from heclave.protocol.errors import ErrorCode, HeclaveError
from heclave.tee.release import FLOOD
from heclave.tee.verify import LinearCheck
from tests.helpers import DATA_OWNER

from .forge import (
    decrypt_with,
    key_probe,
    levels,
    output_scale,
    polynomial_probe,
    to_output_level,
    with_scale,
)
from .tools import (
    DEV,
    INPUT,
    Deployed,
    Probe,
    assert_close,
    deployed,
    output_polynomials,
    random_input,
    run_to,
    two_layers,
)

BAD, INTEGRITY = ErrorCode.BAD_CIPHERTEXT, ErrorCode.INTEGRITY


# --- control: the operator's tooling drives the real protocol --------------------------------------------------------


def test_the_operators_honest_run_releases_the_right_logits(operator, attacker, victim):
    """Without this, every refusal below could be an artefact of the tooling rather than the enclave's doing."""
    x = random_input(victim)
    probe = operator.begin(attacker, victim, x)
    assert probe.expected == 0 and len(probe.handout) == 1
    released = probe.run()
    assert_close(released[0], victim.reference(x)[0])


# --- 1. secret-key extraction through the operator's own model -------------------------------------------------------


def test_key_probe_with_scale_one_is_refused(operator, attacker, own_model, still_serves):
    """(0, 1) decrypts to the secret key s; at scale 1 its slots would be s itself, 2^40 times the signal."""
    probe = operator.begin(attacker, own_model, random_input())
    probe.refused([key_probe(probe.context, output_polynomials(probe), scale=1.0)], BAD)
    still_serves(own_model)


def test_key_probe_at_the_layer_scale_fails_the_check(operator, attacker, own_model, still_serves):
    probe = operator.begin(attacker, own_model, random_input())
    ctx = probe.context
    assert output_scale(ctx) == ctx.params.scale**2 / levels(ctx)[0].moduli[-1]
    probe.refused([key_probe(ctx, output_polynomials(probe))], INTEGRITY)
    still_serves(own_model)


def test_key_probe_on_a_zero_input_is_released_only_under_flooding(operator, attacker, own_model, still_serves):
    """With x = 0 the layer's honest result is noise, and the key probe's decryption (s over 2^40, about 1e-10 a
    slot) is smaller than that noise: no check on the result can tell them apart. What protects the key then is
    the release: Gaussian noise of FLOOD times the check's tolerance, about 1e6 times the key's term here.

    The key probe passes or fails the check; if it passes, the released logits must be the bias plus noise far
    above what a raw decryption would show (a release without flooding stays within 1e-8 of the bias).
    """
    probe = _zero_input_key_probe(operator, attacker, own_model)
    if probe is not None:
        released = probe.released()[0]
        bias = own_model.plan.weights[0][:, -1]
        g = own_model.plan.graph.stages[0].layout
        check = LinearCheck(SparseMatrix.from_dense(own_model.plan.weights[0][:, :-1]), g, True, probe.context.params)
        bound = check.tolerances(np.zeros((1, INPUT))).max()
        deviation = np.abs(np.asarray(released["logits"]) - bias)
        assert float(released["noise_sd"]) == pytest.approx(FLOOD * bound, rel=1e-6)
        assert deviation.max() > 100 * _key_term(probe), "the release carries no flooding noise above the key's term"
        assert deviation.max() < 10 * float(released["noise_sd"]) + _key_term(probe)
    still_serves(own_model)


def _zero_input_key_probe(operator, attacker, model: Deployed) -> Probe | None:
    """The key probe as the first stage's result for input 0: the probe if the enclave took it, ``None`` if it
    refused it with ``integrity`` and ended the request (both are allowed; what follows must then hold)."""
    probe = operator.begin(attacker, model, np.zeros(INPUT))
    try:
        probe.activate([key_probe(probe.context, output_polynomials(probe))])
    except HeclaveError as exc:
        assert exc.code == INTEGRITY and probe.result is None
        probe.assert_ended()
        return None
    return probe


def _key_term(probe: Probe) -> float:
    """The key's whole term in one output of the first stage: at most (slots summed) * N / scale, about 1e-7."""
    g = probe.operator.graph(probe.model_id).stages[0].layout
    return np.bincount(g.output_row[g.output_row >= 0]).max() * g.slots * 2 / output_scale(probe.context)


@pytest.fixture(scope="module")
def he_then_plain(cluster) -> Iterator[Deployed]:
    """A model whose owner let the server run its second layer in the clear (it sees that layer's input)."""
    yield from deployed(cluster, two_layers(15), placements=["he", "plain"])


def test_key_probe_before_a_plain_stage_is_not_handed_out_in_the_clear(operator, attacker, he_then_plain, still_serves):
    """The zero-input key probe again, on a model whose he stage is followed by a plain one.

    The enclave hands the server the plain stage's input in the clear. If it accepts the forged result, that
    input must not be the forged ciphertext's exact decryption: it would give the server ``relu(b + t s(z))``
    for every ``t`` it likes, exact linear functionals of this model's secret key, without any flooding.
    """
    model = he_then_plain
    probe = _zero_input_key_probe(operator, attacker, model)
    if probe is not None:
        assert probe.form == "plain", "the enclave should hand out the plain stage's input"
        handed = np.frombuffer(probe.handout[0], dtype="<f8")
        bias = model.plan.weights[0][:, -1]
        leaked = np.abs(handed - bias)[bias > 1e-2]
        assert leaked.size
        assert leaked.max() > 100 * _key_term(probe), (
            f"the plain activation handed to the server is the forged ciphertext's raw decryption: it differs "
            f"from relu(bias) by at most {leaked.max():.2e}, the key's term alone"
        )
    still_serves(model)


@pytest.fixture(scope="module")
def wide_he_then_plain(cluster) -> Iterator[Deployed]:
    """A 64-64-4 model, first layer ``he`` (its 64 rows sum all 4096 slots), second ``plain``; its owner's biases
    keep the ReLU open at x = 0 (with others, the server, which sees the plain layer's input, first looks for an
    input that opens it)."""
    torch.manual_seed(17)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    with torch.no_grad():
        net[0].bias.fill_(1.0)
    yield from deployed(cluster, net, input_shape=(64,), placements=["he", "plain"])


def test_the_server_cannot_recover_a_models_secret_key_before_a_plain_stage(
    cluster, operator, attacker, wide_he_then_plain, still_serves
):
    """The key probe with chosen polynomials ``a``: 130 requests of the operator's own (x = 0), each stage-0 result
    ``(0, a)``, each ``a`` concentrating ``2^14`` on one slot per row. The plain handouts are ``b + sum Re(a(z) s(z))
    / scale`` per row, exactly; solving for ``s(z)`` at all 4096 slots gives ``s``. The test then uses that ``s``
    on an honest data owner's input ciphertext: the attack must fail (refused, or too noisy to decrypt anything).
    """
    model = wide_he_then_plain
    ctx = operator.context(model.model_id)
    g = model.plan.graph.stages[0].layout
    assert g.out_cts == 1 and (g.output_row[0] >= 0).all(), "the layout should sum every slot into some row"
    codec = SlotCodec(ctx.params.poly_modulus_degree)
    rows = [np.nonzero(g.output_row[0] == r)[0] for r in range(g.rows)]
    width = len(rows[0])
    chosen = [(m, phase) for m in range(width) for phase in (1, 1j)] + [(0, -1), (1, -1j)]
    probes, seen = [], []
    for m, phase in chosen:
        values = np.zeros(codec.slots, dtype=np.complex128)
        for slots in rows:
            values[slots[m]] = 2.0**14 * phase
        a = codec.encode(values, 1.0)
        probe = operator.begin(attacker, model, np.zeros(model.inputs))
        try:
            probe.activate([polynomial_probe(ctx, 3, a)])
        except HeclaveError as exc:
            assert exc.code == INTEGRITY and probe.result is None
            probe.assert_ended()
            still_serves(model)
            return
        assert probe.form == "plain"
        probes.append(codec.decode(a.astype(np.float64), 1.0))
        seen.append(np.frombuffer(probe.handout[0], dtype="<f8"))
        probe.step()  # finish it (the release is sealed to the operator's own session)
        assert probe.result is not None
    # Per row: b_r and the real and imaginary parts of s(z) at the row's slots, by least squares.
    evaluations, seen, scale = np.stack(probes), np.stack(seen), output_scale(ctx)
    key_slots = np.zeros(codec.slots, dtype=np.complex128)
    for r, slots in enumerate(rows):
        a_k = evaluations[:, slots] / scale
        system = np.concatenate([np.ones((len(a_k), 1)), a_k.real, -a_k.imag], axis=1)
        solution = np.linalg.lstsq(system, seen[:, r], rcond=None)[0]
        key_slots[slots] = solution[1 : 1 + width] + 1j * solution[1 + width :]
    secret = codec.encode(key_slots, 1.0)
    # An honest data owner's input, as the server receives it.
    victim = DataOwner(cluster.endpoint, cluster.server_key_file, DATA_OWNER, DEV)
    try:
        x = np.random.default_rng().uniform(-1, 1, size=model.inputs)
        request = victim.prepare(model.model_id, x[None])
    finally:
        victim.close()
    read = decrypt_with(ctx, request.buffers[0], secret).real
    laid_out = g.gather_batch(x[None])[0].real
    error = np.abs(read - laid_out).max()
    assert error > 0.1, (
        f"the server recovered the model's secret key (max |s| = {np.abs(secret).max()}) from the plain stage's "
        f"inputs and decrypted a data owner's input to within {error:.1e}"
    )
    still_serves(model)


# --- 2. read the victim's encrypted weights back through a release ---------------------------------------------------


@pytest.mark.parametrize("into", ["own model", "victim model"])
def test_victims_encrypted_weights_as_a_layer_output_are_refused(
    operator, attacker, own_model, victim, into, still_serves
):
    """The weights are fresh ciphertexts at the top level: not what any layer leaves."""
    weights = operator.bundle(victim.model_id).weights
    probe = operator.begin(attacker, own_model if into == "own model" else victim, random_input(victim))
    probe.refused(weights[: len(probe.honest())], BAD)
    still_serves()


@pytest.mark.parametrize("into", ["own model", "victim model"])
def test_victims_encrypted_weights_moved_to_the_output_level_fail_the_check(
    operator, attacker, own_model, victim, into, still_serves
):
    """Dropped to the output level with the right scale field they parse, but decrypt to noise under another
    model's key, and to the diagonals (not W x) under the victim's own."""
    weights = operator.bundle(victim.model_id).weights
    probe = operator.begin(attacker, own_model if into == "own model" else victim, random_input(victim))
    polys, count = output_polynomials(probe), len(probe.honest())
    probe.refused([to_output_level(probe.context, w, polys) for w in weights[:count]], INTEGRITY)
    still_serves()


# --- 3. skipping to the last stage -----------------------------------------------------------------------------------


def test_chosen_partial_sums_for_the_last_stage_before_the_first_are_refused(operator, attacker, victim, still_serves):
    probe = operator.begin(attacker, victim, random_input(victim))
    ctx = probe.context
    chosen = to_output_level(ctx, ctx.encrypt(np.full(8, 1e3)), 3)
    probe.refused([chosen], ErrorCode.OUT_OF_ORDER, stage=1)
    still_serves()


def test_last_stage_with_its_scale_divided_by_2_20_is_refused(operator, attacker, victim, still_serves):
    """Amplifying the released values 2^20 times (and the key's share of them with it)."""
    probe = run_to(operator.begin(attacker, victim, random_input(victim)), 1)
    frames = [with_scale(probe.context, f, output_scale(probe.context) / 2**20) for f in probe.honest()]
    probe.refused(frames, BAD)
    still_serves()


def test_chosen_partial_sums_for_the_last_stage_fail_the_check(operator, attacker, victim, still_serves):
    probe = run_to(operator.begin(attacker, victim, random_input(victim)), 1)
    ctx = probe.context
    chosen = [to_output_level(ctx, ctx.encrypt(np.linspace(-5, 5, 64)), output_polynomials(probe))]
    probe.refused(chosen, INTEGRITY)
    still_serves()
