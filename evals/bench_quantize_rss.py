"""Peak resident memory (VmHWM, as the OS and a cgroup see it) of quantizing a multi-shard checkpoint to NF4, above
the baseline of the interpreter with torch and the quantizer imported.

VmHWM (/proc/self/status) is the process's peak RSS, file-backed mapped pages included: what ru_maxrss reports,
except that Linux carries ru_maxrss over fork and exec, so a child of a large parent (this script after writing the
checkpoint, or pytest) would start with the parent's peak and hide its own below it.

The bound (README): at most the largest source shard (its pages stay mapped while it is read) + one output shard
(the writer's buffer) + the largest tensor (and its quantization temporaries). `--keep-maps` measures the old
reader, which kept every shard mapped until the end (the peak then grows with the whole checkpoint).

    python evals/bench_quantize_rss.py [--shards 8] [--layers 8] [--out evals/results/quantize_rss.txt]

The checkpoint is random bf16 in Mixtral's Hub layout (hidden 1024, experts of 3584, vocab 32000: about 1.6 GB
with 8 layers), written to a temporary directory and removed afterwards. Each measurement is a fresh process.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile

SHAPE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_attention_heads=8,
             num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096,
             rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None, tie_word_embeddings=False, bos_token_id=1,
             eos_token_id=2)  # fmt: skip

# Runs in a fresh interpreter: the baseline is VmHWM after the imports, the peak VmHWM after quantizing.
CHILD = r"""
import json, os, resource, sys
def hwm():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
import torch, tqdm, safetensors.torch
import mixtral_quant.quantize as Q
from mixtral_quant.checkpoint import CheckpointReader
src, out, max_shard, keep_maps = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
torch.set_num_threads(1)
if keep_maps:  # the reader before issue 11: every shard's mapping kept until the reader closes
    CheckpointReader.release = lambda self, shard: None
