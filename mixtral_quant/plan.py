"""`mixq plan`'s report: the memory model (memory.py) for a config and a recipe at a context and batch, and, when a
GPU budget is given, whether it fits and how many experts per layer the loader would keep on the device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from . import formats, memory
from .config import MixtralConfig
from .devices import parse_size
from .formats import recipe
from .memory import CUDA_CONTEXT_BYTES, kv_cache_bytes  # noqa: F401 - part of this module's API


@dataclass
class Plan:
    weights_bytes: int
    class_bytes: dict[str, int]  # device bytes: attention, experts, router, embeddings, lm_head, norms, rotary
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


def expert_bytes(config: MixtralConfig, fmt: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                 dtype: torch.dtype | None = None, group_size: int = formats.INT4_GROUP_SIZE) -> int:  # fmt: skip
    """Device bytes of one expert's w1 + w2 + w3 in `fmt`."""
    return memory.footprint(config, {"experts": fmt}, blocksize=blocksize, double_quant=double_quant,
                            dtype=dtype, group_size=group_size).expert_bytes  # fmt: skip


def resident_bytes(config: MixtralConfig, *, attention: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                   context: int = 4096, batch: int = 1, kv_dtype: torch.dtype | None = None,
                   workload: str = "generate") -> int:  # fmt: skip
    """Everything that must stay on the device whatever the offloading: embeddings, lm_head, attention, norms,
    routers, the KV cache and the workspace (all but the experts)."""
    fp = memory.footprint(config, {"attention": attention}, blocksize=blocksize, double_quant=double_quant)
    dtype = config.torch_dtype
    return (fp.resident_bytes + kv_cache_bytes(config, context, batch, kv_dtype or dtype)
            + memory.workspace_bytes(config, context, batch, dtype=dtype, workload=workload))  # fmt: skip


def plan_memory(config: MixtralConfig, *, experts: str = "nf4", attention: str = "nf4", blocksize: int = 64,
                double_quant: bool = True, context: int | None = None, batch: int = 1,
                gpu_memory: int | str | None = None, kv_dtype: torch.dtype | None = None, fmt: str | None = None,
                dtype: torch.dtype | None = None, device_type: str = "cuda", workload: str = "generate",
                group_size: int = formats.INT4_GROUP_SIZE) -> Plan:  # fmt: skip
    """GPU memory for `config` quantized with the recipe, at `context` tokens (default: min(max positions, 4096))
    x `batch` sequences, in the compute `dtype` (default: the config's, as on CUDA).

    gpu_memory (bytes or '40GB'): when given, `fits` says whether everything fits, and `offload` how many experts
    per layer `load_quantized(max_memory=gpu_memory, context=, batch=)` keeps on the device (memory.place: the
    same call the loader makes). workload 'eval' reserves logits for every position (perplexity needs them).
    """
    context = memory.default_context(config) if context is None else context
    if context < 1 or batch < 1:
        raise ValueError(f"context and batch must be positive, got context={context}, batch={batch}")
    fmts = recipe(fmt, experts, attention)
    if "nf4" in fmts.values():
        formats.check_blocksize(blocksize)
    if "int4" in fmts.values():
        formats.check_group_size(group_size)
    dtype = dtype or config.torch_dtype
    fp = memory.footprint(config, fmts, blocksize=blocksize, double_quant=double_quant, dtype=dtype,
                          group_size=group_size)  # fmt: skip
    budget = parse_size(gpu_memory) if gpu_memory is not None else None
    p = memory.place(fp, config, budget, context=context, batch=batch, dtype=dtype, kv_dtype=kv_dtype,
                     device_type=device_type, workload=workload, check=False)  # fmt: skip
    weights = sum(fp.class_bytes.values())
    total = weights + p.kv_cache_bytes + p.workspace_bytes
    fits = None if budget is None else total <= budget
    L, E = config.num_hidden_layers, config.num_local_experts
    offload = {"needed": False, "possible": True, "expert_bytes": fp.expert_bytes, "slot_bytes": fp.slot_bytes,
               "resident_bytes": total - fp.class_bytes["experts"], "minimum_bytes": p.minimum_bytes,
               "experts_per_layer_on_device": E, "experts_per_layer_on_host": 0, "slots_per_layer": [E] * L,
               "host_bytes": 0, "device_bytes": total}  # fmt: skip
    if budget is not None and not fits:
        # host: an offloaded layer keeps all E experts in host rows of one slot each (offload/host.py)
        on_device = min(p.slots)
        offload.update(needed=True, possible=budget >= p.minimum_bytes, experts_per_layer_on_device=on_device,
                       experts_per_layer_on_host=E - on_device, slots_per_layer=p.slots,
                       host_bytes=sum(k < E for k in p.slots) * E * fp.slot_bytes,
                       device_bytes=p.device_bytes + p.workspace_bytes)  # fmt: skip
    return Plan(weights_bytes=weights, class_bytes=fp.class_bytes, class_params=fp.class_params,
                kv_cache_bytes=p.kv_cache_bytes, workspace_bytes=p.workspace_bytes, total_bytes=total,
                gpu_memory=budget, fits=fits, offload=offload, formats=fmts, context=context, batch=batch)
