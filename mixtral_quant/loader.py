"""Loading a packed (or plain bf16) checkpoint into the model: the tree is built on the meta device and each
module is filled with the checkpoint's tensors on the target device, so no dequantized copy ever exists.

`load_quantized` loads everything; `load_shell` + `load_block` load the ends and one layer at a time (streaming).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from . import memory
from .checkpoint import QUANTIZED, CheckpointError, CheckpointReader, resolve_source
from .devices import parse_max_memory, resolve_device, tracked_bytes  # noqa: F401  (tracked_bytes: loader API)
from .formats import QUANT_STATE_KEY, dequantize_tensor
from .linear import QuantLinear, make_linear, resolve_backend
from .model import Block, Transformer, rope_inv_freq
from .offload import make_expert_store, wire_prefetch

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}  # fmt: skip


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, reader: CheckpointReader) -> torch.dtype:
    """The compute dtype: as given, else the checkpoint's source dtype on CUDA and float32 on the CPU."""
    if dtype is None:
        if device.type != "cuda":
            return torch.float32
        qc = reader.quantization_config() or {}
        name = str(qc.get("source_dtype") or reader.config.dtype)
        return DTYPES.get(name.removeprefix("torch."), torch.bfloat16)
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype {dtype!r} not supported: choose float32, bfloat16 or float16")


def _tensors(reader: CheckpointReader, prefix: str) -> dict[str, torch.Tensor]:
    t = reader.module(prefix)
    if not t:
        raise CheckpointError(f"{reader.path}: tensor {prefix + '.weight'!r} is missing; "
                              "re-quantize the checkpoint (mixq quantize) or re-download it")  # fmt: skip
    return t


def _param(reader: CheckpointReader, name: str, device, dtype) -> nn.Parameter:
    if name not in reader:
        raise CheckpointError(f"{reader.path}: tensor {name!r} is missing; "
                              "re-quantize the checkpoint (mixq quantize) or re-download it")  # fmt: skip
    return nn.Parameter(reader.get(name).to(device=device, dtype=dtype), requires_grad=False)


def _router(reader: CheckpointReader, prefix: str, device, dtype) -> nn.Parameter:
    """The router weight [E, D] in the compute dtype. transformers 4.x bitsandbytes checkpoints quantize it (an
    nn.Linear there): it is decoded once here, it is only E x D."""
    if reader.encoding().modules.get(prefix) in QUANTIZED:
        w = dequantize_tensor(reader.module(prefix), torch.float32)
        return nn.Parameter(w.to(device=device, dtype=dtype), requires_grad=False)
    return _param(reader, prefix + ".weight", device, dtype)


def _check_shape(reader, name: str, got: tuple, want: tuple) -> None:
    if tuple(got) != tuple(want):
        raise CheckpointError(f"{reader.path}: {name} has shape {tuple(got)}, config.json implies {tuple(want)}; "
                              "the checkpoint and its config.json disagree")  # fmt: skip


def load_block(reader: CheckpointReader, layer_idx: int, *, device: torch.device, dtype: torch.dtype,
               backend: str, slots: int | None = None) -> Block:  # fmt: skip
    """Decoder layer `layer_idx` alone, built on meta and filled from `model.layers.{i}.*` on `device`.

    Call it as `block(h [B, S, D], ctx)` with `ctx = make_context(...)` (model.py): the evaluator streams layers.
    slots: device slots for the layer's experts (memory.place), None: all resident.
    """
    config = reader.config
    reader.check()  # every tensor's shape and dtype against config.json, once per reader
    p = f"model.layers.{layer_idx}."
    with torch.device("meta"):
        block = Block(config, layer_idx)
    try:
        attn = block.self_attn
        names = ("q_proj", "k_proj", "v_proj", "o_proj")
        tensors = {n: _tensors(reader, p + "self_attn." + n) for n in names}
        want = {n: (getattr(attn, n).out_features, getattr(attn, n).in_features) for n in names}
        for pair, stack in ((("q_proj", "o_proj"), "qo"), (("k_proj", "v_proj"), "kv")):
            a, b = (tensors[n] for n in pair)
            if _stackable(a, b, want[pair[0]], want[pair[1]]):
                # one decode for both on the torch backend: q with o, k with v (equal sizes)
                w = QuantLinear.from_tensors([a, b], (2,), device=device, backend=backend, compute_dtype=dtype,
                                             name=p + "self_attn." + stack)  # fmt: skip
                _check_shape(reader, p + "self_attn." + pair[0], _out_in(w), want[pair[0]])
                setattr(attn, stack, w)
                setattr(attn, pair[0], w.select(0))
                setattr(attn, pair[1], w.select(1, want[pair[1]]))
                continue
            for n in pair:
                lin = make_linear(tensors[n], name=p + "self_attn." + n, device=device, compute_dtype=dtype,
                                  backend=backend)  # fmt: skip
                _check_shape(reader, p + "self_attn." + n, _out_in(lin), want[n])
                setattr(attn, n, lin)
        for name in ("input_layernorm", "post_attention_layernorm"):
            getattr(block, name).weight = _param(reader, p + name + ".weight", device, dtype)
        block.block_sparse_moe.gate.weight = _router(reader, p + "block_sparse_moe.gate", device, dtype)
        block.block_sparse_moe.experts = make_expert_store(reader, config, layer_idx, device=device,
                                                           compute_dtype=dtype, backend=backend,
                                                           slots=slots)  # fmt: skip
    except KeyError as e:  # a tensor of a quantized weight is missing
        raise CheckpointError(f"{reader.path}: {e.args[0]}; re-quantize the checkpoint (mixq quantize)") from None
    return block


