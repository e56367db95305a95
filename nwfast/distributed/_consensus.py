"""What every rank of a group knows of every rank: each rank's shard described in
one row (sizes, dtype, device, w's form, or the error its own checks raised),
gathered into one table that every rank checks alike, so that all ranks refuse
a call together (with the reasons of each) or all run it."""

from typing import NamedTuple

import torch
import torch.distributed as dist

from nwfast import ops
from nwfast._checks import _flag, prepare_shared, resolve_tolerance

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
