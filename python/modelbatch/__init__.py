"""ModelBatch: train hundreds to thousands of independent PyTorch models at once."""

from modelbatch._backend import backend_info, c_extension_loaded
from modelbatch import ops  # noqa: F401  (registers kernels)

__version__ = "0.1.0"
__all__ = ["backend_info", "c_extension_loaded"]
