"""Where each part of a model lives and in what form: the vocabulary the planner, server and enclave share.

A stage's affine layer has a :class:`Placement`; the server holds ``he`` weights
in a :class:`WeightForm`; an activation crosses between the server and the
enclave in a :class:`Form`. Each side names these by the enum, never by its
string value, so the server needs nothing of the enclave's code to speak them.
"""

from __future__ import annotations

from enum import Enum

from heclave.protocol.errors import PlanError


class Placement(str, Enum):
    """Where a stage's affine layer runs, and what it protects (see the README's placement table)."""

    HE = "he"
    ENCLAVE = "enclave"
    BLINDED = "blinded"
    PLAIN = "plain"

    @classmethod
    def parse(cls, value: str) -> Placement:
        try:
            return cls(value)
        except ValueError:
            raise PlanError(f"Unknown placement {value!r}; use one of: {', '.join(p.value for p in cls)}.") from None


class WeightForm(str, Enum):
    """How the server holds an ``he`` layer's weights."""

    ENCRYPTED = "encrypted"
    PLAIN = "plain"

    @classmethod
    def parse(cls, value: str) -> WeightForm:
        try:
            return cls(value)
        except ValueError:
            raise PlanError(f"Unknown weight form {value!r}; use one of: {', '.join(f.value for f in cls)}.") from None


class Form(str, Enum):
    """How an activation crosses between the server and the enclave."""

    PARTIALS = "partials"  # CKKS partial sums of an ``he`` stage
    CIPHERTEXTS = "ciphertexts"  # fresh ciphertexts for the next ``he`` stage
    BLINDED = "blinded"  # x + r mod p, or the server's W (x + r) mod p
    PLAIN = "plain"  # a plaintext activation: the server sees it
