"""Expert stores: where a layer's experts live and how `sum_k w_k * expert_k(x)` is computed over them.

The model's MoE routes; a store computes. `ResidentExperts` keeps every expert on the compute device; `CachedExperts`
keeps them in host memory behind an LRU of device slots (copies on a side stream, speculative prefetch of the next
layer's experts), sized by `place_experts` from a memory budget; `make_expert_store` chooses between them.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import plan
from .config import MixtralConfig
from .devices import parse_max_memory, tracked_bytes
from .formats import NESTED_BLOCKSIZE, QUANT_STATE_KEY, NF4Weight, unpack_quant_state
from .linear import INT8_KEYS, NF4_KEYS, QuantLinear, linear

log = logging.getLogger(__name__)

# Legend: T tokens, E experts, D hidden, F expert intermediate size, A activated experts per token.


class ExpertStore(nn.Module):
    """The interface. forward(x [T, D], topk_ids [T, A] int64, topk_weights [T, A] float) -> [T, D]."""

    num_experts: int

    def forward(self, x: Tensor, topk_ids: Tensor, topk_weights: Tensor) -> Tensor:
        raise NotImplementedError

    def prefetch(self, topk_ids: Tensor) -> None:
        """A hint: these experts [T, A] are likely needed soon (the next forward). Resident stores ignore it."""

    def stats(self) -> dict:
        return {}


class ResidentExperts(ExpertStore):
    """All E experts of one layer on the compute device, stacked: w13 [E, 2, F, D] (w1 and w3), w2 [E, 1, D, F].

    Packed (QuantLinear) or dense (a tensor in the compute dtype, for bf16/fp16 checkpoints). NF4 experts are one
    stack `w123` [E, 3] (w1, w3, w2: equal sizes) so that a token's experts decode in one call; `w13` and `w2` are
    views of it. Per expert e the tensors are views `w13.weight[e, 0]` etc., bytes as in the checkpoint.
    """

    def __init__(self, w13: QuantLinear | Tensor, w2: QuantLinear | Tensor, w123: QuantLinear | None = None):
        super().__init__()
        if isinstance(w13, Tensor):
            self.register_buffer("w13", w13)
            self.register_buffer("w2", w2)
            self.dense = True
            self.num_experts, _, self.ffn, self.hidden = w13.shape
        else:
            self.w13, self.w2, self.w123 = w13, w2, w123
            self.dense = False
            self.num_experts, self.ffn, self.hidden = w13.lead[0], w13.out_features, w13.in_features
        self._fused = None  # the kernels' stacked experts, built on first use with the triton backend

    @classmethod
    def from_checkpoint(cls, reader, prefix: str, config: MixtralConfig, *, device, compute_dtype: torch.dtype,
                        backend: str) -> "ResidentExperts":  # fmt: skip
        """Read `{prefix}.{e}.w1/w2/w3` for every expert straight into the stacked buffers on `device`."""
        E = config.num_local_experts
        parts = {n: [_module(reader, f"{prefix}.{e}.{n}") for e in range(E)] for n in ("w1", "w3", "w2")}
        first = parts["w1"][0]
        kw = dict(device=device, backend=backend, compute_dtype=compute_dtype)
        if any(k.startswith("weight.") for k in first) and all(
            any(k.startswith("weight.") for k in p[e]) for p in parts.values() for e in range(E)
        ):  # nf4 everywhere: one [E, 3] stack
            w123 = QuantLinear.from_tensors([p[e] for e in range(E) for p in parts.values()], (E, 3),
                                            name=f"{prefix}.*.w1/w3/w2", **kw)  # fmt: skip
            D, Fi = w123.in_features, w123.out_features
            return cls(w123.narrow_lead(0, 2), w123.narrow_lead(2, 1, (D, Fi)), w123)
        if "SCB" in first or any(k.startswith("weight.") for k in first):
            w13 = QuantLinear.from_tensors([p for e in range(E) for p in (parts["w1"][e], parts["w3"][e])], (E, 2),
                                           name=f"{prefix}.*.w1/w3", **kw)  # fmt: skip
            w2 = QuantLinear.from_tensors(parts["w2"], (E, 1), name=f"{prefix}.*.w2", **kw)
            return cls(w13, w2)
        Fi, D = first["weight"].shape
        w13 = torch.empty(E, 2, Fi, D, dtype=compute_dtype, device=device)
        w2 = torch.empty(E, 1, D, Fi, dtype=compute_dtype, device=device)
        for e in range(E):
            w13[e, 0].copy_(parts["w1"][e]["weight"])
            w13[e, 1].copy_(parts["w3"][e]["weight"])
            w2[e, 0].copy_(parts["w2"][e]["weight"])
        return cls(w13, w2)

    def _weights(self, index: Tensor | int) -> tuple[Tensor, Tensor]:
        """(w13 [*sel, 2F, D], w2 [*sel, D, F]) of the selected experts, decoded (a temporary) or dense views."""
        Fi, D = self.ffn, self.hidden
        if self.dense:
            w13, w2 = self.w13[index], self.w2[index]
        elif self.w123 is not None:
            w = self.w123.dequantize(index)  # [*sel, 3, F, D]
            w13, w2 = w[..., :2, :, :], w[..., 2, :, :]
        else:
            w13, w2 = self.w13.dequantize(index), self.w2.dequantize(index)
        lead = w13.shape[:-3]
        return w13.reshape(*lead, 2 * Fi, D), w2.reshape(*lead, D, Fi)

    def forward(self, x: Tensor, topk_ids: Tensor, topk_weights: Tensor) -> Tensor:
        T, A = topk_ids.shape
        if not self.dense and self.w13.backend == "triton":
            fused = self._fused_moe(x, topk_ids, topk_weights)
            if fused is not None:
                return fused
        if T == 1:
            return self._one_token(x, topk_ids[0], topk_weights[0])
        return self._grouped(x, topk_ids, topk_weights)

    def _one_token(self, x: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
        """Decode: the A selected experts decoded in one batched call, no host sync."""
        if not self.dense and self.w13.backend != "torch":
            return self._grouped(x, ids[None], weights[None])
        A, Fi, D = ids.shape[0], self.ffn, self.hidden
        w13, w2 = self._weights(ids)  # [A, 2F, D], [A, D, F]
        h = F.linear(x, w13.reshape(A * 2 * Fi, D)).view(A, 2, Fi)  # one matvec for both experts: [A, 2, F]
        a = F.silu(h[:, 0]) * h[:, 1] * weights.to(h.dtype)[:, None]  # [A, F], routing weight applied here
        return torch.bmm(w2, a[:, :, None]).sum(0).view(1, D).to(x.dtype)  # [A, D, 1] summed over A

    def _grouped(self, x: Tensor, topk_ids: Tensor, topk_weights: Tensor) -> Tensor:
        """Prefill / batches: the T*A (token, expert) pairs sorted by expert, one matmul per expert with tokens."""
        T, A = topk_ids.shape
        flat = topk_ids.reshape(-1)  # [T*A]
        order = torch.argsort(flat, stable=True)  # pairs grouped by expert
        tok = order // A  # [T*A] token of each sorted pair
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # one host sync per layer
        xs = x[tok]  # [T*A, D]
        ys = torch.empty_like(xs)
        torch_path = self.dense or self.w13.backend == "torch"
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            seg = xs[start:start + c]  # [c, D]
            if torch_path:
                w13, w2 = self._weights(e)  # [2F, D], [D, F]
                h = F.linear(seg, w13).view(c, 2, self.ffn)  # [c, 2, F]
                ys[start:start + c] = F.linear(F.silu(h[:, 0]) * h[:, 1], w2)  # [c, D]
            else:
                h = linear(seg, self.w13, e).view(c, 2, self.ffn)
                ys[start:start + c] = linear(F.silu(h[:, 0]) * h[:, 1], self.w2, e)
            start += c
        ys = ys * topk_weights.reshape(-1)[order, None].to(ys.dtype)
        return torch.zeros_like(x).index_add_(0, tok, ys)  # [T, D]

    def _fused_moe(self, x: Tensor, topk_ids: Tensor, topk_weights: Tensor) -> Tensor | None:
        """The kernels' fused MoE when they provide one (mixtral_quant.kernels.fused_moe/stack_experts)."""
        try:
            from .kernels import fused_moe, stack_experts
        except ImportError:
            return None
        if self._fused is None:
            E = self.num_experts
            self._fused = stack_experts([self.w13.nf4_weight(e, 0) for e in range(E)] if self.w13.fmt == "nf4"
                                        else [(self.w13.weight[e, 0], self.w13.SCB[e, 0]) for e in range(E)],
                                        [self.w2.nf4_weight(e, 0) for e in range(E)] if self.w2.fmt == "nf4"
                                        else [(self.w2.weight[e, 0], self.w2.SCB[e, 0]) for e in range(E)],
                                        [self.w13.nf4_weight(e, 1) for e in range(E)] if self.w13.fmt == "nf4"
                                        else [(self.w13.weight[e, 1], self.w13.SCB[e, 1]) for e in range(E)])  # fmt: skip
        return fused_moe(x, topk_ids, topk_weights, self._fused)


