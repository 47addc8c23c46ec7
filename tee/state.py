"""The enclave's persistent state: its identity key and registered models, sealed on disk.

A restarted enclave comes back with the same identity key (so owners' pinned
evidence stays valid) and with every model registered and not undeployed
before the restart, each with its own CKKS key set (so its encrypted bundle
stays usable), its owner and who may query it. A model record is sealed under
its model id, so the host cannot swap two models' records.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from heclave.protocol.errors import HeclaveError
from heclave.protocol.storage import write_atomic

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

    def save_model(self, model_id: str, record: dict) -> None:
        """Seal a registered model's record (graph, its owner's secrets, key set, rights) under its id."""
        write_atomic(self.dir / MODELS_DIR / f"{model_id}.sealed", seal(self._key, "model", record, model_id))

    def delete_model(self, model_id: str) -> None:
        """Forget an undeployed model: its sealed record, and with it its key set, leaves the state."""
        (self.dir / MODELS_DIR / f"{model_id}.sealed").unlink(missing_ok=True)

    def model(self, model_id: str) -> dict:
        """One model's sealed record, checked against its id."""
        path = self.dir / MODELS_DIR / f"{model_id}.sealed"
        return unseal(self._key, "model", path.read_bytes(), path, model_id)

    def models(self) -> dict[str, dict]:
        """The records of the models registered before, by model id; a record the host moved, swapped or
        altered is refused (logged, not restored)."""
        found = {}
        for path in sorted((self.dir / MODELS_DIR).glob("*.sealed")):
            try:
                found[path.stem] = self.model(path.stem)
            except HeclaveError as exc:
                log.error("not restoring %s: %s", path.name, exc.message)
        return found
