"""nwfast: fused Nadaraya-Watson (Gaussian attention) pooling for PyTorch."""

from nwfast import reference
from nwfast.functional import (
    PlanSummary,
    nw_pool,
    nw_pool_rows,
    nw_pool_with_lse,
    nw_weights,
    pairs_computed,
    plan_summary,
)
from nwfast.local_linear import local_linear_pool
from nwfast.models import NWKernelRegression

__all__ = [
    "LocalLinearRegression",
    "NWKernelRegression",
    "NadarayaWatson",
    "PlanSummary",
    "distributed",
    "local_linear_pool",
    "nw_pool",
    "nw_pool_rows",
    "nw_pool_with_lse",
    "nw_weights",
    "pairs_computed",
    "plan_summary",
    "reference",
]
__version__ = "0.3.0.dev0"

_ESTIMATORS = ("LocalLinearRegression", "NadarayaWatson")


def __getattr__(name):
    # nwfast.distributed is imported on first use as well: most users run one process.
    if name == "distributed":
        import nwfast.distributed

        return nwfast.distributed
    # The estimators need scikit-learn (the "sklearn" extra); they are imported on
    # first use, so that the operators never pay for it.
    if name not in _ESTIMATORS:
        raise AttributeError(f"module 'nwfast' has no attribute {name!r}")
    try:
        from nwfast import estimator
    except ModuleNotFoundError as error:
        if (error.name or "").partition(".")[0] != "sklearn":
            raise
        raise ImportError(
            f"nwfast.{name} is a scikit-learn estimator: pip install 'nwfast[sklearn]'"
        ) from None
    return getattr(estimator, name)
