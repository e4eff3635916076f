#!/usr/bin/env python
"""Record `logprobs extract`'s terminal display in tmux and check its ETA against the truth.

Runs a job of about 30-60 s on the built-in simulator in a detached tmux pane (a real terminal, so the live
display is drawn), captures the pane every second, and afterwards prints, for each capture, the calls shown,
the ETA shown and the time the run actually still took, and whether the ETA is within a factor of 2 of it
once 10% of the calls are done (with 2 s of slack for the 1 s capture and the display's whole seconds).
Exits 1 if the display did not move or an ETA after 10% was off by more than that, 2 if tmux is missing.

    python scripts/record_progress.py [--prompts 10] [--vocab 100000] [--keep FRAMES.txt]

tmux: `apt-get install -y tmux` (Debian/Ubuntu), `brew install tmux` (macOS).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CALLS = re.compile(r"calls ([\d,]+) of ~?([\d,]+) \(")
ETA = re.compile(r"ETA (?:(\d+):)?(\d+):(\d\d)")
SLACK = 2.0


def parse(frame: str) -> tuple[int, int, float | None] | None:
    """(calls, expected, ETA seconds or None) from a captured pane, or None before the display appears."""
    calls = CALLS.search(frame)
    if not calls:
        return None
    eta = ETA.search(frame)
    seconds = None
    if eta:
        hours, minutes, secs = (int(g) if g else 0 for g in eta.groups())
        seconds = hours * 3600 + minutes * 60 + secs
    return int(calls.group(1).replace(",", "")), int(calls.group(2).replace(",", "")), seconds


def record(command: str, directory: Path, session: str) -> tuple[list[tuple[float, str]], float]:
    """Run `command` in a 150x12 tmux pane; returns the captures (seconds since launch, text) and the end."""
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "150", "-y", "12",
                    f"cd {shlex.quote(str(directory))} && {command}; echo EXIT=$?; sleep 600"], check=True)
    frames, launched = [], time.monotonic()
    try:
        while True:
            time.sleep(1.0)
            text = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout
            now = time.monotonic() - launched
            frames.append((now, text))
            if "EXIT=" in text:
                return frames, next(t for t, f in frames if "wrote " in f or "EXIT=" in f)
            if now > 900:
                raise SystemExit("the run took more than 15 minutes")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--vocab", type=int, default=100_000)
    parser.add_argument("--method", default="topk")
    parser.add_argument("--keep", type=Path, help="write every captured frame to this file")
    args = parser.parse_args()
    if shutil.which("tmux") is None:
        print("tmux is not installed: apt-get install -y tmux (Debian/Ubuntu) or brew install tmux", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        (directory / "p.jsonl").write_text(
            "".join(json.dumps({"id": i, "prompt": f"recorded prompt {i}"}) + "\n" for i in range(args.prompts))
        )
        # a tmux server already running would not pass this environment on: name what the run needs
        path = f"PYTHONPATH={shlex.quote(os.environ['PYTHONPATH'])} " if os.environ.get("PYTHONPATH") else ""
        command = (f"{path}{shlex.quote(sys.executable)} -m logprob_cli.cli extract p.jsonl -o out.parquet "
                   f"--method {shlex.quote(args.method)} --sim vocab_size={args.vocab}")
        frames, end = record(command, directory, f"record-progress-{int(time.time())}")
    if args.keep:
        args.keep.write_text("".join(f"--- {t:.1f} s\n{text}\n" for t, text in frames))
    return report(frames, end)


def report(frames: list[tuple[float, str]], end: float) -> int:
    print(f"{'t (s)':>6} {'calls':>9} {'of':>9} {'done':>6} {'ETA shown':>9} {'really left':>11}  within 2x")
    seen, bad = [], 0
    for t, text in frames:
        parsed = parse(text)
        if parsed is None or t > end:
            continue
        calls, expected, eta = parsed
        left = end - t
        verdict = ""
        if calls >= 0.1 * expected and calls < expected and eta is not None:
            ok = left / 2 - SLACK <= eta <= 2 * left + SLACK
            bad += not ok
            verdict = "yes" if ok else "NO"
        seen.append(calls)
        shown = "-" if eta is None else f"{eta:.0f}"
        print(f"{t:6.1f} {calls:9,} {expected:9,} {calls / expected:6.1%} {shown:>9} {left:11.1f}  {verdict}")
    moved = len(set(seen)) >= 3
    print(f"run ended {end:.1f} s after launch; the display {'moved' if moved else 'did NOT move'} "
          f"({len(set(seen))} distinct call counts in {len(seen)} captures); ETAs outside 2x after 10%: {bad}")
    return 0 if moved and not bad else 1


if __name__ == "__main__":
    sys.exit(main())
