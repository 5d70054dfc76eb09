"""The host tier of an offloaded layer and the transfers from it: each expert's bytes as one row of a host buffer
(pinned on CUDA by registering plain memory, so nothing is rounded up) or, on the CPU, the checkpoint's
memory-mapped tensors; one side stream per CUDA device with an event per slot to order copies and compute.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from ..formats import QUANT_STATE_KEY, unpack_quant_state
from ..formats import INT8_KEYS, NF4_KEYS
from ..memory import padded
from .experts import ResidentExperts, expert_module


@dataclass(frozen=True)
class ExpertLayout:
    """Where each of one expert's tensors lies in its contiguous byte buffer: (stack, buffer, shape, dtype, offset).

    The stacks are ResidentExperts' (`w123` [3, ...] for nf4, else `w13` [2, ...] and `w2` [1, ...]); the buffers
    are QuantLinear's (weight, absmax, ..., offset) or "" for a dense weight. Moving an expert = copying one row.
    Its size is memory.Footprint.slot_bytes (each tensor padded to memory.ALIGN).
    """

    fields: tuple[tuple[str, str, tuple[int, ...], torch.dtype, int], ...]
    nbytes: int  # padded size of one expert's buffer
    raw_nbytes: int  # the same tensors without padding (what a resident expert costs)

    @classmethod
    def of(cls, store: ResidentExperts) -> "ExpertLayout":
        fields, off, raw = [], 0, 0
        for mod, name, t in store.stacked_tensors():  # t: [E, *shape]
            nb = t[0].numel() * t.element_size()
            fields.append((mod, name, tuple(t.shape[1:]), t.dtype, off))
            off += padded(nb)
            raw += nb
        return cls(tuple(fields), off, raw)

    def views(self, buf: Tensor) -> dict[tuple[str, str], Tensor]:
        """buf uint8 [n, nbytes] -> {(stack, buffer): [n, *shape]}, views sharing buf's storage."""
        n = buf.shape[0]
        out = {}
        for mod, name, shape, dtype, off in self.fields:
            nb = math.prod(shape) * dtype.itemsize
            out[mod, name] = buf[:, off:off + nb].view(dtype).view(n, *shape)
        return out


def host_buffer(E: int, layout: ExpertLayout, device: torch.device) -> tuple[Tensor, int]:
    """(uint8 [E, nbytes] in host memory, bytes pinned): one block per layer, registered with CUDA (page-locked)
    when the compute device is CUDA. Not `pin_memory=True`: PyTorch's host allocator rounds every request up to
    a power of two (8 x 90.9 MB of Mixtral experts would pin 1 GiB per layer)."""
    buf = torch.zeros(E, layout.nbytes, dtype=torch.uint8)
    if device.type != "cuda":
        return buf, 0
    cudart = torch.cuda.cudart()
    ptr, size = buf.data_ptr(), buf.numel()
    err = cudart.cudaHostRegister(ptr, size, 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister of {size:,} bytes failed (error {int(err)}): not enough page-lockable "
                           "host memory for the offloaded experts; raise max_memory or the memlock limit")  # fmt: skip
    weakref.finalize(buf, cudart.cudaHostUnregister, ptr)  # views outliving buf then see plain memory
    return buf, size


def template(reader, prefix: str, compute_dtype: torch.dtype) -> ResidentExperts:
    """A one-expert store on the CPU built from expert 0: the layout, format and shapes of every expert."""
    return ResidentExperts.from_checkpoint(reader, prefix, reader.config, device="cpu", compute_dtype=compute_dtype,
                                           backend="torch", experts=range(1))  # fmt: skip


