"""The NumPy arrays the CPU kernels read, made on the calling thread.

Two things about how these arrays are made show in the kernels' time on a
2-core machine:

- Who makes them. A torch op on more than 32768 numbers runs on torch's
  OpenMP threads, which then spin for milliseconds waiting for more work, on
  the cores the kernels' own threads (``workers``) are about to use. One such
  copy, the keys made feature-major at d = 3, made a 16384² forward take 1.2x
  as long. NumPy copies and computes on the calling thread alone.
- Where they start. NumPy's large buffers start 16 bytes past a cache line,
  so every 64-byte vector load of a row spans two lines: a d = 3 key-side
  backward took 1.2-1.6x as long on such rows as on torch's, which start on
  one. ``empty`` starts each array on a cache line.

The kernels' tensors are on the CPU, in float32 or float64; ``float64`` and
``equal`` take any tensor, falling back on torch where NumPy cannot hold it
(the Triton launchers' planning shares them).
"""

import math

import numpy as np
import torch

LOG2E = 1.4426950408889634
CACHE_LINE = 64


# the torch dtypes NumPy holds as they are
_NUMPY_DTYPES = {
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.float16, torch.float32, torch.float64,
}  # fmt: skip


def numpy_can_hold(*tensors):
    """Whether these tensors are on the CPU, of dtypes that NumPy reads in place."""
    return all(t.device.type == "cpu" and t.dtype in _NUMPY_DTYPES for t in tensors)


def empty(shape, dtype):
    """An uninitialised C-contiguous array whose data starts on a cache line."""
    dtype = np.dtype(dtype)
    size = math.prod(shape) * dtype.itemsize
    raw = np.empty(size + CACHE_LINE, np.uint8)
    start = -raw.ctypes.data % CACHE_LINE
    return raw[start : start + size].view(dtype).reshape(shape)


def copy(a, dtype=None):
    """A new array (``empty``) holding a, rounded to dtype (default a's) once."""
    out = empty(a.shape, a.dtype if dtype is None else dtype)
    np.copyto(out, a, casting="same_kind")
    return out


def numpy_dtype(dtype):
    """The NumPy dtype of torch's float32 or float64."""
    return np.float64 if dtype == torch.float64 else np.float32


def of(t):
    """t's values as a C-contiguous array: t's own memory where it is one."""
    a = t.detach().numpy()
    return a if a.flags.c_contiguous else copy(a)


def feature_major(t):
    """(..., r, f) -> (..., f, r): unit-stride rows for the inner loops; t's own
    memory where that is already C-contiguous (one feature)."""
    a = np.swapaxes(t.detach().numpy(), -1, -2)
    return a if a.flags.c_contiguous else copy(a)


def log2_scale(w):
    """c2 = -(w / 2) log2(e), computed in float64 and rounded once to w's dtype."""
    w = w.detach().numpy()
    return copy(w.astype(np.float64, copy=False) * (-0.5 * LOG2E), w.dtype)


def lse_pair(lse, dtype):
    """The log-sum-exp lse (float64, natural log) in log2 units, and that as a
    (high, low) pair of the torch dtype: high the nearest, low what is left
    (NaN where lse is inf or NaN, without NumPy's warning)."""
    lse2 = float64(lse) * LOG2E
    high = copy(lse2, numpy_dtype(dtype))
    with np.errstate(invalid="ignore"):
        low = copy(lse2 - high, high.dtype)
    return lse2, high, low


def float64(t):
    """t as a float64 NumPy array, to be read: converted by NumPy for a CPU
    tensor (t's own memory where it is float64 already), by torch on t's own
    device for another."""
    t = t.detach()
    if numpy_can_hold(t):
        return t.numpy().astype(np.float64, copy=False)
    return t.to("cpu", torch.float64).numpy()


def equal(a, b):
    """``torch.equal(a, b)``, by NumPy for CPU tensors."""
    if numpy_can_hold(a, b):
        return a.shape == b.shape and np.array_equal(a.detach().numpy(), b.detach().numpy())
    return torch.equal(a, b)
