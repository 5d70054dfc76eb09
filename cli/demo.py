"""`mixq demo`: the whole job on the embedded tiny model, offline, on the CPU: quantize to NF4 in a temporary
directory, show what it holds, generate from a prompt, and measure what NF4 costs against bf16 on held-out text."""

import json
import os
import sys
import tempfile
import time

import click

PROMPT = "def read_config(path):\n"


def heldout_ids(tok, src_dir: str, n: int) -> tuple[list[int], str]:
    """The first n tokens (BOS first) of the model's held-out text, else of a stdlib file every Python has."""
    f = os.path.join(src_dir, "heldout.txt")
    if not os.path.isfile(f):
        import json as stdlib_json

        f = stdlib_json.__file__
    with open(f, encoding="utf-8") as fh:
        return tok.encode(fh.read(), bos=True)[:n], f


@click.command()
@click.option("-p", "--prompt", default=PROMPT, show_default=True, help="Prompt to continue.")
@click.option("-n", "--max-new-tokens", type=click.IntRange(min=1), default=48, show_default=True)
@click.option("--context", type=click.IntRange(min=2), default=256, show_default=True,
              help="Window length of the bf16 vs NF4 comparison (the `mixq eval` protocol).")  # fmt: skip
@click.option("--eval-tokens", type=click.IntRange(min=2), default=2048, show_default=True,
              help="Held-out tokens compared between bf16 and NF4.")  # fmt: skip
@click.option("--source", default="builtin:tiny-mixtral", show_default=True,
              help="The bf16 model to quantize (any Mixtral checkpoint directory works).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the walk-through.")
@click.pass_context
def demo(ctx, prompt, max_new_tokens, context, eval_tokens, source, as_json):
    """Quantize the embedded tiny Mixtral to NF4, inspect it, generate, and compare it with bf16.

    Offline and on the CPU, in well under a minute. The tiny model (mixtral_quant/data/tiny-mixtral) has Mixtral's
    architecture and tokenizer and was trained on Python's standard library, so it writes Python-like text.

    \b
    Examples:
      mixq demo
      mixq demo --prompt "import os" -n 64
      mixq demo --json
    """
    import torch

    from .. import load_quantized
    from ..checkpoint import inspect_checkpoint, resolve_source
    from ..quantize import quantize

    say = (lambda *a, **k: None) if as_json else click.echo
    t_start = time.perf_counter()
    src = resolve_source(source)
    result = {"source": src}
    with tempfile.TemporaryDirectory(prefix="mixq-demo-") as tmp:
        out = os.path.join(tmp, "nf4")
        say(f"1. quantize {source} to NF4 (attention and experts) in {out}")
        q = quantize(src, out, fmt="nf4", device="cpu", progress=False)
        result["quantize"] = q.to_dict()
        say(f"   {q.input_bytes / 1e6:.2f} MB -> {q.output_bytes / 1e6:.2f} MB in {q.seconds:.1f} s\n")
        say("2. inspect")
        if as_json:
            result["inspect"] = json.loads(json.dumps(inspect_checkpoint(out), default=str))
        else:
            from .inspect import inspect as inspect_cmd

            ctx.invoke(inspect_cmd, path=out, as_json=False)
        say(f"\n3. generate (greedy, {max_new_tokens} tokens) from the NF4 model")
        model = load_quantized(out, device="cpu")
        tok = model.tokenizer
        ids = torch.tensor([tok.encode(prompt)])
        stream = tok.stream()
        say(prompt, nl=False)
        t0 = time.perf_counter()
        gen = model.generate(ids, max_new_tokens, eos=tok.eos_id,
                             callback=None if as_json else lambda t: click.echo(stream.push(int(t[0])), nl=False))  # fmt: skip
        dt = time.perf_counter() - t0
        new = gen[0, ids.shape[1]:].tolist()
        say(stream.flush())
        say(f"   [{len(new)} tokens in {dt:.2f} s, {len(new) / dt:.1f} tok/s]\n", err=True)
        result["generate"] = {"prompt": prompt, "text": tok.decode([t for t in new if t != tok.eos_id]),
                              "tokens": len(new), "seconds": round(dt, 3)}  # fmt: skip
        say(f"4. bf16 vs NF4 on held-out text (mixq eval: {eval_tokens} tokens in windows of {context})")
        from ..evaluate import evaluate, token_windows

        hids, text_file = heldout_ids(tok, src, eval_tokens)
        r = evaluate(out, src, token_windows(hids, min(context, len(hids))), device="cpu", progress=False)
        cmp = {"text": text_file, "tokens": r.tokens, "windows": r.windows, "context": r.context,
               "ppl_reference": r.reference.ppl, "ppl_quantized": r.quantized.ppl, "kl_mean": r.kld_mean,
               "kl_p99": r.kld_p99, "top1_agreement": r.top1_agreement}  # fmt: skip
        result["compare"] = cmp
        say(f"   text: {text_file} ({r.tokens} predicted tokens)")
        say(f"   perplexity  bf16 {cmp['ppl_reference']:.3f}   nf4 {cmp['ppl_quantized']:.3f} "
            f"({100 * (cmp['ppl_quantized'] / cmp['ppl_reference'] - 1):+.2f}%)")  # fmt: skip
        say(f"   KL(bf16 || nf4) {cmp['kl_mean']:.5f} nats/token (p99 {cmp['kl_p99']:.4f}), "
            f"top-1 agreement {100 * cmp['top1_agreement']:.1f}%")  # fmt: skip
    result["seconds"] = round(time.perf_counter() - t_start, 2)
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    else:
        click.echo(f"\ndone in {result['seconds']:.1f} s", err=True)
    sys.stdout.flush()