def _module(reader, prefix: str) -> dict[str, Tensor]:
    t = reader.module(prefix)
    if not t:
        raise KeyError(f"{reader.path}: tensor {prefix + '.weight'!r} is missing; re-quantize or re-download")
    return t


def make_expert_store(reader, config: MixtralConfig, layer_idx: int, *, device, compute_dtype: torch.dtype,
                      backend: str, max_memory: int | None = None) -> ExpertStore:  # fmt: skip
    """The one place a layer's expert store is chosen: resident when there is no budget or the layer gets a slot
    for every expert (see `place_experts`), else `CachedExperts` with the layer's share of the slots."""
    prefix = f"model.layers.{layer_idx}.block_sparse_moe.experts"
    slots = config.num_local_experts
    if max_memory is not None:
        slots = place_experts(reader, device, compute_dtype, max_memory).slots[layer_idx]
    if slots >= config.num_local_experts:
        return ResidentExperts.from_checkpoint(reader, prefix, config, device=device, compute_dtype=compute_dtype,
                                               backend=backend)  # fmt: skip
    return CachedExperts.from_checkpoint(reader, prefix, config, slots, device=device, compute_dtype=compute_dtype,
                                         backend=backend)  # fmt: skip


# ---- offloading: a per-layer LRU of device slots over experts kept in host memory ------------------------------

