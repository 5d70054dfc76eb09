"""`mixq generate`: load a (quantized) checkpoint and stream a continuation of a prompt to stdout, timing to stderr.
A thin layer over mixtral_quant.load_quantized and model.generate."""

import json
import time

import click

from .options import compile_option, load, model_options, offload_line, sampling_kwargs, sampling_options


@click.command()
@click.argument("path")
@click.option("-p", "--prompt", required=True, help="The text to continue.")
@click.option("-n", "--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@sampling_options
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object at the end instead of streaming.")
@click.option("--stats", is_flag=True, help="Print expert-offload statistics (hits, misses, bytes) at the end.")
@compile_option
def generate(path, prompt, max_new_tokens, temperature, top_p, top_k, seed, device, dtype, backend, max_memory,
             as_json, stats, compile):  # fmt: skip
    """Continue PROMPT with the model at PATH (a directory, a Hub repo id or builtin:tiny-mixtral).

    The continuation streams to stdout; load time and tokens/s go to stderr. Greedy unless --temperature > 0.

    \b
    Examples:
      mixq generate mixtral-nf4 -p "The capital of France is" -n 20
      mixq generate mixtral-nf4 -p "Once upon a time" --temperature 0.8 --top-p 0.95 --seed 0
      mixq generate builtin:tiny-mixtral -p "def fibonacci(n):" --json
    """
    import torch

    model, load_s = load(path, device, dtype, backend, max_memory)
    tok = model.tokenizer
    ids = torch.tensor([tok.encode(prompt, bos=True)])
    stream = tok.stream()
    from ..generate import resolve_compile

    compiled = resolve_compile(model, compile)
    times = []  # when each token arrived
    t0 = time.perf_counter()

    def on_token(t):
        times.append(time.perf_counter())
        if not as_json:
            text = stream.push(int(t[0]))
            if text:
                click.echo(text, nl=False)

    out = model.generate(ids, max_new_tokens, eos=tok.eos_id, callback=on_token, compile=compile,
                         **sampling_kwargs(temperature, top_p, top_k, seed))  # fmt: skip
    total = time.perf_counter() - t0
    new = out[0, ids.shape[1]:].tolist()
    n = len(new)
    first = times[0] if times else t0
    decode_s = total - (first - t0)
    tps = (n - 1) / decode_s if n > 1 and decode_s > 0 else float("nan")
    compile_s = None
    if compiled and len(times) > 2:  # token 0: the prompt; 1: the eager warm-up step; 2 compiles: time the rest
        compile_s = times[2] - times[1]
        tps = (n - 3) / (total - (times[2] - t0)) if n > 3 else float("nan")
    if as_json:
        text = tok.decode([t for t in new if t != tok.eos_id])
        click.echo(json.dumps({"prompt": prompt, "text": text, "tokens": new, "new_tokens": n,
                               "load_seconds": round(load_s, 3), "seconds": round(total, 3),
                               "decode_tokens_per_s": round(tps, 2),
                               **({"compile_seconds": round(compile_s, 3)} if compile_s is not None else {}),
                               **({"offload": model.offload_stats()} if stats else {})}))  # fmt: skip
        return
    click.echo(stream.flush())
    click.echo(f"[{n} tokens in {total:.2f} s: prefill {ids.shape[1]} tokens {first - t0:.2f} s, "
               f"decode {tps:.1f} tok/s{'' if compile_s is None else f' (compiling: {compile_s:.1f} s)'}; "
               f"load {load_s:.1f} s]", err=True)  # fmt: skip
    if stats:
        click.echo(offload_line(model.offload_stats()), err=True)
