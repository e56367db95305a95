"""What only the Numba backend has: its exp2, its SIMD loops, its threads."""

import os
import platform
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from numba import njit

import nwfast
from nwfast import testing
from nwfast.kernels import blocks, numba_nw
from nwfast.kernels.numba_exp import FLUSH_EXPONENT, exp2, exp2_below, exp2_flush


@njit(cache=True)
def _exp2_array(x, out):
    for i in range(x.size):
        out[i] = exp2(x[i])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp2_accuracy(dtype):
    tiny = np.finfo(dtype).tiny
    lowest = np.log2(tiny)
    x = np.linspace(lowest - 3, 0.25, 2_000_003).astype(dtype)
    # ties of the rounding to an integer (its two neighbours are as good), and
    # the last x that gives 0
    ties = np.arange(lowest + 0.5, 0.0, 1.0)
    edges = [0.0, -0.0, -1.0, lowest - 0.5, np.nextafter(dtype(lowest - 0.5), dtype(0))]
    x = np.concatenate([x, ties.astype(dtype), np.array(edges, dtype)])
    out = np.empty_like(x)
    _exp2_array(x, out)
    ref = np.exp2(x.astype(np.longdouble))
    normal = ref >= tiny
    rel = np.abs(out[normal] - ref[normal]) / ref[normal]
    assert rel.max() < (2.5e-7 if dtype == np.float32 else 4e-16)
    # below the normal range: flushed to 0, or within a couple of tiny of the truth
    assert np.all((out[~normal] >= 0) & (out[~normal] <= 2 * tiny))
    # 0 at and below -(bias - 1/2); subnormal from there to the smallest
    # normal's exponent
    zero = x <= lowest - dtype(0.5)
    assert np.all(out[zero] == 0)
    subnormal = ~zero & (x < lowest - dtype(0.01))
    assert subnormal.any() and np.all((out[subnormal] > 0) & (out[subnormal] < tiny))

    special = np.array([-np.inf, np.nan, -np.nan, -1e30], dtype)
    out = np.empty_like(special)
    _exp2_array(special, out)
    assert out[0] == 0 and np.isnan(out[1]) and np.isnan(out[2]) and out[3] == 0


@njit(cache=True)
def _exp2_flush_array(x, out):
    for i in range(x.size):
        out[i] = exp2_flush(x[i])


@pytest.mark.parametrize(("dtype", "cut"), [(np.float32, -100), (np.float64, -967)])
def test_exp2_flush_is_exp2_above_its_cut_and_0_below(dtype, cut):
    """The backward's weights: exp2 to the bit from 2**cut up, exactly 0 below
    it (so that products of a weight stay out of subnormal numbers), NaN kept."""
    x = np.linspace(cut - 40, 0.0, 1_000_001).astype(dtype)
    x = np.concatenate([x, np.array([cut, np.nextafter(dtype(cut), dtype(-np.inf))], dtype)])
    plain, flushed = np.empty_like(x), np.empty_like(x)
    _exp2_array(x, plain)
    _exp2_flush_array(x, flushed)
    above = x >= cut
    assert np.array_equal(flushed[above], plain[above])
    assert plain[above].min() >= dtype(2.0**cut) * 0.9999
    assert np.all(flushed[~above] == 0) and np.any(plain[~above] > 0)

    special = np.array([-np.inf, np.nan], dtype)
    out = np.empty_like(special)
    _exp2_flush_array(special, out)
    assert out[0] == 0 and np.isnan(out[1])


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="reads x86 assembly")
@njit(cache=True)
def _exp2_below_array(x, cut, out):
    for i in range(x.size):
        out[i] = exp2_below(x[i], cut[i])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp2_below_is_exp2_flush_with_its_cut_moved(dtype):
    """exp2_below(x, cut) is exp2_flush(x) bit for bit where cut is
    exp2_flush's own, and 0 below a higher cut; NaN passes through."""
    fixed = FLUSH_EXPONENT[np.dtype(dtype).name]
    x = np.linspace(fixed - 40, 0.5, 400_001).astype(dtype)
    x = np.concatenate([x, np.array([-np.inf, np.nan, 0.0, -0.0], dtype)])
    want, got = np.empty_like(x), np.empty_like(x)
    _exp2_flush_array(x, want)
    _exp2_below_array(x, np.full(x.size, fixed, dtype), got)
    assert np.array_equal(got.view(np.uint8), want.view(np.uint8))
    cut = np.full(x.size, fixed + 30.25, dtype)
    _exp2_below_array(x, cut, got)
    assert (got[x < cut] == 0).all() and np.isnan(got[np.isnan(x)]).all()
    kept = x >= cut
    assert np.array_equal(got[kept].view(np.uint8), want[kept].view(np.uint8))


