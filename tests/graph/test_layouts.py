"""Slot layouts, checked against numpy float64: properties of
:class:`heclave.graph.layouts.cyclic.CyclicLayout` and the layouts built on it, in plaintext (cheap, many
examples, any slot count), and their wire forms.

The encrypted kernel that runs them for real is checked in ``tests/he/test_linear.py``, with the strategies
defined here.
"""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from heclave.graph.layouts import layout_from_wire
from heclave.graph.layouts.base import Layout
from heclave.graph.layouts.cyclic import CyclicLayout
from heclave.graph.layouts.grouped import GroupedLayout
from heclave.graph.layouts.paired import PairedRows
from heclave.plan.layouts import choose_cyclic
from heclave.protocol.errors import PlanError

SLOTS = 4096

PURE = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- strategies


@st.composite
def geometries(
    draw, slots: int, max_in_cts: int = 3, max_out_cts: int = 3, max_k: int | None = None, max_chunk: int | None = None
) -> CyclicLayout:
    """Any layout ``validate`` should accept, not only those ``choose_cyclic`` picks.

    The baby/giant split may be loose (``baby * giant > k``) and the period may
    exceed the smallest multiple of ``k`` that holds a chunk.
    """
    chunk = draw(st.integers(1, min(slots, max_chunk or slots)))
    k = draw(st.integers(1, min(slots, max_k or slots)))
    period = math.ceil(chunk / k) * k
    assume(period <= slots)
    period *= draw(st.integers(1, max(1, slots // period)))
    layout = CyclicLayout(1, 1, slots, k, period, chunk, 1, k)
    assume(layout.blocks >= 1)
    in_cts = draw(st.integers(1, max_in_cts))
    cols = draw(st.integers((in_cts - 1) * chunk + 1, in_cts * chunk))
    out_cts = draw(st.integers(1, max_out_cts))
    per_ct = layout.rows_per_ct
    rows = draw(st.integers((out_cts - 1) * per_ct + 1, out_cts * per_ct))
    baby = draw(st.integers(1, k))
    giant = math.ceil(k / baby) + draw(st.integers(0, 2))
    return CyclicLayout(rows, cols, slots, k, period, chunk, baby, giant)


small_slots = st.sampled_from([1, 2, 4, 8, 16, 32, 64, 128])
shapes = st.tuples(st.integers(1, 300), st.integers(1, 300))


def _ids(layout: CyclicLayout) -> np.ndarray:
    """A ``rows x cols`` matrix whose entries are 1, 2, ... (unique, exact in float64)."""
    return np.arange(1, layout.rows * layout.cols + 1, dtype=np.float64).reshape(layout.rows, layout.cols)


def simulate(layout: CyclicLayout, weights: np.ndarray, x_aug: np.ndarray) -> np.ndarray:
    """The server's baby-step giant-step algorithm on plaintext numpy slots (``np.roll(v, -s)`` is a left rotation)."""
    return layout.scatter(simulate_slots(layout, weights, layout.gather(x_aug)))


def simulate_slots(g: Layout, weights: np.ndarray, inputs: np.ndarray) -> np.ndarray:
    """Partial sums ``[out_cts, slots]`` the server computes from laid-out inputs, in complex slots as CKKS has."""
    diags = g.diagonals(weights)
    partials = np.zeros((g.out_cts, g.slots), dtype=complex)
    for o in range(g.out_cts):
        for giant in range(g.giant):
            part = np.zeros(g.slots, dtype=complex)
            for b in range(g.baby):
                k = giant * g.baby + b
                if k >= g.k:
                    break
                for i in range(g.in_cts):
                    if g.linked(o, i):
                        part += diags[o, i, k] * np.roll(inputs[i], -b)
            partials[o] += np.roll(part, -giant * g.baby)
    return partials


def batch_geometries(slots: int):
    """Geometries of every kind a batch meets: any valid one, and throughput-mode picks with several queries."""
    picked = st.builds(
        lambda shape, batch: choose_cyclic(*shape, slots, False, batch=batch),
        st.tuples(st.integers(1, 12), st.integers(1, 12)),
        st.integers(2, 16),
    )
    return st.one_of(geometries(slots), picked)


@PURE
@given(g=st.sampled_from([16, 64, 128]).flatmap(batch_geometries), batch=st.integers(1, 40), seed=st.integers(0, 99))
def test_a_batch_fills_both_lanes_of_each_group_and_every_query_gets_its_own_w_x(g, batch, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((g.rows, g.cols))
    xs = rng.standard_normal((batch, g.cols))
    laid = g.gather_batch(xs)
    groups = g.groups(batch)
    assert groups == math.ceil(batch / (2 * g.queries)) and laid.shape == (groups * g.in_cts, g.slots)
    assert np.iscomplexobj(laid) == (batch > g.queries)
    n = g.in_cts
    partials = np.concatenate([simulate_slots(g, w, laid[j * n : (j + 1) * n]) for j in range(groups)])
    want = xs @ w.T
    np.testing.assert_allclose(g.scatter_batch(partials, batch), want, rtol=0, atol=1e-9 * max(1, np.abs(want).max()))


def _random_support(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    support = rng.random((rows, cols)) < rng.uniform(0.05, 1.0)
    support[rng.integers(0, rows), rng.integers(0, cols)] = True
    return support


def paired_layouts(support: np.ndarray, slots: int) -> list[PairedRows]:
    """Every base family over the pairs' joint support, wrapped to pair rows."""
    from heclave.graph.layouts.paired import paired_support

    joint = paired_support(support)
    half, cols = joint.shape
    bases = [choose_cyclic(half, cols, slots, False), GroupedLayout.from_support(joint, slots)]
    bases += [GroupedLayout.block_cyclic(joint, slots, k) for k in (2, 3)]
    return [PairedRows(base, support.shape[0]) for base in bases if base is not None]


@PURE
@given(rows=st.integers(2, 40), cols=st.integers(1, 40), slots=st.sampled_from([64, 256]), seed=st.integers(0, 999))
def test_paired_rows_compute_w_x_for_every_base_layout(rows, cols, slots, seed):
    rng = np.random.default_rng(seed)
    support = _random_support(rng, rows, cols)
    w = rng.standard_normal((rows, cols)) * support
    x = rng.standard_normal(cols)
    for g in paired_layouts(support, slots):
        assert g.rows == rows and g.half == math.ceil(rows / 2) and g.groups(3) == 3
        got = g.scatter_batch(simulate_slots(g, w, g.gather_batch(x[None])), 1)[0]
        np.testing.assert_allclose(got, w @ x, rtol=0, atol=1e-9 * max(1.0, np.abs(w @ x).max()))
        assert layout_from_wire(msgpack.unpackb(msgpack.packb(g.to_wire()), raw=False)).describe() == g.describe()


@pytest.mark.parametrize(
    "wire",
    [
        {"kind": "paired", "rows": 5},
        {"kind": "paired", "rows": "5", "base": CyclicLayout(3, 4, 16, 1, 4, 4, 1, 1).to_wire()},
        {"kind": "paired", "rows": 7, "base": CyclicLayout(3, 4, 16, 1, 4, 4, 1, 1).to_wire()},
        {"kind": "paired", "rows": 3, "base": CyclicLayout(3, 4, 16, 1, 4, 4, 1, 1).to_wire()},
        {"kind": "paired", "rows": 4, "base": {"kind": "paired", "rows": 3, "base": {}}},
        {"kind": "paired", "rows": 4, "base": CyclicLayout(3, 4, 16, 1, 5, 4, 1, 1, 2).to_wire()},
    ],
    ids=["no base", "rows not int", "too many rows", "nothing paired", "nested", "several queries"],
)
def test_malformed_paired_layout_is_refused(wire):
    with pytest.raises(PlanError):
        layout_from_wire(wire)


# ---------------------------------------------------------------- pure properties


@PURE
@given(shapes, small_slots, st.booleans())
def test_chosen_cyclic_layout_is_valid_and_fits_the_layer(shape, slots, encrypted):
    rows, cols = shape
    g = choose_cyclic(rows, cols, slots, encrypted)
    g.validate()
    assert (g.rows, g.cols, g.slots) == (rows, cols, slots)
    assert g.in_cts * g.chunk >= cols > (g.in_cts - 1) * g.chunk
    assert g.out_cts * g.rows_per_ct >= rows > (g.out_cts - 1) * g.rows_per_ct
    assert g.in_cts == math.ceil(cols / slots), "the chooser should use as few input ciphertexts as possible"
    assert all(0 < s < g.k for s in g.rotation_steps)
    assert all(v >= 0 for v in g.counts().values())


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 6000), st.integers(1, 6000), st.booleans())
@example(5000, 11, False)
@example(11, 5000, True)
@example(1, 2, True)
@example(4096, 4097, False)
def test_chosen_cyclic_layout_is_valid_at_deployment_slots(rows, cols, encrypted):
    g = choose_cyclic(rows, cols, SLOTS, encrypted)
    g.validate()
    assert g.in_cts == math.ceil(cols / SLOTS)
    assert g.out_cts * g.rows_per_ct >= rows
    assert g.input_index.shape == (g.in_cts, SLOTS)
    assert g.output_row.shape == (g.out_cts, SLOTS)


@PURE
@given(st.one_of(small_slots.flatmap(geometries), shapes.flatmap(lambda s: st.just(choose_cyclic(*s, 64, False)))))
def test_every_weight_is_used_exactly_once(g):
    """Each (row, col) of the matrix sits in exactly one diagonal slot, where the docstring's formula puts it."""
    ids = _ids(g)
    diags = g.diagonals(ids)
    assert diags.shape == (g.out_cts, g.in_cts, g.k, g.slots)
    used = diags[diags != 0]
    np.testing.assert_array_equal(np.sort(used), ids.ravel())

    # Undo the pre-rotation and check d_k[s] = W'[row(s), i*chunk + (s mod p + k) mod p].
    s = np.arange(g.slots)
    block, u = s // g.period, s % g.period
    for o in range(g.out_cts):
        row = o * g.rows_per_ct + block * g.k + u % g.k
        for i in range(g.in_cts):
            for k in range(g.k):
                d = np.roll(diags[o, i, k], -(k // g.baby) * g.baby)
                residue = (u + k) % g.period
                col = i * g.chunk + residue
                valid = (block < g.blocks) & (row < g.rows) & (residue < g.chunk) & (col < g.cols)
                expected = np.zeros(g.slots)
                expected[valid] = ids[row[valid], col[valid]]
                np.testing.assert_array_equal(d, expected)


@PURE
@given(
    st.one_of(small_slots.flatmap(geometries), shapes.flatmap(lambda s: st.just(choose_cyclic(*s, 32, True)))),
    st.integers(0, 2**32 - 1),
)
def test_plaintext_simulation_of_the_server_computes_w_x(g, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((g.rows, g.cols))
    x_aug = rng.standard_normal(g.cols)
    np.testing.assert_allclose(simulate(g, w, x_aug), w @ x_aug, rtol=0, atol=1e-9 * max(1.0, np.abs(w @ x_aug).max()))


@PURE
@given(small_slots.flatmap(geometries))
def test_gather_and_scatter_are_the_layouts_described(g):
    x_aug = np.arange(1, g.cols + 1, dtype=np.float64)
    laid = g.gather(x_aug)
    for i in range(g.in_cts):
        # Slot s holds x'[i*c + (s mod p)] while that index is inside the chunk and the vector.
        s = np.arange(g.slots)
        col = i * g.chunk + s % g.period
        valid = (s % g.period < g.chunk) & (col < g.cols)
        np.testing.assert_array_equal(laid[i][valid], x_aug[col[valid]])
        np.testing.assert_array_equal(laid[i][~valid], 0.0)
    # Scattering ones counts the partial sums per row: T = period / k for every row.
    counts = g.scatter(np.ones((g.out_cts, g.slots)))
    np.testing.assert_array_equal(counts, np.full(g.rows, g.period // g.k))


@PURE
@given(
    st.one_of(
        st.sampled_from([8, 4096]).flatmap(geometries),
        shapes.flatmap(lambda s: st.just(choose_cyclic(*s, 64, False))),
    )
)
def test_geometry_wire_round_trip(g):
    wire = g.to_wire()
    assert CyclicLayout.from_wire(wire) == g
    assert CyclicLayout.from_wire(msgpack.unpackb(msgpack.packb(wire), raw=False)) == g


FIELDS = sorted(CyclicLayout.__dataclass_fields__)


def _break(wire: dict, how: str, data) -> dict:
    """A copy of a valid layout's wire form, made inconsistent in the way ``how`` names."""
    w = dict(wire)
    k, period, slots = w["k"], w["period"], w["slots"]
    if how == "missing":
        del w[data.draw(st.sampled_from(FIELDS))]
    elif how == "not a number":
        w[data.draw(st.sampled_from(FIELDS))] = data.draw(st.sampled_from(["abc", None, [1], {"a": 1}]))
    elif how == "k not positive":
        w["k"] = data.draw(st.integers(-5, 0))
    elif how == "k above period":
        w["k"] = period + data.draw(st.integers(1, 5))
    elif how == "period above slots":
        w["period"] = slots + data.draw(st.integers(1, 5)) * k
    elif how == "period not a multiple of k":
        assume(k >= 2)
        w["period"] = period + data.draw(st.integers(1, k - 1))
        assume(w["period"] <= slots)
    elif how == "chunk not positive":
        w["chunk"] = data.draw(st.integers(-5, 0))
    elif how == "chunk above period":
        w["chunk"] = period + data.draw(st.integers(1, 5))
    elif how == "too few baby and giant steps":
        assume(k >= 2)
        baby = data.draw(st.integers(1, k - 1))
        w["baby"], w["giant"] = baby, (k - 1) // baby
    elif how == "negative steps":
        w["baby"], w["giant"] = -data.draw(st.integers(1, 5)), -data.draw(st.integers(k, k + 5))
    elif how == "no rows":
        w["rows"] = data.draw(st.integers(-5, 0))
    elif how == "no cols":
        w["cols"] = data.draw(st.integers(-5, 0))
    elif how == "no whole block":
        # period > (slots + 1) / 2 and slots not a multiple of it: a rotation by k - 1 would leave the ciphertext.
        period = data.draw(st.integers(slots // 2 + 1, slots - 1))
        assume(slots % period)
        w.update(k=period, period=period, chunk=min(w["chunk"], period), baby=period, giant=1)
    return w


BREAKS = [
    "missing",
    "not a number",
    "k not positive",
    "k above period",
    "period above slots",
    "period not a multiple of k",
    "chunk not positive",
    "chunk above period",
    "too few baby and giant steps",
    "negative steps",
    "no rows",
    "no cols",
    "no whole block",
]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@pytest.mark.parametrize("how", BREAKS)
@given(g=st.sampled_from([8, 64, 4096]).flatmap(geometries), data=st.data())
def test_from_wire_refuses_inconsistent_geometry(how, g, data):
    broken = _break(g.to_wire(), how, data)
    with pytest.raises(PlanError) as info:
        CyclicLayout.from_wire(broken)
    assert "layout" in str(info.value)


def test_choose_cyclic_refuses_empty_layers():
    for rows, cols in [(0, 5), (5, 0), (-1, 3)]:
        with pytest.raises(PlanError, match=f"{rows}x{cols}"):
            choose_cyclic(rows, cols, SLOTS, False)
