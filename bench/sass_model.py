"""What a compiled kernel costs on a GPU, read from its SASS: the model behind
``python -m bench sass`` (``bench.sass``).

Throughput per SM and clock (``ARCHS``), from the CUDA C++ Programming Guide's
table "Throughput of Native Arithmetic Instructions" (results per clock cycle per
multiprocessor) and its table of technical specifications per compute
capability; the issue rate is four warp schedulers, each issuing one warp
instruction (32 thread-instructions) a clock. FACTS.md's figures agree for sm_90
(16 exp, 128 FP32, 64 FP64 per clock per SM); for sm_80 the guide gives half of
those FP32 and FP64 rates (A100: 64 FP32 lanes an SM, 19.5 TFLOPS at 108 SMs and
1.41 GHz). sm_100 is taken equal to sm_90 for the rates below (B200's published
75 TFLOPS FP32 and 37.5 TFLOPS FP64 at 148 SMs and 1.98 GHz give 128 and 64).

The kernel's hottest loop bounds its speed: an SM spends on a (query, key) pair
at least the largest of its instruction counts per pair over the rate of the
pipe that runs them. ``predict`` turns a loop's instruction mix per pair into
clocks per pair, the pipe that binds, and the fraction of the exp unit's bound
(one ``MUFU.EX2`` per pair at 16 a clock) that the loop can reach, before
latency and occupancy.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import NamedTuple

SOURCES = {
    "throughput": "CUDA C++ Programming Guide, 'Arithmetic Instructions': throughput of "
    "native arithmetic instructions, per clock per multiprocessor (compute capability "
    "8.0 and 9.0; 10.0 taken as 9.0)",
    "limits": "CUDA C++ Programming Guide, 'Technical Specifications per Compute "
    "Capability': registers, warps, blocks and shared memory per SM",
    "pipes": "Nsight Compute Kernel Profiling Guide, 'Pipelines': FP32 arithmetic on "
    "the FMA pipe; compare, min/max, select and integer logic on the ALU; MUFU and "
    "conversions on the XU",
    "exp": "FACTS.md: 16 exp per clock per SM (FlashAttention-3, arXiv 2407.08608: "
    "H100 SXM 3.9e12 exp/s = 16 x 132 SMs x 1.83 GHz)",
    "cards": "NVIDIA data sheets: SM counts; boost clocks from the published FP32 "
    "rate (FP32 TFLOPS = SMs x FP32 lanes x 2 x clock)",
}


class Arch(NamedTuple):
    """Per SM and clock: thread-instructions of each pipe, and the SM's limits."""

    issue: int  # all instructions: 4 schedulers x 32 threads
    fma: int  # FADD, FMUL, FFMA (and the packed half-precision forms)
    alu: int  # compare, min/max, select; integer add, logic, shift, multiply
    xu: int  # MUFU (exp2, rcp, ...) and conversions
    fp64: int  # DADD, DMUL, DFMA
    max_warps: int
    max_blocks: int
    registers: int  # 32-bit registers per SM
    shared: int  # shared memory per SM, bytes
    shared_per_block: int  # the most one block may use, bytes
    reserved_shared: int  # the system's shared memory per block, bytes


ARCHS = {
    80: Arch(128, 64, 64, 16, 32, 64, 32, 65536, 164 * 1024, 163 * 1024, 1024),
    90: Arch(128, 128, 64, 16, 64, 64, 32, 65536, 228 * 1024, 227 * 1024, 1024),
    100: Arch(128, 128, 64, 16, 64, 64, 32, 65536, 228 * 1024, 227 * 1024, 1024),
}
EXP_PER_CLOCK = 16  # the exp unit's rate per SM, every arch above


class Card(NamedTuple):
    arch: int
    sms: int
    clock_ghz: float


CARDS = {
    "A100 SXM": Card(80, 108, 1.41),
    "H100 SXM": Card(90, 132, 1.98),
    "H200": Card(90, 132, 1.98),
    "B200": Card(100, 148, 1.98),
}
PREDICT_SIZES = (2**18, 2**20)  # n = m for the predicted times

