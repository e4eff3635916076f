"""The progress display: calls done of calls expected, an ETA from the call rate that is within a factor of 2
of the truth after the first 10% of calls, spend against the caps, retries and 429s as they happen, and plain
lines every few seconds when stderr is not a terminal. (scripts/record_progress.py checks the live terminal
display the same way, recorded in tmux.)"""

import io
import json
import os
import re
import subprocess
import sys
import time

from rich.console import Console

from logprob_cli.endpoints._base import Prompt
from logprob_cli.endpoints._openai_compatible import OpenAIEndpoint
from logprob_cli._display import PlainProgress, RichProgress, _Display, plain_line
from logprob_cli.endpoints import Pressure
from logprob_cli.run._progress import RunStart, Tally
from logprob_cli.endpoints._ratelimit import RateLimiter
from logprob_cli.run._runner import extract_batch
from logprob_cli.server import ServerConfig, SimulatorServer
from logprob_cli.endpoints._simulator import SimulatedEndpoint, SimulatorConfig
from logprob_cli.endpoints._vocabulary import load_vocabulary

SLACK = 0.5  # seconds: the rate is sampled every 0.25 s


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """A runner Progress keeping a Tally and a snapshot every 0.2 s of real time, as a display would show."""

    def __init__(self):
        self.run = None
        self.tally = None
        self.snapshots = []

    def start(self, run: RunStart) -> None:
        self.run, self.tally = run, Tally(run)

    def call(self) -> None:
        self.tally.call()
        if not self.snapshots or time.monotonic() - self.snapshots[-1][0] >= 0.2:
            self.snapshots.append((time.monotonic(), self.tally.snapshot()))

    def prompt_done(self, extra_calls: int, failed: bool = False) -> None:
        self.tally.prompt_done(extra_calls, failed)


def prompts(n: int) -> list[Prompt]:
    return [Prompt(id=i, line=i + 1, prompt=f"progress prompt {i}") for i in range(n)]


def assert_eta_within_twice_the_truth(samples, end: float, total: int) -> int:
    """Every (time, calls, ETA) sample past 10% of `total` calls predicts the time left to `end` within 2x."""
    checked = 0
    for t, calls, eta in samples:
        left = end - t
        if 0.1 * total <= calls < total:
            assert eta is not None, f"no ETA at {calls} of {total} calls"
            assert left / 2 - SLACK <= eta <= 2 * left + SLACK, f"ETA {eta:.1f} s at {calls:,} calls, {left:.1f} s left"
            checked += 1
    return checked


def test_eta_from_the_call_rate_is_within_twice_the_truth_in_a_real_run(tmp_path):
    """Prompts finish together at the end, so an ETA from prompts has nothing to go on for most of the run.

    Against a served simulator with a fixed latency per request, so the run's pace is set by the latency
    (about 8 s) and not by how fast or busy the machine is."""
    vocab = 5_000
    with SimulatorServer(ServerConfig(SimulatorConfig(vocab_size=vocab), latency=0.02)) as server:
        endpoint = OpenAIEndpoint("simulator", load_vocabulary(f"simulator:{vocab}"), base_url=server.url)
        recorder = Recorder()
        summary = extract_batch(prompts(6), tmp_path / "o.parquet", endpoint, "topk", concurrency=4, progress=recorder)
    assert summary.finished == 6 and not summary.failures
    assert recorder.run.calls_expected == summary.calls and recorder.run.exact, "topk's count is known in advance"
    end = recorder.tally.last_call
    samples = [(t, s.calls, s.eta) for t, s in recorder.snapshots]
    assert assert_eta_within_twice_the_truth(samples, end, summary.calls) >= 5
    assert recorder.tally.snapshot().fraction == 1.0


