"""The enclave's own CKKS arithmetic agrees with SEAL's, bit for bit where SEAL is exact.

Every check compares he.rns, he.slots and he.sealformat with SEAL itself (through
TenSEAL's bindings) or with the mathematics (a negacyclic convolution in Python
integers), on fresh random inputs.
"""

from __future__ import annotations

# SEAL's NTT tables live in its util namespace, which tenseal.sealapi does not re-export.
import _sealapi_cpp as sealcpp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from heclave.graph.params import CkksParams
from heclave.he import _rns
from heclave.he.context import SecretKeySet, seal_context
from heclave.he.rns import limb, minimal_root
from heclave.he.sealformat import HEADER, Level, RawCiphertext, parse_ciphertext, parse_plaintext
from heclave.he.serialize import to_bytes
from heclave.he.slots import SlotCodec
from heclave.protocol.errors import CiphertextError, ProtocolError
from tests.helpers import layer_output

PRIMES = [m.value() for m in seal_context(CkksParams()).key_context_data().parms().coeff_modulus()]


def _seal_ntt(values: np.ndarray, q: int, n: int) -> np.ndarray:
    tables = sealcpp.util.NTTTables(n.bit_length() - 1, sealcpp.Modulus(q))
    return np.array(sealcpp.util.ntt_negacyclic_harvey(values.tolist(), tables), dtype=np.uint64)


@pytest.mark.parametrize("q", PRIMES)
@pytest.mark.parametrize("n", [8, 1024, 8192])
def test_forward_transform_is_seals_and_inverse_undoes_it(q, n):
    assert minimal_root(q, n) == sealcpp.util.NTTTables(n.bit_length() - 1, sealcpp.Modulus(q)).get_root()
    poly = np.random.default_rng().integers(0, q, n, dtype=np.uint64)
    transformed = poly.copy()
    limb(q, n).forward(transformed)
    assert np.array_equal(transformed, _seal_ntt(poly, q, n))
    limb(q, n).inverse(transformed)
    assert np.array_equal(transformed, poly)


