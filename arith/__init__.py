"""Exact arithmetic outside CKKS, shared by the server and the enclave.

The nonlinear steps on decrypted activations (``nonlinear``), the sparse
matrices of ``enclave``, ``blinded`` and ``plain`` layers (``sparse``), the
prime field of blinded layers (``blinding``) and the checked parsing of plain
activation buffers (``values``).
"""
