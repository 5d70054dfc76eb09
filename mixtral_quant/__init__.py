"""mixtral-quant: quantize Mixtral-8x7B's attention and experts to NF4/int8 and run it on one GPU."""

import os as _os

from .formats import dequantize_tensor, quantize_tensor

# In a source checkout cli/ and kernels/ sit beside this package; an install maps them inside it
# (pyproject.toml). Let `mixtral_quant.kernels` / `mixtral_quant.cli` resolve in both cases.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "kernels")) and _os.path.isfile(
    _os.path.join(_root, "kernels", "__init__.py")
):
    __path__.append(_root)

from .loader import load_quantized  # noqa: E402
from .plan import plan_memory  # noqa: E402
from .quantize import quantize  # noqa: E402  (the function shadows the submodule attribute; import_module reaches it)

__all__ = ["load_quantized", "quantize_tensor", "dequantize_tensor", "quantize", "plan_memory"]
__version__ = "0.1.0"
