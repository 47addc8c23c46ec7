"""The enclave's registered models: whose each one is, who may query it, and how many one identity may hold.

A model belongs to the identity whose session registered it. Only that owner
may change who may query it or undeploy it; the readers are identities the
owner named, or anyone when the owner said so explicitly, and the owner itself
always. The enclave enforces all of it on the identity its session handshake
proved (``tee.sessions``): nothing the server says counts. Each owner holds at
most ``PER_OWNER`` models under a ceiling of ``LIMIT`` in all, refused with
``quota`` rather than by evicting anyone's model; an undeployed model leaves
the sealed state, key set included.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from heclave.graph.model import ModelGraph
from heclave.graph.params import CkksParams
from heclave.he.context import SecretKeySet
from heclave.protocol.errors import ErrorCode, ForbiddenError, HeclaveError, ProtocolError, QuotaError

from .execution import ModelRuntime
from .state import EnclaveState

log = logging.getLogger(__name__)

PER_OWNER = 8
LIMIT = 256
MAX_READERS = 4096


@dataclass(frozen=True)
class Rights:
    """Who owns a model and who may query it."""

    owner: bytes
    readers: frozenset[bytes] = frozenset()
    anyone: bool = False

    def may_query(self, peer: bytes) -> bool:
        return self.anyone or peer == self.owner or peer in self.readers

    def to_record(self) -> dict:
        return {"owner": self.owner, "readers": sorted(self.readers), "anyone": self.anyone}

    @classmethod
    def granted(cls, owner: bytes, sealed: dict) -> Rights:
        """The rights an owner's sealed ``readers`` and ``anyone`` fields give, checked field by field."""
        readers, anyone = sealed.get("readers", []), sealed.get("anyone", False)
        if not isinstance(anyone, bool):
            raise ProtocolError("'anyone' must be true or false.", ErrorCode.BAD_FIELD)
        if not isinstance(readers, list) or not all(isinstance(r, bytes) and len(r) == 32 for r in readers):
            raise ProtocolError("'readers' must be a list of 32-byte identity keys.", ErrorCode.BAD_FIELD)
        if len(readers) > MAX_READERS:
            raise ProtocolError(f"A model names at most {MAX_READERS} readers; use anyone=True.", ErrorCode.TOO_LARGE)
        return cls(owner, frozenset(readers), anyone)


class ModelTable:
    """The models an enclave holds, with their rights, kept in step with the sealed state."""

    def __init__(self, state: EnclaveState | None, runtime: Callable[[ModelGraph, SecretKeySet, dict], ModelRuntime]):
        self._state, self._runtime = state, runtime
        self._models: dict[str, ModelRuntime] = {}
        self._rights: dict[str, Rights] = {}
        self._standing: set[bytes] = set()

    def __iter__(self) -> Iterator[ModelRuntime]:
        return iter(list(self._models.values()))

    def restore(self) -> None:
        """Bring back every model the sealed state holds (each record checked when unsealed)."""
        if self._state is None:
            return
        for model_id, record in self._state.models().items():
            try:
                keys = SecretKeySet(CkksParams.from_wire(record["keys"]["params"]), record["keys"])
                runtime = self._runtime(ModelGraph.from_bytes(record["graph"]), keys, record["secrets"])
                rights = Rights(record["owner"], frozenset(record["readers"]), bool(record["anyone"]))
            except (HeclaveError, KeyError, TypeError) as exc:
                log.error("cannot restore model %s; deploy it again: %s", model_id, getattr(exc, "message", exc))
                continue
            self._models[model_id], self._rights[model_id] = runtime, rights
        self._recount()

    def register(self, graph_bytes: bytes, keys: SecretKeySet, vouched: dict, rights: Rights) -> str:
        """Hold a new model for ``rights.owner`` within its quota; returns the new model id."""
        owned = sum(1 for r in self._rights.values() if r.owner == rights.owner)
        if owned >= PER_OWNER:
            raise QuotaError(f"This identity owns {PER_OWNER} models, its limit; undeploy one first.")
        if len(self._models) >= LIMIT:
            raise QuotaError(f"The enclave holds its ceiling of {LIMIT} models; retry when some are undeployed.")
        runtime = self._runtime(ModelGraph.from_bytes(graph_bytes), keys, vouched)
        model_id = secrets.token_hex(16)
        if self._state is not None:
            record = {"graph": graph_bytes, "secrets": vouched, "keys": keys.export(), **rights.to_record()}
            self._state.save_model(model_id, record)
        self._models[model_id], self._rights[model_id] = runtime, rights
        self._recount()
        return model_id

    def get(self, model_id: str) -> ModelRuntime | None:
        return self._models.get(model_id)

    def for_reader(self, model_id: str, peer: bytes) -> ModelRuntime:
        """The model, if the identity ``peer`` may query it."""
        runtime = self._models.get(model_id)
        if runtime is None:
            raise HeclaveError(f"Unknown model {model_id!r}; deploy it again.", ErrorCode.UNKNOWN_MODEL)
        if not self._rights[model_id].may_query(peer):
            raise ForbiddenError(
                f"This identity may not query model {model_id!r}; its owner must name it ('heclave model-owner grant')."
            )
        return runtime

    def _owned(self, model_id: str, peer: bytes) -> Rights:
        rights = self._rights.get(model_id)
        if rights is None:
            raise HeclaveError(f"Unknown model {model_id!r}.", ErrorCode.UNKNOWN_MODEL)
        if rights.owner != peer:
            raise ForbiddenError(f"Only the identity that deployed model {model_id!r} may change or undeploy it.")
        return rights

    def set_rights(self, model_id: str, peer: bytes, sealed: dict) -> Rights:
        """Replace who may query ``model_id``; its owner only."""
        self._owned(model_id, peer)
        rights = Rights.granted(peer, sealed)
        if self._state is not None:
            self._state.save_model(model_id, self._state.model(model_id) | rights.to_record())
        self._rights[model_id] = rights
        self._recount()
        return rights

    def remove(self, model_id: str, peer: bytes) -> None:
        """Undeploy ``model_id``: its key set and record are gone from memory and from the sealed state."""
        self._owned(model_id, peer)
        if self._state is not None:
            self._state.delete_model(model_id)
        del self._models[model_id], self._rights[model_id]
        self._recount()

    def standing(self, peer: bytes) -> bool:
        """Whether ``peer`` owns a model or is named on one's list (the sessions' priority, ``tee.sessions``)."""
        return peer in self._standing

    def _recount(self) -> None:
        self._standing = {r.owner for r in self._rights.values()}
        for rights in self._rights.values():
            self._standing |= rights.readers
