"""The measurements behind ``heclave bench``: each returns one flat, JSON-ready report.

``benchmarks.linear`` times one encrypted dense layer against TenSEAL's
``CKKSVector.matmul`` and against the floor of the rotations and
multiplications it performs; ``benchmarks.cnn`` runs TenSEAL's tutorial network
through heclave's four processes and against TenSEAL's own recipe. Every
number in a report is measured in the same run on the same machine.
"""
