"""The one memory model: bytes on the compute device of every weight class, the KV cache, the workspace and one
expert slot, from a config and a recipe or from a checkpoint's headers, and the placement of experts for a budget.

`plan.py` reports it, the loader and `offload/` place experts with it, `evals/offload_sim.py` projects with it.
Placement rule: every layer gets `num_experts_per_tok` slots at least (a decode step's experts sit in slots
together), the slots that fit are spread evenly, the remainder to the lowest layers (layer 0 has no speculative
prefetch, so its misses stall); a layer with a slot for every expert keeps them resident (no padding, no host copy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from . import formats
from .config import MixtralConfig
from .devices import tracked_bytes  # noqa: F401 - what a placement is checked against: a module's device bytes
from .formats import QUANT_STATE_KEY, unpack_quant_state

ALIGN = 16  # byte alignment of each tensor inside an expert's slot (so uint8 rows can be viewed as float32)
CUDA_CONTEXT_BYTES = 500 * 2**20  # CUDA context + the allocator's slack, measured ~0.4-0.6 GB on recent drivers
SLOT_TABLE_ITEMSIZE = 8  # an offloaded layer's slot table: int64 [E] on the device (expert id -> slot)
WORKLOADS = ("generate", "eval")  # generate: logits of the last position only; eval: of every position
_EXPERTS = ".block_sparse_moe.experts."


def default_context(config: MixtralConfig) -> int:
    """Tokens of KV cache and prefill workspace reserved when the caller does not say: min(max positions, 4096)."""
    return min(config.max_position_embeddings, 4096)


def padded(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


# ---- weights -------------------------------------------------------------------------------------------------
def weight_buffers(fmt: str | None, shape: tuple[int, ...], blocksize: int = 64, double_quant: bool = True,
                   dtype: torch.dtype = torch.bfloat16,
                   group_size: int = formats.INT4_GROUP_SIZE) -> dict[str, int]:  # fmt: skip
    """Bytes of each device buffer of one weight as the loader holds it: QuantLinear's buffers for nf4 / int8 (the
    nf4 JSON becomes a float32 `offset`; int4 is repacked into the nf4 layout with fp32 group scales and no double
    quant), one tensor in the compute `dtype` for full precision (fmt None/bf16/fp16)."""
    n = math.prod(shape)
    if fmt == "int4":
        return {"weight": n // 2, "absmax": 4 * (n // group_size), "quant_map": 4 * 16, "offset": 4}
    if fmt == "nf4":
        blocks = -(-n // blocksize)
        out = {"weight": (n + 1) // 2, "absmax": blocks if double_quant else 4 * blocks, "quant_map": 4 * 16}
        if double_quant:
            out.update(nested_absmax=4 * -(-blocks // formats.NESTED_BLOCKSIZE), nested_quant_map=4 * 256)
        return {**out, "offset": 4}
    if fmt == "int8":
        return {"weight": n, "SCB": 4 * shape[0]}
    if fmt in (None, "bf16", "fp16"):
        return {"": n * dtype.itemsize}
    return {"": formats.packed_nbytes(fmt, shape, blocksize, double_quant)}  # a format without its own rule here


def _expert_groups(fmt: str | None, config: MixtralConfig, blocksize: int, double_quant: bool, dtype: torch.dtype,
                   group_size: int) -> dict[tuple[str, str], int]:  # fmt: skip
    """One expert's buffers as the expert stores stack them: nf4 (and int4, held as nf4) as one [3] stack (w1, w3,
    w2: equal sizes), else w13 ([2]: w1, w3) and w2 ([1]). {(stack, buffer): bytes}."""
    D, F = config.hidden_size, config.intermediate_size
    w1 = weight_buffers(fmt, (F, D), blocksize, double_quant, dtype, group_size)
    if fmt in ("nf4", "int4"):
        return {("w123", b): 3 * n for b, n in w1.items()}
    w2 = weight_buffers(fmt, (D, F), blocksize, double_quant, dtype, group_size)
    return {**{("w13", b): 2 * n for b, n in w1.items()}, **{("w2", b): n for b, n in w2.items()}}


@dataclass(frozen=True)
class Footprint:
    """Device bytes of a model's weights: per class (attention, experts, router, embeddings, lm_head, norms, rotary;
    experts = all of them), one expert resident, one expert slot (its buffers, each padded to ALIGN)."""

    class_bytes: dict[str, int]
    class_params: dict[str, int]
    expert_bytes: int
    slot_bytes: int

    @property
    def resident_bytes(self) -> int:
        """Everything but the experts: what stays on the device whatever the budget."""
        return sum(v for k, v in self.class_bytes.items() if k != "experts")


def footprint(config: MixtralConfig, fmts: dict[str, str], *, blocksize: int = 64, double_quant: bool = True,
              dtype: torch.dtype | None = None, group_size: int = formats.INT4_GROUP_SIZE) -> Footprint:  # fmt: skip
    """From a config and a recipe ({class: format}; classes without one stay in the compute `dtype`, default the
    config's dtype, as on CUDA)."""
    from .checkpoint import expected_shapes, tensor_class

    dtype = dtype or config.torch_dtype
    nbytes: dict[str, int] = {}
    params: dict[str, int] = {}
    for name, shape in expected_shapes(config).items():
        cls = tensor_class(name)
        nbytes[cls] = nbytes.get(cls, 0) + sum(weight_buffers(fmts.get(cls), shape, blocksize, double_quant, dtype,
                                                              group_size).values())  # fmt: skip
        params[cls] = params.get(cls, 0) + math.prod(shape)
    nbytes["rotary"] = config.head_dim // 2 * 4  # the fp32 inv_freq buffer
    groups = _expert_groups(fmts.get("experts"), config, blocksize, double_quant, dtype, group_size)
    return Footprint(nbytes, params, sum(groups.values()), sum(padded(n) for n in groups.values()))


def footprint_from_checkpoint(reader, dtype: torch.dtype) -> Footprint:
    """From a checkpoint's headers (nothing is read or allocated): packed tensors as stored (the nf4 JSON becomes a
    float32 offset), full-precision ones in the compute `dtype`, a tied lm_head free."""
    from .checkpoint import tensor_class

    config = reader.config
    nbytes: dict[str, int] = {}
    params: dict[str, int] = {}
    groups: dict[tuple[str, str], int] = {}
    for prefix, keys in reader.modules_index().items():
        cls = tensor_class(prefix)
        n = _module_params(reader, prefix, keys)
        # the router is held in the compute dtype even when a checkpoint quantized it (loader._router decodes it)
        one = {"": n * dtype.itemsize} if cls == "router" else _module_buffers(reader, prefix, keys, dtype)
        nbytes[cls] = nbytes.get(cls, 0) + sum(one.values())
        params[cls] = params.get(cls, 0) + n
        if prefix.startswith("model.layers.0.block_sparse_moe.experts.0."):  # expert 0 of layer 0: the slot layout
            part = prefix.rsplit(".", 1)[1]  # w1, w2 or w3
            stack = "w123" if "offset" in one else ("w2" if part == "w2" else "w13")
            for b, n in one.items():
                groups[stack, b] = groups.get((stack, b), 0) + n
    nbytes["rotary"] = config.head_dim // 2 * 4
    return Footprint(nbytes, params, sum(groups.values()), sum(padded(n) for n in groups.values()))


def _module_buffers(reader, prefix: str, keys: list[str], dtype: torch.dtype) -> dict[str, int]:
    """One module's device buffers from its header entries: what QuantLinear keeps of a packed weight (linear's
    NF4_KEYS / INT8_KEYS, + the float32 offset of nf4), an int4 weight as its nf4 repack, else the weight in dtype."""
    from .formats import INT8_KEYS, NF4_KEYS

    rels = {k[len(prefix) + 1:]: k for k in keys}
    if "weight_packed" in rels:  # compressed-tensors int4, repacked at load: fp32 group scales, a code table
        return {"weight": reader.nbytes(rels["weight_packed"]),
                "absmax": 4 * math.prod(reader.info(rels["weight_scale"])[1]), "quant_map": 4 * 16, "offset": 4}
    if f"weight.{QUANT_STATE_KEY}" in rels:
        return {**{NF4_KEYS[r]: reader.nbytes(k) for r, k in rels.items() if r in NF4_KEYS}, "offset": 4}
    if "SCB" in rels:
        return {INT8_KEYS[r]: reader.nbytes(k) for r, k in rels.items() if r in INT8_KEYS}
    return {"": math.prod(reader.info(rels["weight"])[1]) * dtype.itemsize}


def _module_params(reader, prefix: str, keys: list[str]) -> int:
    qs = f"{prefix}.weight.{QUANT_STATE_KEY}"
    if qs in keys:
        return math.prod(unpack_quant_state(reader.get(qs))["shape"])
    if f"{prefix}.weight_packed" in keys:  # int32 words of 8 nibbles
        return 2 * reader.nbytes(f"{prefix}.weight_packed")
    return math.prod(reader.info(f"{prefix}.weight")[1])


# ---- KV cache and workspace ----------------------------------------------------------------------------------
def kv_cache_bytes(config: MixtralConfig, context: int = 4096, batch: int = 1,
                   kv_dtype: torch.dtype = torch.bfloat16) -> int:  # fmt: skip
    """K and V for every layer, preallocated at `context` positions. The model's KVCache keeps every position even
    with a sliding window (the window is a mask), so no cap here."""
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * kv_dtype.itemsize
    return batch * context * per_token


def attention_workspace_bytes(config: MixtralConfig, context: int = 4096, batch: int = 1,
                              dtype: torch.dtype = torch.bfloat16) -> int:  # fmt: skip
    """What model.attend allocates in one attention call of a full-context prefill (S = L = context), beyond q, k,
    v and its output. One prompt with no window shorter than it runs causal with no mask (flash): one fp32
    log-sum-exp per query row, and in fp32 K/V expanded to every query head (for the memory-efficient kernel). A
    batch (left padding) or a window inside the context passes a mask (memory-efficient): the boolean mask
    [B, 1, S, L] (built once per forward), its additive copy in the activations' dtype, K/V expanded to H heads."""
    H, K, hd, S = config.num_attention_heads, config.num_key_value_heads, config.head_dim, context
    lse = batch * H * S * 4
    expand = 2 * batch * H * S * hd * dtype.itemsize if K != H else 0  # [B, H, L, hd] keys and values, L = S
    window = bool(config.sliding_window) and context > config.sliding_window
    if batch == 1 and not window:
        return lse + (expand if dtype == torch.float32 else 0)
    return lse + expand + batch * S * S * (1 + dtype.itemsize)


def workspace_bytes(config: MixtralConfig, context: int = 4096, batch: int = 1, *,
                    dtype: torch.dtype = torch.bfloat16, device_type: str = "cuda",
                    workload: str = "generate") -> int:  # fmt: skip
    """Transient memory of a full-context prefill: the CUDA context (on CUDA), two dequantized expert matrices
    (the torch path), the activations (residual, normed x, attention out, q, w1/w3 outputs), attention's
    workspace, and fp32 logits: of the last position for `generate`, of every position for `eval`."""
    if workload not in WORKLOADS:
        raise ValueError(f"workload {workload!r}: choose one of {', '.join(WORKLOADS)}")
    D, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    q = config.num_attention_heads * config.head_dim
    tokens = batch * context
    dequant = 2 * F * D * dtype.itemsize
    activations = tokens * (3 * D + q + 2 * F) * dtype.itemsize
    logits = (tokens if workload == "eval" else batch) * V * 4
    cuda = CUDA_CONTEXT_BYTES if device_type == "cuda" else 0
    return cuda + dequant + activations + logits + attention_workspace_bytes(config, context, batch, dtype)


# ---- placement -----------------------------------------------------------------------------------------------
@dataclass
class Placement:
    """The compute-device budget split: what must stay resident, what is reserved, and slots per layer."""

    budget: int
    resident_bytes: int  # embeddings, lm_head, attention, norms, routers, rotary table
    kv_cache_bytes: int  # reserved for `context` tokens x `batch` sequences
    workspace_bytes: int  # transient activations, logits, attention, dequantized weights (+ the CUDA context)
    expert_bytes: int  # one resident expert
    slot_bytes: int  # one slot (the expert's buffers, padded)
    slots: list[int]  # per layer; == num_experts: the layer is resident
    num_experts: int
    context: int
    batch: int = 1
    min_slots: int = 1  # per offloaded layer (num_experts_per_tok)
    notes: dict = field(default_factory=dict)

    @property
    def fixed_bytes(self) -> int:
        return self.resident_bytes + self.kv_cache_bytes + self.workspace_bytes

    @property
    def expert_slot_bytes(self) -> int:
        """Bytes the experts take on the device under this placement (an offloaded layer: its slots and its slot
        table)."""
        E = self.num_experts
        return sum(E * self.expert_bytes if k >= E else k * self.slot_bytes + self.table_bytes for k in self.slots)

    @property
    def device_bytes(self) -> int:
        """The most the tracked tensors (parameters, buffers, slots, KV cache) hold on the device."""
        return self.resident_bytes + self.kv_cache_bytes + self.expert_slot_bytes

    @property
    def minimum_bytes(self) -> int:
        """The smallest budget that places this model: fixed part + min_slots per layer."""
        return self.fixed_bytes + len(self.slots) * (self.min_slots * self.slot_bytes + self.table_bytes)

    @property
    def table_bytes(self) -> int:
        """An offloaded layer's slot table."""
        return self.num_experts * SLOT_TABLE_ITEMSIZE

    @property
    def offloaded(self) -> bool:
        return min(self.slots) < self.num_experts

    def describe(self) -> str:
        E, ks = self.num_experts, self.slots
        if min(ks) >= E:
            return f"all {E} experts of every layer resident"
        lo, hi = min(ks), max(ks)
        extra = "" if lo == hi else f" ({sum(k == hi for k in ks)} layers, from layer 0, get {hi})"
        return (f"{lo} of {E} experts per layer in device slots{extra}, the rest in host memory; "
                f"{size_str(self.device_bytes)} tracked on the device (+{size_str(self.workspace_bytes)} workspace)")


def place(fp: Footprint, config: MixtralConfig, budget: int | None, *, context: int | None = None, batch: int = 1,
          dtype: torch.dtype = torch.bfloat16, kv_dtype: torch.dtype | None = None, device_type: str = "cuda",
          workload: str = "generate", check: bool = True) -> Placement:  # fmt: skip
    """The placement of `fp` in `budget` bytes (None: everything resident). Raises ValueError, naming the minimum,
    when the budget is below the resident part, the reservation and `num_experts_per_tok` slots per layer (unless
    check=False: then `slots` is what fits, possibly fewer)."""
    context = context or default_context(config)
    if context < 1 or batch < 1:
        raise ValueError(f"context and batch must be positive, got context={context}, batch={batch}")
    L, E, A = config.num_hidden_layers, config.num_local_experts, config.num_experts_per_tok
    kv = kv_cache_bytes(config, context, batch, kv_dtype or dtype)  # the model keeps it in the compute dtype
    work = workspace_bytes(config, context, batch, dtype=dtype, device_type=device_type, workload=workload)
    p = Placement(budget if budget is not None else 0, fp.resident_bytes, kv, work, fp.expert_bytes, fp.slot_bytes,
                  [E] * L, E, context, batch, A)  # fmt: skip
    if budget is None:
        p.budget = p.fixed_bytes + L * E * fp.expert_bytes
        return p
    avail = budget - p.fixed_bytes
    if avail >= L * E * fp.expert_bytes:
        return p
    n = max(0, min((avail - L * p.table_bytes) // fp.slot_bytes, L * E))  # every layer's table reserved
    if n < L * A and check:
        need = p.minimum_bytes
        what = "1 expert slot" if A == 1 else f"{A} expert slots"
        raise ValueError(
            f"max_memory={size_str(budget)} is below the {size_str(need)} ({need:,} bytes) that must stay on "
            f"{device_type} (embeddings, lm_head, attention, norms, routers: {size_str(fp.resident_bytes)}; KV cache "
            f"at {context} tokens x {batch}: {size_str(kv)}; workspace: {size_str(work)}; {what} per layer and their "
            f"tables: {size_str(L * (A * fp.slot_bytes + p.table_bytes))}); "
            f"use at least max_memory={math.ceil(need / 2**20)}MiB"
        )  # fmt: skip
    p.slots = [min(E, n // L + (i < n % L)) for i in range(L)]
    return p


def size_str(n: int) -> str:
    for unit, k in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 2**k:
            return f"{n / 2**k:.1f} {unit}"
    return f"{n} B"
