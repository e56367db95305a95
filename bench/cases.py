"""What the benchmark computes: operations, cases, their inputs and the presets.

A case is one peer computing one operation on one set of inputs. The operations:

- ``shared``, ``shared_loo``, ``rows``: the pooling operators, ``nw_pool``,
  ``nw_pool(..., exclude_self=True)`` and ``nw_pool_rows``, each timed in the
  modes ``forward``, ``backward`` (alone, over one retained graph) and ``fwd+bwd``;
- ``fit``: choosing the bandwidth by leave-one-out cross-validation, one whole
  fit timed; the mode names the estimator (``local-constant``: Nadaraya-Watson,
  ``local-linear``: local-linear regression), with one bandwidth per feature
  where d > 1.

Every peer of a case gets the same inputs (one seed, one data family, one
bandwidth rule), so their times and outputs compare. ``bench.peers`` says who
computes what: cases x peers is the registry.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

POOL_OPS = ("shared", "shared_loo", "rows")
POOL_MODES = ("forward", "backward", "fwd+bwd")
FIT_MODES = ("local-constant", "local-linear")
MODES = (*POOL_MODES, *FIT_MODES)
DTYPES = ("float32", "float64", "bfloat16", "float16")
W_KINDS = ("scalar", "per_key")

SEED = 0
NOISE = 0.5  # y = 2 sin(x) + x^0.8 + N(0, NOISE^2), the textbook's target


def _uniform(shape, **draw):
    import torch

    return 5.0 * torch.rand(shape, **draw)


def _unit(shape, **draw):
    import torch

    return torch.rand(shape, **draw)


def _normal(shape, **draw):
    import torch

    return 2.5 + torch.randn(shape, **draw)


CLUSTERS = 16


def _clustered(shape, **draw):
    """CLUSTERS tight clusters (spread 0.05) at fixed random centres in [0, 5)^d,
    wide gaps between them: queries and keys share the centres."""
    import torch

    n, d = shape[0], shape[1] if len(shape) > 1 else 1
    gen = torch.Generator().manual_seed(SEED + 1)
    centres = (5.0 * torch.rand(CLUSTERS, d, generator=gen)).to(draw["device"])
    label = torch.randint(CLUSTERS, (n,), device=draw["device"], generator=draw["generator"])
    points = centres[label] + 0.05 * torch.randn((n, d), **draw)
    return points.reshape(shape)


def _tied(shape, **draw):
    """Integer counts with heavy ties and a long tail (floor of a log-normal):
    a third of the points share the value 0 on each axis, a few reach hundreds."""
    import torch

    return torch.floor(torch.exp(1.5 * torch.randn(shape, **draw)))


# Data families: name -> points of a shape, from torch.rand's arguments.
DATA = {
    "uniform": _uniform,
    "unit": _unit,
    "normal": _normal,
    "clustered": _clustered,
    "tied": _tied,
}


def _silverman(key, value) -> float:
    """Silverman's rule as the estimators apply it (``nwfast.bandwidth``), the
    features' mean when there are several."""
    from nwfast.bandwidth import rule_of_thumb

    return float(rule_of_thumb(key.reshape(key.shape[0], -1).cpu()).mean())


LOO_SAMPLE = 1 << 14


def _loo(key, value) -> float:
    """``NadarayaWatson("loo")``'s h on a fixed random LOO_SAMPLE of the keys,
    scaled to all m by the rate m^(-1 / (d + 4)) at which the best h shrinks."""
    import torch

    import nwfast

    x = key.double().reshape(key.shape[0], -1).cpu()
    m, d = x.shape
    take = torch.randperm(m, generator=torch.Generator().manual_seed(SEED))[:LOO_SAMPLE]
    y = value.double().reshape(m, -1)[:, 0].cpu()
    h = nwfast.NadarayaWatson("loo").fit(x[take].numpy(), y[take].numpy()).bandwidth_
    return float(h) * (len(take) / m) ** (1 / (d + 4))


