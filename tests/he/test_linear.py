"""The encrypted affine kernel (:class:`heclave.he.linear.LinearKernel`), run for real at N = 8192 on the layouts
of every kind and checked against numpy float64 (few examples: each costs tens of milliseconds to a second).

The layouts' own properties, in plaintext, are in ``tests/graph/test_layouts.py``; its strategies are used here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from heclave.graph.layouts.cyclic import CyclicLayout
from heclave.graph.placement import WeightForm
from heclave.he.linear import LinearKernel, OpCounter
from heclave.plan.layouts import choose_cyclic
from heclave.protocol.errors import HeclaveError
from tests.graph.test_layouts import SLOTS, _random_support, geometries, paired_layouts
from tests.helpers import deployed_kernel

# Max abs error over the largest output's summand magnitude (|W| |x| + |b|): an output that
# cancels to almost zero must not make a 1e-9 absolute error look large.
TARGET = 1e-4
FORMS = [WeightForm.PLAIN, WeightForm.ENCRYPTED]

CKKS = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run_kernel(keys, g: CyclicLayout, form: WeightForm, w: np.ndarray, x_aug: np.ndarray):
    """Deploy ``w`` in ``form`` and evaluate it on the encrypted ``x_aug``, as server and enclave do."""
    context, kernel = deployed_kernel(keys, g, w, form)
    inputs = [context.toolkit.load_ciphertext(keys.encrypt_symmetric(v)) for v in g.gather(x_aug)]
    counter = OpCounter()
    outputs = kernel.evaluate(inputs, context, counter)
    assert len(outputs) == g.out_cts
    return g.scatter(np.stack([keys.decrypt_complex(ct) for ct in outputs])), kernel, counter


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f.value)
@pytest.mark.parametrize("rows", [2, 61, 300])
def test_kernel_on_paired_rows_matches_numpy(keys, form, rows):
    rng = np.random.default_rng()
    support = _random_support(rng, rows, 70)
    for g in paired_layouts(support, SLOTS)[:2]:
        w = rng.uniform(-1, 1, (rows, 70)) * support
        x = rng.uniform(-1, 1, 70)
        got, kernel, counter = run_kernel(keys, g, form, w, x)
        assert np.abs(got - w @ x).max() / max((np.abs(w) @ np.abs(x)).max(), 1e-12) <= TARGET
        assert counter.multiplications == int(kernel.mask.sum())


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f.value)
def test_kernel_computes_both_lanes_of_a_complex_packed_batch(keys, form):
    rng = np.random.default_rng()
    g = choose_cyclic(37, 90, SLOTS, form is WeightForm.ENCRYPTED)
    w = rng.uniform(-1, 1, (g.rows, g.cols)) / math.sqrt(g.cols)
    xs = rng.uniform(-1, 1, (2, g.cols))
    context, kernel = deployed_kernel(keys, g, w, form)
    laid = g.gather_batch(xs)
    assert len(laid) == g.in_cts  # two queries, one ciphertext group
    inputs = [context.toolkit.load_ciphertext(context.encrypt(row)) for row in laid]
    outputs = kernel.evaluate(inputs, context, OpCounter())
    got = g.scatter_batch(np.stack([keys.decrypt_complex(ct) for ct in outputs]), 2)
    want = xs @ w.T
    assert np.abs(got - want).max() / (np.abs(w) @ np.abs(xs.T)).max() <= TARGET


def check_affine(keys, g: CyclicLayout, form: WeightForm, seed: int) -> None:
    """``W x + b`` with fresh random ``W``, ``b`` and ``x``, through the kernel, against numpy float64."""
    rng = np.random.default_rng(seed)
    inputs = g.cols - 1
    weight = rng.uniform(-1, 1, (g.rows, inputs)) / math.sqrt(max(inputs, 1))
    bias = rng.uniform(-1, 1, g.rows)
    x = rng.uniform(-1, 1, inputs)
    expected = weight @ x + bias
    got, kernel, counter = run_kernel(keys, g, form, np.column_stack([weight, bias]), np.append(x, 1.0))
    assert got.shape == expected.shape
    magnitude = (np.abs(weight) @ np.abs(x) + np.abs(bias)).max()
    err = np.abs(got - expected).max() / magnitude
    assert err <= TARGET, f"relative error {err:.2e} for {g}"
    counts = g.counts()
    assert counter.multiplications == int(kernel.mask.sum()) <= counts["multiplications"]
    assert counter.rotations <= counts["rotations"]
    assert counter.rescales <= counts["rescales"]
    giant_rotations = counter.rotations - g.in_cts * (min(g.baby, g.k) - 1)
    # Only a group that is rotated is relinearized; the rest reach the enclave with three polynomials.
    assert counter.relinearizations == (giant_rotations if form is WeightForm.ENCRYPTED else 0)


layer_shapes = st.one_of(
    st.tuples(st.integers(1, 200), st.integers(1, 200)),  # (outputs, inputs): odd sizes, more outputs than inputs
    st.tuples(st.integers(4097, 6000), st.integers(1, 12)),  # more rows than slots: several output ciphertexts
    st.tuples(st.integers(1, 12), st.integers(4096, 6000)),  # more columns than slots: several input ciphertexts
)


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f.value)
@CKKS
@given(shape=layer_shapes, seed=st.integers(0, 2**32 - 1))
@example(shape=(5000, 10), seed=1)
@example(shape=(7, 5000), seed=2)
@example(shape=(1, 1), seed=3)
@example(shape=(3, 4095), seed=4)  # x' fills exactly one ciphertext
@example(shape=(64, 31), seed=5)
def test_kernel_matches_numpy(keys, form, shape, seed):
    outputs, inputs = shape
    g = choose_cyclic(outputs, inputs + 1, SLOTS, form is WeightForm.ENCRYPTED)
    check_affine(keys, g, form, seed)


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f.value)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(g=geometries(SLOTS, max_in_cts=2, max_out_cts=2, max_k=24), seed=st.integers(0, 2**32 - 1))
def test_kernel_on_arbitrary_valid_geometry(keys, form, g, seed):
    """Loose baby/giant splits, oversized periods, several ciphertexts: every valid layout must compute W x + b."""
    assume(g.cols >= 2 and g.rows * g.cols <= 300_000)
    check_affine(keys, g, form, seed)


def test_kernel_refuses_wrong_number_of_inputs(keys):
    g = choose_cyclic(3, 5000, SLOTS, False)
    assert g.in_cts == 2
    kernel = LinearKernel.from_plain(keys.public.toolkit, g, np.ones((3, 5000)))
    ct = keys.public.toolkit.load_ciphertext(keys.encrypt_symmetric(np.ones(4)))
    with pytest.raises(HeclaveError, match="2 input ciphertexts, got 1"):
        kernel.evaluate([ct], keys.public)


def test_plain_weights_below_the_encoding_precision_give_zero_or_a_heclave_error(keys):
    """Such diagonals encode to the zero plaintext, whose product SEAL refuses with a raw error."""
    g = choose_cyclic(4, 7, SLOTS, False)
    w = np.random.default_rng(0).uniform(-1, 1, (4, 7)) * 1e-14
    try:
        got, _, _ = run_kernel(keys, g, WeightForm.PLAIN, w, np.ones(7))
    except HeclaveError:
        return
    np.testing.assert_allclose(got, w @ np.ones(7), atol=1e-6)
