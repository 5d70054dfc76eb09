"""An offloaded layer: its experts in host memory (host.py), `num_slots` of them on the device in one slot buffer
laid out like ResidentExperts' stacks, an LRU over the slots (slots.py), and the resident computation over the slot
stack with the ids mapped through a device slot table (`slot_of[topk_ids]`): the arithmetic is the resident one.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from torch import Tensor

from ..config import MixtralConfig
from ..memory import SLOT_TABLE_ITEMSIZE
from .experts import ExpertStore, ResidentExperts
from .host import ExpertLayout, Transfers, checkpoint_ops, host_buffer, template
from .slots import CacheStats, SlotCache, rounds

# Speculative prefetch pays when a layer's compute can hide a copy and the guesses are nearly sure: prefill and
# batches. At batch-1 decode over PCIe a wrong guess costs a whole copy (~3.6 ms for a Mixtral NF4 expert at
# 25 GB/s) to save at most one layer's compute (~0.4 ms): evals/offload_sim.py projects the plain LRU faster than
# LRU + prefetch at batch 1 (evals/RESULTS.md). Set it to 1 to prefetch at every step.
PREFETCH_MIN_TOKENS = 8


class CachedExperts(ExpertStore):
    """A layer's E experts in host memory, served through `num_slots` < E device slots kept in LRU order.

    Host tier: one row per expert of `host` [E, nbytes] (page-locked on CUDA: moving an expert is one
    `copy_(..., non_blocking=True)` on a side stream), or, on the CPU, the checkpoint's memory-mapped tensors copied
    field by field. Slots: `slots` uint8 [num_slots, nbytes]; `compute` is a ResidentExperts whose stacks are views
    of them, run with `slot_of[topk_ids]`. One host sync per forward: this layer's expert ids and the next layer's
    guesses, fetched together by one `.tolist()`.
    """

    def __init__(self, layout: ExpertLayout, template: ResidentExperts, num_experts: int, num_slots: int, *,
                 device, backend: str, compute_dtype: torch.dtype, host: Tensor | None = None,
                 sources: list | None = None, pinned_bytes: int = 0, standard_maps: bool = False):  # fmt: skip
        super().__init__()
        if not 1 <= num_slots < num_experts:
            raise ValueError(f"CachedExperts needs 1 <= num_slots < num_experts ({num_experts}), got {num_slots}")
        if (host is None) == (sources is None):
            raise ValueError("CachedExperts needs either host buffers or checkpoint sources")
        device = torch.device(device)
        self.layout, self.num_experts, self.num_slots = layout, num_experts, num_slots
        self.dense, self.ffn, self.hidden = template.dense, template.ffn, template.hidden
        self.host, self.sources, self.pinned_bytes = host, sources, pinned_bytes
        self.backend = backend
        self.register_buffer("slots", torch.zeros(num_slots, layout.nbytes, dtype=torch.uint8, device=device),
                             persistent=False)  # fmt: skip
        self.register_buffer("slot_of", torch.zeros(num_experts, dtype=torch.int64, device=device), persistent=False)
        assert self.slot_of.element_size() == SLOT_TABLE_ITEMSIZE  # what memory.place reserves
        self.transfers = Transfers(self.slots, layout, host, sources)
        self.compute = ResidentExperts.over(template, self.transfers.views, num_slots, backend=backend,
                                            compute_dtype=compute_dtype, route_experts=num_experts,
                                            standard_maps=standard_maps)  # fmt: skip
        self.cache = SlotCache(num_slots)
        # speculative prefetch into this layer only for forwards of at least this many tokens (PREFETCH_MIN_TOKENS)
        self.prefetch_min_tokens = PREFETCH_MIN_TOKENS
        self._guess: Tensor | None = None
        self._next: tuple = ()  # (next layer's MoE,) when speculative prefetch is wired; a tuple: not a submodule
        self._dirty = False  # slots rewritten since the kernel stack's offsets were read

    @property
    def w13(self):
        return self.compute.w13

    @property
    def w2(self):
        return self.compute.w2

    @property
    def lru(self):
        return self.cache.lru

    @property
    def counts(self) -> CacheStats:
        return self.cache.counts

    # ---- building ----------------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, reader, prefix: str, config: MixtralConfig, num_slots: int, *, device,
                        compute_dtype: torch.dtype, backend: str, host: str = "auto") -> "CachedExperts":  # fmt: skip
        """Experts `{prefix}.{e}.w1/w2/w3`. host: 'auto' (page-locked buffers on CUDA, the mapped file on the CPU),
        'buffer' (one contiguous host row per expert, page-locked on CUDA) or 'mapped' (copy from the checkpoint;
        CPU only)."""
        dev = torch.device(device)
        if host == "auto":
            host = "buffer" if dev.type == "cuda" else "mapped"
        if host not in ("buffer", "mapped"):
            raise ValueError(f"host tier {host!r}: choose auto, buffer or mapped")
        if host == "mapped" and dev.type == "cuda":
            raise ValueError("host='mapped' copies from the memory-mapped checkpoint and runs on the CPU only; "
                             "use host='buffer' (pinned host memory) on CUDA")  # fmt: skip
        E = config.num_local_experts
        tmpl = template(reader, prefix, compute_dtype)
        layout = ExpertLayout.of(tmpl)
        sources = [checkpoint_ops(reader, f"{prefix}.{e}", layout, tmpl) for e in range(E)]
        standard = _standard_maps(tmpl, [{(m, n, sub): t for m, n, sub, t in ops} for ops in sources])
        kw = dict(device=dev, backend=backend, compute_dtype=compute_dtype, standard_maps=standard)
        if host == "mapped":
            return cls(layout, tmpl, E, num_slots, sources=sources, **kw)
        buf, pinned = host_buffer(E, layout, dev)
        hv = layout.views(buf)
        for e, ops in enumerate(sources):
            for mod, name, sub, t in ops:
                hv[mod, name][e][sub].copy_(t)
        return cls(layout, tmpl, E, num_slots, host=buf, pinned_bytes=pinned, **kw)

    @classmethod
    def from_resident(cls, store: ResidentExperts, num_slots: int) -> "CachedExperts":
        """Move a resident store's experts to host rows (page-locked on CUDA), keeping `num_slots` on its device."""
        layout = ExpertLayout.of(store)
        tensors = store.stacked_tensors()
        dev = tensors[0][2].device
        buf, pinned = host_buffer(store.num_experts, layout, dev)
        hv = layout.views(buf)
        for mod, name, t in tensors:
            hv[mod, name].copy_(t)  # [E, *shape] device -> host, once
        backend = "torch" if store.dense else store.w13.backend
        dtype = store.w13.dtype if store.dense else store.w13.compute_dtype
        standard = not store.dense and store.w13.fmt == "nf4" and store.w13.standard_maps
        return cls(layout, store, store.num_experts, num_slots, device=dev, backend=backend, compute_dtype=dtype,
                   host=buf, pinned_bytes=pinned, standard_maps=standard)  # fmt: skip

    # ---- the cache -----------------------------------------------------------------------------------------
    def _copy(self, copies: list[tuple[int, int]]) -> None:
        """Start the copies the policy asked for and point the slot table at them (device writes, no sync)."""
        for e, s in copies:
            self.transfers.copy(e, s)
            self.slot_of[e] = s
            self.counts.bytes_copied += self.layout.nbytes
            self._dirty = True

    def _prefetch(self, guess: list[int]) -> None:
        """Copy the most frequently guessed experts (-1 = no guess) into slots ahead of this layer's forward."""
        self._copy(self.cache.prefetch(guess))

    def prefetch(self, topk_ids: Tensor) -> None:
        if topk_ids.shape[0] >= self.prefetch_min_tokens:
            self._prefetch(topk_ids.reshape(-1).tolist())  # a host sync; the wired path (speculate) avoids it

    def speculate(self, x: Tensor) -> None:
        """The MoE's lookahead: the next layer's router on this layer's MoE input x [T, D] (no sync here; the ids
        go to the host with this layer's own in one transfer, and the copies start after this layer's misses)."""
        if x.shape[0] >= self._next[0].experts.prefetch_min_tokens:
            self._guess = self._next[0].route(x)[0]  # [T, A]

    def stats(self) -> dict:
        return {**asdict(self.counts), "slots": self.num_slots, "pinned_bytes": self.pinned_bytes}

    def reset_stats(self) -> None:
        self.cache.counts = CacheStats()

    # ---- compute --------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, topk_ids: Tensor, topk_weights: Tensor) -> Tensor:
        T, A = topk_ids.shape
        flat = topk_ids.reshape(-1)  # [T*A]
        guess, self._guess = self._guess, None
        # the one host sync of this layer: its own expert ids and the next layer's guesses together
        ids = (torch.cat((flat, guess.reshape(-1))) if guess is not None else flat).tolist()
        own, guessed = ids[:T * A], ids[T * A:]
        needed = list(dict.fromkeys(own))
        after_misses = (lambda: self._next[0].experts._prefetch(guessed)) if guess is not None else None
        if len(needed) <= self.num_slots:  # the usual case (decode, small batches): one call over the slot stack
            return self._run(x, topk_ids, topk_weights, self.cache.load(needed), needed, after_misses)
        per_token = [own[t * A:(t + 1) * A] for t in range(T)]
        if not self.compute.fused or max(len(set(es)) for es in per_token) > self.num_slots:
            # expert by expert through the resident grouped path, each copied in as it is reached
            return self.compute.grouped(x, topk_ids, topk_weights, self._schedule(needed, after_misses))
        # the fused kernel: rounds of whole tokens whose experts fit in the slots together
        out = None
        for experts, tokens in rounds(per_token, self.num_slots):
            y = self._run(x, topk_ids, topk_weights, self.cache.load(experts), experts, after_misses)
            after_misses = None
            if out is None:
                out = y
            else:
                mask = torch.zeros(T, 1, dtype=torch.bool)
                mask[tokens] = True
                out = torch.where(mask.to(x.device, non_blocking=True), y, out)
        return out

    def _run(self, x: Tensor, topk_ids: Tensor, topk_weights: Tensor, copies: list, experts: list[int],
             after_misses) -> Tensor:  # fmt: skip
        """The resident computation over the slot stack, once `experts` are in their slots."""
        self._copy(copies)
        if after_misses is not None:  # the next layer's speculative copies queue behind this layer's misses
            after_misses()
        used = [self.cache.slot(e) for e in experts]
        self.transfers.wait(used)
        if self._dirty:  # rows rewritten since the last compute (demand or prefetch copies)
            self.compute.refresh_offsets()
            self._dirty = False
        out = self.compute(x, self.slot_of[topk_ids], topk_weights)
        self.transfers.release(used)
        return out

    def _schedule(self, needed: list[int], after_misses):
        """(expert, slot) for the grouped path, from the policy's stream: each copied in just before use."""
        for i, (e, s, copy) in enumerate(self.cache.stream(needed)):
            if copy:
                self._copy([(e, s)])
            if i == 0 and after_misses is not None:
                after_misses()
            self.transfers.wait([s])
            yield e, s
            self.transfers.release([s])


def _standard_maps(tmpl: ResidentExperts, experts: list[dict]) -> bool:
    """nf4: every expert's quant maps are the standard ones (then the decoder shares one table)."""
    if tmpl.dense or tmpl.w13.fmt != "nf4" or not tmpl.w13.standard_maps:
        return False
    ref = {k: t for k, t in experts[0].items() if k[1] in ("quant_map", "nested_quant_map")}  # (stack, buffer, sub)
    return all(torch.equal(ops[k], t) for ops in experts[1:] for k, t in ref.items())
