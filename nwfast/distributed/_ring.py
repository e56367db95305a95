"""The ring: key shards travel from rank to rank while each rank pools its
queries against the shard in hand; partial results merge by their log-sum-exp,
and the backward's second ring brings every shard's gradients home."""

import math
import weakref

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from nwfast import ops
from nwfast.distributed._consensus import (
    _check_table,
    _collective_device,
    _describe,
    _gather_rows,
    _per_key_w,
    _prepare_locally,
)


def nw_pool(
    query, key, value, w, *, exclude_self=False, group=None, backend="auto", tolerance=None
):
    """``nwfast.nw_pool`` over shards: this rank's queries against every rank's keys.

    Every rank of ``group`` calls it with its own shard; the whole problem is the
    ranks' shards laid end to end in rank order.

    Args:
        query: this rank's queries, ``(n_r,)`` or ``(B..., n_r, d)``; n_r may be 0.
        key: this rank's keys, ``(m_r,)`` or ``(B..., m_r, d)``; m_r may be 0.
        value: the values of these keys, ``(m_r,)`` or ``(B..., m_r, c)``.
        w: one bandwidth weight for all keys (a float, a 0-d or 1-element tensor),
            the same on every rank; or one per key, ``(m_r,)`` or ``(B..., m_r)``,
            sharded with the keys (a shard of one key passes ``(1,)``, an empty
            one ``(0,)``).
        exclude_self: leave-one-out over global indices: the queries are the keys
            (n == m over all ranks; the two need not be cut at the same places) and
            global key i is left out of global query i's softmax.
        group: the process group (default: the world).
        backend: ``"auto"``, ``"numba"`` (CPU tensors, gloo) or ``"triton"`` (CUDA
            tensors, nccl).
        tolerance: as in ``nwfast.nw_pool``, per row of the whole problem.

    Returns:
        This rank's output shard, ``(n_r,)`` or ``(B..., n_r, c)``.

    Gradients reach this rank's query, key, value and per-key w as if one process
    had back-propagated the sum of every rank's loss. A scalar w is replicated, so
    each rank's ``w.grad`` is the gradient of its own loss alone, as for any
    replicated parameter: sum it over the ranks (``dist.all_reduce(w.grad)``), or
    let DDP average it as it averages every other parameter, before a step; the
    parts add up to the one-process gradient. Every rank must call backward
    through its output, a rank without queries too, as every rank joins a
    collective, and before ``destroy_process_group``: the output does not keep the
    group alive, so that destroying it stops its threads then and there.
    """
    group = group or dist.group.WORLD
    shard, error = _prepare_locally(query, key, value, w, exclude_self, tolerance, backend, group)
    table = _gather_rows(_describe(shard, w, exclude_self, error), group, _collective_device(group))
    ring = _Ring(group, table, shard, error)
    out = _RingPool.apply(shard.q, shard.k, shard.v, shard.w, ring)
    return out.reshape(shard.out_shape)


# Message tags: the forward's key shards, the backward's, and their gradients.
_KEYS, _KEYS_AGAIN, _GRADIENTS = 1, 2, 3


def _pack(tensors, dtype, device):
    """Tensors as one flat tensor of ``dtype``: one message."""
    if not tensors:
        return torch.empty(0, dtype=dtype, device=device)
    return torch.cat([t.reshape(-1).to(dtype) for t in tensors])


def _unpack(flat, shapes):
    """Contiguous views of ``flat`` in ``shapes``: what ``_pack`` packed."""
    pieces = flat.split([math.prod(shape) for shape in shapes])
    return [piece.view(shape) for piece, shape in zip(pieces, shapes)]


class _Transfer:
    """Sends and receives in flight; ``wait()`` returns what was received."""

    def __init__(self, works, received):
        self.works, self.received = works, received

    def wait(self):
        for work in self.works:
            work.wait()
        return self.received


