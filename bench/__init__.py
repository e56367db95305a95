"""Benchmarks of nwfast against its peers: ``python -m bench SUBCOMMAND``.

- ``sweep``: the pooling operators beside every peer, checked against float64;
- ``fit``: leave-one-out bandwidth selection beside statsmodels and kernelsmooth;
- ``compare``: this tree against another git revision, alternately in one run
  (``--guard``: the CI speed guard against bench/baseline.txt);
- ``plot``, ``report``: figures and tables from the JSON files the runs write;
- ``gpu``: on a CUDA GPU, the test suite, the GPU sweep and its goals
  (``bench/gpu_suite.sh OUTDIR``);
- ``sass``: without a GPU, every Triton kernel compiled for sm_80/90/100: registers,
  spills, the hottest loop per pair and the exp unit's bound.

One job a module: cases (what is computed, the presets) and peers (who computes
it) are the registry; run (plan, workers, one file) starts worker (one peer's
cases in a process); compare (two revisions installed apart, timed alternately);
child (how run and compare start a child process); check (judging results),
machine (the limits), schema (the JSON), report (tables), plot (figures), gpu
(the GPU suite), sass and sass_model (the compiled kernels and their throughput
model), cli (the command line).
"""
