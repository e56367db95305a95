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

import math
import weakref
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from nwfast import ops
from nwfast._checks import _flag, prepare_shared, resolve_tolerance
from nwfast._search import search_log_h
from nwfast.bandwidth import from_spread

__all__ = ["LooBandwidth", "loo_bandwidth", "nw_pool"]


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


# --- what every rank knows of every rank ----------------------------------------------

# One row per rank, gathered once per call: its sizes, the form of its inputs, whether
# it records a graph, and whether it refused its inputs. A refusal is raised on every
# rank, so that no rank is left waiting in the ring for one that gave up.
_FIELDS = (
    "refused",
    "n",
    "m",
    "batch",
    "d",
    "c",
    "dtype",
    "exclude_self",
    "w_form",
    "w_bits",
    "graph",
    "key_grad",
    "value_grad",
    "w_grad",
)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# How a rank passed w: a number or 0-d tensor, a (1,) tensor, or a per-key shape.
_NUMBER, _ONE_ELEMENT, _PER_KEY = 0, 1, 2


class _Shard(NamedTuple):
    q: torch.Tensor  # (B, n_r, d)
    k: torch.Tensor  # (B, m_r, d)
    v: torch.Tensor  # (B, m_r, c)
    w: torch.Tensor  # (B, m_r) per key, (B, 1) shared
    out_shape: tuple
    tolerance: float
    backend: str


def _prepare_locally(query, key, value, w, exclude_self, tolerance, backend, group):
    """(this rank's shard in the canonical layout, None), or (None, the error to raise)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialized: call torch.distributed.init_process_group "
            "first (torchrun sets the environment it reads)"
        )
    if dist.get_rank(group) < 0:
        raise ValueError("this process is not a member of the process group it passed")
    try:
        _flag("exclude_self", exclude_self)
        layout = _canonical(query, key, value, w)
        dtype, device = layout.q.dtype, layout.q.device
        tolerance = resolve_tolerance(tolerance, dtype)
        if backend == "torch":
            raise ValueError(
                "backend='torch' (the reference) has no distributed form: pass 'auto', "
                "'numba' or 'triton'"
            )
        backend = ops.resolve_backend(backend, device, dtype)
        _check_transport(group, device)
    except (TypeError, ValueError, RuntimeError) as error:
        return None, error
    shard = _Shard(layout.q, layout.k, layout.v, layout.w, layout.out_shape, tolerance, backend)
    return shard, None


def _keys_dim(x, dim):
    """The index of x's keys dim (``dim`` from the end, or 0 for a 1-D x), or None."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return None
    return 0 if x.dim() == 1 else x.dim() + dim


def _with_two_keys(x, dim):
    at = _keys_dim(x, dim)
    if at is None or x.shape[at] != 0:
        return x
    shape = list(x.shape)
    shape[at] = 2
    return x.new_zeros(shape)


def _canonical(query, key, value, w):
    """``prepare_shared`` for a shard, which may hold no keys.

    ``prepare_shared`` refuses m == 0 (a whole problem without keys), so an empty
    shard is checked as two keys of the same shapes and then cut back to none.
    """
    at = _keys_dim(key, -2)
    if at is None or key.shape[at] != 0:
        return prepare_shared(query, key, value, w)
    try:
        layout = prepare_shared(
            query, _with_two_keys(key, -2), _with_two_keys(value, -2), _with_two_keys(w, -1)
        )
    except ValueError as error:
        raise ValueError(f"{error} (an empty key shard, checked as one of two keys)") from None
    batch, _, d = layout.q.shape
    shared = layout.w.shape[-1] == 1
    return layout._replace(
        k=key.reshape(batch, 0, d),
        v=value.reshape(batch, 0, layout.v.shape[-1]),
        w=layout.w if shared else w.reshape(w.shape[:-1].numel(), 0).expand(batch, 0),
    )


def _check_transport(group, device):
    """gloo sends CPU tensors, nccl CUDA tensors; other backends are left to say."""
    name = dist.get_backend(group)
    if name == "gloo" and device.type != "cpu":
        raise ValueError(
            f"the process group's backend is gloo, which sends CPU tensors, and these are on "
            f"{device}: use a nccl group for CUDA tensors"
        )
    if name == "nccl" and device.type != "cuda":
        raise ValueError(
            f"the process group's backend is nccl, which sends CUDA tensors, and these are on "
            f"{device}: use a gloo group for CPU tensors"
        )


def _collective_device(group):
    """Where the group's collectives take their tensors."""
    return (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend(group) == "nccl"
        else torch.device("cpu")
    )