class _Ring:
    """One call's ring: the ranks' shards, what travels with a key shard, the transfers.

    At step s a rank holds the key shard of rank ``source(s) = rank - s`` (mod size):
    it sends it on to rank + 1 and receives rank ``source(s + 1)``'s from rank - 1.
    A key shard travels as one flat tensor of its keys, values and per-key w, and in
    the backward its gradients as another.
    """

    def __init__(self, group, table, shard, error):
        _check_table(table, error)
        self.per_key = _per_key_w(table)
        # The ring lives in the output's autograd graph, often to the end of the
        # script: a strong reference would keep the group, and gloo's threads,
        # alive past destroy_process_group, to be torn down during interpreter
        # exit, where it can abort the process ("terminate called without an
        # active exception"). torch.distributed owns the group until then.
        self._group = weakref.ref(group)
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.exclude_self = bool(table["exclude_self"][0])
        self.n = table["n"][self.rank]
        self.batch, self.d, self.c = table["batch"][0], table["d"][0], table["c"][0]
        self.key_counts = table["m"]
        self.key_offsets = [sum(self.key_counts[:rank]) for rank in range(self.size)]
        self.query_offset = sum(table["n"][: self.rank])
        # A shared w's gradient shifts each row's distances by a constant
        # (nwfast.kernels.distance_shift) that must be the same in every shard:
        # it is computed from the whole row's key count.
        self.keys_per_row = sum(self.key_counts) - self.exclude_self
        self.key_names = ("key", "value", "w") if self.per_key else ("key", "value")
        # A key shard's gradients travel where some rank wants its own.
        wanted = {"key": any(table["key_grad"]), "value": any(table["value_grad"])}
        wanted["w"] = self.per_key and any(table["w_grad"])
        self.travelling = tuple(name for name in self.key_names if wanted[name])
        self.tolerance, self.backend = shard.tolerance, shard.backend
        self.sum_dtype = torch.promote_types(shard.q.dtype, torch.float32)

    @property
    def group(self):
        group = self._group()
        if group is None:
            raise RuntimeError(
                "nwfast.distributed.nw_pool: the process group was destroyed before this "
                "backward; run the backward before destroy_process_group"
            )
        return group

    def source(self, step):
        return (self.rank - step) % self.size

    def diagonal(self, src):
        """This rank's query i leaves out key i + diagonal of rank src's shard."""
        return self.query_offset - self.key_offsets[src] if self.exclude_self else None

    def pools(self, src):
        """Whether this rank's queries meet rank src's keys at all."""
        return self.n > 0 and self.key_counts[src] > 0 and self.c > 0

    def shapes(self, src, names):
        m = self.key_counts[src]
        every = {
            "key": (self.batch, m, self.d),
            "value": (self.batch, m, self.c),
            "w": (self.batch, m),
        }
        return [every[name] for name in names]

    def numel(self, src, names):
        return sum(math.prod(shape) for shape in self.shapes(src, names))

    def own_keys(self, k, v, w):
        """This rank's key shard as it travels."""
        return _pack([k, v, w] if self.per_key else [k, v], k.dtype, k.device)

    def keys_of(self, src, held, w):
        """(key, value, w) of rank src's shard in hand; a shared w is this rank's own."""
        parts = _unpack(held, self.shapes(src, self.key_names))
        return tuple(parts) if self.per_key else (*parts, w)

    def pass_on(self, tensor, numel, tag):
        """Send ``tensor`` to the next rank; receive ``numel`` numbers from the previous."""
        if self.size == 1:
            return _Transfer([], tensor)
        received = tensor.new_empty(numel)
        p2p = []
        # Both ends know every shard's size: an empty message is never sent.
        if tensor.numel():
            to = (self.rank + 1) % self.size
            p2p.append(dist.P2POp(dist.isend, tensor, group=self.group, group_peer=to, tag=tag))
        if numel:
            back = (self.rank - 1) % self.size
            p2p.append(dist.P2POp(dist.irecv, received, group=self.group, group_peer=back, tag=tag))
        return _Transfer(dist.batch_isend_irecv(p2p) if p2p else [], received)


def _merge(out, lse, part, part_lse):
    """Two poolings of the same rows over disjoint keys as one, by their log-sum-exps."""
    total = torch.logaddexp(lse, part_lse)
    return _rescaled(out, lse, total) + _rescaled(part.double(), part_lse, total), total


def _rescaled(out, lse, total):
    """out's share of the merged rows; a row that met no key (lse -inf, out NaN)
    has none, while a NaN lse (NaN data) still propagates."""
    empty = (lse == -math.inf)[..., None]
    return torch.where(empty, 0.0, out * torch.exp(lse - total)[..., None])


