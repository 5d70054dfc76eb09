"""Expert offloading on the CPU, with the checkpoint's memory-mapped file as the slow tier.

Oracle: the same checkpoint loaded fully resident. An offloaded layer runs the resident computation over its slot
stack, so logits and greedy tokens are bit-identical for every budget from the minimum (top-k slots per layer) to
all experts, in float32, bfloat16 and float16, with the torch and the triton (interpreter) backends; the tracked
device bytes never exceed the budget.
"""

from __future__ import annotations

import gc
import logging
from collections import Counter

import pytest
import torch
from click.testing import CliRunner

from conftest import load_eval, write_checkpoint
from mixtral_quant import load_quantized
from mixtral_quant.checkpoint import CheckpointReader
from mixtral_quant.cli.main import cli
from mixtral_quant.loader import placement_for, tracked_bytes
from mixtral_quant.offload import (PREFETCH_MIN_TOKENS, CachedExperts, ResidentExperts, offload_model, set_prefetch,
                                   wire_prefetch)
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


def placement(path, dtype=torch.float32):
    with CheckpointReader(path) as r:
        return placement_for(r, "cpu", dtype, 2**40)


def budget(p0, n: int) -> int:
    """The budget that gives n slots in all (tables reserved for every layer)."""
    return p0.fixed_bytes + L * p0.table_bytes + n * p0.slot_bytes


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
    # total slots: the minimum 2 (top-2) per layer, [3, 2, 2], [3, 3, 2], 5 per layer, a resident layer before
    # offloaded ones ([8, 7, 7] and [8, 8, 7]), all resident, more than enough
    for n in [2 * L, 2 * L + 1, 2 * L + 2, 5 * L, L * E - 2, L * E - 1, L * E, L * E + 5]:
        budget_ = budget(p0, n)
        model = load_quantized(nf4, device="cpu", tokenizer=False, max_memory=budget_)
        p = model.expert_placement
        k = min(n, L * E)
        expect = [E] * L if n >= L * E else [k // L + (i < k % L) for i in range(L)]  # remainder to the lowest layers
        assert p.slots == expect, n
        set_prefetch(model, 1)  # speculative prefetch at every step too (by default only for prefill)
        seen = record_routing(model)
        got = model.generate(ids, 8, attention_mask=mask, eos=[])
        assert torch.equal(got, want), f"{n} slots {p.slots}: tokens differ"
        with torch.no_grad():
            assert torch.equal(model(seq), want_logits)  # the resident arithmetic over the slots
        # memory: everything the device tier holds (parameters, buffers, slots, KV cache) fits the budget
        assert tracked_bytes(model) <= budget_ - p.workspace_bytes
        model.setup_caches(1, p.context)  # the reserved KV cache: the arithmetic is exact
        assert tracked_bytes(model) == p.device_bytes <= budget_ - p.workspace_bytes
        stats = model.offload_stats()
        if n >= L * E:  # all resident: the same keys, all zero
            assert stats == {"hits": 0, "misses": 0, "prefetches": 0, "prefetch_hits": 0, "bytes_copied": 0,
                             "pinned_bytes": 0}  # fmt: skip
            continue
        cached = [i for i, s in enumerate(p.slots) if s < E]
        assert stats["slots"] == sum(p.slots[i] for i in cached)
        assert stats["hits"] + stats["misses"] == sum(sum(seen[i]) for i in cached)
        assert stats["bytes_copied"] == (stats["misses"] + stats["prefetches"]) * p.slot_bytes
        assert 0 <= stats["prefetch_hits"] <= stats["prefetches"]
        assert stats["pinned_bytes"] == 0  # the CPU's host tier is the mapped file
        if n == 2 * L:  # two slots of eight: most experts of every step are copied, on demand
            assert stats["misses"] > stats["hits"]


@pytest.mark.parametrize("fmt", ["int8", "bf16"])
def test_other_formats(tmp_path, fmt):
    """int8 experts (QuantLinear views into the slots) and plain bf16 experts (dense slot views)."""
    path = packed(tmp_path, fmt, seed=3)
    ids, mask = prompts(4)
    want = load_quantized(path, device="cpu", tokenizer=False).generate(ids, 8, attention_mask=mask, eos=[])
    p0 = placement(path)
    budget_ = budget(p0, 2 * L)
    model = load_quantized(path, device="cpu", tokenizer=False, max_memory=budget_)
    assert model.expert_placement.slots == [2] * L
    assert torch.equal(model.generate(ids, 8, attention_mask=mask, eos=[]), want)
    assert tracked_bytes(model) <= budget_ - model.expert_placement.workspace_bytes
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
        assert {(m, n) for m, n, *_ in store.layout.fields} == set(hv)
        for mod, name, t in res.stacked_tensors():
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
                if k >= 2 or T > 1:  # the resident computation over the slots (grouped: expert by expert)
                    assert torch.equal(store(x, ids, w), res(x, ids, w)), (k, step)
                else:  # one slot for a decode step's two experts: the grouped path instead of the batched one
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
    model = load_quantized(nf4, device="cpu", tokenizer=False, max_memory=budget(p0, 2 * L))
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
    budget_ = budget(p0, L * 3 + 1)
    p = offload_model(model, budget_)
    assert p.slots == [4, 3, 3]
    assert torch.equal(model.generate(ids, 8, attention_mask=mask, eos=[]), want)
    assert tracked_bytes(model) <= budget_ - p.workspace_bytes
    with pytest.raises(ValueError, match="offload_model needs a model whose experts are all resident"):
        offload_model(model, budget_)
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
    need = p0.minimum_bytes
    assert need == budget(p0, 2 * L)
    before = _live_tensors()
    with pytest.raises(ValueError) as err:
        load_quantized(nf4, device="cpu", tokenizer=False, max_memory=need - 1)
    msg = str(err.value)
    assert msg.startswith("max_memory=")
    assert f"is below the {need / 2**10:.1f} KiB ({need:,} bytes) that must stay on cpu" in msg
    assert "KV cache at 64 tokens x 1" in msg and "2 expert slots per layer and their tables" in msg
    assert msg.endswith(f"use at least max_memory={-(-need // 2**20)}MiB")
    del err
    assert _live_tensors() == before  # the check runs before anything is allocated
    model = load_quantized(nf4, device="cpu", tokenizer=False, max_memory=need)  # exactly the minimum works
    assert model.expert_placement.slots == [2] * L
    model = load_quantized(nf4, device="cpu", tokenizer=False, max_memory=f"{-(-need // 2**20)}MiB")  # the advice
    assert model.expert_placement.slots == [E] * L


CLI_CFG = dict(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip


def test_cli_max_memory_and_stats(tmp_path, caplog):
    src = write_checkpoint(tmp_path / "src", CLI_CFG, seed=12)
    path = str(tmp_path / "nf4")
    quantize(src, path, fmt="nf4", progress=False)
    p0 = placement(path)
    budget_ = p0.minimum_bytes  # 2 slots in each of the 2 layers
    args = ["generate", path, "-p", "The quick brown fox", "-n", "8", "--device", "cpu"]
    plain = CliRunner().invoke(cli, args)
    off = CliRunner().invoke(cli, args + ["--max-memory", str(budget_), "--stats"])
    assert plain.exit_code == 0 and off.exit_code == 0, off.output
    assert off.stdout == plain.stdout
    line = [s for s in off.stderr.splitlines() if s.startswith("[offload: ")]
    assert line and "hits" in line[0] and "misses" in line[0] and "bytes_copied" in line[0] and "slots 4" in line[0]
    small = CliRunner().invoke(cli, args + ["--max-memory", "1KiB"])
    assert small.exit_code == 1
    assert small.stderr.startswith("mixq: error: max_memory=1.0 KiB is below the ")
    assert len(small.stderr.strip().splitlines()) == 1
    chat = CliRunner().invoke(cli, ["chat", path, "--max-memory", str(budget_), "--stats", "--device", "cpu", "-n", "4"],
                              input="Hello\n")  # fmt: skip
    assert chat.exit_code == 0, chat.output
    assert "[offload: hits" in chat.stderr
    # --context/--batch size the reservation: a budget too small for the default context (64) fits 16 tokens
    with CheckpointReader(path) as r:
        small_ctx = placement_for(r, "cpu", torch.float32, 2**40, context=16).minimum_bytes
        assert placement_for(r, "cpu", torch.float32, 2**40, context=16, batch=2).minimum_bytes > small_ctx
    assert small_ctx < budget_
    short = ["generate", path, "-p", "Hi", "-n", "4", "--device", "cpu", "--max-memory", str(small_ctx)]
    too_small = CliRunner().invoke(cli, short)
    assert too_small.exit_code == 1 and "KV cache at 64 tokens x 1" in too_small.stderr
    fits = CliRunner().invoke(cli, short + ["--context", "16", "--stats"])
    assert fits.exit_code == 0, fits.output
    # chat trims its history to the context reserved under --max-memory, not to the model's maximum
    with caplog.at_level(logging.WARNING, logger="mixtral_quant"):
        talk = CliRunner().invoke(cli, ["chat", path, "--device", "cpu", "-n", "4", "--max-memory", str(budget_),
                                        "--context", "24"], input="Hi\nAnd you\nOnce more\n")  # fmt: skip
    assert talk.exit_code == 0, talk.output
    assert talk.stdout.count("\n") >= 3  # three answers
    assert not [r for r in caplog.records if "reserved under max_memory" in r.getMessage()]
    # no run uses more positions than the model has: a larger --context (mixq serve's default 4096) reserves that
    big = load_quantized(path, device="cpu", tokenizer=False, max_memory=2**40, context=10**6)
    assert big.expert_placement.context == big.config.max_position_embeddings < 10**6
    assert "slots 4" in fits.stderr
    two = CliRunner().invoke(cli, short + ["--context", "16", "--batch", "2"])
    assert two.exit_code == 1 and "KV cache at 16 tokens x 2" in two.stderr


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
    with pytest.raises(ValueError, match=r"context must be a positive number of tokens, got 0"):
        load_quantized(nf4, device="cpu", tokenizer=False, max_memory="1GiB", context=0)
    with pytest.raises(ValueError, match=r"batch must be a positive number of sequences, got 1.5"):
        load_quantized(nf4, device="cpu", tokenizer=False, max_memory="1GiB", batch=1.5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_offloaded_tokens_equal_resident(nf4, backend, dtype, one_thread):
    """Greedy tokens (and, on the torch backend, the logits of every position) of an offloaded model equal the
    resident model's exactly, at the smallest budget the loader accepts and one halfway up, over several random
    prompts (2 per seed, seeds 20-21), with speculative prefetch at every step at the second budget. The triton
    backend runs under Triton's interpreter (minutes: fewer tokens)."""
    ref = load_quantized(nf4, device="cpu", dtype=dtype, backend=backend, tokenizer=False)
    p0 = placement(nf4, dtype)
    for n, prefetch_all in ((2 * L, False), ((2 * L + L * E) // 2, True)):
        model = load_quantized(nf4, device="cpu", dtype=dtype, backend=backend, tokenizer=False,
                               max_memory=budget(p0, n))  # fmt: skip
        assert sum(model.expert_placement.slots) == n and model.expert_placement.offloaded
        if prefetch_all:
            set_prefetch(model, 1)
        for seed in (20, 21):
            ids, mask = prompts(seed)
            steps = 6
            if backend == "triton":  # the interpreter is slow: one prompt of each batch, fewer steps
                ids, mask, steps = ids[1:, 3:], mask[1:, 3:], 3
            want = ref.generate(ids, steps, attention_mask=mask, eos=[])
            got = model.generate(ids, steps, attention_mask=mask, eos=[])
            assert torch.equal(got, want), f"{dtype} {backend} {n} slots, seed {seed}: tokens differ"
            if backend == "torch":
                with torch.no_grad():  # the logits of the whole generated sequence, every position
                    assert torch.equal(model(got), ref(got)), f"{dtype} {backend} {n} slots, seed {seed}: logits"
        assert model.offload_stats()["misses"] > 0


def test_a_run_beyond_the_reservation_warns(nf4, caplog):
    """load_quantized(max_memory, context=16) reserves a 16-token KV cache: a longer run says it may exceed."""
    p0 = placement(nf4)
    model = load_quantized(nf4, device="cpu", tokenizer=False, max_memory=budget(p0, 2 * L), context=16)
    assert model.expert_placement.context == 16 and model.expert_placement.kv_cache_bytes == p0.kv_cache_bytes // 4
    prompt = torch.randint(3, CFG["vocab_size"], (1, 8), generator=torch.Generator().manual_seed(30))
    with caplog.at_level("WARNING", logger="mixtral_quant.model"):
        model.generate(prompt, 8, eos=[])  # 16 tokens: within
        assert not caplog.records
        model.generate(prompt, 9, eos=[])
    assert "KV cache for 1 x 17 tokens exceeds the 1 x 16 reserved under max_memory" in caplog.text


def test_page_locked_host_rows_are_registered_exactly(nf4, monkeypatch):
    """On CUDA the host tier is one plain block per layer registered with cudaHostRegister (a fake cudart here: no
    GPU): exactly E x slot bytes, no power-of-two rounding, counted as pinned, unregistered when freed. And the
    mapped tier (copies from the memory-mapped file) is refused on CUDA before anything is allocated."""
    from mixtral_quant.offload.host import ExpertLayout, host_buffer

    calls = []

    class FakeCudart:
        def cudaHostRegister(self, ptr, size, flags):
            calls.append(("register", ptr, size))
            return 0

        def cudaHostUnregister(self, ptr):
            calls.append(("unregister", ptr))
            return 0

    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart())
    with CheckpointReader(nf4) as r:
        res = ResidentExperts.from_checkpoint(r, "model.layers.0.block_sparse_moe.experts", r.config, device="cpu",
                                              compute_dtype=torch.float32, backend="torch")  # fmt: skip
        layout = ExpertLayout.of(res)
        buf, pinned = host_buffer(E, layout, torch.device("cuda"))
        assert pinned == E * layout.nbytes == buf.numel() and calls == [("register", buf.data_ptr(), pinned)]
        assert layout.nbytes == placement(nf4).slot_bytes  # the memory model's slot is the layout's
        ptr = buf.data_ptr()
        del buf
        gc.collect()
        assert calls[-1] == ("unregister", ptr)
        assert host_buffer(E, layout, torch.device("cpu"))[1] == 0 and len(calls) == 2
        before = _live_tensors()
        with pytest.raises(ValueError, match=r"^host='mapped' copies from the memory-mapped checkpoint and runs on "
                                             r"the CPU only; use host='buffer' \(pinned host memory\) on CUDA$"):
            CachedExperts.from_checkpoint(r, "model.layers.0.block_sparse_moe.experts", r.config, 2, device="cuda",
                                          compute_dtype=torch.float32, backend="torch", host="mapped")  # fmt: skip
        assert _live_tensors() == before