def checkpoint_ops(reader, prefix: str, layout: ExpertLayout, template: ResidentExperts) -> list[tuple]:
    """The copies that assemble expert `prefix` (…experts.e) from the checkpoint's (memory-mapped) tensors:
    (stack, buffer, index within the stack, source tensor)."""
    shapes = {(mod, name): shape for mod, name, shape, _, _ in layout.fields}
    nf4 = not template.dense and template.w123 is not None
    parts = (("w123", (0,), "w1"), ("w123", (1,), "w3"), ("w123", (2,), "w2")) if nf4 else \
        (("w13", (0,), "w1"), ("w13", (1,), "w3"), ("w2", (0,), "w2"))  # fmt: skip
    ops = []
    for mod, sub, part in parts:
        tensors = expert_module(reader, f"{prefix}.{part}")
        if template.dense:
            ops.append((mod, "", sub, tensors["weight"]))
            continue
        keys = NF4_KEYS if template.w13.fmt == "nf4" else INT8_KEYS
        for rel, t in tensors.items():
            if rel == f"weight.{QUANT_STATE_KEY}":
                off = unpack_quant_state(t).get("nested_offset", 0.0)
                ops.append((mod, "offset", sub, torch.tensor(float(off), dtype=torch.float32)))
            elif rel in keys and (mod, keys[rel]) in shapes:
                ops.append((mod, keys[rel], sub, t))
    for mod, name, sub, t in ops:
        want = shapes[mod, name][len(sub):]
        if tuple(t.shape) != tuple(want):
            raise KeyError(f"{prefix}: {name or 'weight'} has shape {tuple(t.shape)} but expert 0's is "
                           f"{tuple(want)}; the experts of a layer must be quantized alike")  # fmt: skip
    have = {(mod, name, sub) for mod, name, sub, _ in ops}
    for mod, name, shape, _, _ in layout.fields:
        for j in range(shape[0]):
            if (mod, name, (j,)) not in have:
                part = "w2" if mod == "w2" else ("w1", "w3", "w2")[j]
                raise KeyError(f"{prefix}: tensor {name or 'weight'!r} of {part} is missing")
    return ops


class Transfers:
    """Host -> device copies of one layer's experts into its slots. On CUDA: on the device's copy stream; the copy
    into slot s waits for `free[s]` (the last compute reading s) and records `ready[s]`; compute waits `ready[s]`
    and records `free[s]`. Elsewhere copies are plain and immediate."""

    _streams: dict[int, object] = {}  # one side stream per CUDA device for all expert copies

    def __init__(self, slots: Tensor, layout: ExpertLayout, host: Tensor | None, sources: list | None):
        self.slots, self.host, self.sources = slots, host, sources
        self.views = layout.views(slots)
        self.cuda = slots.device.type == "cuda"
        if self.cuda:
            if host is None:
                raise ValueError("host='mapped' copies from the memory-mapped checkpoint and runs on the CPU only; "
                                 "use host='buffer' (pinned host memory) on CUDA")  # fmt: skip
            idx = slots.device.index if slots.device.index is not None else torch.cuda.current_device()
            if idx not in self._streams:
                self._streams[idx] = torch.cuda.Stream(device=idx)
            self.stream = self._streams[idx]
            n = slots.shape[0]
            self.ready = [torch.cuda.Event() for _ in range(n)]
            self.free = [torch.cuda.Event() for _ in range(n)]
            self.stream.wait_stream(torch.cuda.current_stream(slots.device))  # the slots' zero-fill comes first

    def copy(self, e: int, s: int) -> None:
        """Start copying expert e into slot s (asynchronous on CUDA)."""
        if self.cuda:
            self.stream.wait_event(self.free[s])  # the slot's previous expert is no longer being read
            with torch.cuda.stream(self.stream):
                self.slots[s].copy_(self.host[e], non_blocking=True)
                self.ready[s].record(self.stream)
        elif self.host is not None:
            self.slots[s].copy_(self.host[e])
        else:
            for mod, name, sub, t in self.sources[e]:
                self.views[mod, name][s][sub].copy_(t)

    def wait(self, slots) -> None:
        """Compute on the current stream reads these slots next."""
        if self.cuda:
            for s in slots:
                torch.cuda.current_stream().wait_event(self.ready[s])

    def release(self, slots) -> None:
        """Compute has been issued that read these slots."""
        if self.cuda:
            for s in slots:
                self.free[s].record(torch.cuda.current_stream())
