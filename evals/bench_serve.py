"""Batching gain of `mixq serve`: generated tokens/s with 8 concurrent clients vs 1 client, side by side.

Starts `mixq serve MODEL` in a subprocess (one torch thread: OMP_NUM_THREADS=1), then for each run: one client sends
--requests completions one after another; then 8 clients do the same at once. Every completion decodes exactly
--max-tokens tokens (greedy, vLLM's ignore_eos), so both sides do the same work per request. Prints each run and the
medians, and the median of the runs' ratios (robust to the load of a shared machine drifting between runs); --out writes the same text to a file headed by date, machine and command.

    python evals/bench_serve.py --out evals/results/serve_bench.txt
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx

PROMPTS = ["def parse_args(argv):", "import os\nimport sys\n", "class Queue:", "The tokenizer module", "# Copyright",
           "for i in range(10):", "Return the absolute path", "try:\n    import"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clients(url: str, n_clients: int, n_requests: int, max_tokens: int) -> tuple[int, float]:
    """n_clients threads, each sending n_requests completions in turn -> (tokens generated, wall seconds)."""
    counts = [0] * n_clients
    errors = []

    def one(i):
        with httpx.Client(timeout=600) as c:
            for k in range(n_requests):
                body = {"model": "bench", "prompt": PROMPTS[(i + k) % len(PROMPTS)], "max_tokens": max_tokens,
                        "temperature": 0, "ignore_eos": True}  # fmt: skip
                r = c.post(url + "/v1/completions", json=body)
                if r.status_code != 200:
                    errors.append(r.text)
                    return
                counts[i] += r.json()["usage"]["completion_tokens"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n_clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"a request failed: {errors[0]}")
    return sum(counts), dt


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:tiny-mixtral")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=4, help="completions per client per run")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    lines = []

    def say(s=""):
        print(s, flush=True)
        lines.append(s)

    say(f"# {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, {platform.machine()}, nproc {os.cpu_count()}")
    say(f"# command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    mixq = shutil.which("mixq") or os.path.join(os.path.dirname(sys.executable), "mixq")
    cmd = [mixq, "serve", args.model, "--port", str(port), "--max-batch", str(args.clients), "--device", "cpu",
           "--model-name", "bench", "--context", "512"]  # fmt: skip
    say(f"# server: OMP_NUM_THREADS=1 {' '.join(cmd[1:])}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise SystemExit("the server did not start")
            time.sleep(0.2)
        clients(url, args.clients, 1, 8)  # warm-up: first batches, cache allocation
        say(f"# {args.requests} completions per client, {args.max_tokens} tokens each (greedy, ignore_eos)")
        say(f"{'run':>3}  {'1 client tok/s':>15}  {f'{args.clients} clients tok/s':>16}  {'ratio':>6}")
        one_tps, many_tps = [], []
        for run in range(args.runs):
            n1, t1 = clients(url, 1, args.requests, args.max_tokens)
            n8, t8 = clients(url, args.clients, args.requests, args.max_tokens)
            one_tps.append(n1 / t1)
            many_tps.append(n8 / t8)
            say(f"{run:>3}  {n1 / t1:>15.1f}  {n8 / t8:>16.1f}  {n8 / t8 / (n1 / t1):>5.2f}x")
        a, b = statistics.median(one_tps), statistics.median(many_tps)
        ratio = statistics.median(m / o for o, m in zip(one_tps, many_tps))
        say(f"median  1 client {a:.1f} tok/s   {args.clients} clients {b:.1f} tok/s   "
            f"ratio {ratio:.2f}x (median of the runs' ratios; each run measures both sides back to back)")
    finally:
        server.terminate()
        server.wait(30)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
