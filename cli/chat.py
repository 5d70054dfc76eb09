"""`mixq chat`: a multi-turn REPL in Mixtral-Instruct's format, streaming each answer, tokens/s after it.
With stdin piped, each line is one user turn (for scripts); /reset starts over, /exit or Ctrl-D ends."""

import sys
import time

import click

from .generate import compile_option, load, model_options, offload_line, sampling_kwargs, sampling_options


@click.command()
@click.argument("path")
@click.option("-n", "--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="Longest answer, in tokens.")  # fmt: skip
@click.option("--system", default=None, help="A system prompt (prepended to the first user turn).")
@sampling_options
@model_options
@click.option("--stats", is_flag=True, help="Print expert-offload statistics (hits, misses, bytes) after answers.")
@compile_option
def chat(path, max_new_tokens, system, temperature, top_p, top_k, seed, device, dtype, backend, max_memory, stats,
         compile):  # fmt: skip
    """Chat with the model at PATH in the [INST] ... [/INST] instruct format.

    Type a message and press Enter; /reset forgets the conversation, /exit (or Ctrl-D) quits. With stdin piped,
    every line is one user turn and answers go to stdout, one per line group.

    \b
    Examples:
      mixq chat mixtral-nf4
      mixq chat mixtral-nf4 --max-memory 16GiB --stats
      printf 'Hi!\\nWhat is NF4?\\n' | mixq chat mixtral-nf4 --temperature 0
    """
    import torch

    model, load_s = load(path, device, dtype, backend, max_memory)
    tok = model.tokenizer
    interactive = sys.stdin.isatty()
    limit = model.config.max_position_embeddings
    if interactive:
        click.echo(f"loaded {path} in {load_s:.1f} s on {model.device}; /reset to start over, /exit to quit", err=True)
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            break
        if line == "/reset":
            history = history[:1] if system else []
            click.echo("[conversation reset]", err=True)
            continue
        history.append({"role": "user", "content": line})
        ids = tok.apply_chat_template(history)
        while len(ids) + max_new_tokens > limit and _drop_oldest_turn(history, bool(system)):
            ids = tok.apply_chat_template(history)
        if len(ids) + max_new_tokens > limit:
            history.pop()
            click.echo(f"mixq: this message and a {max_new_tokens}-token answer exceed the model's context of "
                       f"{limit} tokens; send something shorter or lower --max-new-tokens", err=True)  # fmt: skip
            continue
        stream = tok.stream()
        t0 = time.perf_counter()
        first = []

        def on_token(t):
            if not first:
                first.append(time.perf_counter())
            if int(t[0]) != tok.eos_id:
                text = stream.push(int(t[0]))
                if text:
                    click.echo(text, nl=False)

        out = model.generate(torch.tensor([ids]), max_new_tokens, eos=tok.eos_id, callback=on_token, compile=compile,
                             **sampling_kwargs(temperature, top_p, top_k, seed))  # fmt: skip
        click.echo(stream.flush())
        new = [t for t in out[0, len(ids):].tolist() if t != tok.eos_id]
        history.append({"role": "assistant", "content": tok.decode(new) or " "})
        dt = time.perf_counter() - t0
        decode = dt - (first[0] - t0) if first else 0
        n = out.shape[1] - len(ids)
        tps = (n - 1) / decode if n > 1 and decode > 0 else float("nan")
        click.echo(f"[{n} tokens, {tps:.1f} tok/s, prompt {len(ids)} tokens]", err=True)
        if stats:
            click.echo(offload_line(model.offload_stats()), err=True)


def _drop_oldest_turn(history: list[dict], has_system: bool) -> bool:
    """Forget the oldest user/assistant exchange to fit the context; False when only the newest turn is left."""
    start = 1 if has_system else 0
    if len(history) - start <= 1:
        return False
    del history[start:start + 2]
    return True
