"""Checkpoints on disk: resolve a source, read sharded safetensors through the index, write packed shards.

Reading never loads a whole shard: tensors come one at a time from memory-mapped files (safe_open).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

import torch
from safetensors import safe_open

from .config import MixtralConfig

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
BUILTIN_PREFIX = "builtin:"


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
        self.weight_map = self._read_weight_map()  # tensor name -> shard file name
        self._handles: dict[str, object] = {}

    def _read_weight_map(self) -> dict[str, str]:
        index = os.path.join(self.path, INDEX_NAME)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    wm = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
            return dict(wm)
        single = os.path.join(self.path, SINGLE_NAME)
        if os.path.isfile(single):
            with safe_open(single, "pt") as f:
                return {k: SINGLE_NAME for k in f.keys()}
        raise CheckpointError(f"{self.path}: no {INDEX_NAME} or {SINGLE_NAME} found")

    def _handle(self, shard: str):
        if shard not in self._handles:
            self._handles[shard] = safe_open(os.path.join(self.path, shard), "pt")
        return self._handles[shard]

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
        return {k[len(p):]: self.get(k, device) for k in self.modules_index().get(prefix, ())}

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
