"""The fused operators, registered with ``torch.library``: kernels, fake shapes, autograd.

Each op takes canonical, checked tensors (see ``nwfast._checks``) and the name
of the kernel backend, so ``torch.compile`` sees one opaque node per call,
traces its shapes through the fake implementation and never breaks the graph.

The ops are defined with ``torch.library.Library`` and a kernel per device
rather than with ``torch.library.custom_op``, whose wrapper imports
``torch._dynamo`` on the first call (over a second of a cold start).

How a call travels, and why each piece exists:

- ``nwfast.functional.nw_pool`` checks the arguments (``nwfast._checks``),
  resolves the backend once (``resolve_backend``) and calls an
  ``autograd.Function``. That Function is there for what an op's registered
  autograd cannot give: forward mode (its ``jvp`` calls ``pool_tangent``) and
  torch.func's transforms (``generate_vmap_rule`` with the vmap rules below).
- The Function's forward calls the op (``pool``); the dispatcher picks its
  kernel by the tensors' device, and the kernel runs the backend's module,
  imported once (``kernel_module``): Numba on CPU, Triton on CUDA, or Triton's
  interpreter on CPU when asked for by name (the tests' way to run Triton
  without a GPU). ``nwfast.local_linear``'s moments op is defined with
  ``define`` too and finds its kernels the same way.
- The derivative is one function, ``pool_gradients``, calling the backward op.
  The Function's ``backward`` calls it, and so does the reverse-mode autograd
  registered on the op itself: ``opcheck`` and ``torch.compile`` (which traces
  the op, not the Function, where it cannot trace a forward-mode rule) need
  the op to be differentiable on its own.
- Ops return tensors, never None: an unneeded gradient crosses the op boundary
  as an empty tensor and becomes None again on the other side; the block plan
  crosses it packed into an int64 tensor (``kernels.blocks.pack``).
"""

import functools
import importlib
import os

import torch

from nwfast._checks import CPU_DTYPES, GPU_DTYPES

# The fused backends this module dispatches to; "torch" (the reference) is
# handled by nwfast.functional before any op is called.
FUSED_BACKENDS = ("numba", "triton")
BACKENDS = ("auto", *FUSED_BACKENDS, "torch")


def resolve_backend(backend, device, dtype):
    """The fused backend for tensors on ``device``; raise where it cannot run."""
    if backend not in BACKENDS or backend == "torch":
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type not in ("cuda", "cpu"):
            raise ValueError(
                f"no fused kernel for {device.type} tensors; pass backend='torch' "
                "for the reference path"
            )
        backend = "triton" if device.type == "cuda" else "numba"
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


# Per family of ops, the kernel module of each backend: the pooling ops below and
# local-linear's moments op (nwfast.local_linear).
_KERNEL_MODULES = {
    "pool": {"numba": "nwfast.kernels.numba_nw", "triton": "nwfast.kernels.triton_nw"},
    "moments": {"numba": "nwfast.kernels.numba_moments", "triton": "nwfast.kernels.triton_moments"},
}


@functools.cache
def kernel_module(backend, family="pool"):
    """The backend's kernel module for ``family`` ("pool" or "moments"),
    imported on first use and kept."""
    name = _KERNEL_MODULES[family][backend]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name in ("nwfast.kernels", name):
            raise ImportError(_shadowed_message()) from error
        raise RuntimeError(
            f"backend={backend!r} is not available here: {error}. Install "
            f"{backend} or pass backend='torch' for the reference path"
        ) from error


