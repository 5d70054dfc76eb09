"""`mixq quantize`: a half-precision Mixtral checkpoint (directory, Hub repo id, builtin) -> packed NF4/int8 directory.
A thin layer over mixtral_quant.quantize.quantize; prints the summary (or one JSON object)."""

import json

import click

from .options import FORMATS, fmt_bytes

FMT = click.Choice(FORMATS)


@click.command()
@click.argument("src", default="builtin:tiny-mixtral")
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--format", "fmt", type=FMT, help="Format of attention and experts together.")
@click.option("--experts", type=FMT, help="Format of the expert weights w1/w2/w3 [default: nf4].")
@click.option("--attention", type=FMT, help="Format of q/k/v/o_proj [default: nf4].")
@click.option("--blocksize", type=click.Choice(["32", "64", "128", "256", "512", "1024", "2048", "4096"]),
              default="64", show_default=True, help="NF4 block size.")
@click.option("--no-double-quant", is_flag=True, help="Store NF4 absmax in fp32 instead of 8-bit codes.")
@click.option("--group-size", type=int, default=128, show_default=True,
              help="int4: inputs per scale (a power of two dividing every input dimension).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto: CUDA when present, else every CPU core.")
@click.option("--max-shard-size", default="2GB", show_default=True, help="Largest output shard (2GB, 500MB, ...).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists and is not empty.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the summary.")
def quantize(src, out, fmt, experts, attention, blocksize, no_double_quant, group_size, device, max_shard_size,
             overwrite, as_json):
    """Quantize SRC's attention and experts into the directory OUT.

    SRC is a checkpoint directory, a Hugging Face repo id (only *.safetensors, *.json and tokenizer.model are
    downloaded; HF_HUB_OFFLINE=1 uses the cache only) or builtin:tiny-mixtral (the default). Embeddings,
    lm_head, router and norms stay in the source dtype. OUT appears only once complete.

    \b
    Examples:
      mixq quantize mistralai/Mixtral-8x7B-v0.1 -o mixtral-nf4          # NF4 everywhere (~25 GB)
      mixq quantize ./Mixtral-8x7B -o mixtral-mixed --attention int8    # int8 attention, NF4 experts
      mixq quantize -o tiny-int8 --format int8 --json                   # the embedded tiny model
      mixq quantize ./Mixtral-8x7B -o mixtral-w4a16 --format int4       # compressed-tensors W4A16 (vLLM)
    """
    from ..quantize import quantize as run

    experts = experts or fmt or "nf4"
    attention = attention or fmt or "nf4"
    r = run(src, out, experts=experts, attention=attention, blocksize=int(blocksize),
            double_quant=not no_double_quant, group_size=group_size, device=device, max_shard_size=max_shard_size, overwrite=overwrite,
            progress=not as_json)
    if as_json:
        click.echo(json.dumps(r.to_dict(), indent=2))
        return
    click.echo(f"wrote {r.output}")
    click.echo(f"  attention {r.formats['attention']}, experts {r.formats['experts']}")
    click.echo(f"  {r.params:,} params: {fmt_bytes(r.input_bytes)} -> {fmt_bytes(r.output_bytes)} "
               f"({r.bits_per_param['total']:.2f} bits/param) in {r.seconds:.1f} s")
