"""Which Mixtral-8x7B parameters `BitsAndBytesConfig(load_in_4bit=True)` quantizes in transformers 5: exact counts.

transformers' MixtralForCausalLM is built on the meta device from the Mixtral-8x7B config (config.py's known
config, nothing downloaded), then transformers' own bitsandbytes integration (`replace_with_bnb_linear`, what
`from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True))` calls, lm_head kept as
transformers keeps it) swaps its modules; the parameters of the swapped modules are the ones that become 4-bit.
Everything else, the fused 3-D expert parameters among them, stays in 16 bits.

    python evals/count_linear_params.py [--model Mixtral-8x7B-v0.1]
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="Mixtral-8x7B-v0.1", help="a known config (mixtral_quant.config)")
    args = ap.parse_args(argv)
    import bitsandbytes as bnb
    import transformers
    from transformers import BitsAndBytesConfig, MixtralConfig, MixtralForCausalLM
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    from mixtral_quant.config import KNOWN_CONFIGS

    cfg = MixtralConfig(**KNOWN_CONFIGS[args.model])
    with torch.device("meta"):
        model = MixtralForCausalLM(cfg)
    total = sum(p.numel() for p in model.parameters())
    by_kind: dict[str, int] = {}
    for name, p in model.named_parameters():
        kind = ("experts (fused 3-D)" if ".experts." in name else "attention" if ".self_attn." in name
                else "router" if ".gate." in name else "embeddings" if "embed_tokens" in name
                else "lm_head" if name.startswith("lm_head") else "norms")  # fmt: skip
        by_kind[kind] = by_kind.get(kind, 0) + p.numel()
    model = replace_with_bnb_linear(model, modules_to_not_convert=["lm_head"],
                                    quantization_config=BitsAndBytesConfig(load_in_4bit=True))  # fmt: skip
    four_bit = {n: sum(p.numel() for p in m.parameters(recurse=False)) for n, m in model.named_modules()
                if isinstance(m, bnb.nn.Linear4bit)}  # fmt: skip
    q = sum(four_bit.values())
    kinds = sorted({n.split(".")[-1] for n in four_bit})
    print(f"{args.model} in transformers {transformers.__version__} (bitsandbytes {bnb.__version__}), built on meta")
    print(f"parameters, total:                    {total:>14,}  ({total / 1e9:.2f}B)")
    for kind, n in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<35} {n:>14,}  ({n / 1e9:.3f}B)")
    print(f"made 4-bit by load_in_4bit:           {q:>14,}  ({q / 1e9:.2f}B)  in {len(four_bit)} Linear4bit modules "
          f"({', '.join(kinds)})")
    print(f"left in 16 bits:                      {total - q:>14,}  ({(total - q) / 1e9:.2f}B, "
          f"{100 * (total - q) / total:.1f}%; {2 * (total - q) / 1e9:.1f} GB in bf16)")
    experts = by_kind.get("experts (fused 3-D)", 0)
    print(f"  of which the experts:               {experts:>14,}  ({experts / 1e9:.2f}B)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
