"""Checkpoints on disk: resolve a source, read sharded safetensors through the index, write packed shards.

Reading never loads a whole shard: tensors come one at a time from memory-mapped files (safe_open), and the reader
keeps the data pages of one shard mapped at a time (a mapped page read once stays resident: counted in RSS and
charged by a cgroup), so reading a checkpoint in shard order holds at most its largest shard.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass

import torch
from safetensors import safe_open

from . import compressed, formats
from .config import MixtralConfig
from .formats import NESTED_BLOCKSIZE, NF4_BLOCKSIZES, QUANT_STATE_KEY

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
BUILTIN_PREFIX = "builtin:"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Files copied next to the weights: the tokenizer (also named after its version, as mistral-common does) and the
# generation defaults.
AUX_FILES = ("tokenizer.model", "tokenizer.model.v1", "tokenizer.model.v2", "tokenizer.model.v3", "tokenizer.model.v7",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "tokenizer.model.v*"]
_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
              "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
              "BOOL": torch.bool}

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked; the message names the file and the fix."""


class CheckpointReader:
    """Read-only view of a checkpoint directory: config, tensor names, and tensors one at a time.

    Use as a context manager (or call close()). Shard headers stay open; the data of a shard stays mapped only
    until a tensor of another shard is read (then that shard's mapping is dropped and reopened when needed).
    """

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        if not os.path.isdir(self.path):
            raise CheckpointError(f"{path}: no such checkpoint directory")
        self.config = MixtralConfig.from_file(self.path)
        qc = self.config.raw.get("quantization_config")
        # compressed-tensors W4A16 (ours or the Hub's): its int4 weights are repacked to NF4 by module() below
        self.int4_group_size = (compressed.check_config(qc, os.path.join(self.path, "config.json"))
                                if compressed.is_compressed_tensors(qc) else None)  # fmt: skip
        self._handles: dict[str, object] = {}
        self._data_shard: str | None = None  # the shard whose data pages the last get() touched
        self.weight_map = self._read_weight_map()  # tensor name -> shard file name
        for shard in sorted(set(self.weight_map.values())):
            self._handle(shard)  # opens every shard now: a truncated or corrupt header fails here, by name

    def _read_weight_map(self) -> dict[str, str]:
        index = os.path.join(self.path, INDEX_NAME)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    wm = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
            if not isinstance(wm, dict):
                raise CheckpointError(f"{index}: not a safetensors index (weight_map is not an object)")
            for shard in sorted(set(wm.values())):
                self._check_shard_path(index, shard)
            return dict(wm)
        single = os.path.join(self.path, SINGLE_NAME)
        if os.path.isfile(single):
            return {k: SINGLE_NAME for k in self._handle(SINGLE_NAME).keys()}
        ggufs = sorted(f for f in os.listdir(self.path) if f.endswith(".gguf"))
        if ggufs:
            raise CheckpointError(f"{self.path}: a GGUF checkpoint ({ggufs[0]}); GGUF is not supported: {SUPPORTED}")
        pickles = sorted(f for f in os.listdir(self.path) if f.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise CheckpointError(
                f"{self.path}: only pickle weights ({', '.join(pickles[:3])}); mixtral-quant never loads pickles "
                "(they can run code): use the safetensors files of this model (e.g. re-download with *.safetensors)"
            )
        raise CheckpointError(f"{self.path}: no {INDEX_NAME} or {SINGLE_NAME} found")

    def _check_shard_path(self, index: str, shard) -> None:
        # An index entry must name a file inside the checkpoint directory (no '../x', no absolute path).
        if not isinstance(shard, str) or not shard or os.path.isabs(shard) or os.path.normpath(shard).startswith(".."):
            raise CheckpointError(f"{index}: shard path {shard!r} leaves the checkpoint directory; refusing to read it")
        full = os.path.realpath(os.path.join(self.path, shard))
        if os.path.commonpath([full, os.path.realpath(self.path)]) != os.path.realpath(self.path):
            raise CheckpointError(f"{index}: shard path {shard!r} leaves the checkpoint directory; refusing to read it")
        if not os.path.isfile(full):
            raise CheckpointError(
                f"{os.path.join(self.path, shard)}: listed in {INDEX_NAME} but missing; re-download it"
            )

    def _handle(self, shard: str):
        if shard not in self._handles:
            f = os.path.join(self.path, shard)
            try:
                self._handles[shard] = safe_open(f, "pt")
            except Exception as e:  # safetensors raises its own SafetensorError (not a ValueError) on bad headers
                raise CheckpointError(f"{f}: truncated or corrupt safetensors file ({e}); re-download it") from None
        return self._handles[shard]

    def shards(self) -> list[str]:
        """Shard file names, in index order."""
        return list(dict.fromkeys(self.weight_map.values()))

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """(dtype, shape) of a tensor from its shard header, without reading its data."""
        sl = self._handle(self.weight_map[name]).get_slice(name)
        dtype = _ST_DTYPES.get(sl.get_dtype())
        if dtype is None:  # e.g. F8_E4M3 (fp8 checkpoints)
            raise CheckpointError(f"{os.path.join(self.path, self.weight_map[name])}: {name} is stored as "
                                  f"{sl.get_dtype()}, which mixtral-quant does not read: {SUPPORTED}")
        return dtype, tuple(sl.get_shape())

    def nbytes(self, name: str) -> int:
        dtype, shape = self.info(name)
        return math.prod(shape) * dtype.itemsize

    def verify(self) -> None:
        """Every index entry is in its shard's header and every header tensor is in the index."""
        by_shard = defaultdict(set)
        for k, s in self.weight_map.items():
            by_shard[s].add(k)
        for shard, names in by_shard.items():
            found = set(self._handle(shard).keys())
            missing = sorted(names - found)
            if missing:
                raise CheckpointError(
                    f"{os.path.join(self.path, shard)}: {len(missing)} tensor(s) listed in {INDEX_NAME} are not in "
                    f"this file (first: {missing[0]!r}); the index and shards disagree, re-download or re-quantize"
                )
            extra = sorted(found - names)
            if extra:
                raise CheckpointError(
                    f"{os.path.join(self.path, shard)}: tensor {extra[0]!r} is in the file but not in {INDEX_NAME}"
                )

    def validate_source(self) -> None:
        """A half-precision Hub-layout Mixtral: exactly the expected keys, each with config.json's shape."""
        if self.quantization_config():
            raise CheckpointError(f"{self.path}/config.json: already quantized (quantization_config present); "
                                  "quantize the original half-precision checkpoint")
        self.verify()
        expected = expected_shapes(self.config)
        for name, shape in expected.items():
            if name not in self.weight_map:
                raise CheckpointError(f"{self.path}: tensor {name!r} is missing (config.json expects shape "
                                      f"{list(shape)}); is this a complete Mixtral checkpoint?")
            dtype, found = self.info(name)
            if found != shape:
                raise CheckpointError(
                    f"{os.path.join(self.path, self.weight_map[name])}: {name} has shape {list(found)}, config.json "
                    f"expects {list(shape)}; the config and the weights are from different models"
                )
            if not dtype.is_floating_point:
                raise CheckpointError(f"{os.path.join(self.path, self.weight_map[name])}: {name} is {dtype}, "
                                      "expected a floating-point (bf16/fp16/fp32) weight")
        for name in self.weight_map:
            if name not in expected:
                raise CheckpointError(f"{os.path.join(self.path, self.weight_map[name])}: unexpected tensor {name!r} "
                                      "for a Mixtral checkpoint")

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.path}: tensor {name!r} is not in the checkpoint")
        shard = self.weight_map[name]
        if self._data_shard not in (None, shard):
            self.release(self._data_shard)
        self._data_shard = shard
        t = self._handle(shard).get_tensor(name)
        return t if str(device) == "cpu" else t.to(device)

    def module(self, prefix: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """All tensors under `prefix.` with the prefix removed (e.g. 'weight', 'weight.absmax', 'SCB')."""
        p = prefix + "."
        t = {k[len(p):]: self.get(k, device) for k in self.modules_index().get(prefix, ())}
        if any(k in t for k in formats.INT4_KEYS):
            return self._int4_module(prefix, t)
        return t

    def _int4_module(self, prefix: str, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A compressed-tensors int4 linear, repacked once into the NF4 layout the model and kernels run."""
        check_int4_keys(self.path, prefix, set(t))  # zero points, missing tensors
        if "weight_g_idx" in t:  # GPTQ's group index: fine when it is the plain grouping
            g_idx, (rows, groups) = t["weight_g_idx"], t["weight_scale"].shape
            plain = torch.arange(g_idx.numel(), device=g_idx.device) // max(g_idx.numel() // groups, 1)
            if not (g_idx.dim() == 1 and g_idx.numel() % groups == 0 and torch.equal(g_idx.long(), plain)):
                raise CheckpointError(f"{self.path}: {prefix}.weight_g_idx: activation-ordered groups (a permuted "
                                      "weight_g_idx) is not supported; supported: W4A16 pack-quantized, symmetric, "
                                      "strategy group")  # fmt: skip
            del t["weight_g_idx"]
        try:
            d = formats.int4_as_nf4(t, prefix)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{self.path}: {e.args[0]}; re-quantize or re-download the checkpoint") from None
        group = formats.unpack_quant_state(d["weight." + formats.QUANT_STATE_KEY])["blocksize"]
        if self.int4_group_size is not None and group != self.int4_group_size:
            raise CheckpointError(f"{self.path}: {prefix}.weight_scale implies groups of {group}, config.json says "
                                  f"{self.int4_group_size}; the config and the weights disagree")
        return d

    def modules_index(self) -> dict[str, list[str]]:
        """Module prefix -> the full key names stored for it (a quantized weight has several)."""
        if not hasattr(self, "_modules"):
            mods = defaultdict(list)
            for k in self.weight_map:
                mods[module_prefix(k)].append(k)
            self._modules = dict(mods)
        return self._modules

    def quantization_config(self) -> dict | None:
        return self.config.raw.get("quantization_config")

    def encoding(self) -> "Encoding":
        """What the checkpoint holds (read_encoding), refusing what mixtral-quant cannot read; cached."""
        if not hasattr(self, "_encoding"):
            self._encoding = read_encoding(self)
        return self._encoding

    def check(self) -> "Encoding":
        """encoding() plus every tensor's shape and dtype against config.json (check_tensors), once per reader:
        what the loader calls before it allocates anything."""
        if not getattr(self, "_checked", False):
            check_tensors(self, self.encoding())
            self._checked = True
        return self.encoding()

    def release(self, shard: str) -> None:
        """Unmap `shard` (the pages it read leave this process); its header is read again if asked for."""
        self._handles.pop(shard, None)
        if self._data_shard == shard:
            self._data_shard = None

    def close(self):
        self._handles.clear()
        self._data_shard = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_int4_keys(path: str, prefix: str, names: set[str]) -> None:
    """A compressed-tensors int4 linear holds weight_packed, weight_scale, weight_shape and no zero points (a
    weight_g_idx is checked when the module is read: CheckpointReader._int4_module); else one CheckpointError."""
    if "weight_zero_point" in names:
        raise CheckpointError(f"{path}: {prefix}.weight_zero_point: asymmetric int4 (zero points) is not supported; "
                              "supported: W4A16 pack-quantized, symmetric, strategy group")  # fmt: skip
    for k in formats.INT4_KEYS:
        if k not in names:
            raise CheckpointError(f"{path}: tensor {prefix}.{k!r} is missing (an int4 weight needs "
                                  f"{', '.join(formats.INT4_KEYS)}); re-quantize or re-download the checkpoint")


def module_prefix(key: str) -> str:
    """'model.layers.0.self_attn.q_proj.weight.absmax' -> 'model.layers.0.self_attn.q_proj'."""
    for marker in (".weight.", ".SCB"):
        i = key.find(marker)
        if i >= 0:
            return key[:i]
    return key.rsplit(".", 1)[0]


# ---- tensor names and classes -------------------------------------------------------------------------------

TENSOR_CLASSES = ("attention", "experts", "router", "embeddings", "lm_head", "norms")


def tensor_class(name: str) -> str:
    """The recipe class of a Hub-layout tensor (or module prefix): attention, experts, router, embeddings, ..."""
    if ".self_attn." in name:
        return "attention"
    if ".block_sparse_moe.experts." in name:
        return "experts"
    if ".block_sparse_moe.gate" in name:
        return "router"
    if "embed_tokens" in name:
        return "embeddings"
    if name.startswith("lm_head"):
        return "lm_head"
    if "norm" in name:
        return "norms"
    raise CheckpointError(f"tensor {name!r} is not part of a Mixtral checkpoint")


def expected_shapes(config: MixtralConfig) -> dict[str, tuple[int, ...]]:
    """Every weight of a Hub-layout Mixtral checkpoint and its [out, in] shape, from the config."""
    D, F, E, V = config.hidden_size, config.intermediate_size, config.num_local_experts, config.vocab_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    shapes = {"model.embed_tokens.weight": (V, D)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (D,)
        shapes[p + "self_attn.q_proj.weight"] = (q, D)
        shapes[p + "self_attn.k_proj.weight"] = (kv, D)
        shapes[p + "self_attn.v_proj.weight"] = (kv, D)
        shapes[p + "self_attn.o_proj.weight"] = (D, q)
        shapes[p + "post_attention_layernorm.weight"] = (D,)
        shapes[p + "block_sparse_moe.gate.weight"] = (E, D)
        for e in range(E):
            x = p + f"block_sparse_moe.experts.{e}."
            shapes[x + "w1.weight"] = (F, D)
            shapes[x + "w2.weight"] = (D, F)
            shapes[x + "w3.weight"] = (F, D)
    shapes["model.norm.weight"] = (D,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    return shapes


# ---- what a checkpoint holds --------------------------------------------------------------------------------

SUPPORTED = ("mixtral-quant reads bf16/fp16/fp32 Mixtral checkpoints, its own nf4/int8 output, bitsandbytes nf4 "
             "(with or without double quant) and 8-bit checkpoints as transformers 4.x saves them, and compressed-"
             "tensors W4A16 pack-quantized (int4) ones")
QUANTIZED = ("nf4", "int8", "int4")
FLOAT_FORMATS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# quant_method of other quantizers -> what to call them in the refusal
OTHER_METHODS = {"gptq": "GPTQ", "awq": "AWQ", "gguf": "GGUF",
                 "fp8": "fp8", "fbgemm_fp8": "fp8", "hqq": "HQQ", "aqlm": "AQLM", "quanto": "quanto",
                 "torchao": "torchao", "eetq": "EETQ", "exl2": "EXL2", "mxfp4": "MXFP4", "bitnet": "BitNet"}


@dataclass(frozen=True)
class Encoding:
    """What a checkpoint holds: who quantized it and the format of every module (from its tensors)."""

    method: str  # "none" (nothing quantized), "mixtral-quant" (our output), "bitsandbytes" (transformers 4.x),
    # "compressed-tensors" (int4 W4A16, ours or the Hub's)
    modules: dict[str, str]  # module prefix -> nf4, int8, int4, bf16, fp16 or fp32
    blocksize: int | None = None  # nf4 block size (None without nf4)
    double_quant: bool | None = None  # nf4 absmax double-quantized (None without nf4)
    group_size: int | None = None  # int4 inputs per scale (None without int4)

    def class_formats(self) -> dict[str, str]:
        """Tensor class -> its format ('int8+nf4' where a class mixes formats)."""
        per: dict[str, set] = {}
        for prefix, fmt in self.modules.items():
            per.setdefault(tensor_class(prefix), set()).add(fmt)
        order = {k: i for i, k in enumerate(TENSOR_CLASSES)}
        return {c: "+".join(sorted(f)) for c, f in sorted(per.items(), key=lambda kv: order[kv[0]])}

    def describe(self) -> str:
        """One line: 'bitsandbytes: attention nf4, experts nf4, router nf4 (blocksize 64, double quant)'."""
        cf = self.class_formats()
        parts = [f"{c} {cf[c]}" for c in ("attention", "experts", "router", "lm_head") if c in cf]
        nf4 = f" (nf4 blocksize {self.blocksize}{', double quant' if self.double_quant else ''})" if self.blocksize else ""
        if self.method == "compressed-tensors":
            return f"compressed-tensors pack-quantized int4 group {self.group_size}: {', '.join(parts)}"
        return f"{self.method}: {', '.join(parts)}{nf4}"


def module_format(tensors: dict[str, torch.dtype]) -> str:
    """The format of one module from its tensors (names relative to the module -> dtype): nf4, int8, bf16, fp16 or
    fp32. Encodings mixtral-quant cannot read are a ValueError saying what they are."""
    names = set(tensors)
    other_4bit = sorted(k for k in names if k.startswith("weight.quant_state.bitsandbytes__") and k != "weight." +
                        QUANT_STATE_KEY)  # fmt: skip
    if other_4bit:
        kind = other_4bit[0].rsplit("__", 1)[1]
        raise ValueError(f"bitsandbytes {kind} weights; {kind} is not supported, only nf4")
    if "weight." + QUANT_STATE_KEY in names:
        return "nf4"
    if {"qweight", "qzeros"} & names:
        raise ValueError("GPTQ/AWQ weights (qweight, qzeros, scales); GPTQ and AWQ are not supported")
    if "weight_packed" in names:  # compressed-tensors int4 (check_int4_keys says what else it must hold)
        return "int4"
    if "weight" not in names:
        raise ValueError(f"no 'weight' tensor (found {', '.join(sorted(names))})")
    dtype = tensors["weight"]
    if "SCB" in names:
        if dtype != torch.int8:
            raise ValueError(f"an 8-bit weight (SCB present) stored as {dtype}, expected int8")
        return "int8"
    if dtype in FLOAT_FORMATS:
        return FLOAT_FORMATS[dtype]
    if dtype == torch.int8:
        raise ValueError("an int8 weight without its SCB row scales; re-download the checkpoint")
    if dtype == torch.uint8:
        raise ValueError("a packed 4-bit weight without its quant_state; re-download the checkpoint")
    raise ValueError(f"a weight stored as {dtype}")


def quant_method(qc: dict, conf: str) -> str | None:
    """The quant_method of a quantization_config (None, mixtral-quant, bitsandbytes or compressed-tensors), refusing
    in one line what cannot be read: other methods (GPTQ, AWQ, fp8, ...), bitsandbytes fp4, both load_in flags
    without our own fields. `conf` names the file in messages. Compressed-tensors schemes other than W4A16 are
    refused by compressed.check_config."""
    if not isinstance(qc, dict):
        raise CheckpointError(f"{conf}: quantization_config is not an object")
    method = str(qc.get("quant_method", "")).lower() or None
    if method is None and any(k in qc for k in ("load_in_4bit", "load_in_8bit")):
        method = "bitsandbytes"  # early transformers 4.x configs had no quant_method
    if method not in (None, "mixtral-quant", "bitsandbytes", "compressed-tensors"):
        what = OTHER_METHODS.get(method, f"quant_method {method!r}")
        raise CheckpointError(f"{conf}: a {what} checkpoint; {what} is not supported: {SUPPORTED}")
    if method == "bitsandbytes":
        if qc.get("load_in_4bit") and qc.get("load_in_8bit") and not isinstance(qc.get("formats"), dict):
            raise CheckpointError(f"{conf}: quantization_config has both load_in_4bit and load_in_8bit; "
                                  "the checkpoint is inconsistent, re-download it")  # fmt: skip
        if qc.get("load_in_4bit") and qc.get("bnb_4bit_quant_type", "nf4") != "nf4":
            kind = qc.get("bnb_4bit_quant_type")
            raise CheckpointError(f"{conf}: a bitsandbytes {kind} checkpoint (bnb_4bit_quant_type {kind!r}); {kind} "
                                  f"is not supported, only nf4: {SUPPORTED}")  # fmt: skip
    return method


def read_encoding(reader: "CheckpointReader") -> Encoding:
    """What `reader`'s checkpoint holds, from its quantization_config and its tensors (the tensors decide where the
    config is silent); unsupported encodings (bnb fp4, GPTQ, AWQ, fp8, ...) are refused with
    one line (compressed-tensors schemes other than W4A16: compressed.check_config, when the reader opens). The one
    place a checkpoint's encoding is recognised: add a branch here for a new one."""
    conf = os.path.join(reader.path, "config.json")
    qc = reader.quantization_config() or {}
    method = quant_method(qc, conf)
    ours = isinstance(qc.get("formats"), dict)  # mixtral-quant's own fields (also beside a bitsandbytes block)
    modules: dict[str, str] = {}
    for prefix, keys in reader.modules_index().items():
        try:
            modules[prefix] = module_format({k[len(prefix) + 1:]: reader.info(k)[0] for k in keys})
        except ValueError as e:
            if isinstance(e, CheckpointError):
                raise
            where = os.path.join(reader.path, reader.weight_map[keys[0]])
            raise CheckpointError(f"{where}: {prefix} holds {e}: {SUPPORTED}") from None
    quantized = {p: f for p, f in modules.items() if f in QUANTIZED}
    if method == "bitsandbytes" and not ours:
        want = "nf4" if qc.get("load_in_4bit") else "int8" if qc.get("load_in_8bit") else None
        wrong = sorted(p for p, f in quantized.items() if want and f != want)
        if wrong:
            raise CheckpointError(f"{conf}: quantization_config says {want} but {wrong[0]} holds "
                                  f"{quantized[wrong[0]]}; the config and the weights disagree, re-download")  # fmt: skip
    if ours:
        for cls, fmt in qc["formats"].items():
            held = {f for p, f in modules.items() if tensor_class(p) == cls}
            if held and (held != {fmt} if fmt in QUANTIZED else bool(held & set(QUANTIZED))):
                raise CheckpointError(f"{conf}: quantization_config says {cls} {fmt} but the tensors hold "
                                      f"{'+'.join(sorted(held))}; the config and the weights disagree, re-quantize")  # fmt: skip
    blocksize = double = None
    nf4 = sorted(p for p, f in quantized.items() if f == "nf4")
    if nf4:
        blocksize = int(reader_quant_state(reader, nf4[0])["blocksize"])
        double = f"{nf4[0]}.weight.nested_absmax" in reader
    int4 = any(f == "int4" for f in quantized.values())
    if int4 and method != "compressed-tensors":
        raise CheckpointError(f"{conf}: int4 weights (weight_packed) without a compressed-tensors quantization_config; "
                              "re-download the checkpoint's config.json")  # fmt: skip
    name = "mixtral-quant" if ours else method or ("bitsandbytes" if quantized else "none")
    return Encoding(name, modules, blocksize, double, reader.int4_group_size if int4 else None)


def reader_quant_state(reader: "CheckpointReader", prefix: str) -> dict:
    """The JSON quant state of nf4 module `prefix` (a small uint8 tensor)."""
    from .formats import unpack_quant_state

    key = f"{prefix}.weight.{QUANT_STATE_KEY}"
    try:
        meta = unpack_quant_state(reader.get(key))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{os.path.join(reader.path, reader.weight_map[key])}: {key} is not a JSON quant "
                              f"state ({e}); re-download or re-quantize") from None  # fmt: skip
    if not isinstance(meta, dict):
        raise CheckpointError(f"{os.path.join(reader.path, reader.weight_map[key])}: {key} is not a JSON object")
    return meta