# Opcodes (the part before the first dot) by what they are. Counted per pair in
# the report; anything else is "other".
CATEGORIES = {
    "mufu": {"MUFU"},
    "fp32": {
        "FADD",
        "FMUL",
        "FFMA",
        "FADD32I",
        "FMUL32I",
        "FFMA32I",
        "FMNMX",
        "FSEL",
        "FSETP",
        "FSET",
        "FCHK",
        "FSWZADD",
        "HADD2",
        "HMUL2",
        "HFMA2",
        "HMNMX2",
        "HSETP2",
        "HSET2",
    },  # fmt: skip
    "fp64": {"DADD", "DMUL", "DFMA", "DSETP", "DMNMX", "DSET"},
    "conversion": {"F2F", "F2I", "I2F", "I2I", "FRND", "F2FP", "I2FP", "F2IP"},
    "load": {"LDG", "LDS", "LDC", "LDL", "LD", "ULDC", "LDSM", "LDGSTS", "LDGDEPBAR"},
    "store": {"STG", "STS", "STL", "ST"},
    "integer": {
        "IADD3",
        "IADD",
        "IADD32I",
        "IMAD",
        "IMUL",
        "IMNMX",
        "VIMNMX",
        "VIADDMNMX",
        "VIADD",
        "LOP3",
        "LOP",
        "LOP32I",
        "ISETP",
        "SHF",
        "SHL",
        "SHR",
        "LEA",
        "IABS",
        "SEL",
        "POPC",
        "FLO",
        "BREV",
        "BMSK",
        "SGXT",
        "PLOP3",
        "P2R",
        "R2P",
        "PRMT",
        "ISCADD",
        "IDP",
    },  # fmt: skip
    "tensor": {"HMMA", "HGMMA", "IMMA", "DMMA", "UTCMMA", "UTCHMMA", "WARPGROUP"},
}
_CATEGORY = {op: cat for cat, ops in CATEGORIES.items() for op in ops}
# Which pipe bounds each opcode beyond the issue rate (None: issue only).
_FMA_OPS = {"FADD", "FMUL", "FFMA", "FADD32I", "FMUL32I", "FFMA32I", "HADD2", "HMUL2", "HFMA2"}
_XU_OPS = {"MUFU", "F2F", "F2I", "I2F", "I2I", "FRND"}
_FP64_OPS = CATEGORIES["fp64"]
_ALU_OPS = CATEGORIES["integer"] | {"FMNMX", "FSEL", "FSETP", "FSET", "I2FP", "F2FP", "F2IP"}

# --- reading SASS ------------------------------------------------------------------

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_GUARD = re.compile(r"@!?U?P[0-9T]+\s+")
_TARGET = re.compile(r"0x([0-9a-f]+)\s*$")


class Instr(NamedTuple):
    addr: int
    op: str  # the whole opcode, with its modifiers: MUFU.EX2, LDG.E.128
    guarded: bool  # carries a predicate (@P0): may not take effect
    operands: str

    @property
    def base(self):
        return self.op.split(".", 1)[0]


def parse(sass: str) -> list[Instr]:
    """The instructions of the first function of ``cuobjdump -sass`` output."""
    out = []
    for line in sass.splitlines():
        if "Function :" in line and out:
            break
        hit = _LINE.search(line)
        if not hit:
            continue
        text = hit.group(2)
        guard = _GUARD.match(text)
        body = text[guard.end() :] if guard else text
        op, _, operands = body.partition(" ")
        out.append(Instr(int(hit.group(1), 16), op, guard is not None, operands.strip()))
    return out


def _branch_target(ins: Instr) -> int | None:
    if ins.base not in ("BRA", "JMP", "CALL"):
        return None
    hit = _TARGET.search(ins.operands)
    return int(hit.group(1), 16) if hit else None


def _conditional(ins: Instr) -> bool:
    # "@P0 BRA 0x..", "BRA P2, 0x..", "BRA.U !UP0, 0x..": the branch may fall through.
    return ins.guarded or "," in ins.operands


def _ends_block(ins: Instr) -> bool:
    return ins.base in ("BRA", "BRX", "JMP", "JMX", "EXIT", "RET", "KILL")


class Loop(NamedTuple):
    head: int  # address of the first instruction
    tail: int  # address of the backward branch

    def holds(self, addr):
        return self.head <= addr <= self.tail

    def inside(self, other):
        return self != other and other.head <= self.head and self.tail <= other.tail


def loops(instrs: list[Instr]) -> list[Loop]:
    """Loops as the spans of backward branches (one per head: the farthest)."""
    tails = {}
    for ins in instrs:
        target = _branch_target(ins)
        if ins.base in ("BRA", "JMP") and target is not None and target < ins.addr:
            tails[target] = max(tails.get(target, 0), ins.addr)
    return sorted(Loop(h, t) for h, t in tails.items())


