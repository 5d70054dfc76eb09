"""The one GPU check: kernel correctness at Mixtral's shapes, the device's copy and matmul ceilings, kernel speed
against them and against bf16 torch.matmul / bitsandbytes, and a Mixtral-8x7B-shaped NF4 model: prefill, the
hand-captured decode step, and what users run, `model.generate()` at batch 1 (compiled + CUDA graphs by default),
each against the copy-bandwidth ceiling (bytes read per token / measured copy bandwidth); which SDPA kernels the
model's attention calls can use; and the offloaded decode's peak memory against its budget.

    python evals/gpu_check.py --out DIR          # on one H100/H200, under 8 minutes
    python evals/gpu_check.py --out DIR --small  # tiny shapes; on a CPU it runs under TRITON_INTERPRET

Writes DIR/gpu_check.json (everything) after every section and prints a short table last. Each section is guarded:
a failure is recorded with its traceback and the other sections still run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported (triton.jit reads it then)

from torch import nn  # noqa: E402

from mixtral_quant.formats import (  # noqa: E402
    NF4_CODE, NF4Weight, QUANT_STATE_KEY, dynamic_map, pack_quant_state, quantize_tensor,
)  # fmt: skip
from mixtral_quant.kernels import fused_moe, int8_matmul, nf4_matmul, stack_experts  # noqa: E402
from mixtral_quant.kernels import reference as ref  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
GiB = 1 << 30

# Mixtral-8x7B's linear shapes (N = out, K = in): w1/w3, w2, q/o, k/v
FULL = dict(
    shapes=[(14336, 4096), (4096, 14336), (4096, 4096), (1024, 4096)], ms=[1, 16, 512], moe=(8, 4096, 14336, 2),
    moe_ts=[1, 16, 512], copy_bytes=2 * GiB, matmul_n=8192, rotate_bytes=256 << 20,
    model=dict(layers=32), prefill=512, decode=128, generate=128, offload_decode=32, context=4096, reps=5,
)  # fmt: skip
SMALL = dict(
    shapes=[(96, 128), (128, 96), (64, 64)], ms=[1, 16, 33], moe=(4, 64, 96, 2), moe_ts=[1, 5], copy_bytes=8 << 20,
    matmul_n=256, rotate_bytes=1 << 20,
    model=dict(layers=2, vocab_size=512, hidden_size=128, intermediate_size=256, num_attention_heads=4,
               num_key_value_heads=2, num_local_experts=4), prefill=8, decode=3, generate=4, offload_decode=2, context=32,
    reps=1,
)  # fmt: skip
TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-3}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def timed(run, reps: int) -> float:
    """Median seconds of run() over reps (CUDA events on the GPU, wall clock on the CPU)."""
    times = []
    for _ in range(reps):
        if CUDA:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            run()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def capture_graph(fn):
    """(replay, "cuda_graph", None) for fn captured in one CUDA graph after a warm-up on a side stream, or
    (fn, "eager", reason) when capture fails (the caller times plain launches then)."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return g.replay, "cuda_graph", None
    except Exception as e:  # noqa: BLE001
        return fn, "eager", f"{type(e).__name__}: {e}"[:300]


def bench(fn, n_variants: int, reps: int, inner: int | None = None, graph: bool = True) -> dict:
    """Seconds per call of fn(i) (i cycles over n_variants weight copies so repeated calls miss L2).

    On CUDA the calls are captured in one CUDA graph (launch overhead excluded, as in a graph-captured decode
    step); if capture fails, plain launches are timed and the reason kept. graph=False: always plain launches.
    """
    inner = (inner or max(n_variants, 8)) if CUDA else 1  # the interpreter is slow: one call says it runs
    for i in range(n_variants):  # first calls tune and compile, outside any capture
        fn(i)
    sync()
    how, why = "eager", None
    run = lambda: [fn(i % n_variants) for i in range(inner)]  # noqa: E731
    if CUDA and graph:
        run, how, why = capture_graph(run)
    run()
    sync()
    return {"s": timed(run, reps) / inner, "timing": how, **({"graph_error": why} if why else {})}


# ---- weights made on the device -----------------------------------------------------------------------------
def quantized_nf4(n: int, k: int, gen: torch.Generator) -> NF4Weight:
    """A real NF4 weight (bitsandbytes layout, double quant, blocksize 64) of random N(0, 1/k) data."""
    w = torch.randn(n, k, device=DEV, generator=gen, dtype=torch.float32).mul_(k**-0.5).to(torch.bfloat16)
    return NF4Weight.from_dict(quantize_tensor(w, "nf4", blocksize=64, double_quant=True))


