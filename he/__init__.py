"""CKKS under heclave: contexts, the server's encrypted linear kernel, and the enclave's own decryption
and encryption (``sealformat``, ``rns``, ``slots``, ``sampling``). The slot layouts these use are part of
the deployment plan, :mod:`heclave.graph.layouts`."""

from .context import PublicContext, SecretKeySet, Toolkit, seal_context
from .linear import LinearKernel, OpCounter, encrypt_weights

__all__ = ["LinearKernel", "OpCounter", "PublicContext", "SecretKeySet", "Toolkit", "encrypt_weights", "seal_context"]