def _own(loop: Loop, all_loops: list[Loop], instrs: list[Instr]) -> list[Instr]:
    inner = [x for x in all_loops if x.inside(loop)]
    return [i for i in instrs if loop.holds(i.addr) and not any(x.holds(i.addr) for x in inner)]


def hottest_loop(instrs: list[Instr]) -> Loop | None:
    """The loop that computes the exponentials: the most ``MUFU.EX2`` among its own
    instructions (not counting loops nested in it); where there is none (float64's
    exp is a DFMA polynomial) the most FP64 instructions. Ties: the innermost."""
    found = loops(instrs)

    def weight(loop, ops):
        return sum(1 for i in _own(loop, found, instrs) if i.op in ops or i.base in ops)

    for ops in ({"MUFU.EX2"}, _FP64_OPS):
        scored = [(weight(x, ops), -(x.tail - x.head), x) for x in found]
        scored = [s for s in scored if s[0] > 0]
        if scored:
            return max(scored)[2]
    return None


class Path(NamedTuple):
    """One way round a loop: its instructions by opcode, ``MUFU.EX2`` among them."""

    ops: Counter
    exps: int
    slots: int


def hot_path(instrs: list[Instr], loop: Loop, exps_needed: int) -> Path | None:
    """The cheapest way round ``loop`` (fewest instructions issued) among those that
    compute at least ``exps_needed`` exponentials (fewer where no path does):
    for a tile loop, the unmasked tile beside the masked one, the fast path of an
    exp beside its fix-up for huge arguments. Loops nested inside count once.

    Works on the loop's control-flow graph without its backward edges; each block
    keeps only the paths no other path beats on both exps and instructions.
    """
    body = [i for i in instrs if loop.holds(i.addr)]
    starts = {body[0].addr}
    for k, ins in enumerate(body):
        target = _branch_target(ins)
        if target is not None and loop.holds(target):
            starts.add(target)
        if (_ends_block(ins) or ins.base == "CALL") and k + 1 < len(body):
            starts.add(body[k + 1].addr)
    blocks, current = [], []
    for ins in body:
        if ins.addr in starts and current:
            blocks.append(current)
            current = []
        current.append(ins)
    blocks.append(current)
    index = {b[0].addr: k for k, b in enumerate(blocks)}

    def successors(k):
        # A CALL.REL.NOINC to a point inside the loop is ptxas's way out of a nested
        # loop (it returns nowhere): an edge; a real call leaves the loop and returns.
        last = blocks[k][-1]
        target = _branch_target(last)
        out = []
        jumps = last.base in ("BRA", "JMP")
        if target is not None and target > last.addr and target in index:
            out.append(index[target])
        falls = not _ends_block(last) or (jumps and _conditional(last))
        if falls and k + 1 < len(blocks):
            out.append(k + 1)
        return out

    def keep_best(found):
        # One path per (exps, slots), and none that another beats on both.
        unique = list({(p.exps, p.slots): p for p in reversed(found)}.values())
        return [
            p for p in unique
            if not any(q.exps >= p.exps and q.slots <= p.slots and q is not p for q in unique)
        ]  # fmt: skip

    def add(block, path):
        ops = path.ops + Counter(i.op for i in block)
        exps = path.exps + sum(1 for i in block if i.op == "MUFU.EX2")
        return Path(ops, exps, path.slots + len(block))

    paths = {0: [add(blocks[0], Path(Counter(), 0, 0))]}
    for k in range(len(blocks) - 1):
        here = keep_best(paths.pop(k, []))
        for s in successors(k):
            paths.setdefault(s, []).extend(add(blocks[s], p) for p in here)
    # None where no path reaches the backward branch (control flow not understood).
    return min(
        keep_best(paths.get(len(blocks) - 1, [])),
        key=lambda p: (-min(p.exps, exps_needed), p.slots),
        default=None,
    )


# What a cached reading of a kernel depends on (bench.sass keys its cache on it).
READING = (Instr, Loop, parse, _branch_target, _conditional, _ends_block, loops, _own)
READING += (hottest_loop, hot_path)

# --- what the counts mean ----------------------------------------------------------


def category(op: str) -> str:
    return _CATEGORY.get(op.split(".", 1)[0], "other")


