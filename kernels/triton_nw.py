"""Triton kernels for Nadaraya-Watson attention pooling (GPU backend).

Scores are ``s_ij = -(w_j / 2) * ||q_i - k_j||^2``; the output is the softmax
over keys applied to the values. The interface is described in
``kernels/__init__.py``; block-sparse plans in ``kernels/blocks.py``.

Shared keys follow FlashAttention: a program owns one block of queries of one
batch element and streams tiles of keys, summing weights and weighted values,
then stores the log-sum-exp. The keys it streams are its plan's spans:
everything for a dense pass, the runs of key blocks its bound keeps for a
block-sparse one. The backward recomputes the probabilities from the
log-sum-exp in two passes, one program per query block for ``dq`` and one per
key block for ``dk``, ``dv`` and ``dw`` (over the transposed spans); the
tangent (forward-mode AD) is a third query-side pass. Every output element is
owned by exactly one program and summed in a fixed order, so there are no
atomics and results repeat bit for bit.

Why the code is shaped the way it is:

* One loop per pass (``for span: for tile``) calls one tile function with a
  constexpr ``MASK``: full tiles that hold no left-out pair run without masks,
  and only the ragged end of a span or a tile holding a row's left-out key
  pays for them. A left-out pair is removed from every sum with ``where``,
  NaN or not.
* The shift. With every w >= 0 each score is <= 0, so the forward shifts by
  0: one exp per pair, no running maximum, no rescaling. Rows it cannot keep
  (a sum below ``UNDERFLOW``: a query far from every key, a huge w; NaN; a
  batch element with some w < 0) it marks with lse = -inf, and a second
  launch of the same kernel (``ONLINE``) redoes them with an exact online
  softmax; its programs that hold no such row stream no keys. That launch and
  the shift kernels below run at one fixed config (``_exact_config``).
* Exponent arguments where a score can be huge (~1e13 for a query far from
  every key) must carry no rounding of the score, in the GPU's arithmetic as
  in the interpreter's: on a GPU Triton fuses a product and a following
  difference into an FMA (the interpreter does not), so a shift is never
  subtracted from a rounded product. The zero-shift exponent is the product
  ``c_j d_ij^2`` alone. Elsewhere an exponent is an explicit
  ``tl.fma(d^2, c, -high) - low`` with the shift a (high, low) pair: the
  online softmax keeps high = the largest rounded score and low = the
  largest ``fma(d^2, c, -high)``, the exact residual of the top keys
  (rounding is monotonic), so the top key's exponent is ``low - low = 0``.
  A maximum of rounded scores subtracted from exact ones would leave the
  product's rounding error, up to half an ulp of the score, in the exponent
  (inf or 0, then NaN). The backward and the tangent take (high, low) from
  the lse split in two; for rows whose |lse| passes ``EXACT_SHIFT_ABOVE`` (a
  float64 lse cannot hold their shift) ``_shift_kernel`` recomputes the
  forward's own pair, and the row's 1 / sum, which ``low`` (the residual of a
  huge score) may be too coarse to absorb, scales g (so every gradient) and
  the tangent instead. The passes that own queries (dq, the tangent) take
  low out of the tile loop in a program that holds no far row:
  2**(x - low) = 2**x 2**-low, the factor applied once to each row's sums
  (``_low_outside``).
  float32 works in log2 units, log2(e) folded into the per-key constant, so a
  pair costs one ``ex2.approx``; float64 keeps natural units.
* Shared layout, compute-bound: one exp and a handful of FMAs per pair. For
  d < 16 there is no matrix product, so nothing forces FlashAttention's MMA
  layout; what matters is where the reductions fall. Every tile is laid out
  as (streamed points, owned points); Triton spreads threads along the last
  dim, so with ``BLOCK_owned >= 32 * num_warps`` each thread owns whole
  columns: the max and the sums over the streamed axis stay inside one thread
  (no shuffles), and a streamed point is one broadcast load serving a warp.
* The streamed extent is the register budget (every live tile costs
  ``BLOCK_streamed * BLOCK_owned / threads`` registers a thread), so it stays
  at 8-32 while the owned extent is 64-512; autotuning picks among those for
  a dense pass. A block-sparse pass fixes the owned extent to the plan's block
  (``SPARSE_BLOCK``) and tunes the rest.
* Features and channels are looped over one at a time rather than broadcast
  as a 3-D tile, which would multiply the register tile by d. With
  half-precision inputs and d >= 16 the cross term q.k runs on tensor cores;
  with c >= 16 so does p @ v.
* Rows layout, memory-bound: it reads ``2 n m`` numbers once, so its tiles are
  wide along the contiguous key axis (whole 128-byte transactions) and a few
  rows tall.
* Under ``TRITON_INTERPRET=1`` the cost is per program and per block step, not
  per element, so one large fixed tile is used there instead of autotuning.
"""

import functools
import os

import torch
import triton
import triton.language as tl

from . import (
    EXACT_SHIFT_ABOVE,
    UNDERFLOW,
    accumulator_dtype,
    blocks,
    distance_shift,
    far,
    per_key,
    triton_fgt,
)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# The least zero-shift sum the forward keeps (see UNDERFLOW).
ZERO_SHIFT_MIN = tl.constexpr(UNDERFLOW)
# Tiles the zero-shift forward sums in float32 before adding them in float64
# (``_fwd_sums``): the float64 add and the conversion leave the tile loop.
CHUNK_TILES = tl.constexpr(16)
# Owned rows whose |high| (float32 scores' units) is below this are not far
# (``_shift_kernel``): their low is the float32 rounding residual of the lse,
# at most 2 in size, and ``_low_outside`` may take it out of the tile loop. The
# margin, 64 (the log2 of more keys than a row can hold), covers a far row
# whose largest score lies below its lse (scores > 0 where some w < 0).
LOW_OUTSIDE_BELOW = tl.constexpr(EXACT_SHIFT_ABOVE[torch.float32] - 64)

# Queries and keys a program owns in a block-sparse pass: the plan's blocks.
SPARSE_BLOCK = 128

# Columns of the rows-layout backward: fixed (not autotuned) because the number
# of per-column-block partial sums for dq, and so a buffer's shape, depends on
# it. Rows are split into groups whose partials for dw are summed afterwards;
# ROW_ALIGN is a multiple of every BLOCK_R so a row tile never straddles groups.
ROWS_BWD_BLOCK_M = 256
ROW_ALIGN = 64
# Aim for this many programs in the rows backward (a few waves of 132 SMs).
ROWS_BWD_TARGET_PROGRAMS = 1024

# One fixed large tile for the interpreter (cost is per block step there).
# BLOCK_N always counts queries and BLOCK_M keys; the query-side passes share
# BLOCK_N and the key-side pass owns BLOCK_M keys, the blocks of a sparse
# plan. Tests may shrink these to exercise multi-tile paths.
INTERPRET_CONFIGS = {
    "query": {"BLOCK_N": 256, "BLOCK_M": 1024},
    "key": {"BLOCK_N": 1024, "BLOCK_M": 256},
    "rows_fwd": {"BLOCK_R": 64, "BLOCK_M": 1024},
    "rows_bwd": {"BLOCK_R": 64, "BLOCK_M": 1024},
}


def _cfg(warps, **blocks_):
    return triton.Config(blocks_, num_warps=warps, num_stages=2)


def _exact_config(side):
    """Blocks and warps of the passes that redo rows exactly (the forward's
    ``ONLINE`` launch, the shift kernels): one fixed config, since their work
    depends on the data (most programs stream nothing) and timing them would
    tune nothing. A sparse pass owns the plan's blocks."""
    if _interpreting():
        return INTERPRET_CONFIGS[side]
    blocks_ = {
        "query": {"BLOCK_N": SPARSE_BLOCK, "BLOCK_M": 8},
        "rows_fwd": {"BLOCK_R": 4, "BLOCK_M": 512},
    }
    return {**blocks_[side], "num_warps": 4, "num_stages": 2}


# Where d, c < 16 the owned extent is >= 32 * num_warps: 1, 2 or 4 owned
# points a thread. The forward keeps a per-pair accumulator (streamed x owned)
# for the weights and one for the values, so a thread's tile (BLOCK_M x its
# owned points) is what the registers bound; ``_prune`` keeps the configs
# whose tile fits each variant's budget. Where d or c >= 16 a thread holds
# d + c float64 sums for each point it owns, and the configs marked "shared"
# give a point 2 or 4 threads (``_threads_a_wide_point``).
QUERY_CONFIGS = [
    _cfg(4, BLOCK_N=128, BLOCK_M=16),
    _cfg(4, BLOCK_N=128, BLOCK_M=8),
    _cfg(4, BLOCK_N=256, BLOCK_M=16),
    _cfg(4, BLOCK_N=512, BLOCK_M=8),
    _cfg(8, BLOCK_N=256, BLOCK_M=16),
    _cfg(2, BLOCK_N=64, BLOCK_M=16),
    # shared
    _cfg(8, BLOCK_N=128, BLOCK_M=16),
    _cfg(8, BLOCK_N=128, BLOCK_M=8),
]
# The tangent of a sparse plan at 1 < d, c < 16 alone (``_prune``), float32 and
# half precision, also gets a 4-key tile: its 128 x 8 holds 140 registers at
# d = 3, c = 2 with exclude_self (float32, sm_90; bench sass), 128 x 4 holds 80,
# one point a thread either way.
HEAVY_TANGENT_CONFIG = _cfg(4, BLOCK_N=SPARSE_BLOCK, BLOCK_M=4)
TANGENT_CONFIGS = [*QUERY_CONFIGS, HEAVY_TANGENT_CONFIG]
KEY_CONFIGS = [
    _cfg(4, BLOCK_M=128, BLOCK_N=16),
    _cfg(4, BLOCK_M=128, BLOCK_N=8),
    _cfg(4, BLOCK_M=256, BLOCK_N=16),
    _cfg(8, BLOCK_M=256, BLOCK_N=8),
    _cfg(2, BLOCK_M=64, BLOCK_N=16),
    _cfg(4, BLOCK_M=128, BLOCK_N=4),
    # shared
    _cfg(8, BLOCK_M=128, BLOCK_N=16),
    _cfg(8, BLOCK_M=64, BLOCK_N=32),
]
# Tile elements a thread may hold at d = c = 1 in float32 or half precision,
# half of it where d or c > 1 (half again for the tangent of a sparse plan,
# which carries per-feature terms beside each pair at a fixed 128 owned
# points); a quarter of it for float64 at any d < 16: two registers an element,
# and float64 scores take more temporaries (an eighth at d = 3 left the key
# side only 128 x 4, which bench sass' model put slower in 15 of 26 variants).
# Where d or c >= 16: WIDE_TILE_BUDGET (half for the tangent), at most
# WIDE_OWNED points a program. More spills (bench sass).
TILE_BUDGET = 32
WIDE_TILE_BUDGET = 8
WIDE_OWNED = 128
# Rows layout: 2-16 rows of 256-1024 contiguous keys a program. Taller
# tiles spill on sm_90: every element carries its own 64-bit address. The
# float64 tangent keeps to 2 rows (ROWS_TALLEST_FLOAT64_TANGENT).
ROWS_FWD_CONFIGS = [
    _cfg(4, BLOCK_R=2, BLOCK_M=1024),
    _cfg(8, BLOCK_R=4, BLOCK_M=1024),
    _cfg(4, BLOCK_R=4, BLOCK_M=512),
    _cfg(4, BLOCK_R=8, BLOCK_M=256),
    _cfg(8, BLOCK_R=16, BLOCK_M=256),
]
ROWS_TALLEST_FLOAT64_TANGENT = 2
ROWS_BWD_CONFIGS = [
    _cfg(4, BLOCK_R=2),
    _cfg(4, BLOCK_R=4),
    _cfg(4, BLOCK_R=8),
    _cfg(8, BLOCK_R=8),
]


def _threads_a_wide_point(kernel, meta):
    """Threads that share an owned point where d or c >= 16: the fewest at which
    no such variant spills inside a loop (bench sass, sm_90, d = c = 32). Both
    gradients dk and dv (2 (d + c) float64 sums a key) take 4; 2 take float64
    dq and tangent, float32 or float64 dk or dv beside dw, the float32 forward
    with exclude_self, and half-precision dq and dk with exclude_self (whose
    left-out tiles leave tl.dot for a loop over features)."""
    is64 = meta.get("ACC") == tl.float64
    half = meta.get("USE_DOT_QK")
    loo = meta.get("HAS_SKIP")
    if kernel == "dkv":
        k, v, w = meta.get("NEED_DK"), meta.get("NEED_DV"), meta.get("NEED_DW")
        if k and v:
            return 4
        return 2 if ((k or v) and w and not half) or (half and loo and k) else 1
    if kernel == "fwd":
        return 2 if loo and not half and not is64 else 1
    if kernel == "dq":
        return 2 if is64 or (half and loo) else 1
    return 2 if is64 else 1


