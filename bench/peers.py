"""Who the benchmark times, nwfast included: each peer and what it builds per operation.

A peer's ``builds`` maps an operation (shared, shared_loo, rows, fit) to a function
``build(case, inputs, **options)`` that does the one-off work (imports,
conversions, wrapping in ``torch.compile``) and returns a zero-argument callable:
one call of it is what gets timed. A pooling call returns the output (a tensor,
or a NumPy array for the NumPy peers); a fit returns the chosen bandwidth per
feature. A variant is the same builds with other ``options`` (keyword arguments
of the call), under its own name: ``nwfast-f32`` fits in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.cases import DTYPES, MODES, POOL_OPS, W_KINDS, Case


@dataclass(frozen=True)
class Peer:
    name: str
    label: str  # what it is, in words: written into each results header
    module: str  # importing it tells whether the peer is installed
    builds: dict[str, Callable]  # op -> build(case, inputs, **options)
    options: dict = field(default_factory=dict)
    # "once": compiles on its first call in a process (Numba, KeOps), that call
    # is the warm-up; "each case": compiles again for every shape (torch.compile).
    jit: str | None = None
    # n x m matrices it holds at once (differences, scores, weights): where they
    # pass the memory cap it fails at its first allocations, so it runs anyway.
    dense: int = 0
    devices: tuple = ("cpu", "cuda")
    modes: tuple = MODES
    dtypes: tuple = DTYPES
    w_kinds: tuple = (*W_KINDS, None)
    max_pairs: int | None = None  # larger pooling cases are left out (why_not["size"])
    # ns per pair of one call, to predict a call before any smaller size of it
    # has run in this sweep: a forward on "cpu" / "cuda", a whole "fit".
    prior_ns: dict = field(default_factory=dict)
    # attribute ("ops" for an operation it does not build) -> why it cannot run a case
    why_not: dict = field(default_factory=dict)
    # (case, inputs, **options) -> the (query, key) pairs one call computes,
    # for the peers that skip some; None: every pair.
    pairs: Callable | None = None
    # (case, inputs, **options) -> more measurements of a pooling row (MEASUREMENTS)
    plan: Callable | None = None
    # (**options) -> the share of each row's weight a call may leave out, as
    # ``nwfast.testing`` takes it (None: the dtype's rounding); None: nothing
    skipped: Callable | None = None

    def unsupported(self, case: Case) -> str | None:
        """Why this peer cannot run the case, or None."""
        if case.op not in self.builds:
            return self.why_not.get("ops", f"{self.name} has no {case.op} operation")
        checks = {
            "devices": case.device,
            "modes": case.mode,
            "dtypes": case.dtype,
            "w_kinds": case.w_kind,
        }
        for attr, value in checks.items():
            if value not in getattr(self, attr):
                return self.why_not.get(attr, f"{self.name} has no {attr[:-1]} {value}")
        if self.max_pairs and case.op != "fit" and case.pairs > self.max_pairs:
            return self.why_not["size"]
        return None

    def build(self, case: Case, inputs: dict) -> Callable:
        return self.builds[case.op](case, inputs, **self.options)

    def pairs_computed(self, case: Case, inputs: dict) -> int:
        if self.pairs is None or case.op == "rows":
            return case.pairs
        return self.pairs(case, inputs, **self.options)

    def skipped_share(self):
        """What the checks allow each row to leave out (``tolerance``)."""
        return 0.0 if self.skipped is None else self.skipped(**self.options)

    def predict_s(self, case: Case, pairs: int) -> float | None:
        """One call of ``pairs`` computed pairs, from the prior alone."""
        prior = self.prior_ns.get("fit" if case.op == "fit" else case.device)
        return None if prior is None else prior * 1e-9 * pairs


# --- pooling -------------------------------------------------------------------


def _nwfast(case: Case, x: dict, **options):
    import nwfast

    q, k, v, w = x["query"], x["key"], x["value"], x["w"]
    if case.op == "rows":
        return lambda: nwfast.nw_pool_rows(q, k, v, w, **options)
    return lambda: nwfast.nw_pool(q, k, v, w, exclude_self=case.exclude_self, **options)


def _nwfast_pairs(case: Case, x: dict, **options) -> int:
    import nwfast

    return nwfast.pairs_computed(
        x["query"], x["key"], x["w"], exclude_self=case.exclude_self, **options
    )


def _nwfast_plan(case: Case, x: dict, **options) -> dict:
    """What the plan expands, and the bound it states per row."""
    import nwfast

    summary = nwfast.plan_summary(
        x["query"], x["key"], x["w"], exclude_self=case.exclude_self, **options
    )
    return {"expanded_fraction": summary.expanded / summary.pairs, "far_bound": summary.bound}


def _without_expansions(build):
    """A build of nwfast's with far-field expansions off in this worker
    process (each peer has its own): block skipping alone."""

    def wrapped(case: Case, x: dict, **options):
        from nwfast.kernels import far

        far.SWITCH["enabled"] = False
        return build(case, x, **options)

    return wrapped


def _reference(form: str, case: Case, x: dict):
    from nwfast import reference

    q, k, v, w = x["query"], x["key"], x["value"], x["w"]
    if case.op == "rows":
        fn = getattr(reference, f"nw_pool_rows_{form}")
        return lambda: fn(q, k, v, w)
    fn = getattr(reference, f"nw_pool_{form}")
    return lambda: fn(q, k, v, w, exclude_self=case.exclude_self)


def shared_sum_form(query, key, value, w, exclude_self: bool):
    """The broadcast form with the sum written ``(p * v).sum(1)``.

    Written this way Inductor streams each query row through a few fused
    passes without an n x m buffer; written ``p @ v`` it materialises p.
    """
    import torch

    if query.dim() == 1:
        sq = (query[:, None] - key[None, :]) ** 2
    else:
        sq = ((query[:, None, :] - key[None, :, :]) ** 2).sum(-1)
    s = -(w / 2) * sq  # w is (1,) or (m,): both broadcast over the rows
    if exclude_self:
        # An index comparison, not torch.eye: Inductor fuses it away.
        i = torch.arange(s.shape[0], device=s.device)
        s = s.masked_fill(i[:, None] == i[None, :], float("-inf"))
    p = torch.softmax(s, dim=1)
    if value.dim() == 1:
        return (p * value[None, :]).sum(1)
    return (p[:, :, None] * value[None, :, :]).sum(1)


def rows_sum_form(query, keys, values, w):
    import torch

    p = torch.softmax(-(w / 2) * (query[:, None] - keys) ** 2, dim=1)
    return (p * values).sum(1)


def _compile(case: Case, x: dict):
    import torch

    # Each case compiles afresh, as in a new process: earlier sizes in this
    # worker neither count against Dynamo's recompile limit nor warm it.
    torch._dynamo.reset()
    q, k, v, w = x["query"], x["key"], x["value"], x["w"]
    if case.op == "rows":
        form = rows_sum_form
    else:
        form = functools.partial(shared_sum_form, exclude_self=case.exclude_self)
    fn = torch.compile(form, dynamic=False, fullgraph=True)
    return lambda: fn(q, k, v, w)


def _pykeops(case: Case, x: dict):
    from pykeops.torch import LazyTensor

    q, k, v, w = x["query"], x["key"], x["value"], x["w"]
    n, m, d = case.n, case.m, case.d

    def call():
        # LazyTensors are built inside the call so that autograd sees the
        # inputs of this call (fwd+bwd builds a fresh graph each time).
        qi = LazyTensor(q.reshape(n, 1, d))
        kj = LazyTensor(k.reshape(1, m, d))
        vj = LazyTensor(v.reshape(1, m, -1))
        sq = (qi - kj) ** 2 if d == 1 else ((qi - kj) ** 2).sum(-1)
        if case.w_kind == "per_key":
            s = -0.5 * LazyTensor(w.reshape(1, m, 1)) * sq
        else:
            s = -(w / 2) * sq  # a (1,) tensor: a KeOps parameter
        out = s.sumsoftmaxweight(vj, axis=1)
        return out.reshape(n) if v.dim() == 1 else out

    return call


def _keops_blocks(q, k, w, tolerance: float):
    """KeOps' block-sparse ranges, built as its documentation builds them.

    Points fall in voxels of side eps (``grid_cluster``) and are sorted by
    voxel; a pair of voxels is kept where their centroids are closer than
    the cut-off r (a pair further apart than r weighs under ``tolerance``
    times a key at the query itself: w r^2 / 2 = ln(1 / tolerance)) plus
    twice the voxel diagonal, so no pair within r is dropped. eps = r / 2,
    larger where that would make over 4096 voxels (their centroid distance
    matrix is voxels^2). Returns (query order, key order, ranges, pairs kept).
    """
    import torch
    from pykeops.torch.cluster import cluster_ranges_centroids, from_matrix, grid_cluster

    d = q.shape[1]
    r = math.sqrt(2 * math.log(1 / tolerance) / float(w.max()))
    extent = (torch.cat([q, k]).amax(0) - torch.cat([q, k]).amin(0)).clamp_min(1e-12)
    eps = r / 2
    voxels = float(torch.prod(torch.ceil(extent / eps)))
    eps *= max(1.0, voxels / 4096) ** (1 / d)
    order, ranges, centroids, sizes = [], [], [], []
    for x in (q, k):
        labels = grid_cluster(x, eps)
        x_ranges, x_centroids, _ = cluster_ranges_centroids(x, labels)
        order.append(torch.argsort(labels, stable=True))
        ranges.append(x_ranges)
        centroids.append(x_centroids)
        sizes.append(x_ranges[:, 1] - x_ranges[:, 0])
    gap = torch.cdist(centroids[0], centroids[1])
    keep = gap < r + 2 * eps * math.sqrt(d)
    pairs = int((sizes[0][:, None] * sizes[1][None, :] * keep).sum())
    return order[0], order[1], from_matrix(ranges[0], ranges[1], keep), pairs


def _pykeops_sparse(case: Case, x: dict, tolerance: float):
    from pykeops.torch import LazyTensor

    q, k, v, w = x["query"], x["key"], x["value"], x["w"]
    n, m, d = case.n, case.m, case.d

    def call():
        # Clustering and sorting are part of every call, as nwfast's plan is.
        qs, ks = q.reshape(n, d), k.reshape(m, d)
        q_order, k_order, ranges, _ = _keops_blocks(qs.detach(), ks.detach(), w, tolerance)
        qi = LazyTensor(qs[q_order][:, None, :])
        kj = LazyTensor(ks[k_order][None, :, :])
        vj = LazyTensor(v.reshape(m, -1)[k_order][None, :, :])
        s = -(w / 2) * ((qi - kj) ** 2).sum(-1)
        s.ranges = ranges
        out = s.sumsoftmaxweight(vj, axis=1)
        back = out.new_empty(out.shape).index_copy(0, q_order, out)
        return back.reshape(n) if v.dim() == 1 else back

    return call


def _pykeops_sparse_pairs(case: Case, x: dict, tolerance: float) -> int:
    q, k = x["query"].reshape(case.n, case.d), x["key"].reshape(case.m, case.d)
    return _keops_blocks(q.detach(), k.detach(), x["w"], tolerance)[3]


def _sdpa(case: Case, x: dict):
    """The same softmax as dot-product attention, on tensor cores where the
    inputs are half precision: -(w/2)||q - k||^2 = w q.k - (w/2)||k||^2 -
    (w/2)||q||^2, and the last term is one constant per row, which the softmax
    drops. So scale w and the additive key bias -(w/2)||k_j||^2 (computed in
    float32). Its logits cancel where the points are far from the origin:
    the correctness column says what that costs."""
    import torch.nn.functional as F

    q, k, v, w = x["query"], x["key"], x["value"], x["w"]
    n, m, d = case.n, case.m, case.d
    scale = float(w)

    def call():
        ks = k.reshape(1, m, d)
        bias = (-0.5 * scale) * ks.float().pow(2).sum(-1)
        out = F.scaled_dot_product_attention(
            q.reshape(1, n, d), ks, v.reshape(1, m, -1),
            attn_mask=bias.to(q.dtype)[:, None, :], scale=scale,
        )  # fmt: skip
        return out.reshape(n) if v.dim() == 1 else out[0]

    return call


def _kdepy(case: Case, x: dict):
    """KDEpy's FFTKDE: the points binned on a grid (spacing h / 4, at most 2^20
    points in 1-D and 2^11 per axis in 2-D), the kernel sums by FFT, then
    interpolated linearly to the queries. Nadaraya-Watson from two weighted
    densities: sum_j K_j (v_j + c) / sum_j K_j - c, with c making every weight
    positive (FFTKDE takes none below 0)."""
    import numpy as np
    from KDEpy import FFTKDE
    from scipy.interpolate import RegularGridInterpolator

    q, k, v, h = _numpy_inputs(x)
    d = case.d
    qq, kk = q.reshape(-1, d), k.reshape(-1, d)
    c = 1.0 - v.min()
    lo = np.minimum(qq.min(0), kk.min(0)) - 4 * h
    hi = np.maximum(qq.max(0), kk.max(0)) + 4 * h
    most = (1 << 20) if d == 1 else (1 << 11)
    size = int(min(most, np.ceil((hi - lo).max() / (h / 4)) + 1))
    axes = [np.linspace(lo[f], hi[f], size) for f in range(d)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, d)

    def call():
        weights = v + c
        numerator = FFTKDE(bw=h).fit(kk, weights=weights).evaluate(grid) * weights.sum()
        denominator = FFTKDE(bw=h).fit(kk).evaluate(grid) * len(kk)
        ratio = (numerator / denominator).reshape((size,) * d)
        if d == 1:
            return np.interp(qq[:, 0], axes[0], ratio) - c
        return RegularGridInterpolator(axes, ratio)(qq) - c

    return call


def _numpy_inputs(x: dict):
    """float64 NumPy copies, made once outside the timed calls, and h = w^-1/2."""
    q, k, v, w = (
        x[name].detach().double().cpu().numpy() for name in ("query", "key", "value", "w")
    )
    return q, k, v.ravel(), 1.0 / math.sqrt(float(w.ravel()[0]))


def _statsmodels(case: Case, x: dict):
    from statsmodels.nonparametric.kernel_regression import KernelReg

    q, k, v, h = _numpy_inputs(x)
    d = case.d

    # KernelReg's Gaussian is exp(-(x - x_j)^2 / (2 h^2)): w = 1 / h^2 exactly.
    def call():
        return KernelReg(v, k, var_type="c" * d, reg_type="lc", bw=[h] * d).fit(q)[0]

    return call


def _kernelsmooth(case: Case, x: dict):
    from kernelsmooth import NadarayaWatsonRegression

    q, k, v, h = _numpy_inputs(x)
    kk, qq = k.reshape(-1, case.d), q.reshape(-1, case.d)
    # kernelsmooth divides each feature by its sample std before applying its
    # bandwidth (diag_cov=True), so h / std is the same kernel as w = 1 / h^2.
    bw = h / kk.std(axis=0, ddof=1)

    def call():
        return NadarayaWatsonRegression(bandwidth=bw, diag_cov=True).fit(kk, v).predict(qq)

    return call


# --- bandwidth selection --------------------------------------------------------


def _nwfast_fit(case: Case, x: dict, **options):
    import numpy as np

    import nwfast

    make = {"local-constant": nwfast.NadarayaWatson, "local-linear": nwfast.LocalLinearRegression}
    make = make[case.mode]

    def fit():
        model = make("loo", per_feature=case.d > 1, **options).fit(x["X"], x["y"])
        return np.atleast_1d(model.bandwidth_).astype(float)

    return fit


def _statsmodels_fit(case: Case, x: dict):
    import numpy as np
    from statsmodels.nonparametric.kernel_regression import KernelReg

    def fit():
        reg_type = {"local-constant": "lc", "local-linear": "ll"}[case.mode]
        reg = KernelReg(x["y"], x["X"], var_type="c" * case.d, reg_type=reg_type, bw="cv_ls")
        return np.asarray(reg.bw, dtype=float)

    return fit


def _kernelsmooth_fit(case: Case, x: dict):
    import numpy as np
    from kernelsmooth import NadarayaWatsonRegression

    # Its search is bounded: 10 L-BFGS iterations within a factor 5 of
    # Silverman's h. diag_cov=True divides each feature by its std: h_f = bw_f std_f.
    def fit():
        model = NadarayaWatsonRegression(bandwidth="lscv", diag_cov=True).fit(x["X"], x["y"])
        return np.asarray(model.bandwidth * model.L, dtype=float)

    return fit


def _pooling(build) -> dict:
    return dict.fromkeys(POOL_OPS, build)


_NUMPY = {
    "devices": ("cpu",),
    "modes": ("forward", "local-constant"),
    "dtypes": ("float32", "float64"),
    "w_kinds": ("scalar", None),
}
_NUMPY_WHY = {
    "modes": "forward only (no autograd), Nadaraya-Watson fits only",
    "devices": "CPU only",
    "w_kinds": "one bandwidth for all keys only",
}

NWFAST = Peer(
    "nwfast",
    "nwfast (fused: Numba on CPU, Triton on CUDA)",
    "nwfast",
    {**_pooling(_nwfast), "fit": _nwfast_fit},
    jit="once",
    prior_ns={"cpu": 0.5, "cuda": 0.0003, "fit": 2},
    pairs=_nwfast_pairs,
    plan=_nwfast_plan,
    skipped=lambda tolerance=None, **_: tolerance,
)

PEERS = {
    p.name: p
    for p in (
        NWFAST,
        dataclasses.replace(
            NWFAST,
            name="nwfast-f32",
            label="nwfast NadarayaWatson('loo', dtype='float32') on the float64 data",
            builds={"fit": _nwfast_fit},
            options={"dtype": "float32"},
        ),
        dataclasses.replace(
            NWFAST,
            name="nwfast-skip",
            label="nwfast with block skipping alone: no far-field expansions",
            builds=_pooling(_without_expansions(_nwfast)),
            pairs=_without_expansions(_nwfast_pairs),
            plan=None,
        ),
        dataclasses.replace(
            NWFAST,
            name="nwfast-dense",
            label="nwfast with tolerance=0.0: every pair, no block skipping",
            builds={"shared": _nwfast, "shared_loo": _nwfast},
            options={"tolerance": 0.0},
            why_not={"ops": "nw_pool_rows skips nothing (no tolerance): nwfast's row is dense"},
            plan=None,
        ),
        Peer(
            "torch-compile",
            "torch.compile, broadcast form with (p * v).sum(1)",
            "torch",
            _pooling(_compile),
            jit="each case",
            prior_ns={"cpu": 0.9, "cuda": 0.003},
        ),
        Peer(
            "pykeops",
            "pykeops LazyTensor.sumsoftmaxweight",
            "pykeops.torch",
            {"shared": _pykeops},
            jit="once",
            dtypes=("float32", "float64", "float16"),
            prior_ns={"cpu": 4.5, "cuda": 0.003},
            why_not={"dtypes": "KeOps has no bfloat16"},
        ),
        Peer(
            "pykeops-sparse",
            "pykeops sumsoftmaxweight over block-sparse ranges (grid_cluster, from_matrix), "
            "pairs cut at weight 2^-24 of a key at the query, clustering in each call",
            "pykeops.torch.cluster",
            {"shared": _pykeops_sparse},
            options={"tolerance": 2.0**-24},
            jit="once",
            dtypes=("float32",),
            w_kinds=("scalar",),
            prior_ns={"cpu": 0.5, "cuda": 0.0003},
            why_not={
                "dtypes": "float32 only: its cut-off is float32's rounding",
                "w_kinds": "one w for all keys only",
            },
            pairs=_pykeops_sparse_pairs,
        ),
        Peer(
            "torch-sdpa",
            "torch scaled_dot_product_attention, scale w and key bias -(w/2)||k||^2 "
            "(the tensor-core route for half precision with d >= 16)",
            "torch.nn.functional",
            {"shared": _sdpa},
            devices=("cuda",),
            modes=("forward", "backward", "fwd+bwd"),
            w_kinds=("scalar",),
            prior_ns={"cuda": 0.0005},
            why_not={
                "devices": "the tensor-core route: CUDA only",
                "w_kinds": "one w for all keys only (a per-key w has no dot-product form)",
            },
        ),
        Peer(
            "kdepy-fft",
            "KDEpy FFTKDE: two weighted densities on a grid of spacing h / 4 by FFT, "
            "interpolated linearly to the queries (float64, 1 thread)",
            "KDEpy",
            {"shared": _kdepy},
            prior_ns={"cpu": 0.001},
            why_not={**_NUMPY_WHY, "modes": "forward only (no autograd), d <= 2"},
            **_NUMPY,
        ),
        Peer(
            "torch-broadcast",
            "torch eager, broadcast form",
            "nwfast.reference",
            _pooling(functools.partial(_reference, "broadcast")),
            dense=3,
            prior_ns={"cpu": 14, "cuda": 0.01},
        ),
        Peer(
            "torch-repeat",
            "torch eager, repeat_interleave form",
            "nwfast.reference",
            _pooling(functools.partial(_reference, "repeat_interleave")),
            dense=3,
            prior_ns={"cpu": 22, "cuda": 0.02},
        ),
        Peer(
            "kernelsmooth",
            "kernelsmooth NadarayaWatsonRegression, float64, 1 thread: bandwidth h or 'lscv'",
            "kernelsmooth",
            {"shared": _kernelsmooth, "fit": _kernelsmooth_fit},
            prior_ns={"cpu": 10, "fit": 100},
            why_not=_NUMPY_WHY,
            **_NUMPY,
        ),
        Peer(
            "statsmodels",
            "statsmodels KernelReg(reg_type='lc', or 'll' for a local-linear fit), float64: "
            "bw=[h] or bw='cv_ls'",
            "statsmodels.nonparametric.kernel_regression",
            {"shared": _statsmodels, "fit": _statsmodels_fit},
            # Its predict loops over the queries in Python, each a NumPy pass
            # over the keys: one call at 16384² takes 25-30 s.
            max_pairs=4096 * 4096,
            prior_ns={"cpu": 30, "fit": 1500},
            why_not={
                **_NUMPY_WHY,
                "modes": "forward only (no autograd)",
                "size": "small sizes only (n m <= 4096²): 16384² takes ~30 s",
            },
            **{**_NUMPY, "modes": (*_NUMPY["modes"], "local-linear")},
        ),
    )
}


def for_ops(ops) -> list[str]:
    """The peers that build any of these operations, in registry order."""
    return [name for name, peer in PEERS.items() if any(op in peer.builds for op in ops)]


def availability(names) -> dict[str, str]:
    """Peer name -> why it cannot be imported here (peers that import are absent)."""
    out = {}
    for name in names:
        try:
            importlib.import_module(PEERS[name].module)
        except Exception as exc:  # any import failure leaves the peer out
            out[name] = f"cannot import {PEERS[name].module}: {type(exc).__name__}: {exc}"
    return out
