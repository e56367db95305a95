"""Where users run it: forked workers, threads, read-only installs, a source tree
that shadows the install, and a cold start that compiles only what it needs.
Each runs in a fresh process of its own."""

import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

import nwfast
from nwfast import testing

REPO = Path(__file__).resolve().parent.parent


def run_python(code, cwd=None, env=None, timeout=600):
    """Run ``code`` in a fresh interpreter; returns the finished process."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def test_fork_after_a_call_and_dataloader_workers(tmp_path):
    """The parent's thread pool does not reach the children: they start their own."""
    done = run_python(
        """
        import multiprocessing as mp, torch, nwfast

        x = torch.randn(2000)
        parent = nwfast.nw_pool(x, x, x, 1.0)  # big enough to use the thread pool

        class Pools(torch.utils.data.Dataset):
            def __len__(self):
                return 4

            def __getitem__(self, i):
                return nwfast.nw_pool(x, x, x, 1.0)

        loader = torch.utils.data.DataLoader(
            Pools(), batch_size=None, num_workers=2, multiprocessing_context="fork"
        )
        for out in loader:
            assert torch.equal(out, parent)
        child = mp.get_context("fork").Process(target=lambda: nwfast.nw_pool(x, x, x, 1.0))
        child.start()
        child.join()
        assert child.exitcode == 0, child.exitcode
        print("ok")
        """,
        cwd=tmp_path,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_threads_calling_at_once_get_the_serial_results():
    # 1200 x 1000 pairs: enough work for each call to use the pool too
    q, k = torch.randn(3, 1200, 2), torch.randn(3, 1000, 2)
    v, w = torch.randn(3, 1000, 2), torch.rand(3, 1000) + 0.5
    serial = [nwfast.nw_pool(q[i], k[i], v[i], w[i]) for i in range(3)] * 2
    results = [None] * 6

    def call(i):
        results[i] = nwfast.nw_pool(q[i % 3], k[i % 3], v[i % 3], w[i % 3])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(a, b) for a, b in zip(results, serial))


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_the_pool_returns_chunks_in_order_and_raises_their_errors(monkeypatch, threads):
    from nwfast.kernels import workers

    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    chunks = workers.parallel(lambda lo, hi: (lo, hi), 101, workers.PARALLEL_WORK)
    assert chunks[0][0] == 0 and chunks[-1][1] == 101
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(chunks, chunks[1:]))

    def failing(lo, hi):
        if lo > 0:
            raise ValueError(f"chunk at {lo}")
        return lo

    with pytest.raises(ValueError, match="chunk at"):
        workers.parallel(failing, 101, workers.PARALLEL_WORK)

    # too little work to wake a helper: one chunk, on the calling thread
    caller = threading.get_ident()
    small = workers.parallel(lambda lo, hi: (lo, hi, threading.get_ident()), 101, 1000)
    assert small == [(0, 101, caller)]


