"""The enclave: key holder, exact nonlinear steps, re-encryption and release.

Its trusted computing base is this package, ``he`` and ``protocol`` plus numpy,
tenseal, pyzmq and cryptography. It never imports torch.
"""

from .enclave import Enclave
from .runtime import detect

__all__ = ["Enclave", "detect"]
