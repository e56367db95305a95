"""The Triton kernels as a GPU would run them, checked without one (``bench.sass``).

Every variant the launchers produce must compile for sm_80 and sm_90, and no
config the autotuner may pick (nor a launcher's fixed one) may spill inside a
loop; what ptxas keeps in local memory outside every loop (a value stored and
loaded once a program, for occupancy) stays within COLD_SPILL_LIMIT. The suite
compiles a representative set on both archs: every kernel, and for each kernel
every dtype, shape family, exclude_self, dense and sparse pass, set of needed
gradients and autotune config at least once (``bench.sass.representative``
without the headline variants: about 270 compiles, 6 minutes on 2 busy cores
from an empty cache, seconds from a filled one), plus each known failure below.
``python -m bench sass`` compiles all of it: every variant with every config,
about 5000 compiles for three archs (hours on 2 cores; minutes on a GPU
machine's cores), cached under ~/.cache/nwfast-sass.

KNOWN_FAILURES lists what still fails, each ``xfail(strict=True)``: an entry
that no longer fails must be removed.

The SASS reading and the throughput model are checked on hand-written listings.
"""

import json
import os

import pytest

from bench import sass, sass_model

ARCHS = (80, 90)
# Bytes stored and loaded outside every loop: 8 registers saved and restored.
COLD_SPILL_LIMIT = 64

# What still spills inside a loop, each xfail(strict=True): a fix fails its entry
# until removed.
KNOWN_FAILURES: dict[str, str] = {}


def _found():
    with sass.workers(1) as pool:
        return sass.variants(pool)


FOUND = _found()
EVERY = {sass.task_id(t): t for t in sass.tasks(FOUND, ARCHS)}
CHECKED = {sass.task_id(t): t for t in sass.representative_tasks(FOUND, ARCHS, headlines=False)}
CHECKED.update({k: EVERY[k] for k in KNOWN_FAILURES if k in EVERY})


@pytest.fixture(scope="module")
def compiled():
    jobs = max(2, min(8, os.cpu_count() or 2))
    with sass.workers(jobs) as pool:
        rows = sass.compile_all(pool, list(CHECKED.values()), sass.DEFAULT_CACHE, log=print)
    return {r["id"]: r for r in rows}


def _case(name):
    marks = ()
    if name in KNOWN_FAILURES:
        marks = pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[name])
    return pytest.param(name, id=name, marks=marks)


@pytest.mark.parametrize("name", [_case(n) for n in CHECKED])
def test_compiles_without_spills(compiled, name):
    r = compiled[name]
    assert r["status"] == "ok", f"{name}: {r['status']}: {r['error']}"
    assert not r["spills"], (
        f"{name}: {r['registers']} registers, {r['loop_spill_bytes']} bytes of spill "
        "stores and loads inside a loop"
    )
    assert r["cold_spill_bytes"] <= COLD_SPILL_LIMIT, (
        f"{name}: {r['registers']} registers, {r['cold_spill_bytes']} bytes of spill "
        "stores and loads outside the loops"
    )


def test_owned_values_cost_no_barrier_in_the_tile_loop(compiled):
    """The query-side passes load their owned values with one feature and
    channel in float32 (half-precision inputs included) once, before the tile
    loop (``triton_nw._owned_first``). Reloaded in the loop, they were converted
    to the tile's layout through shared memory every tile, a barrier each way
    (the forward at 512 x 8 and 256 x 16 tiles, half precision among the
    variants here)."""
    rows = [
        r for r in compiled.values()
        if r["status"] == "ok" and r["name"] in ("fwd", "dq", "tangent")
        and r["d"] == r["c"] == 1 and r["dtype"] != "float64"
    ]  # fmt: skip
    assert len({r["name"] for r in rows}) == 3
    barred = {
        r["id"]: n for r in rows
        if (n := sum(k for op, k in (r["path_ops"] or {}).items() if op.startswith("BAR")))
    }  # fmt: skip
    assert not barred, f"barriers on the hot path: {barred}"


