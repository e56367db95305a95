"""nwfast: fused Nadaraya-Watson (Gaussian attention) pooling for PyTorch."""

from nwfast import reference
from nwfast.functional import nw_pool, nw_pool_rows, nw_weights

__all__ = ["nw_pool", "nw_pool_rows", "nw_weights", "reference"]
__version__ = "0.1.0"
