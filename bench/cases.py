"""The registry of cases: operator x layout x mode x dtype x size x d, and their inputs.

A case is one peer computing one operator on one set of inputs. Every peer of
a case gets the same inputs (same seed), so their times and outputs compare.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# Which public operator each layout exercises, and with which flag.
LAYOUTS = {
    "shared": {"operator": "nw_pool", "exclude_self": False},
    "shared_loo": {"operator": "nw_pool", "exclude_self": True},
    "rows": {"operator": "nw_pool_rows", "exclude_self": False},
}
MODES = ("forward", "backward", "fwd+bwd")
DTYPES = ("float32", "float64", "bfloat16", "float16")
W_KINDS = ("scalar", "per_key")

# The textbook's data: keys spread over [0, 5), y = 2 sin(x) + x^0.8 + noise.
# h = 0.5 (w = 1 / h^2 = 4) lets every query see a few dozen percent of the keys
# with weights far from underflow, so no kernel can win by skipping zeros.
X_RANGE = 5.0
H = 0.5
W = 1.0 / H**2
NOISE = 0.5
SEED = 0

# Sizes (n = m) per (layout, mode). The quick plan is the README's default run:
# n = m = 16384 forward for every peer, and one size per layout past the point
# where the dense reference runs out of the default memory cap (4 GiB:
# n = m = 32768 needs 4 GiB for one float32 n x m matrix; the rows layout's
# reference needs ~3 more n x m matrices beside its 2 n x m inputs).
QUICK_SIZES = {
    ("shared", "forward"): (4096, 16384, 65536),
    ("shared_loo", "forward"): (4096, 32768),
    ("rows", "forward"): (4096, 16384),
    ("shared", "fwd+bwd"): (4096, 16384),
}
FULL_SIZES = {
    "shared": (1024, 4096, 16384, 65536, 262144),
    "shared_loo": (1024, 4096, 16384, 65536),
    "rows": (1024, 4096, 16384, 32768),
}
# The GPU suite: shared keys from 4096 to 2^20; rows up to what the card holds.
GPU_SIZES = {
    "shared": (4096, 16384, 65536, 262144, 1048576),
    "rows": (4096, 16384, 32768, 65536),
}


@dataclass(frozen=True)
class Case:
    peer: str
    layout: str
    mode: str
    dtype: str
    device: str
    n: int
    m: int
    d: int = 1
    w_kind: str = "scalar"

    @property
    def operator(self) -> str:
        return LAYOUTS[self.layout]["operator"]

    @property
    def exclude_self(self) -> bool:
        return LAYOUTS[self.layout]["exclude_self"]

    @property
    def pairs(self) -> int:
        return self.n * self.m

    @property
    def itemsize(self) -> int:
        return {"float64": 8, "float32": 4}.get(self.dtype, 2)

    def fields(self) -> dict:
        return {**asdict(self), "operator": self.operator, "pairs": self.pairs}

    def label(self) -> str:
        size = f"{self.n}²" if self.n == self.m else f"{self.n}x{self.m}"
        extra = "" if self.d == 1 else f" d={self.d}"
        extra += "" if self.w_kind == "scalar" else " w/key"
        return f"{self.layout} {self.mode} {self.dtype} {size}{extra} {self.peer}"


def check_case(case: Case) -> None:
    """Reject what no peer can run, with the reason."""
    if case.layout not in LAYOUTS:
        raise ValueError(f"layout {case.layout!r}: expected one of {list(LAYOUTS)}")
    if case.mode not in MODES:
        raise ValueError(f"mode {case.mode!r}: expected one of {list(MODES)}")
    if case.dtype not in DTYPES:
        raise ValueError(f"dtype {case.dtype!r}: expected one of {list(DTYPES)}")
    if case.layout == "shared_loo" and case.n != case.m:
        raise ValueError("shared_loo needs n == m (the queries are the keys)")
    if case.layout == "rows" and case.d != 1:
        raise ValueError("the rows layout is d = 1 only")


def work(case: Case) -> tuple[str, float]:
    """What bounds the case from below: ('exp', exps) or ('bytes', bytes moved).

    The shared layouts read n + 2m numbers and do one exp per pair and pass:
    the forward needs p_ij once, the backward must recompute it once (it is
    never stored), so fwd+bwd needs two. The rows layout reads its 2 n m
    inputs once; its backward also writes 2 n m gradients.
    """
    if case.layout == "rows":
        per_pass = 2 * case.pairs * case.itemsize
        passes = {"forward": 1, "backward": 2, "fwd+bwd": 3}[case.mode]
        return "bytes", float(per_pass * passes)
    return "exp", float(case.pairs * {"forward": 1, "backward": 1, "fwd+bwd": 2}[case.mode])


def input_bytes(case: Case) -> int:
    if case.layout == "rows":
        numbers = 2 * case.n * case.m + case.n
    else:
        numbers = case.n * case.d + case.m * case.d + case.m
    numbers += case.m if case.w_kind == "per_key" else 1
    return numbers * case.itemsize


def make_inputs(case: Case):
    """The textbook's inputs for a case, on its device, in its dtype.

    Returns a dict: query, key (keys for rows), value (values for rows), w, and
    grad_out for the backward modes. In the shared_loo layout the query *is*
    the key tensor, as in the textbook's leave-one-out training loop.
    """
    import torch

    # Drawn in float32 on the case's device (the rows layout's inputs are
    # large: made where they are used), then rounded to the case's dtype:
    # every peer and dtype of a device sees the same numbers.
    gen = torch.Generator(device=case.device).manual_seed(SEED)
    dtype = getattr(torch, case.dtype)
    f32 = torch.float32
    dev = {"dtype": f32, "device": case.device, "generator": gen}

    def target(x):
        return 2 * torch.sin(x) + x.pow(0.8) + torch.randn(x.shape, **dev) * NOISE

    def cast(t):
        return t.to(dtype)

    n, m, d = case.n, case.m, case.d
    if case.layout == "rows":
        # Row by row: the n x m inputs are the only n x m memory this
        # layout may use, temporaries included.
        keys = torch.empty((n, m), dtype=dtype, device=case.device)
        values = torch.empty_like(keys)
        step = max(1, (1 << 22) // m)
        for i in range(0, n, step):
            k = torch.rand((min(step, n - i), m), **dev) * X_RANGE
            keys[i : i + step] = cast(k)
            values[i : i + step] = cast(target(k))
        query = cast(torch.rand(n, **dev) * X_RANGE)
        inputs = {"query": query, "key": keys, "value": values}
    else:
        if d == 1:
            key = torch.sort(torch.rand(m, **dev) * X_RANGE).values
            value = target(key)
        else:
            key = torch.rand((m, d), **dev) * X_RANGE
            value = target(key[:, 0])[:, None]  # (m, c = 1): the (B..., m, c) form
        key, value = cast(key), cast(value)
        if case.exclude_self:
            query = key
        else:
            shape_q = (n,) if d == 1 else (n, d)
            query = cast(torch.rand(shape_q, **dev) * X_RANGE)
        inputs = {"query": query, "key": key, "value": value}
    if case.w_kind == "per_key":
        w = W * (0.5 + torch.rand(m, **dev))
    else:
        w = torch.full((1,), W, dtype=f32, device=case.device)  # nn.Parameter((1,))
    inputs["w"] = cast(w)
    if case.mode != "forward":
        out_shape = (n,) if (case.d == 1 or case.layout == "rows") else (n, 1)
        inputs["grad_out"] = cast(torch.randn(out_shape, **dev))
    return inputs


def parse_sizes(text: str) -> tuple[int, ...]:
    """'4096,16k,2^20,1e6' -> (4096, 16384, 1048576, 1000000)."""
    sizes = []
    for tok in text.replace(" ", "").split(","):
        if not tok:
            continue
        if "^" in tok:
            base, exp = tok.split("^")
            sizes.append(int(base) ** int(exp))
        elif tok[-1] in "kK":
            sizes.append(int(tok[:-1]) * 1024)
        elif tok[-1] in "mM":
            sizes.append(int(tok[:-1]) * 1024 * 1024)
        else:
            sizes.append(int(float(tok)))
    if not sizes or min(sizes) < 2:
        raise ValueError(f"sizes {text!r}: need a comma list of integers >= 2")
    return tuple(sorted(set(sizes)))


def plan(
    *,
    preset: str,
    device: str,
    layouts,
    modes,
    dtypes,
    dims,
    peers,
    sizes=None,
    w_kind="scalar",
) -> list[Case]:
    """Every case of a sweep, in the order they run.

    Sizes ascend within each (layout, mode, dtype, d), all peers of one size
    together, nwfast first: a peer's time at one size predicts the next, which
    is how the sweep skips cases that would run past the time cap.
    """
    table = {"quick": QUICK_SIZES, "full": FULL_SIZES, "gpu": GPU_SIZES}[preset]
    cases = []
    for layout in layouts:
        for mode in modes:
            if sizes is not None:
                these = sizes
            elif preset == "quick":
                these = table.get((layout, mode), ())
            else:
                these = table.get(layout, ())
            for dtype in dtypes:
                for d in dims if layout != "rows" else (1,):
                    for size in these:
                        for peer in peers:
                            case = Case(peer, layout, mode, dtype, device, size, size, d, w_kind)
                            check_case(case)
                            cases.append(case)
    return cases


def family(case: Case) -> tuple:
    """Cases that differ only in size: the time of one predicts the next."""
    return (case.peer, case.layout, case.mode, case.dtype, case.device, case.d, case.w_kind)


def predict_s(case: Case, done: dict[tuple, dict]) -> float | None:
    """Predicted time of one call from the largest smaller size already timed."""
    prev = done.get(family(case))
    if not prev or not prev.get("median_s") or not prev.get("pairs"):
        return None
    return prev["median_s"] * case.pairs / prev["pairs"]


def human_bytes(b: float | None) -> str:
    if b is None or (isinstance(b, float) and math.isnan(b)):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(b) < 1024 or unit == "TiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return str(b)


def parse_bytes(text: str) -> int:
    """'4GiB', '512M', '2e9' -> bytes."""
    t = text.strip().lower().replace(" ", "").rstrip("b").rstrip("i")
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    if t and t[-1] in mult:
        return int(float(t[:-1]) * mult[t[-1]])
    return int(float(t))
