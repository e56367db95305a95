"""Vectorisable scalar helpers for the Numba kernels: ``exp2`` (and ``exp2_flush``),
``fmax``, ``fma``, ``mul``, ``sub``.

Numba's ``math.exp`` is a scalar libm call, which stops LLVM from vectorising
the loop around it. ``exp2`` here is a branch-free polynomial with an exponent
bit shift, written so that LLVM turns a loop of calls into SIMD code (8 or 16
float32 lanes). ``fmax`` is ``llvm.maximum``: Numba emits ``a if a > b else b``
as a select without fast-math flags, and LLVM will not vectorise that as a max
reduction. ``fma`` is ``llvm.fma``: one rounding whatever the fast-math flags of
the caller, so that every kernel computes a score from the same operands to the
same bits (the backward recomputes the forward's weights from its lse).
"""

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

# Minimax (relative error) polynomials for 2**f on [-1/2, 1/2], lowest degree
# first. float32: 7.5e-8 before rounding; float64: 3e-18 before rounding.
_POLY32 = (
    1.0000000716546416382,
    0.69314696706526492761,
    0.24022119723969178047,
    0.05550713272875391178,
    0.0096755413310213911451,
    0.0013276472167819943329,
)
_POLY64 = (
    0.9999999999999999971,
    0.69314718055994533046,
    0.24022650695910156205,
    0.055504108664819921483,
    0.0096181291075883350833,
    0.0013333558146789950323,
    0.00015403530462514613026,
    0.0000152527334899608046,
    1.3215433089594629037e-6,
    1.0178198033328527662e-7,
    7.0741056262456593708e-9,
    4.4352809446103361611e-10,
)

# (int bits, mantissa bits, exponent bias) per float type
_LAYOUT = {types.float32: (32, 23, 127), types.float64: (64, 52, 1023)}
# exp2_flush is 0 below 2**FLUSH_EXPONENT[dtype name], -(bias - mantissa bits - 4).
FLUSH_EXPONENT = {str(t): mant + 4 - bias for t, (_, mant, bias) in _LAYOUT.items()}


@intrinsic
def _pow2_of_biased(typingctx, t):
    """2.0**r for t = 1.5 * 2**mant + bias + r, r an integer in [-bias, bias].

    Adding 1.5 * 2**mant + bias to x leaves r + bias, r = x rounded to an
    integer, in the low mantissa bits of t. The bits of 1.5 * 2**mant are 0
    in the lowest (nbits - mant), so shifting left by the mantissa width
    leaves r + bias in the exponent field and nothing else: one shift and no
    add of the bias. r = -bias gives +0.0. An LLVM bitcast rather than a
    memory round trip keeps this vectorisable.
    """
    if t not in _LAYOUT:
        return None
    nbits, mant, _ = _LAYOUT[t]

    def codegen(context, builder, sig, args):
        ity = ir.IntType(nbits)
        bits = builder.shl(builder.bitcast(args[0], ity), ir.Constant(ity, mant))
        return builder.bitcast(bits, args[0].type)

    return t(t), codegen


@intrinsic
def fmax(typingctx, a, b):
    """max(a, b), NaN if either is NaN (``llvm.maximum``); vectorises as a
    reduction without fast-math flags, unlike Numba's ``max``."""
    if a != b or a not in _LAYOUT:
        return None

    def codegen(context, builder, sig, args):
        ty = args[0].type
        fn = builder.module.declare_intrinsic("llvm.maximum", [ty], ir.FunctionType(ty, [ty, ty]))
        return builder.call(fn, args)

    return a(a, a), codegen


@intrinsic
def fma(typingctx, a, b, c):
    """a * b + c rounded once (``llvm.fma``); vectorises to FMA instructions."""
    if not (a == b == c) or a not in _LAYOUT:
        return None

    def codegen(context, builder, sig, args):
        ty = args[0].type
        fn = builder.module.declare_intrinsic("llvm.fma", [ty], ir.FunctionType(ty, [ty] * 3))
        return builder.call(fn, args)

    return a(a, a, a), codegen


def _rounded_once(opname):
    """An intrinsic for ``a <op> b`` rounded on its own: the instruction carries
    one harmless flag (arcp), so Numba's fast-math pass, which only flags
    instructions that have none, leaves it without ``contract`` and
    ``reassoc``. LLVM then neither fuses it into an FMA nor regroups it."""

    @intrinsic
    def op(typingctx, a, b):
        if a != b or a not in _LAYOUT:
            return None

        def codegen(context, builder, sig, args):
            return getattr(builder, opname)(*args, flags=("arcp",))

        return a(a, a), codegen

    return op


