"""Pacing requests under an endpoint's requests- and tokens-per-minute limits, learnt as it goes.

Each limit is a lane run as a GCRA (generic cell rate algorithm): a virtual schedule `tat`
advances by cost/rate per request; a request may go once the schedule is less than one
second's worth ahead of now, so the long-run rate is `rate` and at most one second's worth
(`burst`) goes out at once, as a server's token bucket of that size would accept:

    wait = max(0, tat - now - (burst - cost) / rate);   tat = max(tat, now) + cost / rate

A lane's ceiling is the user's limit (--rpm, --tpm) or, when none was given, the limit the
server announces in `x-ratelimit-limit-requests` / `-tokens`; a lane with neither is not
paced (rate None) until 429s teach it a rate. `x-ratelimit-remaining-* = 0` on a lane with
no known rate pauses it until `x-ratelimit-reset-*`.

What a 429 teaches depends on what it carries (the lane: tokens when the error's type says
so, else requests):

- An *informed* 429 (its `x-ratelimit-remaining-<lane>` is below the request's cost) proves
  the lane's limit was reached: every request pauses for its `retry-after-ms` /
  `retry-after` (else the reset header, else 1 s) and the rate is cut by 30%, never below
  5% of the ceiling (multiplicative decrease).
- A *bare* 429 (no rate information: a flaky gateway, or a limit the server keeps to
  itself) is not proof that the rate is too high. Only its own call waits its retry-after
  and tries again; the rate is untouched. Whether bare 429s are a limit is judged over an
  *episode*: it opens at a bare 429 and closes once it has lasted EPISODE_SECONDS (1 s)
  and holds EPISODE_OUTCOMES (50) outcomes of the lane (n_ok successes, n_429 bare 429s).
  If the 429 share s = n_429 / (n_ok + n_429) is above SHARE (25%), the server is refusing
  a sustained part of the load, and while it refuses it admits its limit (its bucket
  refills at the limit and every refill is taken), so the lane's rate becomes

      rate = BACKOFF * admitted,   admitted = (cost of the n_ok successes) / T,   BACKOFF = 0.8

  over the episode's T seconds (at least one request per T), with no burst credit, and
  requests already waiting for a slot at the old rate queue again at the new one; the
  429s of the next EPISODE_SECONDS answer requests sent before the cut and open no
  episode. Otherwise the episode closes with no change.
  Random 429s at a share p give n_429 ~ Binomial(n, p): with n = 50, P(s > 25%) is 6e-5
  at p = 7.5% and 1e-3 at p = 10% (less at higher call rates, whose episodes hold more
  outcomes; a false cut costs 20% of the pace, then recovers).
  A client sending r > L against an untold limit L sees s = (r - L) / r, so it is cut
  once r > L / (1 - SHARE) = 1.33 L, down to 0.8 L.

Recovery (additive increase toward a known ceiling, multiplicative without one):
- with a ceiling c, each success adds RECOVERY * c (1%): back within 100 calls, never above c;
- without one (a rate learnt from bare 429s), the rate grows by GROWTH (5%) a second,
  rate(t) = rate_0 * exp(0.05 t): from 0.8 L it passes L after 4.5 s and reaches 1.33 L,
  where the next episode cuts, after 10 s; the sawtooth runs at about 0.95 L on average
  and spends at most a quarter of its requests on 429s at its peak. The rate grows to
  RELEASE (2) times the admitted rate at most: there, if no bare 429 came since the cut,
  the limit has gone (a passing overload) and the lane is unpaced again until the next
  episode; else it stays there (a limit still refuses now and then, while the calls'
  demand stays too low to make an episode cut).

`rpm` is the request pace now in force (per minute, None when unpaced); `throttles`
counts 429s and `retries` the calls sent again (the transport reports them), for the
progress display.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from dataclasses import dataclass
from typing import Callable, Mapping

BURST_SECONDS = 1.0
CUT = 0.7
FLOOR = 0.05
RECOVERY = 0.01
EPISODE_SECONDS = 1.0
EPISODE_OUTCOMES = 50
SHARE = 0.25
BACKOFF = 0.8
GROWTH = 0.05
RELEASE = 2.0
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
class Episode:
    """Outcomes of a lane since a bare 429 opened the episode at `start`."""

    start: float
    refused: int = 0  # bare 429s
    admitted: int = 0  # successes
    admitted_cost: float = 0.0  # their cost (1 a request, or their tokens)

    def verdict(self, now: float) -> float | None:
        """Once the episode is complete: the admitted rate if 429s were sustained, else 0.0; None: not complete."""
        outcomes = self.refused + self.admitted
        if outcomes < EPISODE_OUTCOMES or now - self.start < EPISODE_SECONDS:
            return None
        if self.refused <= SHARE * outcomes:
            return 0.0
        cost = self.admitted_cost if self.admitted else 1.0  # nothing admitted: one request per episode
        return cost / (now - self.start)


@dataclass
class Lane:
    """One limit (requests or tokens): its ceiling per second, the current rate, the GCRA schedule."""

    name: str
    user_ceiling: float | None  # per second, from --rpm/--tpm
    ceiling: float | None = None
    rate: float | None = None
    tat: float = 0.0
    paused_until: float = 0.0
    learnt: float | None = None  # with no ceiling: the admitted rate the last episode measured
    grown_at: float = 0.0  # when a learnt rate last grew
    cut_at: float = -math.inf  # when the rate was last cut
    refusals: int = 0  # bare 429s since then
    episode: Episode | None = None

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
        if self.user_ceiling is None and per_minute > 0 and self.ceiling != per_minute / 60:
            self.ceiling, self.learnt = per_minute / 60, None
            self.rate = self.ceiling if self.rate is None else min(self.rate, self.ceiling)

    def succeeded(self, cost: float, now: float) -> None:
        if self.episode:
            self.episode.admitted += 1
            self.episode.admitted_cost += cost
            self._close_episode(now)
        if self.rate and self.ceiling:
            self.rate = min(self.ceiling, self.rate + RECOVERY * self.ceiling)
        elif self.rate and self.learnt:
            self.rate *= math.exp(GROWTH * (now - self.grown_at))
            self.grown_at = now
            if self.rate >= RELEASE * self.learnt and self.refusals:
                self.rate = RELEASE * self.learnt
            elif self.rate >= RELEASE * self.learnt:  # the limit has gone: unpaced until the next episode
                self.rate = self.learnt = None

    def refused(self, now: float) -> None:
        """A bare 429: counted in the episode (opening one if none is open), unless just after a cut."""
        if now - self.cut_at < EPISODE_SECONDS:
            return
        self.refusals += 1
        if self.episode is None:
            self.episode = Episode(now)
        self.episode.refused += 1
        self._close_episode(now)

    def exhausted(self, now: float) -> None:
        """An informed 429: cut the rate by 30% (see the module docstring)."""
        if self.rate is not None:
            self.cut(max(FLOOR * (self.ceiling or self.rate), CUT * self.rate), now)

    def cut(self, rate: float, now: float) -> None:
        """Pace at `rate` from now on, with no burst credit (the server's bucket is empty); requests
        waiting for a slot reserved at the old rate reserve again (`RateLimiter.acquire`)."""
        self.rate = rate
        self.tat = now + BURST_SECONDS
        self.grown_at = self.cut_at = now
        self.refusals = 0

    def _close_episode(self, now: float) -> None:
        admitted = self.episode.verdict(now)
        if admitted is None:
            return
        self.episode = None
        if admitted:  # sustained 429s: pace below what the server admitted
            if self.ceiling is None:
                self.learnt = admitted
            floor = FLOOR * self.ceiling if self.ceiling else 0.0
            self.cut(max(floor, min(BACKOFF * admitted, self.rate or math.inf)), now)


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
        self.throttles = 0  # 429s seen
        self.retries = 0  # calls sent again, after a 429 or any other failure (the transport counts them)

    @property
    def rpm(self) -> float | None:
        """Requests per minute the limiter paces at now: told, announced or learnt; None when unpaced."""
        return None if self.requests.rate is None else self.requests.rate * 60

    async def acquire(self, tokens: int = 1) -> None:
        """Wait until one request of `tokens` tokens may go (reserving its place on both schedules).

        A request whose rate was cut while it waited reserves again, at the new rate."""
        while True:
            now = self.clock()
            wait = max(self.requests.reserve(1, now), self.tokens.reserve(tokens, now))
            if wait <= 1e-6:  # not float dust from summing 1/rate
                return
            await self.sleep(wait)
            if max(self.requests.cut_at, self.tokens.cut_at) < now:
                return

    def succeeded(self, tokens: int, headers: Mapping[str, str]) -> None:
        """A request got through: learn the announced limits and recover the rates."""
        now = self.clock()
        self._observe(headers, now)
        self.requests.succeeded(1, now)
        self.tokens.succeeded(tokens, now)

    def throttled(self, headers: Mapping[str, str], kind: str | None = None, tokens: int = 1) -> float:
        """A 429 for a request of `tokens` tokens; returns the seconds its call must wait before retrying.

        kind: "tokens" when the server says the token limit was hit, else the request lane is
        meant. An informed 429 pauses everyone and cuts the rate; a bare one counts toward an
        episode (module docstring).
        """
        now = self.clock()
        self.throttles += 1
        self._observe(headers, now)
        lane, cost = (self.tokens, tokens) if kind == "tokens" else (self.requests, 1)
        delay = retry_after(headers)
        if delay is None:
            delay = parse_duration(headers.get(f"x-ratelimit-reset-{lane.name}")) or 1.0
        remaining = _number(headers.get(f"x-ratelimit-remaining-{lane.name}"))
        if remaining is not None and remaining < cost:
            lane.exhausted(now)
            for each in (self.requests, self.tokens):
                each.paused_until = max(each.paused_until, now + delay)
        else:
            lane.refused(now)
        return delay

    def retrying(self) -> None:
        """A call is about to be sent again (counted for the progress display)."""
        self.retries += 1

    def describe(self) -> dict[str, float | int | None]:
        """For progress and benchmarks: "rpm", "tpm": the pace now, per minute (None: unpaced);
        "429s": 429 answers seen; "retries": calls sent again."""
        return {
            "rpm": self.rpm,
            "tpm": None if self.tokens.rate is None else self.tokens.rate * 60,
            "429s": self.throttles,
            "retries": self.retries,
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
