"""Memory arithmetic from a config and a recipe: weight bytes per tensor class, KV cache, workspace, and, when a
GPU budget is given, whether it fits and how many experts per layer must then live in host memory.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from . import formats
from .checkpoint import expected_shapes, tensor_class
from .config import MixtralConfig
from .devices import parse_size
from .formats import recipe

CUDA_CONTEXT_BYTES = 500 * 2**20  # CUDA context + the allocator's slack, measured ~0.4-0.6 GB on recent drivers


@dataclass
class Plan:
    weights_bytes: int
    class_bytes: dict[str, int]  # attention, experts, router, embeddings, lm_head, norms
    class_params: dict[str, int]
    kv_cache_bytes: int
    workspace_bytes: int
    total_bytes: int
    gpu_memory: int | None
    fits: bool | None  # None when no GPU budget was given
    offload: dict = field(default_factory=dict)
    formats: dict[str, str] = field(default_factory=dict)
    context: int = 4096
    batch: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


def _class_shapes(config: MixtralConfig) -> dict[str, list[tuple[int, ...]]]:
    out: dict[str, list[tuple[int, ...]]] = {}
    for name, shape in expected_shapes(config).items():
        out.setdefault(tensor_class(name), []).append(shape)
    return out


def class_bytes(config: MixtralConfig, fmts: dict[str, str], blocksize: int = 64, double_quant: bool = True,
                source_dtype: torch.dtype | None = None,
                group_size: int = formats.INT4_GROUP_SIZE) -> tuple[dict[str, int], dict[str, int]]:
    """(bytes per class, params per class) once loaded: quantized classes by formats.loaded_nbytes (the stored bytes,
    but int4 scales in fp32), the rest in the source dtype."""
    itemsize = (source_dtype or config.torch_dtype).itemsize
    nbytes, params = {}, {}
    for cls, shapes in _class_shapes(config).items():
        fmt = fmts.get(cls)
        nbytes[cls] = sum(formats.loaded_nbytes(fmt, s, blocksize, double_quant, group_size) if fmt
                          else math.prod(s) * itemsize
                          for s in shapes)
        params[cls] = sum(math.prod(s) for s in shapes)
    return nbytes, params


def expert_bytes(config: MixtralConfig, fmt: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                 group_size: int = formats.INT4_GROUP_SIZE) -> int:
    """Bytes of one expert's w1 + w2 + w3 in `fmt`."""
    D, F = config.hidden_size, config.intermediate_size
    return sum(formats.loaded_nbytes(fmt, s, blocksize, double_quant, group_size) for s in ((F, D), (D, F), (F, D)))


def kv_cache_bytes(config: MixtralConfig, context: int = 4096, batch: int = 1,
                   kv_dtype: torch.dtype = torch.bfloat16) -> int:
    """K and V for every layer, preallocated at `context` positions. The model's KVCache keeps every position even
    with a sliding window (the window is a mask), so no cap here."""
    positions = context
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * kv_dtype.itemsize
    return batch * positions * per_token


def workspace_bytes(config: MixtralConfig, context: int = 4096, batch: int = 1) -> int:
    """Transient memory: the CUDA context, two dequantized expert matrices (bf16, for the torch path), the
    activations of a full-context prefill (bf16) and fp32 logits for every position (perplexity needs them)."""
    D, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    q = config.num_attention_heads * config.head_dim
    tokens = batch * context
    dequant = 2 * F * D * 2
    activations = tokens * (3 * D + q + 2 * F) * 2  # residual, normed x, attention out, q, w1/w3 outputs
    logits = tokens * V * 4
    return CUDA_CONTEXT_BYTES + dequant + activations + logits


def resident_bytes(config: MixtralConfig, *, attention: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                   context: int = 4096, batch: int = 1, kv_dtype: torch.dtype = torch.bfloat16) -> int:
    """Everything that must stay on the device whatever the offloading: embeddings, lm_head, attention, norms,
    routers, the KV cache and the workspace (all but the experts)."""
    nbytes, _ = class_bytes(config, {"attention": attention}, blocksize, double_quant)
    nbytes.pop("experts")
    kv = kv_cache_bytes(config, context, batch, kv_dtype)
    return sum(nbytes.values()) + kv + workspace_bytes(config, context, batch)


def plan_memory(config: MixtralConfig, *, experts: str = "nf4", attention: str = "nf4", blocksize: int = 64,
                double_quant: bool = True, context: int = 4096, batch: int = 1, gpu_memory: int | str | None = None,
                kv_dtype: torch.dtype = torch.bfloat16, fmt: str | None = None,
                group_size: int = formats.INT4_GROUP_SIZE) -> Plan:
    """GPU memory for `config` quantized with the recipe, at `context` tokens x `batch` sequences.

    gpu_memory (bytes or '40GB'): when given, `fits` says whether everything fits, and `offload` how many
    experts per layer must live in host memory otherwise (an LRU of device slots holds the rest).
    """
    if context < 1 or batch < 1:
        raise ValueError(f"context and batch must be positive, got context={context}, batch={batch}")
    fmts = recipe(fmt, experts, attention)
    if "nf4" in fmts.values():
        formats.check_blocksize(blocksize)
    if "int4" in fmts.values():
        formats.check_group_size(group_size)
    nbytes, params = class_bytes(config, fmts, blocksize, double_quant, group_size=group_size)
    weights = sum(nbytes.values())
    kv = kv_cache_bytes(config, context, batch, kv_dtype)
    work = workspace_bytes(config, context, batch)
    total = weights + kv + work
    budget = parse_size(gpu_memory) if gpu_memory is not None else None
    fits = None if budget is None else total <= budget
    L, E, A = config.num_hidden_layers, config.num_local_experts, config.num_experts_per_tok
    one = expert_bytes(config, fmts["experts"], blocksize, double_quant, group_size)
    resident = total - nbytes["experts"]
    offload = {"needed": False, "possible": True, "expert_bytes": one, "resident_bytes": resident,
               "experts_per_layer_on_device": E, "experts_per_layer_on_host": 0, "host_bytes": 0,
               "staging_bytes": 0, "device_bytes": total}
    if budget is not None and not fits:
        # Offloaded experts are computed from A staging slots per step; the rest of the budget holds the same
        # number of resident experts in every layer.
        staging = A * one
        per_layer = max(0, min(E, (budget - resident - staging) // (one * L)))
        on_host = E - per_layer
        offload.update(needed=True, possible=budget >= resident + staging, experts_per_layer_on_device=int(per_layer),
                       experts_per_layer_on_host=int(on_host), host_bytes=int(L * on_host * one),
                       staging_bytes=staging, device_bytes=int(resident + staging + L * per_layer * one))
    return Plan(weights_bytes=weights, class_bytes=nbytes, class_params=params, kv_cache_bytes=kv,
                workspace_bytes=work, total_bytes=total, gpu_memory=budget, fits=fits, offload=offload,
                formats=fmts, context=context, batch=batch)