def quantized_int8(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(n, k, device=DEV, generator=gen).mul_(k**-0.5).to(torch.bfloat16)
    d = quantize_tensor(w, "int8")
    return d["weight"], d["SCB"]


def random_nf4_dict(n: int, k: int, gen: torch.Generator, blocksize: int = 64) -> dict[str, torch.Tensor]:
    """The saved tensors of an NF4 weight with random codes, made on the device without quantizing anything.

    absmax decodes to dyn[code] * 0.01 + 0.03, in [0.02, 0.04]: weights of std ~0.015, like a real model's.
    """
    blocks = n * k // blocksize
    nested = -(-blocks // 256)
    meta = {"quant_type": "nf4", "blocksize": blocksize, "dtype": "bfloat16", "shape": [n, k],
            "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.03}  # fmt: skip
    return {
        "weight": torch.randint(0, 256, (n * k // 2, 1), dtype=torch.uint8, device=DEV, generator=gen),
        "weight.absmax": torch.randint(0, 256, (blocks,), dtype=torch.uint8, device=DEV, generator=gen),
        "weight.quant_map": torch.tensor(NF4_CODE, dtype=torch.float32, device=DEV),
        "weight.nested_absmax": torch.full((nested,), 0.01, dtype=torch.float32, device=DEV),
        "weight.nested_quant_map": dynamic_map().to(DEV),
        "weight." + QUANT_STATE_KEY: pack_quant_state(meta).to(DEV),
    }


def nf4_copies(w: NF4Weight, count: int, gen: torch.Generator) -> list[NF4Weight]:
    """w plus count-1 weights of the same shape with fresh random codes (for L2-busting rotation)."""
    out = [w]
    for _ in range(count - 1):
        d = random_nf4_dict(*w.shape, gen)
        out.append(NF4Weight.from_dict(d))
    return out


def nf4_read_bytes(w: NF4Weight, m: int) -> int:
    """Bytes a kernel must read: packed codes + absmax + nested absmax + the activations (bf16)."""
    nested = w.nested_absmax.numel() * 4 if w.double_quant else 0
    return w.packed.numel() + w.absmax.numel() * w.absmax.element_size() + nested + m * w.shape[1] * 2


def rel_err(y: torch.Tensor, expect: torch.Tensor) -> float:
    if not torch.isfinite(y).all():
        return float("inf")  # NaN never passes
    return ((y.double() - expect.double()).abs().max() / expect.double().abs().max().clamp(min=1e-30)).item()


# ---- sections -------------------------------------------------------------------------------------------------
def section_correctness(cfg: dict, res: dict, state: dict) -> None:
    gen = torch.Generator(device=DEV).manual_seed(0)
    rows = []
    for n, k in cfg["shapes"]:
        w = quantized_nf4(n, k, gen)
        w8 = quantized_int8(n, k, gen)
        state.setdefault("weights", {})[(n, k)] = (w, w8)
        for m in cfg["ms"]:
            x = torch.randn(m, k, device=DEV, generator=gen).to(torch.bfloat16)
            for name, call, expect in (
                ("nf4_matmul", lambda: nf4_matmul(x, w), lambda: ref.nf4_matmul_ref(x.float(), w)),
                ("int8_matmul", lambda: int8_matmul(x, *w8), lambda: ref.int8_matmul_ref(x.float(), *w8)),
            ):
                err = rel_err(call(), expect())
                rows.append(dict(kernel=name, n=n, k=k, m=m, dtype="bfloat16", rel_err=err, ok=err <= TOL[torch.bfloat16]))
                log(f"correctness {name} N={n} K={k} M={m}: rel err {err:.2e}")
        if (n, k) == cfg["shapes"][0]:  # one fp32 check at the largest shape (exact fp32 dot path)
            x = torch.randn(3, k, device=DEV, generator=gen)
            err = rel_err(nf4_matmul(x, w), ref.nf4_matmul_ref(x, w, torch.float64))
            rows.append(dict(kernel="nf4_matmul", n=n, k=k, m=3, dtype="float32", rel_err=err, ok=err <= TOL[torch.float32]))
    e, d, f, a = cfg["moe"]
    w1s = [quantized_nf4(f, d, gen) for _ in range(e)]
    w3s = [quantized_nf4(f, d, gen) for _ in range(e)]
    w2s = [quantized_nf4(d, f, gen) for _ in range(e)]
    experts = stack_experts(w1s, w2s, w3s)
    state["moe"] = (w1s, w2s, w3s, experts)
    for t in cfg["moe_ts"]:
        x = torch.randn(t, d, device=DEV, generator=gen).to(torch.bfloat16)
        probs = torch.randn(t, e, device=DEV, generator=gen).softmax(-1)
        wts, ids = probs.topk(a, dim=-1)
        wts = wts / wts.sum(-1, keepdim=True)
        err = rel_err(fused_moe(x, ids, wts, experts), ref.fused_moe_ref(x.float(), ids, wts, w1s, w2s, w3s))
        rows.append(dict(kernel="fused_moe", n=d, k=f, m=t, dtype="bfloat16", rel_err=err, ok=err <= TOL[torch.bfloat16]))
        log(f"correctness fused_moe T={t}: rel err {err:.2e}")
    res["correctness"] = rows


def section_ceilings(cfg: dict, res: dict, state: dict) -> None:
    n = cfg["copy_bytes"]
    src = torch.empty(n, dtype=torch.uint8, device=DEV).random_(0, 256)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync()
    s = timed(lambda: dst.copy_(src), cfg["reps"] * 4)
    copy = 2 * n / s / 1e9  # read + write
    del src, dst
    mm = cfg["matmul_n"]
    dt = torch.bfloat16 if CUDA else torch.float32
    a = torch.randn(mm, mm, device=DEV, dtype=dt)
    b = torch.randn(mm, mm, device=DEV, dtype=dt)
    torch.matmul(a, b)
    sync()
    s_mm = timed(lambda: torch.matmul(a, b), cfg["reps"] * 4)
    res["ceilings"] = dict(copy_GBps=copy, copy_bytes=n, matmul_TFLOPs=2 * mm**3 / s_mm / 1e12, matmul_n=mm,
                           matmul_dtype=str(dt).removeprefix("torch."))  # fmt: skip
    state["copy_GBps"] = copy
    log(f"ceilings: copy {copy:.0f} GB/s, {str(dt)[6:]} matmul {res['ceilings']['matmul_TFLOPs']:.1f} TFLOP/s")


def _bnb_4bit(w: NF4Weight):
    """bitsandbytes' matmul_4bit on our NF4Weight, or None when bitsandbytes is absent/unusable here."""
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import QuantState
    except Exception:  # noqa: BLE001
        return None
    state2 = QuantState(absmax=w.nested_absmax, code=w.nested_quant_map, blocksize=w.nested_blocksize,
                        dtype=torch.float32)  # fmt: skip
    qs = QuantState(absmax=w.absmax, shape=torch.Size(w.shape), code=w.quant_map, blocksize=w.blocksize,
                    quant_type="nf4", dtype=torch.bfloat16, offset=w.offset, state2=state2)  # fmt: skip
    return lambda x: bnb.matmul_4bit(x, w.packed.t(), quant_state=qs)


def section_kernels(cfg: dict, res: dict, state: dict) -> None:
    gen = torch.Generator(device=DEV).manual_seed(1)
    copy = state.get("copy_GBps")
    rows = []
    weights = state.get("weights") or {}
    for n, k in cfg["shapes"]:
        w, w8 = weights.get((n, k)) or (quantized_nf4(n, k, gen), quantized_int8(n, k, gen))
        count = max(1, min(32, math.ceil(cfg["rotate_bytes"] / w.packed.numel()))) if CUDA else 1
        ws = nf4_copies(w, count, gen)
        w8s = [w8] + [(torch.randint(-127, 128, w8[0].shape, dtype=torch.int8, device=DEV, generator=gen), w8[1])
                      for _ in range(max(1, min(16, math.ceil(cfg["rotate_bytes"] / w8[0].numel()))) - 1 if CUDA else 0)]
        n_bf = max(1, min(8, math.ceil(cfg["rotate_bytes"] / (2 * n * k)))) if CUDA else 1
        wbf = [ref.dequantize_nf4_weight(ws[i % len(ws)], torch.bfloat16) for i in range(n_bf)]
        bnbs = [_bnb_4bit(v) for v in ws[:4]]
        for m in cfg["ms"]:
            x = torch.randn(m, k, device=DEV, generator=gen).to(torch.bfloat16)
            row = dict(n=n, k=k, m=m)
            t = bench(lambda i: nf4_matmul(x, ws[i]), len(ws), cfg["reps"])
            nbytes = nf4_read_bytes(w, m)
            row.update(nf4_us=t["s"] * 1e6, nf4_timing=t["timing"], nf4_GBps=nbytes / t["s"] / 1e9,
                       nf4_read_bytes=nbytes)  # fmt: skip
            t8 = bench(lambda i: int8_matmul(x, *w8s[i]), len(w8s), cfg["reps"])
            b8 = n * k + 4 * n + m * k * 2
            row.update(int8_us=t8["s"] * 1e6, int8_GBps=b8 / t8["s"] / 1e9)
            tb = bench(lambda i: torch.matmul(x, wbf[i].T), len(wbf), cfg["reps"])
            row.update(torch_bf16_us=tb["s"] * 1e6, torch_bf16_GBps=(2 * n * k + m * k * 2) / tb["s"] / 1e9)
            if copy:
                row.update(nf4_pct_copy=100 * row["nf4_GBps"] / copy, int8_pct_copy=100 * row["int8_GBps"] / copy)
            if bnbs[0] is not None:
                try:
                    # plain launches: a failed capture inside bitsandbytes could leave the CUDA context unusable
                    tq = bench(lambda i: bnbs[i % len(bnbs)](x), len(bnbs), cfg["reps"], graph=False)
                    row.update(bnb_nf4_us=tq["s"] * 1e6, bnb_timing=tq["timing"])
                    # bitsandbytes as a second oracle: its output against ours on the same bytes
                    row.update(bnb_vs_nf4_rel_err=rel_err(nf4_matmul(x, ws[0]).float(), bnbs[0](x).float()))
                except Exception as e:  # noqa: BLE001
                    row.update(bnb_error=f"{type(e).__name__}: {e}"[:200])
            rows.append(row)
            log(f"kernel N={n} K={k} M={m}: nf4 {row['nf4_us']:.1f} us ({row['nf4_GBps']:.0f} GB/s), int8 "
                f"{row['int8_us']:.1f} us, bf16 matmul {row['torch_bf16_us']:.1f} us"
                + (f", bnb nf4 {row['bnb_nf4_us']:.1f} us" if "bnb_nf4_us" in row else ""))  # fmt: skip
        del ws, w8s, wbf, bnbs
    res["kernels"] = rows
    # the fused MoE at decode and prefill sizes, vs. the torch reference path on bf16 weights
    e, d, f, a = cfg["moe"]
    w1s, w2s, w3s, experts = state.get("moe") or (None, None, None, None)
    if experts is None:
        w1s = [quantized_nf4(f, d, gen) for _ in range(e)]
        w3s = [quantized_nf4(f, d, gen) for _ in range(e)]
        w2s = [quantized_nf4(d, f, gen) for _ in range(e)]
        experts = stack_experts(w1s, w2s, w3s)
    moe_rows = []
    for t in cfg["moe_ts"]:
        x = torch.randn(t, d, device=DEV, generator=gen).to(torch.bfloat16)
        wts, ids = torch.randn(t, e, device=DEV, generator=gen).softmax(-1).topk(a, dim=-1)
        tm = bench(lambda i: fused_moe(x, ids, wts, experts), 1, cfg["reps"], inner=8)
        used = len(torch.unique(ids))
        nbytes = used * 3 * nf4_read_bytes(w1s[0], 0) + t * d * 2
        moe_rows.append(dict(t=t, experts_used=used, fused_moe_us=tm["s"] * 1e6, timing=tm["timing"],
                             GBps=nbytes / tm["s"] / 1e9, pct_copy=100 * nbytes / tm["s"] / 1e9 / copy if copy else None))  # fmt: skip
        log(f"fused_moe T={t} ({used} experts): {tm['s'] * 1e6:.1f} us, {nbytes / tm['s'] / 1e9:.0f} GB/s")
    res["fused_moe"] = moe_rows


def build_model(cfg: dict, backend: str = "triton"):
    """A Mixtral-shaped Transformer (model.py) with random NF4 attention and experts made on the device."""
    from mixtral_quant.config import MixtralConfig
    from mixtral_quant.linear import QuantLinear
    from mixtral_quant.model import Transformer, rope_inv_freq
    from mixtral_quant.offload import ResidentExperts

    mc = MixtralConfig(**cfg["model"])
    gen = torch.Generator(device=DEV).manual_seed(2)
    dt = torch.bfloat16
    with torch.device("meta"):
        model = Transformer(mc)
    D, V, E, Fi = mc.hidden_size, mc.vocab_size, mc.num_local_experts, mc.intermediate_size

    def dense(*shape, scale=0.02):
        return nn.Parameter(torch.randn(*shape, device=DEV, generator=gen).mul_(scale).to(dt), requires_grad=False)

    def ones(n):
        return nn.Parameter(torch.ones(n, device=DEV, dtype=dt), requires_grad=False)

    model.embed_tokens.weight = dense(V, D, scale=1.0)
    model.norm.weight = ones(D)
    model.lm_head.weight = dense(V, D)
    model.inv_freq = rope_inv_freq(mc, DEV)
    kw = dict(device=DEV, backend=backend, compute_dtype=dt)
    for layer in model.layers:
        att = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lin = getattr(att, name)
            setattr(att, name, QuantLinear.from_tensors([random_nf4_dict(lin.out_features, lin.in_features, gen)],
                                                        **kw))  # fmt: skip
        layer.input_layernorm.weight = ones(D)
        layer.post_attention_layernorm.weight = ones(D)
        layer.block_sparse_moe.gate.weight = dense(E, D, scale=D**-0.5)
        w13 = QuantLinear.from_tensors([random_nf4_dict(Fi, D, gen) for _ in range(2 * E)], (E, 2), **kw)
        w2 = QuantLinear.from_tensors([random_nf4_dict(D, Fi, gen) for _ in range(E)], (E, 1), **kw)
        layer.block_sparse_moe.experts = ResidentExperts(w13, w2)
    return model.eval().requires_grad_(False)


def bytes_per_token(model, pos: int) -> int:
    """Bytes a batch-1 decode step must read at cache position `pos`: every non-expert weight (attention, norms,
    router, lm_head; one embedding row), top_k experts per layer, and the keys/values of positions 0..pos."""
    c = model.config
    total = c.hidden_size * model.embed_tokens.weight.element_size() + _nbytes(model.norm) + _nbytes(model.lm_head)
    for layer in model.layers:
        store = layer.block_sparse_moe.experts
        total += sum(_nbytes(m) for m in (layer.self_attn, layer.input_layernorm, layer.post_attention_layernorm,
                                          layer.block_sparse_moe.gate))  # fmt: skip
        total += _nbytes(store) * c.num_experts_per_tok // c.num_local_experts
    kv = 2 * c.num_key_value_heads * c.head_dim * model.dtype.itemsize * (pos + 1)
    return total - sum(_kv_bytes(layer) for layer in model.layers) + kv * c.num_hidden_layers


def _nbytes(module: nn.Module) -> int:
    """Bytes of the distinct storages behind a module's parameters and buffers (views counted once)."""
    seen: dict[int, int] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        st = t.untyped_storage()
        seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
    return sum(seen.values())


def _kv_bytes(layer) -> int:
    cache = layer.self_attn.kv_cache
    return 0 if cache is None else _nbytes(cache)


def section_model(cfg: dict, res: dict, state: dict) -> None:
    out = res.setdefault("model", {})
    state.pop("weights", None)  # the kernel sections' weights would count in the peak
    state.pop("moe", None)
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = build_model(cfg)
    sync()
    out["build_s"] = time.perf_counter() - t0
    out["weights_GB"] = sum(b.numel() * b.element_size() for b in list(model.buffers()) + list(model.parameters())) / 1e9
    out["config"] = {k: getattr(model.config, k) for k in ("num_hidden_layers", "hidden_size", "intermediate_size",
                                                            "num_local_experts", "vocab_size")}  # fmt: skip
    state["model"] = model
    log(f"model built in {out['build_s']:.1f} s: {out['weights_GB']:.2f} GB of weights")
    ctx, P, n_dec = cfg["context"], cfg["prefill"], cfg["decode"]
    model.setup_caches(1, ctx)
    gen = torch.Generator(device=DEV).manual_seed(3)
    V = model.config.vocab_size
    prompt = torch.randint(0, V, (1, P), device=DEV, generator=gen)
    copy = state.get("copy_GBps")
    out["bytes_per_token"] = bytes_per_token(model, P + n_dec // 2)
    if copy:
        out["ceiling_tok_s"] = copy * 1e9 / out["bytes_per_token"]
        log(f"copy-bandwidth ceiling: {out['bytes_per_token'] / 1e9:.2f} GB per token at {copy:.0f} GB/s -> "
            f"{out['ceiling_tok_s']:.0f} tok/s")

    with torch.inference_mode():
        # prefill P tokens (the first call tunes and compiles the kernels for these shapes)
        pos = torch.arange(P, device=DEV)
        model(prompt, pos, from_start=True)
        sync()
        s = timed(lambda: model(prompt, pos, from_start=True), cfg["reps"])
        out["prefill_tokens"] = P
        out["prefill_tok_s"] = P / s
        log(f"prefill {P} tokens: {P / s:.0f} tok/s")

        # batch-1 decode: one step captured in a CUDA graph by hand, replayed n_dec times; the loop stays on the device
        tok = prompt[:, -1:].clone()  # [1, 1]
        step_pos = torch.tensor([P], device=DEV)

        def step():
            logits = model(tok, step_pos)  # [1, 1, V]
            tok.copy_(logits[:, -1].argmax(-1, keepdim=True))
            step_pos.add_(1)

        for _ in range(3 if CUDA else 1):  # warm up: tune M=1 configs, build the fused-MoE stacks
            step()
        sync()
        run, how = step, "eager"
        if CUDA:
            run, how, err = capture_graph(step)
            if err:
                out["decode_graph_error"] = err
                log(f"decode: CUDA graph capture failed ({err}); timing eager steps")
        step_pos.fill_(P)
        run()
        sync()
        step_pos.fill_(P)
        if CUDA:
            torch.cuda.reset_peak_memory_stats()

        def decode_all():
            for _ in range(n_dec):
                run()

        s = timed(decode_all, 1)
        out.update(decode_tokens=n_dec, decode_tok_s=n_dec / s, decode_timing=how)
        if copy:
            out["decode_pct_ceiling"] = 100 * out["decode_tok_s"] / out["ceiling_tok_s"]
        if CUDA:
            out["peak_memory_decode_GB"] = torch.cuda.max_memory_allocated() / 1e9  # weights + cache + decode
        log(f"decode {n_dec} tokens ({how}): {n_dec / s:.1f} tok/s")
    section_generate(cfg, res, state)
    with torch.inference_mode():
        # peak memory with the whole context: a prefill of `ctx` tokens into the ctx-long cache, its shapes warmed
        model.setup_caches(1, ctx)
        full = torch.randint(0, V, (1, ctx), device=DEV, generator=gen)
        full_pos = torch.arange(ctx, device=DEV)
        model(full, full_pos, from_start=True, last_only=True)  # warm: tunes the M=ctx configs
        sync()
        if CUDA:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        model(full, full_pos, from_start=True, last_only=True)
        sync()
        out["prefill_full_context_tok_s"] = ctx / (time.perf_counter() - t)
        out["context"] = ctx
        if CUDA:
            out["peak_memory_GB"] = torch.cuda.max_memory_allocated() / 1e9
            log(f"peak memory at {ctx} context: {out['peak_memory_GB']:.2f} GB")


def section_generate(cfg: dict, res: dict, state: dict) -> None:
    """What users run: model.generate() at batch 1, its defaults (on CUDA: compiled, CUDA graphs), timed per token.

    The first call pays the compilation (reported as first_call_s); the second is timed from its second decode
    step on (the first decode step of every call runs eagerly, see generate.compile_decode)."""
    from mixtral_quant.generate import resolve_compile

    model = state["model"]
    out = res.setdefault("generate", {})
    n = cfg["generate"]
    gen = torch.Generator(device=DEV).manual_seed(5)
    prompt = torch.randint(0, model.config.vocab_size, (1, cfg["prefill"]), device=DEV, generator=gen)
    out.update(compiled=resolve_compile(model, None), new_tokens=n, prompt_tokens=cfg["prefill"])
    times: list[float] = []

    def on_token(_):
        sync()
        times.append(time.perf_counter())

    t0 = time.perf_counter()
    first = model.generate(prompt, n, eos=[], callback=on_token)
    out["first_call_s"] = time.perf_counter() - t0
    log(f"generate: first call ({n} tokens, compiled={out['compiled']}) {out['first_call_s']:.1f} s")
    times.clear()
    again = model.generate(prompt, n, eos=[], callback=on_token)
    out["same_tokens_both_calls"] = bool(torch.equal(first, again))
    if len(times) > 3:
        out["decode_tok_s"] = (len(times) - 2) / (times[-1] - times[1])
        ceiling = res.get("model", {}).get("ceiling_tok_s")
        if ceiling:
            out["pct_ceiling"] = 100 * out["decode_tok_s"] / ceiling
        log(f"generate: {out['decode_tok_s']:.1f} tok/s at batch 1"
            + (f" ({out['pct_ceiling']:.0f}% of the copy-bandwidth ceiling)" if ceiling else ""))
    # the same tokens as eager decoding (the README's promise), over a few steps
    k = min(n, 16)
    eager = model.generate(prompt, k, eos=[], compile=False)
    out["tokens_equal_eager"] = bool(torch.equal(eager, first[:, : prompt.shape[1] + k]))
    log(f"generate: compiled tokens equal eager over {k} steps: {out['tokens_equal_eager']}")


def section_attention(cfg: dict, res: dict, state: dict) -> None:
    """The model's prefill and decode attention calls (bf16) with SDPA restricted to flash + memory-efficient:
    each either runs (no math fallback needed) or the error is recorded; and the prefill's peak over the weights."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = state.get("model") or build_model(cfg)
    state["model"] = model
    out = res.setdefault("attention", {})
    ctx = cfg["context"]
    gen = torch.Generator(device=DEV).manual_seed(6)
    ids = torch.randint(0, model.config.vocab_size, (2, ctx // 2), device=DEV, generator=gen)
    mask = torch.ones_like(ids)
    mask[1, : ctx // 4] = 0  # row 1 left-padded: the masked path
    model.setup_caches(2, ctx)
    cases = {
        "prefill_causal": lambda: model(ids[:1], torch.arange(ids.shape[1], device=DEV), from_start=True, last_only=True),
        "decode": lambda: model(ids[:1, :1], torch.tensor([ids.shape[1]], device=DEV)),
        "prefill_padded": lambda: model(ids, torch.arange(ids.shape[1], device=DEV), mask, last_only=True),
        "decode_padded": lambda: model(ids[:, :1], torch.tensor([ids.shape[1]], device=DEV), mask),
    }
    with torch.inference_mode(), sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        for name, call in cases.items():
            try:
                if CUDA:
                    torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated() if CUDA else 0
                call()
                sync()
                out[name] = dict(ok=True, **({"peak_above_start_GB": (torch.cuda.max_memory_allocated() - base) / 1e9}
                                              if CUDA else {}))  # fmt: skip
            except Exception as e:  # noqa: BLE001
                out[name] = dict(ok=False, error=f"{type(e).__name__}: {e}"[:300])
            log(f"attention {name}: {out[name]}")
    model.setup_caches(1, ctx)


def section_offload(cfg: dict, res: dict, state: dict) -> None:
    """Decode under a 16 GiB budget with the offloaded expert store, when offload.py provides one."""
    from mixtral_quant import offload

    fn = getattr(offload, "offload_model", None)
    if fn is None:
        res["offload"] = {"skipped": "mixtral_quant.offload has no offload_model(model, max_memory) yet"}
        log("offload: skipped (" + res["offload"]["skipped"] + ")")
        return
    model = state.get("model") or build_model(cfg)
    t0 = time.perf_counter()
    if cfg["small"]:  # a tiny model fits any budget: give it half the slots so experts really live on the host
        budget = None
        placement = fn(model, slots_per_layer=max(1, model.config.num_local_experts // 2))
    else:
        budget = 16 * GiB
        placement = fn(model, max_memory=budget)
    sync()
    setup_s = time.perf_counter() - t0
    n_dec = cfg["offload_decode"]
    gen = torch.Generator(device=DEV).manual_seed(4)
    tok = torch.randint(0, model.config.vocab_size, (1, 1), device=DEV, generator=gen)
    pos = torch.tensor([cfg["prefill"]], device=DEV)
    with torch.inference_mode():
        for _ in range(2):
            model(tok, pos)
        sync()
        if CUDA:
            torch.cuda.reset_peak_memory_stats()

        def decode_all():
            for _ in range(n_dec):
                tok.copy_(model(tok, pos)[:, -1].argmax(-1, keepdim=True))
                pos.add_(1)

        s = timed(decode_all, 1)
    res["offload"] = dict(max_memory=budget, decode_tokens=n_dec, decode_tok_s=n_dec / s, setup_s=setup_s,
                          placement=getattr(placement, "describe", lambda: str(placement))(),
                          stats=model.offload_stats())  # fmt: skip
    if CUDA:
        res["offload"]["memory_allocated_GB"] = torch.cuda.memory_allocated() / 1e9
        res["offload"]["max_memory_allocated_GB"] = torch.cuda.max_memory_allocated() / 1e9
        if budget:
            res["offload"]["within_budget"] = torch.cuda.max_memory_allocated() <= budget
    log(f"offload decode under {budget / GiB if budget else 0:.2f} GiB (0: fixed slots): {n_dec / s:.1f} tok/s")


SECTIONS = {"correctness": section_correctness, "ceilings": section_ceilings, "kernels": section_kernels,
            "model": section_model, "attention": section_attention, "offload": section_offload}  # fmt: skip


def environment() -> dict:
    import triton

    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
               device=torch.cuda.get_device_name() if CUDA else f"cpu ({platform.processor() or platform.machine()})",
               interpreter=os.environ.get("TRITON_INTERPRET", "0") == "1", cuda=torch.version.cuda)  # fmt: skip
    try:
        import bitsandbytes

        env["bitsandbytes"] = bitsandbytes.__version__
    except Exception:  # noqa: BLE001
        env["bitsandbytes"] = None
    return env


def table(res: dict) -> str:
    lines = [f"gpu_check {res['env']['date']}  {res['env']['device']}  torch {res['env']['torch']}  "
             f"triton {res['env']['triton']}  small={res['small']}"]  # fmt: skip
    c = res.get("correctness")
    if c:
        bad = [r for r in c if not r["ok"]]
        worst = max(c, key=lambda r: r["rel_err"])
        lines.append(f"correctness: {len(c) - len(bad)}/{len(c)} ok, worst rel err {worst['rel_err']:.2e} "
                     f"({worst['kernel']} N={worst['n']} K={worst['k']} M={worst['m']} {worst['dtype']})")  # fmt: skip
    ce = res.get("ceilings")
    if ce:
        lines.append(f"ceilings: copy {ce['copy_GBps']:.4g} GB/s, {ce['matmul_dtype']} matmul {ce['matmul_TFLOPs']:.4g} "
                     "TFLOP/s")  # fmt: skip
    k = res.get("kernels")
    if k:
        lines.append(f"{'N':>6} {'K':>6} {'M':>4} | {'nf4 us':>8} {'GB/s':>6} {'%copy':>6} | {'int8 us':>8} {'%copy':>6} | "
                     f"{'bf16 us':>8} {'nf4/bf16':>8} | {'bnb us':>8}")  # fmt: skip
        for r in k:
            pc = lambda key: f"{r[key]:6.1f}" if r.get(key) is not None else f"{'-':>6}"  # noqa: E731
            bnb = f"{r['bnb_nf4_us']:8.1f}" if "bnb_nf4_us" in r else f"{'-':>8}"
            lines.append(f"{r['n']:6d} {r['k']:6d} {r['m']:4d} | {r['nf4_us']:8.1f} {r['nf4_GBps']:6.4g} {pc('nf4_pct_copy')} | "
                         f"{r['int8_us']:8.1f} {pc('int8_pct_copy')} | {r['torch_bf16_us']:8.1f} "
                         f"{r['torch_bf16_us'] / r['nf4_us']:7.2f}x | {bnb}")  # fmt: skip
    for r in res.get("fused_moe") or []:
        pct = f", {r['pct_copy']:.0f}% of copy" if r.get("pct_copy") else ""
        lines.append(f"fused_moe T={r['t']}: {r['fused_moe_us']:.1f} us, {r['GBps']:.3g} GB/s{pct}")
    m = res.get("model")
    if m and "decode_tok_s" in m:
        peak = (f", peak {m['peak_memory_decode_GB']:.2f} GB decoding with a {m['context']} cache, "
                f"{m['peak_memory_GB']:.2f} GB in a {m['context']}-token prefill") if "peak_memory_GB" in m else ""
        lines.append(f"model ({m['config']['num_hidden_layers']} layers, {m['weights_GB']:.1f} GB): prefill "
                     f"{m['prefill_tok_s']:.4g} tok/s ({m['prefill_tokens']} tokens), decode {m['decode_tok_s']:.4g} "
                     f"tok/s ({m['decode_timing']}){peak}")  # fmt: skip
    if m and m.get("ceiling_tok_s"):
        lines.append(f"copy-bandwidth ceiling: {m['bytes_per_token'] / 1e9:.3g} GB read per token -> "
                     f"{m['ceiling_tok_s']:.4g} tok/s; hand-captured step {m.get('decode_pct_ceiling', 0):.0f}% of it")
    g = res.get("generate")
    if g and "decode_tok_s" in g:
        pct = f", {g['pct_ceiling']:.0f}% of the ceiling" if g.get("pct_ceiling") else ""
        lines.append(f"model.generate() batch 1 (compiled={g['compiled']}): {g['decode_tok_s']:.4g} tok/s{pct}; "
                     f"first call {g['first_call_s']:.1f} s; tokens equal eager: {g.get('tokens_equal_eager')}")
    a = res.get("attention")
    if a:
        lines.append("attention with SDPA restricted to flash/efficient: " + ", ".join(
            f"{k} {'ok' if v['ok'] else 'FAILED'}" for k, v in a.items()))
    o = res.get("offload")
    if o:
        lines.append("offload: " + (o["skipped"] if "skipped" in o else
                                  f"{o['decode_tok_s']:.4g} tok/s decode under " + (f"{o['max_memory'] / GiB:.3g} GiB" if o['max_memory']
                                                                      else "fixed slots") + f": {o['placement']}"))
    if not res["small"] and k and m:
        goals = [("decode kernels >= 70% of copy", all(r.get("nf4_pct_copy", 0) >= 70 for r in k if r["m"] == 1)),
                 ("decode >= 150 tok/s", m.get("decode_tok_s", 0) >= 150),
                 ("generate() >= 150 tok/s", (g or {}).get("decode_tok_s", 0) >= 150),
                 ("peak < 27 GB decoding at 4096", m.get("peak_memory_decode_GB", 1e9) < 27),
                 ("peak < 27 GB in a 4096 prefill", m.get("peak_memory_GB", 1e9) < 27)]  # fmt: skip
        lines.append("goals: " + ", ".join(f"{g}: {'met' if ok else 'NOT met'}" for g, ok in goals))
    for name, err in res.get("errors", {}).items():
        lines.append(f"section {name} FAILED: {err.strip().splitlines()[-1]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for gpu_check.json")
    p.add_argument("--small", action="store_true", help="tiny shapes: a dry run (on a CPU under TRITON_INTERPRET)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--layers", type=int, help="model layers (default 32; 2 with --small)")
    args = p.parse_args(argv)
    cfg = dict(SMALL if args.small else FULL, small=args.small)
    cfg["model"] = dict(cfg["model"])
    if args.layers:
        cfg["model"]["layers"] = args.layers
    cfg["model"]["num_hidden_layers"] = cfg["model"].pop("layers")
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    if not CUDA and not args.small:
        p.error("no CUDA device: run with --small for a dry run on the CPU")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_check.json")
    res: dict = {"env": environment(), "small": args.small, "errors": {}}
    state: dict = {}
    t_all = time.perf_counter()
    log(f"gpu_check on {res['env']['device']} (torch {res['env']['torch']}, triton {res['env']['triton']})")
    for name in [s for s in SECTIONS if s in args.sections.split(",")]:
        t = time.perf_counter()
        try:
            SECTIONS[name](cfg, res, state)
        except Exception:  # noqa: BLE001
            res["errors"][name] = traceback.format_exc()
            log(f"section {name} failed:\n{res['errors'][name]}")
            if CUDA:
                torch.cuda.empty_cache()
        res.setdefault("section_s", {})[name] = time.perf_counter() - t
        with open(path, "w") as f:
            json.dump(res, f, indent=2, default=str)
    res["total_s"] = time.perf_counter() - t_all
    with open(path, "w") as f:
        json.dump(res, f, indent=2, default=str)
    print()
    print(table(res))
    print(f"(full results: {path}; {res['total_s']:.0f} s)")
    return 1 if res["errors"] or not all(r["ok"] for r in res.get("correctness", [])) else 0


if __name__ == "__main__":
    sys.exit(main())
