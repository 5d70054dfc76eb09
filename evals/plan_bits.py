"""Bits per parameter and weight bytes of each recipe on the real Mixtral configs, computed by the plan
(mixtral_quant.plan.plan_memory, the numbers `mixq plan` prints): the "same recipe on Mixtral" column of
evals/RESULTS.md. Config arithmetic only; no weights are read.

    python evals/plan_bits.py                 # Mixtral-8x7B-v0.1
    python evals/plan_bits.py --model Mixtral-8x22B-v0.1
"""

from __future__ import annotations

import argparse
import sys

import math

from mixtral_quant import formats
from mixtral_quant.checkpoint import expected_shapes, resolve_config, tensor_class
from mixtral_quant.plan import plan_memory

# name, `mixq quantize` / `mixq plan` flags, plan_memory arguments
RECIPES = [
    ("nf4", "--format nf4", dict(fmt="nf4")),
    ("int8", "--format int8", dict(fmt="int8")),
    ("int4", "--format int4", dict(fmt="int4", group_size=128)),
    ("int4-g64", "--format int4 --group-size 64", dict(fmt="int4", group_size=64)),
    ("int4-g32", "--format int4 --group-size 32", dict(fmt="int4", group_size=32)),
    ("bf16-attn-int4-experts", "--attention bf16 --experts int4", dict(attention="bf16", experts="int4")),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="Mixtral-8x7B-v0.1", help="a known config name, directory or config.json")
    args = p.parse_args(argv)
    config = resolve_config(args.model)
    shapes = expected_shapes(config)
    print(f"{args.model}, bf16 source. Stored: the checkpoint's bytes (formats.packed_nbytes, what `mixq quantize` "
          f"writes). Loaded: what `mixq plan {args.model} FLAGS` counts on the GPU (int4 scales become fp32 when "
          "repacked for the NF4 kernels).\n")
    print("| recipe | flags | stored bits/param (attn + experts) | stored bits/param (all) | stored | "
          "loaded bits/param (attn + experts) | loaded (all weights) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, flags, kw in RECIPES:
        plan = plan_memory(config, **kw)
        fmts, group = plan.formats, kw.get("group_size", formats.INT4_GROUP_SIZE)
        stored = {c: 0 for c in plan.class_bytes}
        for t, s in shapes.items():
            c = tensor_class(t)
            stored[c] += formats.packed_nbytes(fmts[c], s, group_size=group) if c in fmts else 2 * math.prod(s)
        q = ("attention", "experts")
        q_params = sum(plan.class_params[c] for c in q)
        all_params = sum(plan.class_params.values())
        print(f"| {name} | `{flags}` | {8 * sum(stored[c] for c in q) / q_params:.3f} "
              f"| {8 * sum(stored.values()) / all_params:.3f} | {sum(stored.values()) / 1e9:.2f} GB "
              f"| {8 * sum(plan.class_bytes[c] for c in q) / q_params:.3f} | {plan.weights_bytes / 1e9:.2f} GB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
