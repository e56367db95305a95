"""How the benchmark starts its child processes; a leaf module (standard library only).

A child runs isolated (``python -I``: no script folder, no working directory, no
PYTHON* variables on sys.path) from a folder outside the repository, with
``bench`` loaded from its own folder. The repository root on sys.path would put
the source tree's ``nwfast/``, which has no ``kernels`` subpackage, before the
installed package. ``first`` puts one folder ahead of everything else on
sys.path: ``bench compare`` imports each revision's nwfast from its own folder.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def command(call: str, first: str | Path | None = None) -> list[str]:
    """The command line of a child that loads bench, then runs ``call`` (Python)."""
    lines = ["import importlib.util, sys"]
    if first is not None:
        lines.append(f"sys.path.insert(0, {str(first)!r})")
    lines += [
        f"spec = importlib.util.spec_from_file_location('bench', {str(BENCH / '__init__.py')!r},"
        f" submodule_search_locations=[{str(BENCH)!r}])",
        "sys.modules['bench'] = bench = importlib.util.module_from_spec(spec)",
        "spec.loader.exec_module(bench)",
        call,
    ]
    return [sys.executable, "-I", "-c", "\n".join(lines) + "\n"]


def env(threads: int) -> dict:
    """One thread count for every pool; allocator settings that make RSS honest."""
    out = dict(os.environ)
    t = str(threads)
    out.update(
        OMP_NUM_THREADS=t,
        MKL_NUM_THREADS=t,
        OPENBLAS_NUM_THREADS=t,
        NUMBA_NUM_THREADS=t,
        # Inductor compiles in-process: no worker pool fighting for the cores
        # or for the memory cap.
        TORCHINDUCTOR_COMPILE_THREADS="1",
        # A fixed mmap threshold returns every freed buffer above 64 KiB to
        # the OS at once, so the peak RSS of a timed call is its own and not
        # the warm-up's leftovers; two arenas bound the address space that
        # threads reserve.
        MALLOC_MMAP_THRESHOLD_="65536",
        MALLOC_ARENA_MAX="2",
    )
    return out
