"""The local-linear moments' layout and the rule for rows too thin for a line.

One definition for the fused path (``nwfast.local_linear``) and the reference
(``nwfast.reference``), which both read the moments by this layout and move
from the line to the local-constant value on the same rows, by the same share.
"""

import math
from typing import NamedTuple

import torch

# How much of the line a row's prediction takes, by the smallest eigenvalue lam of its
# scaled covariance R: none up to THIN (the local-constant value), all of it from FULL
# on, and between them a smoothstep in log lam, so that the prediction and the
# leave-one-out criterion stay continuous in the bandwidth. Float64's THIN lies 2^10
# above its 1024 units of rounding: on tied data, lines just past that threshold
# were measured to swing with the last digits of the weights. Float32 (the sums of
# half inputs too) starts at its 1024 units, 2^-14, and takes every line past 2^-7.
LINE_RAMP = {torch.float64: (2.0**-33, 2.0**-20), torch.float32: (2.0**-14, 2.0**-7)}


def line_ramp(dtype):
    """(THIN, FULL) for the dtype of the inputs."""
    return LINE_RAMP[torch.float64 if dtype == torch.float64 else torch.float32]


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


def line_share(R, dtype):
    """Per row, the line's share s in [0, 1] of the prediction Sv + s (line - Sv),
    from the smallest eigenvalue of R (differentiable). Rows with a NaN or inf in R
    take s = 1, so that their NaN reaches the prediction through the solve."""
    thin, full = line_ramp(dtype)
    finite = torch.isfinite(R).flatten(1).all(1)
    eye = torch.eye(R.shape[1], dtype=R.dtype, device=R.device)
    smallest = torch.linalg.eigvalsh(torch.where(finite[:, None, None], R, eye))[:, 0]
    t = (smallest.clamp(thin, full).log() - math.log(thin)) / math.log(full / thin)
    return torch.where(finite, t * t * (3.0 - 2.0 * t), 1.0)
