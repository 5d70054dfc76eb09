"""The on-disk byte layouts of mixtral-quant: the one place where they are defined.

Every quantized parameter `X.weight` (an nn.Linear weight of shape [out, in]) is stored as a few
safetensors tensors under the module prefix `X.`. The names and bytes are those of bitsandbytes, so a
packed checkpoint can be read by bitsandbytes' `QuantState.from_dict` / `Int8Params` and vice versa.

nf4 (bitsandbytes `quantize_4bit(w, blocksize, quant_type="nf4", compress_statistics=True)`)
  X.weight           uint8 [numel/2, 1]  w flattened row-major, cut into blocks of `blocksize` (a power of
                                         two, 32..4096); each element -> index of the nearest of the 16
                                         NF4 values after dividing by its block's absmax; element 2i in
                                         the HIGH nibble of byte i, element 2i+1 in the low nibble.
  X.weight.absmax    double quant: uint8 [numel/blocksize], the per-block absmax minus its mean, coded
                     8-bit blockwise (block 256) with the signed dynamic map;
                     plain: float32 [numel/blocksize]
  X.weight.quant_map float32 [16]        the NF4 table (NF4_CODE)
  X.weight.nested_absmax     float32 [ceil(numel/blocksize/256)]  (double quant only)
  X.weight.nested_quant_map  float32 [256], the dynamic map        (double quant only)
  X.weight.quant_state.bitsandbytes__nf4  uint8 [n]: UTF-8 JSON {"quant_type": "nf4", "blocksize": B,
                     "dtype": "bfloat16", "shape": [out, in], and for double quant "nested_blocksize":
                     256, "nested_dtype": "float32", "nested_offset": mean}
  decode: absmax = nested_quant_map[absmax] * nested_absmax[i // 256] + nested_offset (fp32);
          w[i] = quant_map[nibble(i)] * absmax[i // blocksize], cast to `dtype`.

int8 (bitsandbytes `int8_vectorwise_quant`, row-wise symmetric absmax)
  X.weight  int8 [out, in]   round(w * 127 / SCB[row])
  X.SCB     float32 [out]    max |w| of each row
  decode: w = weight * SCB[:, None] / 127

bf16 / fp16: X.weight stored unchanged in that dtype.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

FORMATS = ("nf4", "int8", "bf16", "fp16")
FLOAT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
NF4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"

# QLoRA's NormalFloat4: 16 quantiles of N(0, 1) scaled to [-1, 1], sorted (bitsandbytes' table).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

# Bits stored per parameter, statistics included (for plans and summaries).
def bits_per_param(fmt: str, blocksize: int = 64, double_quant: bool = True) -> float:
    check_format(fmt)
    if fmt == "nf4":
        if double_quant:
            return 4 + 8 / blocksize + 32 / (blocksize * NESTED_BLOCKSIZE)
        return 4 + 32 / blocksize
    if fmt == "int8":
        return 8.0  # + 32 bits per row, negligible; packed_nbytes() counts it exactly
    return 16.0


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")


def check_blocksize(blocksize: int) -> None:
    if blocksize not in NF4_BLOCKSIZES:
        raise ValueError(f"nf4 blocksize must be a power of two from 32 to 4096, got {blocksize}")


def packed_nbytes(fmt: str, shape: tuple[int, ...], blocksize: int = 64, double_quant: bool = True) -> int:
    """Exact bytes that quantize_tensor(w of `shape`, fmt) stores, all keys together."""
    check_format(fmt)
    n = 1
    for s in shape:
        n *= s
    if fmt == "nf4":
        blocks = -(-n // blocksize)
        if not double_quant:
            return (n + 1) // 2 + 4 * blocks + 4 * 16 + 200
        nested = -(-blocks // NESTED_BLOCKSIZE)
        return (n + 1) // 2 + blocks + 4 * nested + 4 * 16 + 4 * 256 + 200  # ~200 bytes of JSON
    if fmt == "int8":
        return n + 4 * shape[0]
    return 2 * n


@lru_cache(maxsize=None)
def _tables(device: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    nf4 = torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    dyn = dynamic_map().to(device)
    return nf4, (nf4[:-1] + nf4[1:]) / 2, dyn, (dyn[:-1] + dyn[1:]) / 2


def dynamic_map() -> Tensor:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True)), 256 sorted float32 values."""
    data: list[float] = []
    for i in range(7):  # 7 exponent bits; fraction bits shrink as the exponent grows
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = ((bounds[:-1] + bounds[1:]) / 2.0) * (10 ** (-6 + i))
        data += means.tolist() + (-means).tolist()
    data += [0.0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def _blockwise(x: Tensor, blocksize: int, bounds: Tensor) -> tuple[Tensor, Tensor]:
    """Scale each block of flat fp32 `x` by 1/absmax, return (code indices int32, absmax fp32)."""
    n = x.numel()
    full = n - n % blocksize
    absmax = x[:full].view(-1, blocksize).abs().amax(dim=1)
    scaled = (x[:full].view(-1, blocksize) * (1.0 / absmax.clamp(min=1e-38))[:, None]).view(-1)
    if full < n:  # a last, shorter block
        tail = x[full:]
        am = tail.abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am[None]])
        scaled = torch.cat([scaled, tail / am])
    scaled.clamp_(-1, 1)
    return torch.bucketize(scaled, bounds, out_int32=True), absmax