base = hwm()
r = Q.quantize(src, out, fmt="nf4", device="cpu", max_shard_size=max_shard, progress=False)
peak = hwm()
print(json.dumps({"baseline_rss": base, "peak_rss": peak, "seconds": r.seconds, "output_bytes": r.output_bytes,
                  "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def write_checkpoint(path: str, layers: int, shards: int, seed: int = 0, shape: dict | None = None) -> dict:
    """A random bf16 Mixtral checkpoint in the Hub layout, `shards` shards of about equal size (whole tensors)."""
    import torch
    from safetensors.torch import save_file

    cfg = {**SHAPE, **(shape or {}), "num_hidden_layers": layers}
    D, F, V, H, KV = (cfg[k] for k in ("hidden_size", "intermediate_size", "vocab_size", "num_attention_heads",
                                       "num_key_value_heads"))  # fmt: skip
    hd = D // H
    shapes = {"model.embed_tokens.weight": (V, D)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                   p + "self_attn.q_proj.weight": (H * hd, D), p + "self_attn.k_proj.weight": (KV * hd, D),
                   p + "self_attn.v_proj.weight": (KV * hd, D), p + "self_attn.o_proj.weight": (D, H * hd),
                   p + "block_sparse_moe.gate.weight": (cfg["num_local_experts"], D)}  # fmt: skip
        for e in range(cfg["num_local_experts"]):
            x = p + f"block_sparse_moe.experts.{e}."
            shapes |= {x + "w1.weight": (F, D), x + "w2.weight": (D, F), x + "w3.weight": (F, D)}
    shapes |= {"model.norm.weight": (D,), "lm_head.weight": (V, D)}
    sizes = {k: 2 * torch.Size(s).numel() for k, s in shapes.items()}
    total, target = sum(sizes.values()), sum(sizes.values()) / shards
    g = torch.Generator().manual_seed(seed)
    os.makedirs(path, exist_ok=True)
    weight_map, part, done, n = {}, {}, 0, 0
    names = list(shapes)
    for j, k in enumerate(names):
        part[k] = (torch.randn(shapes[k], generator=g) * shapes[k][-1] ** -0.5).to(torch.bfloat16)
        done += sizes[k]
        if done >= target * (n + 1) or j == len(names) - 1:  # close the shard once it reaches its share
            n += 1
            fname = f"model-{n:05d}-of-{shards:05d}.safetensors"
            save_file(part, os.path.join(path, fname), metadata={"format": "pt"})
            weight_map |= {m: fname for m in part}
            part = {}
    assert n == shards, f"wrote {n} shards, wanted {shards}"
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "torch_dtype": "bfloat16",
                   **cfg}, f, indent=2)  # fmt: skip
    shard_bytes = [os.path.getsize(os.path.join(path, s)) for s in sorted(set(weight_map.values()))]
    return {"bytes": total, "shards": shards, "largest_shard": max(shard_bytes), "largest_tensor": max(sizes.values()),
            "layers": layers}  # fmt: skip


def measure(src: str, out: str, max_shard_size: int, keep_maps: bool = False, env: dict | None = None) -> dict:
    """One quantization in a fresh process: {baseline_rss, peak_rss, seconds, output_bytes, ru_maxrss} (bytes)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    r = subprocess.run([sys.executable, "-c", CHILD, src, out, str(max_shard_size), "1" if keep_maps else "0"],
                       capture_output=True, text=True, env=env, timeout=1800)  # fmt: skip
    if r.returncode != 0:
        raise RuntimeError(f"quantizing {src} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# glibc raises its mmap threshold (up to 32 MB) after freeing large chunks; later tensors then come from the heap,
# which keeps freed memory resident. A fixed threshold shows how much of the peak is that slack.
FIXED_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def run(layers: int, shards: int, tmp: str, keep_maps: bool = False, out_shard_fraction: float = 0.5,
        shape: dict | None = None, fixed_threshold: bool = False) -> dict:
    """Write the checkpoint, quantize it in a fresh process (again with the old reader's maps kept, and with a fixed
    malloc mmap threshold, when asked)."""
    ck = write_checkpoint(os.path.join(tmp, "src"), layers, shards, shape=shape)
    max_shard = int(ck["largest_shard"] * out_shard_fraction)
    rows = {}
    modes = ["new"] + (["fixed-threshold"] if fixed_threshold else []) + (["keep-maps"] if keep_maps else [])
    for mode in modes:
        out = os.path.join(tmp, f"out-{mode}")
        m = measure(os.path.join(tmp, "src"), out, max_shard, keep_maps=mode == "keep-maps",
                    env=FIXED_THRESHOLD if mode == "fixed-threshold" else None)  # fmt: skip
        m["above_baseline"] = m["peak_rss"] - m["baseline_rss"]
        m["fraction_of_checkpoint"] = m["above_baseline"] / ck["bytes"]
        rows[mode] = m
    bound = ck["largest_shard"] + max_shard + ck["largest_tensor"]
    return {"checkpoint": ck, "output_max_shard_bytes": max_shard, "bound_bytes": bound, "runs": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8, help="decoder layers (8: about 1.6 GB)")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--keep-maps", action="store_true", help="also measure the old reader that kept every map")
    ap.add_argument("--fixed-threshold", action="store_true",
                    help="also measure with MALLOC_MMAP_THRESHOLD_=1MiB (glibc's freed-heap slack removed)")
    ap.add_argument("--out", help="also write the report here (a text file)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mixq-rss-") as tmp:
        res = run(args.layers, args.shards, tmp, keep_maps=args.keep_maps, fixed_threshold=args.fixed_threshold)
    ck, mb = res["checkpoint"], 1e6
    lines = [
        f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"machine: {platform.machine()}, nproc {len(os.sched_getaffinity(0))}, python {platform.python_version()}, "
        f"1 torch thread",
        f"command: python evals/bench_quantize_rss.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip(),
        "",
        f"checkpoint: {ck['bytes'] / mb:.1f} MB bf16 in {ck['shards']} shards ({ck['layers']} layers); largest shard "
        f"{ck['largest_shard'] / mb:.1f} MB, largest tensor {ck['largest_tensor'] / mb:.1f} MB; output shards "
        f"<= {res['output_max_shard_bytes'] / mb:.1f} MB (nf4)",
        f"bound: largest shard + one output shard + largest tensor = {res['bound_bytes'] / mb:.1f} MB "
        f"({100 * res['bound_bytes'] / ck['bytes']:.1f}% of the checkpoint)",
        "",
        f"{'reader':<34} {'baseline MB':>12} {'peak MB':>9} {'above MB':>9} {'% of ckpt':>10} {'in bound':>9} "
        f"{'seconds':>8}",
    ]
    for mode, m in res["runs"].items():
        name = {"new": "releases each shard (now)", "fixed-threshold": "now, MALLOC_MMAP_THRESHOLD_=1MiB",
                "keep-maps": "keeps every map (old reader)"}[mode]
        lines.append(f"{name:<34} {m['baseline_rss'] / mb:>12.1f} {m['peak_rss'] / mb:>9.1f} "
                     f"{m['above_baseline'] / mb:>9.1f} {100 * m['fraction_of_checkpoint']:>9.1f}% "
                     f"{'yes' if m['above_baseline'] <= res['bound_bytes'] else 'NO':>9} {m['seconds']:>8.1f}")
    lines += ["", "raw: " + json.dumps(res)]
    report = "\n".join(lines)
    print(report)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
