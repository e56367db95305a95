"""The loop the fused Numba passes run on, and the per-d arithmetic they sweep with.

A pass is a sweep of each row of one side (queries, or keys for dk/dv/dw)
over spans of the other side, in work items (``Work``): the same loop for the
forward, dq, the tangent and the local-linear moments, dense or block-sparse,
d = 1 or 4. (The backward's key side, which also sums dq over the swept
queries, walks the same items on a loop of its own, ``numba_nw._key_grads``.)
What differs between passes is what a row carries and what a sweep sums; each
pass says so in *parts* registered for the class of its argument structure (a
``NamedTuple`` of arrays)::

    row = begin(args, b, r)                     # per-row constants, a tuple
    sums = sweep(args, b, row, ja, jb)          # float64 sums over points [ja, jb)
    finish(args, b, r, row, sums)               # writes the row's outputs

and, for passes whose weights are shifted by a row maximum (the forward),
``start_at_peak(args, b)`` (every row is shifted from the start: w < 0),
``redo(args, b, row, sums)`` (the zero-shift sums underflowed: shift and
sweep again), ``peak(args, b, row, ja, jb)`` (the largest score over the
points) and ``rebase(args, b, row, shift)``. Numba compiles one loop per
argument class, with the parts inlined into it by LLVM.

Per d, at compile time. Points and values are read as tuples whose length is
part of the argument's type: ``args.dims`` and ``args.chans`` are tuples of
d and c zeros, and the tuple arithmetic below (``column``, ``sqdist``,
``axpy``, ...) emits one straight line of scalar instructions per element,
so a sweep's loop over points has no inner loop left: LLVM vectorises it
along the points, every feature and channel in registers. (A Python loop over
range(d) inside it, even of constant length, stopped LLVM's vectoriser from
covering whole blocks: it peeled iterations and fell back to narrow loops.)

Numba caches a compiled function under the file that defines it and checks
only that file's time stamp: the loop is compiled from ``numba_nw`` and
``numba_moments`` (their ``_run``), so edits there recompile it; after an edit
here, clear the kernels' ``__pycache__``.
"""

import functools
from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from . import numba_target
from .numba_exp import exp2, exp2_below, exp2_flush, fmax, mul, sub

# Fast math without nnan/ninf, so NaN and inf propagate as in the reference;
# reassoc lets LLVM vectorise the sums. error_model="numpy": x / 0 is inf/NaN.
FLAGS = {"contract", "reassoc", "nsz", "arcp"}
jit = functools.partial(
    njit, fastmath=FLAGS, error_model="numpy", cache=True, nogil=True, _target=numba_target.NAME
)
# What the kernels' entry points compile into themselves: never cached on its own
# (a cached copy here would outlive an edit of the parts it was compiled with).
inner = functools.partial(
    njit, fastmath=FLAGS, error_model="numpy", nogil=True, _target=numba_target.NAME
)

# Sums run in the input dtype over at most SUM_BLOCK points, SIMD lanes each
# adding SUM_BLOCK / lanes terms (8 on AVX-512, 16 on AVX2, with LLVM's four
# accumulators), and then go into float64: the depth of a float32 sum, and so
# its error, stays bounded whatever m, even where one dominant weight makes a
# lane drop the sub-ulp terms after it. Each block ends in a horizontal
# reduction: at 512 points those cost 4-6% of a d = 1 pass on AVX-512. Blocks
# of 2048 put the float32 rows forward with signed w, whose sums the compiler
# does not split across lanes, beyond the rounding bound of nwfast.testing.
SUM_BLOCK = 512
# Points of the swept side a tile: every row of a work item sweeps a tile in
# turn, so that it is read from memory once and from L2 (96 KiB at d = c = 1,
# 160 KiB at d = 3 in float32) by the rest. A row's visit of a tile costs about
# a hundred cycles beside its pairs: at 2048 points, 10% of a d = 1 pass.
TILE = 8192

# Point indices are unsigned: no negative-index wraparound, so LLVM emits plain
# vector loads.
u64 = np.uint64


