"""``python -m bench SUBCOMMAND``: the benchmark's one command line."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench import compare, schema
from bench.cases import DATA, DTYPES, H_RULES, POOL_MODES, POOL_OPS, PRESETS, W_KINDS
from bench.peers import PEERS, for_ops

EPILOG = """\
Every run writes one JSON file (bench/schema.py) under bench/results/ unless
--out says otherwise. Two revisions of nwfast, timed alternately in one run:
python -m bench compare --base REV (the CI speed guard: --guard)."""


def parse_sizes(text: str) -> tuple[int, ...]:
    """'4096,16k,2^20,1e6' -> (4096, 16384, 1048576, 1000000)."""
    sizes = []
    for tok in text.replace(" ", "").split(","):
        if "^" in tok:
            base, exp = tok.split("^")
            sizes.append(int(base) ** int(exp))
        elif tok[-1:] in ("k", "K"):
            sizes.append(int(tok[:-1]) * 1024)
        elif tok:
            sizes.append(int(float(tok)))
    if not sizes or min(sizes) < 2:
        raise argparse.ArgumentTypeError(f"sizes {text!r}: need a comma list of integers >= 2")
    return tuple(sorted(set(sizes)))


def parse_bytes(text: str) -> int:
    """'4GiB', '512M', '2e9' -> bytes."""
    t = text.strip().lower().replace(" ", "").rstrip("b").rstrip("i")
    scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    if t and t[-1] in scale:
        return int(float(t[:-1]) * scale[t[-1]])
    return int(float(t))


def _choices(allowed):
    def parse(text):
        items = tuple(t.strip() for t in text.split(",") if t.strip())
        bad = [t for t in items if t not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad}: choose from {', '.join(allowed)}")
        return items

    return parse


def _choices_free(text):
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _common(p, peers) -> None:
    p.add_argument("--peers", type=_choices(peers), help=f"of {','.join(peers)} (default: all)")
    p.add_argument("--time-cap", type=float, help="skip calls predicted to take longer (s)")
    p.add_argument("--threads", type=int, help="threads for torch, Numba, KeOps (default: cores)")
    p.add_argument("--out", type=Path, help="results folder (default bench/results)")
    p.add_argument("--verbose", action="store_true", help="tracebacks of failing cases")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Time nwfast beside its peers on the same inputs, in one run.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    s = sub.add_parser(
        "sweep",
        help="pooling operators: nwfast and its peers over sizes, layouts, modes",
        description="Time the pooling operators of nwfast and its peers; check each "
        "against the float64 reference.",
    )
    s.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    s.add_argument(
        "--quick",
        action="store_true",
        help="the short sweep (< 5 min on 2 cores): every peer at 4096² and 16384², "
        "one size per layout past the dense reference's memory",
    )
    s.add_argument(
        "--sparse",
        action="store_true",
        help="block skipping: nwfast beside tolerance=0, torch.compile and KeOps' "
        "block-sparse ranges, n = m = 2^16 ... 2^22, d = 1, 2, 3, three data families and "
        "three bandwidth rules, and the skipping goals (about an hour on 2 cores)",
    )
    s.add_argument(
        "--fgt",
        action="store_true",
        help="far fields: nwfast beside block skipping alone, tolerance=0 and KDEpy's FFTKDE, "
        "n = m = 2^16 ... 10^7, d = 1, 2, three data families and three bandwidth rules, "
        "and the far-field goals (leave-one-out fits of 10^6 and 10^7 points included)",
    )
    s.add_argument("--sizes", type=parse_sizes, help="n = m, e.g. 1024,4096,16k,2^20")
    s.add_argument("--modes", type=_choices(POOL_MODES), help=f"of {','.join(POOL_MODES)}")
    s.add_argument("--layouts", type=_choices(POOL_OPS), help=f"of {','.join(POOL_OPS)}")
    s.add_argument("--dtypes", type=_choices(DTYPES), default=("float32",), help="default float32")
    s.add_argument(
        "--dims",
        type=lambda t: tuple(int(v) for v in t.split(",")),
        help="features d of query and key, e.g. 1,3 (default 1; --sparse: 1,2,3)",
    )
    s.add_argument("--data", type=_choices(tuple(DATA)), help=f"points: of {','.join(DATA)}")
    s.add_argument(
        "--h-rules", type=_choices(tuple(H_RULES)), help=f"bandwidths: of {','.join(H_RULES)}"
    )
    s.add_argument("--w", choices=W_KINDS, default="scalar", help="one w, or one per key")
    s.add_argument(
        "--mem-cap",
        type=parse_bytes,
        default="4GiB",
        help="CPU memory a case may allocate, inputs included (default 4GiB)",
    )
    s.add_argument("--no-check", action="store_true", help="skip the float64 checks")
    _common(s, for_ops(POOL_OPS))

    f = sub.add_parser(
        "fit",
        help="bandwidth selection: NadarayaWatson('loo').fit against statsmodels, kernelsmooth",
        description="Time leave-one-out bandwidth selection, each fit in its own process; "
        "compare the chosen bandwidths by one LOO MSE.",
    )
    f.add_argument("--quick", action="store_true", help="n = 1000, 3000, 10000, 20 s cap")
    f.add_argument(
        "--features",
        action="store_true",
        help="several features, one bandwidth each: Nadaraya-Watson and local-linear fits, "
        "d = 2 and 3, uniform, clustered and tied data, n up to 60000",
    )
    f.add_argument(
        "--local-linear",
        action="store_true",
        help="LocalLinearRegression('loo') in one feature, n up to 200000",
    )
    f.add_argument("--sizes", type=parse_sizes, help="n, default 1000,3000,10000,30000,100000")
    f.add_argument("--d", type=int, default=1, help="features (default 1)")
    _common(f, for_ops(("fit",)))

    dist = sub.add_parser(
        "dist",
        help="strong scaling of nwfast.distributed: 1 process against R ranks",
        description="Time single-process nwfast.nw_pool, nwfast.distributed on 1 rank and "
        "on R gloo ranks on this machine, one thread per process by default; report the "
        "strong-scaling efficiency and the bytes each rank sends.",
    )
    dist.add_argument("--sizes", type=parse_sizes, help="n = m (default 2^16)")
    dist.add_argument(
        "--ranks",
        type=lambda t: tuple(int(r) for r in t.split(",")),
        help="ranks of the rings beside 1 (default 2)",
    )
    dist.add_argument(
        "--modes", type=_choices(("forward", "fwd+bwd")), help="forward,fwd+bwd (default both)"
    )
    dist.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    dist.add_argument("--threads", type=int, help="threads per process (default 1)")
    dist.add_argument("--repeats", type=int, help="timed calls per mode and round (default 5)")
    dist.add_argument(
        "--rounds", type=int, default=3, help="rounds over the configurations (default 3)"
    )
    dist.add_argument("--no-check", action="store_true", help="skip the float64 checks")
    dist.add_argument("--out", type=Path, help="results folder (default bench/results)")

    cold = sub.add_parser(
        "cold",
        help="a fresh process's first calls, with an empty and a warm Numba cache",
        description="Time import, the first float32 forward and backward and the first "
        "float64 forward in fresh interpreters, each repeat on a new empty NUMBA_CACHE_DIR "
        "and then again on the cache it filled.",
    )
    cold.add_argument("--repeats", type=int, default=3, help="fresh caches (default 3)")
    cold.add_argument("--n", type=int, default=1000, help="points (default 1000)")
    cold.add_argument("--threads", type=int, help="threads (default: cores)")
    cold.add_argument("--out", type=Path, help="results folder (default bench/results)")

    comp = sub.add_parser(
        "compare",
        help="this tree against another revision, alternately in one run: ratios and noise",
        description="Install another revision apart (git archive, pip install --target), time "
        "this tree and it alternately, each measurement a fresh process, and print per case "
        "both medians, base / this tree (below 1: this tree is slower) and the noise "
        "measured (max / min of the per-round ratios).",
    )
    comp.add_argument("--base", help="the other revision: a commit, tag or branch")
    comp.add_argument(
        "--guard",
        action="store_true",
        help="the speed guard: against bench/baseline.txt (unless --base) on "
        f"{','.join(compare.GUARD_CASES)}; exit 1 when a case is slower than "
        "max(threshold, noise) x the base, or did not run",
    )
    comp.add_argument(
        "--cases",
        type=_choices(tuple(compare.CASES)),
        help=f"of {','.join(compare.CASES)} (default: all; --guard: its own)",
    )
    comp.add_argument(
        "--rounds", type=int, default=compare.ROUNDS, help=f"default {compare.ROUNDS}"
    )
    comp.add_argument(
        "--threshold",
        type=float,
        default=compare.THRESHOLD,
        help=f"slower or faster beyond max(this, noise) x (default {compare.THRESHOLD:g})",
    )
    comp.add_argument(
        "--threads", type=int, default=compare.THREADS, help=f"default {compare.THREADS}"
    )
    comp.add_argument("--size", type=int, help="n = m for every case (default: each case's)")
    comp.add_argument("--out", type=Path, help="results folder (default bench/results)")

    sass = sub.add_parser(
        "sass",
        help="the Triton kernels compiled for GPUs without one: registers, spills, the "
        "hottest loop per pair, the exp unit's bound",
        description="Compile every variant the Triton launchers produce, with every autotune "
        "config, for each arch (no GPU or driver needed); report registers, stack and "
        "spills, shared memory, occupancy, the hottest loop's instructions per (query, key) "
        "pair and the fraction of the exp unit's bound it can reach (bench/sass_model.py).",
    )
    sass.add_argument(
        "--arch",
        type=lambda t: tuple(int(a) for a in t.split(",")),
        default=(80, 90, 100),
        help="compute capabilities, e.g. 80,90,100 (the default)",
    )
    sass.add_argument("--kernels", type=_choices_free, help="e.g. fwd,dq (default: all)")
    sass.add_argument("--jobs", type=int, default=2, help="compiling processes (default 2)")
    sass.add_argument("--cache", type=Path, help="compile cache (default ~/.cache/nwfast-sass)")
    sass.add_argument("--no-cache", action="store_true", help="compile everything again")
    sass.add_argument(
        "--representative",
        action="store_true",
        help="the test suite's set: every kernel, dtype, shape family, flag and config once",
    )
    sass.add_argument("--configs", action="store_true", help="a table line per config")
    sass.add_argument(
        "--notes",
        action="store_true",
        help="rewrite the generated part of bench/NOTES.md's GPU section from this run",
    )
    sass.add_argument("--out", type=Path, help="results folder (default bench/results)")

    plot = sub.add_parser("plot", help="PNG figures from results files")
    plot.add_argument("results", nargs="+", type=Path)
    plot.add_argument("--out", type=Path, help="folder for the PNGs (default bench/results)")

    report = sub.add_parser("report", help="print saved runs' tables again")
    report.add_argument("results", nargs="+", type=Path)

    gpu = sub.add_parser(
        "gpu",
        help="the GPU suite: the whole test suite, the GPU sweep, its goals, plots",
        description="On a CUDA GPU, within 9 minutes: the test suite with the gpu-marked "
        "tests, the GPU sweep, the goals judged on it, the plots; all into OUTDIR.",
    )
    gpu.add_argument("outdir", type=Path)
    gpu.add_argument("--skip-tests", action="store_true", help="only the sweep and goals")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.command == "plot":
        from bench.plot import plot_files

        for path in plot_files(args.results, args.out or schema.RESULTS):
            print(path)
        return 0
    if args.command == "report":
        from bench.report import show

        show(args.results)
        return 0
    if args.command == "gpu":
        from bench.gpu import suite

        return suite(args.outdir, args.skip_tests)
    if args.command == "sass":
        from bench import sass
        from bench.report import console

        if args.notes and (args.kernels or args.representative):
            parser().error("--notes needs the whole report: drop --kernels and --representative")
        try:
            sass.run(
                console(),
                archs=args.arch,
                out_dir=args.out,
                kernels=args.kernels,
                jobs=args.jobs,
                cache=None if args.no_cache else args.cache or sass.DEFAULT_CACHE,
                subset=args.representative,
                every_config=args.configs,
                notes=args.notes,
            )
        except ValueError as exc:
            parser().error(str(exc))
        return 0
    if args.command == "cold":
        from bench import cold
        from bench.report import console

        cold.run(
            console(),
            repeats=args.repeats,
            n=args.n,
            threads=args.threads,
            out_dir=args.out or schema.RESULTS,
        )
        return 0
    if args.command == "compare":
        from bench.report import console

        if not (args.base or args.guard):
            raise SystemExit("bench compare: --base REV, or --guard")
        if args.rounds < 2:
            raise SystemExit("bench compare: --rounds must be at least 2 (the noise needs two)")
        names = args.cases or (compare.GUARD_CASES if args.guard else tuple(compare.CASES))
        return compare.run(
            console(),
            base=args.base,
            names=list(names),
            rounds=args.rounds,
            threshold=args.threshold,
            threads=args.threads,
            size=args.size,
            out_dir=args.out or schema.RESULTS,
            guard=args.guard,
        )
    if args.command == "dist":
        from bench import dist
        from bench.report import console

        dist.run(console(), **dist.cli_defaults(args))
        return 0

    from bench.report import console
    from bench.run import run

    ops = POOL_OPS if args.command == "sweep" else ("fit",)
    if args.command == "fit":
        preset = "fit-quick" if args.quick else "fit-features" if args.features else "fit"
        preset = "fit-local-linear" if args.local_linear else preset
    else:
        preset = "quick" if args.quick else "sparse" if args.sparse else "full"
        preset = "fgt" if args.fgt else preset
        preset = "gpu" if args.device == "cuda" and preset == "full" else preset
    default_peers = PRESETS[preset].peers or for_ops(ops)
    common = {
        "peers": sorted(args.peers or default_peers, key=list(PEERS).index),
        "out_dir": args.out or schema.RESULTS,
        "threads": args.threads,
        "time_cap": args.time_cap,
        "verbose": args.verbose,
        "sizes": args.sizes,
    }
    if args.command == "fit":
        run(
            console(),
            kind="fit",
            preset=preset,
            device="cpu",
            dtypes=("float64",),
            dims=PRESETS[preset].dims or (args.d,),
            **common,
        )
        return 0
    con = console()
    path, head, rows = run(
        con,
        kind="sweep",
        preset=preset,
        device=args.device,
        mem_cap=args.mem_cap,
        check=not args.no_check,
        ops=args.layouts,
        modes=args.modes,
        dtypes=args.dtypes,
        dims=args.dims,
        w_kind=args.w,
        data=args.data,
        h_rules=args.h_rules,
        **common,
    )
    if PRESETS[preset].goals:  # a goal without its rows reads "not measured"
        from bench import goals

        judge, title = {
            "sparse": (goals.skipping, "Block-skipping goals"),
            "fgt": (goals.fgt, "Far-field goals"),
        }[preset]
        head["goals"] = judge(rows)
        schema.write(path, head, rows)
        goals.show(con, head["goals"], title)
    return 0
