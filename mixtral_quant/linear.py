"""Quantized linear weights that hold only the packed checkpoint tensors, and the backend dispatch (torch/triton/bnb).

A `QuantLinear` holds one NF4 or int8 weight, or a stack of them with the same shape (the experts of a layer);
`linear()` is the one function every matmul on packed weights goes through.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .formats import (INT8_KEYS, NESTED_BLOCKSIZE, NF4_CODE, NF4_KEYS, QUANT_STATE_KEY, NF4Weight, decode_nf4, nf4_table,
                      unpack_quant_state)

BACKENDS = ("auto", "torch", "triton", "bnb")


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The backend, resolved once when a model is loaded: 'auto' -> 'triton' on CUDA, 'torch' elsewhere; 'triton'
    and 'bnb' are imported here (and 'triton' checked against the device), so a forward never re-checks them.
    Anything not in BACKENDS is a ValueError."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "triton":
        try:
            from .kernels import _common
        except ImportError as e:
            raise RuntimeError(f"backend 'triton' needs Triton ({e}); install it or use backend='torch'") from None
        if device.type != "cuda" and not _common.interpreting():
            raise ValueError(f"backend 'triton' runs on CUDA, not {device}: use backend='torch' "
                             "(or TRITON_INTERPRET=1 to run the kernels on the CPU, slowly)")  # fmt: skip
    elif backend == "bnb":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise RuntimeError(f"backend 'bnb' needs bitsandbytes ({e}); use backend='torch'") from None
    return backend


class QuantLinear(nn.Module):
    """One packed weight [out, in] (lead == ()) or a stack of them [*lead, out, in], in the checkpoint's bytes.

    Buffers, each [*lead, *file shape]: nf4 -> weight (uint8 [n/2, 1]), absmax (uint8, or float32 without double
    quant), quant_map [16], nested_absmax, nested_quant_map [256], offset (float32 [*lead], the JSON's nested_offset);
    int8 -> weight (int8 [out, in]), SCB (float32 [out]). Nothing is ever dequantized into a kept tensor.
    """

    def __init__(self, fmt: str, out_features: int, in_features: int, lead: tuple[int, ...] = (),
                 blocksize: int = 64, double_quant: bool = True, source_dtype: torch.dtype = torch.bfloat16,
                 backend: str = "torch", compute_dtype: torch.dtype = torch.float32):  # fmt: skip
        super().__init__()
        if fmt not in ("nf4", "int8"):
            raise ValueError(f"QuantLinear holds nf4 or int8 weights, got {fmt!r}")
        self.fmt, self.out_features, self.in_features, self.lead = fmt, out_features, in_features, tuple(lead)
        self.blocksize, self.double_quant, self.source_dtype = blocksize, double_quant, source_dtype
        self.backend, self.compute_dtype = backend, compute_dtype
        self.standard_maps = False  # nf4: every quant_map is NF4_CODE and every nested map the dynamic map

    # ---- loading -------------------------------------------------------------------------------------------
    @classmethod
    def from_tensors(cls, parts: list[dict[str, Tensor]], lead: tuple[int, ...] = (), *, device="cpu",
                     backend: str = "torch", compute_dtype: torch.dtype = torch.float32,
                     name: str = "weight") -> "QuantLinear":  # fmt: skip
        """Build from the checkpoint tensors of each weight (keys relative to the module, as
        CheckpointReader.module returns), `prod(lead)` of them in row-major order of `lead`.

        Each tensor is copied once into its slot of a buffer allocated on `device` (a single weight is moved,
        not copied, when already there): the packed bytes are the only copy.
        """
        count = 1
        for s in lead:
            count *= s
        if len(parts) != count:
            raise ValueError(f"{name}: expected {count} weights for a stack of {lead}, got {len(parts)}")
        first = parts[0]
        if f"weight.{QUANT_STATE_KEY}" in first:
            fmt, keys = "nf4", dict(NF4_KEYS)
        elif "SCB" in first:
            fmt, keys = "int8", INT8_KEYS
        else:
            raise ValueError(f"{name}: not an nf4 or int8 weight (keys {sorted(first)})")
        metas = [unpack_quant_state(p[f"weight.{QUANT_STATE_KEY}"]) for p in parts] if fmt == "nf4" else []
        if fmt == "nf4":
            meta = metas[0]
            out_f, in_f = meta["shape"]
            double = "nested_offset" in meta
            if not double:
                keys = {k: v for k, v in keys.items() if not k.startswith("weight.nested")}
            numel = out_f * in_f
            for m in metas[1:]:  # equal sizes suffice (w1 [F, D] and w2 [D, F] share a stack; see narrow_lead)
                if (m["shape"][0] * m["shape"][1], m["blocksize"], "nested_offset" in m) != (numel, meta["blocksize"], double):
                    raise ValueError(f"{name}: stacked nf4 weights disagree in size or blocksize")
            bad = next((m["shape"] for m in metas if m["shape"][1] % m["blocksize"]), None)
            if backend == "bnb" and torch.device(device).type == "cpu" and bad is not None:
                # bitsandbytes 0.50's CPU dequantize_4bit (its AVX512 path) decodes a block that spans two rows
                # wrongly (tests/test_formats.py shows it on its own bytes); Mixtral's rows are all whole blocks
                raise ValueError(f"{name}: backend 'bnb' on the CPU needs rows that are whole {meta['blocksize']}-blocks "
                                 f"(bitsandbytes' CPU kernel misdecodes the others), this weight is {tuple(bad)}; "
                                 "use backend='torch'")  # fmt: skip
            mod = cls("nf4", out_f, in_f, lead, meta["blocksize"], double, getattr(torch, meta["dtype"]),
                      backend, compute_dtype)  # fmt: skip
        else:
            out_f, in_f = first["weight"].shape
            mod = cls("int8", out_f, in_f, lead, backend=backend, compute_dtype=compute_dtype)
        for key, buf in keys.items():
            missing = [i for i, p in enumerate(parts) if key not in p]
            if missing:
                raise KeyError(f"{name}: tensor {key!r} is missing (re-quantize the checkpoint)")
            ref = parts[0][key]
            if not lead:
                mod.register_buffer(buf, ref.to(device))
                continue
            stack = torch.empty(*lead, *ref.shape, dtype=ref.dtype, device=device)
            flat = stack.view(count, *ref.shape)
            for i, p in enumerate(parts):
                if p[key].shape != ref.shape:
                    raise ValueError(f"{name}: {key} shapes differ in the stack ({tuple(p[key].shape)} vs {tuple(ref.shape)})")
                flat[i].copy_(p[key])
            mod.register_buffer(buf, stack)
        if fmt == "nf4":
            offsets = [float(m.get("nested_offset", 0.0)) for m in metas]
            mod.register_buffer("offset", torch.tensor(offsets, dtype=torch.float32, device=device).view(lead))
            mod.standard_maps = _has_standard_maps(mod)
        return mod

    def narrow_lead(self, start: int, length: int, shape: tuple[int, int] | None = None) -> "QuantLinear":
        """A QuantLinear over slots start..start+length-1 of lead dim 1 of this stack: views, no copy.
        `shape` (out, in) re-reads slots of another shape but the same size (w2 [D, F] stacked with w1 [F, D])."""
        out_f, in_f = shape or (self.out_features, self.in_features)
        if out_f * in_f != self.out_features * self.in_features:
            raise ValueError(f"narrow_lead: shape {shape} does not hold {self.out_features * self.in_features} elements")
        mod = QuantLinear(self.fmt, out_f, in_f, (self.lead[0], length, *self.lead[2:]),
                          self.blocksize, self.double_quant, self.source_dtype, self.backend, self.compute_dtype)  # fmt: skip
        for name, buf in self.named_buffers(recurse=False):
            mod.register_buffer(name, buf.narrow(1, start, length))
        mod.standard_maps = self.standard_maps
        return mod

    def select(self, i: int, shape: tuple[int, int] | None = None) -> "QuantLinear":
        """Weight i of a stack with lead (n,) as a single QuantLinear (views); `shape` as in narrow_lead."""
        out_f, in_f = shape or (self.out_features, self.in_features)
        mod = QuantLinear(self.fmt, out_f, in_f, (), self.blocksize, self.double_quant, self.source_dtype,
                          self.backend, self.compute_dtype)  # fmt: skip
        for name, buf in self.named_buffers(recurse=False):
            mod.register_buffer(name, buf[i])
        mod.standard_maps = self.standard_maps
        return mod

    def extra_repr(self) -> str:
        lead = f"lead={self.lead}, " if self.lead else ""
        return f"{self.fmt}, {lead}out={self.out_features}, in={self.in_features}, backend={self.backend}"

    # ---- views for kernels ---------------------------------------------------------------------------------
    def nf4_weight(self, *index: int) -> NF4Weight:
        """The kernels' view of one weight (index into lead); views of this module's buffers, the nested offset
        included (a 0-d tensor on the device: nothing is read on the host)."""
        if self.fmt != "nf4":
            raise ValueError("nf4_weight() on an int8 QuantLinear")
        sel = lambda t: t[index] if index else t  # noqa: E731
        return NF4Weight(
            packed=sel(self.weight), absmax=sel(self.absmax), quant_map=sel(self.quant_map),
            nested_absmax=sel(self.nested_absmax) if self.double_quant else None,
            nested_quant_map=sel(self.nested_quant_map) if self.double_quant else None,
            offset=sel(self.offset), shape=(self.out_features, self.in_features), blocksize=self.blocksize,
            nested_blocksize=NESTED_BLOCKSIZE, dtype=self.source_dtype,
        )  # fmt: skip

    # ---- compute ---------------------------------------------------------------------------------------------
    def dequantize(self, index: Tensor | int | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """The weights selected by `index` along lead dim 0 (all if None) as [*sel, out, in] in `dtype`.

        A temporary: callers use it for one matmul and drop it.
        """
        dtype = dtype or self.compute_dtype
        if index is None:
            take = lambda t: t  # noqa: E731
        elif isinstance(index, Tensor):  # index_select: far cheaper than advanced indexing for a few rows
            take = lambda t: t.index_select(0, index.reshape(-1)).view(*index.shape, *t.shape[1:])  # noqa: E731
        else:
            take = lambda t: t[index]  # noqa: E731
        if self.fmt == "int8":
            w = take(self.weight).to(dtype)  # [*S, out, in]
            return w * (take(self.SCB) * (1 / 127)).to(dtype)[..., None]
        std = self.standard_maps  # then the tables are shared: no per-slot gathers
        return decode_nf4(
            take(self.weight), take(self.absmax), None if std else take(self.quant_map),
            take(self.nested_absmax) if self.double_quant else None,
            None if std or not self.double_quant else take(self.nested_quant_map),
            take(self.offset), (self.out_features, self.in_features), self.blocksize, dtype,
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self)


def _has_standard_maps(w: "QuantLinear") -> bool:
    dev = w.quant_map.device
    ok = bool((w.quant_map == torch.tensor(NF4_CODE, dtype=torch.float32, device=dev)).all())
    if w.double_quant:
        ok = ok and bool((w.nested_quant_map == nf4_table("dynamic_map", dev)).all())
    return ok


# ---- the backend dispatch --------------------------------------------------------------------------------
def linear(x: Tensor, w: QuantLinear, index: int | None = None) -> Tensor:
    """x [..., in] @ W.T -> [..., out] for a single weight, or for weight `index` of a stack (all lead dims past
    the first are folded into out: a [E, 2, F, D] stack gives [..., 2F]). Dispatches on w.backend."""
    if w.backend == "torch":
        if w.fmt == "int8" and index is None:  # scale the output rows instead of the weight: one op fewer
            return F.linear(x, w.weight.to(x.dtype)) * (w.SCB * (1 / 127)).to(x.dtype)
        W = w.dequantize(index, x.dtype)
        return F.linear(x, W.reshape(-1, w.in_features))
    if w.backend == "triton":
        return _triton_linear(x, w, index)
    if w.backend == "bnb":
        return _bnb_linear(x, w, index)
    raise ValueError(f"unknown backend {w.backend!r}: choose one of {', '.join(BACKENDS[1:])}")


def _slices(w: QuantLinear, index: int | None) -> list[tuple[int, ...]]:
    """Index tuples of the single weights making up weight `index` (the stack's trailing lead dims)."""
    rest = w.lead[1:] if index is not None else ()
    out = [() if index is None else (index,)]
    for s in rest:
        out = [t + (j,) for t in out for j in range(s)]
    return out


def _triton_linear(x: Tensor, w: QuantLinear, index: int | None) -> Tensor:
    from .kernels import int8_matmul, nf4_matmul  # importable: resolve_backend checked it when the model loaded

    outs = []
    for t in _slices(w, index):
        if w.fmt == "nf4":
            outs.append(nf4_matmul(x, w.nf4_weight(*t)))
        else:
            outs.append(int8_matmul(x, w.weight[t] if t else w.weight, w.SCB[t] if t else w.SCB))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def _bnb_linear(x: Tensor, w: QuantLinear, index: int | None) -> Tensor:
    import bitsandbytes as bnb  # importable: resolve_backend checked it when the model loaded
    from bitsandbytes.functional import QuantState

    outs = []
    for t in _slices(w, index):
        if w.fmt == "int8":  # bitsandbytes' int8 weights dequantize row-wise; no fp16 copy is kept
            W = bnb.functional.int8_vectorwise_dequant(w.weight[t] if t else w.weight, w.SCB[t] if t else w.SCB)
            outs.append(F.linear(x, W.to(x.dtype)))
            continue
        v = w.nf4_weight(*t)
        state2 = None
        if v.double_quant:
            state2 = QuantState(absmax=v.nested_absmax, code=v.nested_quant_map, blocksize=v.nested_blocksize,
                                dtype=torch.float32)  # fmt: skip
        qs = QuantState(absmax=v.absmax, shape=torch.Size(v.shape), code=v.quant_map, blocksize=v.blocksize,
                        quant_type="nf4", dtype=x.dtype, offset=v.offset if state2 else None,
                        state2=state2)  # fmt: skip
        outs.append(bnb.matmul_4bit(x, v.packed.t(), quant_state=qs))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def make_linear(tensors: dict[str, Tensor], *, name: str, device, compute_dtype: torch.dtype,
                backend: str) -> nn.Module:  # fmt: skip
    """The module for one checkpoint linear: QuantLinear for nf4/int8, nn.Linear in the compute dtype otherwise."""
    if not tensors:
        raise KeyError(f"{name}: no tensors for this linear")
    if "weight" not in tensors:
        raise KeyError(f"{name}: tensor 'weight' is missing")
    if f"weight.{QUANT_STATE_KEY}" in tensors or "SCB" in tensors:
        return QuantLinear.from_tensors([tensors], (), device=device, backend=backend, compute_dtype=compute_dtype,
                                        name=name)  # fmt: skip
    w = tensors["weight"]
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(w.to(device=device, dtype=compute_dtype), requires_grad=False)
    return lin