def test_exp2_loop_is_vectorised():
    """The point of the polynomial: a loop of exp2 becomes packed SIMD code."""

    @njit(fastmath={"contract", "reassoc", "nsz", "arcp"})
    def total(x):
        s = x.dtype.type(0)
        for i in range(x.size):
            s += exp2(x[i])
        return s

    x = -np.arange(100, dtype=np.float32) / 7
    assert abs(total(x) - np.exp2(x.astype(np.float64)).sum()) < 1e-5
    asm = total.inspect_asm(total.signatures[0])
    # the polynomial's FMAs are the only FMAs here: packed ones mean SIMD exp2
    assert re.search(r"vfmadd\w*ps\s+%[yz]mm", asm), "exp2 loop was not vectorised"
    # its scale is one shift of the rounding's bits: no integer add of the bias
    assert re.search(r"vpslld\s+\$23, %[yz]mm", asm)
    assert not re.search(r"vpadd[dq]\s+\S+, %[yz]mm", asm), "exp2 adds the bias apart"


def test_float32_sums_stay_accurate_at_large_m():
    """Nearly flat weights over 200 000 keys, the longest sums, around a large mean:
    a float32 sum that drifted would show it."""
    q = torch.randn(3)
    k = torch.randn(200_000)
    v = torch.randn(200_000) + 10.0
    out = nwfast.nw_pool(q, k, v, 1e-3)
    testing.assert_ok(testing.check_pool(out, q, k, v, 1e-3))
    testing.assert_close(out, nwfast.nw_pool(q.double(), k.double(), v.double(), 1e-3), 1e-6)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_results_do_not_depend_on_the_thread_count(threads):
    """Every output element is summed by one work item in a fixed order."""
    q, k = torch.randn(2, 700, 2), torch.randn(2, 900, 2)
    v, w = torch.randn(2, 900, 2), torch.rand(2, 900) + 0.5
    leaves = [x.clone().requires_grad_() for x in (q, k, v, w)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = nwfast.nw_pool(*leaves)
        grads_one = torch.autograd.grad(one.sum(), leaves)
        torch.set_num_threads(threads)
        many = nwfast.nw_pool(*leaves)
        grads_many = torch.autograd.grad(many.sum(), leaves)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)
    assert all(torch.equal(a, b) for a, b in zip(grads_one, grads_many))