def _out_in(lin: nn.Module) -> tuple[int, int]:
    return (lin.out_features, lin.in_features)


def _stackable(a: dict, b: dict, shape_a: tuple, shape_b: tuple) -> bool:
    """Two packed projections that one QuantLinear stack can hold: same format and keys, equal sizes."""
    if set(a) != set(b) or not ({f"weight.{QUANT_STATE_KEY}", "SCB"} & set(a)):
        return False
    if any(a[k].shape != b[k].shape for k in a if not k.endswith(QUANT_STATE_KEY)):
        return False
    return shape_a[0] * shape_a[1] == shape_b[0] * shape_b[1] and ("SCB" not in a or shape_a == shape_b)


def load_shell(reader: CheckpointReader, *, device: torch.device, dtype: torch.dtype) -> Transformer:
    """The model without its layers: embeddings, final norm, lm_head and rotary frequencies, loaded."""
    config = reader.config
    reader.check()
    with torch.device("meta"):
        model = Transformer(config, layers=False)
    model.embed_tokens.weight = _param(reader, "model.embed_tokens.weight", device, dtype)
    _check_shape(reader, "model.embed_tokens.weight", model.embed_tokens.weight.shape,
                 (config.vocab_size, config.hidden_size))  # fmt: skip
    model.norm.weight = _param(reader, "model.norm.weight", device, dtype)
    if "lm_head.weight" in reader or not config.tie_word_embeddings:
        model.lm_head.weight = _param(reader, "lm_head.weight", device, dtype)
    else:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(config, device)
    return model


def placement_for(reader: CheckpointReader, device: torch.device, dtype: torch.dtype, budget: int, *,
                  context: int | None = None, batch: int = 1, check: bool = True) -> memory.Placement:  # fmt: skip
    """Where load_quantized(max_memory=budget) puts the experts: memory.place over the checkpoint's headers
    (nothing is read or allocated). Raises ValueError naming the minimum when the budget is too small."""
    return memory.place(memory.footprint_from_checkpoint(reader, dtype), reader.config, budget, context=context,
                        batch=batch, dtype=dtype, device_type=torch.device(device).type, check=check)  # fmt: skip


def load_quantized(path_or_repo_id: str, device: str | torch.device = "auto", dtype: str | torch.dtype | None = None,
                   backend: str = "auto", max_memory: int | str | None = None, tokenizer: bool = True,
                   context: int | None = None, batch: int = 1) -> Transformer:  # fmt: skip
    """Load a mixtral-quant checkpoint (or a plain bf16/fp16 Mixtral checkpoint) for inference.

    path_or_repo_id: a directory, a Hugging Face repo id, or builtin:tiny-mixtral. device: auto (CUDA if present),
    cpu, cuda[:N]. dtype: the compute dtype (default: the checkpoint's source dtype on CUDA, float32 on CPU).
    backend: auto (triton on CUDA, torch elsewhere), torch, triton or bnb. max_memory: the compute device's
    budget (int bytes or '16GiB'), used by expert offloading: the KV cache and workspace are reserved for `context`
    tokens (default min(max_position_embeddings, 4096)) x `batch` sequences, the experts that fit stay on the
    device (memory.place; `mixq plan --gpu-memory` reports the same placement).
    """
    budget = parse_max_memory(max_memory)
    if context is not None and (isinstance(context, bool) or not isinstance(context, int) or context < 1):
        raise ValueError(f"context must be a positive number of tokens, got {context!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive number of sequences, got {batch!r}")
    dev = resolve_device(device)
    backend = resolve_backend(backend, dev)
    path = resolve_source(path_or_repo_id)
    reader = CheckpointReader(path)
    with reader:
        reader.check()  # refuses unsupported encodings and any tensor that disagrees with config.json
        if backend == "bnb" and reader.int4_group_size is not None:  # bnb's nf4 ops ignore our int4 code table
            raise ValueError(f"{path}: backend 'bnb' cannot run int4 (compressed-tensors) weights; "
                             "use backend 'auto', 'torch' or 'triton'")
        dt = resolve_dtype(dtype, dev, reader)
        # expert offloading: the budget is checked against the headers before anything is allocated
        if context is not None:  # no run uses more positions than the model has (chat and the server cap there)
            context = min(context, reader.config.max_position_embeddings)
        placement = None if budget is None else placement_for(reader, dev, dt, budget, context=context, batch=batch)
        model = load_shell(reader, device=dev, dtype=dt)
        n = reader.config.num_hidden_layers
        slots = placement.slots if placement is not None else [None] * n
        model.layers = nn.ModuleList(
            load_block(reader, i, device=dev, dtype=dt, backend=backend, slots=slots[i]) for i in range(n)
        )
        if placement is not None:
            wire_prefetch(model)
            log.info("max_memory %d bytes: %s", budget, placement.describe())
        extra = [k for k in reader.keys() if k.startswith("model.layers.") and int(k.split(".")[2]) >= n]
        if extra:
            log.warning("%s: %d tensors of layers beyond num_hidden_layers=%d ignored", path, len(extra), n)
    model.eval().requires_grad_(False)
    model.backend, model.path, model.max_memory = backend, path, budget
    model.expert_placement = placement  # memory.Placement, or None without a budget
    if tokenizer:
        from .tokenizer import Tokenizer

        model.tokenizer = Tokenizer.from_checkpoint(path)
    log.info("loaded %s on %s (%s, backend %s)", path, dev, str(dt).removeprefix("torch."), backend)
    return model
