"""Benchmark: NF4 quantization of one Mixtral expert matrix (14336 x 4096, bf16) on the CPU, ours against
bitsandbytes.functional.quantize_4bit (compress_statistics=True), same tensor, same run; checks the bytes.

    python evals/bench_quantize.py [--runs 5] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def timed(fn, runs: int) -> tuple[float, list[float], object]:
    out, times = None, []
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--shape", default="14336x4096")
    args = ap.parse_args()
    import bitsandbytes.functional as bnbF

    from mixtral_quant import quantize_tensor

    if args.threads:
        torch.set_num_threads(args.threads)
    shape = tuple(int(s) for s in args.shape.split("x"))
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    quantize_tensor(w[:64], "nf4")  # builds the lookup tables once
    ours_s, ours_all, ours = timed(lambda: quantize_tensor(w, "nf4", blocksize=64, double_quant=True), args.runs)
    bnb_s, bnb_all, (q, state) = timed(
        lambda: bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True), args.runs
    )
    same = torch.equal(ours["weight"], q)
    print(f"tensor {list(shape)} bf16, {torch.get_num_threads()} threads, {args.runs} runs each (median)")
    print(f"ours         {ours_s:.3f} s   runs {', '.join(f'{t:.3f}' for t in ours_all)}")
    print(f"bitsandbytes {bnb_s:.3f} s   runs {', '.join(f'{t:.3f}' for t in bnb_all)}")
    print(f"speedup      {bnb_s / ours_s:.2f}x   packed bytes identical: {same}")
    if not same:
        raise SystemExit("packed NF4 bytes differ from bitsandbytes")


if __name__ == "__main__":
    main()