def test_work_items_cover_every_row_once():
    """The dense plan's spans: one per item, everything."""
    assert (
        numba_nw.make_plan(
            torch.zeros(3, 130, 1), torch.zeros(3, 70, 1), torch.ones(3, 1), None, 0.0
        )
        is None
    )
    plan = numba_nw._or_dense(None, 3, 130, 70)
    assert len(plan.key_ptr) - 1 == 3 * -(-130 // plan.q_block)
    assert (plan.key_spans == [0, 70]).all() and (plan.query_spans == [0, 130]).all()


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="reads x86 assembly")
def test_per_d_passes_are_vectorised(tmp_path):
    """Each per-d pass, at d = 3 with two channels, compiles to packed SIMD
    code as wide as the kernels' target takes (zmm where it drops LLVM's
    256-bit preference, ymm elsewhere): the tuple arithmetic left no inner loop
    in its way. The backward
    runs three ways: every gradient (the key-side pass with dq, at d = 3 and
    d = 1), dq alone and dw alone. (A fresh cache: Numba shows no assembly for
    cached code.)"""
    code = """
        import re, torch, nwfast
        from nwfast.kernels import numba_nw, numba_target
        wide = "-prefer-256-bit" in numba_target.features().split(",")
        regs = "zmm" if wide else "ymm"
        q, k = torch.rand(70, 3, requires_grad=True), torch.rand(90, 3, requires_grad=True)
        v, w = torch.randn(90, 2, requires_grad=True), torch.rand(90, requires_grad=True)
        nwfast.nw_pool(q, k, v, w).sum().backward()
        nwfast.nw_pool(q, k.detach(), v.detach(), w.detach()).sum().backward()
        nwfast.nw_pool(q.detach(), k.detach(), v.detach(), w).sum().backward()
        nwfast.nw_pool(q[:, :1], k[:, :1], v, w).sum().backward()
        for kernel, at in ((numba_nw._run, 3), (numba_nw._key_grads, 4)):
            for sig in kernel.signatures:
                asm = kernel.inspect_asm(sig)
                packed = len(re.findall(r"vfmadd\\w*ps\\s+%" + regs, asm))
                fields = dict(zip(sig[at].fields, sig[at].types))
                dq = "+dq" if len(fields.get("with_dq", ())) else ""
                print(sig[at].instance_class.__name__ + dq, packed)
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    packed = dict(line.split() for line in done.stdout.split("\n") if line)
    assert set(packed) == {"Pool", "QueryGrad", "KeyGrad", "KeyGrad+dq"}
    # the polynomial exp2 alone puts five packed FMAs in every vectorised loop
    assert all(int(count) >= 5 for count in packed.values()), packed


def test_kernels_target_is_numbas_cpu_without_the_256_bit_preference():
    """The kernels' target compiles for the features Numba's own CPU target
    has, less LLVM's prefer-256-bit tuning where the core has AVX-512 (Intel's
    server cores set it; it would halve their vectors), except on Skylake-SP's
    family. Numba's own target is left as it was."""
    from numba.core.registry import cpu_target

    from nwfast.kernels import numba_target

    codegen = cpu_target.target_context.codegen()
    numbas = codegen._tm_features
    ours = numba_target.features()
    assert "-prefer-256-bit" not in numbas.split(",")
    kept = codegen._get_host_cpu_name() in numba_target.KEEP_256_BIT
    if "+avx512f" in numbas.split(",") and not kept:
        assert ours == numbas + ",-prefer-256-bit"
    else:
        assert ours == numbas


def test_kernels_target_survives_a_reload():
    """Numba's registries take a target's name once: reloading the module
    keeps the first registration, and the kernels still compile for it."""
    import importlib

    from nwfast.kernels import numba_target

    before = numba_target.features()
    importlib.reload(numba_target)
    assert numba_target.features() == before

    @njit(_target=numba_target.NAME)
    def twice(x):
        return 2 * x

    assert twice(1.5) == 3.0


