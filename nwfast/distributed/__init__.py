"""Nadaraya-Watson pooling over shards held by the ranks of a torch.distributed group.

Each rank passes its own contiguous block of the queries and of the keys and values
(in rank order, of any size, 0 included) and gets back the pooled values of its own
queries, as if one process had run :func:`nwfast.nw_pool` on the whole problem::

    out = nwfast.distributed.nw_pool(query_shard, key_shard, value_shard, w)

How, as ring attention does it: the key shards travel around the ring of ranks. Each
rank sends the shard in hand to the next rank while it pools its queries against it
(``nwfast.ops.pool``), and the partial results of the shards merge by their
log-sum-exp. The backward sends the shards around once more, each with the gradients
of its keys, values and per-key w summed over the queries it has met, so that the last
hop brings every shard's gradients home. Besides its own inputs a rank holds the key
shard it computes with and the one arriving; sums run in ring order, so results do not
depend on timing.

``loo_bandwidth`` is ``NadarayaWatson(bandwidth="loo")``'s search over sharded training
data: the ring computes each leave-one-out pass, and the ranks exchange nothing else
but a few numbers per pass.
"""

from nwfast.distributed._ring import nw_pool
from nwfast.distributed._search import LooBandwidth, loo_bandwidth

__all__ = ["LooBandwidth", "loo_bandwidth", "nw_pool"]
