"""Shared by the benchmarks: the HTTP simulator in its own process, and a steady-state window."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

from logprob_cli.endpoints._base import Prompt

_URL = re.compile(r"http://\S+/v1")  # the first URL `serve` prints (rich may wrap the line)
_TICKS = os.sysconf("SC_CLK_TCK")


class ServedSimulator:
    """`logprobs serve` in a child process (a context manager): `url` once it listens, its CPU from /proc."""

    def __init__(self, vocab: int, latency: float = 0.0, rpm: float = 0.0):
        self.command = [
            sys.executable, "-m", "logprob_cli.cli", "serve", "--port", "0", "--sim", f"vocab_size={vocab}",
            "--latency", str(latency), "--rpm", str(rpm),
        ]
        self.url = ""
        self._log = tempfile.TemporaryFile(mode="w+")
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> "ServedSimulator":
        self._process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=self._log)
        deadline = time.monotonic() + 60
        while not self.url:
            if self._process.poll() is not None or time.monotonic() > deadline:
                self._log.seek(0)
                log = self._log.read()[-2000:]
                self.__exit__()
                raise RuntimeError(f"the simulator server did not start: {log}")
            time.sleep(0.05)
            self._log.seek(0)
            match = _URL.search(self._log.read())
            self.url = match.group(0) if match else ""
        return self

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
        self._log.close()

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far."""
        assert self._process is not None
        with open(f"/proc/{self._process.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS


class Window:
    """A runner Progress that snapshots `measure()` at the `first`-th and `last`-th journaled call."""

    def __init__(self, first: int, last: int, measure: Callable[[], dict[str, float]]):
        self.first, self.last, self.measure = first, last, measure
        self.calls = 0
        self.marks: list[dict[str, float]] = []

    def start(self, run: Any) -> None:
        pass

    def call(self) -> None:
        self.calls += 1
        if self.calls in (self.first, self.last):
            self.marks.append(self.measure())

    def prompt_done(self, extra_calls: int, failed: bool = False) -> None:
        pass

    def delta(self) -> dict[str, float]:
        """What changed between the two snapshots (RuntimeError if the run never reached the last one)."""
        if len(self.marks) < 2:
            raise RuntimeError(f"the run ended after {self.calls} calls, before call {self.last}: give it more prompts")
        before, after = self.marks
        return {key: after[key] - before[key] for key in after}


def machine_jiffies() -> dict[str, float]:
    """The machine's CPU time so far, all CPUs ("total") and the part the hypervisor stole ("steal"), in ticks."""
    with open("/proc/stat") as stat:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, stat.readline().split()[1:9])
    return {"steal": steal, "total": user + nice + system + idle + iowait + irq + softirq + steal}


def prompts(n: int, tag: str = "benchmark") -> list[Prompt]:
    """n distinct plain prompts."""
    return [Prompt(id=i, line=i + 1, prompt=f"{tag} prompt {i}") for i in range(n)]


def machine_note() -> str:
    """CPU count and load average, to print above a table."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{os.cpu_count()} CPUs, load average {load} (1, 5, 15 min)"
