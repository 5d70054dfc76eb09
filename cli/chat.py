"""`mixq chat`: a multi-turn REPL in Mixtral-Instruct's format, streaming each answer, tokens/s after it.
With stdin piped, each line is one user turn (for scripts); /reset starts over, /exit or Ctrl-D ends.
Ctrl-C while answering stops the reply and returns to the prompt; Ctrl-C or Ctrl-D at the prompt exits (status 0)."""

import sys
import time

import click

from .options import compile_option, load, model_options, offload_line, sampling_kwargs, sampling_options


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

    Type a message and press Enter; Ctrl-C stops a reply (the partial reply is kept); /reset forgets the
    conversation, /exit, Ctrl-D or Ctrl-C at the prompt quits. With stdin piped,
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
    if model.expert_placement is not None:  # under --max-memory: the KV cache reserved, not the model's maximum
        limit = min(limit, model.expert_placement.context)
    if interactive:
        click.echo(f"loaded {path} in {load_s:.1f} s on {model.device}; Ctrl-C stops an answer, /reset starts over, "
                   "/exit to quit", err=True)  # fmt: skip
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:  # Ctrl-D
            break
        except KeyboardInterrupt:  # Ctrl-C at the prompt: leave quietly, status 0
            click.echo(err=True)
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
        first, got = [], []

        def on_token(t):
            if not first:
                first.append(time.perf_counter())
            got.append(int(t[0]))
            if int(t[0]) != tok.eos_id:
                text = stream.push(int(t[0]))
                if text:
                    click.echo(text, nl=False)

        try:
            model.generate(torch.tensor([ids]), max_new_tokens, eos=tok.eos_id, callback=on_token, compile=compile,
                           **sampling_kwargs(temperature, top_p, top_k, seed))  # fmt: skip
            stopped = False
        except KeyboardInterrupt:  # Ctrl-C while answering: stop this reply, keep the conversation
            stopped = True
        click.echo(stream.flush())
        new = [t for t in got if t != tok.eos_id]
        if stopped and not new:
            history.pop()
            click.echo("[stopped before any reply: your message was dropped from the conversation]", err=True)
            continue
        history.append({"role": "assistant", "content": tok.decode(new) or " "})
        if stopped:
            click.echo(f"[stopped after {len(got)} tokens: the partial reply is kept in the conversation; "
                       "/reset to start over]", err=True)  # fmt: skip
            continue
        dt = time.perf_counter() - t0
        decode = dt - (first[0] - t0) if first else 0
        n = len(got)
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
