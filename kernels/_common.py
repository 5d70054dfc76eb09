"""What every kernel wrapper shares: launch configs (from functions, small-M and large-M sets), a tuner that
times them once per shape on the GPU (triton.testing.do_bench), argument checks with clear messages, and the split-K reduction kernel.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import Callable, Hashable

import torch
import triton
import triton.language as tl
import triton.testing

log = logging.getLogger(__name__)

GEMV_MAX_M = 1  # rows handled by the dot-free GEMV kernel
DECODE_MAX_M = 16  # up to here: BLOCK_M 16 with split-K; above: tiled GEMM
MIN_BLOCK_K = 32  # the K tile holds BLOCK_K/2 bytes per row and tl.dot needs K >= 16


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (TRITON_INTERPRET=1, read when the kernels were imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration. block_k is an upper bound: the wrapper clamps it to what the layout allows."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


def gemv_configs() -> list[KernelConfig]:
    """M == 1: no tl.dot; split over N (block_n) and K (split_k, a runtime argument) to fill every SM."""
    return [KernelConfig(1, bn, 256, sk, w, 1) for bn, w in ((64, 4), (128, 4), (256, 8)) for sk in (1, 4, 8, 16)]


def decode_configs() -> list[KernelConfig]:
    """2 <= M <= 16: one BLOCK_M of 16 (tl.dot's minimum), split-K for occupancy."""
    return [KernelConfig(16, bn, 128, sk, 4, 3) for bn in (32, 64, 128) for sk in (1, 4, 8)]


def prefill_configs() -> list[KernelConfig]:
    """M > 16: a tiled GEMM with in-kernel dequantization feeding tl.dot; no split-K."""
    return [KernelConfig(bm, bn, 128, 1, w, st) for bm, bn, w, st in
            ((64, 64, 4, 4), (64, 128, 4, 4), (128, 64, 4, 4), (128, 128, 8, 3))]  # fmt: skip


def interpreter_config(m: int) -> KernelConfig:
    """Under TRITON_INTERPRET one small fixed config: autotuning on the CPU measures nothing useful."""
    if m <= GEMV_MAX_M:
        return KernelConfig(1, 32, 64, 2, 1, 1)
    if m <= DECODE_MAX_M:
        return KernelConfig(16, 32, 64, 2, 1, 1)
    return KernelConfig(32, 32, 64, 1, 1, 1)


def configs_for(m: int) -> list[KernelConfig]:
    if interpreting():
        return [interpreter_config(m)]
    if m <= GEMV_MAX_M:
        return gemv_configs()
    return decode_configs() if m <= DECODE_MAX_M else prefill_configs()


def clamp_block_k(configs: list[KernelConfig], max_bk: int) -> list[KernelConfig]:
    """The configs with block_k capped by the layout (largest_block_k), duplicates dropped."""
    return list(dict.fromkeys(replace(c, block_k=min(c.block_k, max_bk)) for c in configs))


def m_bucket(m: int) -> int:
    """Tuning key for M: exact up to 16, then powers of two (prefill shapes vary a lot)."""
    return m if m <= DECODE_MAX_M else min(1 << (m - 1).bit_length(), 4096)


def largest_block_k(k: int, blocksize: int | None = None) -> int:
    """The largest power of two dividing K (and the NF4 blocksize), so a K tile never straddles a quant block."""
    bk = k & -k
    if blocksize is not None:
        bk = min(bk, blocksize)
    return bk


class Tuner:
    """Times each config once per key (triton.testing.do_bench, median) and remembers the fastest.

    It runs inside the custom ops' eager implementations, never in a traced graph: call a step once before
    capturing it in a CUDA graph (generate does). MIXQ_TUNE=0 takes the first config untimed.
    """

    def __init__(self, name: str):
        self.name = name
        self.best: dict[Hashable, KernelConfig] = {}

    def pick(self, key: Hashable, configs: list[KernelConfig],
             launch: Callable[[KernelConfig], object]) -> KernelConfig:  # fmt: skip
        if key in self.best:
            return self.best[key]
        configs = list(dict.fromkeys(configs))
        if len(configs) == 1 or os.environ.get("MIXQ_TUNE", "1") == "0" or interpreting():
            self.best[key] = configs[0]
            return configs[0]
        timings, first_error = [], None
        for cfg in configs:
            try:
                timings.append((triton.testing.do_bench(lambda: launch(cfg), warmup=5, rep=20,
                                                        return_mode="median"), cfg))  # fmt: skip
            except Exception as e:  # a config that does not fit (shared memory, registers) is skipped
                log.debug("%s %s: %s skipped (%s)", self.name, key, cfg, e)
                first_error = first_error or e
        if not timings:  # every config failed: the first failure says why (not a bare "nothing ran")
            log.error("%s %s: every launch config failed", self.name, key)
            raise first_error
        t, cfg = min(timings, key=lambda p: p[0])
        log.info("%s %s: %s (%.1f us)", self.name, key, cfg, t * 1e3)
        self.best[key] = cfg
        return cfg


def check_activation(x: torch.Tensor, k: int, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"{name} has shape {tuple(x.shape)}: its last dimension must be the weight's in_features {k}")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first)")


