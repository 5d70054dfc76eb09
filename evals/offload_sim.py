"""Expert-offload simulation: record routing traces, replay them through cache policies at k slots per layer, and
project Mixtral-8x7B NF4 decode tokens/s for a device memory size and a host-to-device bandwidth (not a timed test).

    python evals/offload_sim.py [--model builtin:tiny-mixtral] [--tokens 2048] [--json]
    python evals/offload_sim.py --trace trace.jsonl          # replay a recorded trace
    python evals/offload_sim.py --save-trace trace.jsonl     # record, save, replay

Trace (JSON lines, one per token and layer, tokens in decode order):
    {"token": t, "layer": l, "experts": [e1, e2], "guess": [g1, g2] | null, "guess_weights": [w1, w2] | null}
`experts` are layer l's top-k for token t; `guess` is layer l's router applied to layer l-1's MoE input (the
speculative guess of Eliseev & Mazur 2023, arXiv 2312.17238; null for layer 0) and `guess_weights` its renormalised
router weights. Recorded teacher-forced over the held-out text in windows of the model's context: a causal forward
routes each token exactly as decoding would.

Policies, per layer with k device slots (the runtime's CachedExperts is lru+prefetch):
  static        the k experts most used in the whole trace stay resident, the rest are copied per use (oracle)
  lru           least recently used evicted on a miss
  lfu           least frequently used so far evicted (ties: least recently used)
  lru+prefetch  lru, and before layer l runs, its guessed experts not in a slot are copied in (evicting lru);
                lru+prefetch>w (--policy) copies only guesses whose router weight is at least w
The runtime (CachedExperts) is lru at batch-1 decode and lru+prefetch for forwards of >= PREFETCH_MIN_TOKENS.

Projection (batch-1 decode, per token; every assumption is a flag):
  compute   = bytes read per token / GPU memory bandwidth: all non-expert weights (attention NF4, lm_head bf16,
              routers, norms) + top-k experts per layer (memory.footprint, NF4 with double quant) + the KV cache at
              --kv-tokens; spread evenly over the layers (lm_head counted once);
  a copy    = expert bytes / host-to-device bandwidth; copies are serial on one copy stream;
  no prefetch:   token = compute + demand misses x copy (a miss stalls its layer);
  lru+prefetch:  per layer: demand misses x copy + max(layer compute, prefetch copies for the next layer x copy)
              (copies for layer l+1 overlap layer l's compute); averaged over the trace's (token, layer) pairs;
  slots k   = per layer, as load_quantized(max_memory=...) places them (mixtral_quant.memory.place: the resident
              part, KV cache and workspace first, then top-k slots per layer at least, the rest spread evenly);
  per-layer hit statistics of the traced model stand in for Mixtral's 32 layers.
Caveat: the tiny model's routing (fewer layers, trained briefly on Python sources) stands in for Mixtral's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter, OrderedDict

import torch

# scenarios: (device memory, host->device GB/s, GPU memory GB/s, what it is)
SCENARIOS = [
    ("16GB", 25.0, 448.0, "16 GB GPU (RTX A4000-class, 448 GB/s) on PCIe 4.0 x16"),
    ("16GB", 12.0, 320.0, "16 GB T4 on PCIe 3.0 x16"),
    ("12GB", 12.0, 360.0, "12 GB RTX 3060 on PCIe 3.0 x16 (board PCIe 4.0, measured ~12)"),
    ("24GB", 25.0, 1008.0, "24 GB RTX 4090 on PCIe 4.0 x16"),
]
POLICIES = ("static", "lru", "lfu", "lru+prefetch")


# ---- recording -----------------------------------------------------------------------------------------------
def record_trace(model_src: str, tokens: int, text_path: str | None = None) -> list[dict]:
    """Routing of every token of the held-out text through every layer, plus the next layer's guesses."""
    from mixtral_quant import load_quantized
    from mixtral_quant.checkpoint import resolve_source

    model = load_quantized(model_src, device="cpu", dtype="float32")
    path = text_path or os.path.join(resolve_source(model_src), "heldout.txt")
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no held-out text; pass --text FILE")
    with open(path, encoding="utf-8") as f:
        ids = model.tokenizer.encode(f.read(), bos=True)[:tokens]
    moes = [layer.block_sparse_moe for layer in model.layers]
    L = len(moes)
    cur: dict[int, torch.Tensor] = {}
    guesses: dict[int, torch.Tensor] = {}

    def hook(i):
        def pre(mod, args):
            x = args[0].reshape(-1, args[0].shape[-1])  # [T, D]
            cur[i] = mod.route(x)[0]  # [T, A]
            if i + 1 < L:
                guesses[i + 1] = moes[i + 1].route(x)  # ([T, A] ids, [T, A] renormalised weights)

        return pre

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(moes)]
    window = min(model.config.max_position_embeddings, 1024)
    trace = []
    with torch.inference_mode():
        for start in range(0, len(ids), window):
            chunk = torch.tensor([ids[start:start + window]])
            model(chunk)
            for t in range(chunk.shape[1]):
                for layer in range(L):
                    g = (guesses[layer][0][t].tolist(), [round(w, 4) for w in guesses[layer][1][t].tolist()]) if layer \
                        else (None, None)  # fmt: skip
                    trace.append({"token": start + t, "layer": layer, "experts": cur[layer][t].tolist(),
                                  "guess": g[0], "guess_weights": g[1]})  # fmt: skip
    for h in handles:
        h.remove()
    return trace