def mix(ops: Counter) -> dict:
    """Instructions by category (CATEGORIES, then 'other')."""
    out = dict.fromkeys([*CATEGORIES, "other"], 0)
    for op, k in ops.items():
        out[category(op)] += k
    return out


def pipes(ops: Counter) -> dict:
    """Thread-instructions per pipe that has a rate of its own in ``Arch``."""
    out = {"issue": 0, "fma": 0, "alu": 0, "xu": 0, "fp64": 0}
    for op, k in ops.items():
        base = op.split(".", 1)[0]
        out["issue"] += k
        for pipe, members in (("fma", _FMA_OPS), ("alu", _ALU_OPS), ("xu", _XU_OPS)):
            if base in members:
                out[pipe] += k
        if base in _FP64_OPS:
            out["fp64"] += k
    return out


def predict(per_pair: dict, arch: int) -> dict | None:
    """Clocks an SM spends per pair, the pipe that sets it, and the fraction of the
    exp unit's bound (1 / 16 clock per pair) that leaves; None for an arch
    without a throughput table."""
    rates = ARCHS.get(arch)
    if rates is None:
        return None
    clocks = {pipe: per_pair[pipe] / getattr(rates, pipe) for pipe in per_pair}
    binding = max(clocks, key=clocks.get)
    per_pair_clocks = clocks[binding]
    exp_bound = 1 / EXP_PER_CLOCK
    return {
        "clocks_per_pair": per_pair_clocks,
        "bound_by": binding,
        "exp_bound_fraction": min(1.0, exp_bound / per_pair_clocks) if per_pair_clocks else None,
    }


def predicted_seconds(clocks_per_pair: float, arch: int) -> dict:
    """Time for n = m = each of PREDICT_SIZES on each card of this arch."""
    return {
        f"{card} n=m=2^{size.bit_length() - 1}": size
        * size
        * clocks_per_pair
        / (spec.sms * spec.clock_ghz * 1e9)
        for card, spec in CARDS.items()
        if spec.arch == arch
        for size in PREDICT_SIZES
    }


def occupancy(registers: int, shared: int, warps: int, arch: int) -> dict | None:
    """Blocks and warps an SM holds at once, and what limits them; None for an
    arch without limits. Registers are allocated 256 to a warp; shared memory in
    128-byte units with the system's reservation per block."""
    a = ARCHS.get(arch)
    if a is None:
        return None
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    per_block_shared = -(-(shared + a.reserved_shared) // 128) * 128
    limits = {
        "warps": a.max_warps // warps,
        "blocks": a.max_blocks,
        "registers": (a.registers // per_warp) // warps,
        "shared": a.shared // per_block_shared if shared <= a.shared_per_block else 0,
    }
    binding = min(limits, key=limits.get)
    blocks = limits[binding]
    return {
        "blocks_per_sm": blocks,
        "warps_per_sm": blocks * warps,
        "occupancy": blocks * warps / a.max_warps,
        "occupancy_limit": binding,
    }


# --- past the exp unit ----------------------------------------------------------

# One exp2 emulated on the FMA pipe, accurate to float32 rounding (the CPU
# kernel's way): round x to an integer with the 1.5 * 2^23 trick (2 FADD), its
# fraction (1 FADD), a degree-6 polynomial by Horner (6 FFMA), the integer part
# shifted into the exponent and added (SHF, IADD: 2 ALU). No MUFU, no conversion.
EMULATED_EXP = {"issue": 11, "fma": 9, "alu": 2, "xu": 0, "fp64": 0}


def emulated_exp(per_pair: dict, arch: int, cost: dict = EMULATED_EXP) -> dict | None:
    """The best fraction of a loop's exponentials to emulate (``cost`` each, in
    per-pipe instructions, instead of one MUFU) and what it gives: clocks per pair
    before and after and the speedup. FlashAttention-4's question, asked of the
    model: it pays only while the exp unit binds with room left on the others."""
    if arch not in ARCHS:
        return None

    def clocks(f):
        mixed = {
            pipe: per_pair[pipe] + f * (cost[pipe] - (pipe in ("issue", "xu"))) for pipe in per_pair
        }
        return predict(mixed, arch)["clocks_per_pair"]

    fractions = [k / 100 for k in range(101)]
    best = min(fractions, key=clocks)
    return {
        "fraction": best,
        "clocks_before": clocks(0.0),
        "clocks_after": clocks(best),
        "speedup": clocks(0.0) / clocks(best),
    }