def test_one_point_a_thread_within_128_registers():
    """The float32 and half-precision passes with a few features, in their
    heaviest variant (d = 3, c = 2, exclude_self, a plan, every gradient), each
    have a config in which every thread owns one point with at most 128
    registers (sm_90). The tangent's 128 x 8 holds 140 there: its 128 x 4
    (``triton_nw.HEAVY_TANGENT_CONFIG``) is the one."""
    heavy = [
        t for t in EVERY.values()
        if t["arch"] == 90 and t["variant"]["name"] in ("fwd", "dq", "dkv", "tangent")
        and t["variant"]["dtype"] != "float64" and t["variant"]["d"] == 3
        and t["variant"]["exclude_self"] and t["variant"]["sparse"]
        and t["variant"]["needs"] in ("", "kvw")
    ]  # fmt: skip
    with sass.workers(2) as pool:
        rows = sass.compile_all(pool, heavy, sass.DEFAULT_CACHE, log=print)
    lightest = {}
    for r in rows:
        cfg = r["config"]
        owned = cfg["BLOCK_M" if r["name"] == "dkv" else "BLOCK_N"]
        if r["status"] == "ok" and owned == 32 * cfg["num_warps"]:
            key = (r["name"], r["dtype"])
            lightest[key] = min(lightest.get(key, 256), r["registers"])
    assert {name for name, _ in lightest} == {"fwd", "dq", "dkv", "tangent"}
    assert len({dtype for _, dtype in lightest}) >= 2
    over = {k: regs for k, regs in lightest.items() if regs > 128}
    assert not over, f"no config of one point a thread within 128 registers: {over}"


def test_known_failures_are_still_launched():
    gone = sorted(set(KNOWN_FAILURES) - set(EVERY))
    assert not gone, f"no longer produced by the launchers, drop from KNOWN_FAILURES: {gone}"


def test_the_choices_reach_every_kernel_and_flag():
    names = {v["name"] for v in FOUND}
    assert names >= {"fwd", "dq", "dkv", "tangent", "rows_fwd", "rows_bwd", "rows_tangent"}
    assert names >= {"moments_fwd", "moments_bwd", "fgt_moments", "fgt_locals", "fgt_fold"}
    assert names >= {"fgt_rows", "fgt_columns"}
    fwd = [v for v in FOUND if v["name"] == "fwd"]
    assert {v["dtype"] for v in fwd} == set(sass.CHOICES["dtypes"])
    # The planner makes block-sparse plans up to blocks.MAX_DIM features, never beyond.
    assert {(v["d"], v["sparse"]) for v in fwd} == {(1, 0), (1, 1), (3, 0), (3, 1), (32, 0)}
    assert len({v["needs"] for v in FOUND if v["name"] == "dkv"}) == 7
    assert len({v["needs"] for v in FOUND if v["name"] == "rows_bwd"}) == 15


def test_the_report_reads_its_rows(compiled, tmp_path):
    from rich.console import Console

    rows = list(compiled.values())
    con = Console(file=open(os.devnull, "w"), width=200)
    con.print(sass.table(rows))
    head = {
        "sass": {"archs": list(ARCHS), "variants": len(FOUND), "choices": sass.CHOICES},
        "versions": {"triton": "x"}, "git_revision": None, "created": "2026-01-01",
    }  # fmt: skip
    text = sass.notes_text(head, rows, tmp_path / "run.json")
    assert "| sm_90 | 128 | 128 | 64 | 16 | 64 |" in text
    assert f"Failing or spilling inside a loop: {len(sass.failures(rows))} of {len(rows)} " in text
    notes = tmp_path / "NOTES.md"
    notes.write_text(f"# top\n{sass.NOTES_BEGIN}\nOLD TEXT\n{sass.NOTES_END}\nbottom\n")
    sass.write_notes(text, notes)
    after = notes.read_text()
    assert "OLD TEXT" not in after and text in after and after.endswith("bottom\n")
    json.dumps(rows)


