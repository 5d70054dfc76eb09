"""Checkpoints on disk: resolve a source, read sharded safetensors through the index, write packed shards.

Reading never loads a whole shard: tensors come one at a time from memory-mapped files (safe_open).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections import defaultdict

import torch
from safetensors import safe_open

from . import compressed, formats
from .config import MixtralConfig

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

    Use as a context manager (or call close()): open shard handles are cached.
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
        return _ST_DTYPES[sl.get_dtype()], tuple(sl.get_shape())

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
        t = self._handle(self.weight_map[name]).get_tensor(name)
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
        unsupported = [k for k in ("weight_zero_point", "weight_g_idx") if k in t]
        if "weight_g_idx" in t and "weight_scale" in t:  # GPTQ's group index: fine when it is the plain grouping
            g_idx, (rows, groups) = t["weight_g_idx"], t["weight_scale"].shape
            plain = torch.arange(g_idx.numel(), device=g_idx.device) // max(g_idx.numel() // groups, 1)
            if g_idx.dim() == 1 and g_idx.numel() % groups == 0 and torch.equal(g_idx.long(), plain):
                unsupported.remove("weight_g_idx")
                del t["weight_g_idx"]
        for extra in unsupported:
            what = ("asymmetric int4 (zero points)" if extra == "weight_zero_point"
                    else "activation-ordered groups (a permuted weight_g_idx)")  # fmt: skip
            raise CheckpointError(f"{self.path}: {prefix}.{extra}: {what} is not supported; supported: "
                                  "W4A16 pack-quantized, symmetric, strategy group")  # fmt: skip
        for k in formats.INT4_KEYS:
            if k not in t:
                raise CheckpointError(f"{self.path}: tensor {prefix}.{k!r} is missing (an int4 weight needs "
                                      f"{', '.join(formats.INT4_KEYS)}); re-quantize or re-download the checkpoint")
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

    def close(self):
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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
            self._buffer[k] = t.detach().to("cpu").contiguous()
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
    from .formats import QUANT_STATE_KEY, unpack_quant_state

    with CheckpointReader(path) as r:
        r.verify()
        classes: dict[str, dict] = {}
        for prefix, keys in sorted(r.modules_index().items()):
            rel = {k[len(prefix) + 1:] for k in keys}
            name = prefix + ".weight" if "weight" in rel else keys[0]
            cls = tensor_class(name)
            nbytes = sum(r.nbytes(k) for k in keys)
            if "weight." + QUANT_STATE_KEY in rel:
                fmt = "nf4"
                meta = unpack_quant_state(r.get(f"{prefix}.weight.{QUANT_STATE_KEY}"))
                params = math.prod(meta["shape"])
            elif "SCB" in rel:
                fmt, params = "int8", math.prod(r.info(prefix + ".weight")[1])
            elif "weight_packed" in rel:  # compressed-tensors int4: weight_shape holds [out, in]
                fmt, params = "int4", math.prod(r.get(prefix + ".weight_shape").tolist())
            else:
                dtype, shape = r.info(keys[0] if len(keys) == 1 else prefix + ".weight")
                fmt = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))
                params = math.prod(shape)
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
            "total": {"params": params, "bytes": nbytes, "bits_per_param": 8 * nbytes / max(params, 1)},
        }  # fmt: skip
