"""One encrypted dense layer: heclave's kernel, TenSEAL's ``CKKSVector.matmul`` and the floor, in one run.

All three see the same ``W``, ``b`` and ``x`` and the same ring (N = 8192, one
multiplicative level). heclave's time is ``LinearKernel.evaluate`` on input
ciphertexts in the layer's slot layout, up to the partial sums the enclave
finishes (it adds them up and adds the bias); TenSEAL's is ``matmul`` plus the bias on its own encrypted vector,
at its default thread count. TenSEAL has no encrypted-weight product, so the
encrypted-weight run is compared with TenSEAL's plaintext-weight one.

The floor is what the kernel's rotations and multiplications alone cost, each
timed here through sealapi at the level the kernel performs it: baby-step
rotations on fresh ciphertexts at the top level, giant-step rotations one level
down after the rescale, and ``multiply_plain`` or a ciphertext ``multiply``
according to the weight form. The unit operations are sampled between the
kernel's runs, so both see the same machine load.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from statistics import median

import numpy as np
import tenseal as ts
import tenseal.sealapi as seal

from heclave.graph.layouts.base import Layout
from heclave.graph.params import CkksParams
from heclave.graph.placement import WeightForm
from heclave.he.context import PublicContext, SecretKeySet
from heclave.he.linear import LinearKernel, OpCounter, encrypt_weights
from heclave.plan.calibration import median_ms
from heclave.plan.layouts import choose_layout
from heclave.protocol.errors import PlanError

UNIT_REPEATS = 4


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-300))


def _kernel(context: PublicContext, layout: Layout, w: np.ndarray, form: WeightForm) -> LinearKernel:
    if form is WeightForm.PLAIN:
        return LinearKernel.from_plain(context.toolkit, layout, w)
    mask, frames = encrypt_weights(context, layout, w)
    return LinearKernel.from_encrypted(context.toolkit, layout, mask, frames)


class UnitOps:
    """One rotation at the top level, one a level down, and one weight multiplication, as the kernel does them."""

    def __init__(self, keys: SecretKeySet, context: PublicContext, step: int, form: WeightForm) -> None:
        toolkit, ev = context.toolkit, context.toolkit.evaluator
        rng = np.random.default_rng(1)
        fresh = toolkit.load_ciphertext(keys.encrypt_symmetric(rng.uniform(-1, 1, keys.params.slots)))
        plain = toolkit.encode(rng.uniform(-1, 1, keys.params.slots))
        lower = seal.Ciphertext()
        ev.multiply_plain(fresh, plain, lower)
        ev.rescale_to_next_inplace(lower)
        out = seal.Ciphertext()
        if form is WeightForm.PLAIN:
            multiply = lambda: ev.multiply_plain(fresh, plain, out)  # noqa: E731
        else:
            weight = toolkit.load_ciphertext(context.encrypt(rng.uniform(-1, 1, keys.params.slots)))
            multiply = lambda: ev.multiply(fresh, weight, out)  # noqa: E731
        self.actions: dict[str, Callable[[], object]] = {
            "rotation": lambda: ev.rotate_vector(fresh, step, context.galois_keys, out),
            "rotation_rescaled": lambda: ev.rotate_vector(lower, step, context.galois_keys, out),
            "multiply": multiply,
        }
        self.samples: dict[str, list[float]] = {name: [] for name in self.actions}

    def sample(self, repeats: int = UNIT_REPEATS) -> None:
        """Time each operation ``repeats`` times more."""
        for name, action in self.actions.items():
            for _ in range(repeats):
                started = time.perf_counter()
                action()
                self.samples[name].append((time.perf_counter() - started) * 1e3)

    def medians(self) -> dict[str, float]:
        return {name: median(times) for name, times in self.samples.items()}


def tenseal_matmul(w: np.ndarray, b: np.ndarray, x: np.ndarray, runs: int) -> tuple[float, np.ndarray]:
    """TenSEAL's ``x @ W.T + b`` on an encrypted vector (plaintext weights, default threads): median ms, result."""
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 60])
    ctx.global_scale = 2.0**40
    ctx.generate_galois_keys()
    enc_x = ts.ckks_vector(ctx, x.tolist())
    w_t, bias = w.T.tolist(), b.tolist()
    results = []
    elapsed = median_ms(lambda: results.append(enc_x.matmul(w_t) + bias), runs, warmup=False)
    return elapsed, np.asarray(results[-1].decrypt())