def _negacyclic_product(a: list[int], b: list[int], q: int) -> list[int]:
    n = len(a)
    out = [0] * n
    for i in range(n):
        for j in range(n):
            sign = 1 if i + j < n else -1
            out[(i + j) % n] = (out[(i + j) % n] + sign * a[i] * b[j]) % q
    return out


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(PRIMES), st.sampled_from([2, 4, 16, 32]), st.randoms(use_true_random=False))
def test_pointwise_products_in_ntt_form_are_products_modulo_x_to_the_n_plus_one(q, n, rnd):
    a = [rnd.randrange(q) for _ in range(n)]
    b = [rnd.randrange(q) for _ in range(n)]
    tables = limb(q, n)
    fa, fb = np.array(a, dtype=np.uint64), np.array(b, dtype=np.uint64)
    tables.forward(fa)
    tables.forward(fb)
    product = np.zeros(n, dtype=np.uint64)
    tables.multiply_accumulate(product, fa, fb, np.array([(int(w) << 64) // q for w in fb], dtype=np.uint64))
    tables.inverse(product)
    assert product.tolist() == _negacyclic_product(a, b, q)


def test_kernels_refuse_mismatched_buffers():
    tables = limb(PRIMES[0], 8)
    with pytest.raises(ValueError):
        tables.forward(np.zeros(7, dtype=np.uint64))
    with pytest.raises(ValueError):
        tables.multiply_accumulate(np.zeros(8, dtype=np.uint64), np.zeros(4, dtype=np.uint64), *[np.zeros(8)] * 2)
    with pytest.raises(ValueError, match="2\\^62"):
        _rns.add(np.zeros(8, dtype=np.uint64), np.zeros(8, dtype=np.uint64), 1 << 62)


@pytest.mark.parametrize("complex_values", [False, True])
@pytest.mark.parametrize("count", [1, 5, 784, 4096])
def test_encoding_is_seals_up_to_the_rounding_of_a_coefficient(keys, complex_values, count):
    rng = np.random.default_rng()
    values = rng.uniform(-100, 100, count) + (1j * rng.uniform(-100, 100, count) if complex_values else 0)
    context = keys.toolkit.context
    top = Level.of(context, context.first_parms_id())
    seals = parse_plaintext(to_bytes(keys.toolkit.encode(values)), top)
    ours = SlotCodec(top.n).encode(values, keys.params.scale)
    # Two FFTs round differently, so a coefficient a hair from .5 may land on either side.
    for i, q in enumerate(top.moduli):
        tables = limb(q, top.n)
        expected = seals[i].copy()
        tables.inverse(expected)
        residues = tables.reduce(ours)
        assert set(np.unique(tables.reduce(expected.astype(np.int64) - residues.astype(np.int64)))) <= {0, 1, q - 1}
        tables.forward(residues)
        tables.inverse(residues)
        assert np.array_equal(residues, tables.reduce(ours))


def test_decoding_agrees_with_seals(keys):
    rng = np.random.default_rng()
    plain = keys.toolkit.encode(rng.uniform(-3, 3, keys.params.slots) + 1j * rng.uniform(-3, 3, keys.params.slots))
    expected = np.array(keys.toolkit.encoder.decode_complex(plain))
    context = keys.toolkit.context
    residues = parse_plaintext(to_bytes(plain), Level.of(context, context.first_parms_id()))[0].copy()
    tables = limb(keys.output_level.moduli[0], keys.params.poly_modulus_degree)
    tables.inverse(residues)
    got = SlotCodec(keys.params.poly_modulus_degree).decode(tables.centered(residues), plain.scale)
    assert np.abs(got - expected).max() < 1e-9


def test_values_too_large_to_encode_are_refused():
    with pytest.raises(OverflowError):
        SlotCodec(16).encode(np.array([1e13]), 2.0**40)


@pytest.mark.parametrize("relinearize", [None, True, False], ids=["plain-weights", "relinearized", "three-polys"])
def test_decrypting_a_layer_output_matches_seals_decryption(keys, relinearize):
    rng = np.random.default_rng()
    values, weights = rng.uniform(-4, 4, keys.params.slots), rng.uniform(-1, 1, keys.params.slots)
    ct = layer_output(keys, values, weights, relinearize)
    assert ct.size() == (3 if relinearize is False else 2)
    got = keys.decrypt_output(to_bytes(ct))
    assert np.abs(got - keys.decrypt_complex(ct)).max() < 1e-9
    assert np.abs(got.real - values * weights).max() < 1e-5


def test_a_written_ciphertext_loads_in_seal_and_decrypts_to_the_same_values(keys):
    values = np.random.default_rng().normal(size=300)
    context = keys.toolkit.context
    raw = parse_ciphertext(keys.public.encrypt(values), Level.of(context, context.first_parms_id()))
    again = keys.toolkit.load_ciphertext(raw.to_bytes())
    assert np.abs(keys.decrypt(again)[:300] - values).max() < 1e-6
    assert parse_ciphertext(raw.to_bytes(), raw.level).scale == raw.scale


def _output_frame(keys) -> bytes:
    return to_bytes(layer_output(keys, np.ones(8), np.ones(8), None))


def _raw_output(keys) -> RawCiphertext:
    return parse_ciphertext(_output_frame(keys), keys.output_level)


def _tamper(keys, change) -> bytes:
    raw = _raw_output(keys)
    raw.data = np.array(raw.data)
    change(raw)
    return raw.to_bytes()


@pytest.mark.parametrize(
    "frame",
    [
        lambda keys: b"",
        lambda keys: _output_frame(keys)[:-1],
        lambda keys: b"\x00" + _output_frame(keys)[1:],
        lambda keys: _output_frame(keys)[:3] + b"\x09" + _output_frame(keys)[4:],
        lambda keys: _output_frame(keys)[: HEADER.size] + b"\x28\xb5\x2f\xfd" + bytes(64),
        lambda keys: _tamper(keys, lambda raw: raw.data.__setitem__((0, 0, 5), keys.output_level.moduli[0])),
        lambda keys: _tamper(keys, lambda raw: raw.data.__setitem__(slice(1, None), 0)),
        lambda keys: _tamper(keys, lambda raw: setattr(raw, "scale", float("nan"))),
        lambda keys: _tamper(keys, lambda raw: setattr(raw, "data", np.concatenate([raw.data, raw.data[:2]]))),
        lambda keys: keys.public.encrypt(np.ones(4)),
        lambda keys: keys.encrypt_symmetric(np.ones(4)),
    ],
    ids=[
        "empty",
        "truncated",
        "bad-magic",
        "other-seal-version",
        "corrupt-zstd",
        "coefficient-at-its-prime",
        "transparent",
        "nan-scale",
        "four-polynomials",
        "wrong-level",
        "seeded",
    ],
)
def test_malformed_layer_outputs_are_refused(keys, frame):
    with pytest.raises(CiphertextError):
        keys.decrypt_output(frame(keys))


def test_parameters_with_more_than_one_prime_left_after_a_layer_are_refused():
    with pytest.raises(ProtocolError, match="depth one"):
        SecretKeySet(CkksParams(8192, (60, 40, 40, 60), 40))
