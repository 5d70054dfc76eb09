"""Expert offloading on the CPU, with the checkpoint's memory-mapped file as the slow tier.

Oracle: the same checkpoint loaded fully resident. Greedy tokens must be identical and logits within 1e-5 relative
(fp32; the offloaded store computes expert by expert, the resident one batches the two decode experts), for every
budget from one slot per layer to all experts; the tracked device bytes never exceed the budget.
"""

from __future__ import annotations

import gc
from collections import Counter

import pytest
import torch
from click.testing import CliRunner

from conftest import load_eval, write_checkpoint
from mixtral_quant import load_quantized
from mixtral_quant.checkpoint import CheckpointReader
from mixtral_quant.cli.main import cli
from mixtral_quant.loader import tracked_bytes
from mixtral_quant.offload import (PREFETCH_MIN_TOKENS, CachedExperts, ResidentExperts, offload_model, place_experts,
                                   set_prefetch, wire_prefetch)
from mixtral_quant.quantize import quantize

RTOL = 1e-5
# 3 layers so that slots can be spread unevenly; a short context keeps the KV/workspace reservation small
CFG = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3, max_position_embeddings=64)
E, L = 8, 3


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def packed(tmp_path, fmt: str, seed: int = 0) -> str:
    src = write_checkpoint(tmp_path / f"src-{fmt}-{seed}", CFG, seed=seed)
    out = str(tmp_path / f"{fmt}-{seed}")
    quantize(src, out, fmt=fmt, progress=False)
    return out


@pytest.fixture(scope="module")
def nf4(tmp_path_factory):
    return packed(tmp_path_factory.mktemp("offload"), "nf4", seed=int(torch.randint(0, 2**16, ()).item()))


def placement(path):
    with CheckpointReader(path) as r:
        return place_experts(r, "cpu", torch.float32, 2**40)


def prompts(seed: int):
    """Two left-padded prompts [2, 8] (decode then runs T = 2 tokens through each store)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, CFG["vocab_size"], (2, 8), generator=g)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    return ids, mask


def record_routing(model) -> list[list[int]]:
    """Wrap every offloaded store's forward to record the distinct experts of each call, per layer."""
    seen: list[list[int]] = [[] for _ in model.layers]
    for i, layer in enumerate(model.layers):
        store = layer.block_sparse_moe.experts
        if isinstance(store, CachedExperts):
            def fwd(x, ids, w, _f=store.forward, _i=i):
                seen[_i].append(len(set(ids.reshape(-1).tolist())))
                return _f(x, ids, w)

            store.forward = fwd
    return seen