def _w_form(w):
    if not isinstance(w, torch.Tensor) or w.dim() == 0:
        return _NUMBER
    return _ONE_ELEMENT if tuple(w.shape) == (1,) else _PER_KEY


def _bits(x):
    """A one-element tensor's value as the int64 of its float64 bits: equal or not."""
    value = float(x.detach().reshape(-1)[0])
    return int(torch.tensor(value, dtype=torch.float64).view(torch.int64))


def _describe(shard, w, exclude_self, error):
    """This rank's row of the table: {field: int} over ``_FIELDS``."""
    if error is not None:
        return {**dict.fromkeys(_FIELDS, 0), "refused": 1}
    q, k, v, w_keys = shard.q, shard.k, shard.v, shard.w
    batch, n, d = q.shape
    form = _w_form(w)
    graph = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, w_keys))
    row = {
        "refused": 0,
        "n": n,
        "m": k.shape[1],
        "batch": batch,
        "d": d,
        "c": v.shape[-1],
        "dtype": _DTYPES.index(q.dtype),
        "exclude_self": int(exclude_self),
        "w_form": form,
        "w_bits": 0 if form == _PER_KEY else _bits(w_keys),
        "graph": int(graph),
        "key_grad": int(graph and k.requires_grad),
        "value_grad": int(graph and v.requires_grad),
        "w_grad": int(graph and w_keys.requires_grad),
    }
    return {name: row[name] for name in _FIELDS}


def _gather_rows(row, group, device):
    """Every rank's row {field: int}, as {field: [one value per rank]}."""
    mine = torch.tensor(list(row.values()), dtype=torch.int64, device=device)
    columns = _all_ranks(mine, group).cpu().T.tolist()
    return dict(zip(row, columns))


def _all_ranks(t, group):
    """Every rank's t, stacked in rank order: (ranks, *t.shape), the same on every rank."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.stack(parts)


def _raise_refusals(table, error):
    """The error of a rank that refused its inputs, there; a ValueError elsewhere."""
    if error is not None:
        raise error
    refused = [rank for rank, flag in enumerate(table["refused"]) if flag]
    if refused:
        raise ValueError(
            f"rank(s) {refused} refused their inputs to nwfast.distributed (see the error "
            "raised there); every rank stops"
        )


def _same_everywhere(table, field, what):
    values = table[field]
    if len(set(values)) > 1:
        raise ValueError(f"{what} differ across ranks: {field} = {values} (rank order)")


def _from_bits(bits):
    return float(torch.tensor(bits, dtype=torch.int64).view(torch.float64))


def _per_key_w(table):
    """Whether w is one per key (some rank passed a per-key shape); raises where the
    ranks' w make neither one scalar nor one w per key."""
    forms, keys = table["w_form"], table["m"]
    if _PER_KEY not in forms:
        if len(set(table["w_bits"])) > 1:
            values = [_from_bits(bits) for bits in table["w_bits"]]
            raise ValueError(
                f"w: a scalar w must be the same on every rank, got {values} (rank order); "
                "for one w per key pass each rank's (m_r,) shard with its keys"
            )
        return False
    scalars = [
        rank
        for rank, (form, m) in enumerate(zip(forms, keys))
        if form == _NUMBER or (form == _ONE_ELEMENT and m != 1)
    ]
    if scalars:
        raise ValueError(
            f"w: rank(s) {scalars} pass one w for all keys where other ranks pass one per "
            f"key; pass each rank's (m_r,) shard of w with its keys (m_r = {keys})"
        )
    return True


def _check_table(table, error):
    """Raise, on every rank alike, where the ranks' shards do not make one problem."""
    _raise_refusals(table, error)
    for field, what in (
        ("d", "feature dims"),
        ("c", "value channels"),
        ("batch", "batch sizes (the product of the batch dims)"),
        ("exclude_self", "exclude_self flags"),
    ):
        _same_everywhere(table, field, what)
    if len(set(table["dtype"])) > 1:
        names = [str(_DTYPES[code]).removeprefix("torch.") for code in table["dtype"]]
        raise ValueError(f"dtypes differ across ranks: {names} (rank order)")
    if len(set(table["graph"])) > 1:
        raise ValueError(
            f"gradients: ranks with graph = 1 in {table['graph']} (rank order) record a "
            "graph and the others do not, so their backward would wait for ranks that "
            "never run it: make every rank's inputs require grad (an empty shard's too), "
            "or none"
        )
    n_all, m_all = sum(table["n"]), sum(table["m"])
    if m_all == 0:
        raise ValueError(f"key: no rank holds a key (m_r = {table['m']}): the softmax is empty")
    if table["exclude_self"][0] and n_all != m_all:
        raise ValueError(
            f"exclude_self needs the queries to be the keys (n == m over all ranks), got "
            f"n = {n_all} queries (n_r = {table['n']}) and m = {m_all} keys (m_r = {table['m']})"
        )
    if table["exclude_self"][0] and m_all == 1:
        raise ValueError("exclude_self with a single key over all ranks leaves nothing to pool")


