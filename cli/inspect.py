"""`mixq inspect`: what a checkpoint directory holds, per tensor class, after checking its index against every
shard header. A thin layer over mixtral_quant.checkpoint.inspect_checkpoint."""

import json

import click

from .options import fmt_bytes


@click.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
def inspect(path, as_json):
    """Show each tensor class of the checkpoint at PATH: count, parameters, format, bytes, bits/param.

    Every index entry is checked against its shard's header first (a mismatch is an error).

    \b
    Examples:
      mixq inspect mixtral-nf4
      mixq inspect mixtral-nf4 --json | python -c 'import json,sys; print(json.load(sys.stdin)["total"])'
    """
    from ..checkpoint import inspect_checkpoint

    info = inspect_checkpoint(path)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    enc = info["encoding"]
    click.echo(f"{info['path']}: {info['tensors']} tensors in {info['shards']} shard(s), "
               + (enc["summary"] if enc["method"] != "none" else "not quantized"))
    rows = [(c, str(v["count"]), f"{v['params']:,}", v["format"], fmt_bytes(v["bytes"]), f"{v['bits_per_param']:.2f}")
            for c, v in info["classes"].items()]
    t = info["total"]
    rows.append(("total", "", f"{t['params']:,}", "", fmt_bytes(t["bytes"]), f"{t['bits_per_param']:.2f}"))
    head = ("class", "count", "params", "format", "bytes", "bits/param")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        click.echo("  ".join(x.ljust(w) if i in (0, 3) else x.rjust(w) for i, (x, w) in enumerate(zip(r, widths))))
