"""Shared fixtures: small random Mixtral checkpoints in the Hugging Face Hub layout, several shards."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import zlib

import pytest
import torch
from safetensors.torch import save_file

# Triton reads TRITON_INTERPRET when a kernel is decorated: set it before any test imports the kernels (CPU only).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256,
    rms_norm_eps=1e-5, rope_theta=500000.0, sliding_window=None, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2,
)  # fmt: skip
# rope_theta is neither transformers' old default (10000) nor Mixtral's and our config's (1e6): a rotary table that
# ignores config.json, either way, disagrees with the transformers oracle.

# Every test starts from a known global RNG state: fresh per run (a new base seed each session), replayable with
# MIXQ_TEST_SEED=<the seed printed in the header and in a failing test's report>.
BASE_SEED = int(os.environ.get("MIXQ_TEST_SEED") or int.from_bytes(os.urandom(4), "little") % 2**31)


def pytest_report_header(config):
    return f"mixq: random base seed {BASE_SEED} (replay: MIXQ_TEST_SEED={BASE_SEED})"


@pytest.fixture(autouse=True)
def seeded(request):
    """Seed torch's and Python's global RNGs from the base seed and the test's id; a failure reports the seed."""
    seed = (BASE_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31
    torch.manual_seed(seed)
    random.seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield seed


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        report.sections.append(("random seed", f"test seed {dict(item.user_properties).get('seed')}, "
                                               f"replay with MIXQ_TEST_SEED={BASE_SEED}"))
    return report


def hub_state_dict(cfg: dict, dtype=torch.bfloat16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under Mixtral's Hub key names (model.layers.N.block_sparse_moe.experts.E.w1.weight, ...)."""
    g = torch.Generator().manual_seed(seed)
    D, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or D // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def rnd(*shape, scale=None):
        scale = scale if scale is not None else shape[-1] ** -0.5
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    sd = {"model.embed_tokens.weight": rnd(V, D, scale=1.0)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = (1 + 0.1 * torch.randn(D, generator=g)).to(dtype)
        sd[p + "post_attention_layernorm.weight"] = (1 + 0.1 * torch.randn(D, generator=g)).to(dtype)
        sd[p + "self_attn.q_proj.weight"] = rnd(q, D)
        sd[p + "self_attn.k_proj.weight"] = rnd(kv, D)
        sd[p + "self_attn.v_proj.weight"] = rnd(kv, D)
        sd[p + "self_attn.o_proj.weight"] = rnd(D, q)
        sd[p + "block_sparse_moe.gate.weight"] = rnd(cfg["num_local_experts"], D)
        for e in range(cfg["num_local_experts"]):
            x = p + f"block_sparse_moe.experts.{e}."
            sd[x + "w1.weight"] = rnd(F, D)
            sd[x + "w2.weight"] = rnd(D, F)
            sd[x + "w3.weight"] = rnd(F, D)
    sd["model.norm.weight"] = (1 + 0.1 * torch.randn(D, generator=g)).to(dtype)
    sd["lm_head.weight"] = rnd(V, D)
    return sd


def write_checkpoint(path, cfg: dict | None = None, *, shards: int = 3, dtype=torch.bfloat16, seed: int = 0,
                     config_style: int = 4, state_dict: dict | None = None, tokenizer: str | None = None) -> str:
    """Write a random (or given) Mixtral checkpoint at `path`, Hub layout, `shards` shards with an index.

    config_style 4 writes transformers-4.x keys (rope_theta, torch_dtype); 5 writes 5.x keys (rope_parameters, dtype).
    tokenizer: a SentencePiece file copied in as `tokenizer.model` (as Hub checkpoints ship it); None: no tokenizer.
    """
    cfg = {**TINY, **(cfg or {})}
    os.makedirs(path, exist_ok=True)
    sd = state_dict if state_dict is not None else hub_state_dict(cfg, dtype, seed)
    names = list(sd)
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for s in range(shards):
        part = names[s * per:(s + 1) * per]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
        save_file({k: sd[k].contiguous() for k in part}, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
        total += sum(sd[k].numel() * sd[k].element_size() for k in part)
    if shards > 1:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    conf = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", **cfg}
    dtype_name = str(dtype).removeprefix("torch.")
    if config_style == 5:
        conf["rope_parameters"] = {"rope_theta": conf.pop("rope_theta"), "rope_type": "default"}
        conf["dtype"] = dtype_name
    else:
        conf["torch_dtype"] = dtype_name
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(conf, f, indent=2)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}, f)
    if tokenizer is not None:
        shutil.copy(tokenizer, os.path.join(path, "tokenizer.model"))
    return str(path)


def load_eval(name: str):
    """evals/<name>.py as a module, loaded from its file (evals/ is scripts, not a package; no sys.path edit)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "evals", name + ".py")
    spec = importlib.util.spec_from_file_location(f"evals_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A 3-shard random bf16 Mixtral checkpoint (2 layers, 8 experts, GQA 4/2 heads)."""
    return write_checkpoint(tmp_path / "src")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and robust on a loaded 2-core CI box (OpenMP spin-waits)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
