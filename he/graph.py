"""The deployment plan: heclave's layer graph as plain, versioned data.

``plan/`` produces a :class:`ModelGraph` from a torch model; the server and the
enclave read it without importing torch. A graph is a chain of stages. Each
stage is one affine layer evaluated under CKKS on the server (every run of
consecutive linear torch layers, batch-norm and average pooling included, is
composed into one), followed by the exact nonlinear steps the enclave applies
after decrypting. The last stage's output is released as the policy says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import msgpack

from heclave.protocol.errors import ErrorCode, PlanError, ProtocolError

from .context import CkksParams
from .layout import Layout
from .layout_kinds import layout_from_wire
from .linear import WeightForm

# 2: an ``he`` stage's layout covers W only; its bias travels to the enclave.
GRAPH_FORMAT = 2


class ReleaseMode(str, Enum):
    """What the enclave releases to the data owner."""

    LOGITS = "logits"
    TOPK = "topk"
    LABEL = "label"


@dataclass(frozen=True)
class ReleasePolicy:
    """The final output's form: logits rounded to ``decimals``, the top ``k`` labels, or the label."""

    mode: ReleaseMode = ReleaseMode.LOGITS
    decimals: int = 4
    k: int = 1

    def to_wire(self) -> dict[str, Any]:
        return {"mode": self.mode.value, "decimals": self.decimals, "k": self.k}

    @classmethod
    def from_wire(cls, d: dict) -> ReleasePolicy:
        try:
            mode = ReleaseMode(d["mode"])
        except (KeyError, ValueError, TypeError):
            valid = ", ".join(m.value for m in ReleaseMode)
            raise PlanError(f"Unknown release mode; use one of: {valid}.") from None
        decimals, k = d.get("decimals", 4), d.get("k", 1)
        if not isinstance(decimals, int) or not 0 <= decimals <= 8 or not isinstance(k, int) or k < 1:
            raise PlanError("Release decimals must be 0..8 and k at least 1.")
        return cls(mode, decimals, k)


class Placement(str, Enum):
    """Where a stage's affine layer runs, and what it protects (see the README's placement table)."""

    HE = "he"
    ENCLAVE = "enclave"
    BLINDED = "blinded"
    PLAIN = "plain"

    @classmethod
    def parse(cls, value: str) -> Placement:
        try:
            return cls(value)
        except ValueError:
            raise PlanError(f"Unknown placement {value!r}; use one of: {', '.join(p.value for p in cls)}.") from None


class OpKind(str, Enum):
    """The nonlinear steps the enclave applies exactly."""

    RELU = "relu"
    MAXPOOL2D = "maxpool2d"


@dataclass(frozen=True)
class EnclaveOp:
    """One nonlinear step on a decrypted activation of shape ``in_shape``."""

    kind: OpKind
    in_shape: tuple[int, ...]
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)

    @property
    def out_shape(self) -> tuple[int, ...]:
        if self.kind is OpKind.RELU:
            return self.in_shape
        c, h, w = self.in_shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        return (c, (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1)

    def to_wire(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "in_shape": list(self.in_shape),
            "kernel": list(self.kernel),
            "stride": list(self.stride),
            "padding": list(self.padding),
        }

    @classmethod
    def from_wire(cls, d: dict) -> EnclaveOp:
        try:
            op = cls(
                OpKind(d["kind"]),
                tuple(int(v) for v in d["in_shape"]),
                tuple(int(v) for v in d["kernel"]),
                tuple(int(v) for v in d["stride"]),
                tuple(int(v) for v in d["padding"]),
            )
        except (KeyError, ValueError, TypeError):
            raise PlanError(f"Malformed enclave step {d!r:.80}.") from None
        if op.kind is OpKind.MAXPOOL2D and (len(op.in_shape) != 3 or min(op.out_shape) < 1):
            raise PlanError(f"Max-pool step {op} does not fit its input shape.")
        return op


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

    geometry: Layout
    out_shape: tuple[int, ...]
    ops: tuple[EnclaveOp, ...] = ()
    placement: Placement = Placement.HE
    weight_bits: int = 0

    @property
    def in_features(self) -> int:
        """The width of the activation this layer takes."""
        return self.geometry.cols if self.placement is Placement.HE else self.geometry.cols - 1

    @property
    def result_shape(self) -> tuple[int, ...]:
        return self.ops[-1].out_shape if self.ops else self.out_shape

    def to_wire(self) -> dict[str, Any]:
        return {
            "geometry": self.geometry.to_wire(),
            "out_shape": list(self.out_shape),
            "ops": [op.to_wire() for op in self.ops],
            "placement": self.placement.value,
            "weight_bits": self.weight_bits,
        }

    @classmethod
    def from_wire(cls, d: dict) -> Stage:
        try:
            return cls(
                layout_from_wire(d["geometry"]),
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
            g = stage.geometry
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
        return sorted({s for st in self.stages if st.placement is Placement.HE for s in st.geometry.rotation_steps})

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
