#!/usr/bin/env bash
# The GPU suite in one command: the whole test suite natively (gpu-marked
# tests included), then the GPU sweep of nwfast beside torch eager,
# torch.compile and pykeops, then the goals and the plots, then the sass
# report for the card's own arch (python -m bench sass --representative: every
# kernel compiled, registers, spills and the model's prediction) and each
# measured nwfast case of the sweep beside the model's time for this card
# (gpu_beside_prediction.json), all written to OUTDIR, within 9 minutes.
#
# The GPU goal (shared keys, d = 1): float32 forward at n = m = 262144 at least
# 60% of the exp-unit bound and at least 5x torch.compile; backward at most
# 2.5x the forward's time; rows layout at least 80% of the card's measured
# copy bandwidth. bench/gpu.py says how each is measured.
#
# Exits 2 on a machine without a CUDA GPU, 1 if a test or the sass report fails.
set -euo pipefail
if [ $# -ne 1 ]; then
    echo "usage: bench/gpu_suite.sh OUTDIR" >&2
    exit 64
fi
out=$(realpath -m "$1")
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# A bare GPU image has the dependencies but not nwfast itself: install it in
# place, offline and without dependencies, so nwfast.kernels resolves.
if ! "$PY" -c "import nwfast.kernels" 2>/dev/null; then
    "$PY" -m pip install --quiet --no-deps --no-build-isolation -e .
fi
exec "$PY" -m bench gpu "$out"