# --- reading SASS -----------------------------------------------------------------


def listing(*lines):
    """A cuobjdump -sass listing of (address, instruction) lines."""
    out = ["        code for sm_90a", "        Function : _k"]
    for addr, text in lines:
        out.append(f"        /*{addr:04x}*/                   {text} ;  /* 0x000 */")
        out.append("                                                  /* 0x000fc8 */")
    return "\n".join(out)


# An outer loop (0x10-0x110) around a tile loop (0x20-0x100): the tile loop's
# unmasked path (2 exps, 9 instructions), its masked path (2 exps, 10), and a
# branch that skips the exps (cheaper, but not a tile's work).
TILE = listing(
    (0x00, "MOV R1, c[0x0][0x28]"),
    (0x10, "LDG.E R8, desc[UR4][R6.64]"),
    (0x20, "IADD3 R5, R9, 0x20, RZ"),
    (0x30, "@P0 BRA 0x90"),
    (0x40, "@P2 BRA 0xf0"),
    (0x50, "FMUL R2, R2, R3"),
    (0x60, "MUFU.EX2 R2, R2"),
    (0x70, "MUFU.EX2 R3, R3"),
    (0x80, "BRA 0xf0"),
    (0x90, "FSEL R2, R2, RZ, P1"),
    (0xA0, "FSEL R3, R3, RZ, P1"),
    (0xB0, "FSEL R4, R4, RZ, P1"),
    (0xC0, "FMUL R2, R2, R3"),
    (0xD0, "MUFU.EX2 R2, R2"),
    (0xE0, "MUFU.EX2 R3, R3"),
    (0xF0, "ISETP.GE.AND P0, PT, R5, R6, PT"),
    (0x100, "@!P0 BRA 0x20"),
    (0x110, "@!P1 BRA 0x10"),
    (0x120, "STL.64 [R1], R2"),
    (0x130, "EXIT"),
    (0x140, "BRA 0x140"),
)


def test_loops_and_the_hot_path():
    instrs = sass_model.parse(TILE)
    assert len(instrs) == 21 and instrs[3].op == "BRA" and instrs[3].guarded
    loops = sass_model.loops(instrs)
    assert loops == [sass_model.Loop(0x10, 0x110), sass_model.Loop(0x20, 0x100)]
    hot = sass_model.hottest_loop(instrs)
    assert hot == sass_model.Loop(0x20, 0x100)
    path = sass_model.hot_path(instrs, hot, exps_needed=2)
    assert (path.exps, path.slots) == (2, 9)
    assert path.ops["FMUL"] == 1 and "FSEL" not in path.ops
    skipping = sass_model.hot_path(instrs, hot, exps_needed=0)
    assert (skipping.exps, skipping.slots) == (0, 5)
    assert sass._local_bytes(instrs, "STL") == 8
    assert sass._loop_spill_bytes(instrs) == 0  # the STL.64 follows every loop


def test_a_spill_inside_a_loop():
    text = listing(
        (0x00, "STL [R1], R9"),
        (0x10, "MUFU.EX2 R2, R2"),
        (0x20, "LDL.64 R4, [R1+0x8]"),
        (0x30, "@P1 BRA 0x10"),
        (0x40, "LDL R9, [R1]"),
        (0x50, "EXIT"),
    )
    instrs = sass_model.parse(text)
    assert sass._loop_spill_bytes(instrs) == 8
    assert sass._local_bytes(instrs, "STL") + sass._local_bytes(instrs, "LDL") == 16


