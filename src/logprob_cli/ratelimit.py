"""Pacing requests under an endpoint's requests- and tokens-per-minute limits, learnt as it goes.

Each limit is a lane run as a GCRA (generic cell rate algorithm): a virtual schedule `tat`
advances by cost/rate per request; a request may go once the schedule is less than one
second's worth ahead of now, so the long-run rate is `rate` and at most one second's worth
(`burst`) goes out at once, as a server's token bucket of that size would accept:

    wait = max(0, tat - now - (burst - cost) / rate);   tat = max(tat, now) + cost / rate

A lane's ceiling is the user's limit (--rpm, --tpm) or, when none was given, the limit
the server announces in `x-ratelimit-limit-requests` / `-tokens`. The limiter learns:
- `x-ratelimit-remaining-* = 0` on a lane with no known rate pauses it until
  `x-ratelimit-reset-*` (with a known rate the schedule already paces it);
- a 429 pauses every request for its `retry-after-ms` / `retry-after` (else the reset
  header, else one second) and cuts the lane's rate by 30%, never below 5% of the
  ceiling; with no known limit, the success rate measured at that moment becomes the
  ceiling (a guess) and the rate starts at 70% of it;
- each success adds 1% of the ceiling back, so the rate recovers within ~100 calls; a
  guessed ceiling, once reached, is dropped (no limit until the next 429).
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Mapping

BURST_SECONDS = 1.0
CUT = 0.7
FLOOR = 0.05
RECOVERY = 0.01
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?(?:(\d+(?:\.\d+)?)ms)?")


def parse_duration(text: str | None) -> float | None:
    """OpenAI's reset durations ("1s", "6m0s", "120ms", "1h2m3.5s", or bare seconds) in seconds."""
    if not text:
        return None
    text = text.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    match = _DURATION.fullmatch(text)
    if not match or not any(match.groups()):
        return None
    h, m, s, ms = (float(g) if g else 0.0 for g in match.groups())
    return h * 3600 + m * 60 + s + ms / 1000


def retry_after(headers: Mapping[str, str]) -> float | None:
    """The wait a 429 (or 503) asks for: retry-after-ms, else retry-after in seconds; None if absent."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    seconds = headers.get("retry-after")
    if seconds:
        try:
            return max(0.0, float(seconds))
        except ValueError:
            return None  # an HTTP date: rare for APIs; the caller falls back to its own backoff
    return None


@dataclass
class Lane:
    """One limit (requests or tokens): its ceiling per second, the current rate, the GCRA schedule."""

    name: str
    user_ceiling: float | None  # per second, from --rpm/--tpm
    ceiling: float | None = None
    rate: float | None = None
    tat: float = 0.0
    paused_until: float = 0.0
    guessed: bool = False  # the ceiling is a measured rate at a 429, not a known limit
    successes: deque = field(default_factory=lambda: deque(maxlen=512))

    def __post_init__(self) -> None:
        self.ceiling = self.rate = self.user_ceiling

    def reserve(self, cost: float, now: float) -> float:
        """Reserve `cost` on the schedule; return how long the caller must wait first."""
        wait = max(0.0, self.paused_until - now)
        if self.rate:
            burst = max(BURST_SECONDS * self.rate, cost)
            wait = max(wait, self.tat - now - (burst - cost) / self.rate)
            self.tat = max(self.tat, now) + cost / self.rate
        return wait

    def learn_limit(self, per_minute: float) -> None:
        if self.user_ceiling is None and per_minute > 0 and (self.guessed or self.ceiling != per_minute / 60):
            self.ceiling, self.guessed = per_minute / 60, False
            self.rate = self.ceiling if self.rate is None else min(self.rate, self.ceiling)

    def succeeded(self, cost: float, now: float) -> None:
        self.successes.append((now, cost))
        if self.rate and self.ceiling and self.rate < self.ceiling:
            self.rate = min(self.ceiling, self.rate + RECOVERY * self.ceiling)
        elif self.guessed:  # recovered to the guess: drop it, unlimited until the next 429
            self.rate = self.ceiling = None
            self.guessed = False

    def throttled(self, now: float) -> None:
        if self.rate is None:
            measured = self.measured_rate(now)
            if measured is None:
                return
            self.ceiling, self.guessed = measured, True
            self.rate = CUT * measured
        else:
            self.rate = max(FLOOR * (self.ceiling or self.rate), CUT * self.rate)
        self.tat = max(self.tat, now)

    def measured_rate(self, now: float) -> float | None:
        recent = [(t, c) for t, c in self.successes if now - t <= 10.0]
        if len(recent) < 2:
            return None
        span = max(now - recent[0][0], 1e-3)
        return sum(c for _, c in recent) / span


class RateLimiter:
    """Paces `acquire(tokens)` under the request and token limits (see module docstring).

    `rpm` / `tpm`: the user's limits (None: none known until the server announces one).
    `clock` and `sleep` are injectable for tests.
    """

    def __init__(
        self,
        rpm: float | None = None,
        tpm: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = asyncio.sleep,
    ):
        for name, value in (("rpm", rpm), ("tpm", tpm)):
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number, got {value}")
        self.requests = Lane("requests", rpm / 60 if rpm else None)
        self.tokens = Lane("tokens", tpm / 60 if tpm else None)
        self.clock = clock
        self.sleep = sleep
        self.throttles = 0

    async def acquire(self, tokens: int = 1) -> None:
        """Wait until one request of `tokens` tokens may go (reserving its place on both schedules)."""
        now = self.clock()
        wait = max(self.requests.reserve(1, now), self.tokens.reserve(tokens, now))
        if wait > 1e-6:  # not float dust from summing 1/rate
            await self.sleep(wait)

    def succeeded(self, tokens: int, headers: Mapping[str, str]) -> None:
        """A request got through: learn the announced limits and recover the rates."""
        now = self.clock()
        self._observe(headers, now)
        self.requests.succeeded(1, now)
        self.tokens.succeeded(tokens, now)

    def throttled(self, headers: Mapping[str, str], kind: str | None = None) -> float:
        """A 429: pause everyone, cut the lane's rate; returns the seconds to wait before retrying.

        kind: "tokens" when the server says the token limit was hit, else the request lane is cut.
        """
        now = self.clock()
        self.throttles += 1
        self._observe(headers, now)
        lane = self.tokens if kind == "tokens" else self.requests
        lane.throttled(now)
        delay = retry_after(headers)
        if delay is None:
            delay = parse_duration(headers.get(f"x-ratelimit-reset-{lane.name}")) or 1.0
        for each in (self.requests, self.tokens):
            each.paused_until = max(each.paused_until, now + delay)
        return delay

    def describe(self) -> dict[str, float | None]:
        """Current rates per minute (None: unlimited/unknown), for progress and benchmarks."""
        return {
            "rpm": None if self.requests.rate is None else self.requests.rate * 60,
            "tpm": None if self.tokens.rate is None else self.tokens.rate * 60,
        }

    def _observe(self, headers: Mapping[str, str], now: float) -> None:
        for lane in (self.requests, self.tokens):
            limit = _number(headers.get(f"x-ratelimit-limit-{lane.name}"))
            if limit:
                lane.learn_limit(limit)
            if lane.rate is None and _number(headers.get(f"x-ratelimit-remaining-{lane.name}")) == 0:
                reset = parse_duration(headers.get(f"x-ratelimit-reset-{lane.name}"))
                if reset:
                    lane.paused_until = max(lane.paused_until, now + reset)


def _number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return None
