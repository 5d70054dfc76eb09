"""Mixtral-8x22B end to end at test scale: a random checkpoint with 8x22B's shape ratios and config keys (its
32768-token v3 tokenizer, no sliding window, rope_theta 1e6, 64k positions) quantizes, loads, chats with
mistral-common's ids, offloads under a budget and evaluates, against transformers' MixtralForCausalLM (fp32 CPU).

Tolerances: logits within 1e-4 of the largest logit (relative), perplexities within 1e-4 (relative).
"""

from __future__ import annotations

import filecmp
import math
import os

import pytest
import torch
from click.testing import CliRunner
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from conftest import write_checkpoint
from mixtral_quant import load_quantized
from mixtral_quant.cli.main import cli
from mixtral_quant.config import MixtralConfig
from mixtral_quant.evaluate import encode_text, evaluate, token_windows
from mixtral_quant.quantize import quantize
from test_model import oracle, rel_err

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL = 1e-4
SEED = 22
BIG = MixtralConfig.from_name("Mixtral-8x22B-v0.1")
# 8x22B divided by 64 in width (hidden 6144 -> 96, experts 16384 -> 256) and by 8 in heads (48/8 -> 6/1, so
# head_dim 128 -> 16); 3 of its 56 layers; its vocabulary, positions, rope and window as they are.
X22B = dict(
    hidden_size=BIG.hidden_size // 64, intermediate_size=BIG.intermediate_size // 64, num_hidden_layers=3,
    num_attention_heads=BIG.num_attention_heads // 8, num_key_value_heads=BIG.num_key_value_heads // 8,
    num_local_experts=BIG.num_local_experts, num_experts_per_tok=BIG.num_experts_per_tok,
    vocab_size=BIG.vocab_size, max_position_embeddings=BIG.max_position_embeddings, rope_theta=BIG.rope_theta,
    sliding_window=BIG.sliding_window, rms_norm_eps=BIG.rms_norm_eps,
)  # fmt: skip
CHAT = [("system", "Answer briefly."), ("user", "Hi there"), ("assistant", "Hello!"), ("user", "What is NF4? ∑ 四")]
CLS = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}


def v3_file() -> str:
    """mistral-common's v3 SentencePiece file (its package data): the tokenizer Mixtral-8x22B ships."""
    return str(MistralTokenizer.v3().instruct_tokenizer.tokenizer.file_path)


def want_chat_ids(conv) -> list[int]:
    req = ChatCompletionRequest(messages=[CLS[r](content=c) for r, c in conv])
    return MistralTokenizer.v3().encode_chat_completion(req).tokens


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(bf16 source, its NF4 quantization): the source ships the v3 file as a plain tokenizer.model."""
    d = tmp_path_factory.mktemp("x22b")
    src = write_checkpoint(d / "src", X22B, seed=SEED, tokenizer=v3_file())
    quantize(src, str(d / "nf4"), fmt="nf4", progress=False)
    return src, str(d / "nf4")


@pytest.fixture(scope="module")
def resident(ckpt):
    return load_quantized(ckpt[1], device="cpu")


def test_config_keys_and_ratios(ckpt):
    cfg = MixtralConfig.from_file(ckpt[0])
    assert (cfg.vocab_size, cfg.sliding_window, cfg.rope_theta, cfg.max_position_embeddings) == (32768, None, 1e6, 65536)
    assert cfg.num_attention_heads * cfg.head_dim == cfg.hidden_size and cfg.head_dim == BIG.head_dim // 8
    assert cfg.num_attention_heads // cfg.num_key_value_heads == BIG.num_attention_heads // BIG.num_key_value_heads
    assert cfg.intermediate_size * BIG.hidden_size == BIG.intermediate_size * cfg.hidden_size
    transformers = pytest.importorskip("transformers")
    t = transformers.MixtralConfig.from_pretrained(ckpt[0])  # the oracle reads the same values
    assert (t.sliding_window, t.rope_parameters["rope_theta"], t.max_position_embeddings) == (None, 1e6, 65536)
    assert MixtralConfig.from_file(ckpt[1]).raw["quantization_config"]  # the packed copy keeps the keys, plus its own


def test_quantized_checkpoint_chats_with_mistral_commons_v3_ids(ckpt, resident):
    assert filecmp.cmp(os.path.join(ckpt[1], "tokenizer.model"), v3_file(), shallow=False)  # copied by quantize
    tok = resident.tokenizer
    assert (tok.version, tok.vocab_size) == ("v3", resident.config.vocab_size)
    for end in (2, 4):
        assert tok.apply_chat_template([{"role": r, "content": c} for r, c in CHAT[:end]]) == want_chat_ids(CHAT[:end])
    # the CLI's chat sends exactly those ids: its prompt count is mistral-common's
    r = CliRunner().invoke(cli, ["chat", ckpt[1], "-n", "3", "--system", CHAT[0][1]], input=CHAT[1][1] + "\n")
    assert r.exit_code == 0, r.output
    assert f"prompt {len(want_chat_ids(CHAT[:2]))} tokens" in r.stderr


@pytest.mark.parametrize("which", ["nf4", "bf16"])
def test_logits_match_transformers(ckpt, tmp_path, which):
    path = ckpt[1] if which == "nf4" else ckpt[0]
    model = load_quantized(path, device="cpu", tokenizer=False)
    ref = oracle(path, tmp_path)
    ids = torch.randint(0, X22B["vocab_size"], (2, 37), generator=torch.Generator().manual_seed(SEED))
    ids[0, :9] = torch.tensor(want_chat_ids(CHAT[:2])[:9])  # control tokens ([INST] = 3, [/INST] = 4) too
    with torch.no_grad():
        assert rel_err(model(ids), ref(ids).logits) < RTOL


def test_offloaded_greedy_tokens_equal_resident(ckpt, resident):
    tok = resident.tokenizer
    ids = torch.tensor([tok.apply_chat_template([{"role": r, "content": c} for r, c in CHAT])])
    want = resident.generate(ids, 12, eos=[])
    p0 = load_quantized(ckpt[1], device="cpu", tokenizer=False, max_memory=2**40).expert_placement  # all resident
    L, E = X22B["num_hidden_layers"], X22B["num_local_experts"]
    for per_layer in (2, 3, 5):  # the minimum is top-k (2) slots per layer; each offloaded layer has a slot table
        budget = p0.fixed_bytes + L * p0.table_bytes + per_layer * L * p0.slot_bytes
        model = load_quantized(ckpt[1], device="cpu", max_memory=budget)
        assert model.expert_placement.slots == [per_layer] * L
        assert torch.equal(model.generate(ids, 12, eos=[]), want), per_layer
        stats = model.offload_stats()
        assert stats["misses"] > 0 and stats["slots"] == per_layer * L < E * L


def test_evaluate_against_transformers(ckpt, tmp_path):
    """`mixq eval`'s path: the text tokenized by the checkpoint's v3 tokenizer, both perplexities as transformers'."""
    text = "Mixtral-8x22B: ∑ 四十二, naïve café — " * 40
    ids = encode_text(text, ckpt[0])
    assert ids == MistralTokenizer.v3().instruct_tokenizer.tokenizer.encode(text, bos=True, eos=False)
    windows = token_windows(ids, 64)
    res = evaluate(ckpt[1], ckpt[0], windows, device="cpu", progress=False)
    for path, score in [(ckpt[1], res.quantized), (ckpt[0], res.reference)]:
        ref = oracle(path, tmp_path)
        with torch.no_grad():
            logp = torch.log_softmax(ref(windows).logits.double(), -1)
        nll = -logp[:, :-1].gather(-1, windows[:, 1:, None]).mean().item()
        assert math.isclose(score.ppl, math.exp(nll), rel_tol=RTOL), path
    assert res.kld_mean > 0 and res.tokens == windows[:, 1:].numel()