mul = _rounded_once("fmul")
sub = _rounded_once("fsub")


def exp2(x):
    """2.0**x for x <= 0 (up to rounding), vectorisable; NaN gives NaN, -inf
    gives 0, and so does x at or below -(bias - 1/2) (-126.5 in float32).
    From there to -(bias - 1), the smallest normal number's exponent, the
    results are subnormal."""
    raise NotImplementedError("exp2 is only callable from Numba-compiled code")


def exp2_flush(x):
    """``exp2``, but exactly 0 below 2**-(bias - mantissa bits - 4) (2**-100 in
    float32, 2**-967 in float64), for weights that are fractions of their row's
    total: a key that light moves no sum it enters past the dtype's rounding
    (unless every other term of the sum is 0), and a 0 keeps its products
    (weight times residual, times distance) out of subnormal numbers, which
    the FMA pipes of the project's Zen 4 machine handle slowly (the key-side
    backward, d = 3, dense: 1.4x its time where a bandwidth puts a few percent
    of the pairs in that range)."""
    raise NotImplementedError("exp2_flush is only callable from Numba-compiled code")


def exp2_below(x, cut):
    """``exp2_flush`` with a cut of the caller's: exactly 0 where x < cut (or x
    is -inf), for a weight whose row's normalisation lies outside x, so that
    it flushes the same share of its row as ``exp2_flush`` of the normalised
    x. ``cut`` must lie at or above -(bias - 2) (-125 in float32), where the
    scale is still an exponent."""
    raise NotImplementedError("exp2_below is only callable from Numba-compiled code")


def _constants(x):
    """(scalar type, polynomial coefficients, rounding constant) of ``exp2``
    for float type x. t = x + magic rounds x + bias to an integer
    (``_pow2_of_biased``); bias is odd, so a tie x = k + 1/2 rounds to the odd
    neighbour: f = +-1/2, accurate either way."""
    nbits, mant, bias = _LAYOUT[x]
    npt = np.float32 if x == types.float32 else np.float64
    coef = tuple(npt(c) for c in (_POLY32 if nbits == 32 else _POLY64))
    return npt, coef, npt(1.5 * 2.0**mant + bias)


def _exp2_of(x, flush):
    """The polynomial ``exp2`` for float type x: its values clamped at -bias,
    where the scale is exactly 0 (``flush`` 0), or 0 wherever x lies below
    -(bias - flush), the scale then masked instead of clamped (a compare in
    place of the max: no more instructions)."""
    npt, coef, magic = _constants(x)
    bias = _LAYOUT[x][2]
    lo = npt(-bias)
    below = npt(flush - bias)
    zero = npt(0)
    clamp = not flush  # a constant of the compiled function: one branch of each if remains

    def impl(x):
        if clamp:
            # written this way round so that a NaN x passes through
            x = lo if x < lo else x
        t = x + magic
        f = x - (t - magic)  # in [-1/2, 1/2]
        p = coef[-1]
        for c in coef[-2::-1]:
            p = p * f + c
        if clamp:
            return p * _pow2_of_biased(t)
        # below the cut (or -inf) t's bits are no exponent: the select drops
        # them; a NaN x fails the compare and passes through
        return zero if x < below else p * _pow2_of_biased(t)

    return impl


# No 'reassoc' here: it would let LLVM fold (x + magic) - magic back to x.
@overload(exp2, jit_options={"fastmath": {"contract"}, "cache": True})
def _exp2_impl(x):
    if x in _LAYOUT:
        return _exp2_of(x, 0)
    return None


@overload(exp2_flush, jit_options={"fastmath": {"contract"}, "cache": True})
def _exp2_flush_impl(x):
    if x in _LAYOUT:
        return _exp2_of(x, _LAYOUT[x][2] + FLUSH_EXPONENT[str(x)])
    return None


@overload(exp2_below, jit_options={"fastmath": {"contract"}, "cache": True})
def _exp2_below_impl(x, cut):
    if x not in _LAYOUT or cut != x:
        return None
    npt, coef, magic = _constants(x)
    zero = npt(0)

    def impl(x, cut):
        # ``_exp2_of``'s masked value, its cut an argument
        t = x + magic
        f = x - (t - magic)
        p = coef[-1]
        for c in coef[-2::-1]:
            p = p * f + c
        return zero if x < cut else p * _pow2_of_biased(t)

    return impl
