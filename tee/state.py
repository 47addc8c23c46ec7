"""The enclave's persistent state: its key set, identity key and registered models, sealed on disk.

A restarted enclave comes back with the same CKKS keys and identity key (so
encrypted model bundles stay usable and owners' pinned evidence stays valid)
and with the models registered before the restart.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from he.context import CkksParams, SecretKeySet
from protocol.errors import ErrorCode, HeclaveError
from protocol.storage import write_atomic

from .sealing import seal, sealing_key, unseal

log = logging.getLogger(__name__)

KEYS_FILE = "enclave-keys.sealed"
MODELS_DIR = "models"


class EnclaveState:
    """Sealed files under ``state_dir`` (under Gramine: an encrypted mount)."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self._key = sealing_key(state_dir)

    def keys(self, params: CkksParams) -> tuple[SecretKeySet, X25519PrivateKey]:
        """The sealed key set and identity key, created and sealed on first start."""
        path = self.dir / KEYS_FILE
        if path.exists():
            record = unseal(self._key, "keys", path.read_bytes(), path)
            if CkksParams.from_wire(record["keys"]["params"]) != params:
                raise HeclaveError(
                    f"{path} holds keys for other CKKS parameters; move the state directory aside to start afresh.",
                    ErrorCode.INTERNAL,
                )
            log.info("restored sealed keys from %s", path)
            return SecretKeySet(params, record["keys"]), X25519PrivateKey.from_private_bytes(record["identity"])
        keys, identity = SecretKeySet(params), X25519PrivateKey.generate()
        raw = identity.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        write_atomic(path, seal(self._key, "keys", {"keys": keys.export(), "identity": raw}))
        log.info("created and sealed a new key set in %s", path)
        return keys, identity

    def save_model(self, model_id: str, graph: bytes, weights: dict[str, bytes]) -> None:
        """Seal a registered model: its graph and the weights only the enclave holds."""
        record = {"graph": graph, "weights": weights}
        write_atomic(self.dir / MODELS_DIR / f"{model_id}.sealed", seal(self._key, "model", record))

    def models(self) -> dict[str, tuple[bytes, dict[str, bytes]]]:
        """The models registered before, by model id: graph and enclave-held weights."""
        found = {}
        for path in sorted((self.dir / MODELS_DIR).glob("*.sealed")):
            record = unseal(self._key, "model", path.read_bytes(), path)
            found[path.stem] = (record["graph"], record.get("weights", {}))
        return found
