"""The fused MoE: all experts of a layer in two launches. Tokens are sorted by expert and padded to BLOCK_M
(vLLM's moe_align idea); launch 1 runs w1 and w3 and writes silu(a) * b, launch 2 runs w2, scales by the
routing weight and a fixed-order reduction sums each token's experts (and split-K parts).

Shapes: T tokens, D hidden, F intermediate, E experts, A experts per token, P = T * A (token, slot) pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mixtral_quant.formats import NF4Weight

from ._common import (
    KernelConfig, Tuner, cast_to, check_activation, check_device, check_k, clamp_block_k, dot_acc, dot_fp32,
    interpreting, largest_block_k, m_bucket, sum_rows,
)  # fmt: skip
from .int8 import check_int8_weight
from .nf4 import check_nf4_weight, nf4_tile


@dataclass
class StackedNF4:
    """E NF4 weights of one shape, each tensor stacked along a new first dim (one pointer + stride per tensor)."""

    packed: torch.Tensor  # uint8 [E, N*K/2]
    absmax: torch.Tensor  # uint8 (double quant) or float32 [E, N*K/blocksize]
    nested_absmax: torch.Tensor  # float32 [E, ceil(blocks/256)] (absmax again when not double quant: unused)
    nested_quant_map: torch.Tensor  # float32 [E, 256] (quant_map when not double quant: unused)
    quant_map: torch.Tensor  # float32 [E, 16]
    offsets: torch.Tensor  # float32 [E, 1] nested offsets (a strided view of the loader's buffer when it can be)
    shape: tuple[int, int]  # (N, K) of each expert
    blocksize: int
    nested_blocksize: int
    double_quant: bool

    def args(self) -> tuple:
        """Kernel arguments: the six pointers, then the six per-expert strides."""
        t = (self.packed, self.absmax, self.nested_absmax, self.nested_quant_map, self.quant_map, self.offsets)
        return (*t, *(x.stride(0) for x in t))


@dataclass
class StackedInt8:
    weight: torch.Tensor  # int8 [E, N*K] (expert rows may be strided views)
    scb: torch.Tensor  # float32 [E, N]
    shape: tuple[int, int]


@dataclass
class StackedExperts:
    """One layer's experts as the fused kernels read them: w1, w3 [F, D] and w2 [D, F] per expert, stacked
    (views of the loader's buffers when the experts already lie at equal strides in one storage)."""

    w1: StackedNF4 | StackedInt8
    w3: StackedNF4 | StackedInt8
    w2: StackedNF4 | StackedInt8
    num_experts: int
    hidden: int  # D
    intermediate: int  # F

    @property
    def fmt(self) -> str:
        return "nf4" if isinstance(self.w1, StackedNF4) else "int8"

    @property
    def device(self) -> torch.device:
        return self.w1.packed.device if isinstance(self.w1, StackedNF4) else self.w1.weight.device


def stack_views(ts: list[torch.Tensor]) -> torch.Tensor:
    """[E, numel] over per-expert tensors: a strided view when they already sit at equal steps in one storage (the
    loader's stacked buffers), else a copy. The kernels only need each expert's own row contiguous."""
    flat = [t.reshape(-1) for t in ts]
    n, size = flat[0].numel(), flat[0].element_size()
    if all(t.is_contiguous() for t in ts) and len({t.untyped_storage().data_ptr() for t in ts}) == 1:
        step = (flat[1].data_ptr() - flat[0].data_ptr()) // size if len(flat) > 1 else n
        if step >= n and all(f.data_ptr() - flat[0].data_ptr() == i * step * size for i, f in enumerate(flat)):
            return flat[0].as_strided((len(flat), n), (step, 1))
    return torch.stack(flat)


def _stack_nf4(ws: list[NF4Weight], name: str) -> StackedNF4:
    for i, w in enumerate(ws):
        check_nf4_weight(w, f"{name}[{i}]")
    first = ws[0]
    for i, w in enumerate(ws):
        if (w.shape, w.blocksize, w.double_quant, w.nested_blocksize) != (
            first.shape, first.blocksize, first.double_quant, first.nested_blocksize
        ):
            raise ValueError(f"{name}[{i}] is {w.shape} blocksize {w.blocksize} double_quant {w.double_quant}, "
                             f"but {name}[0] is {first.shape} blocksize {first.blocksize} double_quant "
                             f"{first.double_quant}: stacked experts must share shape and quantization")  # fmt: skip
        if w.packed.device != first.packed.device:
            raise ValueError(f"{name}[{i}] is on {w.packed.device}, {name}[0] on {first.packed.device}")
    dq = first.double_quant
    return StackedNF4(
        packed=stack_views([w.packed for w in ws]),
        absmax=stack_views([w.absmax for w in ws]),
        nested_absmax=stack_views([w.nested_absmax if dq else w.absmax for w in ws]),
        nested_quant_map=stack_views([w.nested_quant_map if dq else w.quant_map for w in ws]),
        quant_map=stack_views([w.quant_map for w in ws]),
        offsets=stack_views([w.offset for w in ws]),  # device tensors: no host read
        shape=tuple(first.shape), blocksize=first.blocksize, nested_blocksize=first.nested_blocksize, double_quant=dq,
    )  # fmt: skip


def _stack_int8(ws: list, name: str) -> StackedInt8:
    for i, pair in enumerate(ws):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"{name}[{i}] must be an NF4Weight or an (int8 weight, SCB) pair")
        check_int8_weight(*pair, name=f"{name}[{i}]")
        if pair[0].shape != ws[0][0].shape:
            raise ValueError(f"{name}[{i}] has shape {tuple(pair[0].shape)}, {name}[0] {tuple(ws[0][0].shape)}")
    n, k = ws[0][0].shape
    weight = stack_views([p[0] for p in ws])  # [E, N*K]
    return StackedInt8(weight, stack_views([p[1] for p in ws]), (n, k))


