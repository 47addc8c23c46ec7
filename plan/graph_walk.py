"""A traced model's dataflow as heclave's stages: affine runs between values, exact steps, combined values.

Walking the ``torch.fx`` graph in order, every tensor is one of three things:
a *value* of the deployed graph (the input, or a stage's finished result,
which the enclave holds); a *run* of affine operations applied to a value,
not yet composed; or the *open* end of a stage's chain of exact steps, which
the next step may still extend. An affine operation extends a run; a
nonlinearity ends a run (composing it into a stage) or extends an open chain;
an addition, a product or a concatenation of two tensors becomes a step of
the later one's stage that names the other as a value, so a skip connection
costs the server nothing. A tensor that several operations read becomes a
value, and a step on a value that no stage is open on gets a stage of its own
whose affine layer is the identity.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from heclave.arith.nonlinear import combine
from heclave.graph.ops import EnclaveOp, OpKind
from heclave.protocol.errors import PlanError

from .activation_import import elementwise_affine, enclave_op, is_nonlinear
from .torch_steps import (
    MAX_AFFINE_ENTRIES,
    AffineMap,
    Step,
    applier,
    checked_op,
    classify,
    compose,
    describe,
    is_shape_query,
)

COMBINING_FUNCTIONS = {
    operator.add: OpKind.ADD,
    operator.iadd: OpKind.ADD,
    torch.add: OpKind.ADD,
    operator.mul: OpKind.MUL,
    operator.imul: OpKind.MUL,
    torch.mul: OpKind.MUL,
    torch.cat: OpKind.CONCAT,
    torch.concat: OpKind.CONCAT,
}
COMBINING_METHODS = {"add": OpKind.ADD, "add_": OpKind.ADD, "mul": OpKind.MUL, "mul_": OpKind.MUL}
# Values travel flattened, so these leave one unchanged: a run of them is the value it reads.
RESHAPE_MODULES = (torch.nn.Identity, torch.nn.Flatten, torch.nn.Unflatten, torch.nn.Dropout)
RESHAPE_FUNCTIONS = {torch.flatten, torch.nn.functional.dropout}
RESHAPE_METHODS = {"view", "reshape", "flatten", "contiguous", "unflatten"}


@dataclass
class ImportedStage:
    """One stage as imported: its composed affine map, the exact steps after it, and the value it reads."""

    affine: AffineMap
    ops: list[EnclaveOp]
    source: int


def _reshapes_only(steps: list[Step]) -> bool:
    """Whether a run only reshapes (or is dropout, inactive in evaluation): the same flat vector."""
    for step in steps:
        node = step.node
        if step.module is not None:
            if not isinstance(step.module, RESHAPE_MODULES):
                return False
        elif not (node.target in RESHAPE_FUNCTIONS or (node.op == "call_method" and node.target in RESHAPE_METHODS)):
            return False
    return True


def _combining(node: fx.Node) -> OpKind | None:
    if node.op == "call_function":
        return COMBINING_FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return COMBINING_METHODS.get(str(node.target))
    return None


def _tensor_args(node: fx.Node, kind: OpKind) -> list[fx.Node] | None:
    """The tensors a combining operation joins, in order, or ``None`` if one side is a number (affine)."""
    args = list(node.args[0]) if kind is OpKind.CONCAT else list(node.args[:2])
    if kind is not OpKind.CONCAT and len(args) == 2 and isinstance(args[1], (int, float)):
        return None
    if not all(isinstance(a, fx.Node) and not is_shape_query(a) and a.op != "get_attr" for a in args):
        raise PlanError(f"{describe(node, None)} combines something other than the model's activations.")
    extra = {k for k in node.kwargs if k != "dim"}
    if extra or (kind is not OpKind.CONCAT and len(node.args) > 2):
        raise PlanError(f"{describe(node, None)} takes arguments heclave does not import ({sorted(extra)}).")
    return args


class _Walk:
    """The walk's state: the stages so far and, for each tensor, where it stands."""

    def __init__(self, gm: fx.GraphModule, input_shape: tuple[int, ...]) -> None:
        self.gm = gm
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}
        self.value_shapes: list[tuple[int, ...]] = [input_shape]
        self.stages: list[ImportedStage] = []
        self.where: dict[fx.Node, tuple] = {}

    def users(self, node: fx.Node) -> int:
        return sum(1 for u in node.users if not is_shape_query(u))

    def value_of(self, node: fx.Node) -> int:
        """The value ``node`` is, composing its run or closing its stage's chain to make it one."""
        where = self.where[node]
        if where[0] == "value":
            return where[1]
        if where[0] == "run" and _reshapes_only(where[2]):
            self.where[node] = ("value", where[1])
            return where[1]
        k = where[1] if where[0] == "open" else self.compose(where[1], where[2])
        self.value_shapes.append(self.shapes[node])
        self.where[node] = ("value", k + 1)
        return k + 1

    def compose(self, source: int, steps: list[Step]) -> int:
        """A new stage: the run of ``steps`` composed exactly, reading value ``source``."""
        self.stages.append(ImportedStage(compose(steps, self.value_shapes[source]), [], source))
        return len(self.stages) - 1

    def identity(self, source: int) -> int:
        """A new stage whose affine layer is the identity, for steps on a value no stage is open on."""
        shape = self.value_shapes[source]
        n = int(np.prod(shape))
        if n * n > MAX_AFFINE_ENTRIES:
            raise PlanError(f"A step on an activation of {n} values that several layers read is not supported yet.")
        eye = np.eye(n)
        support = np.concatenate([eye != 0, np.zeros((n, 1), dtype=bool)], axis=1)
        self.stages.append(ImportedStage(AffineMap(eye, np.zeros(n), shape, shape, support, ["identity"]), [], source))
        return len(self.stages) - 1

    def open_stage(self, node: fx.Node) -> int:
        """The stage whose chain of steps may take a step on ``node`` next."""
        where = self.where[node]
        if self.users(node) == 1 and where[0] == "open":
            return where[1]
        if self.users(node) == 1 and where[0] == "run":
            return self.compose(where[1], where[2])
        return self.identity(self.value_of(node))

    def affine(self, node: fx.Node, source: fx.Node, module: torch.nn.Module | None) -> None:
        step = Step(node, "affine", applier(node, self.gm, source, self.shapes), describe(node, module), module)
        where = self.where[source]
        if where[0] == "run" and self.users(source) == 1:
            self.where[node] = ("run", where[1], [*where[2], step])
        else:
            self.where[node] = ("run", self.value_of(source), [step])

    def nonlinear(self, node: fx.Node, source: fx.Node, module: torch.nn.Module | None) -> None:
        name = describe(node, module)
        step = Step(node, "nonlinear", applier(node, self.gm, source, self.shapes), name, module)
        step.affine_part = elementwise_affine(node, module, self.gm)
        k = self.open_stage(source)
        self.stages[k].ops.append(checked_op(step, self.shapes[source]))
        self.where[node] = ("open", k)
        if step.affine_part is not None:  # LayerNorm's weight and bias: an affine run on the normalised value
            part = step.affine_part
            self.where[node] = (
                "run",
                self.value_of(node),
                [Step(node, "affine", part, f"{name} (weight and bias)", part)],
            )

    def combination(self, node: fx.Node, kind: OpKind, tensors: list[fx.Node]) -> None:
        """A step of the latest operand's stage that names the others as values."""
        alone = [t for t in tensors if tensors.count(t) == 1 and self.users(t) == 1]
        runs = [t for t in alone if self.where[t][0] == "run" and not _reshapes_only(self.where[t][2])]
        opened = [t for t in alone if self.where[t][0] == "open"]
        primary = runs[0] if runs else max(opened, key=lambda t: self.where[t][1], default=None)
        values = {t: self.value_of(t) for t in tensors if t is not primary}
        if primary is not None and self.where[primary][0] == "open" and max(values.values()) > self.where[primary][1]:
            primary = None
        if primary is None:
            primary = tensors[0]
            values = {t: self.value_of(t) for t in tensors}
            k = self.identity(values[primary])
        else:
            k = self.open_stage(primary)
        position = tensors.index(primary)
        ops = self.stages[k].ops
        shape = self.shapes[primary]
        axis = self._axis(node, len(shape)) if kind is OpKind.CONCAT else 0
        order = [(t, True) for t in reversed(tensors[:position])] + [(t, False) for t in tensors[position + 1 :]]
        for other, before in order:
            joined = {"dim": axis, "before": before} if kind is OpKind.CONCAT else {}
            op = EnclaveOp(kind, shape, operand=values[other], operand_shape=self.shapes[other], **joined)
            ops.append(op)
            shape = op.out_shape
        self._check(node, tensors, primary, ops[len(ops) - len(order) :], values)
        self.where[node] = ("open", k)

    def _axis(self, node: fx.Node, rank: int) -> int:
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        if not isinstance(dim, int) or isinstance(dim, bool) or not -rank - 1 <= dim <= rank or dim in (0, -rank - 1):
            raise PlanError(f"{describe(node, None)} joins along axis {dim!r}; heclave joins along a feature axis.")
        return dim - 1 if dim > 0 else dim + rank

    def _check(self, node: fx.Node, tensors: list[fx.Node], primary: fx.Node, ops: list, values: dict) -> None:
        """The steps reproduce the operation on random inputs (an argument misread is refused, not deployed)."""
        generator = torch.Generator().manual_seed(0)
        inputs = {t: torch.randn((2, *self.shapes[t]), generator=generator, dtype=torch.float64) for t in tensors}
        args = [inputs[t] for t in tensors]
        if node.op == "call_method":
            expected = getattr(args[0].clone(), str(node.target))(*args[1:])
        elif _combining(node) is OpKind.CONCAT:
            expected = torch.cat(args, dim=node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0))
        else:
            expected = node.target(args[0].clone(), *args[1:])
        got = []
        for b in range(2):
            x = inputs[primary][b].numpy()
            at_hand = {values[t]: inputs[t][b].numpy() for t in values}
            for op in ops:
                x = combine(x, op, at_hand[op.operand])
            got.append(x)
        if tuple(expected.shape[1:]) != got[0].shape or not np.allclose(np.stack(got), expected.numpy()):
            raise PlanError(f"{describe(node, None)}: the enclave's step does not reproduce it; it is not supported.")


