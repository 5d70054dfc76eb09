"""Greedy decode tokens/s of our NF4 model against transformers' `generate` on the same weights, CPU, fp32.

Same run, same prompt, same number of tokens; medians of several runs, the ratio printed. The embedded tiny model
when present, else a random checkpoint of its shape. Usage: python evals/bench_generate.py [--tokens 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

# The tiny model's shape (evals/train_tiny.py defaults), used when it is not shipped yet.
FALLBACK = dict(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=1024,
                rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=64, tie_word_embeddings=False, bos_token_id=1,
                eos_token_id=2)  # fmt: skip
PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    "


def source_dir(tmp: str) -> tuple[str, str]:
    from mixtral_quant.checkpoint import CheckpointError, resolve_source

    try:
        return resolve_source("builtin:tiny-mixtral"), "builtin:tiny-mixtral"
    except CheckpointError:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
        from conftest import write_checkpoint

        return write_checkpoint(os.path.join(tmp, "random"), FALLBACK), "random checkpoint (tiny-mixtral's shape)"


def dequantized_hf_model(path: str, tmp: str):
    """transformers' MixtralForCausalLM holding our NF4 checkpoint's weights, dequantized to fp32."""
    from safetensors.torch import save_file
    from transformers import MixtralForCausalLM

    from mixtral_quant.checkpoint import CheckpointReader
    from mixtral_quant.formats import dequantize_tensor

    out = os.path.join(tmp, "hf")
    os.makedirs(out)
    with CheckpointReader(path) as r:
        sd = {p + ".weight": dequantize_tensor(r.module(p), torch.float32).contiguous() for p in r.modules_index()}
        conf = {k: v for k, v in r.config.raw.items() if k != "quantization_config"}
    save_file(sd, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(conf, f)
    return MixtralForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per generate call")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per side (median reported)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for both sides (decode at this size is dispatch-bound; 0: torch default)")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from mixtral_quant import load_quantized
    from mixtral_quant.quantize import quantize

    with tempfile.TemporaryDirectory() as tmp:
        src, what = source_dir(tmp)
        nf4 = os.path.join(tmp, "nf4")
        quantize(src, nf4, fmt="nf4", device="cpu", progress=False)
        ours = load_quantized(nf4, device="cpu", dtype=torch.float32, backend="torch")
        hf = dequantized_hf_model(nf4, tmp)
        ids = torch.tensor([ours.tokenizer.encode(args.prompt)])
        n = args.tokens

        def run_ours():
            return ours.generate(ids, n, eos=[])

        def run_hf():
            with torch.inference_mode():
                return hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                   pad_token_id=0, attention_mask=torch.ones_like(ids))  # fmt: skip

        # interleave the two sides so that load from other processes hits both alike
        t_ours, t_hf = [], []
        out_ours = out_hf = None
        run_ours(), run_hf()  # warm-up
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out_ours = run_ours()
            t_ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out_hf = run_hf()
            t_hf.append(time.perf_counter() - t0)
    res = {
        "model": what, "prompt_tokens": ids.shape[1], "new_tokens": n, "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "ours_nf4_tok_s": n / statistics.median(t_ours), "transformers_fp32_tok_s": n / statistics.median(t_hf),
        "same_tokens": bool(torch.equal(out_ours, out_hf)),
    }  # fmt: skip
    res["ratio"] = res["ours_nf4_tok_s"] / res["transformers_fp32_tok_s"]
    if args.json:
        print(json.dumps(res))
    else:
        print(f"model: {what}; prompt {res['prompt_tokens']} tokens, {n} new tokens, greedy, CPU fp32, "
              f"{res['threads']} threads, median of {args.repeats}")  # fmt: skip
        print(f"  ours (NF4, torch backend)        {res['ours_nf4_tok_s']:8.1f} tok/s")
        print(f"  transformers generate (fp32)     {res['transformers_fp32_tok_s']:8.1f} tok/s")
        print(f"  ratio                            {res['ratio']:8.2f}x   same tokens: {res['same_tokens']}")
    return res


if __name__ == "__main__":
    main()