# Bandwidth rules: name -> h from the keys and values (w = 1 / h^2). h = 0.5 on
# [0, 5) lets every query see a few dozen percent of the keys with weights far
# from underflow, so no kernel can win by skipping zeros; the data-driven rules
# are those users pick, and a tenth of the leave-one-out h is a sharp kernel.
H_RULES = {
    "h=0.5": lambda key, value: 0.5,
    "h=0.01": lambda key, value: 0.01,
    "silverman": _silverman,
    "loo": _loo,
    "loo/10": lambda key, value: _loo(key, value) / 10,
}
_BANDWIDTHS: dict = {}  # (data, h_rule, m, d, device) -> h: every peer's worker computes it once


def bandwidth(case, key, value) -> float:
    """The case's h by its rule, to three significant digits (so that every
    worker, whatever its thread count's rounding, pools with the same w)."""
    at = (case.data, case.h_rule, case.m, case.d, case.device)
    if at not in _BANDWIDTHS:
        _BANDWIDTHS[at] = float(f"{H_RULES[case.h_rule](key, value):.3g}")
    return _BANDWIDTHS[at]


@dataclass(frozen=True)
class Case:
    peer: str
    op: str
    mode: str
    dtype: str
    device: str
    n: int
    m: int
    d: int = 1
    w_kind: str | None = "scalar"  # None for fits: they choose their own bandwidth
    data: str = "uniform"
    h_rule: str | None = "h=0.5"

    @property
    def exclude_self(self) -> bool:
        return self.op == "shared_loo"

    @property
    def pairs(self) -> int:
        return self.n * self.m

    @property
    def itemsize(self) -> int:
        return {"float64": 8, "float32": 4}.get(self.dtype, 2)

    def fields(self) -> dict:
        return {**asdict(self), "pairs": self.pairs}

    def key(self) -> list:
        """Every field's value: what tells two cases apart (JSON-ready)."""
        return list(asdict(self).values())

    def label(self) -> str:
        size = f"{self.n}²" if self.n == self.m else f"{self.n}x{self.m}"
        extra = "" if self.d == 1 else f" d={self.d}"
        extra += " w/key" if self.w_kind == "per_key" else ""
        return f"{self.op} {self.mode} {self.dtype} {size}{extra} {self.peer}"


CASE_FIELDS = tuple(f.name for f in fields(Case))


def same_inputs(row: dict) -> tuple:
    """Rows with equal keys timed the same inputs: their times compare."""
    return tuple(row[k] for k in CASE_FIELDS if k != "peer")


def family(row: dict) -> tuple:
    """Rows that differ only in size: the time of one predicts the next."""
    return tuple(row[k] for k in CASE_FIELDS if k not in ("n", "m"))


def work(case: Case) -> tuple[str, float] | None:
    """What bounds the case from below: ('exp', exps) or ('bytes', bytes moved).

    The shared layouts read n + 2m numbers and do one exp per pair and pass:
    the forward needs p_ij once, the backward must recompute it once (it is
    never stored), so fwd+bwd needs two. The rows layout reads its 2 n m
    inputs once; its backward also writes 2 n m gradients. A fit has no bound.
    """
    if case.op == "fit":
        return None
    if case.op == "rows":
        passes = {"forward": 1, "backward": 2, "fwd+bwd": 3}[case.mode]
        return "bytes", float(2 * case.pairs * case.itemsize * passes)
    return "exp", float(case.pairs * {"forward": 1, "backward": 1, "fwd+bwd": 2}[case.mode])


def input_bytes(case: Case) -> int:
    if case.op == "rows":
        numbers = 2 * case.n * case.m + case.n
    else:
        numbers = case.n * case.d + case.m * case.d + case.m
    numbers += case.m if case.w_kind == "per_key" else 1
    return numbers * case.itemsize


