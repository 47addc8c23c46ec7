"""Enclave steps' wire forms (:class:`heclave.graph.ops.EnclaveOp`): every step round-trips, and anything a
hostile server could craft is a :class:`PlanError`, never a crash or a huge allocation.

The steps are those of ``tests/arith/test_nonlinear.py``, which checks what they compute against torch.
"""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from heclave.arith.nonlinear import apply_ops
from heclave.graph.ops import FIELDS, EnclaveOp
from heclave.protocol.errors import PlanError
from tests.arith.test_nonlinear import CASES, IDS, QUICK


@pytest.mark.parametrize("case_id, op, layer, scale", CASES, ids=IDS)
def test_each_step_round_trips_its_wire_form(case_id, op, layer, scale):
    wire = op.to_wire()
    assert set(wire) == {"kind", "in_shape", *FIELDS.get(op.kind, ())}
    assert EnclaveOp.from_wire(msgpack.unpackb(msgpack.packb(wire), raw=False)) == op


POOL = {"kind": "maxpool2d", "in_shape": [2, 8, 8], "kernel": [2, 2], "stride": [2, 2], "padding": [0, 0]}
POOL |= {"dilation": [1, 1], "ceil_mode": False}
HOSTILE = [
    ("not-a-dict", ["relu", [4]]),
    ("unknown-kind", {"kind": "exp", "in_shape": [4]}),
    ("kind-not-a-string", {"kind": 3, "in_shape": [4]}),
    ("missing-shape", {"kind": "relu"}),
    ("foreign-field", {"kind": "relu", "in_shape": [4], "kernel": [2, 2]}),
    ("missing-field", {"kind": "softmax", "in_shape": [4]}),
    ("negative-axis-length", {"kind": "relu", "in_shape": [4, -3]}),
    ("zero-axis-length", {"kind": "relu", "in_shape": [0]}),
    ("float-axis-length", {"kind": "relu", "in_shape": [4.0]}),
    ("bool-axis-length", {"kind": "relu", "in_shape": [True]}),
    ("string-shape", {"kind": "relu", "in_shape": "4"}),
    ("nested-shape", {"kind": "relu", "in_shape": [[4]]}),
    ("empty-shape", {"kind": "relu", "in_shape": []}),
    ("too-many-axes", {"kind": "relu", "in_shape": [1] * 9}),
    ("too-many-values", {"kind": "tanh", "in_shape": [1 << 12, 1 << 12]}),
    ("huge-integer", {"kind": "tanh", "in_shape": [10**40]}),
    ("dim-out-of-range", {"kind": "softmax", "in_shape": [3, 4], "dim": 2}),
    ("dim-negative", {"kind": "log_softmax", "in_shape": [3, 4], "dim": -1}),
    ("dim-float", {"kind": "softmax", "in_shape": [3, 4], "dim": 1.0}),
    ("axes-zero", {"kind": "layer_norm", "in_shape": [3, 4], "axes": 0, "eps": 1e-5}),
    ("axes-too-many", {"kind": "layer_norm", "in_shape": [3, 4], "axes": 3, "eps": 1e-5}),
    ("eps-negative", {"kind": "layer_norm", "in_shape": [4], "axes": 1, "eps": -1e-5}),
    ("eps-nan", {"kind": "layer_norm", "in_shape": [4], "axes": 1, "eps": math.nan}),
    ("eps-huge-int", {"kind": "layer_norm", "in_shape": [4], "axes": 1, "eps": 10**400}),
    ("eps-string", {"kind": "layer_norm", "in_shape": [4], "axes": 1, "eps": "1e-5"}),
    ("slope-inf", {"kind": "leaky_relu", "in_shape": [4], "slope": math.inf}),
    ("slope-bool", {"kind": "leaky_relu", "in_shape": [4], "slope": True}),
    ("alpha-list", {"kind": "elu", "in_shape": [4], "alpha": [1.0]}),
    ("gelu-form", {"kind": "gelu", "in_shape": [4], "approximate": "erf"}),
    ("gelu-form-type", {"kind": "gelu", "in_shape": [4], "approximate": ["tanh"]}),
    ("pool-flat-input", POOL | {"in_shape": [64]}),
    ("pool-absurd-kernel", POOL | {"kernel": [10**9, 10**9]}),
    (
        "pool-absurd-padding",
        POOL | {"kernel": [10**6, 10**6], "padding": [5 * 10**5, 5 * 10**5], "in_shape": [1, 1, 1]},
    ),
    ("pool-padding-over-half", POOL | {"padding": [2, 0]}),
    ("pool-zero-stride", POOL | {"stride": [0, 1]}),
    ("pool-zero-dilation", POOL | {"dilation": [1, 0]}),
    ("pool-negative-kernel", POOL | {"kernel": [-2, 2]}),
    ("pool-three-sides", POOL | {"kernel": [2, 2, 2]}),
    ("pool-ceil-int", POOL | {"ceil_mode": 1}),
    ("pool-too-much-work", POOL | {"in_shape": [16, 512, 512], "kernel": [16, 16], "stride": [1, 1]}),
    ("adaptive-larger", {"kind": "adaptive_maxpool2d", "in_shape": [2, 4, 4], "output_size": [5, 4]}),
    ("adaptive-zero", {"kind": "adaptive_maxpool2d", "in_shape": [2, 4, 4], "output_size": [0, 4]}),
]


@pytest.mark.parametrize("case_id, wire", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_a_crafted_step_is_refused(case_id, wire):
    with pytest.raises(PlanError):
        EnclaveOp.from_wire(wire)


WIRE_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


NAMES = sorted({"kind", "in_shape", *(f for names in FIELDS.values() for f in names)})


@given(case=st.sampled_from(CASES), data=st.data(), value=WIRE_VALUES, drop=st.booleans())
@QUICK
def test_a_mutated_step_is_refused_or_still_a_valid_step(case, data, value, drop):
    """Any one field replaced, added or dropped: a PlanError, or a step that runs on its declared shape."""
    wire = case[1].to_wire()
    if drop:
        wire.pop(data.draw(st.sampled_from(sorted(wire))))
    else:
        wire[data.draw(st.sampled_from(NAMES) | st.text(max_size=8))] = value
    try:
        op = EnclaveOp.from_wire(wire)
    except PlanError:
        return
    assert EnclaveOp.from_wire(op.to_wire()) == op
    x = np.random.default_rng(0).standard_normal(math.prod(op.in_shape))
    with np.errstate(all="ignore"):
        assert apply_ops(x, (op,)).shape == (math.prod(op.out_shape),)
