"""The enclave's persistent state: its identity key and registered models, sealed on disk.

A restarted enclave comes back with the same identity key (so owners' pinned
evidence stays valid) and with every model registered before the restart,
each with its own CKKS key set (so its encrypted bundle stays usable). A model
record names its model id inside the sealed payload, so the host cannot swap
two models' records.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protocol.storage import write_atomic

from .sealing import seal, sealing_key, unseal

log = logging.getLogger(__name__)

KEYS_FILE = "enclave-identity.sealed"
MODELS_DIR = "models"


class EnclaveState:
    """Sealed files under ``state_dir`` (under Gramine: an encrypted mount)."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self._key = sealing_key(state_dir)

    def identity(self) -> X25519PrivateKey:
        """The sealed identity key, created and sealed on first start."""
        path = self.dir / KEYS_FILE
        if path.exists():
            record = unseal(self._key, "identity", path.read_bytes(), path)
            log.info("restored the sealed identity key from %s", path)
            return X25519PrivateKey.from_private_bytes(record["identity"])
        identity = X25519PrivateKey.generate()
        raw = identity.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        write_atomic(path, seal(self._key, "identity", {"identity": raw}))
        log.info("created and sealed a new identity key in %s", path)
        return identity

    def save_model(self, model_id: str, graph: bytes, secrets: dict, keys: dict) -> None:
        """Seal a registered model: its graph, what its owner sealed to the enclave, and its key set."""
        record = {"model_id": model_id, "graph": graph, "secrets": secrets, "keys": keys}
        write_atomic(self.dir / MODELS_DIR / f"{model_id}.sealed", seal(self._key, "model", record))

    def models(self) -> dict[str, tuple[bytes, dict, dict]]:
        """The models registered before, by model id: graph, owner's secrets and key set."""
        found = {}
        for path in sorted((self.dir / MODELS_DIR).glob("*.sealed")):
            record = unseal(self._key, "model", path.read_bytes(), path)
            if record.get("model_id") != path.stem:
                log.error("%s holds another model's sealed record (moved or swapped); not restoring it", path)
                continue
            found[path.stem] = (record["graph"], record["secrets"], record["keys"])
        return found