@inner(inline="always")
def weight(c2, sq, hi, lo):
    """2**((c2 * sq - hi) - lo): the score rounded once, then each shift
    subtracted, with operations the compiler may neither fuse into an FMA nor
    regroup: a row's largest score minus its maximum is then exactly 0 even
    where |c2 sq| is ~1e13 (a query far from every key), and every pass
    recomputes the forward's weights to the bit."""
    return exp2(sub(sub(mul(c2, sq), hi), lo))


@inner(inline="always")
def normalized_weight(c2, sq, hi, lo):
    """``weight`` where (hi, lo) is the row's log2-sum-exp, so that the
    weights are fractions of the row's total: as ``weight``, bit for bit,
    except that a fraction below 2**-100 (float32; 2**-967 float64) is 0
    (``numba_exp.exp2_flush``)."""
    return exp2_flush(sub(sub(mul(c2, sq), hi), lo))


@inner(inline="always")
def folded_weight(c2, sq, cut):
    """``normalized_weight`` times the row's 2**lse, for a pass that has
    folded the row's 2**-lse into the row's own terms: 2**(c2 * sq), the score
    rounded once, 0 below ``cut``, the row's flush exponent plus its lse (log2
    units), so that it flushes the same shares of its row."""
    return exp2_below(mul(c2, sq), cut)


# ------------------------------------------------------------- tuple arithmetic


def _items(builder, value, count):
    return [builder.extract_value(value, k) for k in range(count)]


def _cast(context, builder, values, fromty, toty):
    return [context.cast(builder, v, fromty, toty) for v in values]


@intrinsic
def splat(typingctx, value, like):
    """(value, value, ...) as long as the tuple ``like``."""
    tup = types.UniTuple(value, like.count)

    def codegen(context, builder, sig, args):
        return context.make_tuple(builder, tup, [args[0]] * like.count)

    return tup(value, like), codegen


def _gather(axis):
    """An intrinsic reading len(like) elements of a 3-D array A along ``axis``
    (1: A[b, :, j], a point's features from a feature-major array; 2: A[b, i, :],
    a row of a row-major one)."""

    @intrinsic
    def gather(typingctx, A, b, i, like):
        if not (isinstance(A, types.Array) and A.ndim == 3):
            return None
        tup = types.UniTuple(A.dtype, like.count)

        def codegen(context, builder, sig, args):
            array = context.make_array(A)(context, builder, args[0])
            shape = cgutils.unpack_tuple(builder, array.shape)
            strides = cgutils.unpack_tuple(builder, array.strides)
            b_, i_ = (
                context.cast(builder, x, t, types.intp) for x, t in zip(args[1:3], sig.args[1:3])
            )
            items = []
            for k in range(like.count):
                index = [b_, context.get_constant(types.intp, k), i_]
                if axis == 2:
                    index[1], index[2] = index[2], index[1]
                pointer = cgutils.get_item_pointer2(
                    context, builder, array.data, shape, strides, A.layout, index, wraparound=False
                )
                items.append(builder.load(pointer))
            return context.make_tuple(builder, tup, items)

        return tup(A, b, i, like), codegen

    return gather


column = _gather(1)
row = _gather(2)
gather_row = row


@intrinsic
def put_column(typingctx, A, b, j, values):
    """A[b, :, j] = values: a point's features into a feature-major 3-D array
    (``column``'s inverse)."""
    if not (isinstance(A, types.Array) and A.ndim == 3 and isinstance(values, types.UniTuple)):
        return None

    def codegen(context, builder, sig, args):
        array = context.make_array(A)(context, builder, args[0])
        shape = cgutils.unpack_tuple(builder, array.shape)
        strides = cgutils.unpack_tuple(builder, array.strides)
        b_, j_ = (context.cast(builder, x, t, types.intp) for x, t in zip(args[1:3], sig.args[1:3]))
        items = _items(builder, args[3], values.count)
        for k, item in enumerate(_cast(context, builder, items, values.dtype, A.dtype)):
            index = [b_, context.get_constant(types.intp, k), j_]
            pointer = cgutils.get_item_pointer2(
                context, builder, array.data, shape, strides, A.layout, index, wraparound=False
            )
            builder.store(item, pointer)
        return context.get_dummy_value()

    return types.none(A, b, j, values), codegen


