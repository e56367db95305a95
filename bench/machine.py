"""The machine's limits, measured in the same run as the cases they bound.

CPU: the shared layouts are bound by exp throughput, probed on all threads over
arrays that stay in cache twice: with torch's vectorised exp (accurate to an
ulp or so), and with the branch-free polynomial exp2 that nwfast's Numba
kernels inline (exact to float32 rounding, and faster). The limit is the
faster of the two: the most exps per second anything known here gets out of
the machine. The rows layout is bound by memory bandwidth, probed on arrays
far larger than the caches twice: a copy (read + write bytes) and a read-only
sum. On a CPU the copy's count misses the write-allocate read of each cache
line it stores, so a read-only kernel like the rows layout's can beat it;
the limit is the faster of the two.

GPU: the exp unit (MUFU) issues 16 exp2 per clock per SM on Ampere and Hopper,
so the bound is SMs x 16 x max SM clock (H100 SXM: 132 x 16 x 1.98 GHz =
4.2e12/s; the FlashAttention-3 paper quotes 3.9e12/s at 1.83 GHz). A Triton
kernel of independent exp2 chains measures what the unit really gives, and a
1 GiB copy and read measure the bandwidth that bounds the rows layout.
"""

from __future__ import annotations

import shutil
import subprocess
import time

EXP_PER_CLOCK_PER_SM = 16


def _best_rate(fn, work: float, seconds: float, sync=lambda: None) -> float:
    """Highest work / time over repeated calls of fn for about `seconds`."""
    fn()
    sync()
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        fn()
        sync()
        best = max(best, work / (time.perf_counter() - t))
    return best


def _numba_exp_rate(threads: int) -> float:
    """exp2 per second of nwfast's polynomial exp over arrays in cache.

    One plain vectorised loop per thread, run from Python threads (the loop
    releases the GIL): Numba's prange around the loop stopped LLVM from
    vectorising it, which would measure the scalar exp instead.
    """
    from concurrent.futures import ThreadPoolExecutor

    import numba
    import numpy as np

    from nwfast.kernels import numba_target
    from nwfast.kernels.numba_exp import exp2

    # A sum, not a store per exp: the fused kernels keep their weights in
    # registers, and a store per element would measure store bandwidth. The
    # kernels' own target: the vector width they compile with.
    @numba.njit(fastmath={"contract", "reassoc", "nsz"}, nogil=True, _target=numba_target.NAME)
    def exps(x, reps):
        total = np.float32(0)
        for _ in range(reps):
            for i in range(x.size):
                total += exp2(x[i])
        return total

    # 16 Ki float32 per thread: 64 KiB, inside L2.
    rng = np.random.default_rng(0)
    xs = [(rng.random(1 << 14, dtype=np.float32) * -20).astype(np.float32) for _ in range(threads)]
    reps = 512
    with ThreadPoolExecutor(threads) as pool:

        def run():
            list(pool.map(lambda i: exps(xs[i], reps), range(threads)))

        return _best_rate(run, float(threads << 14) * reps, 0.5)


def cpu_limits() -> dict:
    import torch

    best_exp, best_at = 0.0, None
    # Small arrays pay the thread pool's dispatch; large ones pay memory.
    # The best of a few sizes is the exp rate itself.
    for log2 in (18, 20, 22):
        x = torch.rand(1 << log2) * -10
        y = torch.empty_like(x)
        calls = max(1, (1 << 24) >> log2)

        def run(x=x, y=y, calls=calls):
            for _ in range(calls):
                torch.exp(x, out=y)

        rate = _best_rate(run, float(calls << log2), 0.4)
        if rate > best_exp:
            best_exp, best_at = rate, log2
    threads = torch.get_num_threads()
    out = {
        "torch_exp_per_s": best_exp,
        "torch_exp_source": f"torch.exp float32 over 2^{best_at} elements, {threads} threads",
    }
    try:
        out["poly_exp_per_s"] = _numba_exp_rate(threads)
        out["poly_exp_source"] = (
            f"nwfast's Numba exp2 polynomial, 2^14 float32 per thread, {threads} threads"
        )
    except Exception as exc:  # nwfast's kernels absent: torch's exp still bounds
        out["poly_exp_per_s"] = None
        out["poly_exp_source"] = f"probe failed: {type(exc).__name__}: {exc}"
    use_poly = (out["poly_exp_per_s"] or 0) > best_exp
    out["exp_per_s"] = out["poly_exp_per_s"] if use_poly else best_exp
    out["exp_source"] = "probe: " + (
        out["poly_exp_source"] if use_poly else out["torch_exp_source"]
    )
    out.update(_memory_limits(1 << 26, "256 MiB", "cpu"))  # far past any cache
    return out


