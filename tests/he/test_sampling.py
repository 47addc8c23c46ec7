"""The enclave's own encryptions: SEAL's distributions, fresh every time, and SEAL decrypts them."""

from __future__ import annotations

import numpy as np
import pytest

from heclave.he.rns import limb
from heclave.he.sampling import NOISE_PAIRS, centered_binomial, random_words, uniform_residues
from heclave.he.sealformat import Level, parse_ciphertext


def test_noise_is_the_centered_binomial_over_21_pairs():
    noise = centered_binomial(1 << 16)
    assert noise.min() >= -NOISE_PAIRS and noise.max() <= NOISE_PAIRS
    # Mean 0 and variance 21/2; the bounds are about eight standard errors wide.
    assert abs(noise.mean()) < 0.1
    assert abs(noise.var() - NOISE_PAIRS / 2) < 0.5
    # Symmetric: the counts of +1 and -1 agree to within sampling error.
    assert abs(np.sum(noise == 1) - np.sum(noise == -1)) < 8 * np.sqrt(np.sum(noise == 1))


@pytest.mark.parametrize("q", [1099511480321, 1152921504606748673, 17])
def test_masks_are_uniform_below_their_prime(q):
    values = uniform_residues(q, 1 << 15)
    assert values.dtype == np.uint64 and values.max() < q
    # Sixteen equal buckets, or every value of a prime small enough to have fewer than that twice over.
    buckets = np.bincount(
        values.astype(np.int64) if q < 32 else (values >> np.uint64(q.bit_length() - 4)).astype(np.int64)
    )
    if q >= 32:
        buckets = buckets[:-1]  # the top bucket is cut short by q
    expected = buckets.sum() / len(buckets)
    # Chi-square with at most 16 degrees of freedom: 60 is far beyond its 1e-6 quantile.
    assert ((buckets - expected) ** 2 / expected).sum() < 60


def test_every_call_draws_fresh_randomness():
    assert not np.array_equal(random_words(8), random_words(8))
    assert not np.array_equal(centered_binomial(64), centered_binomial(64))


def test_an_encryption_of_zero_holds_only_small_noise_and_seal_decrypts_it(keys):
    mask, other = keys.key_mask(), keys.key_mask()
    assert not np.array_equal(mask.a, other.a)
    frame = keys.encrypt_masked(mask, np.zeros(0))
    assert np.abs(keys.decrypt(keys.toolkit.load_ciphertext(frame, "encryption of zero"))).max() < 1e-6
    # c0 + c1 s is e exactly: undo the transform and the noise is back, small and not zero.
    context = keys.toolkit.context
    zero = parse_ciphertext(frame, Level.of(context, context.first_parms_id()))
    for i, q in enumerate(zero.level.moduli):
        tables, s, s_shoup = limb(q, zero.level.n), keys._top_key[i][1], keys._top_key[i][2]
        phase = np.array(zero.data[0, i])
        tables.multiply_accumulate(phase, zero.data[1, i], s, s_shoup)
        tables.inverse(phase)
        noise = tables.centered(phase)
        assert np.abs(noise).max() <= NOISE_PAIRS and noise.any()