class _RingPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, w, ring):
        batch, n, _ = q.shape
        out = torch.zeros((batch, n, ring.c), dtype=torch.float64, device=q.device)
        lse = torch.full((batch, n), -math.inf, dtype=torch.float64, device=q.device)
        plans = {}  # per key shard, for the backward: small, O(n + m)
        held = ring.own_keys(k, v, w)
        for step in range(ring.size):
            src, following = ring.source(step), ring.source(step + 1)
            arriving = None
            if step + 1 < ring.size:
                arriving = ring.pass_on(held, ring.numel(following, ring.key_names), _KEYS)
            if ring.pools(src):
                k_s, v_s, w_s = ring.keys_of(src, held, w)
                part, part_lse, plans[src] = ops.pool(
                    q, k_s, v_s, w_s, ring.diagonal(src), ring.tolerance, ring.backend
                )
                out, lse = _merge(out, lse, part, part_lse)
            held = arriving.wait() if arriving else None
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, w, out, lse)
        ctx.ring, ctx.plans = ring, plans
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, w, out, lse = ctx.saved_tensors
        ring = ctx.ring
        need_q, need_k, need_v, need_w = ctx.needs_input_grad[:4]
        dq = torch.zeros(q.shape, dtype=ring.sum_dtype, device=q.device)
        dw_shared = torch.zeros(w.shape, dtype=ring.sum_dtype, device=q.device)
        held = ring.own_keys(k, v, w)
        gradients = None  # the held shard's gradients from the ranks before, arriving
        for step in range(ring.size):
            src, following = ring.source(step), ring.source(step + 1)
            arriving = None
            if step + 1 < ring.size:
                arriving = ring.pass_on(held, ring.numel(following, ring.key_names), _KEYS_AGAIN)
            plan = ctx.plans.get(src)
            dq_s, dw_s, key_side = _shard_gradients(
                ring, src, held, q, w, grad_out, out, lse, plan, need_q, need_w
            )
            if dq_s is not None:
                dq += dq_s
            if dw_s is not None:
                dw_shared += dw_s
            if gradients is not None:
                key_side += gradients.wait()
            # The last step's pass brings each shard's gradients home.
            gradients = ring.pass_on(key_side, ring.numel(following, ring.travelling), _GRADIENTS)
            held = arriving.wait() if arriving else None
        own = dict(
            zip(ring.travelling, _unpack(gradients.wait(), ring.shapes(ring.rank, ring.travelling)))
        )
        dw = own.get("w") if ring.per_key else dw_shared
        return (
            dq.to(q.dtype) if need_q else None,
            own["key"].to(k.dtype) if need_k else None,
            own["value"].to(v.dtype) if need_v else None,
            dw.to(w.dtype) if need_w else None,
            None,
        )


def _shard_gradients(ring, src, held, q, w, grad_out, out, lse, plan, need_q, need_w):
    """This rank's queries' share of the gradients at rank src's key shard: dq, a
    shared w's dw (None where not wanted) and the key side's travelling gradients."""
    travelling = ring.travelling
    need_key_w = "w" in travelling if ring.per_key else need_w
    needs = [need_q, "key" in travelling, "value" in travelling, need_key_w]
    if not ring.pools(src) or not any(needs):
        flat = torch.zeros(ring.numel(src, travelling), dtype=ring.sum_dtype, device=q.device)
        return None, None, flat
    k, v, w_keys = ring.keys_of(src, held, w)
    diagonal = ring.diagonal(src)
    # The kernels read a w of one element as one w for all keys and shift its
    # distances by a constant per row, which is exact only over a whole row: the
    # per-key w of a one-key shard gets its gradient from _one_key_dw instead.
    one_key = ring.per_key and need_key_w and k.shape[1] == 1
    grads = ops.pool_backward(
        grad_out, q, k, v, w_keys, out, lse, diagonal, plan, ring.backend,
        [*needs[:3], need_key_w and not one_key], None if ring.per_key else ring.keys_per_row,
    )  # fmt: skip
    dq, dk, dv, dw = grads
    if one_key:
        dw = _one_key_dw(grad_out, q, k, v, w_keys, out, lse, diagonal)
    side = {"key": dk, "value": dv, "w": dw}
    flat = _pack([side[name] for name in travelling], ring.sum_dtype, q.device)
    shared_dw = dw if need_w and not ring.per_key else None
    return (dq if need_q else None), shared_dw, flat


def _one_key_dw(grad_out, q, k, v, w, out, lse, diagonal):
    """dw (B, 1) of a one-key shard's own w, in float64: O(n) terms
    t_i (-||q_i - k||^2 / 2), t_i = p_i (g_i . v - g_i . y_i)."""
    g, q, k, v, w, out = (x.double() for x in (grad_out, q, k, v, w, out))
    squared = ((q - k) ** 2).sum(-1)
    p = torch.exp(-0.5 * w * squared - lse)
    t = p * ((g * v).sum(-1) - (g * out).sum(-1))
    terms = -0.5 * t * squared
    if diagonal is not None and 0 <= -diagonal < q.shape[1]:
        terms[:, -diagonal] = 0.0  # the query that leaves this key out
    return terms.sum(-1, keepdim=True)