def bench_linear(
    n_in: int,
    n_out: int,
    weights: WeightForm = WeightForm.ENCRYPTED,
    runs: int = 10,
    tenseal_runs: int = 2,
    seed: int = 0,
) -> dict:
    """Time an ``n_out x n_in`` dense layer three ways; returns the report ``heclave bench linear`` prints."""
    if n_in < 1 or n_out < 1 or runs < 1 or tenseal_runs < 1:
        raise PlanError("The layer needs at least one input and one output, and every timing at least one run.")
    params = CkksParams()
    if n_in > params.slots or n_out > params.slots:
        raise PlanError(f"TenSEAL's matmul takes at most {params.slots} inputs and outputs at N = 8192.")
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)
    b = 0.1 * rng.standard_normal(n_out)
    x = rng.uniform(-1.0, 1.0, n_in)
    want = w @ x + b

    keys = SecretKeySet(params)
    # The layout the planner would deploy for a dense layer.
    layout = choose_layout(np.ones((n_out, n_in), dtype=bool), params.slots, weights is WeightForm.ENCRYPTED)
    steps = layout.rotation_steps
    unit_step = steps[0] if steps else 1
    context = keys.public.with_galois(keys.galois_keys([*steps, unit_step]), [*steps, unit_step])
    kernel = _kernel(context, layout, w, weights)
    inputs = [context.toolkit.load_ciphertext(keys.encrypt_symmetric(row)) for row in layout.gather(x)]

    # Kernel runs and unit-operation samples alternate, so both see the same machine load.
    units = UnitOps(keys, context, unit_step, weights)
    times, ops, outputs = [], OpCounter(), []
    for _ in range(runs):
        ops = OpCounter()
        started = time.perf_counter()
        outputs = kernel.evaluate(inputs, context, ops)
        times.append((time.perf_counter() - started) * 1e3)
        units.sample()
    ours_ms = median(times)
    got = layout.scatter(np.stack([keys.decrypt_complex(ct) for ct in outputs])) + b
    unit = units.medians()
    baby = layout.in_cts * (min(layout.baby, layout.k) - 1)
    giant = ops.rotations - baby
    floor_ms = baby * unit["rotation"] + giant * unit["rotation_rescaled"] + ops.multiplications * unit["multiply"]

    tenseal_ms, tenseal_y = tenseal_matmul(w, b, x, tenseal_runs)
    return {
        "benchmark": "linear",
        "in": n_in,
        "out": n_out,
        "weights": weights.value,
        "tenseal_weights": WeightForm.PLAIN.value,
        "ours_ms": ours_ms,
        "tenseal_ms": tenseal_ms,
        "floor_ms": floor_ms,
        "speedup_vs_tenseal": tenseal_ms / ours_ms,
        "ours_over_floor": ours_ms / floor_ms,
        "rotations": ops.rotations,
        "baby_rotations": baby,
        "giant_rotations": giant,
        "multiplications": ops.multiplications,
        "relinearizations": ops.relinearizations,
        "rescales": ops.rescales,
        "t_rotation_ms": unit["rotation"],
        "t_rotation_rescaled_ms": unit["rotation_rescaled"],
        "t_multiply_ms": unit["multiply"],
        "max_rel_err": _relative_error(got, want),
        "tenseal_max_rel_err": _relative_error(tenseal_y[:n_out], want),
        "layout": layout.describe(),
        "galois_steps": len(steps),
        "runs": runs,
        "tenseal_runs": tenseal_runs,
    }