# --- the ring ------------------------------------------------------------------------

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


# --- bandwidth selection over shards --------------------------------------------------


class LooBandwidth(NamedTuple):
    """What ``loo_bandwidth`` found, the same on every rank."""

    bandwidth: object  # h: a float, or one h_f per feature, a (d,) tensor
    loo_mse: float  # the leave-one-out MSE at it, over every rank's points
    n_iter: int  # L-BFGS iterations


def loo_bandwidth(
    x, y, *, per_feature=False, group=None, max_iter=50, tol=1e-5, backend="auto", verbose=False
):
    """``NadarayaWatson(bandwidth="loo")``'s bandwidth for training data sharded over ranks.

    Every rank passes its own contiguous shard of the training points, x ``(n_r,)``
    or ``(n_r, d)`` and y ``(n_r,)`` or ``(n_r, c)`` (torch tensors; n_r may be 0), and
    gets back the same ``LooBandwidth(bandwidth, loo_mse, n_iter)``: the ``h`` that
    minimises the leave-one-out mean squared error over all ranks' points, as
    ``NadarayaWatson(bandwidth="loo", per_feature=..., max_iter=..., tol=...)``
    finds it on up to ``4 * nwfast.estimator.PILOT_POINTS`` gathered points (see its
    docstring): the same start (Silverman's rule, its quartiles found by
    bisection), walk by factors of 2 and L-BFGS on ``log h``; past that the
    estimator starts from a pilot on a subsample, and both find the minimum of the
    same criterion. Each leave-one-out pass runs on the ring (:func:`nw_pool` with
    ``exclude_self=True``); the ranks exchange nothing else but a few numbers per
    pass: sums, a maximum, counts and the loss with its gradient.
    """
    group = group or dist.group.WORLD
    try:
        X, Y = _training_shard(x, y)
        row = {"refused": 0, "n": X.shape[0], "d": X.shape[1], "c": Y.shape[1]}
        row["dtype"] = _DTYPES.index(X.dtype)
        device, error = X.device, None
    except (TypeError, ValueError) as caught:
        row = {"refused": 1, "n": 0, "d": 0, "c": 0, "dtype": 0}
        device, error = _collective_device(group), caught
    table = _gather_rows(row, group, device)
    _raise_refusals(table, error)
    for field, what in (("d", "features"), ("c", "outputs"), ("dtype", "dtypes")):
        _same_everywhere(table, field, what)
    n = sum(table["n"])
    if n < 2:
        raise ValueError(
            f"loo_bandwidth needs at least 2 points over all ranks, got n_r = {table['n']}"
        )
    rank = dist.get_rank(group)

    def total(t):
        return _all_ranks(t, group).sum(0)

    # The loss is the estimator's: squared errors of y scaled to at most 1, relative
    # to the variance of y (see NadarayaWatson._search_loo).
    c = Y.shape[1]
    tiny = torch.finfo(torch.float64).tiny
    top = (
        Y.abs().amax(dim=0).double()
        if len(Y)
        else torch.zeros(c, dtype=torch.float64, device=device)
    )
    y_scale = _all_ranks(top, group).amax(0).clamp_min(tiny)
    scaled = Y.double() / y_scale
    mean = total(scaled.sum(0)) / n
    var_y = float((total(((scaled - mean) ** 2).sum(0)) / n).mean())
    var_y = var_y if var_y > 0 else 1.0

    start = _silverman(X, n, group).to(X.dtype)
    if not per_feature:
        start = start.log().mean().exp()  # geometric mean: one h for all features

    def part_of_loss(log_h):
        pred = _leave_one_out(X, Y, log_h.exp(), group, backend)
        return (((pred - Y).double() / y_scale) ** 2).sum() / (n * c) / var_y, pred

    best = {"loss": math.inf}

    def keep_best(value, log_h, pred):
        if value < best["loss"]:
            best.update(loss=value, log_h=log_h.detach().clone(), pred=pred.detach())

    def say(message):
        if verbose and rank == 0:
            print(f"[nwfast.distributed loo] {message}")

    def loss_at(log_h):
        with torch.no_grad():
            part, pred = part_of_loss(log_h)
        value = float(total(part.reshape(1)))
        keep_best(value, log_h, pred)
        return value

    def loss_and_gradient(u, log_h):
        part, pred = part_of_loss(log_h)
        part.backward()
        # One message: this rank's part of the loss and of its gradient.
        both = total(torch.cat([part.detach().reshape(1), u.grad.double().reshape(-1)]))
        u.grad.copy_(both[1:].reshape(u.shape))
        keep_best(float(both[0]), log_h, pred)
        return both[0]

    n_iter = search_log_h(
        loss_at, loss_and_gradient, start.log(), math.log(2.0), max_iter, tol, say
    )
    residuals = (Y - best["pred"]).double()
    mse = float(total((residuals**2).sum().reshape(1))) / (n * c)
    h = best["log_h"].exp()
    return LooBandwidth(float(h) if h.dim() == 0 else h.cpu().double(), mse, n_iter)