def _installed_copy(into):
    """nwfast laid out as an install does it: nwfast/ with kernels/ inside."""
    package = into / "nwfast"
    shutil.copytree(REPO / "nwfast", package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(
        REPO / "kernels", package / "kernels", ignore=shutil.ignore_patterns("__pycache__")
    )
    return into


def test_a_read_only_install_without_a_writable_home(tmp_path):
    """No __pycache__ can be made beside the kernels and no user cache folder:
    the kernels are cached in the temporary folder, with one warning."""
    site = _installed_copy(tmp_path / "site")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    (site / "nwfast" / "kernels" / "__pycache__").write_text("not a folder either")
    env = {
        "HOME": str(blocker / "home"),
        "XDG_CACHE_HOME": str(blocker / "cache"),
        "NUMBA_CACHE_DIR": "",
        "TMPDIR": str(tmp_path / "tmp"),
        "PYTHONPATH": str(site),
    }
    (tmp_path / "tmp").mkdir()
    done = run_python(
        """
        import warnings, torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import nwfast
            x = torch.randn(50)
            out = nwfast.nw_pool(x, x, x, 1.0, exclude_self=True)
        assert torch.isfinite(out).all()
        messages = [str(w.message) for w in caught]
        assert any("caching them in" in m for m in messages), messages
        print(nwfast.__file__)
        """,
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().startswith(str(site))
    assert any((tmp_path / "tmp").glob("nwfast-numba-*/*"))


def test_the_source_tree_shadowing_an_install_says_what_to_do(tmp_path):
    """From the repository's root, ``import nwfast`` finds the source tree, whose
    kernels are not at nwfast.kernels: the error says so (and not 'install numba').
    An editable install of this tree maps nwfast.kernels for it; a regular one,
    the case here, does not: the subprocess drops the editable install's finder."""
    site = _installed_copy(tmp_path / "site")
    done = run_python(
        """
        import sys
        sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in f.__module__]
        import torch, nwfast
        x = torch.randn(50)
        try:
            nwfast.nw_pool(x, x, x, 1.0)
        except ImportError as error:
            print(error)
        """,
        cwd=REPO,
        env={"PYTHONPATH": str(site)},
    )
    assert "imported from" in done.stdout and "pip install -e ." in done.stdout, (
        done.stdout + done.stderr
    )


def test_a_cold_start_compiles_only_what_the_call_needs(tmp_path):
    """The textbook's first call, float32, one feature, gradient to w only: the
    two passes it needs compile (the forward, and dk/dv/dw for w), for d = 1,
    and nothing else."""
    done = run_python(
        """
        import torch, nwfast
        from nwfast.kernels import numba_nw
        x = torch.rand(1000)
        w = torch.tensor([2.0], requires_grad=True)
        nwfast.nw_pool(x, x, x, w, exclude_self=True).sum().backward()
        def described(args):  # a pass's class, d and dtype from its Numba type
            fields = dict(zip(args.fields, args.types))
            return args.instance_class.__name__, fields["dims"].count, str(fields["c2"].dtype)
        passes = sorted([described(sig[3]) for sig in numba_nw._run.signatures]
            + [described(sig[4]) for sig in numba_nw._key_grads.signatures])
        general = {name: len(getattr(numba_nw, name).signatures) for name in (
            "_forward_general", "_dq_general", "_dkv_general", "_tangent_items")}
        print((passes, general))
        """,
        cwd=tmp_path,
        env={"NUMBA_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    passes, general = eval(done.stdout.strip())
    assert passes == [("KeyGrad", 1, "float32"), ("Pool", 1, "float32")]
    assert general == dict.fromkeys(general, 0)


@pytest.mark.parametrize(
    "value, error",
    [
        (torch.randn(9).to_sparse(), "sparse"),
        (torch.nested.nested_tensor([torch.randn(9)]), "nested"),
    ],
)
def test_unsupported_tensor_kinds_are_refused_by_name(value, error):
    x = torch.randn(9)
    with pytest.raises(TypeError, match=f"value must be a dense.*{error}"):
        nwfast.nw_pool(x, x, value, 1.0)


def test_exclude_self_must_be_a_bool():
    x = torch.randn(9)
    with pytest.raises(TypeError, match="exclude_self must be a bool"):
        nwfast.nw_pool(x, x, x, 1.0, exclude_self="no")
    out = nwfast.nw_pool(x, x, x, 1.0, exclude_self=torch.tensor(True).item())
    testing.assert_ok(testing.check_pool(out, x, x, x, 1.0, True))


@pytest.mark.parametrize(
    "call",
    [
        lambda x: nwfast.NWKernelRegression(exclude_self="no"),
        lambda x: nwfast.NWKernelRegression()(x, x, x, exclude_self="no"),
        lambda x: nwfast.local_linear_pool(x, x, x, 1.0, exclude_self="no"),
        lambda x: nwfast.pairs_computed(x, x, 1.0, exclude_self="no"),
    ],
    ids=["module", "module-call", "local-linear", "pairs-computed"],
)
def test_every_exclude_self_must_be_a_bool(call):
    with pytest.raises(TypeError, match="exclude_self must be a bool"):
        call(torch.randn(9))
