"""Torch references for every kernel: dequantize with formats.py, then matmul in fp32 (float64 on request).

The tests and evals/gpu_check.py compare the Triton kernels against these on fresh random data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixtral_quant.formats import NF4Weight, QUANT_STATE_KEY, dequantize_tensor, pack_quant_state


def nf4_to_dict(w: NF4Weight) -> dict[str, torch.Tensor]:
    """The saved tensors of an NF4Weight again (as quantize_tensor returns them), for formats.dequantize_tensor."""
    meta = {"quant_type": "nf4", "blocksize": w.blocksize, "dtype": str(w.dtype).removeprefix("torch."),
            "shape": list(w.shape)}  # fmt: skip
    d = {"weight": w.packed, "weight.absmax": w.absmax, "weight.quant_map": w.quant_map}
    if w.double_quant:
        d["weight.nested_absmax"] = w.nested_absmax
        d["weight.nested_quant_map"] = w.nested_quant_map
        meta.update(nested_blocksize=w.nested_blocksize, nested_dtype="float32", nested_offset=float(w.offset))
    d["weight." + QUANT_STATE_KEY] = pack_quant_state(meta)
    return d


def dequantize_nf4_weight(w: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[N, K] weight in `dtype`, decoded by formats.py (the one definition of the layout)."""
    return dequantize_tensor(nf4_to_dict(w), dtype)


def nf4_matmul_ref(x: torch.Tensor, w: NF4Weight, compute: torch.dtype = torch.float32) -> torch.Tensor:
    """x [..., K] @ dequantize(w).T in `compute` precision, returned in x's dtype."""
    return (x.to(compute) @ dequantize_nf4_weight(w, compute).T).to(x.dtype)


def int8_matmul_ref(x: torch.Tensor, weight: torch.Tensor, scb: torch.Tensor,
                    compute: torch.dtype = torch.float32) -> torch.Tensor:  # fmt: skip
    """x [..., K] @ (weight * scb[:, None] / 127).T in `compute` precision, returned in x's dtype."""
    w = weight.to(compute) * (scb.to(compute) / 127.0)[:, None]
    return (x.to(compute) @ w.T).to(x.dtype)


def _dequant(w, compute: torch.dtype) -> torch.Tensor:
    if isinstance(w, NF4Weight):
        return dequantize_nf4_weight(w, compute)
    weight, scb = w  # int8 (weight [N, K], SCB [N])
    return weight.to(compute) * (scb.to(compute) / 127.0)[:, None]


def fused_moe_ref(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w1s: list, w2s: list,
                  w3s: list, compute: torch.dtype = torch.float32) -> torch.Tensor:  # fmt: skip
    """sum_a topk_weights[t, a] * w2_e(silu(w1_e x_t) * w3_e x_t), e = topk_ids[t, a]; x [T, D] -> [T, D].

    Experts are NF4Weight or (int8 weight, SCB) pairs; each expert is dequantized and run on its own tokens.
    """
    xc = x.to(compute)
    out = torch.zeros_like(xc)
    for e in range(len(w1s)):
        tok, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        xe = xc[tok]  # [n_e, D]
        h = F.silu(xe @ _dequant(w1s[e], compute).T) * (xe @ _dequant(w3s[e], compute).T)  # [n_e, F]
        y = h @ _dequant(w2s[e], compute).T  # [n_e, D]
        out.index_add_(0, tok, y * topk_weights[tok, slot].to(compute)[:, None])
    return out.to(x.dtype)