def quantize_nf4(w: Tensor, blocksize: int = 64, double_quant: bool = True) -> dict[str, Tensor]:
    """NF4 as bitsandbytes' quantize_4bit(..., compress_statistics=double_quant). Keys for a parameter `weight`."""
    check_blocksize(blocksize)
    if w.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"nf4 quantizes bf16, fp16 or fp32 tensors, got {w.dtype}")
    nf4, nf4_bounds, dyn, dyn_bounds = _tables(str(w.device))
    q, absmax = _blockwise(w.reshape(-1).float(), blocksize, nf4_bounds)
    if q.numel() % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    q = q.to(torch.uint8)
    packed = ((q[0::2] << 4) | q[1::2]).unsqueeze(1)
    meta = {"quant_type": "nf4", "blocksize": blocksize, "dtype": str(w.dtype).removeprefix("torch."),
            "shape": list(w.shape)}
    out = {"weight": packed, "weight.quant_map": nf4.clone()}
    if double_quant:
        offset = absmax.mean()
        qabs, nested_absmax = _blockwise(absmax - offset, NESTED_BLOCKSIZE, dyn_bounds)
        out["weight.absmax"] = qabs.to(torch.uint8)
        out["weight.nested_absmax"] = nested_absmax
        out["weight.nested_quant_map"] = dyn.clone()
        meta.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=offset.item())
    else:
        out["weight.absmax"] = absmax
    out["weight." + QUANT_STATE_KEY] = pack_quant_state(meta)
    return out


def pack_quant_state(meta: dict) -> Tensor:
    return torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)


def unpack_quant_state(t: Tensor) -> dict:
    return json.loads(bytes(t.cpu().numpy()).decode("utf-8"))


