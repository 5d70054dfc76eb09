"""Triton kernels for the `triton` backend: NF4 and int8 dequant-matmuls and the fused MoE, each with a torch
reference in `reference.py`. Run on CUDA, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1).
"""

from .int8 import int8_matmul
from .moe import StackedExperts, fused_moe, moe_align, stack_experts
from .nf4 import nf4_matmul

__all__ = ["nf4_matmul", "int8_matmul", "fused_moe", "stack_experts", "StackedExperts", "moe_align"]