@pytest.mark.parametrize("d", [1, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tolerance", [0.0, 1e-6], ids=["dense", "block-sparse"])
def test_dq_from_the_key_side_pass(monkeypatch, d, dtype, tolerance):
    """With every gradient wanted, the key-side pass sums dq from the pairs it
    already weighs (one exp2 a pair for the whole backward) up to d = 3
    (DQ_FROM_KEYS_DIMS); at d = 4, or where its chunks' shares would not fit,
    dq is a pass of its own. Both within the policy, on leave-one-out clusters
    with per-key w, dense and block-sparse."""
    assert numba_nw.DQ_FROM_KEYS_DIMS == 3
    single = d <= numba_nw.DQ_FROM_KEYS_DIMS
    gen = torch.Generator().manual_seed(11)
    centres = torch.arange(6, dtype=dtype)[:, None] * torch.tensor(
        [1.0, 0.5, -0.7, 0.3][:d], dtype=dtype
    )
    q = centres[torch.arange(2 * 700) % 6]
    q = (q + 0.02 * torch.randn(1400, d, generator=gen, dtype=dtype)).reshape(2, 700, d)
    v = torch.randn(2, 700, 3, generator=gen, dtype=dtype)
    w = 300.0 + 200.0 * torch.rand(2, 700, generator=gen, dtype=dtype)
    upstream = torch.randn(2, 700, 3, generator=gen, dtype=dtype)
    monkeypatch.setattr(blocks, "MIN_SAVED", 0)  # plans at test sizes
    pairs = nwfast.pairs_computed(q, q, w, exclude_self=True, tolerance=tolerance)
    assert (pairs < 2 * 700 * 700) == (tolerance > 0)
    kernels = []
    parallel = numba_nw._parallel

    def recording(kernel, *args):
        kernels.append(kernel.__name__)
        return parallel(kernel, *args)

    monkeypatch.setattr(numba_nw, "_parallel", recording)

    def gradients():
        leaves = [x.clone().requires_grad_() for x in (q, q, v, w)]
        out = nwfast.nw_pool(*leaves, exclude_self=True, tolerance=tolerance)
        kernels.clear()
        grads = torch.autograd.grad(out, leaves, upstream)
        testing.assert_ok(
            *testing.check_pool_gradients(grads, q, q, v, w, upstream, exclude_self=True)
        )
        return grads, list(kernels)

    together, passes = gradients()
    assert sorted(passes) == (["_key_grads"] if single else ["_key_grads", "_run"])
    monkeypatch.setattr(numba_nw, "DQ_SHARES_BYTES", 0)
    apart, passes = gradients()
    assert sorted(passes) == ["_key_grads", "_run"]
    for a, b in zip(together, apart):
        testing.assert_close(a, b, 1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(("n", "m", "d", "loo"), [(700, 1093, 3, False), (1061, 1061, 1, True)])
def test_dense_backward_with_64_keys_an_item(n, m, d, loo, dtype, monkeypatch):
    """Where m reaches DEEP_KEY_ITEMS_FROM (lowered here) the dense key-side
    pass gives each work item 64 keys (the last one fewer), whose dq shares sum
    64 deep before the chunk's float64 dq: every gradient still matches the
    float64 reference."""
    monkeypatch.setattr(numba_nw, "DEEP_KEY_ITEMS_FROM", 1024)
    assert numba_nw._keys_per_item(n, m) == 64 and blocks.rows_per_item(n) < 64
    k = torch.rand(1, m, d, dtype=torch.float64).to(dtype)
    q = k if loo else torch.rand(1, n, d, dtype=torch.float64).to(dtype)
    v = torch.randn(1, m, 2, dtype=torch.float64).to(dtype)
    w = (200.0 + 100.0 * torch.rand(1, m, dtype=torch.float64)).to(dtype)
    upstream = torch.randn(1, n, 2, dtype=torch.float64).to(dtype)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, w)]
    out = nwfast.nw_pool(*leaves, exclude_self=loo, tolerance=0.0)
    grads = torch.autograd.grad(out, leaves, upstream)
    testing.assert_ok(*testing.check_pool_gradients(grads, q, k, v, w, upstream, loo))


def test_chunks_hold_every_work_item():
    """The key-side pass's chunks cover every item once, in order, the empty
    ones too: items after the last swept pair (keys whose pairs are all
    expanded) still write their zeros."""
    ptr = np.array([0, 1, 1, 3, 4, 4, 4, 4])
    spans = np.array([[0, 50], [0, 10], [20, 30], [5, 6]])
    work = numba_nw.sweep.Work(ptr, spans, 16, np.full((1, 7 * 16), -1))
    for count in (1, 3, 16):
        bounds = numba_nw._chunk_bounds(work, count)
        assert len(bounds) == count + 1 and bounds[0] == 0 and bounds[-1] == len(ptr) - 1
        assert (np.diff(bounds) >= 0).all()


def test_row_fold_takes_the_normalisation_out_of_the_loop():
    """Where every row's lse (log2 units) lies in FOLD_WINDOW the backward's fused
    passes take g times its rows' 2**-lse (rounded once from float64), delta from
    that g as from g, and each row's flush cut FLUSH_EXPONENT + lse; outside it,
    or where a scaled g would not be a normal number, they keep the lse pair."""
    lowest, highest = numba_nw.FOLD_WINDOW
    lse2 = np.array([[lowest, 0.0, 5.5, highest]])
    g = torch.tensor([[[1.0, 0.5], [-3.0, 0.0], [2.0, 7.0], [-1.5, 1e-3]]], dtype=torch.float32)
    out = torch.tensor([[[0.25, -1.0], [2.0, 3.0], [-0.5, 0.125], [1.0, 4.0]]], dtype=torch.float32)

    def fold(lse2, g=g):
        return numba_nw._row_fold(torch.from_numpy(lse2 / numba_nw.arrays.LOG2E), g, out)

    g_folded, delta, cut = fold(lse2)
    exact2 = lse2 / numba_nw.arrays.LOG2E * numba_nw.arrays.LOG2E
    want = (g.double().numpy() * np.exp2(-exact2)[..., None]).astype(np.float32)
    assert g_folded.dtype == torch.float32 and np.array_equal(g_folded.numpy(), want)
    assert np.array_equal(delta, numba_nw._delta_of(g_folded, out))
    assert cut.dtype == np.float32
    assert np.array_equal(cut, (exact2 + FLUSH_EXPONENT["float32"]).astype(np.float32))
    for outside in (lowest - 0.5, highest + 0.5, np.nan, -np.inf):
        assert fold(np.array([[0.0, outside, 5.5, 1.0]])) is None, outside
    for term in (1e-38, np.inf, np.nan):  # 1e-38 * 2**-32 is subnormal in float32
        assert fold(lse2, torch.where(g == 7.0, torch.tensor(term), g)) is None, term


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("rows", ["near", "one far", "tiny upstream"])
@pytest.mark.parametrize(
    ("d", "wanted", "passes"),
    [(2, "all", ["KeyGrad"]), (4, "all", ["KeyGrad", "QueryGrad"]), (2, "dq", ["QueryGrad"])],
    ids=["key side", "both passes", "dq alone"],
)
def test_backward_passes_with_and_without_the_fold(monkeypatch, d, wanted, passes, rows, dtype):
    """Rows near their keys take the fold (2**(c2 d^2) a pair, each row's 2**-lse
    in its g and delta) in the key-side pass and in dq's own; a query far from
    every key (lse below FOLD_WINDOW) or an upstream gradient the fold would make
    subnormal keeps the lse pair in the loop. Every gradient matches the float64
    reference either way, and the folded passes the unfolded ones to rounding."""
    gen = torch.Generator().manual_seed(5)
    q = torch.rand(1, 900, d, generator=gen, dtype=torch.float64)
    k = torch.rand(1, 1100, d, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 1100, 2, generator=gen, dtype=torch.float64)
    w = 10.0 + 10.0 * torch.rand(1, 1100, generator=gen, dtype=torch.float64)
    upstream = torch.randn(1, 900, 2, generator=gen, dtype=torch.float64)
    if rows == "one far":
        q[0, 7] += 3.0  # its scores below -45 (w >= 10): lse below -24 in log2 units
    if rows == "tiny upstream":
        upstream[0, 3] = 2 * torch.finfo(dtype).tiny  # its row's lse is above 1
    q, k, v, w, upstream = (x.to(dtype) for x in (q, k, v, w, upstream))
    folds, kernels = [], []
    row_fold, parallel = numba_nw._row_fold, numba_nw._parallel

    def recording_fold(*args):
        fold = row_fold(*args)
        folds.append(fold is not None)
        return None if unfolded else fold

    def recording_kernels(kernel, *args):
        kernels.append(type(args[-1]).__name__)  # the pass's argument structure
        return parallel(kernel, *args)

    monkeypatch.setattr(numba_nw, "_row_fold", recording_fold)
    monkeypatch.setattr(numba_nw, "_parallel", recording_kernels)

    def gradients():
        leaves = [x.clone().requires_grad_(wanted == "all" or x is q) for x in (q, k, v, w)]
        out = nwfast.nw_pool(*leaves, tolerance=0.0)
        kernels.clear()
        grads = torch.autograd.grad(out, [x for x in leaves if x.requires_grad], upstream)
        grads = grads if wanted == "all" else (*grads, None, None, None)
        testing.assert_ok(*testing.check_pool_gradients(grads, q, k, v, w, upstream))
        assert sorted(x for x in kernels if x.endswith("Grad")) == passes
        return grads

    unfolded = False
    folded = gradients()
    assert folds == [rows == "near"]
    unfolded = True
    for a, b in zip(folded, gradients()):
        if a is not None:
            testing.assert_close(a, b, 1e-5 if dtype == torch.float32 else 1e-12)


# --------------------------------------------------- the arrays the kernels read
# (``kernels.arrays``): made by NumPy on the calling thread, on cache lines.

# Ops that move no numbers: a torch op on more than GRAIN numbers that is not
# one of these runs on torch's OpenMP threads, which then spin beside the
# kernels' own.
# (``to`` and ``contiguous`` that do copy show the copy as aten::copy_ beneath them.)
_NO_COMPUTE = re.compile(
    r"(aten::)?(empty\w*|as_strided|view\w*|_?reshape\w*|alias|expand\w*|detach\w*|select"
    r"|slice|squeeze|unsqueeze|permute|transpose|t|lift\w*|resolve_\w+|result_type|numpy_T"
    r"|_unsafe_view|split\w*|unbind|contiguous|to)$"
)
GRAIN = 32768  # at::internal::GRAIN_SIZE: above it an op runs on torch's threads


def _threaded_torch_ops(run):
    """The torch ops on more than GRAIN numbers that ``run()`` calls, by name."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run()
    found = set()
    for event in prof.events():
        sizes = [int(np.prod(shape)) for shape in event.input_shapes or () if shape]
        if max(sizes, default=0) > GRAIN and not _NO_COMPUTE.match(event.name):
            found.add(event.name)
    return sorted(found)


@pytest.mark.parametrize("tolerance", [0.0, 1e-4])
@pytest.mark.parametrize("many", ["queries", "keys"])
@pytest.mark.parametrize("d", [1, 3])
def test_cpu_passes_call_no_threaded_torch_op(d, many, tolerance):
    """The forward, the backward and the tangent, and local-linear's moments,
    make every array they hand their kernels, and every result, without a
    torch op on more than GRAIN numbers, dense or block-sparse
    (``kernels.arrays``). Many queries or many keys: each side's arrays hold
    more than GRAIN numbers in turn."""
    from nwfast.kernels import numba_moments

    gen = torch.Generator().manual_seed(3)
    big, few = GRAIN // d + 100, 700
    n, m = (big, few) if many == "queries" else (few, big)
    query, key = torch.rand(1, n, d, generator=gen), torch.rand(1, m, d, generator=gen)
    value = torch.randn(1, m, 2, generator=gen)
    grad_out = torch.randn(1, n, 2, generator=gen)
    for w in (torch.full((1, 1), 900.0), 900.0 + torch.rand(1, m, generator=gen)):

        def passes(w=w):
            out, lse, plan = numba_nw.forward(query, key, value, w, 0, tolerance)
            numba_nw.backward(grad_out, query, key, value, w, out, lse, 0, plan, (True,) * 4)
            tangents = (query, key, value, w)
            numba_nw.tangent(query, key, value, w, tangents, out, lse, 0, plan)

        assert _threaded_torch_ops(passes) == []

    w_f = torch.full((d,), 900.0)
    moments = d + d * (d + 1) // 2 + 2 + 2 * d
    grad = torch.randn(n, moments, dtype=torch.float64, generator=gen)
    second = torch.rand(n, d, dtype=torch.float64, generator=gen)
    tbar = torch.randn(n, dtype=torch.float64, generator=gen)

    def local_linear():
        _, lse, plan = numba_moments.forward(query[0], key[0], value[0], w_f, 0, tolerance)
        numba_moments.backward(grad, query[0], key[0], value[0], w_f, lse, second, tbar, 0, plan)

    assert _threaded_torch_ops(local_linear) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_arrays_start_on_a_cache_line_and_hold_torch_values(dtype):
    from nwfast.kernels import arrays, distance_shift

    for shape in ((1,), (3, 5), (2, 4097, 3)):
        a = arrays.empty(shape, arrays.numpy_dtype(dtype))
        assert a.ctypes.data % 64 == 0 and a.flags.c_contiguous and a.shape == shape
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4097, 3, generator=gen, dtype=dtype) * 1e3
    kT = arrays.feature_major(x)
    assert kT.ctypes.data % 64 == 0
    assert torch.equal(torch.from_numpy(kT), x.transpose(1, 2).contiguous())
    assert arrays.of(x).ctypes.data == x.data_ptr()  # a contiguous tensor is read in place
    one = x[:1, :, :1].contiguous()  # one feature: already feature-major, read in place
    assert arrays.feature_major(one).ctypes.data == one.data_ptr()
    assert torch.equal(torch.from_numpy(arrays.feature_major(one)), one.transpose(1, 2))
    assert torch.equal(torch.from_numpy(arrays.of(x[:, ::2])), x[:, ::2])
    w = torch.rand(2, 4097, generator=gen, dtype=dtype) * 1e4
    c2 = (w.double() * (-0.5 * arrays.LOG2E)).to(dtype)  # rounded once, as torch would
    assert torch.equal(torch.from_numpy(arrays.log2_scale(w)), c2)
    lse = torch.randn(2, 4097, generator=gen, dtype=torch.float64) * 1e9
    high, low = numba_nw._lse_log2(lse, dtype, None)
    lse2 = lse * arrays.LOG2E
    assert torch.equal(torch.from_numpy(high), lse2.to(dtype))
    assert torch.equal(torch.from_numpy(low), (lse2 - lse2.to(dtype).double()).to(dtype))

    # the distance shift: NumPy's on the CPU, torch's formula elsewhere
    from nwfast.kernels import _shift

    w1 = torch.tensor([[2.5], [0.0]], dtype=dtype)
    keys = torch.randint(1, 4097, (2, 4097), generator=gen)
    lse[0, :3] = torch.tensor([np.inf, -np.inf, np.nan], dtype=torch.float64)
    r = distance_shift(lse, w1, keys)
    expected = _shift(torch, lse, w1.double(), keys.double().log())
    torch.testing.assert_close(r, expected, rtol=4e-16, atol=0)
    assert (r[1] == 0).all() and (r[0, :3] == 0).all()  # w = 0, lse not finite


def test_cpu_gather_and_scatter_match_torch():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 300, 3, generator=gen)
    perm = torch.stack([torch.randperm(300, generator=gen) for _ in range(2)])
    expected = x.gather(1, perm[..., None].expand(-1, -1, 3))
    assert torch.equal(blocks._gather(x, perm), expected)
    assert torch.equal(blocks._scatter(expected, perm), x)
    assert blocks._gather(x, perm).numpy().ctypes.data % 64 == 0
