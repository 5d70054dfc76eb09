"""What the commands share, without importing torch: the format and backend names (the library's `formats.FORMATS`
and `linear.BACKENDS`, checked equal by tests/test_structure.py), how sizes are printed, the model-loading and
sampling options of generate/chat/serve, and `load` (the library is imported when a command runs)."""

import time

import click

FORMATS = ("nf4", "int8", "int4", "bf16", "fp16")
BACKENDS = ("auto", "torch", "triton", "bnb")


def fmt_bytes(n: int) -> str:
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= k:
            return f"{n / k:.2f} {unit}"
    return f"{n} B"


def _reserve(ctx, param, value):
    ctx.meta[f"mixq_{param.name}"] = value  # read by load(): the commands' signatures need not list these
    return value


def model_options(f=None, *, reserve: bool = True):
    """--device/--dtype/--backend/--max-memory (and --context/--batch, what it reserves), shared with `mixq chat`
    and `mixq serve` (which has its own --context and --max-batch: reserve=False)."""
    if f is None:
        return lambda g: model_options(g, reserve=reserve)
    if reserve:
        f = _reserve_options(f)
    f = click.option("--max-memory", default=None, metavar="SIZE",
                     help="Compute-device budget (16GiB, 24GB, bytes); experts beyond it are offloaded.")(f)  # fmt: skip
    f = click.option("--backend", type=click.Choice(BACKENDS), default="auto",
                     show_default=True, help="auto: triton on CUDA, torch on the CPU.")(f)  # fmt: skip
    f = click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
                     show_default=True, help="Compute dtype (auto: checkpoint dtype on CUDA, float32 on CPU).")(f)  # fmt: skip
    f = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")(f)
    return f


def _reserve_options(f):
    f = click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, expose_value=False,
                     callback=_reserve,
                     help="With --max-memory: sequences the KV cache and workspace are reserved for.")(f)  # fmt: skip
    f = click.option("--context", type=click.IntRange(min=1), default=None, expose_value=False, callback=_reserve,
                     help="With --max-memory: tokens the KV cache and workspace are reserved for "
                          "[default: min(max_position_embeddings, 4096)].")(f)  # fmt: skip
    return f


def sampling_options(f):
    f = click.option("--seed", type=int, default=None, help="Seed for sampling (reproducible output).")(f)
    f = click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0 = off.")(f)
    f = click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
                     help="Nucleus sampling mass; 1 = off.")(f)  # fmt: skip
    f = click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
                     help="0 = greedy; > 0 samples.")(f)  # fmt: skip
    return f


def compile_option(f):
    """--compile/--no-compile, shared with `mixq chat`."""
    return click.option("--compile/--no-compile", default=None,
                        help="Decode through torch.compile (+ CUDA graphs on a GPU). Default: on with CUDA when every "
                             "expert is resident (the second token compiles: tens of seconds the first time), off "
                             "otherwise. Offloaded experts always decode eagerly.")(f)  # fmt: skip


def load(path, device, dtype, backend, max_memory, context=None, batch=None):
    """load_quantized with the CLI's options; context/batch (what --max-memory reserves): given, else --context /
    --batch."""
    from .. import load_quantized

    mm = int(max_memory) if max_memory is not None and max_memory.isdigit() else max_memory
    meta = click.get_current_context().meta
    context = context if context is not None else meta.get("mixq_context")
    batch = batch if batch is not None else meta.get("mixq_batch", 1)
    t0 = time.perf_counter()
    model = load_quantized(path, device=device, dtype=None if dtype == "auto" else dtype, backend=backend,
                           max_memory=mm, context=context, batch=batch)  # fmt: skip
    return model, time.perf_counter() - t0


def offload_line(s: dict) -> str:
    """`--stats`: one line of expert-cache counters ("slots" only exists when some experts are offloaded)."""
    return "[offload: " + (", ".join(f"{k} {v}" for k, v in s.items()) if "slots" in s else "all experts resident") + "]"


def sampling_kwargs(temperature, top_p, top_k, seed) -> dict:
    return dict(do_sample=temperature > 0, temperature=temperature or 1.0, top_p=top_p, top_k=top_k, seed=seed)
