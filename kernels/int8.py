"""Row-scaled int8 x activations on the GPU: `int8_matmul(x, weight, scb) = x @ (weight * scb[:, None] / 127).T`.

The row scale is constant along K, so the kernels accumulate x @ weight.T from exact int8 values and apply
scb / 127 once in the epilogue. A GEMV kernel for one row, a tiled tl.dot kernel (split-K for decode) for more.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    GEMV_MAX_M, KernelConfig, Tuner, cast_to, check_activation, check_device, check_k, clamp_block_k, configs_for,
    dot_acc, dot_fp32, largest_block_k, m_bucket, sum_rows,
)  # fmt: skip


@triton.jit
def _int8_gemv_kernel(
    # pointers
    x_ptr,  # [K] one row of activations
    w_ptr,  # int8 [N, K]
    scb_ptr,  # fp32 [N]
    out_ptr,  # [split_k, N] fp32 partial sums, or [N] in x's dtype when split_k == 1
    # sizes
    N, K, split_k,
    # constexprs
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[n] = scb[n] / 127 * sum_k x[k] w[n, k] over this program's K slice; grid (cdiv(N, BLOCK_N), split_k)."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    k_per = tl.cdiv(tl.cdiv(K, BLOCK_K), split_k) * BLOCK_K
    k_start = pid_k * k_per
    k_end = tl.minimum(k_start + k_per, K)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        w = tl.load(w_ptr + rn[:, None] * K + (k0 + rk)[None, :], mask=n_mask[:, None], other=0)
        xk = tl.load(x_ptr + k0 + rk).to(tl.float32)
        acc += tl.sum(w.to(tl.float32) * xk[None, :], axis=1)
    acc *= tl.load(scb_ptr + rn, mask=n_mask, other=0.0) * (1.0 / 127.0)
    tl.store(out_ptr + pid_k * N + rn, cast_to(acc, out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _int8_matmul_kernel(
    # pointers
    x_ptr,  # [M, K] activations, row stride K
    w_ptr,  # int8 [N, K]
    scb_ptr,  # fp32 [N]
    out_ptr,  # [M, split_k, N] fp32 partial sums, or [M, N] in x's dtype when split_k == 1
    # sizes
    M, N, K, split_k,
    # constexprs
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,  # dot_acc: exact fp32 products (fp32 inputs; bf16 under the interpreter)
):
    """Tiled x @ w.T, int8 converted to x's dtype in registers (exact); grid (cdiv(M, BM), cdiv(N, BN), split_k)."""
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = rm < M, rn < N
    k_per = tl.cdiv(tl.cdiv(K, BLOCK_K), split_k) * BLOCK_K
    k_start = pid_k * k_per
    k_end = tl.minimum(k_start + k_per, K)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        xk = tl.load(x_ptr + rm[:, None] * K + (k0 + rk)[None, :], mask=m_mask[:, None], other=0.0)  # [BM, BK]
        w = tl.load(w_ptr + rn[None, :] * K + (k0 + rk)[:, None], mask=n_mask[None, :], other=0)  # [BK, BN]
        # int8 -> fp32 -> x's dtype is exact; the interpreter's direct int -> bf16 cast is wrong
        acc = dot_acc(xk, w.to(tl.float32).to(xk.dtype), acc, DOT_FP32)
    acc *= tl.load(scb_ptr + rn, mask=n_mask, other=0.0)[None, :] * (1.0 / 127.0)
    out = out_ptr + rm[:, None] * (split_k * N) + pid_k * N + rn[None, :]
    tl.store(out, cast_to(acc, out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


_TUNER = Tuner("int8_matmul")


def check_int8_weight(weight: torch.Tensor, scb: torch.Tensor, name: str = "weight") -> None:
    if not isinstance(weight, torch.Tensor) or weight.dtype != torch.int8 or weight.dim() != 2:
        got = f"{weight.dtype} {tuple(weight.shape)}" if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"{name} must be an int8 [N, K] tensor, got {got}")
    if not isinstance(scb, torch.Tensor) or scb.dtype != torch.float32 or tuple(scb.shape) != (weight.shape[0],):
        got = f"{scb.dtype} {tuple(scb.shape)}" if isinstance(scb, torch.Tensor) else type(scb).__name__
        raise ValueError(f"scb must be float32 [{weight.shape[0]}] (one scale per row of {name}), got {got}")
    if not weight.is_contiguous() or not scb.is_contiguous():
        raise ValueError(f"{name} and scb must be contiguous (call .contiguous() when loading)")


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """x [..., K] (fp32/bf16/fp16, contiguous) @ (weight * scb[:, None] / 127).T -> [..., N] in x's dtype.

    weight int8 [N, K], scb float32 [N] (bitsandbytes' SCB: each row's absmax). fp32 accumulation. Checks here,
    then the custom operator `torch.ops.mixq.int8_matmul`, which torch.compile sees as one op.
    """
    check_int8_weight(weight, scb)
    check_int8_args(x, weight, scb)
    # traced: the one opaque operator (its fake gives the shape); eager: the launches directly, no dispatcher trip
    return _int8_matmul_op(x, weight, scb) if torch.compiler.is_compiling() else _int8_matmul_eager(x, weight, scb)


def check_int8_args(x: torch.Tensor, weight: torch.Tensor, scb: torch.Tensor) -> None:
    k = weight.shape[1]
    check_activation(x, k)
    check_k(k)
    check_device(x, {"weight": weight, "scb": scb})


def _int8_matmul_impl(x: torch.Tensor, weight: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """int8_matmul's launches; the tuner runs here, eagerly, never inside a traced graph."""
    n, k = weight.shape
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    x2, out2 = x.view(-1, k), out.view(-1, n)  # [M, K], [M, N]
    m = x2.shape[0]
    if m:
        max_bk = largest_block_k(k)
        key = (m_bucket(m), n, k, x.dtype)
        configs = clamp_block_k(configs_for(m), max_bk)
        cfg = _TUNER.pick(key, configs, lambda c: _launch(x2, weight, scb, out2, c, max_bk))
        _launch(x2, weight, scb, out2, cfg, max_bk)
    return out


_int8_matmul_op = torch.library.custom_op("mixq::int8_matmul", _int8_matmul_impl, mutates_args=())
# the eager path: never traced (dynamo also sees frames run eagerly around a graph break; a trace must meet the op)
_int8_matmul_eager = torch.compiler.disable(_int8_matmul_impl)


@_int8_matmul_op.register_fake
def _int8_matmul_fake(x, weight, scb):
    check_int8_weight(weight, scb)
    check_int8_args(x, weight, scb)
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _launch(x2, weight, scb, out, cfg: KernelConfig, max_bk: int) -> None:
    m, k = x2.shape
    n = weight.shape[0]
    bk = min(cfg.block_k, max_bk)
    split = max(1, min(cfg.split_k, k // bk))
    dst = out if split == 1 else torch.empty(m, split, n, dtype=torch.float32, device=x2.device)
    common = dict(BLOCK_N=cfg.block_n, BLOCK_K=bk, split_k=split, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if m <= GEMV_MAX_M and cfg.block_m == 1:
        _int8_gemv_kernel[(triton.cdiv(n, cfg.block_n), split)](x2, weight, scb, dst, n, k, **common)
    else:
        grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), split)
        _int8_matmul_kernel[grid](x2, weight, scb, dst, m, n, k, BLOCK_M=cfg.block_m,
                                  DOT_FP32=dot_fp32(x2.dtype), **common)  # fmt: skip
    if split > 1:
        sum_rows(dst, out)


__all__ = ["int8_matmul", "check_int8_weight"]
