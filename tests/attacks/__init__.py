"""Attacks by the malicious server operator on the real enclave and server processes.

Each test drives the real enclave process the way a server could (``begin``
and ``activate`` on its socket, with frames of the operator's choosing), checks
the error code, checks that no result came back and that the request is over
(``Probe.refused``), and then that an honest data owner going through the
real server still gets the right logits (``still_serves``).
"""
