"""NF4 x activations on the GPU: `nf4_matmul(x, w) = x @ dequantize(w).T`, reading bitsandbytes' packed bytes
directly (no repack). A GEMV kernel for one row, a tiled tl.dot kernel (split-K for decode) for more.

Layout read (formats.py): byte i of `packed` holds elements 2i (high nibble) and 2i+1 (low nibble) of the
row-major weight, so row n's byte j holds columns 2j and 2j+1. The kernels multiply the high nibbles by the
even columns of x and the low nibbles by the odd ones: no nibble interleaving in registers. The K tile is a
power of two dividing both K and the blocksize, so each row of a tile has exactly one absmax.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixtral_quant.formats import NF4Weight

from ._common import (
    GEMV_MAX_M, KernelConfig, Tuner, cast_to, check_activation, check_device, check_k, clamp_block_k,
    configs_for, dot_acc, dot_fp32, largest_block_k, m_bucket, sum_rows,
)  # fmt: skip


@triton.jit
def nf4_tile(
    packed_ptr, absmax_ptr, nested_ptr, nested_map_ptr, qmap_ptr,  # this weight's tensors
    offset,  # fp32 nested offset (0.0 without double quant)
    rn, n_mask,  # [BLOCK_N] rows of the weight and their mask
    k0, K,  # first column of the tile (a multiple of BLOCK_K), in_features
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Dequantize weight rows `rn`, columns k0..k0+BLOCK_K: returns (even, odd) fp32 [BLOCK_N, BLOCK_K // 2].

    even[:, j] = w[rn, k0 + 2j], odd[:, j] = w[rn, k0 + 2j + 1], the block absmax applied.
    """
    tl.static_assert(BLOCK_K <= BLOCKSIZE, "a K tile must not straddle two absmax blocks")
    tl.static_assert(BLOCK_K % 2 == 0, "two nibbles per byte")
    kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # byte columns
    byte = tl.load(packed_ptr + rn[:, None] * (K // 2) + kb[None, :], mask=n_mask[:, None], other=0)
    hi = tl.load(qmap_ptr + (byte >> 4).to(tl.int32))  # the 16-entry table stays in L1
    lo = tl.load(qmap_ptr + (byte & 0xF).to(tl.int32))
    blk = (rn * K + k0) // BLOCKSIZE  # [BLOCK_N]: one absmax per row of the tile
    if DOUBLE_QUANT:
        code = tl.load(absmax_ptr + blk, mask=n_mask, other=0).to(tl.int32)
        scale = tl.load(nested_map_ptr + code) * tl.load(nested_ptr + blk // NESTED_BLOCKSIZE, mask=n_mask, other=0.0)
        scale += offset
    else:
        scale = tl.load(absmax_ptr + blk, mask=n_mask, other=0.0)
    return hi * scale[:, None], lo * scale[:, None]


@triton.jit
def _nf4_gemv_kernel(
    # pointers
    x_ptr,  # [K] one row of activations
    packed_ptr, absmax_ptr, nested_ptr, nested_map_ptr, qmap_ptr, offset_ptr,  # the NF4 weight [N, K]
    out_ptr,  # [split_k, N] fp32 partial sums, or [N] in x's dtype when split_k == 1
    # sizes
    N, K, split_k,
    # constexprs
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[n] = sum_k x[k] w[n, k] over this program's K slice; grid (cdiv(N, BLOCK_N), split_k)."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    k_per = tl.cdiv(tl.cdiv(K, BLOCK_K), split_k) * BLOCK_K
    k_start = pid_k * k_per
    k_end = tl.minimum(k_start + k_per, K)
    j = tl.arange(0, BLOCK_K // 2)
    offset = tl.load(offset_ptr)  # the nested offset, read on the device
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        even, odd = nf4_tile(packed_ptr, absmax_ptr, nested_ptr, nested_map_ptr, qmap_ptr, offset, rn, n_mask, k0, K,
                             BLOCKSIZE=BLOCKSIZE, NESTED_BLOCKSIZE=NESTED_BLOCKSIZE, DOUBLE_QUANT=DOUBLE_QUANT,
                             BLOCK_K=BLOCK_K)  # fmt: skip
        xe = tl.load(x_ptr + k0 + 2 * j).to(tl.float32)
        xo = tl.load(x_ptr + k0 + 2 * j + 1).to(tl.float32)
        acc += tl.sum(even * xe[None, :] + odd * xo[None, :], axis=1)
    tl.store(out_ptr + pid_k * N + rn, cast_to(acc, out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _nf4_matmul_kernel(
    # pointers
    x_ptr,  # [M, K] activations, row stride K
    packed_ptr, absmax_ptr, nested_ptr, nested_map_ptr, qmap_ptr, offset_ptr,  # the NF4 weight [N, K]
    out_ptr,  # [M, split_k, N] fp32 partial sums, or [M, N] in x's dtype when split_k == 1
    # sizes
    M, N, K, split_k,
    # constexprs
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,  # dot_acc: exact fp32 products (fp32 inputs; bf16 under the interpreter)
):
    """Tiled x @ w.T with the weight dequantized in registers; grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), split_k)."""
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = rm < M, rn < N
    k_per = tl.cdiv(tl.cdiv(K, BLOCK_K), split_k) * BLOCK_K
    k_start = pid_k * k_per
    k_end = tl.minimum(k_start + k_per, K)
    j = tl.arange(0, BLOCK_K // 2)
    offset = tl.load(offset_ptr)  # the nested offset, read on the device
    x_rows = x_ptr + rm[:, None] * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        even, odd = nf4_tile(packed_ptr, absmax_ptr, nested_ptr, nested_map_ptr, qmap_ptr, offset, rn, n_mask, k0, K,
                             BLOCKSIZE=BLOCKSIZE, NESTED_BLOCKSIZE=NESTED_BLOCKSIZE, DOUBLE_QUANT=DOUBLE_QUANT,
                             BLOCK_K=BLOCK_K)  # fmt: skip
        xe = tl.load(x_rows + (k0 + 2 * j)[None, :], mask=m_mask[:, None], other=0.0)  # [BLOCK_M, BLOCK_K/2]
        xo = tl.load(x_rows + (k0 + 2 * j + 1)[None, :], mask=m_mask[:, None], other=0.0)
        we = tl.trans(cast_to(even, xe.dtype))  # [BLOCK_K/2, BLOCK_N]
        wo = tl.trans(cast_to(odd, xo.dtype))
        acc = dot_acc(xo, wo, dot_acc(xe, we, acc, DOT_FP32), DOT_FP32)
    out = out_ptr + rm[:, None] * (split_k * N) + pid_k * N + rn[None, :]
    tl.store(out, cast_to(acc, out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


_TUNER = Tuner("nf4_matmul")


def _weight_args(w: NF4Weight) -> tuple:
    nested = w.nested_absmax if w.double_quant else w.absmax  # unused without double quant
    nested_map = w.nested_quant_map if w.double_quant else w.quant_map
    return w.packed, w.absmax, nested, nested_map, w.quant_map, w.offset


def check_nf4_weight(w: NF4Weight, name: str = "w") -> None:
    """Shape and dtype checks of an NF4Weight against the bitsandbytes layout (formats.py)."""
    if not isinstance(w, NF4Weight):
        raise ValueError(f"{name} must be a mixtral_quant.formats.NF4Weight, got {type(w).__name__}")
    if len(w.shape) != 2:
        raise ValueError(f"{name} must be a 2-D [out, in] weight, got shape {w.shape}")
    n, k = w.shape
    if k % 2:
        raise ValueError(f"{name} has an odd in_features {k}: two columns share a byte, so K must be even")
    nblocks = -(-n * k // w.blocksize)
    if w.packed.dtype != torch.uint8 or w.packed.numel() != n * k // 2:
        raise ValueError(f"{name}.packed must be uint8 with {n * k // 2} bytes for shape {w.shape}, "
                         f"got {w.packed.dtype} with {w.packed.numel()}")  # fmt: skip
    want = torch.uint8 if w.double_quant else torch.float32
    if w.absmax.dtype != want or w.absmax.numel() != nblocks:
        raise ValueError(f"{name}.absmax must be {want} with {nblocks} blocks, got {w.absmax.dtype} with "
                         f"{w.absmax.numel()}")  # fmt: skip
    if w.quant_map.dtype != torch.float32 or w.quant_map.numel() != 16:
        raise ValueError(f"{name}.quant_map must be float32 [16], got {w.quant_map.dtype} {tuple(w.quant_map.shape)}")
    if w.double_quant and (w.nested_quant_map is None or w.nested_quant_map.numel() != 256):
        raise ValueError(f"{name}.nested_quant_map must be float32 [256] with double quantization")
    if not isinstance(w.offset, torch.Tensor) or w.offset.dtype != torch.float32 or w.offset.numel() != 1:
        got = f"{w.offset.dtype} {tuple(w.offset.shape)}" if isinstance(w.offset, torch.Tensor) else type(w.offset).__name__
        raise ValueError(f"{name}.offset must be a float32 tensor of one element (the nested offset, on the weight's "
                         f"device), got {got}")  # fmt: skip
    tensors = {f"{name}.packed": w.packed, f"{name}.absmax": w.absmax, f"{name}.quant_map": w.quant_map}
    if w.double_quant:
        tensors.update({f"{name}.nested_absmax": w.nested_absmax, f"{name}.nested_quant_map": w.nested_quant_map})
    for tname, t in tensors.items():
        if not t.is_contiguous():
            raise ValueError(f"{tname} must be contiguous (call .contiguous() when loading)")


def nf4_matmul(x: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """x [..., K] (fp32/bf16/fp16, contiguous) @ dequantize(w).T -> [..., N] in x's dtype; w.shape == (N, K).

    fp32 accumulation. M = x.numel() // K picks the kernel: 1 -> GEMV, <= 16 -> split-K tl.dot, else tiled GEMM.
    Checks here, then the custom operator `torch.ops.mixq.nf4_matmul`, which torch.compile sees as one op.
    """
    check_nf4_weight(w)
    check_nf4_args(x, w)
    args = (x, w.packed, w.absmax, w.quant_map, w.nested_absmax, w.nested_quant_map, w.offset, w.shape[0], w.shape[1],
            w.blocksize, w.nested_blocksize)  # fmt: skip
    # traced: the one opaque operator (its fake gives the shape); eager: the launches directly, no dispatcher trip
    return _nf4_matmul_op(*args) if torch.compiler.is_compiling() else _nf4_matmul_eager(*args)


def check_nf4_args(x: torch.Tensor, w: NF4Weight) -> None:
    n, k = w.shape
    check_activation(x, k)
    check_k(k)
    check_device(x, {"w.packed": w.packed, "w.absmax": w.absmax, "w.quant_map": w.quant_map, "w.offset": w.offset})


def _weight(packed, absmax, quant_map, nested_absmax, nested_quant_map, offset, n: int, k: int, blocksize: int,
            nested_blocksize: int) -> NF4Weight:  # fmt: skip
    return NF4Weight(packed=packed, absmax=absmax, quant_map=quant_map, nested_absmax=nested_absmax,
                     nested_quant_map=nested_quant_map, offset=offset, shape=(n, k), blocksize=blocksize,
                     nested_blocksize=nested_blocksize, dtype=torch.float32)  # fmt: skip


def _nf4_matmul_impl(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor,
                   nested_absmax: torch.Tensor | None, nested_quant_map: torch.Tensor | None, offset: torch.Tensor,
                   n: int, k: int, blocksize: int, nested_blocksize: int) -> torch.Tensor:  # fmt: skip
    """nf4_matmul's launches; the tuner runs here, eagerly, never inside a traced graph."""
    w = _weight(packed, absmax, quant_map, nested_absmax, nested_quant_map, offset, n, k, blocksize, nested_blocksize)
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    x2, out2 = x.view(-1, k), out.view(-1, n)  # [M, K], [M, N]
    m = x2.shape[0]
    if m:
        max_bk = largest_block_k(k, blocksize)
        key = (m_bucket(m), n, k, blocksize, w.double_quant, x.dtype)
        cfg = _TUNER.pick(key, clamp_block_k(configs_for(m), max_bk), lambda c: _launch(x2, w, out2, c, max_bk))
        _launch(x2, w, out2, cfg, max_bk)
    return out


_nf4_matmul_op = torch.library.custom_op("mixq::nf4_matmul", _nf4_matmul_impl, mutates_args=())
# the eager path: never traced (dynamo also sees frames run eagerly around a graph break; a trace must meet the op)
_nf4_matmul_eager = torch.compiler.disable(_nf4_matmul_impl)


@_nf4_matmul_op.register_fake
def _nf4_matmul_fake(x, packed, absmax, quant_map, nested_absmax, nested_quant_map, offset, n, k, blocksize,
                     nested_blocksize):  # fmt: skip
    w = _weight(packed, absmax, quant_map, nested_absmax, nested_quant_map, offset, n, k, blocksize, nested_blocksize)
    check_nf4_weight(w)
    check_nf4_args(x, w)
    return x.new_empty(*x.shape[:-1], n)


def _launch(x2: torch.Tensor, w: NF4Weight, out: torch.Tensor, cfg: KernelConfig, max_bk: int) -> None:
    m, k = x2.shape
    n = w.shape[0]
    bk = min(cfg.block_k, max_bk)
    split = max(1, min(cfg.split_k, k // bk))
    dst = out if split == 1 else torch.empty(m, split, n, dtype=torch.float32, device=x2.device)
    common = dict(BLOCKSIZE=w.blocksize, NESTED_BLOCKSIZE=w.nested_blocksize, DOUBLE_QUANT=w.double_quant,
                  BLOCK_N=cfg.block_n, BLOCK_K=bk, split_k=split, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if m <= GEMV_MAX_M and cfg.block_m == 1:
        grid = (triton.cdiv(n, cfg.block_n), split)
        _nf4_gemv_kernel[grid](x2, *_weight_args(w), dst, n, k, **common)
    else:
        grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), split)
        _nf4_matmul_kernel[grid](x2, *_weight_args(w), dst, m, n, k, BLOCK_M=cfg.block_m,
                                 DOT_FP32=dot_fp32(x2.dtype), **common)  # fmt: skip
    if split > 1:
        sum_rows(dst, out)


__all__ = ["nf4_matmul", "nf4_tile", "check_nf4_weight"]