def read_trace(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---- replay --------------------------------------------------------------------------------------------------
def replay(trace: list[dict], policy: str, k: int, num_experts: int) -> dict:
    """Decode-order replay at k slots per layer. Per (token, layer): demand misses and prefetch copies.
    lru and lru+prefetch drive the runtime's own policy (mixtral_quant.offload.SlotCache, what CachedExperts
    runs); static and lfu are written here."""
    from mixtral_quant.offload import SlotCache

    min_w = float(policy.split(">")[1]) if ">" in policy else 0.0  # lru+prefetch>0.6: confident guesses only
    by_layer: dict[int, list[dict]] = {}
    for r in trace:
        by_layer.setdefault(r["layer"], []).append(r)
    hits = misses = prefetches = prefetch_hits = 0
    per_step = []  # (demand misses at (t, l), prefetch copies made before (t, l))
    for layer, rows in sorted(by_layer.items()):
        rows = sorted(rows, key=lambda r: r["token"])
        freq_all = Counter(e for r in rows for e in r["experts"])
        pinned = {e for e, _ in freq_all.most_common(k)}
        cache = SlotCache(k)
        lru: OrderedDict[int, None] = OrderedDict()  # lfu's slots
        freq: Counter = Counter()
        for r in rows:
            need = list(dict.fromkeys(r["experts"]))
            npref = 0
            if policy.startswith("lru+prefetch") and r["guess"] is not None:
                g = [e for e, w in zip(r["guess"], r.get("guess_weights") or [1.0] * len(r["guess"])) if w >= min_w]
                npref = len(cache.prefetch(g))
                prefetches += npref
            nmiss = 0
            if policy == "static":
                for e in need:
                    hits += e in pinned
                    nmiss += e not in pinned
            elif policy == "lfu":
                freq.update(need)
                for e in [e for e in need if e in lru]:  # those on the device are computed first
                    hits += 1
                    lru.move_to_end(e)
                for e in [e for e in need if e not in lru]:
                    nmiss += 1
                    while len(lru) >= k:
                        cands = [v for v in lru if v not in need] or list(lru)
                        lru.pop(min(cands, key=lambda v: freq[v]))
                    lru[e] = None
            else:  # lru, lru+prefetch: exactly what CachedExperts asks the policy
                before = cache.counts.misses
                if len(need) <= k:
                    cache.load(need)
                else:
                    for _ in cache.stream(need):
                        pass
                nmiss = cache.counts.misses - before
            misses += nmiss
            per_step.append((nmiss, npref))
        if policy not in ("static", "lfu"):
            hits += cache.counts.hits
            prefetch_hits += cache.counts.prefetch_hits
    steps = len(per_step)
    return dict(policy=policy, k=k, hit_rate=hits / max(hits + misses, 1), misses_per_layer_token=misses / steps,
                prefetches_per_layer_token=prefetches / steps, prefetch_hits=prefetch_hits, steps=per_step)  # fmt: skip


def speculation_recall(trace: list[dict]) -> float:
    """Of the experts layers 1.. used, the fraction the previous layer's input guessed (top-k vs top-k)."""
    rows = [r for r in trace if r["guess"] is not None]
    used = sum(len(set(r["experts"])) for r in rows)
    return sum(len(set(r["guess"]) & set(r["experts"])) for r in rows) / max(used, 1)


# ---- projection ----------------------------------------------------------------------------------------------
def mixtral_numbers(context: int, kv_tokens: int, name: str = "Mixtral-8x7B-v0.1") -> dict:
    """A known Mixtral config (8x7B by default; evals/plan_8x22b.py asks for 8x22B) with NF4 attention and experts
    by the memory model (mixtral_quant.memory, bf16 on CUDA)."""
    from mixtral_quant import memory
    from mixtral_quant.config import MixtralConfig

    c = MixtralConfig.from_name(name)
    fp = memory.footprint(c, {"attention": "nf4", "experts": "nf4"})
    nbytes = fp.class_bytes
    # read per token: every non-expert weight except the embedding table (one row), the active experts, the KV cache
    weights = sum(v for cls, v in nbytes.items() if cls not in ("experts", "embeddings"))
    kv = memory.kv_cache_bytes(c, kv_tokens)
    fixed = memory.place(fp, c, None, context=context)
    return dict(config=c, footprint=fp, context=context, expert_bytes=fp.expert_bytes,
                resident_bytes=fixed.fixed_bytes, read_nonexpert=weights + kv, layers=c.num_hidden_layers,
                experts=c.num_local_experts, top_k=c.num_experts_per_tok, lm_head=nbytes.get("lm_head", 0))  # fmt: skip


def slots_for(mem: int, m: dict) -> list[int] | None:
    """Slots per layer as load_quantized(max_memory=mem, context=...) places them; None: below its minimum."""
    from mixtral_quant import memory

    try:
        return memory.place(m["footprint"], m["config"], mem, context=m["context"]).slots
    except ValueError:
        return None


def compute_time(m: dict, gpu_bw: float) -> float:
    """Seconds per decoded token with every expert resident: the bytes read at the GPU's memory bandwidth."""
    return (m["read_nonexpert"] + m["layers"] * m["top_k"] * m["expert_bytes"]) / (gpu_bw * 1e9)


def project(results: dict, policy: str, slots: list[int], m: dict, h2d: float, gpu_bw: float) -> float:
    """Tokens/s for Mixtral from the replays' per-(token, layer) misses and prefetches at each layer's slot count
    (see the module docstring); a layer with a slot for every expert copies nothing."""
    x = m["expert_bytes"] / (h2d * 1e9)
    compute = compute_time(m, gpu_bw)
    head = m["lm_head"] / (gpu_bw * 1e9)
    layer_c = (compute - head) / m["layers"]
    total = head
    for k in slots:
        if k >= m["experts"]:
            total += layer_c
            continue
        steps = results[policy, k]["steps"]
        if policy.startswith("lru+prefetch"):
            total += sum(nm * x + max(layer_c, npf * x) for nm, npf in steps) / len(steps)
        else:
            total += layer_c + sum(nm for nm, _ in steps) / len(steps) * x
    return 1.0 / total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:tiny-mixtral", help="model whose routing is recorded")
    ap.add_argument("--text", default=None, help="text to route (default: the model's heldout.txt)")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens of text to record")
    ap.add_argument("--trace", default=None, help="replay this JSON-lines trace instead of recording")
    ap.add_argument("--save-trace", default=None, help="write the recorded trace here")
    ap.add_argument("--context", type=int, default=4096, help="context reserved on the device (KV cache, workspace)")
    ap.add_argument("--kv-tokens", type=int, default=1024, help="KV cache length read per decoded token")
    ap.add_argument("--scenario", action="append", default=None, metavar="MEM:H2D:GPUBW",
                    help="16GB:25:448 = device memory, host->device GB/s, GPU memory GB/s; repeatable")  # fmt: skip
    ap.add_argument("--policy", action="append", default=[], help="an extra policy, e.g. lru+prefetch>0.8")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)

    from mixtral_quant.devices import parse_size

    trace = read_trace(args.trace) if args.trace else record_trace(args.model, args.tokens, args.text)
    if args.save_trace:
        with open(args.save_trace, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in trace)
    E = max(8, 1 + max(e for r in trace for e in r["experts"]))  # Mixtral's 8 unless the trace shows more
    layers = 1 + max(r["layer"] for r in trace)
    policies = POLICIES + tuple(args.policy)
    results = {(p, k): replay(trace, p, k, E) for p in policies for k in range(1, E + 1)}
    m = mixtral_numbers(args.context, args.kv_tokens)
    scen = ([(s.split(":")[0], float(s.split(":")[1]), float(s.split(":")[2]), s) for s in args.scenario]
            if args.scenario else SCENARIOS)  # fmt: skip
    proj = []
    for mem, h2d, bw, what in scen:
        ks = slots_for(parse_size(mem), m)
        k = None if ks is None else min(ks) if min(ks) == max(ks) else f"{min(ks)}-{max(ks)}"
        row = dict(scenario=what, device_memory=mem, h2d_GBps=h2d, gpu_GBps=bw, slots_per_layer=k,
                   layers_with_more=0 if ks is None else sum(s > min(ks) for s in ks))  # fmt: skip
        for p in policies:
            row[p] = None if ks is None else project(results, p, ks, m, h2d, bw)
        proj.append(row)
    table = [{kk: v for kk, v in r.items() if kk != "steps"} for r in results.values()]
    recall = speculation_recall(trace)
    out = dict(trace=dict(source=args.trace or args.model, tokens=len({r["token"] for r in trace}), layers=layers,
                          experts=E, speculation_recall=recall),
               mixtral=dict(expert_bytes=m["expert_bytes"], resident_bytes=m["resident_bytes"],
                            read_nonexpert_bytes=m["read_nonexpert"], context=args.context, kv_tokens=args.kv_tokens),
               replay=table, projection=proj)  # fmt: skip
    if args.json:
        print(json.dumps(out, indent=1))
        return out
    print(f"trace: {out['trace']['tokens']} tokens x {layers} layers, {E} experts ({out['trace']['source']})")
    print(f"speculative guess recall (layer l's router on layer l-1's input, top-2 vs top-2): {recall:.3f}")
    print("\nhit rate per policy (k = device slots per layer); copies = lru+prefetch's copies per (token, layer)")
    print("  k  " + "  ".join(f"{p:>16}" for p in policies) + "   copies")
    for k in range(1, E + 1):
        r = [results[p, k] for p in policies]
        print(f"{k:3d}  " + "  ".join(f"{x['hit_rate']:16.3f}" for x in r)
              + f"   {results['lru+prefetch', k]['prefetches_per_layer_token']:.3f}")  # fmt: skip
    print(f"\nMixtral-8x7B NF4: {m['expert_bytes'] / 1e6:.1f} MB per expert, {m['resident_bytes'] / 2**30:.2f} GiB "
          f"resident with the KV cache and workspace (context {args.context}); projected decode tokens/s; "
          "k = slots per layer as load_quantized(max_memory=...) places them (a-b: the lowest layers get b)")
    print(f"{'scenario':<64} {'k':>3}  " + "  ".join(f"{p:>16}" for p in policies))
    for r in proj:
        print(f"{r['scenario']:<64} {str(r['slots_per_layer'] or 'n/a'):>3}  "
              + "  ".join(f"{r[p]:16.1f}" if r[p] is not None else f"{'n/a':>16}" for p in policies))  # fmt: skip
    return out


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