def make_inputs(case: Case) -> dict:
    """The case's inputs on its device, in its dtype.

    Pooling: query, key (keys (n, m) for rows), value (values (n, m) for rows),
    w, grad_out in the gradient modes, and h (w = 1 / h^2 for one w; per-key
    w scatter around it). Fit: X (n, d) and y (n,), NumPy.
    Points are drawn in float32 and rounded to the case's dtype, so every peer
    and dtype of a device sees the same numbers.
    """
    import torch

    gen = torch.Generator(device=case.device).manual_seed(SEED)
    draw = {"dtype": torch.float32, "device": case.device, "generator": gen}
    dtype = getattr(torch, case.dtype)
    points = DATA[case.data]

    def target(x):  # |x|: the normal family reaches below 0
        return 2 * torch.sin(x) + x.abs().pow(0.8) + NOISE * torch.randn(x.shape, **draw)

    n, m, d = case.n, case.m, case.d
    if case.op == "fit":
        X = points((n, d), **draw)
        return {"X": X.double().cpu().numpy(), "y": target(X[:, 0]).double().cpu().numpy()}
    if d == 1:
        key = torch.sort(points((m,), **draw)).values
        value = target(key)
    else:
        key = points((m, d), **draw)
        value = target(key[:, 0])[:, None]  # (m, c = 1): the (B..., m, c) form
    h = bandwidth(case, key, value)
    key, value = key.to(dtype), value.to(dtype)
    # shared_loo: the queries are the keys, a tensor of their own so that the
    # gradients of both are judged one by one.
    query = key.clone() if case.exclude_self else points((n,) if d == 1 else (n, d), **draw)
    query = query.to(dtype)
    if case.op == "rows":
        # The textbook's own construction: every query's row holds the same keys.
        x = {"query": query, "key": key.repeat(n, 1), "value": value.repeat(n, 1)}
    else:
        x = {"query": query, "key": key, "value": value}
    x["h"] = h
    w = 1.0 / h**2
    if case.w_kind == "per_key":
        x["w"] = (w * (0.5 + torch.rand(m, **draw))).to(dtype)
    else:
        x["w"] = torch.full((1,), w, dtype=dtype, device=case.device)  # nn.Parameter((1,))
    if case.mode in ("backward", "fwd+bwd"):
        shape = (n,) if d == 1 else (n, 1)
        x["grad_out"] = torch.randn(shape, **draw).to(dtype)
    return x


def grad_leaves(case: Case, x: dict) -> dict:
    """The inputs that take gradients in the gradient modes: all four."""
    if case.mode not in ("backward", "fwd+bwd"):
        return {}
    return {name: x[name] for name in ("query", "key", "value", "w")}


@dataclass(frozen=True)
class Preset:
    """What a named run times and how often."""

    sizes: dict  # (op, mode) -> n = m, ascending
    target_s: float  # the timed calls of a case add up to about this
    min_repeats: int
    max_repeats: int
    time_cap_s: float  # a call predicted to take longer is skipped
    leave_out: dict = field(default_factory=dict)  # (op, mode) -> {peer: why}
    data: tuple = ("uniform",)  # families of points (DATA)
    h_rules: tuple = ("h=0.5",)  # bandwidth rules (H_RULES)
    dims: tuple | None = None  # features d; None: the command line's
    max_n: dict = field(default_factory=dict)  # d -> the largest n = m at that d
    peers: tuple | None = None  # who runs by default; None: every peer of the ops
    goals: tuple = ()  # more cases, Case fields but the peer: those the goals judge
    # peers whose goal cases run whatever the time cap predicts (None: nwfast's all)
    uncapped: tuple | None = None


FGT_N = 10**7  # the far-field goals' size


def _every_mode(sizes: dict) -> dict:
    return {(op, mode): s for op, s in sizes.items() for mode in POOL_MODES}


