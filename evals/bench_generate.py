"""Greedy decode tokens/s of our NF4 model against transformers' `generate` on the same weights, CPU, fp32.

Same run, same prompt, same number of tokens; medians of several interleaved runs, the ratios printed, for our eager
decode and our compiled one (`compile=True`; its one-time compile time reported apart, not in tok/s), at each thread
count, on the embedded tiny model (builtin:tiny-mixtral).
Usage: python evals/bench_generate.py [--tokens 64] [--repeats 5] [--threads 1,2] [--no-compile] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    "


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
    ap.add_argument("--threads", default="1,2",
                    help="comma-separated torch thread counts, each measured for all sides (0: torch default)")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled decode (saves its compile time)")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object")
    args = ap.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    from mixtral_quant import load_quantized
    from mixtral_quant.quantize import quantize

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        from mixtral_quant.checkpoint import resolve_source

        src, what = resolve_source("builtin:tiny-mixtral"), "builtin:tiny-mixtral"
        nf4 = os.path.join(tmp, "nf4")
        quantize(src, nf4, fmt="nf4", device="cpu", progress=False)
        ours = load_quantized(nf4, device="cpu", dtype=torch.float32, backend="torch")
        hf = dequantized_hf_model(nf4, tmp)
        ids = torch.tensor([ours.tokenizer.encode(args.prompt)])
        n = args.tokens
        for t in threads:
            torch.set_num_threads(t or os.cpu_count())
            rows.append(measure(ours, hf, ids, n, args.repeats, compiled=not args.no_compile))
    res = {"model": what, "prompt_tokens": ids.shape[1], "new_tokens": n, "repeats": args.repeats, "runs": rows}
    if args.json:
        print(json.dumps(res))
        return res
    print(f"model: {what}; prompt {ids.shape[1]} tokens, {n} new tokens, greedy, CPU fp32, "
          f"median of {args.repeats} interleaved runs; tok/s = new tokens / whole generate call (prefill included)")
    print(f"{'threads':>7} {'transformers':>12} {'ours eager':>10} {'ratio':>6} {'ours compiled':>13} {'ratio':>6} "
          f"{'compile s':>9}  same tokens")  # fmt: skip
    for r in rows:
        comp = (f"{r['compiled_tok_s']:13.1f} {r['compiled_ratio']:5.2f}x {r['compile_s']:9.1f}" if "compiled_tok_s" in r
                else f"{'-':>13} {'-':>6} {'-':>9}")  # fmt: skip
        print(f"{r['threads']:7d} {r['transformers_fp32_tok_s']:12.1f} {r['eager_tok_s']:10.1f} {r['eager_ratio']:5.2f}x "
              f"{comp}  {r['same_tokens']}")  # fmt: skip
    for r in rows:
        line = f"ratio vs transformers generate, {r['threads']} thread(s): eager {r['eager_ratio']:.2f}x"
        print(line + (f", compiled {r['compiled_ratio']:.2f}x" if "compiled_ratio" in r else ""))
    return res


def measure(ours, hf, ids, n: int, repeats: int, compiled: bool) -> dict:
    """One thread setting: warm up, compile (timed apart), then `repeats` interleaved runs of every side."""
    threads = torch.get_num_threads()

    def run_hf():
        with torch.inference_mode():
            return hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                               pad_token_id=0, attention_mask=torch.ones_like(ids))  # fmt: skip

    sides = {"eager": lambda: ours.generate(ids, n, eos=[]), "transformers": run_hf}
    res: dict = {"threads": threads}
    if compiled:
        # inductor's CPU kernels are built for the current thread count: compile again for each setting
        torch._dynamo.reset()
        t0 = time.perf_counter()
        ours.generate(ids, n, eos=[], compile=True)
        first = time.perf_counter() - t0
        sides["compiled"] = lambda: ours.generate(ids, n, eos=[], compile=True)
    for f in sides.values():  # warm-up
        f()
    times: dict[str, list[float]] = {k: [] for k in sides}
    outs = {}
    for _ in range(repeats):  # interleaved, so that load from other processes hits every side alike
        for k, f in sides.items():
            t0 = time.perf_counter()
            outs[k] = f()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    res["transformers_fp32_tok_s"] = n / med["transformers"]
    res["eager_tok_s"] = n / med["eager"]
    res["eager_ratio"] = res["eager_tok_s"] / res["transformers_fp32_tok_s"]
    same = torch.equal(outs["eager"], outs["transformers"])
    if compiled:
        res["compiled_tok_s"] = n / med["compiled"]
        res["compiled_ratio"] = res["compiled_tok_s"] / res["transformers_fp32_tok_s"]
        res["compile_s"] = max(first - med["compiled"], 0.0)  # the first call minus a steady one
        same = same and torch.equal(outs["compiled"], outs["transformers"])
    res["same_tokens"] = bool(same)
    return res


if __name__ == "__main__":
    main()