def _numba_read(src, threads: int):
    """A read-only pass over src in Numba, one slice per thread: torch.sum
    stops short of what a CPU's memory can stream."""
    from concurrent.futures import ThreadPoolExecutor

    import numba
    import numpy as np

    @numba.njit(fastmath=True, nogil=True)
    def total(x):
        s = np.float32(0)
        for i in range(x.size):
            s += x[i]
        return s

    parts = np.array_split(src.numpy(), threads)
    total(parts[0][:16])
    pool = ThreadPoolExecutor(threads)
    return lambda: list(pool.map(total, parts))


def _memory_limits(numel: int, size: str, device: str) -> dict:
    """Copy and read bandwidth over float32 arrays of numel elements."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    src = torch.rand(numel, device=device)
    dst = torch.empty_like(src)
    nbytes = 4.0 * numel
    copy = _best_rate(lambda: dst.copy_(src), 2 * nbytes, 0.5, sync)
    read_fn, how = (lambda: src.sum()), "Tensor.sum"
    if device == "cpu":
        try:
            read_fn, how = _numba_read(src, torch.get_num_threads()), "a Numba sum per thread"
        except ImportError:
            pass
    read = _best_rate(read_fn, nbytes, 0.5, sync)
    best = "copy" if copy >= read else "read"
    return {
        "copy_bytes_per_s": copy,
        "copy_source": f"probe: Tensor.copy_ of {size} float32, read + write bytes",
        "read_bytes_per_s": read,
        "read_source": f"probe: {how} over {size} float32",
        "mem_bytes_per_s": max(copy, read),
        "mem_source": f"the faster of the two probes: {best}",
    }


def gpu_info() -> dict:
    import torch

    props = torch.cuda.get_device_properties(0)
    return {
        "name": props.name,
        "sm_count": props.multi_processor_count,
        "capability": f"{props.major}.{props.minor}",
        "memory_bytes": props.total_memory,
        "max_sm_clock_mhz": _max_sm_clock_mhz(),
    }


def _max_sm_clock_mhz() -> float | None:
    if not shutil.which("nvidia-smi"):
        return None
    query = ["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits", "-i", "0"]
    try:
        out = subprocess.run(query, capture_output=True, text=True, timeout=20, check=True)
        return float(out.stdout.strip().splitlines()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def _exp_probe_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def exp_chains(x_ptr, out_ptr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs)
        # Each element is its own dependent chain; BLOCK / threads chains per
        # thread and many warps per SM hide the latency, so the exp unit's
        # issue rate is what limits. x stays in (0, 1]: no inf, no denormals.
        for _ in range(ITERS):
            x = tl.math.exp2(x * -0.5)
        tl.store(out_ptr + offs, x)

    return exp_chains


def gpu_exp_probe(numel: int = 1 << 24, iters: int = 256) -> float:
    """Measured exp2 per second of a Triton kernel that does nothing else."""
    import torch

    kernel = _exp_probe_kernel()
    block = 1024
    x = torch.rand(numel, device="cuda")
    out = torch.empty_like(x)
    grid = (numel // block,)

    def run():
        kernel[grid](x, out, ITERS=iters, BLOCK=block, num_warps=4)

    return _best_rate(run, float(numel) * iters, 1.0, torch.cuda.synchronize)


def gpu_limits(info: dict) -> dict:
    """The exp unit's bound from the card's SMs and clock, the exp probe, memory."""
    limits: dict = {}
    clock = info["max_sm_clock_mhz"]
    if clock:
        bound = info["sm_count"] * EXP_PER_CLOCK_PER_SM * clock * 1e6
        source = (
            f"{info['sm_count']} SMs x {EXP_PER_CLOCK_PER_SM} exp/clock x "
            f"{clock:.0f} MHz (max SM clock)"
        )
    elif "H100" in info["name"]:
        bound, source = 3.9e12, "FlashAttention-3 paper's H100 SXM figure"
    else:
        bound, source = None, "unknown: no SM clock could be read"
    limits.update(exp_per_s=bound, exp_source=source)
    try:
        limits["exp_probe_per_s"] = gpu_exp_probe()
        limits["exp_probe_source"] = "probe: Triton kernel of exp2 chains, 2^24 x 256"
    except Exception as exc:  # the bound above still stands without it
        limits["exp_probe_per_s"] = None
        limits["exp_probe_source"] = f"probe failed: {type(exc).__name__}: {exc}"
    limits.update(_memory_limits(1 << 28, "1 GiB", "cuda"))
    return limits
