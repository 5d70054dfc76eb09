"""Mixtral's configuration as a dataclass, read from a config.json written by transformers 4.x or 5.x.

Known configurations are data (KNOWN_CONFIGS), looked up by name; nothing else in the library names a model.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import torch


class ConfigError(ValueError):
    """A config.json that is missing, unreadable or not a Mixtral config."""


@dataclass
class MixtralConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096  # D
    intermediate_size: int = 14336  # F, per expert
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    num_local_experts: int = 8  # E
    num_experts_per_tok: int = 2  # A
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    dtype: str = "bfloat16"  # the checkpoint's dtype
    raw: dict = field(default_factory=dict, repr=False, compare=False)  # the whole config.json

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ConfigError(f"num_experts_per_tok must be in 1..{self.num_local_experts}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @classmethod
    def from_dict(cls, d: dict) -> "MixtralConfig":
        if d.get("model_type") != "mixtral":
            raise ConfigError(f"model_type is {d.get('model_type')!r}, expected 'mixtral'")
        kw = {k: d[k] for k in cls.__dataclass_fields__ if k in d and k not in ("raw", "dtype", "rope_theta")}
        # transformers 5.x: rope_parameters {"rope_theta": ...}; 4.x: rope_theta at the top level
        rope = d.get("rope_parameters") or {}
        kw["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta", 1e6)))
        dtype = d.get("dtype") or d.get("torch_dtype") or "bfloat16"
        kw["dtype"] = str(dtype).removeprefix("torch.")
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        if kw.get("head_dim") is None:
            kw.pop("head_dim", None)
        return cls(**kw, raw=dict(d))

    @classmethod
    def from_file(cls, path: str) -> "MixtralConfig":
        """Read `path` (config.json, or a directory holding one)."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json; a Mixtral checkpoint directory needs one") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(d)
        except (ConfigError, TypeError, ValueError) as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_name(cls, name: str) -> "MixtralConfig":
        if name not in KNOWN_CONFIGS:
            raise ConfigError(f"unknown model {name!r}; known: {', '.join(KNOWN_CONFIGS)}")
        return cls.from_dict({"model_type": "mixtral", **KNOWN_CONFIGS[name]})

    def to_dict(self) -> dict:
        """config.json contents (the original keys kept, ours updated)."""
        d = dict(self.raw) or {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]}
        d.update({k: v for k, v in asdict(self).items() if k != "raw"})
        return d

    @property
    def n_params(self) -> int:
        D, F, E, L, V = self.hidden_size, self.intermediate_size, self.num_local_experts, self.num_hidden_layers, self.vocab_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attn = D * q * 2 + D * kv * 2
        layer = attn + E * 3 * D * F + E * D + 2 * D
        return L * layer + V * D * (1 if self.tie_word_embeddings else 2) + D


KNOWN_CONFIGS = {
    "Mixtral-8x7B-v0.1": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None,
    ),
    "Mixtral-8x22B-v0.1": dict(  # the v3 tokenizer's 32768 tokens ([INST] ... as control tokens)
        vocab_size=32768, hidden_size=6144, intermediate_size=16384, num_hidden_layers=56,
        num_attention_heads=48, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=65536, rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None,
    ),
}  # fmt: skip