def test_every_budget_gives_the_resident_tokens(nf4):
    """From 1 slot per layer up to everything resident: same greedy tokens, bytes within budget, stats consistent."""
    ref = load_quantized(nf4, device="cpu", tokenizer=False)
    ids, mask = prompts(1)
    want = ref.generate(ids, 8, attention_mask=mask, eos=[])
    seq = torch.randint(0, CFG["vocab_size"], (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want_logits = ref(seq)
    p0 = placement(nf4)
    assert p0.slots == [E] * L
    # total slots: 1 per layer, [2, 1, 1], [2, 2, 1], 2 and 5 per layer, a resident layer before offloaded
    # ones ([8, 7, 7] and [8, 8, 7]), all resident, more than enough
    for n in [L, L + 1, L + 2, 2 * L, 5 * L, L * E - 2, L * E - 1, L * E, L * E + 5]:
        budget = p0.fixed_bytes + n * p0.slot_bytes
        model = load_quantized(nf4, device="cpu", tokenizer=False, max_memory=budget)
        p = model.expert_placement
        k = min(n, L * E)
        expect = [E] * L if n >= L * E else [k // L + (i < k % L) for i in range(L)]  # remainder to the lowest layers
        assert p.slots == expect, n
        set_prefetch(model, 1)  # speculative prefetch at every step too (by default only for prefill)
        seen = record_routing(model)
        got = model.generate(ids, 8, attention_mask=mask, eos=[])
        assert torch.equal(got, want), f"{n} slots {p.slots}: tokens differ"
        with torch.no_grad():
            assert rel_err(model(seq), want_logits) < RTOL
        # memory: everything the device tier holds (parameters, buffers, slots, KV cache) fits the budget
        assert tracked_bytes(model) <= budget - p.workspace_bytes
        model.setup_caches(1, p.context)  # the reserved KV cache: the arithmetic is exact
        assert tracked_bytes(model) == p.device_bytes <= budget - p.workspace_bytes
        stats = model.offload_stats()
        if n >= L * E:  # all resident: the same keys, all zero
            assert stats == {"hits": 0, "misses": 0, "prefetches": 0, "prefetch_hits": 0, "bytes_copied": 0}
            continue
        cached = [i for i, s in enumerate(p.slots) if s < E]
        assert stats["slots"] == sum(p.slots[i] for i in cached)
        assert stats["hits"] + stats["misses"] == sum(sum(seen[i]) for i in cached)
        assert stats["bytes_copied"] == (stats["misses"] + stats["prefetches"]) * p.slot_bytes
        assert 0 <= stats["prefetch_hits"] <= stats["prefetches"]
        if n == L:  # one slot: every expert of every step is copied, most on demand
            assert stats["misses"] > stats["hits"]


@pytest.mark.parametrize("fmt", ["int8", "bf16"])
def test_other_formats(tmp_path, fmt):
    """int8 experts (QuantLinear views into the slots) and plain bf16 experts (dense slot views)."""
    path = packed(tmp_path, fmt, seed=3)
    ids, mask = prompts(4)
    want = load_quantized(path, device="cpu", tokenizer=False).generate(ids, 8, attention_mask=mask, eos=[])
    p0 = placement(path)
    budget = p0.fixed_bytes + 2 * L * p0.slot_bytes
    model = load_quantized(path, device="cpu", tokenizer=False, max_memory=budget)
    assert model.expert_placement.slots == [2] * L
    assert torch.equal(model.generate(ids, 8, attention_mask=mask, eos=[]), want)
    assert tracked_bytes(model) <= budget - model.expert_placement.workspace_bytes
    assert model.offload_stats()["misses"] > 0


def test_contiguous_host_buffers(nf4):
    """The CUDA host tier (one contiguous buffer per expert, every tensor a view of it; moving = one copy_) on the
    CPU: same tokens; the slots and the host rows hold exactly the checkpoint's bytes."""
    ref = load_quantized(nf4, device="cpu", tokenizer=False)
    ids, mask = prompts(5)
    want = ref.generate(ids, 8, attention_mask=mask, eos=[])
    model = load_quantized(nf4, device="cpu", tokenizer=False)
    with CheckpointReader(nf4) as r:
        for i, layer in enumerate(model.layers):
            layer.block_sparse_moe.experts = CachedExperts.from_checkpoint(
                r, f"model.layers.{i}.block_sparse_moe.experts", r.config, 2, device="cpu",
                compute_dtype=torch.float32, backend="torch", host="buffer")  # fmt: skip
    wire_prefetch(model)
    assert torch.equal(model.generate(ids, 8, attention_mask=mask, eos=[]), want)
    for layer, rlayer in zip(model.layers, ref.layers):
        store, res = layer.block_sparse_moe.experts, rlayer.block_sparse_moe.experts
        ptr = store.slots.untyped_storage().data_ptr()
        assert all(t.untyped_storage().data_ptr() == ptr for t in list(store.w13.buffers()) + list(store.w2.buffers()))
        hv = store.layout.views(store.host)  # [E, ...] per field, all views of the host rows
        for mod in ("w13", "w2"):
            for name, t in getattr(res, mod).named_buffers():
                assert torch.equal(hv[mod, name], t), (mod, name)
        for e, s in store.lru.items():  # a slot holds its expert's bytes exactly
            assert torch.equal(store.slots[s], store.host[e])


def test_lru_against_an_oracle(nf4):
    """Random routings through one store: hits/misses equal a plain LRU's, outputs equal the resident store's."""
    g = torch.Generator().manual_seed(6)
    with CheckpointReader(nf4) as r:
        prefix = "model.layers.1.block_sparse_moe.experts"
        res = ResidentExperts.from_checkpoint(r, prefix, r.config, device="cpu", compute_dtype=torch.float32,
                                              backend="torch")  # fmt: skip
        for k in (1, 3):
            store = CachedExperts.from_checkpoint(r, prefix, r.config, k, device="cpu", compute_dtype=torch.float32,
                                                  backend="torch")  # fmt: skip
            lru, hits, misses = [], 0, 0
            for step in range(40):
                T = 1 if step % 4 else 3
                ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(T)])  # [T, 2]
                w = torch.rand(T, 2, generator=g, dtype=torch.float64).softmax(-1).float()
                x = torch.randn(T, CFG["hidden_size"], generator=g)
                assert rel_err(store(x, ids, w), res(x, ids, w)) < RTOL
                needed = list(Counter(ids.reshape(-1).tolist()))
                for e in [e for e in needed if e in lru]:
                    lru.remove(e)
                    lru.append(e)
                    hits += 1
                for e in [e for e in needed if e not in lru]:
                    if len(lru) == k:
                        lru.pop(0)
                    lru.append(e)
                    misses += 1
                assert (store.counts.hits, store.counts.misses) == (hits, misses), (k, step)
                assert list(store.lru) == lru[-k:]
            # a prefetched expert is then a prefetch hit; it never evicts beyond the slots
            store.reset_stats()
            store.prefetch_min_tokens = 1
            e = next(i for i in range(E) if i not in store.lru)
            store.prefetch(torch.tensor([[e]]))
            assert store(x[:1], torch.tensor([[e, e]]), torch.tensor([[0.5, 0.5]])).shape == (1, CFG["hidden_size"])
            assert (store.counts.prefetches, store.counts.prefetch_hits, store.counts.misses) == (1, 1, 0)
            assert len(store.lru) == k


def test_prefetch_only_for_long_forwards_by_default(nf4):
    """Default: the next layer's experts are speculated for prefill (>= PREFETCH_MIN_TOKENS tokens), not for
    batch-1 decode, where a wrong guess costs a whole copy (evals/RESULTS.md)."""
    p0 = placement(nf4)
    model = load_quantized(nf4, device="cpu", tokenizer=False, max_memory=p0.fixed_bytes + 2 * L * p0.slot_bytes)
    prompt = torch.randint(3, CFG["vocab_size"], (1, PREFETCH_MIN_TOKENS), generator=torch.Generator().manual_seed(9))
    model.generate(prompt, 1, eos=[])  # prefill only
    assert model.offload_stats()["prefetches"] > 0
    for min_tokens, decode_prefetches in ((PREFETCH_MIN_TOKENS, False), (1, True)):
        set_prefetch(model, min_tokens)
        model.generate(prompt[:, :1], 1, eos=[])  # warm: one prefill token
        for layer in model.layers:
            layer.block_sparse_moe.experts.reset_stats()
        model.generate(prompt[:, :1], 6, eos=[])  # a 1-token prefill and 5 decode steps
        assert (model.offload_stats()["prefetches"] > 0) == decode_prefetches


def test_offload_model_converts_a_resident_model(nf4):
    """offload_model (what evals/gpu_check.py calls on a model built on the device) gives the same tokens."""
    ids, mask = prompts(7)
    model = load_quantized(nf4, device="cpu", tokenizer=False)
    want = model.generate(ids, 8, attention_mask=mask, eos=[])
    p0 = placement(nf4)
    budget = p0.fixed_bytes + (L * 3 + 1) * p0.slot_bytes
    p = offload_model(model, budget)
    assert p.slots == [4, 3, 3]
    assert torch.equal(model.generate(ids, 8, attention_mask=mask, eos=[]), want)
    assert tracked_bytes(model) <= budget - p.workspace_bytes
    with pytest.raises(ValueError, match="offload_model needs a model whose experts are all resident"):
        offload_model(model, budget)
    model = load_quantized(nf4, device="cpu", tokenizer=False)
    p = offload_model(model, slots_per_layer=2)  # a fixed number of slots, as evals/gpu_check.py's small config
    assert p.slots == [2] * L and model.offload_stats()["slots"] == 2 * L
    assert torch.equal(model.generate(ids, 8, attention_mask=mask, eos=[]), want)
    assert tracked_bytes(model) <= p.budget - p.workspace_bytes


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_budget_below_the_minimum(nf4):
    p0 = placement(nf4)
    need = p0.fixed_bytes + L * p0.slot_bytes
    before = _live_tensors()
    with pytest.raises(ValueError) as err:
        load_quantized(nf4, device="cpu", tokenizer=False, max_memory=need - 1)
    msg = str(err.value)
    assert msg.startswith("max_memory=")
    assert f"is below the {need / 2**10:.1f} KiB ({need:,} bytes) that must stay on cpu" in msg
    assert "KV cache at 64 tokens" in msg and "1 expert slot per layer" in msg
    assert msg.endswith(f"use at least max_memory={-(-need // 2**20)}MiB")
    del err
    assert _live_tensors() == before  # the check runs before anything is allocated
    model = load_quantized(nf4, device="cpu", tokenizer=False, max_memory=need)  # exactly the minimum works
    assert model.expert_placement.slots == [1] * L
    model = load_quantized(nf4, device="cpu", tokenizer=False, max_memory=f"{-(-need // 2**20)}MiB")  # the advice
    assert model.expert_placement.slots == [E] * L


CLI_CFG = dict(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip


def test_cli_max_memory_and_stats(tmp_path):
    src = write_checkpoint(tmp_path / "src", CLI_CFG, seed=12)
    path = str(tmp_path / "nf4")
    quantize(src, path, fmt="nf4", progress=False)
    p0 = placement(path)
    budget = p0.fixed_bytes + 2 * p0.slot_bytes
    args = ["generate", path, "-p", "The quick brown fox", "-n", "8", "--device", "cpu"]
    plain = CliRunner().invoke(cli, args)
    off = CliRunner().invoke(cli, args + ["--max-memory", str(budget), "--stats"])
    assert plain.exit_code == 0 and off.exit_code == 0, off.output
    assert off.stdout == plain.stdout
    line = [s for s in off.stderr.splitlines() if s.startswith("[offload: ")]
    assert line and "hits" in line[0] and "misses" in line[0] and "bytes_copied" in line[0] and "slots 2" in line[0]
    small = CliRunner().invoke(cli, args + ["--max-memory", "1KiB"])
    assert small.exit_code == 1
    assert small.stderr.startswith("mixq: error: max_memory=1.0 KiB is below the ")
    assert len(small.stderr.strip().splitlines()) == 1
    chat = CliRunner().invoke(cli, ["chat", path, "--max-memory", str(budget), "--stats", "--device", "cpu", "-n", "4"],
                              input="Hello\n")  # fmt: skip
    assert chat.exit_code == 0, chat.output
    assert "[offload: hits" in chat.stderr


def test_simulator_replays_what_the_store_does(nf4):
    """evals/offload_sim.py's lru and lru+prefetch replays count the same hits, misses and prefetches as the
    runtime store driven by the same routing (so the simulation's numbers are the implementation's)."""
    offload_sim = load_eval("offload_sim")

    g = torch.Generator().manual_seed(8)
    trace = []
    for t in range(40):  # a skewed routing with some locality, and guesses right about half the time
        ids = (torch.multinomial(torch.tensor([6.0, 4, 3, 2, 1, 1, 1, 1]), 2, generator=g) + t // 15) % E
        guess = torch.where(torch.rand(2, generator=g) < 0.5, ids, torch.randperm(E, generator=g)[:2])
        trace.append({"token": t, "layer": 1, "experts": ids.tolist(), "guess": guess.tolist()})
    with CheckpointReader(nf4) as r:
        for policy in ("lru", "lru+prefetch"):
            for k in (1, 2, 4):
                store = CachedExperts.from_checkpoint(r, "model.layers.1.block_sparse_moe.experts", r.config, k,
                                                      device="cpu", compute_dtype=torch.float32,
                                                      backend="torch")  # fmt: skip
                x = torch.randn(1, CFG["hidden_size"], generator=g)
                for row in trace:
                    if policy == "lru+prefetch":
                        store._prefetch(row["guess"])
                    store(x, torch.tensor([row["experts"]]), torch.tensor([[0.5, 0.5]]))
                sim = offload_sim.replay(trace, policy, k, E)
                c = store.counts
                assert sim["hit_rate"] == c.hits / (c.hits + c.misses), (policy, k)
                assert sim["misses_per_layer_token"] * len(trace) == c.misses
                assert sim["prefetches_per_layer_token"] * len(trace) == c.prefetches
                assert sim["prefetch_hits"] == c.prefetch_hits


def test_bad_store_arguments(nf4):
    with CheckpointReader(nf4) as r:
        kw = dict(device="cpu", compute_dtype=torch.float32, backend="torch")
        prefix = "model.layers.0.block_sparse_moe.experts"
        with pytest.raises(ValueError, match=r"host tier 'disk': choose auto, buffer or mapped"):
            CachedExperts.from_checkpoint(r, prefix, r.config, 2, host="disk", **kw)
        for k in (0, E):
            with pytest.raises(ValueError, match=rf"CachedExperts needs 1 <= num_slots < num_experts \(8\), got {k}"):
                CachedExperts.from_checkpoint(r, prefix, r.config, k, **kw)
    model = load_quantized(nf4, device="cpu", tokenizer=False)
    with pytest.raises(ValueError, match=r"max_memory=1.0 KiB is below the .* use at least max_memory=1MiB"):
        offload_model(model, "1KiB")
    with pytest.raises(ValueError, match=r"max_memory 'lots' not understood"):
        offload_model(model, "lots")
    with pytest.raises(ValueError, match=r"offload_model needs max_memory \(a budget\) or slots_per_layer, not both"):
        offload_model(model)
    with pytest.raises(ValueError, match=r"slots_per_layer must be in 1..7 \(fewer than the 8 experts\), got 8"):
        offload_model(model, slots_per_layer=8)
