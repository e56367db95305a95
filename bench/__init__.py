"""Benchmarks of nwfast against its peers.

- ``python -m bench`` (bench.sweep): the sweep, JSON under bench/results/.
- ``python -m bench.plot RESULTS...``: plots from those files.
- ``python -m bench.report RESULTS...``: a saved run's table.
- ``python -m bench.bandwidth``: leave-one-out bandwidth selection.
- ``bench/gpu_suite.sh OUTDIR``: GPU tests and the GPU sweep in one command.
- ``pytest bench/test_micro.py``: pytest-benchmark micro-benchmarks.

One concern per module: cases (the registry and inputs), peers (who is
timed), machine (the limits), worker (one case in a fresh process), check
(against the float64 reference), schema (the JSON), report (tables).
"""
