"""The compressed-tensors container around our int4 bytes: the `quantization_config` block that vLLM, llm-compressor
and transformers read (written as compressed-tensors 0.20 writes it), and the check that refuses every
compressed-tensors scheme other than W4A16 pack-quantized, symmetric, per group.

The bytes themselves (weight_packed / weight_scale / weight_shape, and the repack into the NF4 layout) are defined
in formats.py with the other layouts; this module only knows the JSON.
"""

from __future__ import annotations

import re

from .formats import INT4_GROUP_SIZES

QUANT_METHOD = "compressed-tensors"
FORMAT = "pack-quantized"
# The compressed-tensors release whose config layout this mirrors (checked by tests/test_int4.py against the library).
FORMAT_VERSION = "0.20.1"


def quantization_config(group_size: int, ignore: list[str]) -> dict:
    """config.json's `quantization_config` for a W4A16 pack-quantized checkpoint: one config group targeting every
    Linear, `ignore` naming the linears left unquantized (lm_head, the routers, ...) by full module name."""
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "group_size": group_size, "strategy": "group",
               "dynamic": False, "actorder": None, "observer": "minmax"}  # fmt: skip
    return {
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": FORMAT}},
        "format": FORMAT, "global_compression_ratio": None, "ignore": list(ignore), "kv_cache_scheme": None,
        "quant_method": QUANT_METHOD, "quantization_status": "compressed", "sparsity_config": {},
        "transform_config": {}, "version": FORMAT_VERSION,
    }  # fmt: skip


def is_compressed_tensors(qc: dict | None) -> bool:
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def check_config(qc: dict, where: str) -> int:
    """The group size of a compressed-tensors `quantization_config` we can run; anything else is a ValueError
    whose one line says what the checkpoint holds and what is supported. `where`: the config.json path."""
    supported = "supported: W4A16 pack-quantized, symmetric, strategy group (int4 weights, 16-bit activations)"

    def refuse(what: str) -> ValueError:
        return ValueError(f"{where}: compressed-tensors checkpoint with {what}; {supported}")

    fmt = qc.get("format")
    if fmt != FORMAT:
        raise refuse(f"format {fmt!r}")
    if qc.get("kv_cache_scheme"):
        raise refuse("a quantized KV cache (kv_cache_scheme)")
    if qc.get("sparsity_config") and qc["sparsity_config"].get("format") not in (None, "dense"):
        raise refuse(f"sparsity {qc['sparsity_config'].get('format')!r}")
    groups = qc.get("config_groups") or {}
    if not groups:
        raise refuse("no config_groups")
    sizes = set()
    for name, g in groups.items():
        w = g.get("weights") or {}
        if g.get("input_activations") or g.get("output_activations"):
            raise refuse(f"activation quantization in {name}")
        if g.get("format") not in (None, FORMAT):
            raise refuse(f"format {g.get('format')!r} in {name}")
        if w.get("num_bits") != 4 or w.get("type") != "int":
            raise refuse(f"{w.get('num_bits')}-bit {w.get('type')} weights in {name}")
        if not w.get("symmetric", True):
            raise refuse(f"asymmetric weights (zero points) in {name}")
        if w.get("strategy") != "group":
            raise refuse(f"strategy {w.get('strategy')!r} in {name}")
        if w.get("dynamic"):
            raise refuse(f"dynamic weight quantization in {name}")
        if w.get("actorder") == "group":
            raise refuse(f"activation-ordered groups (actorder 'group', weight_g_idx) in {name}")
        if w.get("group_size") not in INT4_GROUP_SIZES:
            raise refuse(f"group size {w.get('group_size')!r} in {name} (our kernels need a power of two, 32..4096)")
        sizes.add(w["group_size"])
    if len(sizes) != 1:
        raise refuse(f"several group sizes {sorted(sizes)}")
    return sizes.pop()


def recipe_from_config(qc: dict) -> dict[str, str]:
    """The recipe a compressed-tensors checkpoint was made with, as `quantize.recipe` spells it: int4 for the
    classes whose linears are not listed in `ignore` (checked on q_proj of layer 0 and w1 of its expert 0)."""
    ignore = list(qc.get("ignore") or ())

    def quantized(module: str, short: str) -> bool:  # names, or "re:PATTERN" as compressed-tensors matches them
        return not any(i in (module, short) or (i.startswith("re:") and re.match(i[3:], module)) for i in ignore)

    return {"attention": "int4" if quantized("model.layers.0.self_attn.q_proj", "q_proj") else "bf16",
            "experts": "int4" if quantized("model.layers.0.block_sparse_moe.experts.0.w1", "w1") else "bf16"}