# quick: every peer at 4096² and 16384² forward, forward + backward, and for
# each layout one size past where the dense reference runs out of the default
# 4 GiB cap (one float32 n x m matrix is 4 GiB at 32768²; the rows layout's
# reference needs ~3 n x m matrices beside its 2 n x m inputs).
PRESETS = {
    "quick": Preset(
        {
            ("shared", "forward"): (4096, 16384, 65536),
            ("shared", "fwd+bwd"): (4096, 16384),
            ("shared_loo", "forward"): (4096, 32768),
            ("rows", "forward"): (4096, 16384),
        },
        target_s=0.5,
        min_repeats=3,
        max_repeats=15,
        time_cap_s=5.0,
        leave_out={
            ("shared", "fwd+bwd"): {
                "pykeops": "quick: its gradient formulas build for ~40 s in a new environment"
            }
        },
    ),
    "full": Preset(
        _every_mode(
            {
                "shared": (1024, 4096, 16384, 65536, 262144),
                "shared_loo": (1024, 4096, 16384, 65536),
                "rows": (1024, 4096, 16384, 32768),
            }
        ),
        target_s=2.0,
        min_repeats=5,
        max_repeats=50,
        time_cap_s=30.0,
    ),
    # Shared keys from 4096 to 2^20; rows up to what the card holds.
    "gpu": Preset(
        _every_mode(
            {"shared": (4096, 16384, 65536, 262144, 1048576), "rows": (4096, 16384, 32768, 65536)}
        ),
        target_s=0.3,
        min_repeats=5,
        max_repeats=100,
        time_cap_s=8.0,
    ),
    # Fits are long: up to three while they stay within a few seconds.
    "fit-quick": Preset(
        {("fit", "local-constant"): (1000, 3000, 10000)},
        target_s=5.0,
        min_repeats=1,
        max_repeats=3,
        time_cap_s=20.0,
    ),
    "fit": Preset(
        {("fit", "local-constant"): (1000, 3000, 10000, 30000, 100000)},
        target_s=5.0,
        min_repeats=1,
        max_repeats=3,
        time_cap_s=60.0,
    ),
    # Local-linear's search in one feature, up to the 2·10^5 points of its goal.
    "fit-local-linear": Preset(
        {("fit", "local-linear"): (1000, 10000, 100000, 200000)},
        target_s=5.0,
        min_repeats=1,
        max_repeats=3,
        time_cap_s=60.0,
    ),
    # Several features, one bandwidth each: both estimators on two and three
    # features, uniform, clustered and tied (integer, long-tailed) data, up to
    # the 60 000 rows of a typical tabular data set.
    "fit-features": Preset(
        {
            ("fit", "local-constant"): (3000, 10000, 60000),
            ("fit", "local-linear"): (3000, 10000, 60000),
        },
        target_s=5.0,
        min_repeats=1,
        max_repeats=3,
        time_cap_s=60.0,
        data=("uniform", "clustered", "tied"),
        dims=(2, 3),
    ),
    # Block skipping: nwfast beside its own dense pass, torch.compile and KeOps'
    # block-sparse ranges, on the bandwidths users pick; every call checked.
    # The goals' cases: 2^18 uniform on [0, 5) at h = 0.01 (d = 1), and in the
    # unit square at h = 0.01 (d = 2).
    "sparse": Preset(
        {
            ("shared", "forward"): (1 << 16, 1 << 18, 1 << 20, 1 << 22),
            ("shared", "fwd+bwd"): (1 << 16, 1 << 18),
        },
        target_s=1.0,
        min_repeats=1,
        max_repeats=10,
        time_cap_s=30.0,
        data=("uniform", "normal", "clustered"),
        h_rules=("silverman", "loo", "loo/10"),
        dims=(1, 2, 3),
        max_n={2: 1 << 20, 3: 1 << 20},
        peers=("nwfast", "nwfast-dense", "torch-compile", "pykeops-sparse"),
        goals=(
            {"op": "shared", "mode": "forward", "n": 1 << 18, "d": 1, "h_rule": "h=0.01"},
            {"op": "shared", "mode": "fwd+bwd", "n": 1 << 18, "d": 1, "h_rule": "h=0.01"},
            {
                "op": "shared",
                "mode": "forward",
                "n": 1 << 18,
                "d": 2,
                "h_rule": "h=0.01",
                "data": "unit",
            },
        ),
    ),
    # Far fields (the fast Gauss transform): nwfast with its expansions, with
    # block skipping alone, dense, and KDEpy's FFTKDE (a grid) at the
    # bandwidths users pick, d = 1 and 2, every call checked. The goals' cases:
    # 10^7 points on [0, 5) at Silverman's h (d = 1), 10^6 in the unit square
    # (d = 2), and NadarayaWatson("loo") fits of 10^6 and 10^7 points.
    "fgt": Preset(
        {
            ("shared", "forward"): (1 << 16, 1 << 18, 1 << 20, 1 << 22, FGT_N),
            ("shared", "fwd+bwd"): (1 << 16, 1 << 18, 1 << 20),
        },
        target_s=1.0,
        min_repeats=1,
        max_repeats=5,
        time_cap_s=30.0,
        data=("uniform", "normal", "clustered"),
        h_rules=("silverman", "loo", "loo/10"),
        dims=(1, 2),
        max_n={2: 1 << 20},
        peers=("nwfast", "nwfast-skip", "nwfast-dense", "kdepy-fft"),
        uncapped=("nwfast",),  # the others' goal cases would take hours
        goals=(
            {"op": "shared", "mode": "forward", "n": FGT_N, "d": 1, "h_rule": "silverman"},
            {
                "op": "shared",
                "mode": "forward",
                "n": 10**6,
                "d": 2,
                "h_rule": "silverman",
                "data": "unit",
            },
            *(
                {
                    "op": "fit",
                    "mode": "local-constant",
                    "n": n,
                    "d": 1,
                    "dtype": "float64",
                    "w_kind": None,
                    "h_rule": None,
                }
                for n in (10**6, FGT_N)
            ),
        ),
    ),
}