def _shadowed_message():
    """nwfast imported from a source tree, where the kernels are a folder beside
    it (kernels/) that only an install maps to nwfast.kernels."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return (
        f"nwfast was imported from {here}, which has no nwfast.kernels: in the "
        "source tree the kernels live in kernels/ and an install maps them to "
        "nwfast.kernels. Run from outside the repository to use the installed "
        "nwfast, or install this tree with `pip install -e .`"
    )


def _contiguous(*tensors):
    return tuple(x if x is None else x.contiguous() for x in tensors)


def _as_op_outputs(grads, inputs):
    """Operators return tensors, never None: an unneeded gradient is an empty tensor."""
    return tuple(g if g is not None else x.new_empty(0) for g, x in zip(grads, inputs))


_lib = torch.library.Library("nwfast", "DEF")


def define(schema, kernel):
    """Define ``nwfast::<name>`` from its schema, with ``kernel`` for CPU and CUDA."""
    _lib.define(schema)
    name = schema.split("(", 1)[0]
    for device in ("CPU", "CUDA"):
        _lib.impl(name, kernel, device)
    return getattr(torch.ops.nwfast, name).default


# --- shared keys -------------------------------------------------------------


def _pool_kernel(query, key, value, w, diagonal, tolerance, backend):
    return kernel_module(backend).forward(*_contiguous(query, key, value, w), diagonal, tolerance)


pool = define(
    "pool(Tensor query, Tensor key, Tensor value, Tensor w, int? diagonal, float tolerance, "
    "str backend) -> (Tensor, Tensor, Tensor)",
    _pool_kernel,
)


@torch.library.register_fake("nwfast::pool")
def _(query, key, value, w, diagonal, tolerance, backend):
    batch, n, _ = query.shape
    plan_size = torch.library.get_ctx().new_dynamic_size()
    return (
        query.new_empty(batch, n, value.shape[-1]),
        query.new_empty(batch, n, dtype=torch.float64),
        torch.empty(plan_size, dtype=torch.int64, device="cpu"),
    )


def _pool_backward_kernel(
    grad_out, query, key, value, w, out, lse, diagonal, plan, backend, needs, keys=None
):
    grads = kernel_module(backend).backward(
        *_contiguous(grad_out, query, key, value, w, out, lse), diagonal, plan, tuple(needs), keys
    )
    return _as_op_outputs(grads, (query, key, value, w))


pool_backward = define(
    "pool_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor w, "
    "Tensor out, Tensor lse, int? diagonal, Tensor plan, str backend, bool[] needs, "
    "int? keys=None) -> (Tensor, Tensor, Tensor, Tensor)",
    _pool_backward_kernel,
)


def _fake_grads(inputs, needs):
    return tuple(torch.empty_like(x) if need else x.new_empty(0) for x, need in zip(inputs, needs))


@torch.library.register_fake("nwfast::pool_backward")
def _(grad_out, query, key, value, w, out, lse, diagonal, plan, backend, needs, keys=None):
    return _fake_grads((query, key, value, w), needs)


def _pool_tangent_kernel(
    query, key, value, w, dquery, dkey, dvalue, dw, out, lse, diagonal, plan, backend
):
    tangents = _contiguous(dquery, dkey, dvalue, dw)
    return kernel_module(backend).tangent(
        *_contiguous(query, key, value, w), tangents, *_contiguous(out, lse), diagonal, plan
    )


pool_tangent = define(
    "pool_tangent(Tensor query, Tensor key, Tensor value, Tensor w, Tensor? dquery, "
    "Tensor? dkey, Tensor? dvalue, Tensor? dw, Tensor out, Tensor lse, int? diagonal, "
    "Tensor plan, str backend) -> Tensor",
    _pool_tangent_kernel,
)


@torch.library.register_fake("nwfast::pool_tangent")
def _(query, key, value, w, dquery, dkey, dvalue, dw, out, lse, diagonal, plan, backend):
    return torch.empty_like(out)


def _needs(ctx, count=4):
    return [bool(x) for x in ctx.needs_input_grad[:count]]


def save_pool_context(ctx, inputs, output):
    query, key, value, w, diagonal, tolerance, backend = inputs
    out, lse, plan = output
    ctx.save_for_backward(query, key, value, w, out, lse, plan)
    ctx.diagonal, ctx.backend = diagonal, backend


def pool_gradients(ctx, grad_out):
    """(dquery, dkey, dvalue, dw) from a context saved by ``save_pool_context``."""
    query, key, value, w, out, lse, plan = ctx.saved_tensors
    needs = _needs(ctx)
    grads = pool_backward(
        grad_out, query, key, value, w, out, lse, ctx.diagonal, plan, ctx.backend, needs
    )
    return tuple(g if need else None for g, need in zip(grads, needs))


def _pool_autograd(ctx, grad_out, _grad_lse, _grad_plan):
    return (*pool_gradients(ctx, grad_out), None, None, None)


torch.library.register_autograd("nwfast::pool", _pool_autograd, setup_context=save_pool_context)


# --- per-query rows ----------------------------------------------------------


def _pool_rows_kernel(query, keys, values, w, backend):
    return kernel_module(backend).forward_rows(*_contiguous(query, keys, values, w))


pool_rows = define(
    "pool_rows(Tensor query, Tensor keys, Tensor values, Tensor w, str backend) "
    "-> (Tensor, Tensor)",
    _pool_rows_kernel,
)


@torch.library.register_fake("nwfast::pool_rows")
def _(query, keys, values, w, backend):
    return query.new_empty(query.shape), query.new_empty(query.shape, dtype=torch.float64)


def _pool_rows_backward_kernel(grad_out, query, keys, values, w, out, lse, backend, needs):
    grads = kernel_module(backend).backward_rows(
        *_contiguous(grad_out, query, keys, values, w, out, lse), tuple(needs)
    )
    return _as_op_outputs(grads, (query, keys, values, w))


pool_rows_backward = define(
    "pool_rows_backward(Tensor grad_out, Tensor query, Tensor keys, Tensor values, Tensor w, "
    "Tensor out, Tensor lse, str backend, bool[] needs) -> (Tensor, Tensor, Tensor, Tensor)",
    _pool_rows_backward_kernel,
)


@torch.library.register_fake("nwfast::pool_rows_backward")
def _(grad_out, query, keys, values, w, out, lse, backend, needs):
    return _fake_grads((query, keys, values, w), needs)


def _pool_rows_tangent_kernel(
    query, keys, values, w, dquery, dkeys, dvalues, dw, out, lse, backend
):
    tangents = _contiguous(dquery, dkeys, dvalues, dw)
    return kernel_module(backend).tangent_rows(
        *_contiguous(query, keys, values, w), tangents, *_contiguous(out, lse)
    )


pool_rows_tangent = define(
    "pool_rows_tangent(Tensor query, Tensor keys, Tensor values, Tensor w, Tensor? dquery, "
    "Tensor? dkeys, Tensor? dvalues, Tensor? dw, Tensor out, Tensor lse, str backend) -> Tensor",
    _pool_rows_tangent_kernel,
)


@torch.library.register_fake("nwfast::pool_rows_tangent")
def _(query, keys, values, w, dquery, dkeys, dvalues, dw, out, lse, backend):
    return torch.empty_like(out)


def save_rows_context(ctx, inputs, output):
    query, keys, values, w, backend = inputs
    out, lse = output
    ctx.save_for_backward(query, keys, values, w, out, lse)
    ctx.backend = backend


def rows_gradients(ctx, grad_out):
    """(dquery, dkeys, dvalues, dw) from a context saved by ``save_rows_context``."""
    query, keys, values, w, out, lse = ctx.saved_tensors
    needs = _needs(ctx)
    grads = pool_rows_backward(grad_out, query, keys, values, w, out, lse, ctx.backend, needs)
    return tuple(g if need else None for g, need in zip(grads, needs))


def _rows_autograd(ctx, grad_out, _grad_lse):
    return (*rows_gradients(ctx, grad_out), None)


torch.library.register_autograd(
    "nwfast::pool_rows", _rows_autograd, setup_context=save_rows_context
)


# --- vmap rules ----------------------------------------------------------------
# torch.func's transforms batch over one more dim. The forward folds it into the
# kernels' batch dim B (one call); the backward and the tangent do the same
# where the plan they reuse was made for the folded batch, and otherwise call
# once per slice with that plan (jacrev, jacfwd: one forward, many tangents).


def _batched(a, dim):
    return isinstance(a, torch.Tensor) and dim is not None


def _slice(args, in_dims, i):
    return [a.select(d, i) if _batched(a, d) else a for a, d in zip(args, in_dims)]


def _fold(x, dim, size):
    """x's vmapped dim (None: unbatched, so expanded) folded into its dim 0."""
    x = x.expand(size, *x.shape) if dim is None else x.movedim(dim, 0)
    return x.reshape(size * x.shape[1], *x.shape[2:])