def check_tensors(reader: "CheckpointReader", enc: Encoding) -> None:
    """Every tensor's shape and dtype against config.json, whatever its format (router, norms, embeddings and
    lm_head included): a mismatch, a missing or an unexpected tensor is one CheckpointError naming the tensor.
    Reads headers and the nf4 quant states only. Layers beyond num_hidden_layers are left to the caller."""
    config = reader.config
    expected = expected_shapes(config)
    mods = reader.modules_index()
    if "lm_head" in mods:  # tied embeddings may still store a copy; it is loaded, so it is checked
        expected.setdefault("lm_head.weight", (config.vocab_size, config.hidden_size))
    for name, shape in expected.items():
        prefix = name.removesuffix(".weight")
        if prefix not in mods:
            raise CheckpointError(f"{reader.path}: tensor {name!r} is missing (config.json expects shape "
                                  f"{list(shape)}); re-download or re-quantize the checkpoint")  # fmt: skip
        fmt, keys = enc.modules[prefix], mods[prefix]
        info = {k[len(prefix) + 1:]: reader.info(k) for k in keys}
        where = os.path.join(reader.path, reader.weight_map[keys[0]])

        def bad(rel: str, got, want) -> CheckpointError:
            return CheckpointError(f"{where}: {prefix}.{rel} is {got}, config.json implies {want}; the checkpoint "
                                   "and its config.json disagree (re-download or re-quantize)")  # fmt: skip

        def want(rel: str, dtype: torch.dtype, shp: tuple) -> None:
            if rel not in info:
                raise CheckpointError(f"{where}: tensor {prefix}.{rel} is missing; re-download or re-quantize")
            got = info.pop(rel)
            if got != (dtype, tuple(shp)):
                raise bad(rel, f"{str(got[0]).removeprefix('torch.')} {list(got[1])}",
                          f"{str(dtype).removeprefix('torch.')} {list(shp)}")  # fmt: skip

        cls = tensor_class(prefix)
        if fmt in QUANTIZED and (cls not in ("attention", "experts", "router") or len(shape) != 2):
            raise CheckpointError(f"{where}: {prefix} is stored as {fmt}; mixtral-quant keeps {cls} in 16 bits "
                                  "(quantize the original checkpoint with mixq quantize)")  # fmt: skip
        if fmt == "int4":
            check_int4_keys(reader.path, prefix, set(info))
            info.pop("weight_g_idx", None)  # a plain grouping is accepted, a permuted one refused, at read
            group = enc.group_size or 0
            stored = reader.get(f"{prefix}.weight_shape")
            want("weight_shape", stored.dtype, (2,))
            if stored.dtype not in (torch.int32, torch.int64) or stored.tolist() != list(shape):
                raise bad("weight_shape", f"{stored.tolist()}", f"{list(shape)}")
            want("weight_packed", torch.int32, (shape[0], -(-shape[1] // 8)))
            scale_dtype = info["weight_scale"][0]
            if scale_dtype not in FLOAT_FORMATS or not group or shape[1] % group:
                raise bad("weight_scale", f"{str(scale_dtype).removeprefix('torch.')} {list(info['weight_scale'][1])}",
                          f"a 16/32-bit float [{shape[0]}, {shape[1]} / group size {group}]")  # fmt: skip
            want("weight_scale", scale_dtype, (shape[0], shape[1] // group))
        elif fmt in FLOAT_FORMATS.values():
            dtype, got = info.pop("weight")
            if got != shape:
                raise bad("weight", f"{str(dtype).removeprefix('torch.')} {list(got)}", f"shape {list(shape)}")
        elif fmt == "int8":
            want("weight", torch.int8, shape)
            want("SCB", torch.float32, shape[:1])
            if "weight_format" in info:  # bitsandbytes' layout tag: 0 = row-major, the only one it saves
                want("weight_format", torch.uint8, ())
                if int(reader.get(f"{prefix}.weight_format")) != 0:
                    raise CheckpointError(f"{where}: {prefix}.weight_format is not 0 (row-major); only the row "
                                          "layout bitsandbytes saves is supported")  # fmt: skip
        else:  # nf4
            meta = reader_quant_state(reader, prefix)
            info.pop("weight." + QUANT_STATE_KEY)
            if meta.get("quant_type") != "nf4" or list(meta.get("shape", [])) != list(shape):
                raise bad("weight." + QUANT_STATE_KEY, f"{meta.get('quant_type')} {meta.get('shape')}",
                          f"nf4 {list(shape)}")  # fmt: skip
            bs, n = meta.get("blocksize"), math.prod(shape)
            if bs not in NF4_BLOCKSIZES:
                raise bad("weight." + QUANT_STATE_KEY, f"blocksize {bs}", "a power of two from 32 to 4096")
            blocks = -(-n // bs)
            want("weight", torch.uint8, ((n + 1) // 2, 1))
            want("weight.quant_map", torch.float32, (16,))
            if "nested_offset" in meta:
                nbs = int(meta.get("nested_blocksize", NESTED_BLOCKSIZE))
                want("weight.absmax", torch.uint8, (blocks,))
                want("weight.nested_absmax", torch.float32, (-(-blocks // nbs),))
                want("weight.nested_quant_map", torch.float32, (256,))
            else:
                want("weight.absmax", torch.float32, (blocks,))
        if info:
            raise CheckpointError(f"{where}: unexpected tensor {prefix}.{sorted(info)[0]} for a {fmt} weight; "
                                  "re-download or re-quantize the checkpoint")  # fmt: skip
    n_layers = config.num_hidden_layers
    for prefix, keys in mods.items():
        if prefix + ".weight" in expected:
            continue
        parts = prefix.split(".")
        if prefix.startswith("model.layers.") and parts[2].isdigit() and int(parts[2]) >= n_layers:
            continue  # layers beyond num_hidden_layers: the loader warns and ignores them
        raise CheckpointError(f"{os.path.join(reader.path, reader.weight_map[keys[0]])}: unexpected tensor "
                              f"{keys[0]!r} for a Mixtral checkpoint with this config.json")  # fmt: skip


def quantized_recipe(src: str, config: MixtralConfig) -> dict | None:
    """How checkpoint `src` is quantized, for planning its memory: {"attention", "experts", "blocksize",
    "double_quant"}, or None when it is not quantized. From the tensors when `src` is a local checkpoint
    directory (read_encoding, which also refuses what cannot be loaded), else from config.json alone."""
    if os.path.isdir(src) and any(os.path.isfile(os.path.join(src, n)) for n in (INDEX_NAME, SINGLE_NAME)):
        with CheckpointReader(src) as r:
            enc = r.encoding()
        cf = enc.class_formats()
        if not set(cf.get("attention", "").split("+") + cf.get("experts", "").split("+")) & set(QUANTIZED):
            return None
        fmts = {c: cf[c] if cf.get(c) in ("nf4", "int8", "int4", "bf16", "fp16") else None
                for c in ("attention", "experts")}  # fmt: skip
        return {**fmts, "blocksize": enc.blocksize or 64, "double_quant": enc.double_quant is not False,
                "group_size": enc.group_size}  # fmt: skip
    qc = config.raw.get("quantization_config") or {}
    method = quant_method(qc, "config.json")
    if compressed.is_compressed_tensors(qc):
        group = compressed.check_config(qc, f"{src}: config.json")
        return {**compressed.recipe_from_config(qc), "group_size": group}
    if isinstance(qc.get("formats"), dict):
        f = qc["formats"]
        return {"attention": f.get("attention"), "experts": f.get("experts"), "blocksize": qc.get("blocksize", 64),
                "double_quant": qc.get("double_quant", True)}  # fmt: skip
    if method == "bitsandbytes" and qc.get("load_in_4bit"):
        return {"attention": "nf4", "experts": "nf4", "blocksize": 64,
                "double_quant": bool(qc.get("bnb_4bit_use_double_quant", False))}  # fmt: skip
    if method == "bitsandbytes" and qc.get("load_in_8bit"):
        return {"attention": "int8", "experts": "int8", "blocksize": 64, "double_quant": True}
    return None


# ---- resolving a source -------------------------------------------------------------------------------------

def builtin_dir(name: str) -> str:
    """The directory of an embedded model (`builtin:NAME` -> mixtral_quant/data/NAME)."""
    data = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
    known = sorted(d for d in os.listdir(data) if os.path.isdir(os.path.join(data, d))) if os.path.isdir(data) else []
    path = os.path.join(data, name)
    if name not in known or not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(
            f"{BUILTIN_PREFIX}{name}: no embedded model at {path} (available: {', '.join(known) or 'none yet'}); "
            "pass a checkpoint directory or a Hugging Face repo id instead"
        )
    return path


def _looks_like_repo_id(src: str) -> bool:
    parts = src.split("/")
    return len(parts) == 2 and all(parts) and not src.startswith((".", "~")) and not os.path.isabs(src)


def _hub_options() -> dict:
    # Read at call time (huggingface_hub reads its env variables once, at import).
    cache = os.environ.get("HF_HUB_CACHE")
    if not cache and os.environ.get("HF_HOME"):
        cache = os.path.join(os.environ["HF_HOME"], "hub")
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return {"cache_dir": cache or None, "local_files_only": offline}


def _hub_error(src: str, e: Exception, offline: bool) -> CheckpointError:
    where = ("in the local Hugging Face cache (HF_HUB_OFFLINE=1)" if offline
             else "on the Hugging Face Hub or in the cache")
    return CheckpointError(f"{src}: not a local directory and not found {where} ({type(e).__name__}); "
                           "check the path or repo id, or unset HF_HUB_OFFLINE to download")


def resolve_source(src: str, allow_download: bool = True) -> str:
    """A local checkpoint directory for `src`: a directory, `builtin:NAME`, or a Hub repo id (downloads only
    *.safetensors, *.json and tokenizer.model; cache only with HF_HUB_OFFLINE=1 or allow_download=False)."""
    src = str(src)
    if src.startswith(BUILTIN_PREFIX):
        return builtin_dir(src[len(BUILTIN_PREFIX):])
    if os.path.isdir(src):
        return os.path.abspath(src)
    if os.path.exists(src):
        raise CheckpointError(f"{src}: is a file; pass the checkpoint directory that holds it")
    if not _looks_like_repo_id(src):
        raise CheckpointError(f"{src}: no such directory (and not a Hugging Face repo id like org/name)")
    from huggingface_hub import snapshot_download

    opts = _hub_options()
    opts["local_files_only"] = opts["local_files_only"] or not allow_download
    try:
        return snapshot_download(src, allow_patterns=HUB_PATTERNS, **opts)
    except Exception as e:  # hub errors (not found, gated, offline miss, bad id) are many classes
        raise _hub_error(src, e, opts["local_files_only"]) from None


def resolve_config(src: str, allow_download: bool = True) -> MixtralConfig:
    """The config of `src` without its weights: a known name, a directory, a config.json, builtin:NAME, or a
    repo id (fetches config.json only)."""
    from .config import KNOWN_CONFIGS

    src = str(src)
    if src in KNOWN_CONFIGS:
        return MixtralConfig.from_name(src)
    if src.startswith(BUILTIN_PREFIX):
        return MixtralConfig.from_file(builtin_dir(src[len(BUILTIN_PREFIX):]))
    if os.path.isdir(src) or os.path.isfile(src):
        return MixtralConfig.from_file(src)
    if not _looks_like_repo_id(src):
        raise CheckpointError(f"{src}: no such directory or file, not a known model ({', '.join(KNOWN_CONFIGS)}) "
                              "and not a Hugging Face repo id")
    from huggingface_hub import hf_hub_download

    opts = _hub_options()
    opts["local_files_only"] = opts["local_files_only"] or not allow_download
    try:
        return MixtralConfig.from_file(hf_hub_download(src, "config.json", **opts))
    except Exception as e:
        if isinstance(e, ValueError) and not type(e).__module__.startswith("huggingface_hub"):
            raise
        raise _hub_error(src, e, opts["local_files_only"]) from None


# ---- writing ------------------------------------------------------------------------------------------------

def shard_name(k: int, n: int) -> str:
    return f"model-{k:05d}-of-{n:05d}.safetensors"


class ShardWriter:
    """Writes a checkpoint directory atomically: tensors accumulate up to `max_shard_bytes`, then go to a shard.

    Everything is written into a temporary sibling of `out` that is renamed into place by `finish()`; on an
    exception (KeyboardInterrupt included) inside `with ShardWriter(...)`, the temporary directory is removed.
    """

    def __init__(self, out: str, max_shard_bytes: int = 2_000_000_000, overwrite: bool = False):
        self.out = os.path.abspath(out)
        self.max_shard_bytes = int(max_shard_bytes)
        self.overwrite = overwrite
        check_output_dir(self.out, overwrite)
        parent = os.path.dirname(self.out)
        os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.out)}.partial-", dir=parent)
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffered = 0
        self.max_buffered_bytes = 0  # the largest buffer held (for the streaming-memory test)
        self._parts: list[list[str]] = []  # tensor names per written shard
        self.total_size = 0
        self.finished = False

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Add a group of tensors (one parameter's keys): a group never straddles two shards."""
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self._buffer and self._buffered + size > self.max_shard_bytes:
            self._flush()
        for k, t in tensors.items():
            if k in self._buffer or any(k in p for p in self._parts):
                raise ValueError(f"tensor {k!r} written twice")
            # A copy the writer owns: a tensor read from a source shard is a view of that shard's memory map and
            # would keep the whole map (every page read) resident until this buffer is written.
            self._buffer[k] = t.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
        self._buffered += size
        self.max_buffered_bytes = max(self.max_buffered_bytes, self._buffered)

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._buffer:
            return
        path = os.path.join(self.tmp, f"part-{len(self._parts) + 1}.safetensors")
        save_file(self._buffer, path, metadata={"format": "pt"})
        self._parts.append(sorted(self._buffer))
        self.total_size += self._buffered
        self._buffer, self._buffered = {}, 0

    def write_json(self, name: str, obj) -> None:
        with open(os.path.join(self.tmp, name), "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")

    def copy_file(self, src: str) -> None:
        shutil.copyfile(src, os.path.join(self.tmp, os.path.basename(src)))

    def finish(self) -> str:
        """Name the shards k-of-n, write the index, and move the directory into place."""
        self._flush()
        n = len(self._parts)
        weight_map = {}
        for k, names in enumerate(self._parts, 1):
            os.rename(os.path.join(self.tmp, f"part-{k}.safetensors"), os.path.join(self.tmp, shard_name(k, n)))
            weight_map.update({name: shard_name(k, n) for name in names})
        self.write_json(INDEX_NAME, {"metadata": {"total_size": self.total_size},
                                     "weight_map": dict(sorted(weight_map.items()))})
        if os.path.lexists(self.out):
            check_output_dir(self.out, self.overwrite)  # re-check: something may have appeared meanwhile
            trash = tempfile.mkdtemp(prefix=f".{os.path.basename(self.out)}.old-", dir=os.path.dirname(self.out))
            os.rename(self.out, os.path.join(trash, "old"))
            os.rename(self.tmp, self.out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(self.tmp, self.out)
        self.finished = True
        return self.out

    def abort(self) -> None:
        self._buffer = {}
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self.finished:
            self.abort()
        return False


def check_output_dir(out: str, overwrite: bool) -> None:
    """Refuse an output path that is a file, or a non-empty directory unless `overwrite`."""
    if os.path.isfile(out) or (os.path.lexists(out) and not os.path.isdir(out)):
        raise CheckpointError(f"{out}: exists and is not a directory; choose another output path")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise CheckpointError(
            f"{out}: output directory exists and is not empty; choose another path or pass --overwrite"
        )


# ---- inspecting ---------------------------------------------------------------------------------------------

def inspect_checkpoint(path: str) -> dict:
    """Per tensor class: parameter count, params, format(s), bytes, bits/param; totals. Verifies the index
    against every shard header first. Reads only headers and the small quant-state tensors."""
    with CheckpointReader(path) as r:
        r.verify()
        enc = r.encoding()
        classes: dict[str, dict] = {}
        for prefix, keys in sorted(r.modules_index().items()):
            cls = tensor_class(prefix)
            nbytes = sum(r.nbytes(k) for k in keys)
            fmt = enc.modules[prefix]
            if fmt == "nf4":
                params = math.prod(reader_quant_state(r, prefix)["shape"])
            elif fmt == "int4":  # compressed-tensors int4: weight_shape holds [out, in]
                params = math.prod(r.get(prefix + ".weight_shape").tolist())
            else:
                params = math.prod(r.info(prefix + ".weight")[1])
            c = classes.setdefault(cls, {"count": 0, "params": 0, "bytes": 0, "formats": set()})
            c["count"] += 1
            c["params"] += params
            c["bytes"] += nbytes
            c["formats"].add(fmt)
        for c in classes.values():
            c["format"] = "+".join(sorted(c.pop("formats")))
            c["bits_per_param"] = 8 * c["bytes"] / max(c["params"], 1)
        order = {k: i for i, k in enumerate(TENSOR_CLASSES)}
        classes = dict(sorted(classes.items(), key=lambda kv: order.get(kv[0], 99)))
        params = sum(c["params"] for c in classes.values())
        nbytes = sum(c["bytes"] for c in classes.values())
        return {
            "path": r.path, "shards": len(r.shards()), "tensors": len(r.weight_map),
            "quantization_config": r.quantization_config(), "classes": classes,
            "encoding": {"method": enc.method, "blocksize": enc.blocksize, "double_quant": enc.double_quant,
                         "summary": enc.describe()},
            "total": {"params": params, "bytes": nbytes, "bits_per_param": 8 * nbytes / max(params, 1)},
        }  # fmt: skip
