"""Mixtral-8x22B on one GPU: what `mixq plan` says at 4k/32k/64k tokens of context for 80/48/40/24 GB (fits or
not, experts per layer on the device, host memory for the rest), and evals/offload_sim.py's projection of batch-1
decode tokens/s for each case. Not a timed benchmark: memory arithmetic and a replayed routing trace.

    python evals/plan_8x22b.py [--tokens 4096 | --trace trace.jsonl] [--kv-tokens 1024] [--json]
    python evals/record.py evals/results/x22b_plan.txt -- python evals/plan_8x22b.py      # saved with its header

The plan is `plan.plan_memory` (what `mixq plan Mixtral-8x22B-v0.1 --context N --gpu-memory M` prints); the slots per
layer are checked equal to offload_sim's (memory.place, the loader's placement) for every case. The projection
replays the embedded tiny model's routing (its per-layer hit rates stand in for 8x22B's 56 layers) with the
runtime's batch-1 decode policy (lru) and with speculative prefetch (lru+prefetch); GPU bandwidths and host links
are the assumptions in GPUS.
"""

from __future__ import annotations

import argparse
import json
import sys

import offload_sim  # evals/offload_sim.py, beside this script

NAME = "Mixtral-8x22B-v0.1"
CONTEXTS = (4096, 32768, 65536)
# (budget, host->device GB/s, GPU memory GB/s, what it stands for): one typical card per budget
GPUS = [
    ("80GB", 50.0, 3350.0, "H100 SXM 80GB (3.35 TB/s), PCIe 5.0 x16 at 50 GB/s"),
    ("48GB", 25.0, 864.0, "L40S 48GB (864 GB/s), PCIe 4.0 x16 at 25 GB/s"),
    ("40GB", 25.0, 1555.0, "A100 40GB (1.56 TB/s), PCIe 4.0 x16 at 25 GB/s"),
    ("24GB", 25.0, 1008.0, "RTX 4090 24GB (1.01 TB/s), PCIe 4.0 x16 at 25 GB/s"),
]
POLICIES = ("lru", "lru+prefetch")


def gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def rows(trace: list[dict], kv_tokens: int) -> list[dict]:
    from mixtral_quant.config import MixtralConfig
    from mixtral_quant.devices import parse_size
    from mixtral_quant.plan import plan_memory

    config = MixtralConfig.from_name(NAME)
    E = config.num_local_experts
    results = {(p, k): offload_sim.replay(trace, p, k, E) for p in POLICIES for k in range(1, E + 1)}
    out = []
    for context in CONTEXTS:
        m = offload_sim.mixtral_numbers(context, min(kv_tokens, context), name=NAME)
        for mem, h2d, bw, what in GPUS:
            p = plan_memory(config, context=context, gpu_memory=mem)
            o = p.offload
            slots = offload_sim.slots_for(parse_size(mem), m)
            if p.fits:
                want = [E] * config.num_hidden_layers
            else:
                want = o["slots_per_layer"] if o["possible"] else None
            if slots != want:
                raise SystemExit(f"{mem} at {context}: plan says {want}, offload_sim places {slots}")
            row = dict(context=context, gpu_memory=mem, gpu=what, h2d_GBps=h2d, gpu_GBps=bw, fits=p.fits,
                       possible=o["possible"], total_bytes=p.total_bytes, kv_cache_bytes=p.kv_cache_bytes,
                       device_bytes=o["device_bytes"], host_bytes=o["host_bytes"],
                       minimum_bytes=o["minimum_bytes"], slots_per_layer=slots,
                       workspace_bytes=p.workspace_bytes)  # fmt: skip
            for pol in POLICIES:
                row[pol] = None if slots is None else offload_sim.project(results, pol, slots, m, h2d, bw)
            out.append(row)
    return out


def slots_str(slots: list[int] | None) -> str:
    if slots is None:
        return "-"
    lo, hi = min(slots), max(slots)
    return f"{lo}" if lo == hi else f"{lo}-{hi} ({sum(s == hi for s in slots)} layers {hi})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:tiny-mixtral", help="model whose routing is recorded")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens of its held-out text to record")
    ap.add_argument("--trace", default=None, help="replay this JSON-lines trace (offload_sim --save-trace) instead")
    ap.add_argument("--kv-tokens", type=int, default=1024, help="KV cache length read per decoded token")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)

    trace = offload_sim.read_trace(args.trace) if args.trace else offload_sim.record_trace(args.model, args.tokens)
    table = rows(trace, args.kv_tokens)
    if args.json:
        print(json.dumps(dict(model=NAME, trace=args.trace or args.model, kv_tokens=args.kv_tokens, rows=table),
                         indent=1))  # fmt: skip
        return table
    print(f"{NAME}, NF4 attention and experts, batch 1; routing trace: {args.trace or args.model} "
          f"({len({r['token'] for r in trace})} tokens); decode reads a {args.kv_tokens}-token KV cache.\n")
    print("\n".join(table_lines(table)))
    return table


def table_lines(table: list[dict]) -> list[str]:
    out = ["| context | GPU memory | fits | experts per layer on the device | device | host memory (experts) "
           "| lru tok/s | lru+prefetch tok/s | card assumed |", "|--:|--:|---|---|--:|--:|--:|--:|---|"]
    for r in table:
        fits = "yes" if r["fits"] else "offload" if r["possible"] else \
            f"no: needs {gb(r['minimum_bytes'])} (KV cache {gb(r['kv_cache_bytes'])})"
        tps = [f"{r[p]:.1f}" if r[p] is not None else "-" for p in POLICIES]
        out.append(f"| {r['context']} | {r['gpu_memory']} | {fits} | {slots_str(r['slots_per_layer'])} of 8 "
                   f"| {gb(r['device_bytes']) if r['possible'] else '-'} "
                   f"| {gb(r['host_bytes']) if r['possible'] else '-'} | {tps[0]} | {tps[1]} | {r['gpu']} |")
    return out


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
