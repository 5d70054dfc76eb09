"""Expert stores: where a layer's experts live and how `sum_k w_k * expert_k(x)` is computed over them.

The model's MoE routes; a store computes. One job per file: `experts` (ResidentExperts, the stacks and the one
computation), `slots` (the LRU policy, shared with evals/offload_sim.py), `host` (host rows, page-locked buffers,
the copy stream and events), `cached` (CachedExperts: the three together), `prefetch` (speculative copies). Here:
choosing a layer's store from a placement (memory.place) and offloading a model already built.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .. import memory
from ..config import MixtralConfig
from ..devices import parse_max_memory, tracked_bytes
from .cached import PREFETCH_MIN_TOKENS, CachedExperts
from .experts import ExpertStore, ResidentExperts
from .host import ExpertLayout
from .prefetch import set_prefetch, wire_prefetch
from .slots import CacheStats, SlotCache

__all__ = ["ExpertStore", "ResidentExperts", "CachedExperts", "ExpertLayout", "SlotCache", "CacheStats",
           "PREFETCH_MIN_TOKENS", "make_expert_store", "offload_model", "wire_prefetch", "set_prefetch",
           "layer_stats"]  # fmt: skip

log = logging.getLogger(__name__)


def make_expert_store(reader, config: MixtralConfig, layer_idx: int, *, device, compute_dtype: torch.dtype,
                      backend: str, slots: int | None = None) -> ExpertStore:  # fmt: skip
    """A layer's store: resident when `slots` is None or covers every expert (see memory.place), else
    CachedExperts with that many slots."""
    prefix = f"model.layers.{layer_idx}.block_sparse_moe.experts"
    if slots is None or slots >= config.num_local_experts:
        return ResidentExperts.from_checkpoint(reader, prefix, config, device=device, compute_dtype=compute_dtype,
                                               backend=backend)  # fmt: skip
    return CachedExperts.from_checkpoint(reader, prefix, config, slots, device=device, compute_dtype=compute_dtype,
                                         backend=backend)  # fmt: skip


def layer_stats(model) -> list[dict]:
    """Per-layer offload statistics ({} for resident layers)."""
    return [layer.block_sparse_moe.experts.stats() for layer in model.layers]


def offload_model(model, max_memory: int | str | None = None, context: int | None = None,
                  slots_per_layer: int | None = None, batch: int = 1) -> memory.Placement:  # fmt: skip
    """Offload an already built model (all experts resident on its device) to fit `max_memory` with a KV cache and
    workspace for `context` tokens x `batch`: layers that do not keep all their experts get a CachedExperts with
    host rows (page-locked on CUDA) and their share of slots (memory.place). `slots_per_layer` instead of a
    budget: that many slots in every layer (for benchmarks of small models)."""
    if (max_memory is None) == (slots_per_layer is None):
        raise ValueError("offload_model needs max_memory (a budget) or slots_per_layer, not both")
    budget = parse_max_memory(max_memory) if max_memory is not None else None
    stores = [layer.block_sparse_moe.experts for layer in model.layers]
    if not all(isinstance(s, ResidentExperts) for s in stores):
        raise ValueError("offload_model needs a model whose experts are all resident (load it without max_memory)")
    config = model.config
    E, L = config.num_local_experts, config.num_hidden_layers
    if slots_per_layer is not None and not 1 <= slots_per_layer < E:
        raise ValueError(f"slots_per_layer must be in 1..{E - 1} (fewer than the {E} experts), got {slots_per_layer}")
    # the footprint of the model as built: its tensors (no KV cache) and its experts' layout
    kv = {id(t) for layer in model.layers if layer.self_attn.kv_cache is not None
          for t in layer.self_attn.kv_cache.buffers()}  # fmt: skip
    expert_ids = {id(t) for s in stores for t in s.buffers()}
    rest = [t for t in list(model.parameters()) + list(model.buffers()) if id(t) not in kv and id(t) not in expert_ids]
    layout = ExpertLayout.of(stores[0])
    fp = memory.Footprint({"resident": tracked_bytes(_Holder(rest)), "experts": L * E * layout.raw_nbytes}, {},
                          layout.raw_nbytes, layout.nbytes)  # fmt: skip
    context = context or max(model.max_seq_length, memory.default_context(config))
    kw = dict(context=context, batch=batch, dtype=model.dtype, device_type=model.device.type)
    if slots_per_layer is not None:
        p = memory.place(fp, config, None, **kw)
        p.slots = [slots_per_layer] * L
        p.budget = p.device_bytes + p.workspace_bytes
    else:
        p = memory.place(fp, config, budget, **kw)
    for layer, k in zip(model.layers, p.slots):
        if k < E:
            layer.block_sparse_moe.experts = CachedExperts.from_resident(layer.block_sparse_moe.experts, k)
    wire_prefetch(model)
    log.info("offload_model under %s: %s", memory.size_str(p.budget), p.describe())
    return p


class _Holder(nn.Module):
    """Holds a list of tensors as buffers so memory.tracked_bytes can count their distinct storages."""

    def __init__(self, tensors: list):
        super().__init__()
        for i, t in enumerate(tensors):
            self.register_buffer(f"t{i}", t, persistent=False)
