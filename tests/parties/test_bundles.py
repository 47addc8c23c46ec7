"""Bundles on the server's disk: written item by item and read back whole; older or damaged files are refused with
what to do, and skipped at start."""

from __future__ import annotations

import secrets

import msgpack
import pytest

from heclave.parties.bundles import BUNDLE_FORMAT, SUFFIX, Bundle, BundleStore
from heclave.protocol.errors import HeclaveError


def _bundle() -> Bundle:
    weights = [secrets.token_bytes(1000) for _ in range(3)] + [b"", secrets.token_bytes(50_000)]
    return Bundle(secrets.token_hex(16), b"graph", secrets.token_bytes(5000), [b"\x01", b""], weights)


def test_a_bundle_comes_back_from_disk_and_from_bytes_as_it_was_saved(tmp_path):
    store, bundle = BundleStore(tmp_path), _bundle()
    store.save(bundle)
    path = tmp_path / f"{bundle.model_id}{SUFFIX}"
    assert path.stat().st_mode & 0o777 == 0o600
    assert store.load_all() == [bundle]
    assert Bundle.from_bytes(path.read_bytes(), path) == bundle == Bundle.from_bytes(bundle.to_bytes(), path)


@pytest.mark.parametrize(
    "content, needle",
    [
        (
            msgpack.packb({"format": 2, "model_id": "m", "graph": b"g", "context": b"c", "masks": [], "weights": []}),
            "Redeploy",
        ),
        (msgpack.packb({"format": 2, "weights": [bytes(1 << 20)] * 80}), "Redeploy"),
        (b"\xc1 not a bundle", "Redeploy"),
        (_bundle().to_bytes()[:-1], "truncated"),
        (_bundle().to_bytes() + b"x", "truncated or padded"),
        (msgpack.packb({"format": BUNDLE_FORMAT, "model_id": 5, "masks": [], "sizes": []}), "damaged"),
    ],
    ids=["format 2", "format 2 larger than a header", "garbage", "truncated", "padded", "damaged header"],
)
def test_an_older_or_damaged_bundle_is_refused_with_what_to_do_and_skipped_at_start(tmp_path, content, needle):
    path = tmp_path / f"old{SUFFIX}"
    path.write_bytes(content)
    with pytest.raises(HeclaveError, match=needle):
        Bundle.read(path)
    store = BundleStore(tmp_path)
    kept = _bundle()
    store.save(kept)
    assert store.load_all() == [kept]