def walk(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> list[ImportedStage]:
    """The stages of the traced model ``gm`` for inputs of ``input_shape`` (no batch axis)."""
    if sum(1 for node in gm.graph.nodes if node.op == "placeholder") != 1:
        raise PlanError("heclave models take exactly one input tensor.")
    state = _Walk(gm, input_shape)
    with torch.no_grad():
        _record_shapes(gm, input_shape, state.shapes)
        return _walk_nodes(state)


def _walk_nodes(state: _Walk) -> list[ImportedStage]:
    for node in state.gm.graph.nodes:
        if node.op == "placeholder":
            state.where[node] = ("value", 0)
        elif node.op == "output":
            return _finish(state, node)
        elif not (is_shape_query(node) or node.op == "get_attr"):
            _visit(state, node)
    raise PlanError("The model has no output.")


def _visit(state: _Walk, node: fx.Node) -> None:
    kind = _combining(node)
    tensors = _tensor_args(node, kind) if kind is not None else None
    if tensors is not None:
        state.combination(node, kind, tensors)
        return
    inputs = [a for a in node.all_input_nodes if not is_shape_query(a) and a.op != "get_attr"]
    if kind is not None:  # a number added to or multiplying one activation: affine
        role, module = "affine", None
    else:
        role, module = classify(node, state.gm)
    if len(inputs) != 1:
        raise PlanError(f"{describe(node, module)} reads {len(inputs)} activations; heclave expects one here.")
    if role == "affine":
        state.affine(node, inputs[0], module)
    else:
        state.nonlinear(node, inputs[0], module)


def _finish(state: _Walk, node: fx.Node) -> list[ImportedStage]:
    output = node.args[0]
    if not isinstance(output, fx.Node):
        raise PlanError("The model must return one tensor.")
    if state.value_of(output) != len(state.stages) or not state.stages:
        raise PlanError("The model's output must be the result of its last layer.")
    return state.stages


class _Shapes(ShapeProp):
    """torch's shape propagation, naming the layer that rejects its input."""

    def run_node(self, n: fx.Node) -> object:
        try:
            return super().run_node(n)
        except Exception as exc:
            module = self.module.get_submodule(str(n.target)) if n.op == "call_module" else None
            shape = tuple(n.all_input_nodes[0].meta["tensor_meta"].shape[1:]) if n.all_input_nodes else ()
            if is_nonlinear(n, module):
                enclave_op(n, module, shape, describe(n, module))  # names a hyperparameter that cannot fit
            cause = str(exc.__cause__ or exc).splitlines()[0]
            raise PlanError(
                f"{describe(n, module)} rejects its input of shape {shape} ({cause}); "
                "check --input-shape and the layer sizes."
            ) from None


def _record_shapes(gm: fx.GraphModule, input_shape: tuple[int, ...], shapes: dict) -> None:
    """Every tensor's shape (batch axis left out), from one run on a random input."""
    _Shapes(gm).propagate(torch.randn((2, *input_shape), dtype=torch.float64))
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            shapes[node] = tuple(meta.shape[1:])
