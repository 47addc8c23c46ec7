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

from dataclasses import dataclass, field, replace
from typing import Any

import msgpack

from heclave.protocol.errors import ErrorCode, PlanError, ProtocolError

from .layouts import Layout, layout_from_wire
from .ops import BINARY, EnclaveOp
from .params import CkksParams
from .placement import Placement, WeightForm
from .release import ReleasePolicy

# 2: an ``he`` stage's layout covers W only; its bias travels to the enclave. 3: a stage's ``layout``.
# 4: an enclave step carries exactly its kind's fields (``graph.ops.FIELDS``); more kinds of step.
# 5: a stage names the value it reads (``source``); add, mul and concat steps name another.
GRAPH_FORMAT = 5


@dataclass(frozen=True)
class Stage:
    """An affine layer, placed on the server (``he``, ``blinded``, ``plain``) or in the enclave, then its
    nonlinear steps (in the enclave, except after a ``plain`` layer, whose steps the server runs too).

    ``weight_bits`` is the fixed-point scale of a ``blinded`` layer's weights.
    ``source`` is the value the layer reads: 0 the model's input, ``j + 1``
    stage ``j``'s result; ``None`` (the previous stage's result) until the
    graph resolves it. The values form a graph, not only a chain: a residual
    block's second layer ends with an ``add`` step naming the block's input.

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
    source: int | None = None

    @property
    def operands(self) -> set[int]:
        """The earlier values the stage's steps combine with its own."""
        return {op.operand for op in self.ops if op.kind in BINARY}

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
            "source": self.source,
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
                _int(d["source"]),
            )
        except (KeyError, TypeError, ValueError):
            raise PlanError("Malformed stage in the model graph.") from None


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError("not an integer")
    return value


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
        resolved = tuple(replace(s, source=i) if s.source is None else s for i, s in enumerate(self.stages))
        object.__setattr__(self, "stages", resolved)
        self.validate()

    def validate(self) -> None:
        """Check that the values connect: each stage reads an earlier value of its width, each step
        receives its shape, and each add, mul or concat names an earlier value of the shape it declares."""
        if not self.stages:
            raise PlanError("A model graph needs at least one affine layer.")
        sizes = [_size(self.input_shape)]
        for i, stage in enumerate(self.stages):
            g = stage.layout
            if g.slots != self.params.slots:
                raise PlanError(f"Stage {i} is laid out for {g.slots} slots, the parameters give {self.params.slots}.")
            if not 0 <= stage.source <= i or (i == 0 and stage.source != 0):
                raise PlanError(f"Stage {i} reads value {stage.source}; it may read the input or an earlier result.")
            if stage.in_features != sizes[stage.source]:
                raise PlanError(
                    f"Stage {i} takes {stage.in_features} inputs but value {stage.source} has {sizes[stage.source]}."
                )
            if g.rows != _size(stage.out_shape):
                raise PlanError(f"Stage {i} has {g.rows} outputs but declares shape {stage.out_shape}.")
            if stage.placement is Placement.PLAIN and stage.operands:
                raise PlanError(f"Stage {i} is 'plain' but its steps combine earlier values the server does not hold.")
            shape = stage.out_shape
            for op in stage.ops:
                if _size(op.in_shape) != _size(shape):
                    raise PlanError(f"Stage {i}: step {op.kind.value} expects shape {op.in_shape}, receives {shape}.")
                if op.kind in BINARY and not (op.operand <= i and _size(op.operand_shape) == sizes[op.operand]):
                    raise PlanError(f"Stage {i}: step {op.kind.value} names value {op.operand}, which it cannot have.")
                shape = op.out_shape
            sizes.append(_size(shape))

    @property
    def last_reads(self) -> dict[int, int]:
        """For each value a stage reads, the last stage that reads it: the enclave keeps it until then."""
        last: dict[int, int] = {}
        for i, stage in enumerate(self.stages):
            for value in (stage.source, *stage.operands):
                last[value] = i
        return last

    def plain_run_end(self, index: int) -> int:
        """The last stage of the run of ``plain`` stages from ``index`` that the server computes at once:
        each reads the previous one's result."""
        stages, last = self.stages, self.last_reads
        while index + 1 < len(stages) and stages[index + 1].placement is Placement.PLAIN:
            # The enclave never sees a value inside the run: only the next stage may read it.
            readers = {i for i, st in enumerate(stages) if index + 1 in (st.source, *st.operands)}
            if readers != {index + 1} or last.get(index + 1) != index + 1:
                break
            index += 1
        return index

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
