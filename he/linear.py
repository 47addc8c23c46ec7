"""The encrypted affine layer: baby-step giant-step over generalised diagonals.

The weights come in one of two forms, fixed at deployment: plaintexts encoded
once (the server is trusted with the weights), or ciphertexts encrypted by the
model owner under the enclave's public key (the default: the server learns
nothing about the weights). Products of one giant-step group are summed while
still of size three and rescaled; only a group that must then be rotated is
relinearized, one level down where that and the rotation cost half as much.
The unrotated group's three-polynomial sum goes to the enclave as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import tenseal.sealapi as seal

from heclave.graph.layouts.base import Layout
from heclave.graph.placement import WeightForm
from heclave.protocol.errors import CiphertextError, PlanError

from .context import PublicContext, Toolkit


def diagonal_mask(layout: Layout, weights: np.ndarray, support: np.ndarray | None = None) -> np.ndarray:
    """Which diagonals of an encrypted layer exist: ``[out_cts, in_cts, k]``, public.

    With ``support`` (the architecture's structural nonzeros) the mask depends
    on the architecture only, and a diagonal whose trained weights happen to be
    all zero is encrypted like any other; without it, the mask follows the
    weights themselves and reveals such diagonals.
    """
    pattern = layout.diagonals(weights if support is None else support.astype(np.float64))
    return np.any(pattern != 0, axis=-1)


def pack_mask(mask: np.ndarray) -> bytes:
    """A diagonal mask as it travels: its bits, packed."""
    return np.packbits(mask.ravel()).tobytes()


def unpack_mask(packed: bytes, layout: Layout, what: str) -> np.ndarray:
    """The ``[out_cts, in_cts, k]`` mask :func:`pack_mask` wrote for ``layout``, or a :class:`PlanError`."""
    shape = (layout.out_cts, layout.in_cts, layout.k)
    bits = np.unpackbits(np.frombuffer(packed, dtype=np.uint8))
    if bits.size < int(np.prod(shape)):
        raise PlanError(f"{what}'s diagonal mask is too short for its layout.")
    return bits[: int(np.prod(shape))].reshape(shape).astype(bool)


def encrypt_diagonals(context: PublicContext, layout: Layout, weights: np.ndarray, mask: np.ndarray) -> list[bytes]:
    """The model owner's side: the diagonals ``mask`` selects, encrypted in mask order under the model's context."""
    diags = layout.diagonals(weights)
    return [context.encrypt(diags[idx]) for idx in zip(*np.nonzero(mask))]


def encrypt_weights(
    context: PublicContext, layout: Layout, weights: np.ndarray, support: np.ndarray | None = None
) -> tuple[np.ndarray, list[bytes]]:
    """The diagonal mask (:func:`diagonal_mask`) and those diagonals encrypted (:func:`encrypt_diagonals`)."""
    mask = diagonal_mask(layout, weights, support)
    return mask, encrypt_diagonals(context, layout, weights, mask)


@dataclass
class OpCounter:
    """Homomorphic operations performed, for reports and for checking the cost model.

    ``ms`` is what they took where they ran, loading and serialising the
    ciphertexts included (a worker sets it; a kernel leaves it at zero).
    """

    rotations: int = 0
    multiplications: int = 0
    relinearizations: int = 0
    rescales: int = 0
    ms: float = 0.0

    def add(self, other: OpCounter) -> None:
        """Accumulate another counter's operations into this one."""
        self.rotations += other.rotations
        self.multiplications += other.multiplications
        self.relinearizations += other.relinearizations
        self.rescales += other.rescales
        self.ms += other.ms


@dataclass
class LinearKernel:
    """One deployed affine layer on the server: its layout and its prepared weights."""

    toolkit: Toolkit
    layout: Layout
    form: WeightForm
    mask: np.ndarray
    weights: dict[tuple[int, int, int], seal.Plaintext | seal.Ciphertext] = field(repr=False)

    @classmethod
    def from_plain(cls, toolkit: Toolkit, layout: Layout, weights: np.ndarray) -> LinearKernel:
        """Encode the diagonals of plaintext weights once, at deployment."""
        diags = layout.diagonals(weights)
        encoded = {}
        for idx in zip(*np.nonzero(np.any(diags != 0, axis=-1))):
            plain = toolkit.encode(diags[idx])
            # A diagonal below the encoding precision encodes to zero, and SEAL refuses its product.
            if not plain.is_zero():
                encoded[idx] = plain
        mask = np.zeros((layout.out_cts, layout.in_cts, layout.k), dtype=bool)
        for idx in encoded:
            mask[idx] = True
        return cls._checked(toolkit, layout, WeightForm.PLAIN, mask, encoded)

    @classmethod
    def from_encrypted(
        cls, toolkit: Toolkit, layout: Layout, mask: np.ndarray, frames: Sequence[bytes]
    ) -> LinearKernel:
        """Load the model owner's encrypted diagonals, one frame per nonzero diagonal."""
        mask = np.asarray(mask, dtype=bool)
        expected = (layout.out_cts, layout.in_cts, layout.k)
        if mask.shape != expected:
            raise PlanError(f"Weight mask has shape {mask.shape}, the layer's layout needs {expected}.")
        keys = list(zip(*np.nonzero(mask)))
        if len(keys) != len(frames):
            raise PlanError(f"The layer needs {len(keys)} encrypted diagonals, the bundle carries {len(frames)}.")
        loaded = {k: toolkit.load_ciphertext(f, "encrypted weight") for k, f in zip(keys, frames)}
        return cls._checked(toolkit, layout, WeightForm.ENCRYPTED, mask, loaded)

    @classmethod
    def _checked(
        cls, toolkit: Toolkit, layout: Layout, form: WeightForm, mask: np.ndarray, weights: dict
    ) -> LinearKernel:
        """The kernel, unless an output ciphertext would have no product to start from."""
        empty = [o for o in range(layout.out_cts) if not mask[o].any()]
        if empty:
            raise PlanError(
                f"Output ciphertext(s) {empty} of a {layout.rows}x{layout.cols} layer have no weight above "
                f"CKKS's encoding precision (scale 2^{toolkit.params.scale_bits}); rescale the layer's weights."
            )
        return cls(toolkit, layout, form, mask, weights)

    def evaluate(
        self, inputs: Sequence[seal.Ciphertext], context: PublicContext, counter: OpCounter | None = None
    ) -> list[seal.Ciphertext]:
        """``[out_cts]`` ciphertexts of partial sums, one level down, for the enclave to finish."""
        g = self.layout
        if len(inputs) != g.in_cts:
            raise CiphertextError(f"The layer takes {g.in_cts} input ciphertexts, got {len(inputs)}.")
        counter = counter or OpCounter()
        ev = self.toolkit.evaluator
        babies = [self._baby_steps(ct, context, counter) for ct in inputs]
        outputs = []
        for o in range(g.out_cts):
            total = None
            for giant in range(g.giant):
                part = self._giant_group(o, giant, babies, context, counter)
                if part is None:
                    continue
                if giant:
                    ev.rotate_vector_inplace(part, giant * g.baby, context.galois_keys)
                    counter.rotations += 1
                total = part if total is None else _add(ev, total, part)
            outputs.append(total)
        return outputs

    def _baby_steps(self, ct: seal.Ciphertext, context: PublicContext, counter: OpCounter) -> list[seal.Ciphertext]:
        steps = [ct]
        for b in range(1, min(self.layout.baby, self.layout.k)):
            rotated = seal.Ciphertext()
            self.toolkit.evaluator.rotate_vector(ct, b, context.galois_keys, rotated)
            steps.append(rotated)
        counter.rotations += len(steps) - 1
        return steps

    def _giant_group(
        self, o: int, giant: int, babies: list[list[seal.Ciphertext]], context: PublicContext, counter: OpCounter
    ) -> seal.Ciphertext | None:
        g, ev = self.layout, self.toolkit.evaluator
        part = None
        for b in range(g.baby):
            k = giant * g.baby + b
            if k >= g.k:
                break
            for i in range(g.in_cts):
                if not self.mask[o, i, k]:
                    continue
                product = seal.Ciphertext()
                if self.form is WeightForm.PLAIN:
                    ev.multiply_plain(babies[i][b], self.weights[(o, i, k)], product)
                else:
                    ev.multiply(babies[i][b], self.weights[(o, i, k)], product)
                counter.multiplications += 1
                part = product if part is None else _add(ev, part, product)
        if part is None:
            return None
        ev.rescale_to_next_inplace(part)
        counter.rescales += 1
        # Only a rotation needs two polynomials; the enclave decrypts the others as they are.
        if self.form is WeightForm.ENCRYPTED and giant > 0:
            ev.relinearize_inplace(part, context.relin_keys)
            counter.relinearizations += 1
        return part


def _add(ev: seal.Evaluator, a: seal.Ciphertext, b: seal.Ciphertext) -> seal.Ciphertext:
    ev.add_inplace(a, b)
    return a