def test_piped_output_prints_periodic_lines_while_the_run_goes(tmp_path):
    """Not silent until a group of prompts finishes: a line every 10 s, and its ETA holds too. The run is
    paced by a served simulator's latency (about 25 s), so it outlasts one interval on any machine."""
    vocab = 5_000
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"id": i, "prompt": f"piped prompt {i}"}) + "\n" for i in range(6)))
    with SimulatorServer(ServerConfig(SimulatorConfig(vocab_size=vocab), latency=0.06)) as server:
        command = [sys.executable, "-m", "logprob_cli.cli", "extract", str(path), "--method", "topk", "-c", "4",
                   "--model", "simulator", "--base-url", server.url, "--tokenizer", f"simulator:{vocab}",
                   "--api-key", "any"]
        child = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                 env={**os.environ, "COLUMNS": "200"})
        lines = [(time.monotonic(), line) for line in child.stderr]
        ended = time.monotonic()
        assert child.wait() == 0, "".join(line for _, line in lines)
    status = [(t, line) for t, line in lines if re.match(r"\[\d+:\d\d\] calls ", line)]
    parsed = []
    for t, line in status:
        calls, total = (int(x.replace(",", "")) for x in re.search(r"calls ([\d,]+) of ([\d,]+)", line).groups())
        minutes, seconds = re.search(r"ETA (\d+):(\d\d)", line).groups()
        parsed.append((t, calls, total, 60 * int(minutes) + int(seconds)))
    during = [p for p in parsed if p[0] < ended - 2 and 0 < p[1] < p[2]]
    assert during, f"no progress line while the run went on:\n{''.join(line for _, line in lines)}"
    assert parsed[-1][1] == parsed[-1][2], "the last line says every expected call was made"
    assert [p[1] for p in parsed] == sorted(p[1] for p in parsed)
    last_call = parsed[-1][0]  # the end line follows the last call (the output is written after)
    assert_eta_within_twice_the_truth([(t, calls, eta) for t, calls, _, eta in during], last_call, parsed[-1][2])


def test_total_grows_rather_than_passing_100_percent_and_says_it_is_an_estimate():
    clock = FakeClock()
    tally = Tally(RunStart(prompts=2, prompts_done=0, calls_expected=100, exact=True), clock)
    for _ in range(120):
        clock.now += 0.01
        tally.call()
    snap = tally.snapshot()
    assert (snap.calls, snap.expected, snap.fraction, snap.exact) == (120, 120, 1.0, False)
    assert "of ~120 (100.0%, estimate)" in plain_line(snap)


def test_prompts_that_need_fewer_calls_or_fail_shrink_the_total():
    tally = Tally(RunStart(prompts=3, prompts_done=1, calls_expected=300, exact=True), FakeClock())
    for _ in range(90):
        tally.call()
    tally.prompt_done(-10)  # done after 90 of the expected 100
    tally.prompt_done(-100, failed=True)  # failed before its first answer
    snap = tally.snapshot()
    assert (snap.expected, snap.exact, snap.prompts_done, snap.prompts_failed) == (190, False, 2, 1)
    assert "prompts 2/3 (1 failed)" in plain_line(snap)


def test_long_retries_are_shown_not_silence():
    clock = FakeClock()
    pressure = {"retries": 0, "throttles": 0}
    run = RunStart(prompts=1, prompts_done=0, calls_expected=1000, exact=True,
                   pressure=lambda: Pressure(pressure["retries"], pressure["throttles"], 300.0))
    tally = Tally(run, clock)
    for _ in range(200):
        clock.now += 0.01
        tally.call()
    eta_before = tally.snapshot().eta
    clock.now += 12  # 12 s of 429s and retries, no answer
    pressure.update(retries=9, throttles=7)
    line = plain_line(tally.snapshot())
    assert "no answer for 12 s (retrying)" in line and "9 retries, 7 429s" in line and "limit 300 rpm" in line
    eta_after = tally.snapshot().eta
    assert eta_after is None or eta_after > 2 * eta_before, "the ETA grows while no call is answered"


def test_spend_is_shown_against_the_caps():
    run = RunStart(prompts=4, prompts_done=0, calls_expected=50, exact=True, cost=lambda: 0.25,
                   calls_spent=lambda: 1234, max_calls=5000, max_cost=1.0)
    line = plain_line(Tally(run, FakeClock()).snapshot())
    assert "1,234 of --max-calls 5,000" in line and "$0.2500 of --max-cost $1.00" in line


