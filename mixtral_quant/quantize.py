"""The streaming quantizer: a half-precision Hub-layout Mixtral checkpoint in, a packed NF4/int8 checkpoint out.

One tensor at a time (peak host memory ~ the largest tensor plus one output shard buffer), never the model.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch

from . import compressed, formats
from .formats import recipe
from .devices import parse_size, resolve_device
from .checkpoint import AUX_FILES, CheckpointReader, ShardWriter, check_output_dir, resolve_source, tensor_class

log = logging.getLogger(__name__)

QUANT_METHOD = "mixtral-quant"


@dataclass
class QuantizeResult:
    output: str
    input_bytes: int
    output_bytes: int
    params: int
    seconds: float
    formats: dict[str, str]  # tensor class -> format
    bits_per_param: dict[str, float] = field(default_factory=dict)  # per class, and "total"

    def to_dict(self) -> dict:
        return asdict(self)


def int4_ignore(config, fmts: dict[str, str]) -> list[str]:
    """The linears a compressed-tensors int4 checkpoint leaves unquantized, by full module name: lm_head, every
    router, the attention projections when attention is not int4 and the experts when they are not."""
    ignore = ["lm_head"]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        if fmts["attention"] != "int4":
            ignore += [p + f"self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        ignore.append(p + "block_sparse_moe.gate")
        if fmts["experts"] != "int4":
            ignore += [p + f"block_sparse_moe.experts.{e}.{w}" for e in range(config.num_local_experts)
                       for w in ("w1", "w2", "w3")]  # fmt: skip
    return ignore


@contextmanager
def _all_cores(device: torch.device):
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def quantization_config(fmts: dict[str, str], blocksize: int, double_quant: bool, source_dtype: str,
                        num_layers: int = 0) -> dict:  # fmt: skip
    """config.json's quantization_config: a bitsandbytes block transformers understands, our fields beside it.

    nf4 (or int8) everywhere it is used: transformers 4.x loads the output with Linear4bit (Linear8bitLt) experts
    and attention; the routers and lm_head stay 16-bit, named in llm_int8_skip_modules (full module names, as
    4.x matches them), like any class kept in 16 bits. nf4 and int8 mixed cannot be said in one bitsandbytes
    config: load_in_4bit and load_in_8bit are then both true, which transformers refuses with a ValueError
    instead of loading the other format's bytes as if they were its own. Nothing quantized: quant_method
    mixtral-quant, which transformers skips (the weights are plain 16-bit ones).
    """
    ours = {"formats": dict(fmts), "blocksize": blocksize, "double_quant": double_quant, "source_dtype": source_dtype}
    used = set(fmts.values()) & {"nf4", "int8"}
    if not used:
        return {"quant_method": QUANT_METHOD, **ours}
    skip = [f"model.layers.{i}.block_sparse_moe.gate" for i in range(num_layers)] + ["lm_head"]
    if fmts.get("attention") not in used:  # a 16-bit class: full names of its modules, so transformers keeps them
        skip += [f"model.layers.{i}.self_attn" for i in range(num_layers)]
    if fmts.get("experts") not in used:
        skip += [f"model.layers.{i}.block_sparse_moe.experts" for i in range(num_layers)]
    bnb = {"quant_method": "bitsandbytes", "load_in_4bit": "nf4" in used, "load_in_8bit": "int8" in used,
           "llm_int8_skip_modules": skip, "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False,
           "llm_int8_enable_fp32_cpu_offload": False}  # fmt: skip
    if "nf4" in used:
        bnb.update(bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                   bnb_4bit_compute_dtype=source_dtype, bnb_4bit_quant_storage="uint8")  # fmt: skip
    return {**bnb, **ours}


def plan_tensors(reader: CheckpointReader, fmts: dict[str, str]) -> list[tuple[str, str, str | None]]:
    """(tensor name, class, format or None to keep as is), in shard order so the source is read sequentially."""
    order = {s: i for i, s in enumerate(reader.shards())}
    names = sorted(reader.keys(), key=lambda k: (order[reader.weight_map[k]], k))
    return [(k, c, fmts.get(c)) for k in names for c in [tensor_class(k)]]


def estimate_output_bytes(reader: CheckpointReader, todo, blocksize: int, double_quant: bool,
                          group_size: int = formats.INT4_GROUP_SIZE) -> int:
    total = 0
    for name, _, fmt in todo:
        dtype, shape = reader.info(name)
        total += formats.packed_nbytes(fmt, shape, blocksize, double_quant, group_size) if fmt else reader.nbytes(name)
    return total


def quantize(src: str, out: str, *, fmt: str | None = None, experts: str = "nf4", attention: str = "nf4",
             blocksize: int = 64, double_quant: bool = True, group_size: int = formats.INT4_GROUP_SIZE,
             device: str = "auto", max_shard_size: int | str = "2GB", overwrite: bool = False,
             progress: bool = True) -> QuantizeResult:
    """Quantize the attention projections and experts of the Mixtral checkpoint `src` into directory `out`.

    src: a directory, a Hugging Face repo id, or builtin:tiny-mixtral. The output is an HF-style directory
    (shards, index, config.json with quantization_config, tokenizer files) that appears only when complete.
    int4 (`group_size` inputs per scale) writes a compressed-tensors W4A16 pack-quantized checkpoint.
    """
    from tqdm.auto import tqdm

    fmts = recipe(fmt, experts, attention)
    if "nf4" in fmts.values():
        formats.check_blocksize(blocksize)
    if "int4" in fmts.values():
        formats.check_group_size(group_size)
    max_shard_bytes = parse_size(max_shard_size)
    dev = resolve_device(device)
    out = os.path.abspath(out)
    check_output_dir(out, overwrite)  # before any download or read
    path = resolve_source(src)
    if os.path.realpath(path) == os.path.realpath(out):
        raise ValueError(f"{out}: the output directory is the source; choose another output path")
    t0 = time.perf_counter()
    with CheckpointReader(path) as reader, _all_cores(dev):
        reader.validate_source()
        todo = plan_tensors(reader, fmts)
        for name, _, f in todo:  # every weight's groups must fit its rows before anything is written
            if f == "int4":
                formats.check_group_size(group_size, reader.info(name)[1][-1],
                                         f"{os.path.join(path, reader.weight_map[name])}: {name}")
        estimate = estimate_output_bytes(reader, todo, blocksize, double_quant, group_size)
        parent = _existing_ancestor(os.path.dirname(out))
        free = shutil.disk_usage(parent).free
        if free < estimate * 1.02:
            raise OSError(f"{parent}: {free / 1e9:.2f} GB free, the output needs about {estimate / 1e9:.2f} GB; "
                          "free some space or choose another output directory")
        in_bytes = params = 0
        cls_params: dict[str, int] = {}
        cls_bytes: dict[str, int] = {}
        with ShardWriter(out, max_shard_bytes, overwrite) as writer:
            bar = tqdm(todo, desc="quantize", unit="tensor", disable=not progress, dynamic_ncols=True)
            for name, cls, f in bar:
                w = reader.get(name, dev if f else "cpu")  # tensors kept as they are never visit the GPU
                n_in = w.numel() * w.element_size()
                if f is None:
                    packed = {name: w}
                else:
                    prefix = name.removesuffix(".weight")
                    try:
                        q = formats.quantize_tensor(w, f, blocksize, double_quant, group_size)
                    except ValueError as e:  # e.g. NaN in a weight: say which tensor of which file
                        raise ValueError(f"{os.path.join(path, reader.weight_map[name])}: {name}: {e}") from None
                    packed = {f"{prefix}.{k}": v for k, v in q.items()}
                n_out = sum(t.numel() * t.element_size() for t in packed.values())
                writer.add(packed)
                w = packed = q = None  # drop the source tensor before reading the next
                in_bytes += n_in
                numel = math.prod(reader.info(name)[1])
                params += numel
                cls_params[cls] = cls_params.get(cls, 0) + numel
                cls_bytes[cls] = cls_bytes.get(cls, 0) + n_out
                bar.set_postfix_str(f"{in_bytes / 1e9 / max(time.perf_counter() - t0, 1e-9):.2f} GB/s", refresh=False)
            bar.close()
            src_dtype = reader.config.dtype
            if "int4" in fmts.values():
                qc = compressed.quantization_config(group_size, int4_ignore(reader.config, fmts))
            else:
                qc = quantization_config(fmts, blocksize, double_quant, src_dtype, reader.config.num_hidden_layers)
            conf = reader.config.raw | {"quantization_config": qc}
            writer.write_json("config.json", conf)
            for aux in AUX_FILES:
                if os.path.isfile(os.path.join(path, aux)):
                    writer.copy_file(os.path.join(path, aux))
            out_bytes = writer.total_size + writer._buffered
            writer.finish()
    seconds = time.perf_counter() - t0
    bits = {c: 8 * cls_bytes[c] / cls_params[c] for c in cls_params}
    bits["total"] = 8 * out_bytes / max(params, 1)
    result = QuantizeResult(output=out, input_bytes=in_bytes, output_bytes=out_bytes, params=params,
                            seconds=seconds, formats=fmts, bits_per_param=bits)
    log.info("quantized %s -> %s: %.2f GB -> %.2f GB (%.2f bits/param, attention %s, experts %s) in %.1f s",
             src, out, in_bytes / 1e9, out_bytes / 1e9, bits["total"], fmts["attention"], fmts["experts"], seconds)
    return result


def _existing_ancestor(path: str) -> str:
    while not os.path.isdir(path):
        path = os.path.dirname(path)
    return path
