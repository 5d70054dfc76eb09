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

int4 (compressed-tensors "pack-quantized" W4A16: symmetric, round-to-nearest, one scale per group of
      `group_size` consecutive inputs of a row, as vLLM and llm-compressor read and write it)
  X.weight_packed  int32 [out, in/8]   q = clamp(round(w / scale), -8, 7) stored as q + 8 (0..15), eight per
                                       word along the input dim: element 8j+i in bits 4i..4i+3 of word j (the
                                       first element in the LOW nibble; little-endian bytes, so byte b of a row
                                       holds element 2b low and 2b+1 high)
  X.weight_scale   source dtype [out, in/group_size]   max |w| of the group / 7.5 (0 -> that dtype's eps)
  X.weight_shape   int64 [2]           [out, in]
  decode: w = q * scale (the product in the scale's dtype). `int4_as_nf4` repacks one weight ONCE into the
  NF4 layout above (code table = the integers -8..7, absmax = fp32 scale, blocksize = group size, no double
  quant, nibbles swapped to bitsandbytes' high-first order) so the NF4 kernels run it unchanged. The
  compressed-tensors config block and checkpoint detection live in compressed.py.

bf16 / fp16: X.weight stored unchanged in that dtype.
"""

from __future__ import annotations

import json
import sys
import threading
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

FORMATS = ("nf4", "int8", "int4", "bf16", "fp16")
FLOAT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
NF4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"
INT4_KEYS = ("weight_packed", "weight_scale", "weight_shape")
# checkpoint key (relative to the module) -> the loaded module's buffer name (buffer names cannot contain dots)
NF4_KEYS = {
    "weight": "weight",
    "weight.absmax": "absmax",
    "weight.quant_map": "quant_map",
    "weight.nested_absmax": "nested_absmax",
    "weight.nested_quant_map": "nested_quant_map",
}
INT8_KEYS = {"weight": "weight", "SCB": "SCB"}
INT4_GROUP_SIZE = 128
# Groups run as NF4 absmax blocks in the kernels, whose K tiles need a power-of-two block.
INT4_GROUP_SIZES = NF4_BLOCKSIZES
INT4_CODE = tuple(float(i) for i in range(-8, 8))  # nibble k <-> the integer k - 8

# QLoRA's NormalFloat4: 16 quantiles of N(0, 1) scaled to [-1, 1], sorted (bitsandbytes' table).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

# Bits stored per parameter, statistics included (for plans and summaries).
def bits_per_param(fmt: str, blocksize: int = 64, double_quant: bool = True,
                   group_size: int = INT4_GROUP_SIZE) -> float:
    check_format(fmt)
    if fmt == "int4":
        return 4 + 16 / group_size  # bf16/fp16 scales, as from a half-precision source
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


def recipe(fmt: str | None = None, experts: str = "nf4", attention: str = "nf4") -> dict[str, str]:
    """Format per quantized class, for the quantizer and the plan: `fmt` sets both, else `experts` / `attention`."""
    if fmt is not None:
        experts = attention = fmt
    for f in (experts, attention):
        check_format(f)
    if "int4" in (experts, attention) and {experts, attention} & {"nf4", "int8"}:
        raise ValueError(f"attention {attention} with experts {experts}: an int4 checkpoint is a compressed-tensors "
                         "one, which holds no nf4/int8 weights; use int4 (or bf16/fp16) for both classes")
    return {"attention": attention, "experts": experts}


def check_blocksize(blocksize: int) -> None:
    if blocksize not in NF4_BLOCKSIZES:
        raise ValueError(f"nf4 blocksize must be a power of two from 32 to 4096, got {blocksize}")


def check_group_size(group_size: int, in_features: int | None = None, name: str = "weight") -> None:
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group size must be a power of two from 32 to 4096 (our kernels read a group as one "
                         f"block), got {group_size}")
    if in_features is not None and in_features % group_size:
        fits = [g for g in INT4_GROUP_SIZES if in_features % g == 0]
        fix = f"choose one that divides it (--group-size {fits[-1]})" if fits else "int4 cannot hold this weight"
        raise ValueError(f"{name}: int4 group size {group_size} does not divide the input dimension {in_features}; "
                         + fix)


def packed_nbytes(fmt: str, shape: tuple[int, ...], blocksize: int = 64, double_quant: bool = True,
                  group_size: int = INT4_GROUP_SIZE) -> int:
    """Exact bytes that quantize_tensor(w of `shape`, fmt) stores, all keys together (int4: from a 16-bit source)."""
    check_format(fmt)
    n = 1
    for s in shape:
        n *= s
    if fmt == "int4":
        return n // 2 + 2 * (n // group_size) + 16
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
    if bounds.numel() == 255 and bool(torch.isfinite(absmax).all()):  # the dynamic map: a table, not a search
        return _dynamic_codes(scaled.contiguous()), absmax
    return torch.bucketize(scaled, bounds, out_int32=True), absmax


# Fast NF4 coding without a binary search: g = int(x * 12 + 12) puts a scaled value x in one of 25 cells, each
# narrower than the closest two NF4 midpoints (0.080 apart), so a cell holds at most one midpoint and
# code = lo[g] + (x > thr[g]), exactly bucketize(x, midpoints). The tables come from the cells' true float32
# edges (found by bisection through the same ops), so rounding in g cannot misplace a value.
_NF4_GRID = 12.0
_CHUNK_ELEMENTS = {"cpu": 1 << 18, "cuda": 1 << 26}  # CPU: a chunk's fp32 temporaries stay in cache


def _nf4_cell(x: Tensor) -> Tensor:
    return x.mul(_NF4_GRID).add_(_NF4_GRID).to(torch.int32)


@lru_cache(maxsize=None)
def _nf4_lookup(device: str) -> tuple[Tensor, Tensor]:
    """(lo uint8 [cells], thr float32 [cells]): midpoints below a cell's first value, and the midpoint inside it."""
    bounds = _tables("cpu")[1].tolist()

    def cell(key: int) -> int:  # key: the float32 with these bits, ordered like the floats
        f = torch.tensor([key], dtype=torch.int32).view(torch.float32) if key >= 0 else \
            -torch.tensor([-key], dtype=torch.int32).view(torch.float32)
        return int(_nf4_cell(f.to(device))[0])

    def key(f: float) -> int:
        k = int(torch.tensor([abs(f)], dtype=torch.float32).view(torch.int32)[0])
        return k if f >= 0 else -k

    def to_float(k: int) -> float:
        f = float(torch.tensor([abs(k)], dtype=torch.int32).view(torch.float32)[0])
        return f if k >= 0 else -f

    lo_key, hi_key = key(-1.01), key(1.01)  # scaled values lie in [-1, 1] up to rounding
    n_cells = cell(hi_key) + 1
    starts = []
    for c in range(n_cells):  # the smallest float landing in cell c
        a, b = lo_key, hi_key
        while a < b:
            m = (a + b) // 2
            a, b = (a, m) if cell(m) >= c else (m + 1, b)
        starts.append(to_float(a))
    lo, thr = [], []
    for c, start in enumerate(starts):
        end = starts[c + 1] if c + 1 < n_cells else 2.0
        inside = [b for b in bounds if start <= b < end]
        assert len(inside) <= 1, "grid too coarse for the NF4 midpoints"
        lo.append(sum(b < start for b in bounds))
        thr.append(inside[0] if inside else float("inf"))
    return (torch.tensor(lo, dtype=torch.uint8, device=device), torch.tensor(thr, dtype=torch.float32, device=device))


def _nf4_blocks(x: Tensor, packed: Tensor, absmax: Tensor) -> None:
    """Code full blocks `x` [rows, blocksize] (any float dtype) into `packed` uint8 [rows*blocksize/2] and
    `absmax` fp32 [rows], as bitsandbytes: scaled = float32(x) * (1 / absmax), nearest NF4 value."""
    lo_t, thr_t = _nf4_lookup(str(x.device))
    scaled = x.float() if x.dtype != torch.float32 else x.clone()  # exact upcast; reductions are fast in fp32
    a = torch.maximum(scaled.amax(dim=1), scaled.amin(dim=1).neg_()).abs_()  # [rows] absmax; +0.0 for zeros
    if not bool(torch.isfinite(a).all()):
        raise ValueError("the weight holds NaN or Inf values; nf4 cannot represent them")
    absmax.copy_(a)
    scaled.mul_((1.0 / a.clamp(min=1e-38))[:, None])  # fp32 [rows, blocksize], as bitsandbytes scales
    g = _nf4_cell(scaled).view(-1)
    code = torch.index_select(lo_t, 0, g)
    code.add_(torch.gt(scaled.view(-1), torch.index_select(thr_t, 0, g)).view(torch.uint8))
    if sys.byteorder != "little":
        packed.copy_((code[0::2] << 4) | code[1::2])
        return
    pair = code.view(torch.int16)  # little-endian: element 2i in the low byte, 2i+1 in the high byte
    packed.copy_((pair << 4) | (pair >> 8))  # the low byte is (2i << 4) | 2i+1; copy_ keeps it


@lru_cache(maxsize=None)
def _bits_lookup(device: str) -> tuple[Tensor, Tensor]:
    """bucketize(x, dynamic-map midpoints) by a table over the top 16 bits of float32 x: every such cell holds
    at most one midpoint, so code = lo[cell] + (x > thr[cell]). (lo uint8 [65536], thr float32 [65536])."""
    bounds = _tables("cpu")[3]
    keys = torch.arange(-32768, 32768, dtype=torch.int32)
    ends = torch.stack([(keys << 16).view(torch.float32), ((keys << 16) | 0xFFFF).view(torch.float32)])
    first, last = ends.amin(0), ends.amax(0)  # the float interval of each cell (negative floats run backwards)
    first, last = first.nan_to_num(float("inf")), last.nan_to_num(float("inf"))  # NaN cells: never reached
    lo = torch.searchsorted(bounds, first)  # midpoints < first
    inside = torch.searchsorted(bounds, last) - lo  # midpoints in [first, last)
    assert int(inside.max()) <= 1, "two midpoints share a 16-bit cell"
    thr = torch.where(inside > 0, bounds[lo.clamp(max=len(bounds) - 1)], torch.tensor(float("inf")))
    return lo.to(torch.uint8).to(device), thr.to(device)


def _dynamic_codes(x: Tensor) -> Tensor:
    """Exactly torch.bucketize(x, dynamic-map midpoints) for finite float32 x, as uint8, without a search."""
    lo_t, thr_t = _bits_lookup(str(x.device))
    cell = (x.reshape(-1).view(torch.int32) >> 16).add_(32768)
    code = torch.index_select(lo_t, 0, cell)
    return code.add_(torch.gt(x.reshape(-1), torch.index_select(thr_t, 0, cell)).view(torch.uint8)).view(x.shape)


def _run_chunks(fn, starts: range, cpu: bool) -> None:
    """Run fn(start) for every chunk. On the CPU: one Python worker per core, each op single-threaded (torch's
    intra-op pool is set to 1 thread for the call, then restored): thousands of small ops synchronising an
    OpenMP team are slow, and stall whenever the machine is busy."""
    if not cpu or len(starts) < 2:
        for i in starts:
            fn(i)
        return
    from concurrent.futures import ThreadPoolExecutor

    with _THREADS_LOCK:  # concurrent callers must not restore each other's thread count
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            if threads == 1:
                for i in starts:
                    fn(i)
            else:
                with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="nf4") as pool:
                    list(pool.map(fn, starts))  # ops release the GIL; list() re-raises a worker's exception
        finally:
            torch.set_num_threads(threads)


_THREADS_LOCK = threading.Lock()


def _pack_codes(q: Tensor) -> Tensor:
    if q.numel() % 2:  # bitsandbytes pads the scaled values with 0.0, whose code is 7
        q = torch.nn.functional.pad(q, (0, 1), value=NF4_CODE.index(0.0))
    q = q.to(torch.uint8)
    return (q[0::2] << 4) | q[1::2]


def quantize_nf4(w: Tensor, blocksize: int = 64, double_quant: bool = True) -> dict[str, Tensor]:
    """NF4 as bitsandbytes' quantize_4bit(..., compress_statistics=double_quant). Keys for a parameter `weight`."""
    check_blocksize(blocksize)
    if w.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"nf4 quantizes bf16, fp16 or fp32 tensors, got {w.dtype}")
    nf4, nf4_bounds, dyn, dyn_bounds = _tables(str(w.device))
    flat = w.reshape(-1)
    n = flat.numel()
    full = n - n % blocksize
    blocks = full // blocksize
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=w.device)
    step = max(1, _CHUNK_ELEMENTS.get(w.device.type, 1 << 26) // blocksize)
    xb = flat[:full].view(blocks, blocksize)
    half = blocksize // 2

    def chunk(i: int) -> None:  # whole blocks i..j: the fp32 temporaries stay small
        j = min(i + step, blocks)
        _nf4_blocks(xb[i:j], packed[i * half:j * half], absmax[i:j])

    _run_chunks(chunk, range(0, blocks, step), w.device.type == "cpu")
    if full < n:  # a last, shorter block (its codes start on a byte boundary: full is even)
        q, am = _blockwise(flat[full:].float(), blocksize, nf4_bounds)
        packed[full // 2:] = _pack_codes(q)
        absmax[-1:] = am
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError("the weight holds NaN or Inf values; nf4 cannot represent them")
    packed = packed.unsqueeze(1)
    meta = {"quant_type": "nf4", "blocksize": blocksize, "dtype": str(w.dtype).removeprefix("torch."),
            "shape": list(w.shape)}
    out = {"weight": packed, "weight.quant_map": nf4.clone()}
    if double_quant:
        offset = absmax.double().mean().float()  # float64: the same bytes whatever device sums it
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


def dequantize_nf4(d: dict[str, Tensor], dtype: torch.dtype | None = None, prefix: str = "weight") -> Tensor:
    """The weight of one saved NF4 parameter (keys `{prefix}`, `{prefix}.absmax`, ...), through decode_nf4."""
    meta = unpack_quant_state(d[f"{prefix}.{QUANT_STATE_KEY}"])
    double = "nested_offset" in meta
    packed = d[prefix]
    offset = torch.tensor(float(meta.get("nested_offset", 0.0)), dtype=torch.float32, device=packed.device)
    return decode_nf4(packed.reshape(-1), d[f"{prefix}.absmax"], d[f"{prefix}.quant_map"],
                      d[f"{prefix}.nested_absmax"] if double else None,
                      d[f"{prefix}.nested_quant_map"] if double else None, offset, tuple(meta["shape"]),
                      meta["blocksize"], dtype or getattr(torch, meta["dtype"]))  # fmt: skip


def decode_nf4(packed: Tensor, absmax: Tensor, quant_map: Tensor | None, nested_absmax: Tensor | None,
               nested_map: Tensor | None, offset: Tensor, shape: tuple[int, ...], blocksize: int,
               dtype: torch.dtype) -> Tensor:  # fmt: skip
    """The one NF4 decoder, vectorised over any leading dims S: packed [*S, ceil(numel/2)(, 1)] -> [*S, *shape].

    absmax [*S, blocks] (uint8 with nested_absmax [*S, nested blocks] and offset [*S], else float32); quant_map
    [*S, 16] and nested_map [*S, 256], or None for the standard NF4 table and dynamic map (shared per device:
    no per-weight gathers). fp32 throughout as bitsandbytes (absmax = nested_map[code] * nested_absmax + offset;
    w = quant_map[nibble] * absmax), cast at the end; a few large ops whatever S is, and no host read.
    """
    n = 1
    for s in shape:
        n *= s
    S = absmax.shape[:-1]
    blocks = absmax.shape[-1]
    if blocks != -(-n // blocksize):
        raise ValueError(f"nf4 weight of shape {tuple(shape)} needs {-(-n // blocksize)} blocks of {blocksize}, "
                         f"got {blocks}")  # fmt: skip
    if nested_absmax is not None:
        if nested_map is None:  # [*S, blocks] dynamic-map values; index_select with int32 is the fast lookup
            scale = nf4_table("dynamic_map", absmax.device).index_select(0, absmax.reshape(-1).int()).view(absmax.shape)
        else:
            scale = torch.gather(nested_map, -1, absmax.long())
        nb = nested_absmax.shape[-1]
        if blocks == nb * NESTED_BLOCKSIZE:  # [*S, nb, 256] * [*S, nb, 1]
            scale = (scale.view(*S, nb, NESTED_BLOCKSIZE) * nested_absmax[..., None]).view(*S, blocks)
        else:  # the last nested block is short
            scale = scale * nested_absmax.repeat_interleave(NESTED_BLOCKSIZE, dim=-1)[..., :blocks]
        scale = scale + offset[..., None]
    else:
        scale = absmax.float()
    # byte -> its two fp32 NF4 values (high nibble first) as one float64 table entry: one gather per weight
    if quant_map is None:
        vals = nf4_table("nf4_pairs", packed.device).index_select(0, packed.reshape(-1).int())  # [*S * n/2] float64
    else:
        lut = quant_map[..., _byte_nibbles(quant_map.device)].view(torch.float64)  # [*S, 256]
        vals = torch.gather(lut, -1, packed.reshape(*S, (n + 1) // 2).long())
    vals = vals.view(torch.float32).view(*S, 2 * ((n + 1) // 2))
    if n % 2:  # an odd size: the last byte's low nibble is padding
        vals = vals[..., :n]
    if n % blocksize == 0:
        w = vals.view(*S, blocks, blocksize) * scale[..., None]  # [*S, blocks, blocksize]
    else:  # a last, shorter block
        w = vals * scale.repeat_interleave(blocksize, dim=-1)[..., :n]
    return w.view(*S, *shape).to(dtype)


# Shared lookup tables per device. A plain dict rather than functools.lru_cache: torch.compile traces into
# lru_cache'd functions (rebuilding the table with host syncs) but reads a global dict's tensors as constants.
_NF4_TABLES: dict[tuple[str, str], Tensor] = {}


def nf4_table(name: str, device: torch.device) -> Tensor:
    """'nf4_pairs': [256] float64, byte -> its two fp32 NF4 values (high nibble first); 'dynamic_map': [256] fp32."""
    key = (name, str(device))
    t = _NF4_TABLES.get(key)
    if t is None:
        if name == "nf4_pairs":
            code = torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
            t = code[_byte_nibbles(device)].view(torch.float64)
        else:
            t = dynamic_map().to(device)
        _NF4_TABLES[key] = t
    return t


@lru_cache(maxsize=None)
def _byte_nibbles(device: torch.device) -> Tensor:
    b = torch.arange(256, device=device)
    return torch.stack((b >> 4, b & 15), dim=-1).reshape(-1)  # [512]: hi0, lo0, hi1, lo1, ...


def quantize_int8(w: Tensor) -> dict[str, Tensor]:
    """Row-wise absmax int8 as bitsandbytes' int8_vectorwise_quant (threshold 0). Zero rows stay zero."""
    if w.dim() != 2:
        raise ValueError(f"int8 quantizes 2-D [out, in] weights, got shape {tuple(w.shape)}")
    scb = w.abs().amax(dim=1).float()
    q = torch.round(w.float() * (127.0 / scb.clamp(min=1e-38))[:, None]).to(torch.int8)
    return {"weight": q, "SCB": scb}


def dequantize_int8(d: dict[str, Tensor], dtype: torch.dtype = torch.float32) -> Tensor:
    return (d["weight"].float() * (d["SCB"].float() / 127.0)[:, None]).to(dtype)


def _int4_pairs_to_bnb(b: Tensor) -> Tensor:
    """uint8 bytes of little-endian int32 words (element 2i low, 2i+1 high) <-> bitsandbytes' order (2i high):
    swap the nibbles of every byte. Its own inverse."""
    return (b << 4) | (b >> 4)


def pack_int4(q: Tensor) -> Tensor:
    """int8 [out, in] values in -8..7 -> int32 [out, in/8] words, as compressed-tensors' pack_to_int32(q, 4)."""
    out_f, in_f = q.shape
    if in_f % 8:
        raise ValueError(f"int4 packs eight values per int32 word; the input dimension {in_f} is not a multiple of 8")
    u = (q.to(torch.int16) + 8).to(torch.uint8).view(out_f, in_f // 2, 2)
    b = u[..., 0] | (u[..., 1] << 4)  # [out, in/2]: element 2i in the low nibble
    if sys.byteorder != "little":
        b = b.view(out_f, in_f // 8, 4).flip(-1)
    return b.contiguous().view(torch.int32).view(out_f, in_f // 8)


def unpack_int4(packed: Tensor, shape: tuple[int, int] | list[int]) -> Tensor:
    """int32 [out, in/8] -> int8 [out, in] values in -8..7 (inverse of pack_int4)."""
    out_f, in_f = (int(s) for s in shape)
    b = packed.contiguous().view(torch.uint8)
    if sys.byteorder != "little":
        b = b.view(out_f, -1, 4).flip(-1)
    b = b.reshape(out_f, -1)
    return (torch.stack((b & 0xF, b >> 4), dim=-1).view(out_f, -1)[:, :in_f].to(torch.int8) - 8)


def quantize_int4(w: Tensor, group_size: int = INT4_GROUP_SIZE) -> dict[str, Tensor]:
    """Symmetric round-to-nearest int4 per group (compressed-tensors' calculate_qparams + quantize for num_bits 4,
    symmetric, strategy group): scale = max |w| / 7.5 in w's dtype, q = clamp(round(w / scale), -8, 7)."""
    if w.dim() != 2:
        raise ValueError(f"int4 quantizes 2-D [out, in] weights, got shape {tuple(w.shape)}")
    if w.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"int4 quantizes bf16, fp16 or fp32 tensors, got {w.dtype}")
    out_f, in_f = w.shape
    check_group_size(group_size, in_f)
    g = w.reshape(out_f, in_f // group_size, group_size)
    amax = g.abs().amax(dim=-1)
    if not bool(torch.isfinite(amax).all()):
        raise ValueError("the weight holds NaN or Inf values; int4 cannot represent them")
    scale = amax / 7.5  # in w's dtype, as the library computes it
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(w.dtype).eps, dtype=w.dtype, device=w.device), scale)
    packed = torch.empty(out_f, in_f // 8, dtype=torch.int32, device=w.device)
    rows = max(1, _CHUNK_ELEMENTS.get(w.device.type, 1 << 26) // in_f)  # fp32 temporaries of a few rows at a time
    for r in range(0, out_f, rows):
        q = (g[r:r + rows].float() / scale[r:r + rows].float()[..., None]).clamp_(-8, 7).round_().to(torch.int8)
        packed[r:r + rows] = pack_int4(q.view(-1, in_f))
    return {"weight_packed": packed, "weight_scale": scale.contiguous(),
            "weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64)}


def _int4_parts(d: dict[str, Tensor], name: str = "weight") -> tuple[Tensor, Tensor, tuple[int, int], int]:
    """(packed, scale, (out, in), group size) of one int4 weight, checked against each other."""
    for k in INT4_KEYS:
        if k not in d:
            raise KeyError(f"{name}: tensor {k!r} is missing")
    packed, scale, shape = d["weight_packed"], d["weight_scale"], d["weight_shape"]
    out_f, in_f = (int(s) for s in shape.tolist())
    if packed.dtype != torch.int32 or tuple(packed.shape) != (out_f, -(-in_f // 8)):
        raise ValueError(f"{name}: weight_packed is {packed.dtype} {tuple(packed.shape)}, expected int32 "
                         f"{(out_f, -(-in_f // 8))} for weight_shape {[out_f, in_f]}")
    if scale.dim() != 2 or scale.shape[0] != out_f or scale.shape[1] == 0 or in_f % scale.shape[1]:
        raise ValueError(f"{name}: weight_scale has shape {tuple(scale.shape)}, which is not [out, in/group] "
                         f"for weight_shape {[out_f, in_f]}")
    return packed, scale, (out_f, in_f), in_f // scale.shape[1]


def dequantize_int4(d: dict[str, Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """w = q * scale, the product rounded to the scale's dtype (as compressed-tensors decompresses), then `dtype`."""
    packed, scale, (out_f, in_f), group = _int4_parts(d)
    q = unpack_int4(packed, (out_f, in_f)).view(out_f, in_f // group, group)
    w = (q.float() * scale.float()[..., None]).to(scale.dtype).view(out_f, in_f)
    return w.to(dtype) if dtype else w


def int4_as_nf4(d: dict[str, Tensor], name: str = "weight") -> dict[str, Tensor]:
    """Repack one int4 weight into the NF4 layout (keys as quantize_nf4 returns, no double quant): code table the
    integers -8..7, absmax the fp32 group scale, blocksize the group size, bnb's nibble order. Same packed bytes,
    so the NF4 kernels run it; done once at load."""
    packed, scale, (out_f, in_f), group = _int4_parts(d, name)
    if in_f % 8:
        raise ValueError(f"{name}: input dimension {in_f} is not a multiple of 8; it cannot run as nf4 blocks")
    check_group_size(group, in_f, name)
    b = packed.contiguous().view(torch.uint8)
    if sys.byteorder != "little":
        b = b.view(-1, 4).flip(-1)
    meta = {"quant_type": "int4", "blocksize": group, "dtype": str(scale.dtype).removeprefix("torch."),
            "shape": [out_f, in_f]}
    return {"weight": _int4_pairs_to_bnb(b.reshape(-1, 1)),
            "weight.absmax": scale.float().reshape(-1),
            "weight.quant_map": torch.tensor(INT4_CODE, dtype=torch.float32, device=packed.device),
            "weight." + QUANT_STATE_KEY: pack_quant_state(meta)}


def quantize_tensor(w: Tensor, fmt: str, blocksize: int = 64, double_quant: bool = True,
                    group_size: int = INT4_GROUP_SIZE) -> dict[str, Tensor]:
    """Quantize one weight to `fmt`; returns the tensors saved for a parameter named `weight` (int4: the module's
    weight_packed / weight_scale / weight_shape)."""
    check_format(fmt)
    if not w.is_floating_point():
        raise ValueError(f"expected a floating-point weight, got {w.dtype}")
    if fmt == "nf4":
        return quantize_nf4(w, blocksize, double_quant)
    if fmt == "int8":
        return quantize_int8(w)
    if fmt == "int4":
        return quantize_int4(w, group_size)
    return {"weight": w.to(FLOAT_DTYPES[fmt]).contiguous()}


def detect_format(d: dict[str, Tensor] | set[str] | list[str]) -> str:
    """The format of one parameter from the keys saved for it (relative to its module, as quantize_tensor returns)."""
    keys = set(d)
    if "weight." + QUANT_STATE_KEY in keys:
        return "nf4"
    if "SCB" in keys:
        return "int8"
    if "weight_packed" in keys:
        return "int4"
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
    if fmt == "int4":
        return dequantize_int4(d, dtype)
    return d["weight"].to(dtype) if dtype else d["weight"]


def param_suffixes(fmt: str, double_quant: bool = True) -> tuple[str, ...]:
    """The key suffixes (relative to the module prefix) stored for one quantized weight."""
    check_format(fmt)
    if fmt == "nf4":
        nested = ("weight.nested_absmax", "weight.nested_quant_map") if double_quant else ()
        return ("weight", "weight.absmax", "weight.quant_map", *nested, "weight." + QUANT_STATE_KEY)
    if fmt == "int8":
        return ("weight", "SCB")
    if fmt == "int4":
        return INT4_KEYS
    return ("weight",)


@dataclass
class NF4Weight:
    """One NF4 weight as the kernels consume it: the saved tensors plus the JSON fields, no decoding done.

    `absmax` is uint8 (double quant: decode with nested_absmax/nested_quant_map/offset) or float32 (plain).
    `offset` is a 0-d float32 tensor on the weights' device (0 without double quant): kernels read it there, so
    nothing syncs with the host.
    """

    packed: Tensor  # uint8 [numel/2, 1]
    absmax: Tensor  # uint8 or float32 [numel/blocksize]
    quant_map: Tensor  # float32 [16]
    nested_absmax: Tensor | None  # float32 [ceil(blocks/256)]
    nested_quant_map: Tensor | None  # float32 [256]
    offset: Tensor  # float32, 0-d
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
            offset=torch.tensor(float(meta.get("nested_offset", 0.0)), dtype=torch.float32, device=d[prefix].device),
            shape=tuple(meta["shape"]),
            blocksize=int(meta["blocksize"]), nested_blocksize=int(meta.get("nested_blocksize", NESTED_BLOCKSIZE)),
            dtype=getattr(torch, meta["dtype"]),
        )  # fmt: skip

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None