def plan(
    preset: Preset,
    peers,
    *,
    device,
    dtypes,
    dims=None,
    ops=None,
    modes=None,
    sizes=None,
    w_kind="scalar",
    data=None,
    h_rules=None,
) -> list[Case]:
    """Every case of a run, in the order they are reported: per (op, mode, dtype,
    d, data, h_rule), sizes ascending, all peers of a size together in registry
    order; then the preset's goal cases.

    ``ops``, ``modes``, ``data`` and ``h_rules`` pick among the preset's (dims
    replace them); with ``sizes`` every op and mode picked (the preset's by
    default) runs at those sizes instead, and the goal cases are left out.
    """
    pairs = {
        k: v
        for k, v in preset.sizes.items()
        if (not ops or k[0] in ops) and (not modes or k[1] in modes)
    }
    if sizes:
        ops = ops or dict.fromkeys(op for op, _ in preset.sizes)
        modes = modes or dict.fromkeys(mode for _, mode in preset.sizes)
        pairs = {
            (op, mode): sizes
            for op in ops
            for mode in modes
            if (op == "fit") == (mode in FIT_MODES)
        }
    picked_dims, dims = dims, dims or preset.dims or (1,)
    cases = []
    for (op, mode), op_sizes in pairs.items():
        for dtype in dtypes:
            for d in (1,) if op == "rows" else dims:
                for family in data or preset.data:
                    # A fit chooses its own bandwidth: no w of the case's.
                    for h_rule in (None,) if op == "fit" else h_rules or preset.h_rules:
                        largest = preset.max_n.get(d, math.inf)
                        for n in (size for size in op_sizes if size <= largest):
                            extra = {"w_kind": None if op == "fit" else w_kind}
                            extra.update(data=family, h_rule=h_rule)
                            for peer in peers:
                                cases.append(Case(peer, op, mode, dtype, device, n, n, d, **extra))
    for goal in () if sizes else preset.goals:
        # A goal's cases run whatever the time cap predicts: the goal needs them.
        picked = (ops, goal["op"]), (modes, goal["mode"]), (picked_dims, goal["d"])
        if any(chosen and value not in chosen for chosen, value in picked):
            continue
        fields = {"dtype": dtypes[0], "device": device, "m": goal["n"], "w_kind": w_kind, **goal}
        cases += [Case(peer, **fields) for peer in peers]
    return cases


def is_goal(case: Case, preset: Preset) -> bool:
    """Whether the case is one the preset's goals are judged on."""
    return any(all(getattr(case, k) == v for k, v in g.items()) for g in preset.goals)
