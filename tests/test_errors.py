"""Bad input gets a clear error naming the argument and the shapes."""

import pytest
import torch

import nwfast

n, m = 5, 7
q, k, v = torch.randn(n), torch.randn(m), torch.randn(m)


@pytest.mark.parametrize(
    "args,kwargs,error,words",
    [
        ((q, torch.randn(m, 2), v, 1.0), {}, ValueError, ["query (5,)", "key (7, 2)"]),
        ((q[:, None], torch.randn(m, 2), v, 1.0), {}, ValueError, ["d=1", "d=2"]),
        (
            (torch.randn(2, n, 1), torch.randn(3, m, 1), torch.randn(3, m, 1), 1.0),
            {},
            ValueError,
            ["batch", "(2, 5, 1)", "(3, 7, 1)"],
        ),
        ((q, k, torch.randn(m + 1), 1.0), {}, ValueError, ["value (8,)", "key (7,)"]),
        ((q, k, v, torch.rand(m + 1)), {}, ValueError, ["w (8,)", "key (7,)"]),
        ((q, k, v, torch.rand(2, m)), {}, ValueError, ["w (2, 7)"]),
        ((q, k, v, 1.0), {"exclude_self": True}, ValueError, ["exclude_self", "(5,)", "(7,)"]),
        (
            (q[:1], k[:1], v[:1], 1.0),
            {"exclude_self": True},
            ValueError,
            ["exclude_self", "single"],
        ),
        ((q, k[:0], v[:0], 1.0), {}, ValueError, ["key (0,)", "m=0"]),
        ((q, k, v.double(), 1.0), {}, TypeError, ["value", "float64", "float32"]),
        ((q, k, v, torch.rand(1).double()), {}, TypeError, ["w", "float64"]),
        ((q.int(), k, v, 1.0), {}, TypeError, ["query", "int32"]),
        ((q, k.to(torch.complex64), v, 1.0), {}, TypeError, ["key", "complex64"]),
        ((q, k, v, "1.0"), {}, TypeError, ["w", "str"]),
        ((q.numpy(), k, v, 1.0), {}, TypeError, ["query", "ndarray"]),
        ((q, k, v, 1.0), {"backend": "cuda"}, ValueError, ["backend", "'cuda'"]),
        ((q.half(), k.half(), v.half(), 1.0), {"backend": "numba"}, TypeError, ["float16"]),
        ((q, k, v, 1.0), {"backend": "numba", "exclude_self": True}, ValueError, ["exclude_self"]),
        ((q, q, q, 1.0), {"exclude_self": 1}, TypeError, ["exclude_self must be a bool", "int"]),
        ((q, k, v, 1.0), {"tolerance": -1e-3}, ValueError, ["tolerance", "[0, 1)"]),
        ((q, k, v, 1.0), {"tolerance": "tight"}, TypeError, ["tolerance", "str"]),
        ((q.to_sparse(), k, v, 1.0), {}, TypeError, ["query", "dense", "sparse"]),
    ],
)
def test_bad_shared_input(args, kwargs, error, words):
    with pytest.raises(error) as caught:
        nwfast.nw_pool(*args, **kwargs)
    for word in words:
        assert word in str(caught.value), f"{word!r} not in {caught.value}"


@pytest.mark.parametrize(
    "args,error,words",
    [
        ((q, torch.randn(n + 1, m), torch.randn(n + 1, m), 1.0), ValueError, ["keys (6, 7)"]),
        ((q, torch.randn(n, m), torch.randn(n, m + 1), 1.0), ValueError, ["values (5, 8)"]),
        ((q, torch.randn(n, m), torch.randn(n, m), torch.rand(m + 1)), ValueError, ["w (8,)"]),
        ((q, torch.randn(n, 0), torch.randn(n, 0), 1.0), ValueError, ["m=0"]),
        ((q, torch.randn(n, m).double(), torch.randn(n, m), 1.0), TypeError, ["keys"]),
    ],
)
def test_bad_rows_input(args, error, words):
    with pytest.raises(error) as caught:
        nwfast.nw_pool_rows(*args)
    for word in words:
        assert word in str(caught.value), f"{word!r} not in {caught.value}"


