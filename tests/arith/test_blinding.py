"""Blinded layers' arithmetic (``arith.blinding``, ``arith.sparse``): exact in the prime field, also at the
edges of its range, and a refusal for what it cannot hold."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from heclave.arith.blinding import HALF, P, activation_scale, centred, quantize
from heclave.arith.sparse import SparseMatrix
from heclave.protocol.errors import PlanError


@settings(max_examples=200, deadline=None)
@given(
    rows=st.integers(1, 6),
    cols=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
    magnitude=st.sampled_from([1e-6, 1.0, 1e3, 1e6]),
)
def test_blinding_is_exact_in_the_field_even_at_the_edges_of_its_range(rows, cols, seed, magnitude):
    rng = np.random.default_rng(seed)
    w = rng.uniform(-1, 1, (rows, cols))
    bits = 12
    w_q = quantize(w, bits)
    sparse = SparseMatrix.from_dense(w_q)
    x = rng.uniform(-magnitude, magnitude, cols)
    s = activation_scale(sparse.abs_row_sums, x)
    x_q = np.round(x * 2.0**s).astype(np.int64)
    r = rng.integers(0, P, cols, dtype=np.int64)
    blinded = sparse.apply_mod(np.mod(x_q + r, P))
    unblinded = centred(np.mod(blinded - sparse.apply_mod(r), P))
    exact = centred(w_q) @ x_q  # the true integer result, which must not have wrapped
    assert np.abs(exact).max(initial=0) < HALF
    assert (unblinded == exact).all()


def test_quantize_refuses_values_beyond_the_field():
    with pytest.raises(PlanError, match="fraction bits"):
        quantize(np.array([1.0]), 30)


def test_field_products_are_exact_for_long_rows_of_large_elements():
    rng = np.random.default_rng(3)
    w = rng.integers(0, P, (2, 70_000), dtype=np.int64)
    v = rng.integers(0, P, 70_000, dtype=np.int64)
    want = [sum(int(a) * int(b) for a, b in zip(row, v)) % P for row in w]
    assert SparseMatrix.from_dense(w).apply_mod(v).tolist() == want