def test_a_versioned_tokenizer_file_travels_with_the_checkpoint(tmp_path):
    """A `tokenizer.model.v3` (mistral-common naming, no plain tokenizer.model): quantize copies it, load reads it."""
    src = write_checkpoint(tmp_path / "src", shards=1)
    with open(v3_file(), "rb") as f, open(os.path.join(src, "tokenizer.model.v3"), "wb") as g:
        g.write(f.read())
    quantize(src, str(tmp_path / "nf4"), fmt="nf4", progress=False)
    tok = load_quantized(str(tmp_path / "nf4"), device="cpu").tokenizer
    assert (os.path.basename(tok.model_file), tok.version) == ("tokenizer.model.v3", "v3")
    assert not os.path.exists(tmp_path / "nf4" / "tokenizer.model")


def test_mixq_plan_40gb_reports_the_loaders_split(tmp_path):
    """`mixq plan Mixtral-8x22B-v0.1 --gpu-memory 40GB --json` against the placement load_quantized(max_memory=40GB)
    computes on CUDA for an 8x22B NF4 checkpoint that exists only as headers (sparse files: nothing allocated)."""
    import json

    from test_plan import header_only_checkpoint

    from mixtral_quant.checkpoint import CheckpointReader
    from mixtral_quant.loader import placement_for

    r = CliRunner().invoke(cli, ["plan", "Mixtral-8x22B-v0.1", "--gpu-memory", "40GB", "--json"])
    assert r.exit_code == 0, r.output
    o = json.loads(r.stdout)["offload"]
    path = header_only_checkpoint(tmp_path / "8x22b", BIG, {"experts": "nf4", "attention": "nf4"})
    with CheckpointReader(path) as reader:
        pl = placement_for(reader, torch.device("cuda"), torch.bfloat16, 40 * 10**9, context=4096)
    assert o["needed"] and o["possible"] and pl.offloaded
    assert o["slots_per_layer"] == pl.slots and 2 < min(pl.slots) < 8
    assert o["device_bytes"] == pl.device_bytes + pl.workspace_bytes <= 40 * 10**9
    assert o["host_bytes"] == sum(k < 8 for k in pl.slots) * 8 * pl.slot_bytes


def test_plan_host_bytes_are_the_runtimes_host_rows(ckpt):
    """What the offloaded layers hold in host rows (offload_model, as on CUDA) is the plan's host_bytes."""
    from mixtral_quant.offload import CachedExperts, offload_model
    from mixtral_quant.plan import plan_memory

    p0 = load_quantized(ckpt[1], device="cpu", tokenizer=False, max_memory=2**40).expert_placement  # all resident
    L = X22B["num_hidden_layers"]
    for n in (2 * L, 3 * L + 1):  # 2 slots per layer; 3 and one layer with 4
        budget = p0.fixed_bytes + L * p0.table_bytes + n * p0.slot_bytes
        model = load_quantized(ckpt[1], device="cpu", tokenizer=False)
        p = offload_model(model, max_memory=budget)
        stores = [layer.block_sparse_moe.experts for layer in model.layers]
        host = sum(s.host.numel() for s in stores if isinstance(s, CachedExperts))
        o = plan_memory(model.config, gpu_memory=budget, dtype=torch.float32, device_type="cpu").offload
        assert o["slots_per_layer"] == p.slots and sum(p.slots) == n, n
        assert o["host_bytes"] == host == L * 8 * p.slot_bytes, n
