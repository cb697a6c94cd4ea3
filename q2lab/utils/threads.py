"""Thread-count-independent numerics for the few operations whose result depends on it.

With MKL, torch's float32/float64 matrix products give the same bits whatever the number of
intra-op threads, but LAPACK factorizations (Cholesky, inverses) and full reductions split their
work differently per thread count, so their last bits move.  Quantizers feed those bits into
rounding decisions, and one flipped decision changes every later column — so a model quantized
with 1 thread and with 2 threads would differ.  Operations that feed rounding decisions run
inside :func:`one_thread`; the cost is small (one Cholesky per Hessian, not per column).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the enclosed torch CPU work on one intra-op thread, then restore the setting."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
