"""mixtral-quant: quantize Mixtral-8x7B's attention and experts to NF4/int8 and run it on one GPU.

The public API is imported lazily (PEP 562), so that `import mixtral_quant.cli.main` (and `mixq --help`) does not
import torch. `mixtral_quant.quantize` is the quantizer module; its entry point is `quantize_checkpoint` here (the
same function as `mixtral_quant.quantize.quantize`).
"""

from importlib import import_module

# public name -> (module, attribute)
_API = {
    "load_quantized": ("loader", "load_quantized"),
    "quantize_checkpoint": ("quantize", "quantize"),
    "quantize_tensor": ("formats", "quantize_tensor"),
    "dequantize_tensor": ("formats", "dequantize_tensor"),
    "plan_memory": ("plan", "plan_memory"),
}

__all__ = list(_API)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _API:  # submodules (`from mixtral_quant import formats`) are found by the import system
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _API[name]
    value = getattr(import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
