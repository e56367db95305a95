"""What the benchmark computes: operations, cases, their inputs and the presets.

A case is one peer computing one operation on one set of inputs. The operations:

- ``shared``, ``shared_loo``, ``rows``: the pooling operators, ``nw_pool``,
  ``nw_pool(..., exclude_self=True)`` and ``nw_pool_rows``, each timed in the
  modes ``forward``, ``backward`` (alone, over one retained graph) and ``fwd+bwd``;
- ``fit``: choosing the bandwidth by leave-one-out cross-validation, one whole
  fit timed; the mode names the estimator (``local-constant``: Nadaraya-Watson).

Every peer of a case gets the same inputs (one seed, one data family, one
bandwidth rule), so their times and outputs compare. ``bench.peers`` says who
computes what: cases x peers is the registry.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

POOL_OPS = ("shared", "shared_loo", "rows")
POOL_MODES = ("forward", "backward", "fwd+bwd")
FIT_MODES = ("local-constant",)
MODES = (*POOL_MODES, *FIT_MODES)
DTYPES = ("float32", "float64", "bfloat16", "float16")
W_KINDS = ("scalar", "per_key")

SEED = 0
NOISE = 0.5  # y = 2 sin(x) + x^0.8 + N(0, NOISE^2), the textbook's target


def _uniform(shape, **draw):
    import torch

    return 5.0 * torch.rand(shape, **draw)


# Data families: name -> points of a shape, from torch.rand's arguments.
DATA = {"uniform": _uniform}
# Bandwidth rules: name -> h from the keys (w = 1 / h^2). h = 0.5 on [0, 5)
# lets every query see a few dozen percent of the keys with weights far from
# underflow, so no kernel can win by skipping zeros.
H_RULES = {"h=0.5": lambda key: 0.5}


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
    w, and grad_out in the gradient modes. Fit: X (n, d) and y (n,), NumPy.
    Points are drawn in float32 and rounded to the case's dtype, so every peer
    and dtype of a device sees the same numbers.
    """
    import torch

    gen = torch.Generator(device=case.device).manual_seed(SEED)
    draw = {"dtype": torch.float32, "device": case.device, "generator": gen}
    dtype = getattr(torch, case.dtype)
    points = DATA[case.data]

    def target(x):
        return 2 * torch.sin(x) + x.pow(0.8) + NOISE * torch.randn(x.shape, **draw)

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
    key, value = key.to(dtype), value.to(dtype)
    # shared_loo: the queries are the keys, a tensor of their own so that the
    # gradients of both are judged one by one.
    query = key.clone() if case.exclude_self else points((n,) if d == 1 else (n, d), **draw)
    query = query.to(dtype)
    h = H_RULES[case.h_rule](key)
    if case.op == "rows":
        # The textbook's own construction: every query's row holds the same keys.
        x = {"query": query, "key": key.repeat(n, 1), "value": value.repeat(n, 1)}
    else:
        x = {"query": query, "key": key, "value": value}
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
}


def plan(
    preset: Preset,
    peers,
    *,
    device,
    dtypes,
    dims=(1,),
    ops=None,
    modes=None,
    sizes=None,
    w_kind="scalar",
) -> list[Case]:
    """Every case of a run, in the order they are reported: per (op, mode, dtype, d),
    sizes ascending, all peers of a size together in registry order.

    ``ops`` and ``modes`` pick among the preset's; with ``sizes`` every op and mode
    picked (the preset's by default) runs at those sizes instead.
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
    cases = []
    for (op, mode), op_sizes in pairs.items():
        # A fit chooses its own bandwidth: no w of the case's.
        extra = {"w_kind": None, "h_rule": None} if op == "fit" else {"w_kind": w_kind}
        for dtype in dtypes:
            for d in (1,) if op == "rows" else dims:
                for n in op_sizes:
                    for peer in peers:
                        cases.append(Case(peer, op, mode, dtype, device, n, n, d, **extra))
    return cases
