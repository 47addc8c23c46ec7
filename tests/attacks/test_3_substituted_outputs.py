"""A malicious server operator substituting, altering or miscomputing layer outputs: the checks refuse them."""

from __future__ import annotations

import numpy as np
import pytest

from heclave.he.linear import LinearKernel, encrypt_weights
from heclave.he.serialize import to_bytes
from heclave.protocol.errors import ErrorCode

from .forge import (
    levels,
    output_scale,
    parse_output,
    times_monomial,
    to_output_level,
    with_coefficient_added,
    with_parms_id,
    with_polynomials,
    with_scale,
)
from .tools import (
    Deployed,
    Probe,
    assert_close,
    output_polynomials,
    random_input,
    run_to,
    stage_input,
)

BAD, INTEGRITY = ErrorCode.BAD_CIPHERTEXT, ErrorCode.INTEGRITY


# --- 5. substituted layer outputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [0, 1])
def test_another_requests_layer_output_fails_the_check(operator, attacker, victim, stage, still_serves):
    x, y = random_input(victim), random_input(victim)
    target = run_to(operator.begin(attacker, victim, x), stage)
    other = run_to(operator.begin(attacker, victim, y), stage)
    target.refused(other.honest(), INTEGRITY)
    # The other request is not disturbed by the failure.
    assert_close(other.run()[0], victim.reference(y)[0])
    still_serves()


@pytest.mark.parametrize("stage", [0, 1])
def test_another_models_layer_output_fails_the_check(operator, attacker, victim, twin, stage, still_serves):
    """The twin has the victim's layouts and parameters (same level, scale and counts), but its own key."""
    x = random_input(victim)
    target = run_to(operator.begin(attacker, victim, x), stage)
    other = run_to(operator.begin(attacker, twin, x), stage)
    target.refused(other.honest(), INTEGRITY)
    assert_close(other.run()[0], twin.reference(x)[0])
    still_serves(victim, twin)


@pytest.mark.parametrize("stage", [0, 1])
def test_a_fresh_encryption_in_place_of_a_layer_output_is_refused(operator, attacker, victim, stage, still_serves):
    probe = run_to(operator.begin(attacker, victim, random_input(victim)), stage)
    probe.refused([probe.context.encrypt(np.linspace(-1, 1, 32))], BAD)
    still_serves()


@pytest.mark.parametrize("stage", [0, 1])
def test_a_fresh_encryption_moved_to_the_output_level_fails_the_check(operator, attacker, victim, stage, still_serves):
    probe = run_to(operator.begin(attacker, victim, random_input(victim)), stage)
    forged = to_output_level(probe.context, probe.context.encrypt(np.linspace(-1, 1, 32)), output_polynomials(probe))
    probe.refused([forged], INTEGRITY)
    still_serves()


@pytest.mark.parametrize("stage", [0, 1])
def test_the_layer_honestly_computed_on_another_input_fails_the_check(operator, attacker, victim, stage, still_serves):
    """The server runs the right layer on ciphertexts of its own choosing (for stage 0: another owner's input)."""
    probe = run_to(operator.begin(attacker, victim, random_input(victim)), stage)
    ctx, g = probe.context, operator.graph(victim.model_id).stages[stage].layout
    other = np.abs(np.random.default_rng().normal(size=(1, g.cols)))
    inputs = [ctx.encrypt(row) for row in g.gather_batch(other)]
    probe.refused(operator.layer(victim.model_id, stage, inputs), INTEGRITY)
    still_serves()


BATCH_CHANGES = {
    "two groups' outputs swapped": lambda ctx, frames: frames[::-1],
    "one group's output twice": lambda ctx, frames: [frames[0], frames[0]],
    # X^(N/2) turns every slot's real part into its imaginary part: the two queries of a group trade places.
    "the lanes of each group swapped": lambda ctx, frames: [times_monomial(ctx, f, ctx.params.slots) for f in frames],
}


@pytest.mark.parametrize("stage", [0, 1])
@pytest.mark.parametrize("change", list(BATCH_CHANGES))
def test_queries_of_a_batch_moved_between_slots_fail_the_check(operator, attacker, victim, stage, change, still_serves):
    """A batch of four packs two queries per ciphertext (real and imaginary lanes) in two ciphertext groups."""
    probe = run_to(operator.begin(attacker, victim, np.stack([random_input(victim) for _ in range(4)])), stage)
    frames = probe.honest()
    assert len(frames) == 2
    probe.refused(BATCH_CHANGES[change](probe.context, frames), INTEGRITY)
    still_serves()


# --- 6. one coefficient of an honest layer output altered ------------------------------------------------------------