def stack_experts(w1s: list, w2s: list, w3s: list) -> StackedExperts:
    """Stack one layer's experts once at load: lists of NF4Weight (or (int8 weight, SCB) pairs), one per expert.

    w1s[e], w3s[e]: [F, D]; w2s[e]: [D, F]. Experts that are views at equal steps into one buffer (as
    QuantLinear's [E, 2, ...] stacks) are used in place; otherwise the tensors are copied (drop the originals).
    """
    if not (len(w1s) == len(w2s) == len(w3s)) or not w1s:
        raise ValueError(f"stack_experts needs the same non-zero number of w1, w2, w3 weights, got "
                         f"{len(w1s)}, {len(w2s)}, {len(w3s)}")  # fmt: skip
    kinds = {isinstance(w, NF4Weight) for w in (*w1s, *w2s, *w3s)}
    if len(kinds) != 1:
        raise ValueError("stack_experts: mix of NF4 and int8 experts; quantize all of a layer's experts alike")
    stack = _stack_nf4 if kinds.pop() else _stack_int8
    w1, w3, w2 = stack(w1s, "w1s"), stack(w3s, "w3s"), stack(w2s, "w2s")
    f, d = w1.shape
    if w3.shape != (f, d) or w2.shape != (d, f):
        raise ValueError(f"expert shapes disagree: w1 {w1.shape}, w3 {w3.shape}, w2 {w2.shape}; "
                         f"expected w1 = w3 = (F, D) and w2 = (D, F)")  # fmt: skip
    return StackedExperts(w1=w1, w3=w3, w2=w2, num_experts=len(w1s), hidden=d, intermediate=f)


