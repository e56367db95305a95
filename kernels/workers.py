"""Work items on a small pool of threads, for the CPU kernels.

The Numba kernels are serial ``nogil`` functions over a range of work items.
Running them on Python threads instead of Numba's own threading layer keeps
a process that has called nwfast safe to fork (GNU OpenMP is not: DataLoader
workers died), lets several Python threads call at once, and compiles much
faster than ``parallel=True`` kernels. A call uses ``torch.get_num_threads()``
threads, the calling one among them, so ``torch.set_num_threads`` (or
OMP_NUM_THREADS) sets it.
"""

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

# Below this much work (pairs of points) a call runs on the calling thread:
# waking a pool thread costs 50-100 microseconds here, a pass over 2^20 pairs
# about as much.
PARALLEL_WORK = 1 << 20
# Chunks per thread: enough to even out items of unequal work (block-sparse
# plans), few enough that claiming one costs nothing beside it.
CHUNKS_PER_THREAD = 4

_pool = None
_pool_threads = 0
_pool_lock = threading.Lock()


def _forget_pool():
    global _pool, _pool_threads
    _pool, _pool_threads = None, 0


# A forked child has none of the parent's threads: it starts a pool of its own.
os.register_at_fork(after_in_child=_forget_pool)


def _helpers(count):
    """The pool, with at least ``count`` threads."""
    global _pool, _pool_threads
    with _pool_lock:
        if _pool_threads < count:
            _pool = ThreadPoolExecutor(max_workers=count, thread_name_prefix="nwfast")
            _pool_threads = count
        return _pool


class _Chunks:
    """The chunks of one call, claimed in order by whichever thread is free."""

    def __init__(self, kernel, bounds, args):
        self.kernel, self.bounds, self.args = kernel, bounds, args
        self.count = len(bounds) - 1
        self.results = [None] * self.count
        self.errors = []
        self._next = itertools.count()  # next() is atomic under the GIL
        self._left = self.count
        self._lock = threading.Lock()
        self.done = threading.Event()

    def work(self):
        """Claim and run chunks until none is left. A helper that starts after
        the others took every chunk returns at once."""
        while (c := next(self._next)) < self.count:
            try:
                lo, hi = int(self.bounds[c]), int(self.bounds[c + 1])
                self.results[c] = self.kernel(lo, hi, *self.args)
            except BaseException as error:  # re-raised on the calling thread
                self.errors.append(error)
            with self._lock:
                self._left -= 1
                if self._left == 0:
                    self.done.set()


def parallel(kernel, items, work, *args):
    """kernel(lo, hi, *args) over items [0, items), split over the threads.

    Each item's outputs are its own, so the split changes nothing but the
    time. The calling thread works too, and waits only for chunks that other
    threads are running: a pool busy with another call never holds this one
    up. Returns the list of the chunks' return values, in order.
    """
    threads = min(torch.get_num_threads(), items)
    if threads <= 1 or work < PARALLEL_WORK:
        return [kernel(0, items, *args)]
    bounds = np.linspace(0, items, min(items, CHUNKS_PER_THREAD * threads) + 1).astype(np.int64)
    chunks = _Chunks(kernel, bounds, args)
    pool = _helpers(threads - 1)
    for _ in range(threads - 1):
        pool.submit(chunks.work)
    chunks.work()
    chunks.done.wait()
    if chunks.errors:
        raise chunks.errors[0]
    return chunks.results
