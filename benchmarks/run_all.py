"""Every benchmark in sequence, each printing its table: modest sizes by default (a few minutes).

    python benchmarks/run_all.py          # modest sizes, about 6 minutes on 2 cores
    python benchmarks/run_all.py --full   # each script's own defaults: tens of minutes

Run a single script with its flags for other sizes (`python benchmarks/NAME.py --help`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent

# script: the modest arguments run_all passes without --full
MODEST = {
    "calls_per_prompt.py": ["--vocab", "10000", "--prompts", "1"],
    "throughput.py": [],
    "client_cpu.py": ["--calls", "2000"],
    "memory.py": ["--prompts", "25,50,100"],
    "rate_recovery.py": [],
    "target_calls.py": ["--prompts", "3"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="run each script with its own (bigger) defaults")
    args = parser.parse_args()
    started = time.perf_counter()
    for script, modest in MODEST.items():
        command = [sys.executable, str(HERE / script), *([] if args.full else modest)]
        print(f"\n=== python benchmarks/{script} {' '.join(command[2:])}\n", flush=True)
        subprocess.run(command, check=True)
    print(f"\nall benchmarks done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
