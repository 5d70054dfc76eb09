"""Runtime expert-cache hit rates: the embedded model quantized to NF4, greedy-decoded on the CPU with k device slots
per layer (offload.offload_model), against the same model fully resident (tokens must be identical).

    python evals/offload_hits.py [--tokens 64] [--slots 1 2 4] [--out evals/results/offload_hits.txt]

Prints, per k: the slots in all, whether the tokens equal the resident model's, hits, misses and the hit rate
(hits / (hits + misses) of model.offload_stats(), prompt and decode steps together). The simulator
(evals/offload_sim.py) replays the same policy over recorded routing; this measures the runtime itself.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import tempfile


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:tiny-mixtral")
    ap.add_argument("--prompt", default="def fibonacci(n):")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens, greedy")
    ap.add_argument("--slots", type=int, nargs="+", default=[1, 2, 4], help="device slots per layer")
    ap.add_argument("--out", default=None, help="also write the report to this file")
    args = ap.parse_args(argv)

    import torch

    from mixtral_quant import load_quantized
    from mixtral_quant.quantize import quantize
    from mixtral_quant.offload import offload_model

    torch.set_num_threads(1)
    lines = [f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
             f"machine: {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}",
             "command: python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]), ""]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "nf4")
        quantize(args.model, out, fmt="nf4", device="cpu", progress=False)
        ref = load_quantized(out, device="cpu")
        ids = torch.tensor([ref.tokenizer.encode(args.prompt)])
        want = ref.generate(ids, args.tokens, eos=[])
        L = ref.config.num_hidden_layers
        lines.append(f"{args.model} quantized to NF4, {L} layers, {ref.config.num_local_experts} experts; "
                     f"prompt {args.prompt!r}, {args.tokens} greedy tokens, fp32 on the CPU")  # fmt: skip
        lines.append(f"{'k':>3} {'slots':>6} {'same tokens':>12} {'hits':>6} {'misses':>7} {'hit rate':>9}")
        for k in args.slots:
            model = load_quantized(out, device="cpu")
            offload_model(model, slots_per_layer=k)
            same = torch.equal(model.generate(ids, args.tokens, eos=[]), want)
            s = model.offload_stats()
            rate = s["hits"] / max(s["hits"] + s["misses"], 1)
            lines.append(f"{k:>3} {s['slots']:>6} {str(same):>12} {s['hits']:>6} {s['misses']:>7} {rate:>9.3f}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