# Speculative prefetch pays when a layer's compute can hide a copy and the guesses are nearly sure: prefill and
# batches. At batch-1 decode over PCIe a wrong guess costs a whole copy (~3.6 ms for a Mixtral NF4 expert at
# 25 GB/s) to save at most one layer's compute (~0.4 ms): evals/offload_sim.py projects 22 tokens/s for plain LRU
# against 14.5 with prefetch (16 GB GPU, PCIe 4; evals/RESULTS.md). Set it to 1 to prefetch at every step.
PREFETCH_MIN_TOKENS = 8
ALIGN = 16  # byte alignment of each tensor inside an expert's buffer (so uint8 rows can be viewed as float32)


@dataclass(frozen=True)
class ExpertLayout:
    """Where each of one expert's tensors lies in its contiguous byte buffer: (module, buffer, shape, dtype, offset).

    The modules are ResidentExperts' `w13` (w1 and w3, shapes [2, ...]) and `w2` ([1, ...]); the buffers are
    QuantLinear's (weight, absmax, ..., offset) or "" for a dense weight. Moving an expert = copying one buffer.
    """

    fields: tuple[tuple[str, str, tuple[int, ...], torch.dtype, int], ...]
    nbytes: int  # padded size of one expert's buffer
    raw_nbytes: int  # the same tensors without padding (what a resident expert costs)

    @classmethod
    def of(cls, store: ResidentExperts) -> "ExpertLayout":
        fields, off, raw = [], 0, 0
        for mod, name, t in _expert_tensors(store):  # t: [E, *shape]
            nb = t[0].numel() * t.element_size()
            fields.append((mod, name, tuple(t.shape[1:]), t.dtype, off))
            off += -(-nb // ALIGN) * ALIGN
            raw += nb
        return cls(tuple(fields), off, raw)

    def views(self, buf: Tensor) -> dict[tuple[str, str], Tensor]:
        """buf uint8 [n, nbytes] -> {(module, buffer): [n, *shape]}, views sharing buf's storage."""
        n = buf.shape[0]
        out = {}
        for mod, name, shape, dtype, off in self.fields:
            nb = math.prod(shape) * dtype.itemsize
            out[mod, name] = buf[:, off:off + nb].view(dtype).view(n, *shape)
        return out


def _expert_tensors(store: ResidentExperts) -> list[tuple[str, str, Tensor]]:
    """(module, buffer name, the stacked tensor [E, ...]) for every tensor of a resident store."""
    if store.dense:
        return [("w13", "", store.w13), ("w2", "", store.w2)]
    return [(mod, name, t) for mod in ("w13", "w2") for name, t in getattr(store, mod).named_buffers()]


@dataclass
class CacheStats:
    hits: int = 0  # experts a forward found in a slot (prefetched or kept from before)
    misses: int = 0  # experts a forward had to copy in and wait for
    prefetches: int = 0  # experts copied ahead of use on the next layer's guess
    prefetch_hits: int = 0  # prefetched experts a forward then used
    bytes_copied: int = 0  # host -> device, demand and prefetch


def _copy_stream(device: torch.device):
    """One side stream per CUDA device for all host -> device expert copies."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _COPY_STREAMS:
        _COPY_STREAMS[idx] = torch.cuda.Stream(device=idx)
    return _COPY_STREAMS[idx]


_COPY_STREAMS: dict[int, object] = {}


class CachedExperts(ExpertStore):
    """A layer's E experts in host memory, served through `num_slots` < E device slots kept in LRU order.

    Host tier: one contiguous buffer per expert (a row of `host` [E, nbytes], pinned on CUDA: moving an expert is
    one `copy_(..., non_blocking=True)` on a side stream), or, on the CPU, the checkpoint's memory-mapped tensors
    copied field by field. Slots: `slots` uint8 [num_slots, nbytes]; `w13`/`w2` are QuantLinear stacks (or dense
    tensors) of views into them, so computing with the expert in slot s is `linear(x, self.w13, s)`.
    CUDA ordering: copy stream waits `_free[s]` (last compute reading slot s), records `_ready[s]`; compute waits
    `_ready[s]` before reading slot s and records `_free[s]` after. No synchronize(); one host sync per forward
    (this layer's expert ids and the next layer's guesses, fetched together by one `.tolist()`).
    """

    def __init__(self, layout: ExpertLayout, template: ResidentExperts, num_experts: int, num_slots: int, *,
                 device, backend: str, compute_dtype: torch.dtype, host: Tensor | None = None,
                 sources: list[list[tuple[str, str, tuple, Tensor]]] | None = None):  # fmt: skip
        super().__init__()
        if not 1 <= num_slots < num_experts:
            raise ValueError(f"CachedExperts needs 1 <= num_slots < num_experts ({num_experts}), got {num_slots}")
        if (host is None) == (sources is None):
            raise ValueError("CachedExperts needs exactly one host tier: a host buffer [E, nbytes] or sources")
        device = torch.device(device)
        self.layout, self.num_experts, self.num_slots = layout, num_experts, num_slots
        self.dense, self.ffn, self.hidden = template.dense, template.ffn, template.hidden
        self.host, self.sources = host, sources
        self.register_buffer("slots", torch.zeros(num_slots, layout.nbytes, dtype=torch.uint8, device=device),
                             persistent=False)  # fmt: skip
        views = layout.views(self.slots)
        if self.dense:
            self.register_buffer("w13", views["w13", ""], persistent=False)  # [k, 2, F, D]
            self.register_buffer("w2", views["w2", ""], persistent=False)  # [k, 1, D, F]
        else:
            for mod in ("w13", "w2"):
                t = getattr(template, mod)
                q = QuantLinear(t.fmt, t.out_features, t.in_features, (num_slots, *t.lead[1:]), t.blocksize,
                                t.double_quant, t.source_dtype, backend, compute_dtype)  # fmt: skip
                for name, _ in t.named_buffers():
                    q.register_buffer(name, views[mod, name], persistent=False)
                setattr(self, mod, q)
        self._views = views
        self.backend = backend
        # host-side nested offsets of every expert, so triton's NF4Weight views need no .item() sync
        self._offsets = None
        if not self.dense and template.w13.fmt == "nf4":
            self._offsets = [[float(o) for o in _expert_offsets(self, e)] for e in range(num_experts)]
        self.lru: OrderedDict[int, int] = OrderedDict()  # expert -> slot, least recently used first
        self.free = list(range(num_slots - 1, -1, -1))
        self.prefetched: set[int] = set()
        self.counts = CacheStats()
        # speculative prefetch into this layer only for forwards of at least this many tokens (see PREFETCH_MIN_TOKENS)
        self.prefetch_min_tokens = PREFETCH_MIN_TOKENS
        self._guess: Tensor | None = None
        self._next: tuple = ()  # (next layer's MoE,) when speculative prefetch is wired; a tuple: not a submodule
        self._cuda = device.type == "cuda"
        if self._cuda:
            self._stream = _copy_stream(device)
            self._ready = [torch.cuda.Event(enable_timing=False) for _ in range(num_slots)]
            self._free = [torch.cuda.Event(enable_timing=False) for _ in range(num_slots)]

    # ---- building ----------------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, reader, prefix: str, config: MixtralConfig, num_slots: int, *, device,
                        compute_dtype: torch.dtype, backend: str, host: str = "auto") -> "CachedExperts":  # fmt: skip
        """Experts `{prefix}.{e}.w1/w2/w3`. host: 'auto' (pinned buffers on CUDA, the mapped file on the CPU),
        'buffer' (one contiguous host buffer per expert, pinned on CUDA) or 'mapped' (copy from the checkpoint)."""
        E = config.num_local_experts
        template = _template(reader, prefix, compute_dtype)
        layout = ExpertLayout.of(template)
        sources = [_checkpoint_ops(reader, f"{prefix}.{e}", layout, template) for e in range(E)]
        dev = torch.device(device)
        if host == "auto":
            host = "buffer" if dev.type == "cuda" else "mapped"
        if host not in ("buffer", "mapped"):
            raise ValueError(f"host tier {host!r}: choose auto, buffer or mapped")
        if host == "mapped":
            return cls(layout, template, E, num_slots, device=dev, backend=backend, compute_dtype=compute_dtype,
                       sources=sources)  # fmt: skip
        buf = _host_buffer(E, layout, dev)
        hv = layout.views(buf)
        for e, ops in enumerate(sources):
            for mod, name, sub, t in ops:
                hv[mod, name][e][sub].copy_(t)
        return cls(layout, template, E, num_slots, device=dev, backend=backend, compute_dtype=compute_dtype,
                   host=buf)  # fmt: skip

    @classmethod
    def from_resident(cls, store: ResidentExperts, num_slots: int) -> "CachedExperts":
        """Move a resident store's experts to host buffers (pinned on CUDA), keeping `num_slots` on its device."""
        layout = ExpertLayout.of(store)
        tensors = _expert_tensors(store)
        dev = tensors[0][2].device
        buf = _host_buffer(store.num_experts, layout, dev)
        hv = layout.views(buf)
        for mod, name, t in tensors:
            hv[mod, name].copy_(t)  # [E, *shape] device -> host, once
        backend = "torch" if store.dense else store.w13.backend
        dtype = store.w13.dtype if store.dense else store.w13.compute_dtype
        return cls(layout, store, store.num_experts, num_slots, device=dev, backend=backend, compute_dtype=dtype,
                   host=buf)  # fmt: skip

    # ---- the cache -----------------------------------------------------------------------------------------
    def _copy_in(self, e: int, s: int) -> None:
        """Start copying expert e into slot s (asynchronous on CUDA)."""
        if self._cuda:
            self._stream.wait_event(self._free[s])  # the slot's previous expert is no longer being read
            with torch.cuda.stream(self._stream):
                self.slots[s].copy_(self.host[e], non_blocking=True)
                self._ready[s].record(self._stream)
        elif self.host is not None:
            self.slots[s].copy_(self.host[e])
        else:
            for mod, name, sub, t in self.sources[e]:
                self._views[mod, name][s][sub].copy_(t)
        self.counts.bytes_copied += self.layout.nbytes

    def _acquire(self, e: int, protected: set[int]) -> int | None:
        """A slot for expert e (copy started): a free one, else the least recently used one not in `protected`."""
        if self.free:
            s = self.free.pop()
        else:
            victim = next((v for v in self.lru if v not in protected), None)
            if victim is None:
                return None
            s = self.lru.pop(victim)
            self.prefetched.discard(victim)
        self._copy_in(e, s)
        self.lru[e] = s
        return s

    def _on_device(self, needed: list[int]) -> Iterator[tuple[int, int]]:
        """Yield (expert, slot) for every expert in `needed`, those already in a slot first while the others are
        copied; an expert stays protected from eviction until the caller has computed with it (the next step)."""
        protected = set(needed)
        ready, todo = [], []
        for e in needed:
            if e in self.lru:
                self.lru.move_to_end(e)
                self.counts.hits += 1
                if e in self.prefetched:
                    self.counts.prefetch_hits += 1
                    self.prefetched.discard(e)
                ready.append((e, self.lru[e]))
            else:
                self.counts.misses += 1
                todo.append(e)
        loading: list[tuple[int, int]] = []
        while todo and (s := self._acquire(todo[0], protected)) is not None:
            loading.append((todo.pop(0), s))
        for e, s in ready + loading:
            yield from self._use(e, s, protected)
        # fewer slots than experts needed: each computed expert frees its slot for the next one
        while todo:
            e = todo.pop(0)
            s = self._acquire(e, protected)
            yield from self._use(e, s, protected)

    def _use(self, e: int, s: int, protected: set[int]) -> Iterator[tuple[int, int]]:
        if self._cuda:
            torch.cuda.current_stream().wait_event(self._ready[s])
        yield e, s
        if self._cuda:
            self._free[s].record(torch.cuda.current_stream())
        protected.discard(e)

    def _prefetch(self, guess: list[int]) -> None:
        """Copy the most frequently guessed experts (at most num_slots; -1 = no guess) into slots ahead of this
        layer's forward."""
        guessed = [e for e, _ in Counter(g for g in guess if g >= 0).most_common(self.num_slots)]
        protected = set(guessed)  # a guessed expert already in a slot is not evicted for another guess
        for e in (e for e in guessed if e not in self.lru):
            if self._acquire(e, protected) is None:
                break
            self.prefetched.add(e)
            self.counts.prefetches += 1

    def prefetch(self, topk_ids: Tensor) -> None:
        if topk_ids.shape[0] >= self.prefetch_min_tokens:
            self._prefetch(topk_ids.reshape(-1).tolist())  # a host sync; the wired path (speculate) avoids it

    def speculate(self, x: Tensor) -> None:
        """The MoE's lookahead: the next layer's router on this layer's MoE input x [T, D] (no sync here; the ids
        go to the host with this layer's own in one transfer, and the copies start after this layer's misses)."""
        if x.shape[0] >= self._next[0].experts.prefetch_min_tokens:
            self._guess = self._next[0].route(x)[0]  # [T, A]

    def stats(self) -> dict:
        return {**asdict(self.counts), "slots": self.num_slots}

    def reset_stats(self) -> None:
        self.counts = CacheStats()

    # ---- compute --------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, topk_ids: Tensor, topk_weights: Tensor) -> Tensor:
        T, A = topk_ids.shape
        flat = topk_ids.reshape(-1)  # [T*A]
        guess, self._guess = self._guess, None
        # the one host sync of this layer: its own expert ids and the next layer's guesses together
        ids = (torch.cat((flat, guess.reshape(-1))) if guess is not None else flat).tolist()
        own = ids[: T * A]
        counts = Counter(own)
        order = torch.argsort(flat, stable=True)  # pairs grouped by expert, experts ascending
        tok = order // A  # [T*A] token of each sorted pair
        xs = x[tok]  # [T*A, D]
        ys = torch.empty_like(xs)
        start, starts = 0, {}
        for e in sorted(counts):
            starts[e] = start
            start += counts[e]
        steps = self._on_device(list(counts))
        if guess is not None:  # issue the next layer's copies behind this layer's misses
            first = next(steps)
            self._next[0].experts._prefetch(ids[T * A:])
            steps = itertools.chain([first], steps)
        for e, s in steps:
            a, c = starts[e], counts[e]
            h = self._expert_linear(xs[a:a + c], e, s, "w13").view(c, 2, self.ffn)  # [c, 2, F]
            ys[a:a + c] = self._expert_linear(F.silu(h[:, 0]) * h[:, 1], e, s, "w2")  # [c, D]
        ys = ys * topk_weights.reshape(-1)[order, None].to(ys.dtype)
        return torch.zeros_like(x).index_add_(0, tok, ys)  # [T, D]

    def _expert_linear(self, x: Tensor, e: int, s: int, which: str) -> Tensor:
        """x [c, in] through expert e's w13 ([c, 2F]) or w2 ([c, D]), the expert sitting in slot s."""
        w = getattr(self, which)
        if self.dense:
            return F.linear(x, w[s].reshape(-1, w.shape[-1]))
        if self.backend == "triton" and w.fmt == "nf4":  # NF4Weight views with the offset known on the host
            from .kernels import nf4_matmul

            j0 = 0 if which == "w13" else 2
            outs = [nf4_matmul(x, _nf4_view(w, s, j, self._offsets[e][j0 + j])) for j in range(w.lead[1])]
            return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return linear(x, w, s)


def _nf4_view(w: QuantLinear, s: int, j: int, offset: float) -> NF4Weight:
    return NF4Weight(packed=w.weight[s, j], absmax=w.absmax[s, j], quant_map=w.quant_map[s, j],
                     nested_absmax=w.nested_absmax[s, j] if w.double_quant else None,
                     nested_quant_map=w.nested_quant_map[s, j] if w.double_quant else None, offset=offset,
                     shape=(w.out_features, w.in_features), blocksize=w.blocksize, nested_blocksize=NESTED_BLOCKSIZE,
                     dtype=w.source_dtype)  # fmt: skip


def _expert_offsets(store: CachedExperts, e: int) -> list[float]:
    """Expert e's nested offsets (w1, w3, w2) read from its host tier."""
    if store.host is not None:
        v = store.layout.views(store.host[e:e + 1])
        return v["w13", "offset"][0].tolist() + v["w2", "offset"][0].tolist()
    ops = {(mod, sub): t for mod, name, sub, t in store.sources[e] if name == "offset"}
    return [float(ops["w13", (0,)]), float(ops["w13", (1,)]), float(ops["w2", (0,)])]


def _host_buffer(E: int, layout: ExpertLayout, device: torch.device) -> Tensor:
    """uint8 [E, nbytes]: one contiguous row per expert, pinned when the compute device is CUDA."""
    return torch.zeros(E, layout.nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")


def _template(reader, prefix: str, compute_dtype: torch.dtype) -> ResidentExperts:
    """A one-expert ResidentExperts on the CPU built from expert 0: the shapes, dtypes and format of every expert."""
    parts = {n: _module(reader, f"{prefix}.0.{n}") for n in ("w1", "w3", "w2")}
    if "SCB" in parts["w1"] or any(k.startswith("weight.") for k in parts["w1"]):
        kw = dict(device="cpu", backend="torch", compute_dtype=compute_dtype)
        return ResidentExperts(QuantLinear.from_tensors([parts["w1"], parts["w3"]], (1, 2), name=prefix, **kw),
                               QuantLinear.from_tensors([parts["w2"]], (1, 1), name=prefix, **kw))  # fmt: skip
    Fi, D = parts["w1"]["weight"].shape
    return ResidentExperts(torch.empty(1, 2, Fi, D, dtype=compute_dtype), torch.empty(1, 1, D, Fi, dtype=compute_dtype))


def _checkpoint_ops(reader, prefix: str, layout: ExpertLayout, template: ResidentExperts) -> list[tuple]:
    """The copies that assemble expert `prefix` (…experts.e) from the checkpoint's (memory-mapped) tensors:
    (module, buffer, index within the field, source tensor)."""
    shapes = {(mod, name): shape for mod, name, shape, _, _ in layout.fields}
    ops = []
    for mod, sub, part in (("w13", (0,), "w1"), ("w13", (1,), "w3"), ("w2", (0,), "w2")):
        tensors = _module(reader, f"{prefix}.{part}")
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
                raise KeyError(f"{prefix}: tensor {name or 'weight'!r} of {'w2' if mod == 'w2' else ('w1', 'w3')[j]} "
                               "is missing")  # fmt: skip
    return ops


# ---- placement: how many slots each layer gets under a budget ---------------------------------------------------


@dataclass
class Placement:
    """The compute-device budget split: what must stay resident, what is reserved, and slots per layer."""

    budget: int
    resident_bytes: int  # embeddings, lm_head, attention, norms, routers, rotary table
    kv_cache_bytes: int  # reserved for `context` tokens at batch 1
    workspace_bytes: int  # transient activations, logits, dequantized weights (+ the CUDA context)
    expert_bytes: int  # one resident expert
    slot_bytes: int  # one slot (the expert's buffer, padded)
    slots: list[int]  # per layer; == num_experts: the layer is resident
    num_experts: int
    context: int

    @property
    def fixed_bytes(self) -> int:
        return self.resident_bytes + self.kv_cache_bytes + self.workspace_bytes

    @property
    def expert_slot_bytes(self) -> int:
        """Bytes the experts take on the device under this placement."""
        E = self.num_experts
        return sum(E * self.expert_bytes if k >= E else k * self.slot_bytes for k in self.slots)

    @property
    def device_bytes(self) -> int:
        """The most the tracked tensors (parameters, buffers, slots, KV cache) hold on the device."""
        return self.resident_bytes + self.kv_cache_bytes + self.expert_slot_bytes

    def describe(self) -> str:
        E, ks = self.num_experts, self.slots
        if min(ks) >= E:
            return f"all {E} experts of every layer resident"
        lo, hi = min(ks), max(ks)
        extra = "" if lo == hi else f" ({sum(k == hi for k in ks)} layers, from layer 0, get {hi})"
        return (f"{lo} of {E} experts per layer in device slots{extra}, the rest in host memory; "
                f"{_size(self.device_bytes)} tracked on the device (+{_size(self.workspace_bytes)} workspace)")


def default_context(config: MixtralConfig) -> int:
    """Tokens of KV cache and prefill workspace an offloaded model reserves (batch 1): the plan's default, 4096."""
    return min(config.max_position_embeddings, 4096)


def place_experts(reader, device, compute_dtype: torch.dtype, budget: int, context: int | None = None) -> Placement:
    """Spread the experts that fit in `budget` evenly over the layers (the remainder to the lowest layers: layer 0
    has no speculative prefetch, so its misses stall). From the checkpoint's headers only: nothing is allocated.
    Raises ValueError when the budget is below the resident part plus one slot per layer."""
    dev = torch.device(device)
    key = (str(dev), compute_dtype, budget, context)
    cache = reader.__dict__.setdefault("_expert_placements", {})  # load_block asks once per layer
    if key not in cache:
        config = reader.config
        context = context or default_context(config)
        layout = ExpertLayout.of(_template(reader, "model.layers.0.block_sparse_moe.experts", compute_dtype))
        cache[key] = _place(config, budget, _resident_checkpoint_bytes(reader, compute_dtype),
                            layout.raw_nbytes, layout.nbytes, dev, compute_dtype, context)  # fmt: skip
    return cache[key]


def _place(config: MixtralConfig, budget: int, resident: int, expert: int, slot: int, device: torch.device,
           dtype: torch.dtype, context: int) -> Placement:  # fmt: skip
    L, E = config.num_hidden_layers, config.num_local_experts
    # as model.KVCache allocates it: every position up to `context` (the sliding window does not shrink it)
    kv = 2 * L * context * config.num_key_value_heads * config.head_dim * dtype.itemsize
    work = plan.workspace_bytes(config, context, 1) - (0 if device.type == "cuda" else plan.CUDA_CONTEXT_BYTES)
    p = Placement(budget, resident, kv, work, expert, slot, [E] * L, E, context)
    avail = budget - p.fixed_bytes
    if avail >= L * E * expert:
        return p
    need = p.fixed_bytes + L * slot
    if avail < L * slot:
        raise ValueError(
            f"max_memory={_size(budget)} is below the {_size(need)} ({need:,} bytes) that must stay on {device.type} "
            f"(embeddings, lm_head, attention, norms, routers: {_size(resident)}; KV cache at {context} tokens: "
            f"{_size(kv)}; workspace: {_size(work)}; 1 expert slot per layer: {_size(L * slot)}); "
            f"use at least max_memory={math.ceil(need / 2**20)}MiB"
        )  # fmt: skip
    n = min(avail // slot, L * E)
    p.slots = [min(E, n // L + (i < n % L)) for i in range(L)]
    return p


def _resident_checkpoint_bytes(reader, dtype: torch.dtype) -> int:
    """Bytes the loader puts on the device for everything but the experts, from the checkpoint's headers: packed
    tensors as stored (the nf4 JSON replaced by a float32 offset), full-precision ones in the compute dtype."""
    total = 0
    for prefix, keys in reader.modules_index().items():
        if ".block_sparse_moe.experts." in prefix + ".":
            continue
        rels = {k[len(prefix) + 1:] for k in keys}
        if f"weight.{QUANT_STATE_KEY}" in rels or "SCB" in rels:
            total += sum(reader.nbytes(k) for k in keys if not k.endswith(QUANT_STATE_KEY))
            total += 4 if "SCB" not in rels else 0
        else:
            total += sum(math.prod(reader.info(k)[1]) * dtype.itemsize for k in keys)
    return total + reader.config.head_dim // 2 * 4  # + the rotary inv_freq buffer (fp32); a tied lm_head is free


def _size(n: int) -> str:
    for unit, k in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 2**k:
            return f"{n / 2**k:.1f} {unit}"
    return f"{n} B"


def wire_prefetch(model) -> None:
    """Speculative loading (Eliseev & Mazur 2023): while layer i runs, layer i+1's router applied to layer i's MoE
    input picks the experts to copy into layer i+1's slots."""
    moes = [layer.block_sparse_moe for layer in model.layers]
    for moe, nxt in zip(moes, moes[1:]):
        if not isinstance(nxt.experts, CachedExperts):
            continue
        if isinstance(moe.experts, CachedExperts):
            moe.experts._next = (nxt,)
            moe.lookahead = moe.experts.speculate
        else:  # a resident layer before an offloaded one: its own sync, copies start before its compute
            moe.lookahead = nxt.prefetch


def set_prefetch(model, min_tokens: int) -> None:
    """Speculative prefetch for forwards of at least `min_tokens` tokens in every offloaded layer (1: always;
    a huge number: never)."""
    for layer in model.layers:
        if isinstance(layer.block_sparse_moe.experts, CachedExperts):
            layer.block_sparse_moe.experts.prefetch_min_tokens = min_tokens


def layer_stats(model) -> list[dict]:
    """Per-layer offload statistics ({} for resident layers)."""
    return [layer.block_sparse_moe.experts.stats() for layer in model.layers]


def offload_model(model, max_memory: int | str | None = None, context: int | None = None,
                  slots_per_layer: int | None = None) -> Placement:  # fmt: skip
    """Offload an already built model (all experts resident on its device) to fit `max_memory`: layers that do not
    keep all their experts get a CachedExperts with host copies (pinned on CUDA) and their share of slots.
    `slots_per_layer` instead of a budget: that many slots in every layer (for benchmarks of small models)."""
    if (max_memory is None) == (slots_per_layer is None):
        raise ValueError("offload_model needs max_memory (a budget) or slots_per_layer, not both")
    budget = parse_max_memory(max_memory) if max_memory is not None else 0
    stores = [layer.block_sparse_moe.experts for layer in model.layers]
    if not all(isinstance(s, ResidentExperts) for s in stores):
        raise ValueError("offload_model needs a model whose experts are all resident (load it without max_memory)")
    kv = {id(t) for layer in model.layers if layer.self_attn.kv_cache is not None
          for t in layer.self_attn.kv_cache.buffers()}  # fmt: skip
    expert_ids = {id(t) for s in stores for t in s.buffers()}
    seen = [t for t in list(model.parameters()) + list(model.buffers()) if id(t) not in kv and id(t) not in expert_ids]
    resident = tracked_bytes(_Holder(seen))
    layout = ExpertLayout.of(stores[0])
    context = context or max(model.max_seq_length, default_context(model.config))
    if slots_per_layer is not None:
        E, L = model.config.num_local_experts, model.config.num_hidden_layers
        if not 1 <= slots_per_layer < E:
            raise ValueError(f"slots_per_layer must be in 1..{E - 1} (fewer than the {E} experts), "
                             f"got {slots_per_layer}")  # fmt: skip
        budget = resident + (1 << 62)  # only to build the Placement record; the slots are given
        p = _place(model.config, budget, resident, layout.raw_nbytes, layout.nbytes, model.device, model.dtype, context)
        p.slots, p.budget = [slots_per_layer] * L, p.device_bytes + p.workspace_bytes
    else:
        p = _place(model.config, budget, resident, layout.raw_nbytes, layout.nbytes, model.device, model.dtype,
                   context)  # fmt: skip
    for layer, k in zip(model.layers, p.slots):
        if k < model.config.num_local_experts:
            layer.block_sparse_moe.experts = CachedExperts.from_resident(layer.block_sparse_moe.experts, k)
    wire_prefetch(model)
    log.info("offload_model under %s: %s", _size(p.budget), p.describe())
    return p


class _Holder(nn.Module):
    """Holds a list of tensors as buffers so loader.tracked_bytes can count their distinct storages."""

    def __init__(self, tensors: list[Tensor]):
        super().__init__()
        for i, t in enumerate(tensors):
            self.register_buffer(f"t{i}", t, persistent=False)
