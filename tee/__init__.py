"""The enclave: key holder, exact nonlinear steps, re-encryption and release.

Its trusted computing base is this package, ``he``, ``arith``, ``graph`` and
``protocol`` plus numpy, tenseal, pyzmq, msgpack, cryptography and zstandard
(``tests/tee/test_tcb.py`` holds it to that). It never imports torch.
"""

from .enclave import Enclave
from .runtime import detect

__all__ = ["Enclave", "detect"]
