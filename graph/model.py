"""The model graph: stages chained into a deployable model, and its versioned wire form.

``heclave.plan`` produces a :class:`ModelGraph` from a torch model; the server
and the enclave read it without importing torch. A graph is a chain of stages.
Each stage is one affine layer (every run of consecutive linear torch layers,
batch-norm and average pooling included, is composed into one), placed where
its :class:`~heclave.graph.placement.Placement` says: under CKKS on the server,
blinded, in plain on the server, or in the enclave. The exact nonlinear steps
follow it, and the last stage's output is released as the policy says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

from heclave.protocol.errors import ErrorCode, PlanError, ProtocolError

from .layouts import Layout, layout_from_wire
from .ops import EnclaveOp
from .params import CkksParams
from .placement import Placement, WeightForm
from .release import ReleasePolicy

# 2: an ``he`` stage's layout covers W only; its bias travels to the enclave. 3: a stage's ``layout``.
# 4: an enclave step carries exactly its kind's fields (``graph.ops.FIELDS``); more kinds of step.
GRAPH_FORMAT = 4


@dataclass(frozen=True)
class Stage:
    """An affine layer, placed on the server (``he``, ``blinded``, ``plain``) or in the enclave, then its
    nonlinear steps (in the enclave, except after a ``plain`` layer, whose steps the server runs too).

    ``weight_bits`` is the fixed-point scale of a ``blinded`` layer's weights.

    An ``he`` layer's layout covers ``W`` only: the enclave adds the bias after
    it decrypts, where it is exact and free, instead of spending a column of
    every layout on it (which pushes a power-of-two width past its period).
    Every other placement works on ``[W | b]`` and ``x' = [x, 1]``.
    """

    layout: Layout
    out_shape: tuple[int, ...]
    ops: tuple[EnclaveOp, ...] = ()
    placement: Placement = Placement.HE
    weight_bits: int = 0

    @property
    def in_features(self) -> int:
        """The width of the activation this layer takes."""
        return self.layout.cols if self.placement is Placement.HE else self.layout.cols - 1

    @property
    def result_shape(self) -> tuple[int, ...]:
        return self.ops[-1].out_shape if self.ops else self.out_shape

    def to_wire(self) -> dict[str, Any]:
        return {
            "layout": self.layout.to_wire(),
            "out_shape": list(self.out_shape),
            "ops": [op.to_wire() for op in self.ops],
            "placement": self.placement.value,
            "weight_bits": self.weight_bits,
        }

    @classmethod
    def from_wire(cls, d: dict) -> Stage:
        try:
            return cls(
                layout_from_wire(d["layout"]),
                tuple(int(v) for v in d["out_shape"]),
                tuple(EnclaveOp.from_wire(op) for op in d["ops"]),
                Placement.parse(d["placement"]),
                int(d["weight_bits"]),
            )
        except (KeyError, TypeError):
            raise PlanError("Malformed stage in the model graph.") from None


def _size(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass(frozen=True)
class ModelGraph:
    """A deployable model: input shape, CKKS parameters, stages, weight form, release policy."""

    input_shape: tuple[int, ...]
    stages: tuple[Stage, ...]
    params: CkksParams = field(default_factory=CkksParams)
    weight_form: WeightForm = WeightForm.ENCRYPTED
    release: ReleasePolicy = field(default_factory=ReleasePolicy)
    name: str = "model"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check that the stages chain: each layer's width matches what precedes it."""
        if not self.stages:
            raise PlanError("A model graph needs at least one affine layer.")
        width = _size(self.input_shape)
        for i, stage in enumerate(self.stages):
            g = stage.layout
            if g.slots != self.params.slots:
                raise PlanError(f"Stage {i} is laid out for {g.slots} slots, the parameters give {self.params.slots}.")
            if stage.in_features != width:
                raise PlanError(f"Stage {i} takes {stage.in_features} inputs but receives {width}.")
            if g.rows != _size(stage.out_shape):
                raise PlanError(f"Stage {i} has {g.rows} outputs but declares shape {stage.out_shape}.")
            shape = stage.out_shape
            for op in stage.ops:
                if _size(op.in_shape) != _size(shape):
                    raise PlanError(f"Stage {i}: step {op.kind.value} expects shape {op.in_shape}, receives {shape}.")
                shape = op.out_shape
            width = _size(shape)

    @property
    def output_size(self) -> int:
        return _size(self.stages[-1].result_shape)

    @property
    def reencrypts(self) -> bool:
        """Whether the enclave encrypts some stage's input: an ``he`` stage after the first."""
        return any(st.placement is Placement.HE for st in self.stages[1:])

    @property
    def rotation_steps(self) -> list[int]:
        """Rotations the server's ``he`` layers use: Galois keys are issued for these only."""
        return sorted({s for st in self.stages if st.placement is Placement.HE for s in st.layout.rotation_steps})

    def to_bytes(self) -> bytes:
        return msgpack.packb(
            {
                "format": GRAPH_FORMAT,
                "name": self.name,
                "input_shape": list(self.input_shape),
                "params": self.params.to_wire(),
                "weight_form": self.weight_form.value,
                "release": self.release.to_wire(),
                "stages": [s.to_wire() for s in self.stages],
            },
            use_bin_type=True,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> ModelGraph:
        try:
            d = msgpack.unpackb(data, raw=False)
        except Exception:
            raise ProtocolError("The model graph is not valid msgpack.", ErrorCode.BAD_FIELD) from None
        if not isinstance(d, dict) or d.get("format") != GRAPH_FORMAT:
            got = d.get("format") if isinstance(d, dict) else None
            raise PlanError(
                f"Model graph format {got!r} is not {GRAPH_FORMAT}; re-plan the model with this heclave version."
            )
        try:
            return cls(
                tuple(int(v) for v in d["input_shape"]),
                tuple(Stage.from_wire(s) for s in d["stages"]),
                CkksParams.from_wire(d["params"]),
                WeightForm.parse(d["weight_form"]),
                ReleasePolicy.from_wire(d["release"]),
                str(d.get("name", "model")),
            )
        except (KeyError, TypeError, ValueError):
            raise PlanError("The model graph is missing fields or has fields of the wrong type.") from None
