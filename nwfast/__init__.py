"""nwfast: fused Nadaraya-Watson (Gaussian attention) pooling for PyTorch."""

from nwfast import reference
from nwfast.estimator import NadarayaWatson
from nwfast.functional import nw_pool, nw_pool_rows, nw_weights
from nwfast.local_linear import local_linear_pool
from nwfast.models import NWKernelRegression

__all__ = [
    "NWKernelRegression",
    "NadarayaWatson",
    "local_linear_pool",
    "nw_pool",
    "nw_pool_rows",
    "nw_weights",
    "reference",
]
__version__ = "0.1.0"
