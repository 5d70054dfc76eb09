"""`mixq plan`: GPU memory for a Mixtral config and a recipe, from config.json alone.
A thin layer over mixtral_quant.plan.plan_memory."""

import json

import click

from .options import FORMATS, fmt_bytes

FMT = click.Choice(FORMATS)


@click.command()
@click.argument("src", default="Mixtral-8x7B-v0.1")
@click.option("--format", "fmt", type=FMT, help="Format of attention and experts together.")
@click.option("--experts", type=FMT, help="Format of the expert weights [default: the checkpoint's, else nf4].")
@click.option("--attention", type=FMT, help="Format of q/k/v/o_proj [default: the checkpoint's, else nf4].")
@click.option("--blocksize", type=int, help="NF4 block size [default: the checkpoint's, else 64].")
@click.option("--no-double-quant", is_flag=True, help="NF4 absmax in fp32 [default: as the checkpoint].")
@click.option("--group-size", type=int, default=None, help="int4 inputs per scale [default: the checkpoint's, else 128].")
@click.option("--context", type=click.IntRange(min=1), default=None,
              help="Tokens per sequence [default: min(max_position_embeddings, 4096)].")  # fmt: skip
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Sequences at once.")
@click.option("--gpu-memory", help="GPU budget (40GB, 24GiB, ...): says whether it fits, else what to offload.")
@click.option("--for", "workload", type=click.Choice(["generate", "eval"]), default="generate", show_default=True,
              help="generate: logits of the last position (chat, generate, serve); eval: of every position (mixq eval).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def plan(src, fmt, experts, attention, blocksize, no_double_quant, group_size, context, batch, gpu_memory, workload,
         as_json):  # fmt: skip
    """GPU memory needed to run SRC quantized: weights per class, KV cache, workspace.

    SRC is a known name (Mixtral-8x7B-v0.1, Mixtral-8x22B-v0.1; the default), a checkpoint directory, a
    config.json, or a Hugging Face repo id (only its config.json is fetched). With --gpu-memory, says whether
    it fits, and if not how many experts per layer must live in host memory.

    \b
    Examples:
      mixq plan Mixtral-8x7B-v0.1                          # NF4 at 4096 tokens: ~24.5 GB weights
      mixq plan mistralai/Mixtral-8x7B-v0.1 --gpu-memory 24GB --json
      mixq plan ./mixtral-nf4 --experts int8 --context 32768
      mixq plan Mixtral-8x7B-v0.1 --for eval --context 2048     # mixq eval keeps every position's logits
    """
    from ..checkpoint import quantized_recipe, resolve_config
    from ..plan import plan_memory

    config = resolve_config(src)
    packed = quantized_recipe(src, config) or {}  # a quantized checkpoint's own recipe (ours, bitsandbytes, int4)
    p = plan_memory(config, experts=experts or fmt or packed.get("experts") or "nf4",
                    attention=attention or fmt or packed.get("attention") or "nf4",
                    blocksize=blocksize or packed.get("blocksize", 64),
                    double_quant=not no_double_quant and packed.get("double_quant", True),
                    group_size=group_size or packed.get("group_size") or 128, context=context, batch=batch,
                    gpu_memory=gpu_memory, workload=workload)  # fmt: skip
    if as_json:
        click.echo(json.dumps(p.to_dict(), indent=2))
        return
    click.echo(f"{src}: attention {p.formats['attention']}, experts {p.formats['experts']}, "
               f"context {p.context} x batch {p.batch}" + (" (for mixq eval)" if workload == "eval" else ""))
    for c, b in p.class_bytes.items():
        click.echo(f"  {c:<11} {fmt_bytes(b):>10}")
    click.echo(f"  {'weights':<11} {fmt_bytes(p.weights_bytes):>10}")
    click.echo(f"  {'kv cache':<11} {fmt_bytes(p.kv_cache_bytes):>10}")
    click.echo(f"  {'workspace':<11} {fmt_bytes(p.workspace_bytes):>10}")
    click.echo(f"  {'total':<11} {fmt_bytes(p.total_bytes):>10}")
    if p.fits is None:
        return
    o = p.offload
    if p.fits:
        click.echo(f"fits in {fmt_bytes(p.gpu_memory)}")
    elif not o["possible"]:
        click.echo(f"does not fit in {fmt_bytes(p.gpu_memory)}, even with every expert offloaded "
                   f"(needs {fmt_bytes(o['minimum_bytes'])} on the device)")
    else:
        lo, hi = min(o["slots_per_layer"]), max(o["slots_per_layer"])
        E = o["experts_per_layer_on_host"] + o["experts_per_layer_on_device"]
        click.echo(f"does not fit in {fmt_bytes(p.gpu_memory)}: {lo if lo == hi else f'{lo}-{hi}'} of {E} experts per "
                   f"layer in device slots (the lowest layers get the most), every offloaded layer's {E} in host "
                   f"memory ({fmt_bytes(o['host_bytes'])} pinned), as load_quantized(max_memory=...) places them")
