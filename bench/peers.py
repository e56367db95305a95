"""The peers: everyone the sweep times, nwfast included, each behind one ``build``.

``build(case, inputs)`` does the one-off work (imports, conversions, wrapping
in ``torch.compile``) and returns a zero-argument callable: one call is what
gets timed. It returns a torch tensor, or a NumPy array for the NumPy peers.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.cases import DTYPES, LAYOUTS, MODES, W_KINDS, Case


@dataclass(frozen=True)
class Peer:
    name: str
    label: str  # what it is, in words: written into each results header
    module: str  # importing it tells whether the peer is installed
    build: Callable
    jit: bool = False  # compiles on its first call; that call is reported apart
    dense: bool = False  # builds n x m matrices: runs out of memory first
    devices: tuple = ("cpu", "cuda")
    layouts: tuple = tuple(LAYOUTS)
    modes: tuple = MODES
    dtypes: tuple = DTYPES
    w_kinds: tuple = W_KINDS
    # ns per pair, forward, used to predict a call's time only when this
    # peer has no smaller size timed yet in the run (bench.cases.predict_s).
    prior_ns: dict = field(default_factory=dict)
    why_not: dict = field(default_factory=dict)  # field -> reason when unsupported

    def unsupported(self, case: Case) -> str | None:
        """Why this peer cannot run the case, or None."""
        checks = {
            "devices": case.device,
            "layouts": case.layout,
            "modes": case.mode,
            "dtypes": case.dtype,
            "w_kinds": case.w_kind,
        }
        for attr, value in checks.items():
            if value not in getattr(self, attr):
                default = f"{self.name} has no {attr[:-1]} {value}"
                return self.why_not.get(attr, default)
        return None


def _nwfast(case: Case, x: dict):
    import nwfast

    q, k, v, w = x["query"], x["key"], x["value"], x["w"]
    if case.layout == "rows":
        return lambda: nwfast.nw_pool_rows(q, k, v, w)
    return lambda: nwfast.nw_pool(q, k, v, w, exclude_self=case.exclude_self)


def _reference(form: str, case: Case, x: dict):
    from nwfast import reference

    q, k, v, w = x["query"], x["key"], x["value"], x["w"]
    if case.layout == "rows":
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
    if case.layout == "rows":
        fn = torch.compile(rows_sum_form, dynamic=False, fullgraph=True)
        return lambda: fn(q, k, v, w)
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


def _numpy_inputs(x: dict):
    """float64 NumPy copies, made once outside the timed calls."""
    q, k, v, w = (
        x[name].detach().double().cpu().numpy() for name in ("query", "key", "value", "w")
    )
    h = 1.0 / math.sqrt(float(w.ravel()[0]))  # w = 1 / h^2
    return q, k, v.ravel(), h


def _statsmodels(case: Case, x: dict):
    from statsmodels.nonparametric.kernel_regression import KernelReg

    q, k, v, h = _numpy_inputs(x)
    d = case.d

    # KernelReg's Gaussian is exp(-(x - x_j)^2 / (2 h^2)): w = 1 / h^2 exactly.
    def call():
        model = KernelReg(v, k, var_type="c" * d, reg_type="lc", bw=[h] * d)
        return model.fit(q)[0]

    return call


def _kernelsmooth(case: Case, x: dict):
    from kernelsmooth import NadarayaWatsonRegression

    q, k, v, h = _numpy_inputs(x)
    d = case.d
    kk, qq = k.reshape(-1, d), q.reshape(-1, d)
    # kernelsmooth divides each feature by its sample std before applying its
    # bandwidth (diag_cov=True), so h / std is the same kernel as w = 1 / h^2.
    bw = h / kk.std(axis=0, ddof=1)

    def call():
        model = NadarayaWatsonRegression(bandwidth=bw, diag_cov=True)
        return model.fit(kk, v).predict(qq)

    return call


_NUMPY = {
    "layouts": ("shared",),
    "modes": ("forward",),
    "devices": ("cpu",),
    "dtypes": ("float32", "float64"),
    "w_kinds": ("scalar",),
}
_NUMPY_WHY = {
    "modes": "forward only (no autograd)",
    "layouts": "one shared key set only",
    "devices": "CPU only",
    "w_kinds": "one bandwidth for all keys only",
}

PEERS = {
    p.name: p
    for p in (
        Peer(
            "nwfast",
            "nwfast (fused: Numba on CPU, Triton on CUDA)",
            "nwfast",
            _nwfast,
            jit=True,
            prior_ns={"cpu": 0.5, "cuda": 0.0003},
        ),
        Peer(
            "torch-repeat",
            "torch eager, repeat_interleave form",
            "nwfast.reference",
            functools.partial(_reference, "repeat_interleave"),
            dense=True,
            prior_ns={"cpu": 22, "cuda": 0.02},
        ),
        Peer(
            "torch-broadcast",
            "torch eager, broadcast form",
            "nwfast.reference",
            functools.partial(_reference, "broadcast"),
            dense=True,
            prior_ns={"cpu": 14, "cuda": 0.01},
        ),
        Peer(
            "torch-compile",
            "torch.compile, broadcast form with (p * v).sum(1)",
            "torch",
            _compile,
            jit=True,
            prior_ns={"cpu": 0.9, "cuda": 0.003},
        ),
        Peer(
            "pykeops",
            "pykeops LazyTensor.sumsoftmaxweight",
            "pykeops.torch",
            _pykeops,
            jit=True,
            layouts=("shared",),
            dtypes=("float32", "float64", "float16"),
            prior_ns={"cpu": 4.5, "cuda": 0.003},
            why_not={
                "layouts": "KeOps reduces over one shared key set, and cannot leave out j == i",
                "dtypes": "KeOps has no bfloat16",
            },
        ),
        Peer(
            "statsmodels",
            "statsmodels KernelReg(reg_type='lc', bw=[h]) (float64)",
            "statsmodels.nonparametric.kernel_regression",
            _statsmodels,
            prior_ns={"cpu": 30},
            why_not=_NUMPY_WHY,
            **_NUMPY,
        ),
        Peer(
            "kernelsmooth",
            "kernelsmooth NadarayaWatsonRegression (float64, 1 thread)",
            "kernelsmooth",
            _kernelsmooth,
            prior_ns={"cpu": 10},
            why_not=_NUMPY_WHY,
            **_NUMPY,
        ),
    )
}


def parse_peers(text: str | None) -> list[str]:
    if not text:
        return list(PEERS)
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in PEERS]
    if unknown:
        raise ValueError(f"unknown peers {unknown}: expected some of {list(PEERS)}")
    # nwfast first: every other peer's ratio is taken against it.
    return sorted(names, key=list(PEERS).index)


def availability(names) -> dict[str, str]:
    """Peer name -> why it cannot be imported here (peers that import are absent)."""
    out = {}
    for name in names:
        try:
            importlib.import_module(PEERS[name].module)
        except Exception as exc:  # any import failure leaves the peer out
            out[name] = f"cannot import {PEERS[name].module}: {type(exc).__name__}: {exc}"
    return out