def test_the_terminal_display_moves_with_the_clock_and_counts_down():
    clock = FakeClock()
    out = io.StringIO()
    progress = RichProgress(Console(file=out, force_terminal=True, width=150), clock)
    progress.start(RunStart(prompts=4, prompts_done=0, calls_expected=1000, exact=True))
    shown = []
    try:
        for step in range(1, 10):
            for _ in range(100):
                clock.now += 0.01  # 100 calls a second: 10 s in all
                progress.call()
            render = Console(file=io.StringIO(), width=150, force_terminal=True)
            render.print(_Display(progress.tally))
            text = render.file.getvalue()
            calls = int(re.search(r"calls ([\d,]+) of 1,000", text).group(1).replace(",", ""))
            minutes, seconds = map(int, re.search(r"ETA (\d+):(\d\d)", text).groups())
            shown.append((calls, 60 * minutes + seconds))
    finally:
        progress.stop()
    assert [calls for calls, _ in shown] == [100 * step for step in range(1, 10)]
    etas = [eta for _, eta in shown]
    assert all(abs(eta - (10 - step)) <= 1 for step, eta in enumerate(etas, 1)), etas  # the rate is sampled
    assert etas == sorted(etas, reverse=True) and etas[0] > etas[-1]


def test_resumed_run_expects_only_the_calls_left(tmp_path):
    endpoint = SimulatedEndpoint(SimulatorConfig(vocab_size=3000))
    out = tmp_path / "o.parquet"
    first = extract_batch(prompts(3), out, endpoint, "topk", concurrency=4, max_calls=250)
    assert first.budget_reached
    recorder = Recorder()
    second = extract_batch(prompts(3), out, endpoint, "topk", concurrency=4, progress=recorder)
    assert second.finished == 3
    assert recorder.run.calls_expected == second.calls
    assert recorder.run.prompts_done == first.finished
    assert not recorder.run.exact, "a resumed run's count is shown as an estimate"


def test_retries_429s_and_the_rate_limit_of_an_http_endpoint_are_read(tmp_path):
    """Against a server that answers 429 to 20% of the calls: the counts shown are the client's own."""
    vocab = 2000
    config = ServerConfig(SimulatorConfig(vocab_size=vocab), fault_rate=0.2, faults=("429",), fault_seed=3)
    with SimulatorServer(config) as server:
        endpoint = OpenAIEndpoint(
            "simulator", load_vocabulary(f"simulator:{vocab}"), base_url=server.url, limiter=RateLimiter(rpm=60_000)
        )
        recorder = Recorder()
        summary = extract_batch(prompts(1), tmp_path / "o.parquet", endpoint, "topk", concurrency=4, progress=recorder)
        injected = server.faults_injected["429"]
    assert summary.finished == 1
    pressure = recorder.tally.snapshot().pressure
    assert injected > 0
    assert pressure.throttles == injected and pressure.retries >= injected
    assert pressure.rpm is not None and pressure.rpm <= 60_000
    assert SimulatedEndpoint().pressure() is None, "the simulator has no retries to show"


def test_plain_progress_prints_at_start_on_its_interval_and_at_the_end():
    clock = FakeClock()
    out = io.StringIO()
    progress = PlainProgress(Console(file=out, width=200), interval=0.05, clock=clock)
    progress.start(RunStart(prompts=2, prompts_done=0, calls_expected=10, exact=True))
    for _ in range(5):
        clock.now += 1
        progress.call()
    deadline = time.monotonic() + 10
    while out.getvalue().count("calls 5 of 10") < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    for _ in range(5):
        clock.now += 1
        progress.call()
    progress.prompt_done(0)
    progress.prompt_done(0)
    progress.stop()
    lines = out.getvalue().splitlines()
    assert lines[0] == "0 of 2 prompts already done; 10 calls to make"
    assert any(re.search(r"calls 5 of 10 \(50.0%\), 1 calls/s, ETA 0:0[456]", line) for line in lines[1:-1]), lines
    assert lines[-1].startswith("[0:10] calls 10 of 10 (100.0%)") and "prompts 2/2" in lines[-1]
    assert progress._ticker is None, "the ticker thread is stopped"


def test_a_prompt_that_overruns_counts_its_overrun_once():
    """2 prompts expected at 10 calls each, the first taking 12: once both are done the total is the 22 made (the
    calls past 20 raised it as they came; the first prompt's end corrects the count by +2, not on top of that)."""
    tally = Tally(RunStart(prompts=2, prompts_done=0, calls_expected=20, exact=False), FakeClock())
    for _ in range(21):
        tally.call()
    assert tally.snapshot().expected == 21
    tally.prompt_done(+2)  # the first prompt: 12 calls, interleaved with the second's first 9
    tally.call()
    tally.prompt_done(0)  # the second: its 10th call
    snap = tally.snapshot()
    assert (snap.calls, snap.expected, snap.fraction) == (22, 22, 1.0)
