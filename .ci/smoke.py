"""nwfast as a user receives it: run against the wheel installed in a fresh virtual
environment, from outside the source tree (`make wheel-smoke`).

    python .ci/smoke.py DIST_DIR

checks what the wheel and the sdist in DIST_DIR hold, then imports the installed
nwfast and runs a forward and backward of nw_pool and one estimator fit.
"""

import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path


def check_archives(dist):
    (wheel,) = dist.glob("nwfast-*.whl")
    (sdist,) = dist.glob("nwfast-*.tar.gz")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/", 1)[0] for name in names}
    # The kernels ship as nwfast.kernels: "kernels" alone belongs to another distribution.
    assert "kernels" not in tops, f"{wheel.name} installs a top-level kernels package"
    for needed in (
        "nwfast/__init__.py",
        "nwfast/kernels/__init__.py",
        "nwfast/kernels/numba_nw.py",
    ):
        assert needed in names, f"{wheel.name} lacks {needed}"
    with tarfile.open(sdist) as archive:
        members = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for needed in ("pyproject.toml", "README.md", "kernels/numba_nw.py", "nwfast/functional.py"):
        assert needed in members, f"{sdist.name} lacks {needed}"
    print(f"archives: {wheel.name} ({len(names)} files), {sdist.name}")


def check_installed():
    import numpy as np
    import torch

    import nwfast
    from nwfast import testing

    where = Path(nwfast.__file__).resolve()
    site_packages = Path(sysconfig.get_paths()["purelib"]).resolve()
    assert site_packages in where.parents, f"nwfast imported from {where}, not {site_packages}"
    print(f"nwfast {nwfast.__version__} from {where.parent}, torch {torch.__version__}")

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(500, generator=g) for _ in range(3))
    w = torch.tensor(4.0, requires_grad=True)
    q.requires_grad_()
    out = nwfast.nw_pool(q, k, v, w)
    testing.assert_ok(testing.check_pool(out.detach(), q.detach(), k, v, w.detach()))
    out.square().sum().backward()
    grads = (q.grad, None, None, w.grad)
    testing.assert_ok(
        *testing.check_pool_gradients(grads, q.detach(), k, v, w.detach(), 2 * out.detach())
    )
    print("nw_pool: forward and backward match the float64 reference")

    rng = np.random.default_rng(0)
    X = rng.uniform(0, 5, 400)
    y = np.sin(X) + rng.normal(0, 0.2, X.shape)
    model = nwfast.NadarayaWatson().fit(X, y)
    assert 0.05 < model.bandwidth_ < 1.0 and model.score(X, y) > 0.7, model.bandwidth_
    print(f"NadarayaWatson: h = {model.bandwidth_:.4f}, R^2 = {model.score(X, y):.3f}")


if __name__ == "__main__":
    check_archives(Path(sys.argv[1]))
    check_installed()
    print("smoke test passed")