def _training_shard(x, y):
    """x as (n_r, d) and y as (n_r, c), y in x's float dtype and on its device."""
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            kind = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got {kind}")
    if x.dim() not in (1, 2) or y.dim() not in (1, 2) or len(x) != len(y):
        raise ValueError(
            f"x {tuple(x.shape)} and y {tuple(y.shape)}: expected (n_r,) or (n_r, d) and "
            "(n_r,) or (n_r, c), one row per point of this rank"
        )
    X = (x[:, None] if x.dim() == 1 else x).detach()
    Y = (y[:, None] if y.dim() == 1 else y).detach().to(dtype=X.dtype, device=X.device)
    if X.shape[1] == 0 or Y.shape[1] == 0:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)}: no features or no outputs")
    for name, t in (("x", X), ("y", Y)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or infinity (shape {tuple(t.shape)})")
    return X, Y


def _leave_one_out(X, Y, h, group, backend):
    """NadarayaWatson's leave-one-out predictions at h (0-d, or one per feature),
    differentiable in h: the points are scaled by the fixed h0 and w = (h0 / h)**2,
    which is 1, carries the gradient (per feature: the scaled points carry it)."""
    if h.dim() == 0:
        h0 = h.detach()
        scaled = X / h0
        return nw_pool(
            scaled, scaled, Y, (h0 / h) ** 2, exclude_self=True, group=group, backend=backend
        )
    scaled = X / h
    return nw_pool(scaled, scaled, Y, 1.0, exclude_self=True, group=group, backend=backend)


def _silverman(X, n, group):
    """``nwfast.bandwidth.rule_of_thumb(X, "silverman")`` of every rank's rows of X."""
    X = X.double()

    mean = _all_ranks(X.sum(0), group).sum(0) / n
    std = (_all_ranks(((X - mean) ** 2).sum(0), group).sum(0) / (n - 1)).sqrt()
    # Quartiles interpolated between order statistics, as NumPy's default does.
    positions = [q * (n - 1) for q in (0.25, 0.75)]
    below = [math.floor(p) for p in positions]
    above = [min(b + 1, n - 1) for b in below]
    order = _order_statistics(X, below + above, group)
    q25, q75 = (order[i] + (positions[i] - below[i]) * (order[i + 2] - order[i]) for i in range(2))
    return from_spread(std, q75 - q25, n, "silverman")


_MAGNITUDE = 0x7FFFFFFFFFFFFFFF  # the bits of a float64 below its sign


def _sortable(x):
    """float64 values as int64 keys in the same order: negative floats' magnitude
    bits are flipped so that larger magnitudes sort lower."""
    bits = x.contiguous().view(torch.int64)
    return torch.where(bits < 0, bits ^ _MAGNITUDE, bits)


def _order_statistics(X, ranks, group):
    """The ``ranks``-th smallest (0-based) of each column of every rank's rows of X
    (n_r, f) float64, as (len(ranks), f): a bisection on their int64 keys, each round
    sending one count per rank, order statistic and column."""
    keys = _sortable(X)
    limits = torch.iinfo(torch.int64)
    low = keys.amin(0) if len(keys) else torch.full(X.shape[1:], limits.max, device=X.device)
    high = keys.amax(0) if len(keys) else torch.full(X.shape[1:], limits.min, device=X.device)
    wanted = torch.tensor(ranks, device=X.device)[:, None]
    lo = _all_ranks(low, group).amin(0).expand(len(ranks), -1)
    hi = _all_ranks(high, group).amax(0).expand(len(ranks), -1)
    while bool((lo < hi).any()):
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
        at_most = (keys[None] <= mid[:, None, :]).sum(1)
        enough = _all_ranks(at_most, group).sum(0) > wanted
        lo, hi = torch.where(enough, lo, mid + 1), torch.where(enough, mid, hi)
    return _sortable(lo).view(torch.float64)
