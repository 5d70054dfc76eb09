"""`mixq eval`: perplexity of a quantized checkpoint and of its reference, KL divergence and top-1 agreement between
them, both streamed layer by layer. A thin layer over mixtral_quant.evaluate; prints a table (or one JSON object)."""

import json
import os

import click

from .options import BACKENDS


@click.command("eval")
@click.argument("quant")
@click.option("-r", "--reference", required=True, metavar="SRC",
              help="The model to compare with (usually the bf16 source).")  # fmt: skip
@click.option("--text", "text_file", metavar="FILE", help="Evaluate on this UTF-8 text file.")
@click.option("--dataset", metavar="NAME",
              help="Evaluate on a named dataset: wikitext2 (WikiText-2 raw test; needs `datasets`).")  # fmt: skip
@click.option("--context", type=int, metavar="N",
              help="Tokens per window [default: 2048, or the model's maximum if smaller].")  # fmt: skip
@click.option("--max-tokens", type=int, metavar="N", help="Use only the first N tokens of the text (BOS included).")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if present), cpu, cuda[:N].")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
              help="Compute dtype [default: the reference's dtype on CUDA, float32 on the CPU].")  # fmt: skip
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="Matmul backend for packed weights.")  # fmt: skip
@click.option("--batch-tokens", type=click.IntRange(min=1), default=8192, show_default=True,
              help="Tokens run through a layer at once.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a PNG of per-layer weight error and drift.")
def eval_(quant, reference, text_file, dataset, context, max_tokens, device, dtype, backend, batch_tokens, as_json,
          plot):  # fmt: skip
    """Compare QUANT with --reference on held-out text: perplexity of each, mean and 99th-percentile
    KL(reference || quantized) per token, and how often their most likely next token agrees.

    QUANT and the reference are anything `mixq quantize` accepts as a source (directory, Hub repo id,
    builtin:tiny-mixtral), packed or not. Both run layer by layer: one decoder layer's weights are in memory
    at a time, so the 93 GB bf16 Mixtral is evaluated on one 40 GB GPU or in 64 GB of RAM.

    \b
    Protocol (same for both models):
      - tokenize the whole text once, BOS prepended (then keep the first --max-tokens);
      - cut it into consecutive non-overlapping windows of --context tokens; a last partial window
        is dropped (its token count is reported);
      - evaluate each window on its own; perplexity = exp(mean negative log-likelihood over every
        predicted token, positions 1..end of each window); KL and top-1 agreement over the same
        predictions, over the full vocabulary.
    Text: --text FILE, --dataset wikitext2, or by default heldout.txt beside the reference (the
    embedded tiny model's held-out text when it has none).

    \b
    Examples:
      mixq eval mixtral-nf4 --reference mistralai/Mixtral-8x7B-v0.1 --dataset wikitext2 --context 4096
      mixq quantize -o tiny-nf4 && mixq eval tiny-nf4 -r builtin:tiny-mixtral --context 256 --plot tiny.png
    """
    from ..checkpoint import resolve_source
    from ..evaluate import (DEFAULT_CONTEXT, EvalError, check_dataset, check_window_args, encode_text, evaluate,
                            load_text, require_matplotlib, save_plot, token_windows)  # fmt: skip

    # Everything a user can get wrong is checked before the (possibly hour-long) run.
    if plot is not None:
        require_matplotlib()
        parent = os.path.dirname(os.path.abspath(plot))
        if not os.path.isdir(parent):
            raise EvalError(f"{plot}: directory {parent} does not exist; create it or choose another --plot path")
    if dataset is not None and text_file is None:
        check_dataset(dataset)
    check_window_args(context, max_tokens)
    ref_dir = resolve_source(reference)
    resolve_source(quant)
    text, text_src = load_text(text_file, dataset, ref_dir)
    from ..config import MixtralConfig

    max_pos = MixtralConfig.from_file(ref_dir).max_position_embeddings
    if context is None:
        context = min(DEFAULT_CONTEXT, max_pos)
    elif context > max_pos:
        raise EvalError(f"--context {context} is longer than the model supports (max_position_embeddings "
                        f"{max_pos} in {ref_dir}/config.json); use --context {max_pos} or less")
    ids = encode_text(text, ref_dir)
    windows = token_windows(ids, context, max_tokens)
    used = min(len(ids), max_tokens or len(ids))
    result = evaluate(quant, reference, windows, device=device, dtype=dtype, backend=backend,
                      weight_errors=plot is not None, batch_tokens=batch_tokens, progress=not as_json)  # fmt: skip
    result.extra.update(text=text_src, text_tokens=len(ids), dropped_tokens=used - windows.numel())
    if plot is not None:
        save_plot(result, plot)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    q, r = result.quantized, result.reference
    click.echo(f"text: {text_src}")
    click.echo(f"  {len(ids):,} tokens -> {result.windows} windows of {result.context} "
               f"({result.tokens:,} predicted tokens; {result.extra['dropped_tokens']:,} not evaluated)")  # fmt: skip
    rows = [("model", "perplexity", "vs reference", "path"),
            ("reference", f"{r.ppl:.4f}", "", r.path),
            ("quantized", f"{q.ppl:.4f}", f"{100 * (q.ppl / r.ppl - 1):+.2f}%", q.path)]  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        cells = (x.ljust(w) if i in (0, 3) else x.rjust(w) for i, (x, w) in enumerate(zip(row, widths)))
        click.echo("  " + "  ".join(cells))
    click.echo(f"KL(reference || quantized): mean {result.kld_mean:.5f} nats/token, p99 {result.kld_p99:.5f}")
    click.echo(f"top-1 agreement: {100 * result.top1_agreement:.2f}%")
    click.echo("hidden-state drift by layer: " + " ".join(f"{d:.2e}" for d in result.layer_drift))
    if plot is not None:
        click.echo(f"plot: {plot}")