# local_linear_pool: the same checks and messages (nwfast._checks), on its layout:
# query (n,) or (n, d), key (m,) or (m, d), value (m,) or (m, c), w one per feature.
@pytest.mark.parametrize(
    "args,kwargs,error,words",
    [
        (
            (torch.randn(n, 2), torch.randn(m, 3), v, 1.0),
            {},
            ValueError,
            ["feature dims", "query (5, 2)", "key (7, 3)", "d=2", "d=3"],
        ),
        ((torch.randn(n, 0), torch.randn(m, 0), v, 1.0), {}, ValueError, ["(5, 0)", "d=0"]),
        ((q, k, torch.randn(m + 1), 1.0), {}, ValueError, ["value (8,)", "key (7,)", "(7, c)"]),
        ((q, k, torch.randn(m, 2, 1), 1.0), {}, ValueError, ["value must be (m,) or (m, c)"]),
        ((torch.randn(n, 1, 1), k, v, 1.0), {}, ValueError, ["query must be", "(5, 1, 1)"]),
        (
            (torch.randn(n, 2), torch.randn(m, 2), v, torch.rand(3)),
            {},
            ValueError,
            ["w (3,)", "query (5, 2)", "key (7, 2)", "one weight per feature, (2,)"],
        ),
        ((q, k, v, 1.0), {"exclude_self": True}, ValueError, ["exclude_self", "(5,)", "(7,)"]),
        ((q[:1], q[:1], v[:1], 1.0), {"exclude_self": True}, ValueError, ["single", "(1,)"]),
        ((q, k[:0], v[:0], 1.0), {}, ValueError, ["key (0,)", "m=0"]),
        ((q, k, v.double(), 1.0), {}, TypeError, ["value", "float64", "float32"]),
        ((q, k, v, torch.rand(1).double()), {}, TypeError, ["w", "float64"]),
        ((q, k, v, torch.tensor(2)), {}, TypeError, ["w", "int64"]),
        ((q.int(), k, v, 1.0), {}, TypeError, ["query", "int32"]),
        ((q, k, v, "1.0"), {}, TypeError, ["w", "str"]),
        ((q.to_sparse(), k, v, 1.0), {}, TypeError, ["query", "dense", "sparse"]),
        ((q, q, q, 1.0), {"exclude_self": 1}, TypeError, ["exclude_self must be a bool", "int"]),
        ((q, k, v, 1.0), {"backend": "cuda"}, ValueError, ["backend", "'cuda'"]),
        ((q, k, v, 1.0), {"tolerance": -1e-3}, ValueError, ["tolerance", "[0, 1)"]),
    ],
)
def test_bad_local_linear_input(args, kwargs, error, words):
    with pytest.raises(error) as caught:
        nwfast.local_linear_pool(*args, **kwargs)
    for word in words:
        assert word in str(caught.value), f"{word!r} not in {caught.value}"


def test_different_devices_are_refused():
    with pytest.raises(ValueError, match="device"):
        nwfast.nw_pool(q, k, v.to("meta"), 1.0)
    with pytest.raises(ValueError, match="w is on meta"):
        nwfast.local_linear_pool(q, k, v, torch.tensor(1.0, device="meta"))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        nwfast.nw_pool(q, k, v, 1.0, backend="triton")


def test_empty_query_set_gives_empty_result():
    out = nwfast.nw_pool(q[:0], k, v, 1.0)
    assert out.shape == (0,)
    out = nwfast.nw_pool(torch.randn(0, 3, 2), torch.randn(0, 4, 2), torch.randn(0, 4, 5), 1.0)
    assert out.shape == (0, 3, 5)
