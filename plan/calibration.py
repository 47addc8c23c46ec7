"""Unit costs measured on the machine at hand, stored once and used by the planner.

``heclave calibrate`` times each primitive the cost model counts (CKKS
rotations, multiplications, rescales and the enclave's per-ciphertext work,
and the plaintext products of the other placements) and writes them to a
versioned JSON file. SGX's own overheads (EPC paging, enclave transitions)
cannot be measured without SGX, so enclave work is multiplied by a configurable
slowdown factor instead.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from statistics import median

import numpy as np
import tenseal.sealapi as seal

from heclave.arith.blinding import P
from heclave.arith.sparse import SparseMatrix
from heclave.graph.params import CkksParams
from heclave.he.context import SecretKeySet
from heclave.he.serialize import to_bytes
from heclave.plan.costs import ENCLAVE_FACTOR, UnitCosts
from heclave.protocol.errors import PlanError
from heclave.protocol.storage import PUBLIC_MODE, write_atomic

CALIBRATION_FORMAT = 1
DEFAULT_PATH = Path.home() / ".config" / "heclave" / "costs.json"


@dataclass(frozen=True)
class PlaintextCosts:
    """Nanoseconds per nonzero weight for the placements that do not use CKKS."""

    sparse_mac_ns: float = 5.0
    field_mac_ns: float = 40.0


@dataclass(frozen=True)
class Calibration:
    """Everything the planner's cost model needs."""

    he: UnitCosts
    plaintext: PlaintextCosts

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"format": CALIBRATION_FORMAT, "he": asdict(self.he), "plaintext": asdict(self.plaintext)}
        write_atomic(path, json.dumps(data, indent=2).encode(), PUBLIC_MODE)

    @classmethod
    def load(cls, path: Path = DEFAULT_PATH) -> Calibration:
        """The stored calibration, or the built-in defaults when there is none."""
        if not path.exists():
            return cls(UnitCosts(), PlaintextCosts())
        data = json.loads(path.read_text())
        if data.get("format") != CALIBRATION_FORMAT:
            raise PlanError(
                f"{path} has calibration format {data.get('format')!r}, this version reads "
                f"{CALIBRATION_FORMAT}; run `heclave calibrate` again."
            )
        he = {f.name: float(data["he"][f.name]) for f in fields(UnitCosts) if f.name in data["he"]}
        return cls(UnitCosts(**he), PlaintextCosts(**data["plaintext"]))


def median_ms(action: Callable[[], object], repeats: int = 15, warmup: bool = True) -> float:
    """Median wall-clock milliseconds of ``action`` over ``repeats`` runs (after one untimed run)."""
    if warmup:
        action()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append((time.perf_counter() - started) * 1e3)
    return median(times)


def calibrate(enclave_factor: float = ENCLAVE_FACTOR) -> Calibration:
    """Measure every unit cost on this machine (a few seconds)."""
    keys = SecretKeySet(CkksParams())
    toolkit, ev = keys.toolkit, keys.toolkit.evaluator
    steps = [1]
    context = keys.public.with_galois(keys.galois_keys(steps), steps)
    rng = np.random.default_rng(0)
    values = rng.uniform(-1, 1, keys.params.slots)
    fresh = toolkit.load_ciphertext(keys.encrypt_symmetric(values))
    other = toolkit.load_ciphertext(keys.encrypt_symmetric(values))
    plain = toolkit.encode(values)
    out = seal.Ciphertext()
    lower = seal.Ciphertext()
    ev.multiply_plain(fresh, plain, lower)
    ev.rescale_to_next_inplace(lower)
    cube = seal.Ciphertext()
    ev.multiply(fresh, other, cube)
    ev.rescale_to_next_inplace(cube)
    lower_bytes = to_bytes(lower)
    he = UnitCosts(
        rotation=median_ms(lambda: ev.rotate_vector(fresh, 1, context.galois_keys, out)),
        rotation_rescaled=median_ms(lambda: ev.rotate_vector(lower, 1, context.galois_keys, out)),
        rescale=median_ms(lambda: ev.rescale_to_next(fresh, out)),
        multiply_plain=median_ms(lambda: ev.multiply_plain(fresh, plain, out)),
        multiply_cipher=median_ms(lambda: ev.multiply(fresh, other, out)),
        relinearize_rescaled=median_ms(lambda: ev.relinearize(cube, context.relin_keys, out)),
        add=median_ms(lambda: ev.add(fresh, other, out)),
        enclave_decrypt=median_ms(lambda: keys.decrypt_output(lower_bytes)),
        # Online and precomputed parts together: the enclave does both, in or between requests.
        enclave_encrypt=median_ms(lambda: keys.encrypt_masked(keys.key_mask(), values)),
        enclave_factor=enclave_factor,
    )
    dense = rng.uniform(-1, 1, (256, 1024)) * (rng.uniform(0, 1, (256, 1024)) < 0.1)
    sparse = SparseMatrix.from_dense(dense)
    field = SparseMatrix.from_dense(np.mod(np.round(dense * 4096).astype(np.int64), P))
    x = rng.uniform(-1, 1, (1, 1024))
    v = rng.integers(0, P, 1024, dtype=np.int64)
    nnz = len(sparse.values)
    plaintext = PlaintextCosts(
        sparse_mac_ns=median_ms(lambda: sparse.apply(x)) * 1e6 / nnz,
        field_mac_ns=median_ms(lambda: field.apply_mod(v)) * 1e6 / nnz,
    )
    return Calibration(he, plaintext)
