"""Sizes whose n·m passes 2^31: 64-bit indexing, and memory that stays O(n + m)."""

import json
import subprocess
import sys

import torch

from nwfast import reference
from nwfast.testing import assert_close

# Runs in its own process so the peak resident memory belongs to this call alone.
SCRIPT = """
import json, resource, sys, torch, nwfast
n = int(sys.argv[1])
gen = torch.Generator().manual_seed(0)
x = 5 * torch.rand(n, generator=gen)
y = torch.sin(x) + 0.1 * torch.randn(n, generator=gen)
nwfast.nw_pool(x[:64], x[:64], y[:64], 4.0, exclude_self=True)  # compile/load first
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = nwfast.nw_pool(x, x, y, 4.0, exclude_self=True)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rows = [0, 1, n // 3, n // 2, n - 2, n - 1]
print(json.dumps({"grown_kib": after - before, "rows": rows, "out": out[rows].tolist()}))
"""


def test_more_than_2_31_pairs_in_small_memory():
    n = 65536  # n * n = 2^32 pairs
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(n)], capture_output=True, text=True, check=True
    )
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["grown_kib"] < 64 * 1024, f"peak memory grew by {result['grown_kib']} KiB"

    gen = torch.Generator().manual_seed(0)
    x = 5 * torch.rand(n, generator=gen)
    y = torch.sin(x) + 0.1 * torch.randn(n, generator=gen)
    x, y = x.double(), y.double()
    rows = result["rows"]
    # Reference for the chosen rows only: each row against every key but its own.
    scores = reference.nw_scores(x[rows, None, None] - x[None, :, None], torch.full((n,), 4.0))
    scores[range(len(rows)), rows] = float("-inf")
    expected = torch.softmax(scores, dim=-1) @ y
    assert_close(torch.tensor(result["out"], dtype=torch.float32), expected)
