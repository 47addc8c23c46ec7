"""Freivalds' check of outsourced layers (tee.verify): every honest output passes, forgeries do not.

Honest outputs are real CKKS computations (the server's kernels, the enclave's
decryption) on fresh random inputs, across layout kinds, batch packing and
both weight forms; forgeries are perturbations just above the tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest

from heclave.arith.blinding import P
from heclave.arith.sparse import SparseMatrix
from heclave.graph.layouts.base import Layout
from heclave.graph.layouts.grouped import GroupedLayout
from heclave.graph.layouts.paired import PairedRows
from heclave.graph.placement import WeightForm
from heclave.he.linear import OpCounter
from heclave.he.serialize import to_bytes
from heclave.plan.layouts import choose_cyclic, choose_layout
from heclave.tee.verify import FieldCheck, LinearCheck
from tests.helpers import deployed_kernel

SLOTS = 4096


def _conv_support(channels: int = 3, size: int = 8) -> np.ndarray:
    """The structural nonzeros of a 3x3 convolution, 1 -> ``channels`` channels, on a ``size`` square image."""
    rows, cols = channels * size * size, size * size
    support = np.zeros((rows, cols), dtype=bool)
    for c in range(channels):
        for i in range(size):
            for j in range(size):
                for di in (-1, 0, 1):
                    for dj in (-1, 0, 1):
                        if 0 <= i + di < size and 0 <= j + dj < size:
                            support[c * size * size + i * size + j, (i + di) * size + j + dj] = True
    return support


def _layouts() -> list[tuple[str, Layout, np.ndarray, int]]:
    """(name, layout, support, batch) covering the cyclic, grouped and paired-rows kinds, with rotations."""
    dense = np.ones((40, 300), dtype=bool)
    conv = _conv_support()
    return [
        ("cyclic, two output ciphertexts", choose_cyclic(40, 300, SLOTS, True), dense, 1),
        ("cyclic, giant rotations", choose_cyclic(300, 40, SLOTS, False), np.ones((300, 40), bool), 1),
        ("cyclic, batch in both lanes", choose_cyclic(40, 300, SLOTS, True, batch=5), dense, 5),
        ("grouped convolution", GroupedLayout.from_support(conv, SLOTS), conv, 1),
        ("grouped convolution, batch", GroupedLayout.from_support(conv, SLOTS, 2), conv, 6),
        ("block-cyclic convolution, rotations", GroupedLayout.block_cyclic(conv, SLOTS, 3), conv, 1),
        ("paired rows", choose_layout(dense, SLOTS, True), dense, 1),
        ("paired rows, explicit", PairedRows(choose_cyclic(20, 300, SLOTS, False), 40), dense, 1),
    ]


def _honest(keys, layout: Layout, w: np.ndarray, xs: np.ndarray, form: WeightForm) -> np.ndarray:
    """``W x`` for each query as the server computes it and the enclave decrypts it."""
    context, kernel = deployed_kernel(keys, layout, w, form)
    inputs = [context.toolkit.load_ciphertext(context.encrypt(row)) for row in layout.gather_batch(xs)]
    outputs = []
    for start in range(0, len(inputs), layout.in_cts):
        outputs += kernel.evaluate(inputs[start : start + layout.in_cts], context, OpCounter())
    slots = np.stack([keys.decrypt_output(to_bytes(ct)) for ct in outputs])
    return layout.scatter_batch(slots, len(xs))


@pytest.mark.parametrize("form", [WeightForm.PLAIN, WeightForm.ENCRYPTED])
@pytest.mark.parametrize("name, layout, support, batch", _layouts(), ids=lambda v: v if isinstance(v, str) else "")
def test_honest_outputs_pass_and_forgeries_just_above_the_tolerance_fail(keys, form, name, layout, support, batch):
    rng = np.random.default_rng()
    w = rng.normal(scale=0.2, size=support.shape) * support
    xs = rng.normal(size=(batch, support.shape[1]))
    ys = _honest(keys, layout, w, xs, form)
    assert np.abs(ys - xs @ w.T).max() < 1e-3, "the kernel itself is wrong, not the check"
    check = LinearCheck(SparseMatrix.from_dense(w), layout, form is WeightForm.ENCRYPTED, keys.params)
    tolerances = check.tolerances(xs)
    assert check.check(check.expect(xs), ys) == tolerances.max()
    # An honest output stays well inside the tolerance, so a false alarm is far out in the tail.
    assert (np.abs(check.residues(xs, ys)) / tolerances[:, None]).max() < 0.75
    for _ in range(5):
        forged = ys.copy()
        query = rng.integers(batch)
        forged[query, rng.integers(support.shape[0])] += 1.5 * tolerances[query] * rng.choice([-1, 1])
        assert check.check(check.expect(xs), forged) is None


def test_another_input_or_wrong_weights_fail(keys):
    rng = np.random.default_rng()
    layout = choose_cyclic(16, 50, SLOTS, False)
    w = rng.normal(size=(16, 50))
    xs = rng.normal(size=(1, 50))
    ys = _honest(keys, layout, w, xs, WeightForm.PLAIN)
    check = LinearCheck(SparseMatrix.from_dense(w), layout, False, keys.params)
    assert check.check(check.expect(xs), ys) is not None
    assert check.check(check.expect(rng.normal(size=(1, 50))), ys) is None
    assert check.check(check.expect(xs), xs @ rng.normal(size=(16, 50)).T) is None


def test_redrawn_vectors_still_accept_honest_outputs_and_differ(keys):
    rng = np.random.default_rng()
    w = rng.normal(size=(12, 30))
    layout = choose_cyclic(12, 30, SLOTS, False)
    check = LinearCheck(SparseMatrix.from_dense(w), layout, False, keys.params)
    # With x = 0, the residues of the unit outputs e_j are the vectors' entries R[:, j].
    units = (np.zeros((12, 30)), np.eye(12))
    before = check.residues(*units)
    check.redraw()
    after = check.residues(*units)
    assert not np.array_equal(before, after)
    assert set(np.unique(after)) <= {-1.0, 1.0}
    xs = rng.normal(size=(2, 30))
    assert check.check(check.expect(xs), xs @ w.T) is not None
    # An expectation made before a redraw (another request's failure) is made again, not trusted.
    expected = check.expect(xs)
    check.redraw()
    assert check.check(expected, xs @ w.T) is not None
    assert check.check(expected, xs @ w.T + 1.0) is None


def test_field_check_is_exact():
    rng = np.random.default_rng()
    w = rng.integers(0, P, size=(20, 33), dtype=np.int64) * (rng.random((20, 33)) < 0.3)
    matrix = SparseMatrix.from_dense(w)
    check = FieldCheck(matrix)
    inputs = rng.integers(0, P, size=(3, 33), dtype=np.int64)
    outputs = (w.astype(object) @ inputs.T.astype(object) % P).T.astype(np.int64)
    assert check.check(check.expect(inputs), outputs) == 0.0
    for _ in range(5):
        forged = outputs.copy()
        b, j = rng.integers(3), rng.integers(20)
        forged[b, j] = (forged[b, j] + rng.integers(1, P)) % P
        assert check.check(check.expect(inputs), forged) is None
