"""How fast `mixq` answers before any work: `--help`, a command's `--help` and a bad argument, against the floor of
starting Python (`python -c pass`) and against importing torch. Each case is a fresh process; medians of --runs,
interleaved so a busy machine slows every case alike. The goal (issue 11): under 0.5 s each.

    python evals/bench_startup.py [--runs 15] [--out evals/results/startup.txt]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

GOAL_S = 0.5


def cases() -> list[tuple[str, list[str], int]]:
    """(name, argv, expected exit code)."""
    mixq = shutil.which("mixq", path=os.path.dirname(sys.executable)) or shutil.which("mixq")
    if mixq is None:
        raise SystemExit("mixq is not installed in this environment: pip install -e . first")
    py = sys.executable
    return [
        ("python -c pass", [py, "-c", "pass"], 0),
        ("python -c 'import torch'", [py, "-c", "import torch"], 0),
        ("mixq --help", [mixq, "--help"], 0),
        ("mixq quantize --help", [mixq, "quantize", "--help"], 0),
        ("mixq quantize --format nf5 -o x  (bad argument)", [mixq, "quantize", "--format", "nf5", "-o", "x"], 2),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15, help="fresh processes per case (median reported)")
    ap.add_argument("--out", help="also write the report here (a text file)")
    args = ap.parse_args(argv)
    todo = cases()
    times: dict[str, list[float]] = {name: [] for name, _, _ in todo}
    for name, cmd, code in todo:  # one untimed run each: the file cache warm, as a user's second call finds it
        subprocess.run(cmd, capture_output=True)
    for _ in range(args.runs):
        for name, cmd, code in todo:
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True)
            times[name].append(time.perf_counter() - t0)
            if r.returncode != code:
                raise SystemExit(f"{name}: exit {r.returncode}, expected {code}\n{r.stderr.decode()}")
    base = statistics.median(times["python -c pass"])
    torch_s = statistics.median(times["python -c 'import torch'"])
    lines = [
        f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), "
        f"python {platform.python_version()}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"command: python evals/bench_startup.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip(),
        f"runs: {args.runs} fresh processes per case, interleaved; median (min-max) wall seconds",
        "",
        f"{'case':<50} {'median s':>9} {'min':>7} {'max':>7} {'- pass':>8} {'vs torch':>9}  goal",
    ]
    for name, _, _ in todo:
        t = times[name]
        m = statistics.median(t)
        goal = "" if not name.startswith("mixq") else ("met" if m < GOAL_S else "MISSED")
        lines.append(f"{name:<50} {m:>9.3f} {min(t):>7.3f} {max(t):>7.3f} {m - base:>8.3f} {m / torch_s:>8.2f}x"
                     f"  {goal}")
    report = "\n".join(lines)
    print(report)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