def moe_align(topk_ids: torch.Tensor, num_experts: int,
              block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Sort the P = T*A (token, slot) pairs by expert, each expert's run padded to a multiple of block_m.

    Returns sorted_ids int32 [L] (pair index t*A + a, or P for padding), block_expert int32 [L / block_m] and
    total int32 [1] (the padded length used; blocks past it exit at once). L depends only on shapes and nothing
    syncs with the host, so the step can be captured in a CUDA graph.
    """
    flat = topk_ids.reshape(-1).long()  # [P]
    p = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    order = torch.sort(flat, stable=True).indices  # pairs grouped by expert, in token order
    sorted_e = flat[order]
    rank = torch.arange(p, device=flat.device) - (torch.cumsum(counts, 0) - counts)[sorted_e]
    length = triton.cdiv(p + min(num_experts, p) * (block_m - 1), block_m) * block_m
    sorted_ids = torch.full((length,), p, dtype=torch.int32, device=flat.device)
    sorted_ids.scatter_(0, (ends - padded)[sorted_e] + rank, order.to(torch.int32))
    starts = torch.arange(0, length, block_m, device=flat.device)
    block_expert = torch.searchsorted(ends, starts, right=True).clamp_(max=num_experts - 1).to(torch.int32)
    return sorted_ids, block_expert, ends[-1:].to(torch.int32)


@triton.jit
def _moe_w13_kernel(
    # pointers: activations, routing, output
    x_ptr,  # [T, D]
    sorted_ids_ptr, block_expert_ptr, total_ptr,  # moe_align
    h_ptr,  # [P, F] out: silu(x w1^T) * (x w3^T), row = pair
    # pointers and per-expert strides: w1 then w3 (NF4: packed, absmax, nested, nested map, quant map, offsets;
    # int8: weight, scb and four unused), then their strides along E
    a1, b1, c1, d1, q1, o1, sa1, sb1, sc1, sd1, sq1, so1,
    a3, b3, c3, d3, q3, o3, sa3, sb3, sc3, sd3, sq3, so3,
    # sizes
    num_pairs, F, D,
    # constexprs
    TOP_K: tl.constexpr, INT8: tl.constexpr,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """One BLOCK_M run of pairs that share expert e, BLOCK_N columns of F; grid (L / BLOCK_M, cdiv(F, BLOCK_N))."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(total_ptr):
        return
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    m_mask = pairs < num_pairs
    x_rows = x_ptr + (pairs // TOP_K)[:, None] * D  # [BLOCK_M, 1]
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < F
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if INT8:
        rk = tl.arange(0, BLOCK_K)
        for k0 in range(0, D, BLOCK_K):
            xk = tl.load(x_rows + (k0 + rk)[None, :], mask=m_mask[:, None], other=0.0)  # [BM, BK]
            w_off = rn[None, :] * D + (k0 + rk)[:, None]  # [BK, BN]
            w1 = tl.load(a1 + e * sa1 + w_off, mask=n_mask[None, :], other=0).to(tl.float32).to(xk.dtype)
            w3 = tl.load(a3 + e * sa3 + w_off, mask=n_mask[None, :], other=0).to(tl.float32).to(xk.dtype)
            acc1 = dot_acc(xk, w1, acc1, DOT_FP32)
            acc3 = dot_acc(xk, w3, acc3, DOT_FP32)
        acc1 *= tl.load(b1 + e * sb1 + rn, mask=n_mask, other=0.0)[None, :] * (1.0 / 127.0)
        acc3 *= tl.load(b3 + e * sb3 + rn, mask=n_mask, other=0.0)[None, :] * (1.0 / 127.0)
    else:
        j = tl.arange(0, BLOCK_K // 2)
        off1, off3 = tl.load(o1 + e * so1), tl.load(o3 + e * so3)
        for k0 in range(0, D, BLOCK_K):
            xe = tl.load(x_rows + (k0 + 2 * j)[None, :], mask=m_mask[:, None], other=0.0)  # [BM, BK/2]
            xo = tl.load(x_rows + (k0 + 2 * j + 1)[None, :], mask=m_mask[:, None], other=0.0)
            e1, od1 = nf4_tile(a1 + e * sa1, b1 + e * sb1, c1 + e * sc1, d1 + e * sd1, q1 + e * sq1, off1, rn, n_mask,
                               k0, D, BLOCKSIZE=BLOCKSIZE, NESTED_BLOCKSIZE=NESTED_BLOCKSIZE,
                               DOUBLE_QUANT=DOUBLE_QUANT, BLOCK_K=BLOCK_K)  # fmt: skip
            e3, od3 = nf4_tile(a3 + e * sa3, b3 + e * sb3, c3 + e * sc3, d3 + e * sd3, q3 + e * sq3, off3, rn, n_mask,
                               k0, D, BLOCKSIZE=BLOCKSIZE, NESTED_BLOCKSIZE=NESTED_BLOCKSIZE,
                               DOUBLE_QUANT=DOUBLE_QUANT, BLOCK_K=BLOCK_K)  # fmt: skip
            e1, od1 = tl.trans(cast_to(e1, xe.dtype)), tl.trans(cast_to(od1, xe.dtype))  # [BK/2, BN]
            e3, od3 = tl.trans(cast_to(e3, xe.dtype)), tl.trans(cast_to(od3, xe.dtype))
            acc1 = dot_acc(xo, od1, dot_acc(xe, e1, acc1, DOT_FP32), DOT_FP32)
            acc3 = dot_acc(xo, od3, dot_acc(xe, e3, acc3, DOT_FP32), DOT_FP32)
    h = acc1 * tl.sigmoid(acc1) * acc3  # silu(a) * b
    out = h_ptr + pairs[:, None] * F + rn[None, :]
    tl.store(out, cast_to(h, h_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _moe_w2_kernel(
    # pointers: activations, routing, output
    h_ptr,  # [P, F]
    sorted_ids_ptr, block_expert_ptr, total_ptr,  # moe_align
    topk_weights_ptr,  # fp32 [P]
    part_ptr,  # fp32 [T, split_k, A, D]: weighted partial outputs, summed later in a fixed order
    # pointers and per-expert strides of w2 (as in _moe_w13_kernel)
    a2, b2, c2, d2, q2, o2, sa2, sb2, sc2, sd2, sq2, so2,
    # sizes
    num_pairs, D, F, split_k,
    # constexprs
    TOP_K: tl.constexpr, INT8: tl.constexpr,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """topk_weight * (h @ w2_e^T) for one run of pairs; grid (L / BLOCK_M, cdiv(D, BLOCK_N), split_k)."""
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if pid_m * BLOCK_M >= tl.load(total_ptr):
        return
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    m_mask = pairs < num_pairs
    h_rows = h_ptr + pairs[:, None] * F
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < D
    k_per = tl.cdiv(tl.cdiv(F, BLOCK_K), split_k) * BLOCK_K
    k_start = pid_k * k_per
    k_end = tl.minimum(k_start + k_per, F)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if INT8:
        rk = tl.arange(0, BLOCK_K)
        for k0 in range(k_start, k_end, BLOCK_K):
            hk = tl.load(h_rows + (k0 + rk)[None, :], mask=m_mask[:, None], other=0.0)  # [BM, BK]
            w = tl.load(a2 + e * sa2 + rn[None, :] * F + (k0 + rk)[:, None], mask=n_mask[None, :], other=0)
            acc = dot_acc(hk, w.to(tl.float32).to(hk.dtype), acc, DOT_FP32)
        acc *= tl.load(b2 + e * sb2 + rn, mask=n_mask, other=0.0)[None, :] * (1.0 / 127.0)
    else:
        j = tl.arange(0, BLOCK_K // 2)
        off2 = tl.load(o2 + e * so2)
        for k0 in range(k_start, k_end, BLOCK_K):
            he = tl.load(h_rows + (k0 + 2 * j)[None, :], mask=m_mask[:, None], other=0.0)  # [BM, BK/2]
            ho = tl.load(h_rows + (k0 + 2 * j + 1)[None, :], mask=m_mask[:, None], other=0.0)
            we, wo = nf4_tile(a2 + e * sa2, b2 + e * sb2, c2 + e * sc2, d2 + e * sd2, q2 + e * sq2, off2, rn, n_mask,
                              k0, F, BLOCKSIZE=BLOCKSIZE, NESTED_BLOCKSIZE=NESTED_BLOCKSIZE,
                              DOUBLE_QUANT=DOUBLE_QUANT, BLOCK_K=BLOCK_K)  # fmt: skip
            we, wo = tl.trans(cast_to(we, he.dtype)), tl.trans(cast_to(wo, he.dtype))  # [BK/2, BN]
            acc = dot_acc(ho, wo, dot_acc(he, we, acc, DOT_FP32), DOT_FP32)
    acc *= tl.load(topk_weights_ptr + pairs, mask=m_mask, other=0.0)[:, None]
    row = ((pairs // TOP_K) * split_k + pid_k) * TOP_K + pairs % TOP_K  # [BLOCK_M] row of part
    tl.store(part_ptr + row[:, None] * D + rn[None, :], acc, mask=m_mask[:, None] & n_mask[None, :])


_TUNER = Tuner("fused_moe")


def moe_block_m(num_pairs: int, num_experts: int) -> int:
    """Rows per program: small when each expert gets few pairs (decode), larger for prefill."""
    if interpreting():
        return 16
    per_expert = num_pairs / num_experts
    return 16 if per_expert <= 16 else 32 if per_expert <= 64 else 64


def w13_configs(block_m: int) -> list[KernelConfig]:
    if interpreting():
        return [KernelConfig(block_m, 32, 64, 1, 1, 1)]
    return [KernelConfig(block_m, bn, 128, 1, w, 3) for bn, w in ((32, 4), (64, 4), (128, 8))]


def w2_configs(block_m: int) -> list[KernelConfig]:
    if interpreting():
        return [KernelConfig(block_m, 32, 64, 2, 1, 1)]
    splits = (1, 2, 4) if block_m <= 16 else (1,)
    return [KernelConfig(block_m, bn, 128, sk, w, 3) for bn, w in ((32, 4), (64, 4), (128, 8)) for sk in splits]


def _weight_args(w: StackedNF4 | StackedInt8) -> tuple:
    if isinstance(w, StackedNF4):
        return w.args()
    z = w.scb  # placeholders for the NF4-only pointers
    return (w.weight, w.scb, z, z, z, z, w.weight.stride(0), w.scb.stride(0), 0, 0, 0, 0)


def _max_block_k(w: StackedNF4 | StackedInt8, k: int) -> int:
    return largest_block_k(k, w.blocksize if isinstance(w, StackedNF4) else None)


def _quant_constexprs(w: StackedNF4 | StackedInt8, block_k: int, k: int) -> dict:
    nf4 = isinstance(w, StackedNF4)
    bk = min(block_k, _max_block_k(w, k))
    return dict(INT8=not nf4, BLOCKSIZE=w.blocksize if nf4 else 64,
                NESTED_BLOCKSIZE=w.nested_blocksize if nf4 else 256,
                DOUBLE_QUANT=w.double_quant if nf4 else False, BLOCK_K=bk)  # fmt: skip


def fused_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
              experts: StackedExperts) -> torch.Tensor:  # fmt: skip
    """sum_a topk_weights[t, a] * w2_e(silu(w1_e x_t) * w3_e x_t) with e = topk_ids[t, a]: x [T, D] -> [T, D].

    x fp32/bf16/fp16 contiguous; topk_ids [T, A] integer in [0, E) (not checked on the device: that would
    sync); topk_weights [T, A] float. Experts with no tokens cost nothing. Checks here, then the custom operator
    `torch.ops.mixq.fused_moe`, which torch.compile sees as one op (its fake checks again).
    """
    if not isinstance(experts, StackedExperts):
        raise ValueError(f"experts must be a StackedExperts (from stack_experts), got {type(experts).__name__}")
    check_moe_args(x, topk_ids, topk_weights, experts)
    nf4 = experts.fmt == "nf4"
    q = experts.w1 if nf4 else None
    args = (x, topk_ids, topk_weights, _tensors(experts.w1), _tensors(experts.w3), _tensors(experts.w2),
            experts.num_experts, experts.hidden, experts.intermediate, nf4, q.blocksize if nf4 else 64, q.nested_blocksize if nf4 else 256,
            q.double_quant if nf4 else False)  # fmt: skip
    # traced: the one opaque operator (its fake gives the shape); eager: the launches directly, no dispatcher trip
    return _fused_moe_op(*args) if torch.compiler.is_compiling() else _fused_moe_eager(*args)


def check_moe_args(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                   experts: StackedExperts) -> None:  # fmt: skip
    d, f = experts.hidden, experts.intermediate
    check_activation(x, d)
    if x.dim() != 2:
        raise ValueError(f"x must be [T, D], got shape {tuple(x.shape)}")
    t = x.shape[0]
    integer = not topk_ids.dtype.is_floating_point and topk_ids.dtype != torch.bool
    if topk_ids.dim() != 2 or topk_ids.shape[0] != t or not integer:
        raise ValueError(f"topk_ids must be an integer [T={t}, A] tensor, got {topk_ids.dtype} {tuple(topk_ids.shape)}")
    if topk_weights.shape != topk_ids.shape or not topk_weights.dtype.is_floating_point:
        raise ValueError(f"topk_weights must be a float tensor shaped like topk_ids {tuple(topk_ids.shape)}, "
                         f"got {topk_weights.dtype} {tuple(topk_weights.shape)}")  # fmt: skip
    check_k(d)
    check_k(f)
    w1 = experts.w1.packed if isinstance(experts.w1, StackedNF4) else experts.w1.weight
    check_device(x, {"topk_ids": topk_ids, "topk_weights": topk_weights, "experts": w1})


def _tensors(w: StackedNF4 | StackedInt8) -> list[torch.Tensor]:
    if isinstance(w, StackedNF4):
        return [w.packed, w.absmax, w.nested_absmax, w.nested_quant_map, w.quant_map, w.offsets]
    return [w.weight, w.scb]


def _experts(w1: list[torch.Tensor], w3: list[torch.Tensor], w2: list[torch.Tensor], num_experts: int, hidden: int,
             intermediate: int, nf4: bool, blocksize: int, nested_blocksize: int,
             double_quant: bool) -> StackedExperts:  # fmt: skip
    """The StackedExperts again from the operator's flat arguments."""

    def one(ts: list[torch.Tensor], shape: tuple[int, int]) -> StackedNF4 | StackedInt8:
        if nf4:
            return StackedNF4(*ts, shape=shape, blocksize=blocksize, nested_blocksize=nested_blocksize,
                              double_quant=double_quant)  # fmt: skip
        return StackedInt8(*ts, shape=shape)

    return StackedExperts(w1=one(w1, (intermediate, hidden)), w3=one(w3, (intermediate, hidden)),
                          w2=one(w2, (hidden, intermediate)), num_experts=num_experts, hidden=hidden,
                          intermediate=intermediate)  # fmt: skip


def _fused_moe_impl(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w1: list[torch.Tensor],
                    w3: list[torch.Tensor], w2: list[torch.Tensor], num_experts: int, hidden: int, intermediate: int,
                    nf4: bool, blocksize: int, nested_blocksize: int, double_quant: bool) -> torch.Tensor:  # fmt: skip
    """fused_moe's launches; the tuner runs here, eagerly, never inside a traced graph."""
    experts = _experts(w1, w3, w2, num_experts, hidden, intermediate, nf4, blocksize, nested_blocksize, double_quant)
    d, f, n_exp = experts.hidden, experts.intermediate, experts.num_experts
    t, top_k = topk_ids.shape
    out = torch.empty_like(x)
    if t == 0 or top_k == 0:
        return out.zero_()
    block_m = moe_block_m(t * top_k, n_exp)
    run = MoeLaunch(x, topk_ids, topk_weights, experts, block_m)
    key = (m_bucket(t), n_exp, d, f, top_k, experts.fmt, x.dtype)
    cfg13 = _TUNER.pick(("w13", *key), clamp_block_k(w13_configs(block_m), _max_block_k(experts.w1, d)), run.w13)
    run.w13(cfg13)
    cfg2 = _TUNER.pick(("w2", *key), clamp_block_k(w2_configs(block_m), _max_block_k(experts.w2, f)), run.w2)
    return sum_rows(run.w2(cfg2), out)


_fused_moe_op = torch.library.custom_op("mixq::fused_moe", _fused_moe_impl, mutates_args=())
# the eager path: never traced (dynamo also sees frames run eagerly around a graph break; a trace must meet the op)
_fused_moe_eager = torch.compiler.disable(_fused_moe_impl)


@_fused_moe_op.register_fake
def _fused_moe_fake(x, topk_ids, topk_weights, w1, w3, w2, num_experts, hidden, intermediate, nf4, blocksize,
                    nested_blocksize, double_quant):  # fmt: skip
    check_moe_args(x, topk_ids, topk_weights, _experts(w1, w3, w2, num_experts, hidden, intermediate, nf4, blocksize,
                                                       nested_blocksize, double_quant))  # fmt: skip
    return torch.empty_like(x)


class MoeLaunch:
    """The two launches of one fused_moe call, routing done once (fused_moe tunes configs through these)."""

    def __init__(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 experts: StackedExperts, block_m: int):  # fmt: skip
        self.x, self.experts, self.block_m = x, experts, block_m
        self.t, self.top_k = topk_ids.shape
        self.routing = moe_align(topk_ids, experts.num_experts, block_m)  # sorted_ids, block_expert, total
        self.weights = topk_weights.reshape(-1).float().contiguous()  # [P]
        self.h = torch.empty(self.t * self.top_k, experts.intermediate, dtype=x.dtype, device=x.device)  # [P, F]

    def w13(self, cfg: KernelConfig) -> torch.Tensor:
        """h [P, F] = silu(x w1^T) * (x w3^T) for every (token, slot) pair."""
        x, ex, bm = self.x, self.experts, self.block_m
        d, f = ex.hidden, ex.intermediate
        grid = (self.routing[0].numel() // bm, triton.cdiv(f, cfg.block_n))
        _moe_w13_kernel[grid](x, *self.routing, self.h, *_weight_args(ex.w1), *_weight_args(ex.w3), self.h.shape[0],
                              f, d, TOP_K=self.top_k, BLOCK_M=bm, BLOCK_N=cfg.block_n, DOT_FP32=dot_fp32(x.dtype),
                              **_quant_constexprs(ex.w1, cfg.block_k, d), num_warps=cfg.num_warps,
                              num_stages=cfg.num_stages)  # fmt: skip
        return self.h

    def w2(self, cfg: KernelConfig) -> torch.Tensor:
        """The weighted partial outputs [T, split_k * A, D] fp32 (sum_rows adds them up)."""
        ex, bm = self.experts, self.block_m
        d, f = ex.hidden, ex.intermediate
        c = _quant_constexprs(ex.w2, cfg.block_k, f)
        split = max(1, min(cfg.split_k, f // c["BLOCK_K"]))
        part = torch.empty(self.t, split * self.top_k, d, dtype=torch.float32, device=self.x.device)
        grid = (self.routing[0].numel() // bm, triton.cdiv(d, cfg.block_n), split)
        _moe_w2_kernel[grid](self.h, *self.routing, self.weights, part, *_weight_args(ex.w2), self.h.shape[0], d, f,
                             TOP_K=self.top_k, BLOCK_M=bm, BLOCK_N=cfg.block_n, split_k=split,
                             DOT_FP32=dot_fp32(self.x.dtype), **c, num_warps=cfg.num_warps,
                             num_stages=cfg.num_stages)  # fmt: skip
        return part


__all__ = ["StackedExperts", "StackedNF4", "StackedInt8", "stack_experts", "fused_moe", "moe_align"]