def test_a_nested_loop_left_by_a_call():
    # ptxas leaves a nested loop with "CALL.REL.NOINC" to the instruction after it.
    text = listing(
        (0x00, "MOV R1, c[0x0][0x28]"),
        (0x10, "MUFU.EX2 R2, R2"),
        (0x20, "FADD R3, R3, R2"),
        (0x30, "@!P0 CALL.REL.NOINC 0x50"),
        (0x40, "BRA 0x20"),
        (0x50, "FMUL R2, R2, R3"),
        (0x60, "@P1 BRA 0x10"),
        (0x70, "EXIT"),
    )
    instrs = sass_model.parse(text)
    hot = sass_model.hottest_loop(instrs)
    assert hot == sass_model.Loop(0x10, 0x60)
    path = sass_model.hot_path(instrs, hot, exps_needed=1)
    assert (path.exps, path.slots) == (1, 5)


def test_the_fp64_loop_when_there_is_no_mufu():
    text = listing(
        (0x00, "MOV R1, c[0x0][0x28]"),
        (0x10, "DFMA R2, R4, R6, R2"),
        (0x20, "@!P0 BRA 0x10"),
        (0x30, "IADD3 R5, R5, 0x1, RZ"),
        (0x40, "DFMA R2, R4, R6, R2"),
        (0x50, "DADD R2, R4, R2"),
        (0x60, "@!P1 BRA 0x30"),
        (0x70, "EXIT"),
    )
    instrs = sass_model.parse(text)
    assert sass_model.hottest_loop(instrs) == sass_model.Loop(0x30, 0x60)


# --- the model ----------------------------------------------------------------------


def test_the_binding_pipe_and_the_exp_bound():
    # 10 issue slots a pair, 8 of them FP32: issue-bound at 80% of the exp unit's
    # bound on sm_90; sm_80 has half the FP32 lanes and binds there at 50%.
    per_pair = {"issue": 10, "fma": 8, "alu": 1, "xu": 1, "fp64": 0}
    h100 = sass_model.predict(per_pair, 90)
    assert h100["bound_by"] == "issue" and h100["exp_bound_fraction"] == pytest.approx(0.8)
    a100 = sass_model.predict(per_pair, 80)
    assert a100["bound_by"] == "fma" and a100["exp_bound_fraction"] == pytest.approx(0.5)
    exp_bound = sass_model.predict({"issue": 4, "fma": 2, "alu": 0, "xu": 1, "fp64": 0}, 90)
    assert exp_bound["bound_by"] == "xu" and exp_bound["exp_bound_fraction"] == 1.0
    times = sass_model.predicted_seconds(h100["clocks_per_pair"], 90)
    card = sass_model.CARDS["H100 SXM"]
    assert times["H100 SXM n=m=2^18"] == pytest.approx(
        2**36 * 10 / 128 / (card.sms * card.clock_ghz * 1e9)
    )
    assert sass_model.predict(per_pair, 75) is None


def test_occupancy():
    full = sass_model.occupancy(255, 0, 4, 90)
    assert (full["warps_per_sm"], full["occupancy_limit"]) == (8, "registers")
    assert sass_model.occupancy(128, 0, 4, 90)["warps_per_sm"] == 16
    assert sass_model.occupancy(32, 0, 4, 90)["occupancy_limit"] == "warps"
    too_big = sass_model.occupancy(64, 200 * 1024, 4, 80)
    assert too_big["blocks_per_sm"] == 0 and too_big["occupancy_limit"] == "shared"


def test_categories():
    ops = {"MUFU.EX2": 2, "FFMA": 3, "FMNMX": 1, "DADD": 1, "F2F.F64.F32": 1, "LDG.E.128": 1}
    ops |= {"IMAD.WIDE": 1, "BRA": 1}
    mix = sass_model.mix(ops)
    assert (mix["mufu"], mix["fp32"], mix["fp64"], mix["conversion"]) == (2, 4, 1, 1)
    assert (mix["load"], mix["integer"], mix["other"]) == (1, 1, 1)
    pipes = sass_model.pipes(ops)
    assert pipes == {"issue": 11, "fma": 3, "alu": 2, "xu": 3, "fp64": 1}


