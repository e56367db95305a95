"""Work items on a small pool of threads, for the CPU kernels.

The Numba kernels are serial ``nogil`` functions over a range of work items.
Running them on Python threads instead of Numba's own threading layer keeps
a process that has called nwfast safe to fork (GNU OpenMP is not: DataLoader
workers died), lets several Python threads call at once, and compiles much
faster than ``parallel=True`` kernels. The pool has ``torch.get_num_threads()``
threads, so ``torch.set_num_threads`` (or OMP_NUM_THREADS) sets it.
"""

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

# Below this much work (pairs of points) a call runs on the calling thread:
# handing work to the pool costs tens of microseconds.
PARALLEL_WORK = 1 << 18

_pool = None
_pool_threads = 0
_pool_lock = threading.Lock()


def _forget_pool():
    global _pool, _pool_threads
    _pool, _pool_threads = None, 0


# A forked child has none of the parent's threads: it starts a pool of its own.
os.register_at_fork(after_in_child=_forget_pool)


def parallel(kernel, items, work, *args):
    """kernel(lo, hi, *args) over items [0, items), split over the pool.

    Each item's outputs are its own, so the split changes nothing but the
    time. Chunks are handed out in order to whichever thread is free, which
    evens out items of unequal work (block-sparse plans). Returns the list of
    the chunks' return values, in order.
    """
    global _pool, _pool_threads
    threads = min(torch.get_num_threads(), items)
    if threads <= 1 or work < PARALLEL_WORK:
        return [kernel(0, items, *args)]
    with _pool_lock:
        if _pool_threads < threads:
            _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="nwfast")
            _pool_threads = threads
        pool = _pool
    bounds = np.linspace(0, items, min(items, 4 * threads) + 1).astype(np.int64)
    futures = [
        pool.submit(kernel, int(lo), int(hi), *args) for lo, hi in zip(bounds[:-1], bounds[1:])
    ]
    return [future.result() for future in futures]