def _prune(configs, named_args, kernel, **meta):
    """tl.dot needs every dimension >= 16; a sparse pass owns the plan's block
    (BLOCK_N for the query-side passes, BLOCK_M for ``kernel`` "dkv"); a
    thread's tile stays within TILE_BUDGET, owning whole points, where d, c < 16,
    and within WIDE_TILE_BUDGET, sharing points as ``_threads_a_wide_point``
    says, where d or c >= 16; where no config fits its budget, the lightest
    that shares points as needed."""
    owned = "BLOCK_M" if kernel == "dkv" else "BLOCK_N"
    if meta.get("USE_DOT_QK") or meta.get("USE_DOT_PV"):
        configs = [c for c in configs if min(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_M"]) >= 16]
    if meta.get("SPARSE"):
        configs = [c for c in configs if c.kwargs[owned] == SPARSE_BLOCK]
    width = max(named_args["D"], named_args.get("C", 1))
    wide = width >= 16
    is64 = meta.get("ACC") == tl.float64
    heavy = kernel == "tangent" and 1 < width < 16 and meta.get("SPARSE")
    if not heavy or is64:  # float64 keeps 128 x 8: its 128 x 4 is 1-4% slower (bench sass)
        configs = [c for c in configs if c is not HEAVY_TANGENT_CONFIG]
    if wide:
        budget = WIDE_TILE_BUDGET >> (kernel == "tangent")
        share = _threads_a_wide_point(kernel, meta)
    else:
        budget = TILE_BUDGET >> (2 * is64 + (width > 1 and not is64) + heavy)

    def per_thread(c):
        return c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_M"] // (32 * c.num_warps)

    def shared_as_needed(c):
        threads, points = 32 * c.num_warps, c.kwargs[owned]
        return points * share == threads and points <= WIDE_OWNED if wide else points >= threads

    shaped = [c for c in configs if shared_as_needed(c)] or configs
    return [c for c in shaped if per_thread(c) <= budget] or [min(shaped, key=per_thread)]


def _prune_rows_tangent(configs, named_args, **meta):
    if meta.get("ACC") != tl.float64:
        return configs
    return [c for c in configs if c.kwargs["BLOCK_R"] <= ROWS_TALLEST_FLOAT64_TANGENT]


# ---------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------


@triton.jit
def _exp(x, USE_EXP2: tl.constexpr):
    # float32 works in log2 units (log2(e) folded into the per-key constant);
    # float64 keeps natural units because a float literal for log2(e) would be
    # rounded to float32.
    if USE_EXP2:
        y = tl.exp2(x)
    else:
        y = tl.exp(x)
    return y


@triton.jit
def _store_shift(Lh, Ll, Scale, rows, stored, lse, far, hi, lo, l_i, ACC: tl.constexpr):
    # (Lh, Ll, Scale) of the shift kernels: the lse (scores' units) split in
    # two, or where ``far`` the exact pair (hi, lo) and 1 / l_i.
    high = lse.to(ACC)
    low = (lse - high.to(tl.float64)).to(ACC)
    tl.store(Lh + rows, tl.where(far, hi, high), mask=stored)
    tl.store(Ll + rows, tl.where(far, lo, low), mask=stored)
    tl.store(Scale + rows, 1.0 / tl.where(far, l_i, 1.0), mask=stored)


@triton.jit
def _pair_shift(hi, lo, dist2, c2, keep, AXIS: tl.constexpr, MASK: tl.constexpr,
                USE_EXP2: tl.constexpr):  # fmt: skip
    # One step of the exact online softmax over a tile whose keys run along
    # AXIS. The shift is the pair (hi, lo): hi the largest rounded score
    # c2 d^2, lo the largest fma(d^2, c2, -hi), the exact residual of the top
    # keys (rounding is monotonic). Returns the new pair, the factor (float64)
    # that rescales what was summed against the old one, and the tile's
    # exponents fma(d^2, c2, -hi) - lo: the top key's is 0 to rounding however
    # large its score, and no rounding of a product can reach it (explicit fma:
    # a GPU would fuse a product and a following difference by itself).
    s = dist2 * c2
    if MASK:
        s = tl.where(keep, s, float("-inf"))
    hi_new = tl.maximum(hi, tl.max(s, axis=AXIS))
    # While every score so far is -inf (all left out) shift by 0:
    # (-inf) - (-inf) would be NaN. lo then stays 0.
    hi_safe = tl.where(hi_new == float("-inf"), 0.0, hi_new)
    x = tl.fma(dist2, c2, -tl.expand_dims(hi_safe, AXIS))
    if MASK:
        x = tl.where(keep, x, float("-inf"))
    lo_tile = tl.max(x, axis=AXIS)
    lo_new = tl.where(hi_new == hi, tl.maximum(lo, lo_tile), lo_tile)
    f64 = tl.float64
    step = (hi.to(f64) - hi_safe.to(f64)) + (lo.to(f64) - lo_new.to(f64))
    return hi_new, lo_new, _exp(step, USE_EXP2), x - tl.expand_dims(lo_new, AXIS)


@triton.jit
def _low_outside(lse_hi, lse_lo, ACC: tl.constexpr, USE_EXP2: tl.constexpr):
    # (low_in_loop, factor) for a program's owned rows. Where none of them is
    # far, 2**(x - low) = 2**x 2**-low: the tile loop leaves out the
    # subtraction (one instruction a pair) and ``factor`` (2**-low) multiplies
    # each row's sums once. A far row's low is the exact residual of a huge
    # score, which 2**x alone could overflow, and its top key's exponent must
    # be exactly 0: a program that holds one subtracts low in the loop, as
    # float64 always does (its rows' low is 0 or far), and its factor is 1.
    # One test a program, the same branch for all of its threads.
    if ACC == tl.float32:
        near = tl.abs(lse_hi) < LOW_OUTSIDE_BELOW
        low_in_loop = tl.min(near.to(tl.int32), axis=0) == 0
    else:
        low_in_loop = tl.full([], 1, tl.int1)
    factor = tl.where(low_in_loop, 1.0, _exp(-lse_lo, USE_EXP2))
    return low_in_loop, factor.to(tl.float64)


@triton.jit
def _far_rows_in(far_ptr, begin, end, LOW_FOLDED: tl.constexpr):
    # Whether the streamed rows [begin, end) hold a far row, whose low the tile
    # loop must subtract: two loads of the count of far rows before each row
    # (``_fold_low``) a span, the same for all threads. Without a fold every
    # row's low is subtracted in the loop.
    if LOW_FOLDED:
        far = tl.load(far_ptr + end) > tl.load(far_ptr + begin)
    else:
        far = tl.full([], 1, tl.int1)
    return far


@triton.jit
def _owner(count, BLOCK: tl.constexpr):
    # This program's batch element and the points it owns. Batch and block
    # share grid axis 0 (no 65535 limit on the batch).
    tiles = tl.cdiv(count, BLOCK)
    pid = tl.program_id(0)
    first = (pid % tiles) * BLOCK
    offs = first + tl.arange(0, BLOCK)
    # Padded points read point count - 1 and are never stored.
    return pid, (pid // tiles).to(tl.int64), offs, tl.minimum(offs, count - 1).to(tl.int64)


@triton.jit
def _span_range(Ptr, pid, SPARSE: tl.constexpr):
    # The plan's spans for this program: [ptr[pid], ptr[pid + 1]); a dense
    # pass has one span, everything.
    if SPARSE:
        lo = tl.load(Ptr + pid)
        hi = tl.load(Ptr + pid + 1)
    else:
        lo = 0
        hi = 1
    return lo, hi


@triton.jit
def _span(Spans, s, size, SPARSE: tl.constexpr):
    if SPARSE:
        lo = tl.load(Spans + 2 * s)
        hi = tl.load(Spans + 2 * s + 1)
    else:
        lo = 0
        hi = size
    return lo, hi


@triton.jit
def _left_out(Skip, rows, HAS_SKIP: tl.constexpr):
    # For each owned point, the streamed index it leaves out (-1: none), and
    # the range [lo, hi) those fall in: a tile outside it needs no mask.
    if HAS_SKIP:
        skip = tl.load(Skip + rows)
        lo = tl.min(tl.where(skip >= 0, skip, 2**62), axis=0)
        hi = tl.max(skip, axis=0) + 1
    else:
        skip = rows * 0 - 1
        lo = 0
        hi = 0
    return skip, lo, hi


@triton.jit
def _needs_mask(start, end, skip_lo, skip_hi, BLOCK: tl.constexpr):
    ragged = start + BLOCK > end
    left_out = (start < skip_hi) & (start + BLOCK > skip_lo)
    return ragged | left_out


@triton.jit
def _stream(start, end, MASK: tl.constexpr, BLOCK: tl.constexpr):
    # Indices of a streamed tile; only a masked tile clamps (its padded points
    # are dropped by the caller), so full tiles keep provably contiguous
    # indices and vectorised loads.
    offs = start + tl.arange(0, BLOCK)
    if MASK:
        rows = tl.minimum(offs, end - 1)
    else:
        rows = offs
    return offs, rows.to(tl.int64)


@triton.jit
def _keep(offs_s, end, skip_o, HAS_SKIP: tl.constexpr):
    # (streamed, owned) pairs that take part: the streamed point exists, and
    # it is not the one the owned point leaves out.
    keep = (offs_s < end)[:, None]
    if HAS_SKIP:
        keep = keep & (offs_s[:, None] != skip_o[None, :])
    return keep


@triton.jit
def _owned_first(ptr, rows, WIDTH: tl.constexpr, ACC: tl.constexpr, BLOCK_S: tl.constexpr):
    # The owned points' values where they have one feature (or channel), in
    # float32, loaded once before the tile loop; else 0 and ``_owned`` loads
    # them in each tile, as every feature of d > 1. A load inside the loop is
    # not hoisted, and costs a round trip through shared memory, barriers
    # included, every tile where its layout differs from the tiles'. The sum
    # over a (BLOCK_S streamed, owned) tile that holds them in one row lays the
    # values out as the tiles' rows are, before the loop; the other rows are
    # -0.0, which adds to any x as x (+0.0 would turn -0.0 into +0.0). Wider
    # points and float64 keep their loads in the loop: held across it, their
    # values made ptxas spill inside the loop in six sm_90 variants that had
    # no spill.
    if WIDTH == 1 and ACC == tl.float32:
        x = tl.load(ptr + rows).to(ACC)
        return tl.sum(tl.where(tl.arange(0, BLOCK_S)[:, None] == 0, x[None, :], -0.0), axis=0)
    else:
        return 0


@triton.jit
def _owned(first, ptr, rows, f, WIDTH: tl.constexpr, ACC: tl.constexpr):
    # Feature (or channel) f of the owned points in a tile: ``first`` where
    # ``_owned_first`` loaded it (the same condition), else loaded here.
    if WIDTH == 1 and ACC == tl.float32:
        return first
    else:
        return tl.load(ptr + rows * WIDTH + f).to(ACC)


@triton.jit
def _sq_dist_direct(a_ptr, b_ptr, a_rows, b_rows, b0, D: tl.constexpr, ACC: tl.constexpr):
    # ||a_s - b_o||^2 as a (len(a_rows), len(b_rows)) tile, in the difference
    # form one feature at a time: exact to rounding whatever the norms of the
    # points, unlike ||a||^2 + ||b||^2 - 2 a.b. b0: ``_owned_first`` of the
    # owned points. Also returns the first feature's a - b, so d = 1 never
    # recomputes it.
    af = tl.load(a_ptr + a_rows * D).to(ACC)
    diff0 = af[:, None] - _owned(b0, b_ptr, b_rows, 0, D, ACC)[None, :]
    dist2 = diff0 * diff0
    for f in range(1, D):
        af = tl.load(a_ptr + a_rows * D + f).to(ACC)
        bf = tl.load(b_ptr + b_rows * D + f).to(ACC)
        diff = af[:, None] - bf[None, :]
        dist2 = tl.fma(diff, diff, dist2)
    return dist2, diff0


@triton.jit
def _sq_dist_dot(a, aa, b_t, bb, DOT_PREC: tl.constexpr):
    # Cross term on tensor cores (half-precision inputs, d >= 16): products of
    # half values are exact in float32 and accumulate in float32, far below
    # the half-precision tolerance. a is (S, BLOCK_D), b_t is (BLOCK_D, O).
    dist2 = aa[:, None] + bb[None, :] - 2.0 * tl.dot(a, b_t, input_precision=DOT_PREC)
    # Cancellation can leave tiny negatives; `where` (unlike maximum) keeps NaN.
    return tl.where(dist2 < 0.0, 0.0, dist2)


@triton.jit
def _sq_norm(x, AXIS: tl.constexpr, ACC: tl.constexpr):
    xf = x.to(ACC)
    return tl.sum(xf * xf, axis=AXIS)


@triton.jit
def _load_tile(ptr, rows, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    # (len(rows), BLOCK) tile of a row-major (*, WIDTH) matrix; rows are in
    # range, only the padded columns need a mask.
    offs = tl.arange(0, BLOCK)
    return tl.load(
        ptr + rows[:, None] * WIDTH + offs[None, :], mask=offs[None, :] < WIDTH, other=0.0
    )


@triton.jit
def _load_tile_t(ptr, rows, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    # The same tile transposed: (BLOCK, len(rows)).
    offs = tl.arange(0, BLOCK)
    return tl.load(
        ptr + rows[None, :] * WIDTH + offs[:, None], mask=offs[:, None] < WIDTH, other=0.0
    )


@triton.jit
def _place_row(acc, row, j, BLOCK: tl.constexpr):
    # acc[j, :] += row for a (BLOCK, owned) accumulator, without dynamic
    # indexing into registers.
    offs = tl.arange(0, BLOCK)
    return acc + tl.where(offs[:, None] == j, row[None, :], 0.0)


@triton.jit
def _sum64(tile):
    # A tile's sum over its streamed axis, as the float64 the passes add up
    # across tiles: a float32 running sum over many tiles would drop the
    # sub-ulp terms after a dominant one.
    return tl.sum(tile, axis=0).to(tl.float64)


@triton.jit
def _masked(x, keep, MASK: tl.constexpr):
    if MASK:
        x = tl.where(keep, x, 0.0)
    return x


@triton.jit
def _pair_zeros(USED: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, ACC: tl.constexpr):
    # A per-pair accumulator where it is used, else a placeholder.
    if USED:
        acc_2d = tl.zeros([ROWS, COLS], ACC)
    else:
        acc_2d = 0.0
    return acc_2d


@triton.jit
def _add_pair_terms(acc_2d, a, b, keep, MASK: tl.constexpr):
    # acc_2d += a * b for a per-pair accumulator: one fma a pair, or in a
    # masked tile nothing where not ``keep`` (a left-out pair's 0 * NaN).
    if MASK:
        return acc_2d + tl.where(keep, a * b, 0.0)
    return tl.fma(a, b, acc_2d)


@triton.jit
def _chunk_ends(start, lo, hi, BLOCK: tl.constexpr):
    # Whether a per-pair accumulator's sum is due after the tile at ``start``
    # of the span [lo, hi): the last tile of a chunk or of the span.
    tile = (start - lo) // BLOCK
    return (tile % CHUNK_TILES == CHUNK_TILES - 1) | (start + BLOCK >= hi)


@triton.jit
def _store_owned(ptr, acc, offs, stored, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    # acc (BLOCK, owned) into rows offs of a row-major (*, WIDTH) matrix, where
    # ``stored``.
    cols = tl.arange(0, BLOCK)
    rows = offs.to(tl.int64)
    tl.store(
        ptr + rows[None, :] * WIDTH + cols[:, None],
        acc,
        mask=(cols[:, None] < WIDTH) & stored[None, :],
    )


# ---------------------------------------------------------------------------
# Shared keys: forward. Tiles are (BLOCK_M keys, BLOCK_N queries).
# ---------------------------------------------------------------------------


@triton.jit
def _fwd_tile(
    hi, lo, q_ptr, k_ptr, c_ptr, q_rows, skip, q_t, qq, start, end,
    D: tl.constexpr, ACC: tl.constexpr, USE_EXP2: tl.constexpr, USE_DOT_QK: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_SKIP: tl.constexpr, ONLINE: tl.constexpr, MASK: tl.constexpr,
):  # fmt: skip
    # A tile's weights p (left-out pairs 0), with the shift pair and the factor
    # alpha (float64) that rescales what was summed before it (ONLINE only).
    offs_m, k_rows = _stream(start, end, MASK, BLOCK_M)
    if USE_DOT_QK:
        k = _load_tile(k_ptr, k_rows, D, BLOCK_D)
        dist2 = _sq_dist_dot(k, _sq_norm(k, 1, ACC), q_t, qq, DOT_PREC)
    else:
        dist2, _ = _sq_dist_direct(k_ptr, q_ptr, k_rows, q_rows, q_t, D, ACC)
    c2 = tl.load(c_ptr + k_rows)[:, None]
    keep = _keep(offs_m, end, skip, HAS_SKIP)
    if ONLINE:
        hi, lo, alpha, x = _pair_shift(hi, lo, dist2, c2, keep, 0, MASK, USE_EXP2)
    else:
        alpha = 1.0
        x = dist2 * c2  # <= 0: shift 0
    p = _masked(_exp(x, USE_EXP2), keep, MASK)
    return hi, lo, alpha, p, k_rows, keep


@triton.jit
def _fwd_values(acc, p, v_ptr, k_rows, keep, C: tl.constexpr, ACC: tl.constexpr,
                USE_DOT_PV: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_C: tl.constexpr,
                HAS_SKIP: tl.constexpr, MASK: tl.constexpr):  # fmt: skip
    # acc (BLOCK_C, BLOCK_N) += sum_j p_j v_j, in acc's dtype.
    if USE_DOT_PV and not (MASK and HAS_SKIP):
        v_t = _load_tile_t(v_ptr, k_rows, C, BLOCK_C).to(tl.float32)
        acc += tl.dot(v_t, p, input_precision=DOT_PREC).to(acc.dtype)
    else:
        for ch in range(C):
            vc = tl.load(v_ptr + k_rows * C + ch).to(ACC)
            pv = tl.sum(_masked(p * vc[:, None], keep, MASK), axis=0)
            acc = _place_row(acc, pv.to(acc.dtype), ch, BLOCK_C)
    return acc


@triton.jit
def _fwd_step(
    hi, lo, l_i, acc, l_2d, a_2d, q_ptr, k_ptr, v_ptr, c_ptr, q_rows, skip, q_t, qq, start,
    end, D: tl.constexpr, C: tl.constexpr, ACC: tl.constexpr, USE_EXP2: tl.constexpr,
    USE_DOT_QK: tl.constexpr, USE_DOT_PV: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_SKIP: tl.constexpr, ONLINE: tl.constexpr, VALUES: tl.constexpr,
    PER_PAIR: tl.constexpr, MASK: tl.constexpr,
):  # fmt: skip
    # One tile into the sums. ONLINE: l_i and acc are float64 and rescaled.
    # Else they are the chunk's float32 sums, and with PER_PAIR the weights
    # and (C = 1) weighted values go into per-pair accumulators l_2d, a_2d
    # (BLOCK_M, BLOCK_N) instead: one add and one fma a pair, the tile's
    # reduction left to the end of the chunk.
    hi, lo, alpha, p, k_rows, keep = _fwd_tile(
        hi, lo, q_ptr, k_ptr, c_ptr, q_rows, skip, q_t, qq, start, end, D, ACC, USE_EXP2,
        USE_DOT_QK, DOT_PREC, BLOCK_M, BLOCK_D, HAS_SKIP, ONLINE, MASK,
    )  # fmt: skip
    if ONLINE:
        l_i = l_i * alpha + _sum64(p)
        acc = acc * alpha[None, :]
    elif PER_PAIR:
        l_2d += p
    else:
        l_i += tl.sum(p, axis=0)
    if VALUES:
        if PER_PAIR and not ONLINE:
            v = tl.load(v_ptr + k_rows).to(ACC)[:, None]
            if MASK:
                a_2d += tl.where(keep, p * v, 0.0)
            else:
                a_2d = tl.fma(p, v, a_2d)
        else:
            acc = _fwd_values(acc, p, v_ptr, k_rows, keep, C, ACC, USE_DOT_PV, DOT_PREC,
                              BLOCK_C, HAS_SKIP, MASK)  # fmt: skip
    return hi, lo, l_i, acc, l_2d, a_2d


@triton.jit
def _fwd_sums(
    Ptr, Spans, pid, active, m, q_ptr, k_ptr, v_ptr, c_ptr, q_rows, skip, skip_lo, skip_hi,
    D: tl.constexpr, C: tl.constexpr, SPARSE: tl.constexpr, ACC: tl.constexpr,
    USE_EXP2: tl.constexpr, USE_DOT_QK: tl.constexpr, USE_DOT_PV: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, HAS_SKIP: tl.constexpr,
    ONLINE: tl.constexpr, VALUES: tl.constexpr,
):  # fmt: skip
    # The owned queries' shift pair (hi, lo), sum of weights l_i and weighted
    # values acc (float64) over the program's spans of keys; none where not
    # ``active``. The zero-shift pass sums CHUNK keys at a time in float32
    # (nothing float64 in the tile loop) and adds each chunk's sums in
    # float64: a float32 running sum over every key would drop the sub-ulp
    # weights after a dominant one. The exact pass rescales float64 sums
    # every tile.
    # q_t: the owned queries, a (BLOCK_D, BLOCK_N) tile for tl.dot, else
    # ``_owned_first``
    if USE_DOT_QK:
        q_t = _load_tile_t(q_ptr, q_rows, D, BLOCK_D)
        qq = _sq_norm(q_t, 0, ACC)
    else:
        q_t = _owned_first(q_ptr, q_rows, D, ACC, BLOCK_M)
        qq = 0
    if ONLINE:
        hi = tl.full([BLOCK_N], float("-inf"), ACC)
        chunk = BLOCK_M
    else:
        hi = tl.zeros([BLOCK_N], ACC)
        chunk = BLOCK_M * CHUNK_TILES
    PER_PAIR: tl.constexpr = not ONLINE and C == 1 and not USE_DOT_PV
    lo = tl.zeros([BLOCK_N], ACC)
    l_i = tl.zeros([BLOCK_N], tl.float64)
    acc = tl.zeros([BLOCK_C, BLOCK_N], tl.float64)
    s_lo, s_hi = _span_range(Ptr, pid, SPARSE)
    for s in range(s_lo, tl.where(active, s_hi, s_lo)):
        lo_m, hi_m = _span(Spans, s, m, SPARSE)
        for first in range(lo_m, hi_m, chunk):
            if ONLINE:
                l_c = l_i
                acc_c = acc
            else:
                l_c = tl.zeros([BLOCK_N], ACC)
                acc_c = tl.zeros([BLOCK_C, BLOCK_N], ACC)
            if PER_PAIR:
                l_2d = tl.zeros([BLOCK_M, BLOCK_N], ACC)
                a_2d = tl.zeros([BLOCK_M, BLOCK_N], ACC)
            else:
                l_2d = 0.0
                a_2d = 0.0
            for start in range(first, tl.minimum(first + chunk, hi_m), BLOCK_M):
                if _needs_mask(start, hi_m, skip_lo, skip_hi, BLOCK_M):
                    hi, lo, l_c, acc_c, l_2d, a_2d = _fwd_step(
                        hi, lo, l_c, acc_c, l_2d, a_2d, q_ptr, k_ptr, v_ptr, c_ptr, q_rows,
                        skip, q_t, qq, start, hi_m, D, C, ACC, USE_EXP2, USE_DOT_QK,
                        USE_DOT_PV, DOT_PREC, BLOCK_M, BLOCK_D, BLOCK_C, HAS_SKIP, ONLINE,
                        VALUES, PER_PAIR, True,
                    )  # fmt: skip
                else:
                    hi, lo, l_c, acc_c, l_2d, a_2d = _fwd_step(
                        hi, lo, l_c, acc_c, l_2d, a_2d, q_ptr, k_ptr, v_ptr, c_ptr, q_rows,
                        skip, q_t, qq, start, hi_m, D, C, ACC, USE_EXP2, USE_DOT_QK,
                        USE_DOT_PV, DOT_PREC, BLOCK_M, BLOCK_D, BLOCK_C, HAS_SKIP, ONLINE,
                        VALUES, PER_PAIR, False,
                    )  # fmt: skip
            if ONLINE:
                l_i = l_c
                acc = acc_c
            else:
                if PER_PAIR:
                    l_c += tl.sum(l_2d, axis=0)
                    acc_c += tl.sum(a_2d, axis=0)[None, :]
                l_i += l_c.to(tl.float64)
                acc += acc_c.to(tl.float64)
    return hi, lo, l_i, acc


@triton.jit
def _fwd_kernel(
    Q, K, V, Ck, Bounded, Skip, Ptr, Spans, Out, Lse, n, m,
    D: tl.constexpr, C: tl.constexpr, HAS_SKIP: tl.constexpr, SPARSE: tl.constexpr,
    ACC: tl.constexpr, USE_EXP2: tl.constexpr, SCALE: tl.constexpr,
    USE_DOT_QK: tl.constexpr, USE_DOT_PV: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr, ONLINE: tl.constexpr,
):  # fmt: skip
    # ONLINE False: shift 0 where every w of the batch element is >= 0
    # (Bounded[b]). A row it cannot keep (a sum below ZERO_SHIFT_MIN, NaN, or
    # some w < 0) gets lse = -inf, which marks it for ONLINE True: the exact
    # pair shift, in programs that hold such a row.
    pid, b, offs_n, q_rows = _owner(n, BLOCK_N)
    q_ptr, k_ptr, v_ptr, c_ptr = Q + b * n * D, K + b * m * D, V + b * m * C, Ck + b * m
    skip, skip_lo, skip_hi = _left_out(Skip + b * n, q_rows, HAS_SKIP)
    stored = offs_n < n
    if ONLINE:
        stored = stored & (tl.load(Lse + b * n + q_rows) == float("-inf"))
        active = tl.max(stored.to(tl.int32), axis=0) > 0
    else:
        active = tl.load(Bounded + b) != 0
    hi, lo, l_i, acc = _fwd_sums(
        Ptr, Spans, pid, active, m, q_ptr, k_ptr, v_ptr, c_ptr, q_rows, skip, skip_lo,
        skip_hi, D, C, SPARSE, ACC, USE_EXP2, USE_DOT_QK, USE_DOT_PV, DOT_PREC,
        BLOCK_D, BLOCK_C, BLOCK_N, BLOCK_M, HAS_SKIP, ONLINE, True,
    )  # fmt: skip
    if ONLINE:
        # l_i == 0 only if every score is -inf; 0 / 0 = NaN is what the
        # reference softmax gives there too. Rows not stored divide by 1.
        l_i = tl.where(stored, l_i, 1.0)
        # float64: the backward needs exp(s - lse) exact where |lse| is large.
        lse = (hi.to(tl.float64) + lo.to(tl.float64)) * (1.0 / SCALE) + tl.log(l_i)
    else:
        kept = l_i >= ZERO_SHIFT_MIN
        l_i = tl.where(kept, l_i, 1.0)
        lse = tl.where(kept, tl.log(l_i), float("-inf"))
    _store_owned(Out + b * n * C, acc / l_i[None, :], offs_n, stored, C, BLOCK_C)
    tl.store(Lse + b * n + offs_n.to(tl.int64), lse, mask=stored)


@triton.jit
def _shift_kernel(
    Q, K, Ck, Skip, Ptr, Spans, Lse, Lh, Ll, Scale, n, m,
    D: tl.constexpr, HAS_SKIP: tl.constexpr, SPARSE: tl.constexpr, ACC: tl.constexpr,
    USE_EXP2: tl.constexpr, SCALE: tl.constexpr, USE_DOT_QK: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr, EXACT_ABOVE: tl.constexpr,
):  # fmt: skip
    # The backward's weights Scale_i 2**(fma(d^2, c, -Lh) - Ll) (scores' units,
    # the accumulator dtype): (Lh, Ll) the lse split in two, Scale 1; for the
    # rows whose |lse| passes EXACT_ABOVE (natural log), where it cannot hold
    # the forward's shift, that shift recomputed as the forward's ONLINE launch
    # computes it, (Lh, Ll) = (hi, lo), and Scale = 1 / l_i. The sum stays
    # apart: lo, the residual of a huge score, may be too coarse to hold
    # log(l_i) as well (a tie of two keys, say).
    pid, b, offs_n, q_rows = _owner(n, BLOCK_N)
    q_ptr, k_ptr, c_ptr = Q + b * n * D, K + b * m * D, Ck + b * m
    skip, skip_lo, skip_hi = _left_out(Skip + b * n, q_rows, HAS_SKIP)
    lse = tl.load(Lse + b * n + q_rows)
    far = (offs_n < n) & (tl.abs(lse) > EXACT_ABOVE)
    active = tl.max(far.to(tl.int32), axis=0) > 0
    hi, lo, l_i, _ = _fwd_sums(
        Ptr, Spans, pid, active, m, q_ptr, k_ptr, k_ptr, c_ptr, q_rows, skip, skip_lo,
        skip_hi, D, 1, SPARSE, ACC, USE_EXP2, USE_DOT_QK, False, DOT_PREC,
        BLOCK_D, 1, BLOCK_N, BLOCK_M, HAS_SKIP, True, False,
    )  # fmt: skip
    rows = b * n + offs_n.to(tl.int64)
    _store_shift(Lh, Ll, Scale, rows, offs_n < n, lse * SCALE, far, hi, lo, l_i, ACC)


# ---------------------------------------------------------------------------
# Shared keys: the query-side passes of the backward (dq) and of forward mode
# (the tangent). Tiles are (BLOCK_M keys, BLOCK_N queries).
# ---------------------------------------------------------------------------


@triton.jit
def _dq_tile(
    dq_t, a_sum, dq_2d, q_ptr, k_ptr, v_ptr, c_ptr, g_ptr, q_rows, skip, q_t, qq, g_t,
    lse_hi, lse_lo, delta, start, end,
    D: tl.constexpr, C: tl.constexpr, ACC: tl.constexpr, USE_EXP2: tl.constexpr,
    SCALE: tl.constexpr, USE_DOT_QK: tl.constexpr, USE_DOT_PV: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr, HAS_SKIP: tl.constexpr, LOW_IN_LOOP: tl.constexpr,
    PER_PAIR: tl.constexpr, MASK: tl.constexpr,
):  # fmt: skip
    # PER_PAIR (float32, d = 1, no tl.dot): the tile's terms go into dq_2d, a
    # per-pair accumulator (streamed x owned), as the forward's weights do: one
    # fma a pair, the sum over the streamed axis left to the end of the chunk.
    offs_m, k_rows = _stream(start, end, MASK, BLOCK_M)
    if USE_DOT_QK:
        k = _load_tile(k_ptr, k_rows, D, BLOCK_D)
        dist2 = _sq_dist_dot(k, _sq_norm(k, 1, ACC), q_t, qq, DOT_PREC)
        diff0 = 0.0
    else:
        # diff0 = k_j - q_i (first feature)
        dist2, diff0 = _sq_dist_direct(k_ptr, q_ptr, k_rows, q_rows, q_t, D, ACC)
    c2 = tl.load(c_ptr + k_rows)[:, None]
    x = tl.fma(dist2, c2, -lse_hi[None, :])
    if LOW_IN_LOOP:
        x -= lse_lo[None, :]
    p = _exp(x, USE_EXP2)

    # g_i . v_j
    if USE_DOT_PV:
        v = _load_tile(v_ptr, k_rows, C, BLOCK_C)
        gv = tl.dot(v, g_t, input_precision=DOT_PREC)
    else:
        vc = tl.load(v_ptr + k_rows * C).to(ACC)
        gv = vc[:, None] * _owned(g_t, g_ptr, q_rows, 0, C, ACC)[None, :]
        for ch in range(1, C):
            vc = tl.load(v_ptr + k_rows * C + ch).to(ACC)
            gc = tl.load(g_ptr + q_rows * C + ch).to(ACC)
            gv = tl.fma(vc[:, None], gc[None, :], gv)
    # t_ij = dL/ds_ij and dq_i = -sum_j t_ij w_j (q_i - k_j)
    #                          =  sum_j a_ij (k_j - q_i) * (-2 / SCALE),
    # a_ij = t_ij c_j with the key's constant c_j = -(SCALE / 2) w_j; the
    # factor is applied once at the end.
    keep = _keep(offs_m, end, skip, HAS_SKIP)
    a = _masked(p * (gv - delta[None, :]) * c2, keep, MASK)

    if USE_DOT_QK and not (MASK and HAS_SKIP):
        # sum_j a_ij k_j on tensor cores; -A_i q_i is applied once at the end.
        # tf32 keeps a's float32 range at half precision's mantissa.
        dq_t += tl.dot(tl.trans(k).to(tl.float32), a, input_precision=DOT_PREC).to(tl.float64)
        a_sum += _sum64(a)
    else:
        # one feature at a time, so that a left-out key (NaN or not) reaches
        # no sum: a product would carry its 0 * NaN into every query
        if PER_PAIR:
            dq_2d = _add_pair_terms(dq_2d, a, diff0, keep, MASK)
        else:
            if not USE_DOT_QK:
                term = a * diff0
            else:
                k0 = tl.load(k_ptr + k_rows * D).to(ACC)
                q0 = tl.load(q_ptr + q_rows * D).to(ACC)
                term = a * (k0[:, None] - q0[None, :])
            dq_t = _place_row(dq_t, _sum64(_masked(term, keep, MASK)), 0, BLOCK_D)
            for f in range(1, D):
                kf = tl.load(k_ptr + k_rows * D + f).to(ACC)
                qf = tl.load(q_ptr + q_rows * D + f).to(ACC)
                term = _masked(a * (kf[:, None] - qf[None, :]), keep, MASK)
                dq_t = _place_row(dq_t, _sum64(term), f, BLOCK_D)
    return dq_t, a_sum, dq_2d


@triton.jit
def _dq_sweep(
    dq_t, a_sum, q_ptr, k_ptr, v_ptr, c_ptr, g_ptr, q_rows, skip, skip_lo, skip_hi, q_t,
    qq, g_t, lse_hi, lse_lo, delta, Ptr, Spans, pid, m,
    D: tl.constexpr, C: tl.constexpr, ACC: tl.constexpr, USE_EXP2: tl.constexpr,
    SCALE: tl.constexpr, USE_DOT_QK: tl.constexpr, USE_DOT_PV: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SKIP: tl.constexpr,
    SPARSE: tl.constexpr, LOW_IN_LOOP: tl.constexpr,
):  # fmt: skip
    # With one feature, in float32, the terms of CHUNK_TILES tiles go into a
    # per-pair accumulator, whose sum every CHUNK_TILES tiles (and at the end
    # of each span) goes into dq_t in float64. One flat loop over the tiles: a
    # loop per chunk inside it made LLVM widen the tile index to 64 bits. Not
    # in float64 (it saved nothing and cost registers) nor with a plan and
    # exclude_self (short spans, each with masked tiles: 4-5% more slots).
    PER_PAIR: tl.constexpr = (
        D == 1 and not USE_DOT_QK and ACC == tl.float32 and not (SPARSE and HAS_SKIP)
    )
    if PER_PAIR:
        dq_2d = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    else:
        dq_2d = 0.0
    s_lo, s_hi = _span_range(Ptr, pid, SPARSE)
    for s in range(s_lo, s_hi):
        lo, hi = _span(Spans, s, m, SPARSE)
        for start in range(lo, hi, BLOCK_M):
            if _needs_mask(start, hi, skip_lo, skip_hi, BLOCK_M):
                dq_t, a_sum, dq_2d = _dq_tile(
                    dq_t, a_sum, dq_2d, q_ptr, k_ptr, v_ptr, c_ptr, g_ptr, q_rows, skip,
                    q_t, qq, g_t, lse_hi, lse_lo, delta, start, hi, D, C, ACC, USE_EXP2,
                    SCALE, USE_DOT_QK, USE_DOT_PV, DOT_PREC, BLOCK_M, BLOCK_D, BLOCK_C,
                    HAS_SKIP, LOW_IN_LOOP, PER_PAIR, True,
                )  # fmt: skip
            else:
                dq_t, a_sum, dq_2d = _dq_tile(
                    dq_t, a_sum, dq_2d, q_ptr, k_ptr, v_ptr, c_ptr, g_ptr, q_rows, skip,
                    q_t, qq, g_t, lse_hi, lse_lo, delta, start, hi, D, C, ACC, USE_EXP2,
                    SCALE, USE_DOT_QK, USE_DOT_PV, DOT_PREC, BLOCK_M, BLOCK_D, BLOCK_C,
                    HAS_SKIP, LOW_IN_LOOP, PER_PAIR, False,
                )  # fmt: skip
            if PER_PAIR:
                if _chunk_ends(start, lo, hi, BLOCK_M):
                    dq_t = _place_row(dq_t, _sum64(dq_2d), 0, BLOCK_D)
                    dq_2d = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    return dq_t, a_sum


@triton.jit
def _dq_kernel(
    Q, K, V, Ck, G, Lh, Ll, Delta, Skip, Ptr, Spans, DQ, n, m,
    D: tl.constexpr, C: tl.constexpr, HAS_SKIP: tl.constexpr, SPARSE: tl.constexpr,
    ACC: tl.constexpr, USE_EXP2: tl.constexpr, SCALE: tl.constexpr,
    USE_DOT_QK: tl.constexpr, USE_DOT_PV: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    pid, b, offs_n, q_rows = _owner(n, BLOCK_N)
    q_ptr, k_ptr, v_ptr, c_ptr = Q + b * n * D, K + b * m * D, V + b * m * C, Ck + b * m
    g_ptr = G + b * n * C
    skip, skip_lo, skip_hi = _left_out(Skip + b * n, q_rows, HAS_SKIP)
    lse_hi, lse_lo = tl.load(Lh + b * n + q_rows), tl.load(Ll + b * n + q_rows)
    delta = tl.load(Delta + b * n + q_rows).to(ACC)
    # q_t, g_t: the owned tiles for tl.dot, else ``_owned_first``
    if USE_DOT_QK:
        q_t = _load_tile_t(q_ptr, q_rows, D, BLOCK_D)
        qq = _sq_norm(q_t, 0, ACC)
    else:
        q_t = _owned_first(q_ptr, q_rows, D, ACC, BLOCK_M)
        qq = 0
    if USE_DOT_PV:
        g_t = _load_tile_t(g_ptr, q_rows, C, BLOCK_C)
    else:
        g_t = _owned_first(g_ptr, q_rows, C, ACC, BLOCK_M)

    dq_t = tl.zeros([BLOCK_D, BLOCK_N], tl.float64)
    a_sum = tl.zeros([BLOCK_N], tl.float64)
    low_in_loop, factor = _low_outside(lse_hi, lse_lo, ACC, USE_EXP2)
    if low_in_loop:
        dq_t, a_sum = _dq_sweep(
            dq_t, a_sum, q_ptr, k_ptr, v_ptr, c_ptr, g_ptr, q_rows, skip, skip_lo, skip_hi,
            q_t, qq, g_t, lse_hi, lse_lo, delta, Ptr, Spans, pid, m, D, C, ACC, USE_EXP2,
            SCALE, USE_DOT_QK, USE_DOT_PV, DOT_PREC, BLOCK_M, BLOCK_D, BLOCK_C, BLOCK_N,
            HAS_SKIP, SPARSE, True,
        )  # fmt: skip
    else:
        dq_t, a_sum = _dq_sweep(
            dq_t, a_sum, q_ptr, k_ptr, v_ptr, c_ptr, g_ptr, q_rows, skip, skip_lo, skip_hi,
            q_t, qq, g_t, lse_hi, lse_lo, delta, Ptr, Spans, pid, m, D, C, ACC, USE_EXP2,
            SCALE, USE_DOT_QK, USE_DOT_PV, DOT_PREC, BLOCK_M, BLOCK_D, BLOCK_C, BLOCK_N,
            HAS_SKIP, SPARSE, False,
        )  # fmt: skip
    dq_t *= factor[None, :]
    a_sum *= factor
    if USE_DOT_QK:
        dq_t -= a_sum[None, :] * q_t.to(tl.float64)
    _store_owned(DQ + b * n * D, dq_t * (-2.0 / SCALE), offs_n, offs_n < n, D, BLOCK_D)


@triton.jit
def _tangent_tile(
    acc, acc_2d, q_ptr, k_ptr, v_ptr, c_ptr, dq_ptr, dk_ptr, dv_ptr, dw_ptr, y_ptr, q_rows,
    q0, dq0, y0, skip, lse_hi, lse_lo, start, end,
    D: tl.constexpr, C: tl.constexpr, ACC: tl.constexpr, USE_EXP2: tl.constexpr,
    SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_SKIP: tl.constexpr, LOW_IN_LOOP: tl.constexpr, PER_PAIR: tl.constexpr,
    MASK: tl.constexpr,
):  # fmt: skip
    # dy_i = sum_j p_ij (dv_j + ds_ij (v_j - y_i)),
    # ds_ij = -(dw_j / 2) d_ij^2 - w_j (q_i - k_j) . (dq_i - dk_j).
    offs_m, k_rows = _stream(start, end, MASK, BLOCK_M)
    # diff0 = k_j - q_i (first feature)
    dist2, diff0 = _sq_dist_direct(k_ptr, q_ptr, k_rows, q_rows, q0, D, ACC)
    c = tl.load(c_ptr + k_rows)
    x = tl.fma(dist2, c[:, None], -lse_hi[None, :])
    if LOW_IN_LOOP:
        x -= lse_lo[None, :]
    p = _exp(x, USE_EXP2)
    w = c * (-2.0 / SCALE)
    ds = (tl.load(dw_ptr + k_rows).to(ACC) * -0.5)[:, None] * dist2
    if D == 1:
        # q - k is -diff0 (the sign folds into the product)
        dd = (
            _owned(dq0, dq_ptr, q_rows, 0, D, ACC)[None, :]
            - tl.load(dk_ptr + k_rows).to(ACC)[:, None]
        )
        ds += w[:, None] * diff0 * dd
    else:
        # each feature loaded again: diff0 held across the loop made ptxas spill
        for f in range(D):
            diff = (
                tl.load(q_ptr + q_rows * D + f).to(ACC)[None, :]
                - tl.load(k_ptr + k_rows * D + f).to(ACC)[:, None]
            )
            dd = (
                tl.load(dq_ptr + q_rows * D + f).to(ACC)[None, :]
                - tl.load(dk_ptr + k_rows * D + f).to(ACC)[:, None]
            )
            ds -= w[:, None] * diff * dd
    keep = _keep(offs_m, end, skip, HAS_SKIP)
    for ch in range(C):
        vc = tl.load(v_ptr + k_rows * C + ch).to(ACC)[:, None]
        dvc = tl.load(dv_ptr + k_rows * C + ch).to(ACC)[:, None]
        yc = _owned(y0, y_ptr, q_rows, ch, C, ACC)[None, :]
        if PER_PAIR:
            acc_2d = _add_pair_terms(acc_2d, p, dvc + ds * (vc - yc), keep, MASK)
        else:
            term = _masked(p * (dvc + ds * (vc - yc)), keep, MASK)
            acc = _place_row(acc, _sum64(term), ch, BLOCK_C)
    return acc, acc_2d


@triton.jit
def _tangent_sweep(
    acc, q_ptr, k_ptr, v_ptr, c_ptr, dq_ptr, dk_ptr, dv_ptr, dw_ptr, y_ptr, q_rows,
    q0, dq0, y0, skip, skip_lo, skip_hi, lse_hi, lse_lo, Ptr, Spans, pid, m,
    D: tl.constexpr, C: tl.constexpr, ACC: tl.constexpr, USE_EXP2: tl.constexpr,
    SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr, HAS_SKIP: tl.constexpr, SPARSE: tl.constexpr,
    LOW_IN_LOOP: tl.constexpr,
):  # fmt: skip
    # With one channel and float32 sums, a per-pair accumulator, as in
    # ``_dq_sweep``.
    PER_PAIR: tl.constexpr = C == 1 and ACC == tl.float32 and not (SPARSE and HAS_SKIP)
    acc_2d = _pair_zeros(PER_PAIR, BLOCK_M, BLOCK_N, ACC)
    s_lo, s_hi = _span_range(Ptr, pid, SPARSE)
    for s in range(s_lo, s_hi):
        lo, hi = _span(Spans, s, m, SPARSE)
        for start in range(lo, hi, BLOCK_M):
            if _needs_mask(start, hi, skip_lo, skip_hi, BLOCK_M):
                acc, acc_2d = _tangent_tile(
                    acc, acc_2d, q_ptr, k_ptr, v_ptr, c_ptr, dq_ptr, dk_ptr, dv_ptr, dw_ptr,
                    y_ptr, q_rows, q0, dq0, y0, skip, lse_hi, lse_lo, start, hi, D, C, ACC,
                    USE_EXP2, SCALE, BLOCK_M, BLOCK_C, HAS_SKIP, LOW_IN_LOOP, PER_PAIR, True,
                )  # fmt: skip
            else:
                acc, acc_2d = _tangent_tile(
                    acc, acc_2d, q_ptr, k_ptr, v_ptr, c_ptr, dq_ptr, dk_ptr, dv_ptr, dw_ptr,
                    y_ptr, q_rows, q0, dq0, y0, skip, lse_hi, lse_lo, start, hi, D, C, ACC,
                    USE_EXP2, SCALE, BLOCK_M, BLOCK_C, HAS_SKIP, LOW_IN_LOOP, PER_PAIR, False,
                )  # fmt: skip
            if PER_PAIR:
                if _chunk_ends(start, lo, hi, BLOCK_M):
                    acc = _place_row(acc, _sum64(acc_2d), 0, BLOCK_C)
                    acc_2d = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    return acc


@triton.jit
def _tangent_kernel(
    Q, K, V, Ck, DQ, DK, DV, DW, Y, Lh, Ll, Scale, Skip, Ptr, Spans, DY, n, m,
    D: tl.constexpr, C: tl.constexpr, HAS_SKIP: tl.constexpr, SPARSE: tl.constexpr,
    ACC: tl.constexpr, USE_EXP2: tl.constexpr, SCALE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    pid, b, offs_n, q_rows = _owner(n, BLOCK_N)
    q_ptr, k_ptr, v_ptr, c_ptr = Q + b * n * D, K + b * m * D, V + b * m * C, Ck + b * m
    dq_ptr, dk_ptr, dv_ptr, dw_ptr = DQ + b * n * D, DK + b * m * D, DV + b * m * C, DW + b * m
    y_ptr = Y + b * n * C
    q0 = _owned_first(q_ptr, q_rows, D, ACC, BLOCK_M)
    dq0 = _owned_first(dq_ptr, q_rows, D, ACC, BLOCK_M)
    y0 = _owned_first(y_ptr, q_rows, C, ACC, BLOCK_M)
    skip, skip_lo, skip_hi = _left_out(Skip + b * n, q_rows, HAS_SKIP)
    lse_hi, lse_lo = tl.load(Lh + b * n + q_rows), tl.load(Ll + b * n + q_rows)
    acc = tl.zeros([BLOCK_C, BLOCK_N], tl.float64)
    low_in_loop, factor = _low_outside(lse_hi, lse_lo, ACC, USE_EXP2)
    if low_in_loop:
        acc = _tangent_sweep(
            acc, q_ptr, k_ptr, v_ptr, c_ptr, dq_ptr, dk_ptr, dv_ptr, dw_ptr, y_ptr, q_rows,
            q0, dq0, y0, skip, skip_lo, skip_hi, lse_hi, lse_lo, Ptr, Spans, pid, m, D, C,
            ACC, USE_EXP2, SCALE, BLOCK_M, BLOCK_N, BLOCK_C, HAS_SKIP, SPARSE, True,
        )  # fmt: skip
    else:
        acc = _tangent_sweep(
            acc, q_ptr, k_ptr, v_ptr, c_ptr, dq_ptr, dk_ptr, dv_ptr, dw_ptr, y_ptr, q_rows,
            q0, dq0, y0, skip, skip_lo, skip_hi, lse_hi, lse_lo, Ptr, Spans, pid, m, D, C,
            ACC, USE_EXP2, SCALE, BLOCK_M, BLOCK_N, BLOCK_C, HAS_SKIP, SPARSE, False,
        )  # fmt: skip
    acc = acc * (tl.load(Scale + b * n + q_rows).to(tl.float64) * factor)[None, :]
    _store_owned(DY + b * n * C, acc, offs_n, offs_n < n, C, BLOCK_C)


# ---------------------------------------------------------------------------
# Shared keys: backward, dk / dv / dw. One program per key block streams the
# query spans; tiles are (BLOCK_N queries, BLOCK_M keys).
# ---------------------------------------------------------------------------


@triton.jit
def _dkv_tile(
    dk_t, t_sum, dv_t, dw_acc, dk_2d, dv_2d, dw_2d, q_ptr, k_ptr, v_ptr, g_ptr, lh_ptr,
    ll_ptr, delta_ptr, shift_ptr, skip_ptr, k_rows, offs_m, c2, k_t, kk, v_t, start, end,
    D: tl.constexpr, C: tl.constexpr, ACC: tl.constexpr, USE_EXP2: tl.constexpr,
    SCALE: tl.constexpr, USE_DOT_QK: tl.constexpr, USE_DOT_PV: tl.constexpr,
    DOT_PREC: tl.constexpr, NEED_DK: tl.constexpr, NEED_DV: tl.constexpr,
    NEED_DW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr, HAS_SKIP: tl.constexpr, LOW_IN_LOOP: tl.constexpr,
    PER_PAIR: tl.constexpr, MASK: tl.constexpr,
):  # fmt: skip
    # PER_PAIR (float32, d = c = 1, no tl.dot): each sum's terms go into a
    # per-pair accumulator (streamed x owned), as dq's do.
    offs_n, q_rows = _stream(start, end, MASK, BLOCK_N)
    lse_hi = tl.load(lh_ptr + q_rows)
    if LOW_IN_LOOP:
        lse_lo = tl.load(ll_ptr + q_rows)
    if USE_DOT_QK:
        q = _load_tile(q_ptr, q_rows, D, BLOCK_D)
        dist2 = _sq_dist_dot(q, _sq_norm(q, 1, ACC), k_t, kk, DOT_PREC)
        diff0 = 0.0
    else:
        # diff0 = q_i - k_j (first feature)
        dist2, diff0 = _sq_dist_direct(q_ptr, k_ptr, q_rows, k_rows, k_t, D, ACC)
    x = tl.fma(dist2, c2[None, :], -lse_hi[:, None])
    if LOW_IN_LOOP:
        x -= lse_lo[:, None]
    p = _exp(x, USE_EXP2)
    # a pair is left out where the streamed query's left-out key is this key
    if MASK:
        keep = (offs_n < end)[:, None]
        if HAS_SKIP:
            keep = keep & (tl.load(skip_ptr + q_rows)[:, None] != offs_m[None, :])
        p = tl.where(keep, p, 0.0)
    else:
        keep = 0

    # dv_j = sum_i p_ij g_i, and g_i . v_j for t (which dk and dw need).
    if USE_DOT_PV:
        g = _load_tile(g_ptr, q_rows, C, BLOCK_C)
        if MASK:
            g = tl.where((offs_n < end)[:, None], g, 0.0)
        if NEED_DV:
            dv_t += tl.dot(tl.trans(g).to(tl.float32), p, input_precision=DOT_PREC).to(tl.float64)
        if NEED_DK or NEED_DW:
            gv = tl.dot(g, v_t, input_precision=DOT_PREC)
    else:
        gc = tl.load(g_ptr + q_rows * C).to(ACC)
        if NEED_DV and PER_PAIR:
            dv_2d = _add_pair_terms(dv_2d, p, gc[:, None], keep, MASK)
        elif NEED_DV:
            dv_t = _place_row(dv_t, _sum64(_masked(p * gc[:, None], keep, MASK)), 0, BLOCK_C)
        if NEED_DK or NEED_DW:
            gv = gc[:, None] * _owned(v_t, v_ptr, k_rows, 0, C, ACC)[None, :]
        for ch in range(1, C):
            gc = tl.load(g_ptr + q_rows * C + ch).to(ACC)
            if NEED_DV:
                dv_t = _place_row(dv_t, _sum64(_masked(p * gc[:, None], keep, MASK)), ch, BLOCK_C)
            if NEED_DK or NEED_DW:
                gv = tl.fma(gc[:, None], tl.load(v_ptr + k_rows * C + ch).to(ACC)[None, :], gv)

    if NEED_DK or NEED_DW:
        delta = tl.load(delta_ptr + q_rows).to(ACC)
        t = _masked(p * (gv - delta[:, None]), keep, MASK)
        if NEED_DW:
            shift = tl.load(shift_ptr + q_rows).to(ACC)
            if PER_PAIR:
                dw_2d = _add_pair_terms(dw_2d, t, dist2 - shift[:, None], keep, MASK)
            else:
                dw_acc += _sum64(_masked(t * (dist2 - shift[:, None]), keep, MASK))
        if NEED_DK:
            # dk_j = w_j sum_i t_ij (q_i - k_j); w_j is applied at the end.
            if USE_DOT_QK and not (MASK and HAS_SKIP):
                dk_t += tl.dot(tl.trans(q).to(tl.float32), t, input_precision=DOT_PREC).to(
                    tl.float64
                )
                t_sum += _sum64(t)
            elif PER_PAIR:
                dk_2d = _add_pair_terms(dk_2d, t, diff0, keep, MASK)
            else:
                if not USE_DOT_QK:
                    term = t * diff0
                else:
                    q0 = tl.load(q_ptr + q_rows * D).to(ACC)
                    k0 = tl.load(k_ptr + k_rows * D).to(ACC)
                    term = t * (q0[:, None] - k0[None, :])
                dk_t = _place_row(dk_t, _sum64(_masked(term, keep, MASK)), 0, BLOCK_D)
                for f in range(1, D):
                    qf = tl.load(q_ptr + q_rows * D + f).to(ACC)
                    kf = tl.load(k_ptr + k_rows * D + f).to(ACC)
                    term = _masked(t * (qf[:, None] - kf[None, :]), keep, MASK)
                    dk_t = _place_row(dk_t, _sum64(term), f, BLOCK_D)
    return dk_t, t_sum, dv_t, dw_acc, dk_2d, dv_2d, dw_2d


@triton.jit
def _dkv_sweep(
    dk_t, t_sum, dv_t, dw_acc, q_ptr, k_ptr, v_ptr, g_ptr, lh_ptr, ll_ptr, delta_ptr,
    shift_ptr, skip_ptr, k_rows, offs_m, c2, k_t, kk, v_t, skip_lo, skip_hi, begin, end,
    D: tl.constexpr, C: tl.constexpr, ACC: tl.constexpr, USE_EXP2: tl.constexpr,
    SCALE: tl.constexpr, USE_DOT_QK: tl.constexpr, USE_DOT_PV: tl.constexpr,
    DOT_PREC: tl.constexpr, NEED_DK: tl.constexpr, NEED_DV: tl.constexpr,
    NEED_DW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, HAS_SKIP: tl.constexpr,
    SPARSE: tl.constexpr, LOW_IN_LOOP: tl.constexpr,
):  # fmt: skip
    # The tiles of streamed rows [begin, end). With one feature, one channel
    # and float32 sums (float32 and half precision), the terms go into
    # per-pair accumulators, added to the float64 sums every CHUNK_TILES
    # tiles and at the end; not with a plan and exclude_self, as in
    # ``_dq_sweep``.
    PER_PAIR: tl.constexpr = (
        D == 1
        and C == 1
        and not USE_DOT_QK
        and not USE_DOT_PV
        and ACC == tl.float32
        and not (SPARSE and HAS_SKIP)
    )
    dk_2d = _pair_zeros(NEED_DK and PER_PAIR, BLOCK_N, BLOCK_M, ACC)
    dv_2d = _pair_zeros(NEED_DV and PER_PAIR, BLOCK_N, BLOCK_M, ACC)
    dw_2d = _pair_zeros(NEED_DW and PER_PAIR, BLOCK_N, BLOCK_M, ACC)
    for start in range(begin, end, BLOCK_N):
        if _needs_mask(start, end, skip_lo, skip_hi, BLOCK_N):
            dk_t, t_sum, dv_t, dw_acc, dk_2d, dv_2d, dw_2d = _dkv_tile(
                dk_t, t_sum, dv_t, dw_acc, dk_2d, dv_2d, dw_2d, q_ptr, k_ptr, v_ptr, g_ptr,
                lh_ptr, ll_ptr, delta_ptr, shift_ptr, skip_ptr, k_rows, offs_m, c2, k_t, kk,
                v_t, start, end, D, C, ACC, USE_EXP2, SCALE, USE_DOT_QK, USE_DOT_PV,
                DOT_PREC, NEED_DK, NEED_DV, NEED_DW, BLOCK_N, BLOCK_D, BLOCK_C, HAS_SKIP,
                LOW_IN_LOOP, PER_PAIR, True,
            )  # fmt: skip
        else:
            dk_t, t_sum, dv_t, dw_acc, dk_2d, dv_2d, dw_2d = _dkv_tile(
                dk_t, t_sum, dv_t, dw_acc, dk_2d, dv_2d, dw_2d, q_ptr, k_ptr, v_ptr, g_ptr,
                lh_ptr, ll_ptr, delta_ptr, shift_ptr, skip_ptr, k_rows, offs_m, c2, k_t, kk,
                v_t, start, end, D, C, ACC, USE_EXP2, SCALE, USE_DOT_QK, USE_DOT_PV,
                DOT_PREC, NEED_DK, NEED_DV, NEED_DW, BLOCK_N, BLOCK_D, BLOCK_C, HAS_SKIP,
                LOW_IN_LOOP, PER_PAIR, False,
            )  # fmt: skip
        if PER_PAIR:
            if _chunk_ends(start, begin, end, BLOCK_N):
                if NEED_DK:
                    dk_t = _place_row(dk_t, _sum64(dk_2d), 0, BLOCK_D)
                    dk_2d = tl.zeros([BLOCK_N, BLOCK_M], ACC)
                if NEED_DV:
                    dv_t = _place_row(dv_t, _sum64(dv_2d), 0, BLOCK_C)
                    dv_2d = tl.zeros([BLOCK_N, BLOCK_M], ACC)
                if NEED_DW:
                    dw_acc += _sum64(dw_2d)
                    dw_2d = tl.zeros([BLOCK_N, BLOCK_M], ACC)
    return dk_t, t_sum, dv_t, dw_acc


@triton.jit
def _dkv_kernel(
    Q, K, V, Ck, G, Lh, Ll, FarBefore, Delta, Shift, Skip, SkippedBy, Ptr, Spans, DK, DV, DW,
    n, m,
    D: tl.constexpr, C: tl.constexpr, HAS_SKIP: tl.constexpr, SPARSE: tl.constexpr,
    LOW_FOLDED: tl.constexpr,
    ACC: tl.constexpr, USE_EXP2: tl.constexpr, SCALE: tl.constexpr,
    USE_DOT_QK: tl.constexpr, USE_DOT_PV: tl.constexpr, DOT_PREC: tl.constexpr,
    NEED_DK: tl.constexpr, NEED_DV: tl.constexpr, NEED_DW: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    pid, b, offs_m, k_rows = _owner(m, BLOCK_M)
    q_ptr, k_ptr, v_ptr, g_ptr = Q + b * n * D, K + b * m * D, V + b * m * C, G + b * n * C
    lh_ptr, ll_ptr, delta_ptr, shift_ptr, skip_ptr = (
        Lh + b * n,
        Ll + b * n,
        Delta + b * n,
        Shift + b * n,
        Skip + b * n,
    )
    far_ptr = FarBefore + b * (n + 1)
    _, skip_lo, skip_hi = _left_out(SkippedBy + b * m, k_rows, HAS_SKIP)

    c2 = tl.load(Ck + b * m + k_rows)
    # k_t, v_t: the owned tiles for tl.dot, else ``_owned_first``
    if USE_DOT_QK:
        k_t = _load_tile_t(k_ptr, k_rows, D, BLOCK_D)
        kk = _sq_norm(k_t, 0, ACC)
    else:
        k_t = _owned_first(k_ptr, k_rows, D, ACC, BLOCK_N)
        kk = 0
    if USE_DOT_PV:
        v_t = _load_tile_t(v_ptr, k_rows, C, BLOCK_C)
    else:
        v_t = _owned_first(v_ptr, k_rows, C, ACC, BLOCK_N)

    dk_t = tl.zeros([BLOCK_D, BLOCK_M], tl.float64)
    t_sum = tl.zeros([BLOCK_M], tl.float64)
    dv_t = tl.zeros([BLOCK_C, BLOCK_M], tl.float64)
    dw_acc = tl.zeros([BLOCK_M], tl.float64)
    s_lo, s_hi = _span_range(Ptr, pid, SPARSE)
    for s in range(s_lo, s_hi):
        lo, hi = _span(Spans, s, n, SPARSE)
        if _far_rows_in(far_ptr, lo, hi, LOW_FOLDED):
            dk_t, t_sum, dv_t, dw_acc = _dkv_sweep(
                dk_t, t_sum, dv_t, dw_acc, q_ptr, k_ptr, v_ptr, g_ptr, lh_ptr, ll_ptr,
                delta_ptr, shift_ptr, skip_ptr, k_rows, offs_m, c2, k_t, kk, v_t, skip_lo,
                skip_hi, lo, hi, D, C, ACC, USE_EXP2, SCALE, USE_DOT_QK, USE_DOT_PV, DOT_PREC,
                NEED_DK, NEED_DV, NEED_DW, BLOCK_N, BLOCK_M, BLOCK_D, BLOCK_C, HAS_SKIP, SPARSE,
                True,
            )  # fmt: skip
        else:
            dk_t, t_sum, dv_t, dw_acc = _dkv_sweep(
                dk_t, t_sum, dv_t, dw_acc, q_ptr, k_ptr, v_ptr, g_ptr, lh_ptr, ll_ptr,
                delta_ptr, shift_ptr, skip_ptr, k_rows, offs_m, c2, k_t, kk, v_t, skip_lo,
                skip_hi, lo, hi, D, C, ACC, USE_EXP2, SCALE, USE_DOT_QK, USE_DOT_PV, DOT_PREC,
                NEED_DK, NEED_DV, NEED_DW, BLOCK_N, BLOCK_M, BLOCK_D, BLOCK_C, HAS_SKIP, SPARSE,
                False,
            )  # fmt: skip

    if NEED_DK:
        if USE_DOT_QK:
            dk_t -= t_sum[None, :] * k_t.to(tl.float64)
        dk_t = dk_t * (c2.to(tl.float64) * (-2.0 / SCALE))[None, :]
        _store_owned(DK + b * m * D, dk_t, offs_m, offs_m < m, D, BLOCK_D)
    if NEED_DV:
        _store_owned(DV + b * m * C, dv_t, offs_m, offs_m < m, C, BLOCK_C)
    if NEED_DW:
        tl.store(DW + b * m + offs_m.to(tl.int64), -0.5 * dw_acc, mask=offs_m < m)


# ---------------------------------------------------------------------------
# Per-query rows: query (n,), keys (n, m), values (n, m), w (m,)
# ---------------------------------------------------------------------------


@triton.jit
def _rows_sums(
    q, K, V, W, row_base, m, active,
    ACC: tl.constexpr, USE_EXP2: tl.constexpr, SCALE: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, ONLINE: tl.constexpr, VALUES: tl.constexpr,
):  # fmt: skip
    # The rows' shift pair (hi, lo), sum of weights and of weighted values, as
    # ``_fwd_sums`` for shared keys; none where not ``active``.
    if ONLINE:
        hi = tl.full([BLOCK_R], float("-inf"), ACC)
    else:
        hi = tl.zeros([BLOCK_R], ACC)
    lo = tl.zeros([BLOCK_R], ACC)
    l_i = tl.zeros([BLOCK_R], tl.float64)
    acc = tl.zeros([BLOCK_R], tl.float64)
    for start in range(0, tl.where(active, m, 0), BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        c_mask = offs_m < m
        mask = c_mask[None, :]
        k = tl.load(K + row_base + offs_m[None, :], mask=mask, other=0.0).to(ACC)
        c2 = (tl.load(W + offs_m, mask=c_mask, other=0.0).to(ACC) * (-0.5 * SCALE))[None, :]
        diff = q[:, None] - k
        dist2 = diff * diff
        if ONLINE:
            hi, lo, alpha, x = _pair_shift(hi, lo, dist2, c2, mask, 1, True, USE_EXP2)
            l_i = l_i * alpha
            acc = acc * alpha
        else:
            x = dist2 * c2  # <= 0: shift 0
        p = tl.where(mask, _exp(x, USE_EXP2), 0.0)
        l_i += tl.sum(p, axis=1).to(tl.float64)
        if VALUES:
            v = tl.load(V + row_base + offs_m[None, :], mask=mask, other=0.0).to(ACC)
            acc += tl.sum(p * v, axis=1).to(tl.float64)
    return hi, lo, l_i, acc


@triton.jit
def _rows_fwd_kernel(
    Q, K, V, W, Bounded, Out, Lse, n, m,
    ACC: tl.constexpr, USE_EXP2: tl.constexpr, SCALE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, ONLINE: tl.constexpr,
):  # fmt: skip
    # Two launches, as ``_fwd_kernel``: shift 0 where every w >= 0, then the
    # exact pair shift for the rows marked lse = -inf.
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    # Padded rows read row n - 1 (finite work, never stored), so only the
    # ragged last column block needs a mask.
    rows = tl.minimum(offs_r, n - 1).to(tl.int64)
    q = tl.load(Q + rows).to(ACC)
    row_base = rows[:, None] * m  # int64: n * m may pass 2^31
    stored = offs_r < n
    if ONLINE:
        stored = stored & (tl.load(Lse + rows) == float("-inf"))
        active = tl.max(stored.to(tl.int32), axis=0) > 0
    else:
        active = tl.load(Bounded) != 0
    hi, lo, l_i, acc = _rows_sums(
        q, K, V, W, row_base, m, active, ACC, USE_EXP2, SCALE, BLOCK_R, BLOCK_M, ONLINE, True
    )
    if ONLINE:
        l_i = tl.where(stored, l_i, 1.0)
        lse = (hi.to(tl.float64) + lo.to(tl.float64)) * (1.0 / SCALE) + tl.log(l_i)
    else:
        kept = l_i >= ZERO_SHIFT_MIN
        l_i = tl.where(kept, l_i, 1.0)
        lse = tl.where(kept, tl.log(l_i), float("-inf"))
    tl.store(Out + offs_r, acc / l_i, mask=stored)
    tl.store(Lse + offs_r, lse, mask=stored)


@triton.jit
def _rows_shift_kernel(
    Q, K, W, Lse, Lh, Ll, Scale, n, m,
    ACC: tl.constexpr, USE_EXP2: tl.constexpr, SCALE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, EXACT_ABOVE: tl.constexpr,
):  # fmt: skip
    # ``_shift_kernel`` for the rows layout.
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows = tl.minimum(offs_r, n - 1).to(tl.int64)
    q = tl.load(Q + rows).to(ACC)
    lse = tl.load(Lse + rows)
    far = (offs_r < n) & (tl.abs(lse) > EXACT_ABOVE)
    active = tl.max(far.to(tl.int32), axis=0) > 0
    hi, lo, l_i, _ = _rows_sums(
        q, K, K, W, rows[:, None] * m, m, active, ACC, USE_EXP2, SCALE, BLOCK_R, BLOCK_M,
        True, False,
    )  # fmt: skip
    _store_shift(Lh, Ll, Scale, offs_r, offs_r < n, lse * SCALE, far, hi, lo, l_i, ACC)


@triton.jit
def _rows_bwd_kernel(
    Q, K, V, W, G, Out, Lh, Ll, Shift, DK, DV, DQ_PART, DW_PART, n, m, rows_per_group,
    ACC: tl.constexpr, USE_EXP2: tl.constexpr, SCALE: tl.constexpr,
    NEED_DQ: tl.constexpr, NEED_DK: tl.constexpr, NEED_DV: tl.constexpr,
    NEED_DW: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    # A program owns one (row group, column block). The probabilities come
    # straight from the saved lse, so every element is independent; dq needs
    # a sum over columns (one partial per column block) and dw a sum over
    # rows (one partial per row group). Both partial buffers are summed on
    # the host side in a fixed order: no atomics.
    num_col_blocks = tl.cdiv(m, BLOCK_M)
    pid = tl.program_id(0)
    grp = (pid // num_col_blocks).to(tl.int64)
    cb = (pid % num_col_blocks).to(tl.int64)
    offs_m = cb * BLOCK_M + tl.arange(0, BLOCK_M)
    c_mask = offs_m < m
    w = tl.load(W + offs_m, mask=c_mask, other=0.0).to(ACC)
    c2 = (w * (-0.5 * SCALE))[None, :]
    dw_acc = tl.zeros([BLOCK_M], tl.float64)

    row_lo = grp * rows_per_group
    row_hi = tl.minimum(row_lo + rows_per_group, n)
    for r0 in range(row_lo, row_hi, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < row_hi
        q = tl.load(Q + offs_r, mask=r_mask, other=0.0).to(ACC)
        g = tl.load(G + offs_r, mask=r_mask, other=0.0).to(ACC)
        y = tl.load(Out + offs_r, mask=r_mask, other=0.0).to(ACC)
        lse_hi = tl.load(Lh + offs_r, mask=r_mask, other=0.0)
        lse_lo = tl.load(Ll + offs_r, mask=r_mask, other=0.0)
        mask = r_mask[:, None] & c_mask[None, :]
        idx = offs_r[:, None] * m + offs_m[None, :]
        k = tl.load(K + idx, mask=mask, other=0.0).to(ACC)
        v = tl.load(V + idx, mask=mask, other=0.0).to(ACC)
        diff = q[:, None] - k
        dist2 = diff * diff
        p = _exp(tl.fma(dist2, c2, -lse_hi[:, None]) - lse_lo[:, None], USE_EXP2)
        p = tl.where(mask, p, 0.0)
        gp = p * g[:, None]
        if NEED_DV:
            tl.store(DV + idx, gp, mask=mask)
        # t_ij = p_ij (g_i v_ij - g_i y_i)
        t = gp * (v - y[:, None])
        if NEED_DK or NEED_DQ:
            dk = t * w[None, :] * diff
            if NEED_DK:
                tl.store(DK + idx, dk, mask=mask)
            if NEED_DQ:
                tl.store(DQ_PART + cb * n + offs_r, -tl.sum(dk, axis=1), mask=r_mask)
        if NEED_DW:
            shift = tl.load(Shift + offs_r, mask=r_mask, other=0.0).to(ACC)
            dw_acc += _sum64(t * (dist2 - shift[:, None]))
    if NEED_DW:
        tl.store(DW_PART + grp * m + offs_m, -0.5 * dw_acc, mask=c_mask)


@triton.jit
def _rows_tangent_kernel(
    Q, K, V, W, DQ, DK, DV, DW, Y, Lh, Ll, Scale, DY, n, m,
    ACC: tl.constexpr, USE_EXP2: tl.constexpr, SCALE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    # dy_i = sum_j p_ij (dV_ij + ds_ij (V_ij - y_i)),
    # ds_ij = -(dw_j / 2) d_ij^2 - w_j (q_i - K_ij)(dq_i - dK_ij).
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows = tl.minimum(offs_r, n - 1).to(tl.int64)
    q = tl.load(Q + rows).to(ACC)
    dq = tl.load(DQ + rows).to(ACC)
    y = tl.load(Y + rows).to(ACC)
    lse_hi, lse_lo = tl.load(Lh + rows), tl.load(Ll + rows)
    row_base = rows[:, None] * m
    acc = tl.zeros([BLOCK_R], tl.float64)
    for start in range(0, m, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        c_mask = offs_m < m
        mask = c_mask[None, :]
        idx = row_base + offs_m[None, :]
        k = tl.load(K + idx, mask=mask, other=0.0).to(ACC)
        v = tl.load(V + idx, mask=mask, other=0.0).to(ACC)
        dk = tl.load(DK + idx, mask=mask, other=0.0).to(ACC)
        dv = tl.load(DV + idx, mask=mask, other=0.0).to(ACC)
        w = tl.load(W + offs_m, mask=c_mask, other=0.0).to(ACC)[None, :]
        dw = tl.load(DW + offs_m, mask=c_mask, other=0.0).to(ACC)[None, :]
        diff = q[:, None] - k
        dist2 = diff * diff
        p = _exp(tl.fma(dist2, w * (-0.5 * SCALE), -lse_hi[:, None]) - lse_lo[:, None], USE_EXP2)
        ds = -0.5 * dw * dist2 - w * diff * (dq[:, None] - dk)
        acc += tl.sum(tl.where(mask, p * (dv + ds * (v - y[:, None])), 0.0), axis=1).to(tl.float64)
    tl.store(DY + offs_r, acc * tl.load(Scale + rows).to(tl.float64), mask=offs_r < n)


# Autotuned twins for the GPU; the interpreter calls the plain kernels with
# INTERPRET_CONFIGS.
def _shared_tuning(configs, kernel):
    def tune(fn):
        # The key holds every flag of fn's that changes the pruned list.
        flags = [f for f in ("HAS_SKIP", "NEED_DK", "NEED_DV", "NEED_DW") if f in fn.arg_names]
        return triton.autotune(
            configs,
            key=["n", "m", "D", "C", "SPARSE", *flags],
            prune_configs_by={"early_config_prune": functools.partial(_prune, kernel=kernel)},
        )(fn)

    return tune


_TUNED = {
    _fwd_kernel: _shared_tuning(QUERY_CONFIGS, "fwd")(_fwd_kernel),
    _dq_kernel: _shared_tuning(QUERY_CONFIGS, "dq")(_dq_kernel),
    _tangent_kernel: _shared_tuning(TANGENT_CONFIGS, "tangent")(_tangent_kernel),
    _dkv_kernel: _shared_tuning(KEY_CONFIGS, "dkv")(_dkv_kernel),
    _rows_fwd_kernel: triton.autotune(ROWS_FWD_CONFIGS, key=["n", "m"])(_rows_fwd_kernel),
    _rows_tangent_kernel: triton.autotune(
        ROWS_FWD_CONFIGS,
        key=["n", "m"],
        prune_configs_by={"early_config_prune": _prune_rows_tangent},
    )(_rows_tangent_kernel),
    _rows_bwd_kernel: triton.autotune(ROWS_BWD_CONFIGS, key=["n", "m"])(_rows_bwd_kernel),
}


# ---------------------------------------------------------------------------
# Launch helpers
# ---------------------------------------------------------------------------


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _dot_policy(dtype, d, c):
    """Which products run through tl.dot: (cross term q.k, p @ v).

    q.k only for half-precision inputs: in float32 the expansion
    ||q||^2 + ||k||^2 - 2 q.k loses digits to cancellation when the points sit
    far from the origin relative to their spread, so float32/float64 keep the
    exact difference form. p @ v is a plain weighted sum and runs on tensor
    cores for any dtype but float64 (3xTF32 keeps float32 accuracy).
    """
    half = dtype in (torch.float16, torch.bfloat16)
    return half and d >= 16, dtype != torch.float64 and c >= 16


def _scalar_meta(dtype):
    is64 = dtype == torch.float64
    return {
        "ACC": tl.float64 if is64 else tl.float32,
        "USE_EXP2": not is64,
        "SCALE": 1.0 if is64 else LOG2E,
    }


def _meta(dtype, d, c):
    use_dot_qk, use_dot_pv = _dot_policy(dtype, d, c)
    return {
        **_scalar_meta(dtype),
        "USE_DOT_QK": use_dot_qk,
        "USE_DOT_PV": use_dot_pv,
        # Products with a computed float32 operand (p, t, a): TF32 for half
        # inputs (as precise as the inputs, with float32 range), 3xTF32 for
        # float32 inputs (about float32 accuracy).
        "DOT_PREC": "tf32" if dtype in (torch.float16, torch.bfloat16) else "tf32x3",
        "BLOCK_D": triton.next_power_of_2(d),
        "BLOCK_C": triton.next_power_of_2(c),
    }


def _launch(kernel, side, count, args, meta, sparse_items=None, exact=False):
    """Run ``kernel`` over blocks of ``count`` points (per batch element) with
    the interpreter's fixed config for ``side``, else autotuned; ``exact``: a
    pass that redoes rows, at ``_exact_config``. A sparse pass has one program
    per plan item."""
    owned = "BLOCK_M" if side == "key" else "BLOCK_N"
    batch = args[0].shape[0]

    def grid(cfg):
        return (
            sparse_items if sparse_items is not None else batch * triton.cdiv(count, cfg[owned]),
        )

    if exact or _interpreting():
        cfg = _exact_config(side) if exact else INTERPRET_CONFIGS[side]
        kernel[grid(cfg)](*args, **meta, **cfg)
    else:
        _TUNED[kernel][lambda cfg: grid(cfg)](*args, **meta)


def _key_scale(w, dtype):
    """c_j = -(SCALE / 2) w_j (B, m), in the accumulator dtype: the constant of
    a pair's exponent c_j d_ij^2, computed once per key rather than per pair,
    and rounded alike for every pass (the backward's weights must match the
    forward's exactly where scores are huge)."""
    return (w.to(accumulator_dtype(dtype)) * (-0.5 * _scalar_meta(dtype)["SCALE"])).contiguous()


def _bounded(w):
    """True per batch element where every w >= 0, so every score is <= 0 and
    the forward may shift by 0."""
    return (w >= 0).all(-1)


def _empty_shifts(lse, dtype):
    acc = accumulator_dtype(dtype)
    return [torch.empty(lse.shape, dtype=acc, device=lse.device) for _ in range(3)]


def _shifts(q, k, w, lse, spans, dtype, d, exact=True):
    """(high, low, scale), each (B, n), of the weights scale_i 2**(fma(d^2, c,
    -high) - low) that the backward and the tangent recompute (``_shift_kernel``).
    The passes that take g fold scale into it (and so into delta). ``exact``
    False: a shard of a larger softmax, whose lse (the whole problem's) its own
    keys cannot recompute; the split lse is all there is."""
    B, n = lse.shape
    meta = _meta(dtype, d, 1)
    high, low, scale = _empty_shifts(lse, dtype)
    _launch(
        _shift_kernel,
        "query",
        n,
        (q, k, _key_scale(w, dtype), spans.skip, spans.key_ptr, spans.key_spans, lse)
        + (high, low, scale)
        + (n, k.shape[1]),
        {
            **{key: meta[key] for key in ("ACC", "USE_EXP2", "SCALE", "USE_DOT_QK", "DOT_PREC")},
            "BLOCK_D": meta["BLOCK_D"],
            "D": d,
            "HAS_SKIP": spans.has_skip,
            "SPARSE": spans.sparse,
            "EXACT_ABOVE": EXACT_SHIFT_ABOVE[accumulator_dtype(dtype)] * LN2
            if exact
            else float("inf"),
        },
        spans.items("query"),
        exact=True,
    )
    return high, low, scale


def _fold_low(g, delta, lse_hi, lse_lo, dot_pv):
    """(folded, g, delta, low, far_before) for the key-side backward, whose
    programs stream rows: in float32, each row that is not far (``_low_outside``'s
    test) has its weights' factor 2**-low folded into its g and delta, and its
    low set to 0, so that a span of such rows leaves the subtraction out of the
    tile loop; far_before (B, n + 1) counts the far rows before each row, which
    tells a span whether it holds one (``_far_rows_in``). float64's and half
    precision's rows (a fold would round g to half precision) are unchanged,
    and so are those of a pass whose p @ v runs on tensor cores (``dot_pv``,
    c >= 16), where the second tile loop would cost registers: at d = c = 32
    with exclude_self, its one config spilled inside the loop."""
    if g.dtype != torch.float32 or dot_pv:
        return False, g, delta, lse_lo, lse_lo
    near = lse_hi.abs() < LOW_OUTSIDE_BELOW.value
    factor = torch.where(near, torch.exp2(-lse_lo), 1.0)
    far_before = torch.nn.functional.pad(torch.cumsum(~near, -1, dtype=torch.int32), (1, 0))
    low = torch.where(near, 0.0, lse_lo)
    return True, (g * factor[..., None]).contiguous(), delta * factor, low, far_before


def _plan_blocks():
    """(query block, key block) of a block-sparse plan: what a program owns."""
    if _interpreting():
        return INTERPRET_CONFIGS["query"]["BLOCK_N"], INTERPRET_CONFIGS["key"]["BLOCK_M"]
    return SPARSE_BLOCK, SPARSE_BLOCK


def _dw(dw_keys, w, expanded=None):
    """The per-key sums as w's gradient: summed over keys for a shared w, with
    the expanded pairs' share (B,) where the plan has one."""
    if w.shape[-1] == 1:
        dw_keys = dw_keys.double().sum(-1, keepdim=True)
    if expanded is not None:
        dw_keys = dw_keys + expanded[:, None]
    return dw_keys.to(w.dtype)


class _Spans:
    """A plan on the device: its arrays, and whether it is sparse at all."""

    def __init__(self, plan, diagonal, B, n, m, device):
        self.plan = plan
        self.sparse = plan is not None
        on = torch.device(device)
        if self.sparse:
            self.key_ptr, self.key_spans, self.query_ptr, self.query_spans = (
                torch.from_numpy(a).to(on)
                for a in (plan.key_ptr, plan.key_spans, plan.query_ptr, plan.query_spans)
            )
        else:
            self.key_ptr = self.key_spans = self.query_ptr = self.query_spans = torch.zeros(
                1, dtype=torch.int64, device=on
            )
        skip, skipped_by = blocks.skips(plan, diagonal, B, n, m)
        self.has_skip = diagonal is not None
        self.skip = torch.from_numpy(skip).to(on)
        self.skipped_by = torch.from_numpy(skipped_by).to(on)
        self.rows_kept = torch.from_numpy(m - (skip >= 0)).to(on)

    def items(self, side):
        if not self.sparse:
            return None
        return len(self.plan.key_ptr if side == "query" else self.plan.query_ptr) - 1


def make_plan(query, key, w, diagonal, tolerance):
    """The block-sparse plan (with expansions of far key boxes where they
    apply, ``far``), or None for a dense pass."""
    q_block, k_block = _plan_blocks()
    points = functools.cache(lambda: blocks.survey(query, key, w))  # read once, if at all
    if far.applies(query, key, w, tolerance, points):
        return far.plan(query, key, w, tolerance, diagonal is not None, q_block, k_block)
    return blocks.plan(query, key, w, tolerance, diagonal is not None, q_block, k_block, points)


def forward(query, key, value, w, diagonal, tolerance):
    B, n, d = query.shape
    m, c = key.shape[1], value.shape[2]
    plan = make_plan(query, key, w, diagonal, tolerance)
    (q,) = blocks.queries_in_order(plan, query)
    k, v, w = blocks.keys_in_order(plan, key, value, per_key(w, m))
    spans = _Spans(plan, diagonal, B, n, m, query.device)
    out = torch.empty((B, n, c), dtype=query.dtype, device=query.device)
    lse = torch.empty((B, n), dtype=torch.float64, device=query.device)
    ck = _key_scale(w, query.dtype)
    args = (q, k, v, ck, _bounded(w), spans.skip, spans.key_ptr, spans.key_spans, out, lse)
    meta = {**_meta(query.dtype, d, c), "HAS_SKIP": spans.has_skip, "SPARSE": spans.sparse}
    # Shift 0 where every w >= 0, then the exact online softmax for the rows
    # that is not enough for (their programs alone stream keys).
    for online in (False, True):
        _launch(
            _fwd_kernel,
            "query",
            n,
            args + (n, m, d, c),
            {**meta, "ONLINE": online},
            spans.items("query"),
            exact=online,
        )
    if plan is not None and plan.far is not None:
        triton_fgt.forward(plan, q, k, v, spans.skip, spans.has_skip, out, lse)
    out, lse = blocks.queries_back(plan, out, lse)
    return out, lse, blocks.pack(plan, B, n, m)


def backward(grad_out, query, key, value, w, out, lse, diagonal, packed, needs, keys=None):
    need_q, need_k, need_v, need_w = (bool(x) for x in needs)
    B, n, d = query.shape
    m, c = key.shape[1], value.shape[2]
    dtype, device = query.dtype, query.device
    plan = blocks.unpack(packed, far.Far)
    q, g, out, lse = blocks.queries_in_order(plan, query, grad_out, out, lse)
    k, v, w_keys = blocks.keys_in_order(plan, key, value, per_key(w, m))
    spans = _Spans(plan, diagonal, B, n, m, device)
    acc = accumulator_dtype(dtype)
    shift = distance_shift(lse, w, spans.rows_kept if keys is None else keys)
    far_dq = far_dk = far_dv = far_dw = None  # the expanded pairs' shares (float64)
    every_pair = spans  # what a row's exact shift sweeps: the expanded pairs too
    if plan is not None and plan.far is not None:
        far_dq, far_dk, far_dv, far_dw = triton_fgt.backward_shares(
            plan, (need_q, need_k, need_v, need_w), q, g, k, v, w, out, lse, shift,
            spans.skip, spans.skipped_by, spans.has_skip,
        )  # fmt: skip
        every_pair = _Spans(far.as_direct(plan, n, m), diagonal, B, n, m, device)
    lse_hi, lse_lo, scale = _shifts(q, k, w_keys, lse, every_pair, dtype, d, exact=keys is None)
    g = (g * scale[..., None].to(dtype)).contiguous()
    # delta_i = g_i . y_i, the per-query term of t_ij; O(n c), done once here
    # so neither pass has to rebuild it.
    delta = (g.to(acc) * out.to(acc)).sum(-1).contiguous()
    meta = {**_meta(dtype, d, c), "HAS_SKIP": spans.has_skip, "SPARSE": spans.sparse}
    ck = _key_scale(w_keys, dtype)
    dq = dk = dv = dw = None
    if need_q:
        dq = torch.empty_like(q)
        _launch(
            _dq_kernel,
            "query",
            n,
            (q, k, v, ck, g, lse_hi, lse_lo, delta, spans.skip, spans.key_ptr)
            + (spans.key_spans, dq, n, m, d, c),
            meta,
            spans.items("query"),
        )
        if far_dq is not None:
            dq = (dq + far_dq).to(dtype)
        (dq,) = blocks.queries_back(plan, dq)
    if need_k or need_v or need_w:
        # Unneeded outputs get a stand-in pointer that the kernel never touches.
        dk = torch.empty_like(k) if need_k else k
        dv = torch.empty_like(v) if need_v else v
        # float32 partial sums per key: summed in float64 for a shared w.
        dw_keys = torch.empty(w_keys.shape, dtype=acc, device=device) if need_w else w_keys
        folded, g_keys, delta_keys, low_keys, far_before = _fold_low(
            g, delta, lse_hi, lse_lo, meta["USE_DOT_PV"]
        )
        _launch(
            _dkv_kernel,
            "key",
            m,
            (q, k, v, ck, g_keys, lse_hi, low_keys, far_before, delta_keys, shift.to(acc))
            + (spans.skip, spans.skipped_by, spans.query_ptr, spans.query_spans)
            + (dk, dv, dw_keys, n, m, d, c),
            {
                **meta,
                "LOW_FOLDED": folded,
                "NEED_DK": need_k,
                "NEED_DV": need_v,
                "NEED_DW": need_w,
            },
            spans.items("key"),
        )
        if far_dk is not None:
            dk = (dk + far_dk).to(dtype)
        if far_dv is not None:
            dv = (dv + far_dv).to(dtype)
        dk, dv, dw_keys = blocks.keys_back(plan, dk, dv, dw_keys)
        dw = _dw(dw_keys, w, far_dw) if need_w else None
    return dq, dk if need_k else None, dv if need_v else None, dw


def tangent(query, key, value, w, tangents, out, lse, diagonal, packed):
    B, n, d = query.shape
    m, c = key.shape[1], value.shape[2]
    zeros = (
        torch.zeros_like(x) if t is None else t for t, x in zip(tangents, (query, key, value, w))
    )
    dq, dk, dv, dw = zeros
    plan = far.as_direct(blocks.unpack(packed, far.Far), n, m)
    q, dq, y, lse = blocks.queries_in_order(plan, query, dq, out, lse)
    k, dk, v, dv, w, dw = blocks.keys_in_order(
        plan, key, dk, value, dv, per_key(w, m), per_key(dw, m)
    )
    spans = _Spans(plan, diagonal, B, n, m, query.device)
    lse_hi, lse_lo, scale = _shifts(q, k, w, lse, spans, query.dtype, d)
    dy = torch.empty_like(y)
    _launch(
        _tangent_kernel,
        "query",
        n,
        (q, k, v, _key_scale(w, query.dtype), dq, dk, dv, dw, y, lse_hi, lse_lo, scale)
        + (spans.skip, spans.key_ptr)
        + (spans.key_spans, dy, n, m, d, c),
        {
            **_scalar_meta(query.dtype),
            "BLOCK_C": triton.next_power_of_2(c),
            "HAS_SKIP": spans.has_skip,
            "SPARSE": spans.sparse,
        },
        spans.items("query"),
    )
    return blocks.queries_back(plan, dy)[0]


# ---------------------------------------------------------------------------
# Rows layout
# ---------------------------------------------------------------------------


def _launch_rows(kernel, name, rows, args, meta, exact=False):
    if exact or _interpreting():
        cfg = _exact_config(name) if exact else INTERPRET_CONFIGS[name]
        kernel[(triton.cdiv(rows, cfg["BLOCK_R"]),)](*args, **meta, **cfg)
    else:
        _TUNED[kernel][lambda cfg: (triton.cdiv(rows, cfg["BLOCK_R"]),)](*args, **meta)


def _row_shifts(query, keys, w, lse):
    """``_shifts`` for the rows layout (w per key)."""
    n, m = keys.shape
    high, low, scale = _empty_shifts(lse, query.dtype)
    _launch_rows(
        _rows_shift_kernel,
        "rows_fwd",
        n,
        (query, keys, w, lse, high, low, scale, n, m),
        {
            **_scalar_meta(query.dtype),
            "EXACT_ABOVE": EXACT_SHIFT_ABOVE[accumulator_dtype(query.dtype)] * LN2,
        },
        exact=True,
    )
    return high, low, scale


def forward_rows(query, keys, values, w):
    n, m = keys.shape
    w = per_key(w, m)
    out = torch.empty((n,), dtype=query.dtype, device=query.device)
    lse = torch.empty((n,), dtype=torch.float64, device=query.device)
    # As ``forward``: shift 0, then the rows that needs redone exactly.
    for online in (False, True):
        _launch_rows(
            _rows_fwd_kernel,
            "rows_fwd",
            n,
            (query, keys, values, w, _bounded(w), out, lse, n, m),
            {**_scalar_meta(query.dtype), "ONLINE": online},
            exact=online,
        )
    return out, lse


def tangent_rows(query, keys, values, w, tangents, out, lse):
    n, m = keys.shape
    dq, dK, dV, dw = (
        torch.zeros_like(x) if t is None else t for t, x in zip(tangents, (query, keys, values, w))
    )
    dy = torch.empty_like(out)
    w = per_key(w, m)
    lse_hi, lse_lo, scale = _row_shifts(query, keys, w, lse)
    _launch_rows(
        _rows_tangent_kernel,
        "rows_fwd",
        n,
        (query, keys, values, w, dq, dK, dV, per_key(dw, m), out, lse_hi, lse_lo, scale, dy)
        + (n, m),
        _scalar_meta(query.dtype),
    )
    return dy


def _rows_bwd_block_m():
    return INTERPRET_CONFIGS["rows_bwd"]["BLOCK_M"] if _interpreting() else ROWS_BWD_BLOCK_M


def _row_groups(n, m, block_m):
    """(groups, rows per group) for the rows backward, from the shape only.

    The count of dw partials must not depend on the autotuned config, so the
    buffers can be sized before launch and results repeat across configs.
    """
    col_blocks = triton.cdiv(m, block_m)
    groups = max(
        1, min(triton.cdiv(ROWS_BWD_TARGET_PROGRAMS, col_blocks), triton.cdiv(n, ROW_ALIGN))
    )
    rows_per_group = triton.cdiv(triton.cdiv(n, groups), ROW_ALIGN) * ROW_ALIGN
    return triton.cdiv(n, rows_per_group), rows_per_group


def backward_rows(grad_out, query, keys, values, w, out, lse, needs):
    need_q, need_k, need_v, need_w = (bool(x) for x in needs)
    n, m = keys.shape
    dtype, dev = query.dtype, query.device
    w_keys = per_key(w, m)
    dk = torch.empty_like(keys) if need_k else None
    dv = torch.empty_like(values) if need_v else None
    acc = accumulator_dtype(dtype)
    block_m = _rows_bwd_block_m()
    col_blocks = triton.cdiv(m, block_m)
    groups, rows_per_group = _row_groups(n, m, block_m)
    dq_part = torch.empty((col_blocks, n), dtype=acc, device=dev) if need_q else lse
    dw_part = torch.empty((groups, m), dtype=acc, device=dev) if need_w else lse
    meta = {
        **_scalar_meta(dtype),
        "NEED_DQ": need_q,
        "NEED_DK": need_k,
        "NEED_DV": need_v,
        "NEED_DW": need_w,
        "BLOCK_M": block_m,
    }
    lse_hi, lse_lo, scale = _row_shifts(query, keys, w_keys, lse)
    grad_out = grad_out * scale.to(dtype)
    args = (query, keys, values, w_keys, grad_out, out, lse_hi, lse_lo)
    args += (distance_shift(lse, w, m).to(acc),)
    args += (
        dk if need_k else keys,
        dv if need_v else values,
        dq_part,
        dw_part,
        n,
        m,
        rows_per_group,
    )
    if _interpreting():
        cfg = INTERPRET_CONFIGS["rows_bwd"]
        _rows_bwd_kernel[(groups * col_blocks,)](*args, **{**meta, "BLOCK_R": cfg["BLOCK_R"]})
    else:
        _TUNED[_rows_bwd_kernel][(groups * col_blocks,)](*args, **meta)
    dq = dq_part.sum(0).to(dtype) if need_q else None
    dw = _dw(dw_part.double().sum(0), w) if need_w else None
    return dq, dk, dv, dw