def _beside_inputs():
    """sass rows (fwd: two configs; dq; dkv for two sets of gradients) and a sweep."""

    def sass_row(name, clocks, needs="", loo=False, cfg=1):
        return {
            "id": f"{name}-{needs}-{loo}-{cfg}", "name": name, "dtype": "float32", "d": 1,
            "c": 1, "exclude_self": loo, "sparse": False, "needs": needs, "arch": 90,
            "status": "ok", "spills": False, "registers": 64,
            "exp_bound_fraction": 1 / (16 * clocks), "clocks_per_pair": clocks,
        }  # fmt: skip

    rows = [sass_row("fwd", 0.1), sass_row("fwd", 0.0625, cfg=2), sass_row("dq", 0.125)]
    rows += [sass_row("dkv", 0.5, "v"), sass_row("dkv", 0.25, "kvw")]
    case = {"peer": "nwfast", "status": "ok", "op": "shared", "d": 1, "dtype": "float32"}
    case |= {"n": 2**10, "m": 2**10, "pairs": 2**20, "w_kind": "scalar"}
    sweep = [
        {**case, "mode": "forward", "median_s": 1e-3},
        {**case, "mode": "backward", "median_s": 4e-3},
        {**case, "mode": "backward", "peer": "torch-compile", "median_s": 1.0},
        {**case, "mode": "forward", "op": "shared_loo", "median_s": 1e-3},  # no loo rows
    ]
    return rows, sweep, {"sm_count": 2, "max_sm_clock_mhz": 1000.0}


def test_measured_beside_predicted():
    rows, sweep, gpu = _beside_inputs()
    lines = sass.beside(sweep, rows, gpu)
    assert [x["mode"] for x in lines] == ["forward", "backward"]
    fwd, bwd = lines
    # the best config (0.0625 clocks a pair), and dq + the every-gradient dkv
    assert fwd["predicted_s"] == pytest.approx(2**20 * 0.0625 / 2e9)
    assert bwd["predicted_s"] == pytest.approx(2**20 * (0.125 + 0.25) / 2e9)
    assert bwd["measured_over_predicted"] == pytest.approx(4e-3 / bwd["predicted_s"])
    assert bwd["kernels"] == {"dq": "dq--False-1", "dkv": "dkv-kvw-False-1"}


def test_the_gpu_suite_puts_its_sweep_beside_the_report(tmp_path):
    from rich.console import Console

    from bench import gpu, schema

    rows, sweep, card = _beside_inputs()
    sweep_path = schema.write(tmp_path / "sweep.json", {"gpu": card}, sweep)
    sass_path = schema.write(tmp_path / "x_sass-representative.json", {}, rows)
    con = Console(file=open(os.devnull, "w"), width=200)
    path = gpu.measured_beside_predicted(tmp_path, sweep_path, sass_path, con)
    saved = json.loads(path.read_text())
    assert [x["mode"] for x in saved["rows"]] == ["forward", "backward"]
    no_clock = schema.write(
        tmp_path / "s2.json", {"gpu": {**card, "max_sm_clock_mhz": None}}, sweep
    )
    assert gpu.measured_beside_predicted(tmp_path, no_clock, sass_path, con) is None


def test_emulated_exp():
    # Exp-bound with room on the other pipes: emulation pays; with none, it does not.
    roomy = sass_model.emulated_exp({"issue": 3, "fma": 2, "alu": 0, "xu": 1, "fp64": 0}, 90)
    assert 0 < roomy["fraction"] < 1 and roomy["speedup"] > 1.2
    assert roomy["clocks_before"] == pytest.approx(1 / 16)
    full = sass_model.emulated_exp({"issue": 8, "fma": 5, "alu": 0, "xu": 1, "fp64": 0}, 90)
    assert full["fraction"] == 0 and full["speedup"] == 1
    assert sass_model.emulated_exp({"issue": 8, "fma": 5, "alu": 0, "xu": 1, "fp64": 0}, 75) is None
