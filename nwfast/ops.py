"""The fused operators as ``torch.library`` custom ops, with autograd and fake kernels.

Each op takes canonical, checked tensors (see ``nwfast._checks``) and the name of
the kernel backend, so ``torch.compile`` sees one opaque node per call, traces
its shapes through the fake implementation and never breaks the graph.
"""

import importlib
import os

import torch
from torch import Tensor

from nwfast._checks import CPU_DTYPES, GPU_DTYPES

BACKENDS = ("auto", "numba", "triton", "torch")


def resolve_backend(backend, device, dtype):
    """The concrete backend for tensors on ``device``; raise where it cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "numba"
        if device.type not in ("cuda", "cpu"):
            raise ValueError(
                f"no fused kernel for {device.type} tensors; pass backend='torch' "
                "for the reference path"
            )
    if backend == "numba":
        if device.type != "cpu":
            raise ValueError(f"backend='numba' runs on CPU tensors, got {device} tensors")
        if dtype not in CPU_DTYPES:
            raise TypeError(
                f"backend='numba' computes in float32 or float64, got {dtype}; half "
                "precision runs on CUDA (Triton) or with backend='torch'"
            )
    if backend == "triton":
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "backend='triton' on CPU tensors needs Triton's interpreter: set "
                "TRITON_INTERPRET=1 before triton is imported"
            )
        if device.type == "cpu" and dtype not in CPU_DTYPES:
            raise TypeError(f"Triton's CPU interpreter has no {dtype} arithmetic")
        if dtype not in GPU_DTYPES:
            raise TypeError(f"backend='triton' does not support {dtype}")
    return backend


_KERNEL_MODULES = {"numba": "nwfast.kernels.numba_nw", "triton": "nwfast.kernels.triton_nw"}


def _kernels(backend):
    try:
        return importlib.import_module(_KERNEL_MODULES[backend])
    except ImportError as error:
        raise RuntimeError(
            f"backend={backend!r} is not available here: {error}. Install "
            f"{backend} or pass backend='torch' for the reference path"
        ) from error


def _contiguous(*tensors):
    return tuple(x.contiguous() for x in tensors)


def _as_op_outputs(grads, inputs):
    """Custom ops return tensors, never None: an unneeded gradient is an empty tensor."""
    return tuple(g if g is not None else x.new_empty(0) for g, x in zip(grads, inputs))


def _fake_grads(inputs, needs):
    return tuple(torch.empty_like(x) if need else x.new_empty(0) for x, need in zip(inputs, needs))


def _autograd_outputs(grads, needs):
    return tuple(g if need else None for g, need in zip(grads, needs))


# --- shared keys -------------------------------------------------------------


@torch.library.custom_op("nwfast::pool", mutates_args=())
def pool(
    q: Tensor, k: Tensor, v: Tensor, w: Tensor, exclude_self: bool, backend: str
) -> tuple[Tensor, Tensor]:
    return _kernels(backend).forward(*_contiguous(q, k, v, w), exclude_self)


@pool.register_fake
def _(q, k, v, w, exclude_self, backend):
    batch, n, _ = q.shape
    return q.new_empty(batch, n, v.shape[-1]), q.new_empty(batch, n, dtype=torch.float64)


@torch.library.custom_op("nwfast::pool_backward", mutates_args=())
def pool_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    w: Tensor,
    out: Tensor,
    lse: Tensor,
    exclude_self: bool,
    backend: str,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grads = _kernels(backend).backward(
        *_contiguous(grad_out, q, k, v, w), out, lse, exclude_self, tuple(needs)
    )
    return _as_op_outputs(grads, (q, k, v, w))


@pool_backward.register_fake
def _(grad_out, q, k, v, w, out, lse, exclude_self, backend, needs):
    return _fake_grads((q, k, v, w), needs)


def _pool_setup_context(ctx, inputs, output):
    q, k, v, w, exclude_self, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, w, out, lse)
    ctx.exclude_self, ctx.backend = exclude_self, backend
    ctx.mark_non_differentiable(lse)


def _pool_backward(ctx, grad_out, _grad_lse):
    q, k, v, w, out, lse = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:4])
    grads = pool_backward(grad_out, q, k, v, w, out, lse, ctx.exclude_self, ctx.backend, needs)
    return (*_autograd_outputs(grads, needs), None, None)


pool.register_autograd(_pool_backward, setup_context=_pool_setup_context)


# --- per-query rows ----------------------------------------------------------


@torch.library.custom_op("nwfast::pool_rows", mutates_args=())
def pool_rows(
    query: Tensor, keys: Tensor, values: Tensor, w: Tensor, backend: str
) -> tuple[Tensor, Tensor]:
    return _kernels(backend).forward_rows(*_contiguous(query, keys, values, w))


@pool_rows.register_fake
def _(query, keys, values, w, backend):
    return query.new_empty(query.shape), query.new_empty(query.shape, dtype=torch.float64)


@torch.library.custom_op("nwfast::pool_rows_backward", mutates_args=())
def pool_rows_backward(
    grad_out: Tensor,
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    w: Tensor,
    out: Tensor,
    lse: Tensor,
    backend: str,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grads = _kernels(backend).backward_rows(
        *_contiguous(grad_out, query, keys, values, w), out, lse, tuple(needs)
    )
    return _as_op_outputs(grads, (query, keys, values, w))


@pool_rows_backward.register_fake
def _(grad_out, query, keys, values, w, out, lse, backend, needs):
    return _fake_grads((query, keys, values, w), needs)


def _rows_setup_context(ctx, inputs, output):
    query, keys, values, w, backend = inputs
    out, lse = output
    ctx.save_for_backward(query, keys, values, w, out, lse)
    ctx.backend = backend
    ctx.mark_non_differentiable(lse)


def _rows_backward(ctx, grad_out, _grad_lse):
    query, keys, values, w, out, lse = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:4])
    grads = pool_rows_backward(grad_out, query, keys, values, w, out, lse, ctx.backend, needs)
    return (*_autograd_outputs(grads, needs), None)


pool_rows.register_autograd(_rows_backward, setup_context=_rows_setup_context)