def _elementwise(combine):
    """An intrinsic t (op) u on tuples of one length, in t's element type."""

    @intrinsic
    def op(typingctx, t, u):
        if not (isinstance(t, types.UniTuple) and isinstance(u, types.UniTuple)):
            return None
        if t.count != u.count:
            return None

        def codegen(context, builder, sig, args):
            ts = _items(builder, args[0], t.count)
            us = _cast(context, builder, _items(builder, args[1], u.count), u.dtype, t.dtype)
            return context.make_tuple(builder, t, [combine(builder, x, y) for x, y in zip(ts, us)])

        return t(t, u), codegen

    return op


add = _elementwise(lambda builder, x, y: builder.fadd(x, y))
minus = _elementwise(lambda builder, x, y: builder.fsub(x, y))
times = _elementwise(lambda builder, x, y: builder.fmul(x, y))


@intrinsic
def axpy(typingctx, t, a, u):
    """t + a * u elementwise, in t's element type (a and u convert to it)."""
    if not (isinstance(t, types.UniTuple) and isinstance(u, types.UniTuple)):
        return None

    def codegen(context, builder, sig, args):
        (scale,) = _cast(context, builder, [args[1]], a, t.dtype)
        ts = _items(builder, args[0], t.count)
        us = _cast(context, builder, _items(builder, args[2], u.count), u.dtype, t.dtype)
        out = [builder.fadd(x, builder.fmul(scale, y)) for x, y in zip(ts, us)]
        return context.make_tuple(builder, t, out)

    return t(t, a, u), codegen


def _fma(builder, ty):
    return builder.module.declare_intrinsic("llvm.fma", [ty], ir.FunctionType(ty, [ty] * 3))


@intrinsic
def dot(typingctx, t, u):
    """t_0 u_0 rounded, then one fused multiply-add an element."""
    if not (isinstance(t, types.UniTuple) and isinstance(u, types.UniTuple)):
        return None
    if t.count != u.count or t.dtype != u.dtype:
        return None

    def codegen(context, builder, sig, args):
        ts, us = _items(builder, args[0], t.count), _items(builder, args[1], u.count)
        fma = _fma(builder, ts[0].type)
        total = builder.fmul(ts[0], us[0])
        for x, y in zip(ts[1:], us[1:]):
            total = builder.call(fma, [x, y, total])
        return total

    return t.dtype(t, u), codegen


@inner(inline="always")
def sqdist(a, b):
    """||a - b||^2 of two points: every pass rounds it alike (``dot``)."""
    diff = minus(a, b)
    return dot(diff, diff)


@intrinsic
def weighted_sqnorm(typingctx, c, u):
    """sum_f c_f u_f^2: c_0 (u_0 u_0) rounded on its own (as ``numba_exp.mul``:
    never fused), then one fused multiply-add a feature."""
    if not (isinstance(c, types.UniTuple) and isinstance(u, types.UniTuple)):
        return None
    if c.count != u.count or c.dtype != u.dtype:
        return None

    def codegen(context, builder, sig, args):
        cs, us = _items(builder, args[0], c.count), _items(builder, args[1], u.count)
        fma = _fma(builder, us[0].type)
        total = builder.fmul(cs[0], builder.fmul(us[0], us[0]), flags=("arcp",))
        for cf, uf in zip(cs[1:], us[1:]):
            total = builder.call(fma, [cf, builder.fmul(uf, uf), total])
        return total

    return u.dtype(c, u), codegen


