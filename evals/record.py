"""Run a command and save what it prints under evals/results/, headed by the date, the machine and the command,
so that every figure in README.md and evals/RESULTS.md has its raw output beside the script that printed it.

    python evals/record.py evals/results/bench_quantize.txt -- python evals/bench_quantize.py --runs 5 --threads 1

stdout and stderr are both kept (stderr lines prefixed with "stderr: "); the command's exit code is recorded and
returned.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
import time


def header(cmd: list[str]) -> str:
    try:
        import torch

        torch_line = f"torch {torch.__version__}, cuda {torch.cuda.is_available()}"
    except ImportError:
        torch_line = "torch not installed"
    return "\n".join([
        f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"machine: {platform.machine()}, nproc {len(os.sched_getaffinity(0))}, {platform.platform()}, python "
        f"{platform.python_version()}, {torch_line}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"command: {shlex.join(cmd)}",
    ])


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        raise SystemExit(__doc__)
    out, cmd = argv[0], argv[2:]
    head = header(cmd)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    text = r.stdout + "".join(f"stderr: {line}\n" for line in r.stderr.splitlines())
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(f"{head}\nexit code: {r.returncode}, wall {wall:.1f} s\n\n{text}")
    sys.stdout.write(text)
    return r.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