def _unfold(x, size):
    return x.reshape(size, x.shape[0] // size, *x.shape[1:])


def _stack(results):
    """Per-slice results (tuples of tensors) stacked along a new dim 0."""
    if isinstance(results[0], torch.Tensor):
        return torch.stack(results), 0
    outputs = tuple(torch.stack(parts) for parts in zip(*results))
    return outputs, (0,) * len(outputs)


@torch.library.register_vmap("nwfast::pool")
def _(info, in_dims, query, key, value, w, diagonal, tolerance, backend):
    size = info.batch_size
    folded = [_fold(x, d, size) for x, d in zip((query, key, value, w), in_dims)]
    out, lse, plan = pool(*folded, diagonal, tolerance, backend)
    return (_unfold(out, size), _unfold(lse, size), plan), (0, 0, None)


def _planned_rule(op, batch_arg):
    """A vmap rule for an op that reuses a plan (its argument ``plan``)."""

    def rule(info, in_dims, *args):
        size = info.batch_size
        names = op._schema.arguments
        plan = args[[a.name for a in names].index("plan")]
        x, dim = args[batch_arg], in_dims[batch_arg]
        batch = x.shape[0] if dim is None else x.shape[1 if dim == 0 else 0]
        # A dense plan (empty) holds nothing of the batch; a sparse one must
        # have been made for the folded batch to be reused folded.
        if plan.numel() == 0 or int(plan[2]) == size * batch:
            folded = [
                _fold(a, d, size) if isinstance(a, torch.Tensor) and a is not plan else a
                for a, d in zip(args, in_dims)
            ]
            outputs = op(*folded)
            if isinstance(outputs, torch.Tensor):
                return _unfold(outputs, size), 0
            unfolded = tuple(_unfold(o, size) if o.numel() else o for o in outputs)
            return unfolded, tuple(0 if o.numel() else None for o in outputs)
        return _stack([op(*_slice(args, in_dims, i)) for i in range(size)])

    return rule


torch.library.register_vmap("nwfast::pool_backward", _planned_rule(pool_backward, 1))
torch.library.register_vmap("nwfast::pool_tangent", _planned_rule(pool_tangent, 0))


def _looped_rule(op):
    def rule(info, in_dims, *args):
        return _stack([op(*_slice(args, in_dims, i)) for i in range(info.batch_size)])

    return rule


for _name, _op in (
    ("pool_rows", pool_rows),
    ("pool_rows_backward", pool_rows_backward),
    ("pool_rows_tangent", pool_rows_tangent),
):
    torch.library.register_vmap(f"nwfast::{_name}", _looped_rule(_op))