def nf4_absmax(d: dict[str, Tensor], meta: dict | None = None, prefix: str = "weight") -> Tensor:
    """The per-block fp32 absmax of an NF4 parameter, decoding the double quantization if present."""
    meta = meta if meta is not None else unpack_quant_state(d[f"{prefix}.{QUANT_STATE_KEY}"])
    absmax = d[f"{prefix}.absmax"]
    if "nested_offset" not in meta:
        return absmax.float()
    code, nested = d[f"{prefix}.nested_quant_map"], d[f"{prefix}.nested_absmax"]
    bs = meta["nested_blocksize"]
    vals = code[absmax.long()]
    n = vals.numel()
    full = n - n % bs
    out = torch.empty_like(vals)
    out[:full] = (vals[:full].view(-1, bs) * nested[: full // bs, None]).view(-1)
    if full < n:
        out[full:] = vals[full:] * nested[-1]
    return out + meta["nested_offset"]


def dequantize_nf4(d: dict[str, Tensor], dtype: torch.dtype | None = None, prefix: str = "weight") -> Tensor:
    meta = unpack_quant_state(d[f"{prefix}.{QUANT_STATE_KEY}"])
    shape, bs = meta["shape"], meta["blocksize"]
    n = 1
    for s in shape:
        n *= s
    packed = d[prefix].reshape(-1)
    idx = torch.stack([packed >> 4, packed & 0xF], dim=1).view(-1)[:n].long()
    vals = d[f"{prefix}.quant_map"][idx]
    absmax = nf4_absmax(d, meta, prefix)
    full = n - n % bs
    out = torch.empty(n, dtype=torch.float32, device=packed.device)
    out[:full] = (vals[:full].view(-1, bs) * absmax[: full // bs, None]).view(-1)
    if full < n:
        out[full:] = vals[full:] * absmax[-1]
    return out.view(shape).to(dtype or getattr(torch, meta["dtype"]))


def quantize_int8(w: Tensor) -> dict[str, Tensor]:
    """Row-wise absmax int8 as bitsandbytes' int8_vectorwise_quant (threshold 0). Zero rows stay zero."""
    if w.dim() != 2:
        raise ValueError(f"int8 quantizes 2-D [out, in] weights, got shape {tuple(w.shape)}")
    scb = w.abs().amax(dim=1).float()
    q = torch.round(w.float() * (127.0 / scb.clamp(min=1e-38))[:, None]).to(torch.int8)
    return {"weight": q, "SCB": scb}


def dequantize_int8(d: dict[str, Tensor], dtype: torch.dtype = torch.float32) -> Tensor:
    return (d["weight"].float() * (d["SCB"].float() / 127.0)[:, None]).to(dtype)


def quantize_tensor(w: Tensor, fmt: str, blocksize: int = 64, double_quant: bool = True) -> dict[str, Tensor]:
    """Quantize one weight to `fmt`; returns the tensors saved for a parameter named `weight`."""
    check_format(fmt)
    if not w.is_floating_point():
        raise ValueError(f"expected a floating-point weight, got {w.dtype}")
    if fmt == "nf4":
        return quantize_nf4(w, blocksize, double_quant)
    if fmt == "int8":
        return quantize_int8(w)
    return {"weight": w.to(FLOAT_DTYPES[fmt]).contiguous()}


def detect_format(d: dict[str, Tensor] | set[str] | list[str]) -> str:
    """The format of one parameter from the keys saved for it (relative to its module, as quantize_tensor returns)."""
    keys = set(d)
    if "weight." + QUANT_STATE_KEY in keys:
        return "nf4"
    if "SCB" in keys:
        return "int8"
    if "weight" in keys and isinstance(d, dict):
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(d["weight"].dtype, "fp32")
    raise ValueError(f"cannot tell the format of a parameter saved as {sorted(keys)}")


def dequantize_tensor(d: dict[str, Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """Inverse of quantize_tensor: the full-precision weight (in its source dtype unless `dtype` is given)."""
    fmt = detect_format(d)
    if fmt == "nf4":
        return dequantize_nf4(d, dtype)
    if fmt == "int8":
        return dequantize_int8(d, dtype or torch.float32)
    return d["weight"].to(dtype) if dtype else d["weight"]


def param_suffixes(fmt: str, double_quant: bool = True) -> tuple[str, ...]:
    """The key suffixes (relative to the module prefix) stored for one quantized weight."""
    check_format(fmt)
    if fmt == "nf4":
        nested = ("weight.nested_absmax", "weight.nested_quant_map") if double_quant else ()
        return ("weight", "weight.absmax", "weight.quant_map", *nested, "weight." + QUANT_STATE_KEY)
    if fmt == "int8":
        return ("weight", "SCB")
    return ("weight",)


@dataclass
class NF4Weight:
    """One NF4 weight as the kernels consume it: the saved tensors plus the JSON fields, no decoding done.

    `absmax` is uint8 (double quant: decode with nested_absmax/nested_quant_map/offset) or float32 (plain).
    """

    packed: Tensor  # uint8 [numel/2, 1]
    absmax: Tensor  # uint8 or float32 [numel/blocksize]
    quant_map: Tensor  # float32 [16]
    nested_absmax: Tensor | None  # float32 [ceil(blocks/256)]
    nested_quant_map: Tensor | None  # float32 [256]
    offset: float
    shape: tuple[int, ...]
    blocksize: int
    nested_blocksize: int
    dtype: torch.dtype

    @classmethod
    def from_dict(cls, d: dict[str, Tensor], prefix: str = "weight") -> "NF4Weight":
        meta = unpack_quant_state(d[f"{prefix}.{QUANT_STATE_KEY}"])
        nested = "nested_offset" in meta
        return cls(
            packed=d[prefix], absmax=d[f"{prefix}.absmax"], quant_map=d[f"{prefix}.quant_map"],
            nested_absmax=d[f"{prefix}.nested_absmax"] if nested else None,
            nested_quant_map=d[f"{prefix}.nested_quant_map"] if nested else None,
            offset=float(meta.get("nested_offset", 0.0)), shape=tuple(meta["shape"]),
            blocksize=int(meta["blocksize"]), nested_blocksize=int(meta.get("nested_blocksize", NESTED_BLOCKSIZE)),
            dtype=getattr(torch, meta["dtype"]),
        )  # fmt: skip

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None
