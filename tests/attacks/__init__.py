"""Attacks by the malicious server operator on the real enclave and server processes."""