def check_device(x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> None:
    """All tensors on x's device; CUDA unless Triton's interpreter runs the kernels on the CPU."""
    for name, t in tensors.items():
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: move both to one device")
    if x.device.type == "cuda" and interpreting():
        raise ValueError("x is on CUDA but TRITON_INTERPRET=1 runs kernels on the CPU: unset it or use CPU tensors")
    if x.device.type != "cuda" and not interpreting():
        raise ValueError(f"x is on {x.device}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU)")


def check_k(k: int) -> None:
    if k % MIN_BLOCK_K:
        raise ValueError(f"in_features {k} must be a multiple of {MIN_BLOCK_K} for the Triton kernels; "
                         "use the torch backend for this layer")  # fmt: skip


# Read once, like triton.jit reads TRITON_INTERPRET when it decorates a kernel.
INTERPRETED = tl.constexpr(interpreting())


@triton.jit
def cast_to(v, dtype: tl.constexpr):
    """v.to(dtype) rounding to nearest even; the interpreter truncates fp32 -> bf16, so round the bits first there."""
    if INTERPRETED:  # two compile-time ifs: no reliance on `and` folding constexprs
        if dtype == tl.bfloat16:
            bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            v = bits.to(tl.float32, bitcast=True)
    return v.to(dtype)


@triton.jit
def dot_acc(a, b, acc, DOT_FP32: tl.constexpr):
    """acc + a @ b. DOT_FP32: upcast and multiply in exact fp32 (fp32 inputs: no tf32; bf16 under the
    interpreter, whose tl.dot multiplies bf16 bit patterns as integers; products of bf16 values are exact in fp32)."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


def dot_fp32(dtype: torch.dtype) -> bool:
    """The DOT_FP32 constexpr for activations of `dtype`."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())


@triton.jit
def _sum_rows_kernel(
    # pointers
    part_ptr,  # fp32 [T, R, C]
    out_ptr,  # [T, C], any float dtype
    # sizes
    C,
    # constexprs
    R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """out[t, c] = sum_r part[t, r, c], cast to out's dtype: the deterministic split-K / top-k reduction."""
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < C
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for r in tl.static_range(R):
        acc += tl.load(part_ptr + (t * R + r) * C + cols, mask=mask, other=0.0)
    tl.store(out_ptr + t * C + cols, cast_to(acc, out_ptr.dtype.element_ty), mask=mask)


def sum_rows(part: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [T, C] = part [T, R, C].sum(1) in fp32, cast to out.dtype; one launch, summation order fixed."""
    t, r, c = part.shape
    if t:
        block_c = 256 if interpreting() else 1024
        _sum_rows_kernel[(t, triton.cdiv(c, block_c))](part, out, c, R=r, BLOCK_C=block_c, num_warps=4)
    return out