@intrinsic
def upper(typingctx, t):
    """t_f t_g for f <= g, row by row (the upper triangle of t t^T)."""
    if not isinstance(t, types.UniTuple):
        return None
    n = t.count
    out = types.UniTuple(t.dtype, n * (n + 1) // 2)

    def codegen(context, builder, sig, args):
        ts = _items(builder, args[0], n)
        items = [builder.fmul(ts[f], ts[g]) for f in range(n) for g in range(f, n)]
        return context.make_tuple(builder, out, items)

    return out(t), codegen


@intrinsic
def outer(typingctx, t, u):
    """t_f u_c, feature by feature (t u^T flattened row by row)."""
    if not (isinstance(t, types.UniTuple) and isinstance(u, types.UniTuple)):
        return None
    out = types.UniTuple(t.dtype, t.count * u.count)

    def codegen(context, builder, sig, args):
        ts, us = _items(builder, args[0], t.count), _items(builder, args[1], u.count)
        return context.make_tuple(builder, out, [builder.fmul(x, y) for x in ts for y in us])

    return out(t, u), codegen


# ------------------------------------------------------------------ the passes' parts


def begin(args, b, r):
    """The constants row r of batch element b carries through its sweeps."""


def sweep(args, b, row, ja, jb):
    """float64 sums of the row over the points [ja, jb) of the other side."""


def finish(args, b, r, row, sums):
    """Write the row's outputs from its sums."""


def start_at_peak(args, b):
    """Whether rows of batch element b are shifted by their maximum from the
    start (default: no)."""


def redo(args, b, row, sums):
    """Whether the sums must be redone against the row's maximum (default: no)."""


def peak(args, b, row, ja, jb):
    """The largest score of the row over the points [ja, jb)."""


def rebase(args, b, row, shift):
    """The row's constants with its weights shifted by ``shift``."""


def wanted(args, b, r):
    """Whether the pass computes row r at all (default: every row)."""


_PARTS = {}


# What a pass that never shifts its weights, or computes every row, needs none of.
def _never_at_peak(args, b):
    return False


def _never_redo(args, b, row, sums):
    return False


def _no_peak(args, b, row, ja, jb):
    return 0.0


def _same_row(args, b, row, shift):
    return row


def _every_row(args, b, r):
    return True


_DEFAULTS = {
    start_at_peak: _never_at_peak,
    redo: _never_redo,
    peak: _no_peak,
    rebase: _same_row,
    wanted: _every_row,
}


def part(stub, cls):
    """Register ``function`` as the part ``stub`` of the passes whose argument
    structure is ``cls``."""

    def register(function):
        _PARTS[stub, cls] = function
        return function

    return register


def _implementation(stub, args):
    if not isinstance(args, types.NamedTuple):
        return None
    return _PARTS.get((stub, args.instance_class), _DEFAULTS.get(stub))


_OPTIONS = {"jit_options": {"fastmath": FLAGS, "error_model": "numpy"}}


# One overload per part, each with the part's own signature (Numba matches it).
@overload(begin, **_OPTIONS)
def _begin(args, b, r):
    return _implementation(begin, args)


@overload(sweep, **_OPTIONS)
def _sweep(args, b, row, ja, jb):
    return _implementation(sweep, args)


@overload(finish, **_OPTIONS)
def _finish(args, b, r, row, sums):
    return _implementation(finish, args)


@overload(start_at_peak, **_OPTIONS)
def _start_at_peak(args, b):
    return _implementation(start_at_peak, args)


@overload(redo, **_OPTIONS)
def _redo(args, b, row, sums):
    return _implementation(redo, args)


@overload(peak, **_OPTIONS)
def _peak(args, b, row, ja, jb):
    return _implementation(peak, args)


@overload(rebase, **_OPTIONS)
def _rebase(args, b, row, shift):
    return _implementation(rebase, args)


@overload(wanted, **_OPTIONS)
def _wanted(args, b, r):
    return _implementation(wanted, args)


# ------------------------------------------------------------------ the loop


class Work(NamedTuple):
    """The work items of a pass (see ``run``), from a plan (``kernels.blocks``)."""

    ptr: np.ndarray  # (items + 1,) int64: item t sweeps spans[ptr[t]:ptr[t + 1]]
    spans: np.ndarray  # (runs, 2) int64: [start, end) of the swept side
    block: int  # rows an item holds
    skip: np.ndarray  # (B, rows) int64: the point each row leaves out, -1 for none


@inner
def _pieces(args, work, b, row, skip, s0, s1, largest):
    """The row's sums over spans s0 .. s1 of ``work`` with the point ``skip``
    left out (removed, NaN or not: never weighted 0), or its largest score if
    ``largest``."""
    total = sweep(args, b, row, 0, 0)  # the pass's zeros: an empty sweep
    top = peak(args, b, row, 0, 0)  # and its -inf
    for s in range(s0, s1):
        ja, end = work.spans[s, 0], work.spans[s, 1]
        jb = skip if ja <= skip < end else end
        while ja < end:
            if largest:
                top = fmax(top, peak(args, b, row, ja, jb))
            else:
                total = add(total, sweep(args, b, row, ja, jb))
            ja, jb = jb + 1, end
    return total, top


@inner
def _row_peak(args, work, b, row, skip, s0, s1):
    """The row's largest score; 0 while every score is -inf, where any finite
    shift gives weight 0 (and keeps 0 * v, so a NaN value still shows)."""
    _, top = _pieces(args, work, b, row, skip, s0, s1, True)
    return top if top > -np.inf else 0.0


@inner
def run(lo, hi, work, args):
    """Work items [lo, hi) of a pass: item ``b * per_batch + t`` holds rows
    [t * work.block, ...) of batch element b (side A) and sweeps the spans
    ``work.spans[work.ptr[item]:work.ptr[item + 1]]`` of side B; work.skip[b, r]
    is the point of B that row r leaves out (-1: none). Each output row is
    summed by one item in a fixed order: results repeat bit for bit whatever
    the number of threads.

    The item's rows take turns over a tile of TILE points of B, so that the
    tile is read from memory once for all of them and from L1 after that."""
    rows = work.skip.shape[1]
    per_batch = (rows + work.block - 1) // work.block
    for item in range(lo, hi):
        b = item // per_batch
        r0 = (item % per_batch) * work.block
        r1 = min(r0 + work.block, rows)
        s0, s1 = work.ptr[item], work.ptr[item + 1]
        zeros = sweep(args, b, begin(args, b, r0), 0, 0)
        if s0 == s1:  # nothing to sweep (a plan's expansions hold the rows)
            for r in range(r0, r1):
                if wanted(args, b, r):
                    finish(args, b, r, rebase(args, b, begin(args, b, r), 0.0), zeros)
            continue
        partial = np.zeros((1, r1 - r0, len(zeros)))  # the rows' float64 sums
        shift = np.zeros(r1 - r0)
        if start_at_peak(args, b):
            for r in range(r0, r1):
                if wanted(args, b, r):
                    shift[r - r0] = _row_peak(
                        args, work, b, begin(args, b, r), work.skip[b, r], s0, s1
                    )
        for s in range(s0, s1):
            for t0 in range(work.spans[s, 0], work.spans[s, 1], TILE):
                t1 = min(t0 + TILE, work.spans[s, 1])
                for r in range(r0, r1):
                    if not wanted(args, b, r):
                        continue
                    row = rebase(args, b, begin(args, b, r), shift[r - r0])
                    skip = work.skip[b, r]
                    ja, jb = t0, (skip if t0 <= skip < t1 else t1)
                    while ja < t1:
                        part = sweep(args, b, row, ja, jb)
                        for k in range(len(part)):
                            partial[0, r - r0, k] += part[k]
                        ja, jb = jb + 1, t1
        for r in range(r0, r1):
            if not wanted(args, b, r):
                continue
            skip = work.skip[b, r]
            row = rebase(args, b, begin(args, b, r), shift[r - r0])
            sums = gather_row(partial, 0, r - r0, zeros)
            if redo(args, b, row, sums):
                row = rebase(args, b, row, _row_peak(args, work, b, row, skip, s0, s1))
                sums, _ = _pieces(args, work, b, row, skip, s0, s1, False)
            finish(args, b, r, row, sums)
