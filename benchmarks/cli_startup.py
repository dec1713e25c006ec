"""How long `dreambooth --help` (and a subcommand's help) takes to print: the median of N runs, each a fresh
process. Run: .venv/bin/python benchmarks/cli_startup.py [N]"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time


def timed(argv: list[str], n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dreambooth", *argv], capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    for argv in (["--help"], ["train", "--help"]):
        print(f"dreambooth {' '.join(argv)}: median {timed(argv, n):.2f} s over {n} runs")
