"""Key masks and flooding noise made between requests: correct, fresh, used once, and their cost reported."""

from __future__ import annotations

import numpy as np
import pytest

from heclave.tee.precompute import NOISE_CHUNK, MaskPool, NoisePool


def _decrypt(keys, data: bytes, n: int) -> np.ndarray:
    return keys.decrypt(keys.toolkit.load_ciphertext(data))[:n]


@pytest.mark.parametrize("n", [1, 257, 4096])
def test_a_masked_encryption_decrypts_to_the_values(keys, n):
    values = np.random.default_rng().uniform(-50, 50, n)
    got = _decrypt(keys, keys.encrypt_masked(keys.key_mask(), values), n)
    assert np.abs(got - values).max() < 1e-6


def test_a_mask_cannot_be_used_twice(keys):
    mask = keys.key_mask()
    keys.encrypt_masked(mask, np.ones(3))
    with pytest.raises(ValueError):
        keys.encrypt_masked(mask, np.ones(3))


def test_the_server_accepts_pooled_encryptions_as_fresh_top_level_ciphertexts(keys):
    pool = MaskPool(keys, size=1)
    pool.refill()
    data, _ = pool.encrypt(np.arange(5.0))
    ct = keys.public.toolkit.load_ciphertext(data, "pooled ciphertext")
    assert ct.parms_id() == keys.toolkit.context.first_parms_id() and ct.size() == 2


def test_pool_fills_to_its_size_and_reports_what_each_mask_cost(keys):
    pool = MaskPool(keys, size=3)
    while pool.refill():
        pass
    assert len(pool) == 3
    values = np.random.default_rng().normal(size=100)
    first, offline_ms = pool.encrypt(values)
    assert offline_ms > 0 and len(pool) == 2
    second, _ = pool.encrypt(values)
    # Two encryptions of one vector share no randomness.
    assert first != second
    for data in (first, second):
        assert np.abs(_decrypt(keys, data, 100) - values).max() < 1e-6


def test_an_empty_pool_encrypts_on_the_spot_and_reports_no_offline_work(keys):
    pool = MaskPool(keys, size=0)
    assert not pool.refill()
    values = np.random.default_rng().normal(size=10)
    data, offline_ms = pool.encrypt(values)
    assert offline_ms == 0.0
    assert np.abs(_decrypt(keys, data, 10) - values).max() < 1e-6


def test_noise_pool_draws_standard_normals_once_and_reports_their_cost():
    pool = NoisePool(size=2 * NOISE_CHUNK)
    while pool.refill():
        pass
    assert len(pool) == 2 * NOISE_CHUNK
    first, offline_ms = pool.take(NOISE_CHUNK)
    assert offline_ms > 0 and len(pool) == NOISE_CHUNK
    second, _ = pool.take(NOISE_CHUNK)
    assert not np.intersect1d(first, second).size, "a draw was handed out twice"
    # Beyond the pool, draws are made on the spot and cost no offline time.
    third, offline_ms = pool.take(3 * NOISE_CHUNK)
    assert offline_ms == 0.0 and len(pool) == 0
    draws = np.concatenate([first, second, third])
    # Mean 0, variance 1 and tails as a normal's (P(|z| > 2) = 4.55%), each to within about six standard errors.
    assert abs(draws.mean()) < 6 / np.sqrt(draws.size) and abs(draws.var() - 1) < 6 * np.sqrt(2 / draws.size)
    assert 0.0455 - 0.017 < np.mean(np.abs(draws) > 2) < 0.0455 + 0.017
