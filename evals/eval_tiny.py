"""What each quantization recipe costs the embedded tiny Mixtral (builtin:tiny-mixtral) on its held-out text:
the accuracy table of evals/RESULTS.md, printed as markdown. Same numbers as `mixq eval` (the commands are printed).

    python evals/eval_tiny.py                           # 5 recipes vs bf16, context 256, the whole heldout.txt
    python evals/eval_tiny.py --max-tokens 4096 --plot-dir /tmp/plots   # quicker; one PNG per recipe
    python evals/eval_tiny.py --recipes nf4,int8,int4 --threads 1       # a subset of the recipes
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time

import torch

from mixtral_quant import plan_memory
from mixtral_quant.checkpoint import inspect_checkpoint, resolve_source
from mixtral_quant.config import MixtralConfig
from mixtral_quant.evaluate import WEIGHT_CLASSES, encode_text, evaluate, load_text, save_plot, token_windows
from mixtral_quant.quantize import quantize

SOURCE = "builtin:tiny-mixtral"
# name, `mixq quantize` flags, recipe, goal (max perplexity increase over bf16, issue 6) or None
RECIPES = [
    ("nf4", "--format nf4", dict(attention="nf4", experts="nf4"), 0.08),
    ("int8", "--format int8", dict(attention="int8", experts="int8"), 0.01),
    ("int8-attn-nf4-experts", "--attention int8 --experts nf4", dict(attention="int8", experts="nf4"), None),
    ("bf16-attn-nf4-experts", "--attention bf16 --experts nf4", dict(attention="bf16", experts="nf4"), None),
    ("nf4-attn-int8-experts", "--attention nf4 --experts int8", dict(attention="nf4", experts="int8"), None),
    # int4 (compressed-tensors W4A16): the tiny model's rows are 64 wide, so groups of 64 (NF4's block size here)
    ("int4", "--format int4 --group-size 64", dict(attention="int4", experts="int4", group_size=64), None),
    ("int4-g32", "--format int4 --group-size 32", dict(attention="int4", experts="int4", group_size=32), None),
]
QUANTIZED = ("attention", "experts")


def bits(path: str) -> tuple[float, float]:
    """Bits per parameter of the quantized classes (attention + experts) and of the whole checkpoint."""
    info = inspect_checkpoint(path)
    c = info["classes"]
    q_bytes = sum(c[k]["bytes"] for k in QUANTIZED)
    q_params = sum(c[k]["params"] for k in QUANTIZED)
    return 8 * q_bytes / q_params, info["total"]["bits_per_param"]


def mixtral_bits(recipe: dict) -> tuple[float, float]:
    """The same recipe's bits per parameter on Mixtral-8x7B (attention + experts, all): exact bytes from the plan."""
    p = plan_memory(MixtralConfig.from_name("Mixtral-8x7B-v0.1"), **recipe)
    q_bytes = sum(p.class_bytes[k] for k in QUANTIZED)
    q_params = sum(p.class_params[k] for k in QUANTIZED)
    return 8 * q_bytes / q_params, 8 * sum(p.class_bytes.values()) / sum(p.class_params.values())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=SOURCE, help="the bf16 reference (default: the embedded tiny model)")
    p.add_argument("--context", type=int, default=256, help="tokens per window (the tiny model's training context)")
    p.add_argument("--max-tokens", type=int, help="only the first N tokens of the held-out text")
    p.add_argument("--text", help="a UTF-8 file instead of the reference's heldout.txt")
    p.add_argument("--plot-dir", help="write <recipe>.png (weight error and drift per layer) here")
    p.add_argument("--json", dest="json_out", help="also write every result as JSON to this file")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a busy shared machine)")
    p.add_argument("--recipes", help="comma-separated recipe names (default: all): " + ",".join(r[0] for r in RECIPES))
    args = p.parse_args(argv)
    recipes = RECIPES
    if args.recipes:
        names = args.recipes.split(",")
        unknown = sorted(set(names) - {r[0] for r in RECIPES})
        if unknown:
            p.error(f"unknown recipe(s) {', '.join(unknown)}")
        recipes = [r for r in RECIPES if r[0] in names]
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    src = resolve_source(args.source)
    text, text_src = load_text(args.text, None, src)
    ids = encode_text(text, src)
    windows = token_windows(ids, args.context, args.max_tokens)
    flags = f"--context {args.context}" + (f" --max-tokens {args.max_tokens}" if args.max_tokens else "")
    flags += f" --text {args.text}" if args.text else ""
    results, commands = [], []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="eval-tiny-") as tmp:
        for name, qflags, recipe, goal in recipes:
            out = quantize(src, os.path.join(tmp, name), device="cpu", progress=False, **recipe).output
            r = evaluate(out, src, windows, device="cpu", weight_errors=True, progress=False)
            qbits, allbits = bits(out)
            results.append((name, qflags, goal, qbits, allbits, r, mixtral_bits(recipe)))
            commands.append(f"mixq quantize {args.source} -o tiny-{name} {qflags}\n"
                            f"mixq eval tiny-{name} --reference {args.source} {flags} --json")  # fmt: skip
            if args.plot_dir:
                os.makedirs(args.plot_dir, exist_ok=True)
                title = (f"tiny-mixtral {name} ({qflags}) vs bf16: ppl {r.quantized.ppl:.3f} vs {r.reference.ppl:.3f}, "
                         f"KL {r.kld_mean:.4f}, top-1 {100 * r.top1_agreement:.1f}%")  # fmt: skip
                save_plot(r, os.path.join(args.plot_dir, f"{name}.png"), title=title)
            print(f"{name}: done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    ref = results[0][5].reference
    n_tokens = results[0][5].tokens
    print(f"Text: `{os.path.relpath(text_src) if os.path.exists(text_src) else text_src}`, {len(ids):,} tokens "
          f"-> {windows.shape[0]} windows of {args.context} ({n_tokens:,} predicted tokens). Reference: bf16 "
          f"`{args.source}`, perplexity {ref.ppl:.4f}.\n")  # fmt: skip
    print("| recipe | `mixq quantize` flags | bits/param (attn + experts) | bits/param (all) | same recipe on "
          "Mixtral-8x7B: attn + experts / all | perplexity | vs bf16 | KL mean (nats/token) | KL p99 "
          "| top-1 agreement | goal |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    print(f"| bf16 | (the source) | 16.00 | 16.00 | 16.00 / 16.00 | {ref.ppl:.4f} | | | | | |")
    for name, qflags, goal, qbits, allbits, r, (mq, mall) in results:
        inc = r.quantized.ppl / r.reference.ppl - 1
        verdict = "" if goal is None else f"{'met' if inc <= goal else 'NOT met'} (≤ +{100 * goal:g}%)"
        print(f"| {name} | `{qflags}` | {qbits:.2f} | {allbits:.2f} | {mq:.2f} / {mall:.2f} | {r.quantized.ppl:.4f} "
              f"| {100 * inc:+.4f}% "
              f"| {r.kld_mean:.5f} | {r.kld_p99:.4f} | {100 * r.top1_agreement:.2f}% | {verdict} |")  # fmt: skip
    print("\nWhere the error comes from: relative weight error ||W - deq(W_q)|| / ||W|| per class (mean over layers)"
          " and the relative L2 drift of the hidden states after the first and the last layer.\n")
    print("| recipe | " + " | ".join(WEIGHT_CLASSES) + " | drift, layer 0 | drift, last layer |")
    print("|---|" + "---:|" * (len(WEIGHT_CLASSES) + 2))
    for name, _, _, _, _, r, _ in results:
        errs = [sum(r.weight_error[c]) / len(r.weight_error[c]) for c in WEIGHT_CLASSES]
        print(f"| {name} | " + " | ".join(f"{e:.4f}" for e in errs)
              + f" | {r.layer_drift[0]:.4f} | {r.layer_drift[-1]:.4f} |")  # fmt: skip
    print("\nCommands (each row):\n\n```")
    print("\n".join(commands))
    print("```")
    print(f"\n({time.perf_counter() - t0:.0f} s on {torch.get_num_threads()} CPU thread(s))", file=sys.stderr)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump([{"recipe": n, "flags": fl, "bits_quantized": qb, "bits_total": ab, **r.to_dict()}
                       for n, fl, _, qb, ab, r, _ in results], f, indent=2)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