@pytest.mark.parametrize("stage", [0, 1])
@pytest.mark.parametrize("polynomial", [0, 1, 2])
def test_one_altered_coefficient_fails_the_check(operator, attacker, victim, stage, polynomial, still_serves):
    probe = run_to(operator.begin(attacker, victim, random_input(victim)), stage)
    ctx = probe.context
    frames = probe.honest()
    q = levels(ctx)[1].moduli[0]
    position = int(np.random.default_rng().integers(ctx.params.poly_modulus_degree))
    frames[0] = with_coefficient_added(ctx, frames[0], q // 3, polynomial, position)
    probe.refused(frames, INTEGRITY)
    still_serves()


# --- 7. metadata of an honest layer output changed -------------------------------------------------------------------

METADATA = {
    "scale x2": lambda ctx, f: with_scale(ctx, f, 2 * output_scale(ctx)),
    "scale / 2^20": lambda ctx, f: with_scale(ctx, f, output_scale(ctx) / 2**20),
    "scale 1": lambda ctx, f: with_scale(ctx, f, 1.0),
    "scale 2^40": lambda ctx, f: with_scale(ctx, f, ctx.params.scale),
    "top level's parms_id": lambda ctx, f: with_parms_id(ctx, f, levels(ctx)[0].parms_id),
    "made-up parms_id": lambda ctx, f: with_parms_id(ctx, f, (1, 2, 3, 4)),
    "two polynomials": lambda ctx, f: with_polynomials(ctx, f, 2),
    "four polynomials": lambda ctx, f: with_polynomials(ctx, f, 4),
}


@pytest.mark.parametrize("stage", [0, 1])
@pytest.mark.parametrize("change", list(METADATA))
def test_changed_ciphertext_metadata_is_refused(operator, attacker, victim, stage, change, still_serves):
    probe = run_to(operator.begin(attacker, victim, random_input(victim)), stage)
    frames = probe.honest()
    assert len(parse_output(probe.context, frames[0]).data) == 3, "encrypted weights leave three polynomials"
    probe.refused([METADATA[change](probe.context, f) for f in frames], BAD)
    still_serves()


@pytest.mark.parametrize("count", ["none", "one more", "twice"])
def test_a_wrong_number_of_output_ciphertexts_is_refused(operator, attacker, victim, count, still_serves):
    probe = run_to(operator.begin(attacker, victim, random_input(victim)), 1)
    frames = probe.honest()
    frames = {"none": [], "one more": [*frames, frames[0]], "twice": frames * 2}[count]
    probe.refused(frames, BAD)
    still_serves()


# --- 9. the victim's layer run with other weights --------------------------------------------------------------------


def _with_weights(probe: Probe, model: Deployed, weights: np.ndarray) -> list[bytes]:
    """The expected stage run on its real input, with ``weights`` (encrypted under the model's own context)."""
    ctx, stage = probe.context, probe.expected
    g = model.plan.graph.stages[stage].layout
    mask, frames = encrypt_weights(ctx, g, weights, model.plan.supports[stage][:, :-1])
    kernel = LinearKernel.from_encrypted(ctx.toolkit, g, mask, frames)
    inputs = [ctx.toolkit.load_ciphertext(f) for f in probe.handout]
    return [to_bytes(ct) for ct in kernel.evaluate(inputs, ctx)]


@pytest.mark.parametrize("stage", [0, 1])
def test_the_operators_own_kernel_with_the_right_weights_passes(operator, attacker, victim, stage):
    """Control for the next test: the refusals there are about the weights, not about the kernel."""
    x = random_input(victim)
    probe = run_to(operator.begin(attacker, victim, x), stage)
    probe.activate(_with_weights(probe, victim, victim.plan.weights[stage][:, :-1]))
    assert_close(probe.run()[0], victim.reference(x)[0])


def _nudged(w: np.ndarray, h: np.ndarray) -> np.ndarray:
    """``w`` with the one weight that contributes most to ``w h`` off by 1%."""
    row, col = np.unravel_index(np.argmax(np.abs(w * h)), w.shape)
    nudged = w.copy()
    nudged[row, col] *= 1.01
    return nudged


WRONG_WEIGHTS = ["random", "one weight 1% off", "the twin's"]


@pytest.mark.parametrize("stage", [0, 1])
@pytest.mark.parametrize("which", WRONG_WEIGHTS)
def test_the_layer_run_with_other_weights_fails_the_check(operator, attacker, victim, twin, stage, which, still_serves):
    """A bundle whose weights were swapped (encrypted under the victim's own context, so everything parses)."""
    x = random_input(victim)
    probe = run_to(operator.begin(attacker, victim, x), stage)
    w = victim.plan.weights[stage][:, :-1]
    other = {
        "random": lambda: np.random.default_rng().normal(scale=0.3, size=w.shape),
        "one weight 1% off": lambda: _nudged(w, stage_input(victim, x, stage)),
        "the twin's": lambda: twin.plan.weights[stage][:, :-1],
    }[which]()
    assert not np.array_equal(other, w)
    probe.refused(_with_weights(probe, victim, other), INTEGRITY)
    still_serves()
