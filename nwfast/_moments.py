"""The local-linear moments' layout and the rule for rows too thin for a line.

One definition for the fused path (``nwfast.local_linear``) and the reference
(``nwfast.reference``), which both read the moments by this layout and fall back
to the local-constant value on the same rows.
"""

from typing import NamedTuple

import torch

# Smallest eigenvalue of the scaled covariance R below which a line is not fitted,
# 1024 units of rounding of the dtype the kernels sum in (float32 for half inputs).
THIN_FLOAT64, THIN_FLOAT32 = 2.0**-43, 2.0**-14


def thin_tolerance(dtype):
    return THIN_FLOAT64 if dtype == torch.float64 else THIN_FLOAT32


class Layout(NamedTuple):
    """Column ranges of the moments (n, P): u (d), upper(u u^T) (d (d+1) / 2,
    f <= g row by row), v (c), u v^T (d * c, feature by feature)."""

    first: slice
    second: slice
    values: slice
    products: slice
    size: int


def moment_layout(d, c):
    t = d * (d + 1) // 2
    return Layout(
        slice(0, d), slice(d, d + t), slice(d + t, d + t + c), slice(d + t + c, d + t + c + d * c),
        d + t + c + d * c,
    )  # fmt: skip


def unpack(moments, d, c):
    """S1 (n, d), S2 (n, d, d), Sv (n, c), Suv (n, d, c) from the layout."""
    layout = moment_layout(d, c)
    n = moments.shape[0]
    # column of (f, g) in the upper triangle, for f <= g and, mirrored, f > g
    f, g = torch.meshgrid(torch.arange(d), torch.arange(d), indexing="ij")
    low, high = torch.minimum(f, g), torch.maximum(f, g)
    column = layout.second.start + low * d - low * (low - 1) // 2 + (high - low)
    return (
        moments[:, layout.first],
        moments[:, column.to(moments.device)],
        moments[:, layout.values],
        moments[:, layout.products].reshape(n, d, c),
    )


def covariance(S1, S2):
    """C = S2 - S1 S1^T, its scaled form R and the scales sqrt(diag S2)."""
    C = S2 - S1[:, :, None] * S1[:, None, :]
    diagonal = S2.diagonal(dim1=1, dim2=2)
    scale = torch.where(diagonal > 0, diagonal, 1.0).sqrt()
    return C / (scale[:, :, None] * scale[:, None, :]), scale


def is_thin(R, tol):
    """Rows whose scaled covariance has an eigenvalue <= tol (not NaN rows: those
    propagate their NaN through the solve)."""
    with torch.no_grad():
        finite = torch.isfinite(R).flatten(1).all(1)
        eye = torch.eye(R.shape[1], dtype=R.dtype, device=R.device)
        smallest = torch.linalg.eigvalsh(torch.where(finite[:, None, None], R, eye))[:, 0]
        return finite & ~(smallest > tol)
