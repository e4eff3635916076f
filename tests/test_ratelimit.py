"""The rate limiter on a virtual clock: pacing, bursts, learning from headers and 429s, recovery."""

import asyncio
import math

import pytest

from logprob_cli.endpoints._ratelimit import RateLimiter, parse_duration, retry_after


class Clock:
    """A virtual clock whose sleep advances time instantly."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


def limiter(clock: Clock, **kw) -> RateLimiter:
    return RateLimiter(clock=clock, sleep=clock.sleep, **kw)


def send(lim: RateLimiter, n: int, tokens: int = 1) -> None:
    async def go():
        for _ in range(n):
            await lim.acquire(tokens)

    asyncio.run(go())


@pytest.mark.parametrize(
    "text, seconds",
    [("1s", 1.0), ("6m0s", 360.0), ("120ms", 0.12), ("1.5s", 1.5), ("1h2m3.5s", 3723.5), ("2", 2.0), ("", None), ("soon", None)],
)
def test_openai_durations(text, seconds):
    assert parse_duration(text) == (None if seconds is None else pytest.approx(seconds))


def test_retry_after_prefers_milliseconds():
    assert retry_after({"retry-after-ms": "250", "retry-after": "1"}) == pytest.approx(0.25)
    assert retry_after({"retry-after": "3"}) == 3.0
    assert retry_after({}) is None


def test_requests_are_paced_at_the_rpm_after_one_second_of_burst():
    clock = Clock()
    lim = limiter(clock, rpm=600)  # 10 per second
    send(lim, 10)
    assert clock.now == 1000.0  # one second's worth goes at once
    send(lim, 100)
    assert clock.now - 1000.0 == pytest.approx(10.0, abs=1e-6)  # then exactly 10/s


def test_tokens_per_minute_paces_by_tokens():
    clock = Clock()
    lim = limiter(clock, tpm=6000)  # 100 tokens per second
    send(lim, 101, tokens=50)  # 5,050 tokens: 100 in the burst, 4,950 at 100/s
    assert clock.now - 1000.0 == pytest.approx(49.5, abs=0.51)


def test_no_limit_means_no_wait():
    clock = Clock()
    send(limiter(clock), 1000)
    assert clock.now == 1000.0


def test_an_announced_limit_is_adopted_when_the_user_gave_none():
    clock = Clock()
    lim = limiter(clock)
    lim.succeeded(1, {"x-ratelimit-limit-requests": "120", "x-ratelimit-remaining-requests": "119"})
    assert lim.describe()["rpm"] == pytest.approx(120)
    user = limiter(clock, rpm=60)
    user.succeeded(1, {"x-ratelimit-limit-requests": "120"})
    assert user.describe()["rpm"] == pytest.approx(60)  # the user's limit wins


def test_an_informed_429_pauses_everyone_for_retry_after_and_slows_down_then_recovers():
    clock = Clock()
    lim = limiter(clock, rpm=600)
    delay = lim.throttled({"retry-after-ms": "2000", "x-ratelimit-remaining-requests": "0"})
    assert delay == 2.0
    start = clock.now
    send(lim, 1)
    assert clock.now - start == pytest.approx(2.0)  # paused
    assert lim.rpm == pytest.approx(420)  # cut by 30%
    for _ in range(30):
        lim.succeeded(1, {})
    assert lim.rpm == pytest.approx(600)  # recovered, never above the ceiling


def test_isolated_bare_429s_neither_pause_nor_slow_anyone():
    """5% of answers a 429 with no rate information, at the told limit and with none known."""
    for rpm in (600, None):
        clock = Clock()
        lim = limiter(clock, rpm=rpm)
        for i in range(1, 2001):
            clock.now += 0.1
            if i % 20 == 0:
                assert lim.throttled({"retry-after-ms": "50"}) == pytest.approx(0.05)  # its call waits that
            else:
                lim.succeeded(1, {})
        assert lim.rpm == (None if rpm is None else pytest.approx(600))
        start = clock.now
        send(lim, 1)
        assert clock.now == start  # nobody was paused
        assert lim.describe()["429s"] == 100


class Gateway:
    """A server's GCRA bucket of `limit` requests a second (one second's worth), on the virtual clock."""

    def __init__(self, clock: Clock, limit: float):
        self.clock, self.limit, self.full_at = clock, limit, 0.0

    def admits(self) -> bool:
        now = self.clock.now
        if max(0.0, self.full_at - now) > 1.0 - 1 / self.limit + 1e-9:
            return False
        self.full_at = max(self.full_at, now) + 1 / self.limit
        return True


def test_sustained_bare_429s_converge_to_the_untold_limit():
    """A client able to send 100 a second, a server admitting 20 and saying so only with bare 429s."""
    clock = Clock()
    lim = limiter(clock)
    server = Gateway(clock, 20.0)
    outcomes = []  # (time, admitted)

    async def go():
        while clock.now < 1060:
            await lim.acquire(1)
            clock.now += 0.01  # the client's own pace
            admitted = server.admits()
            outcomes.append((clock.now, admitted))
            if admitted:
                lim.succeeded(1, {})
            else:
                lim.throttled({"retry-after-ms": "50"})

    asyncio.run(go())
    late = [ok for t, ok in outcomes if t > 1030]  # the last 30 s
    assert sum(late) / 30 >= 0.85 * 20  # at the limit, within 15%
    assert late.count(False) <= 0.2 * len(late)  # few requests wasted on 429s
    assert 0.6 * 20 * 60 <= lim.rpm <= 1.6 * 20 * 60  # paced near the limit, not collapsed


def test_a_learnt_rate_grows_five_percent_a_second_and_is_dropped_once_the_limit_has_gone():
    clock = Clock()
    lim = limiter(clock)
    for i in range(1, 66):  # an episode of 1 s from the first 429: 57 bare 429s, 8 successes
        clock.now += 1 / 64
        if i % 8:
            lim.throttled({"retry-after-ms": "50"})
        else:
            lim.succeeded(1, {})
    learnt = lim.rpm
    assert learnt == pytest.approx(0.8 * 8 * 60)  # 80% of what the server admitted
    clock.now += 10
    lim.succeeded(1, {})
    assert lim.rpm == pytest.approx(learnt * math.exp(0.5), rel=0.01)  # 5% a second for 10 s
    clock.now += 10
    lim.succeeded(1, {})
    assert lim.rpm is None  # twice what the server admitted, with no 429: the limit has gone


def test_token_429s_slow_the_token_lane():
    clock = Clock()
    lim = limiter(clock, rpm=600, tpm=60000)
    lim.throttled({"retry-after-ms": "10", "x-ratelimit-remaining-tokens": "30"}, "tokens", tokens=50)
    assert lim.describe()["rpm"] == pytest.approx(600)
    assert lim.describe()["tpm"] == pytest.approx(42000)


def test_describe_counts_429s_and_retries_for_the_progress_display():
    lim = RateLimiter(rpm=120)
    lim.throttled({"retry-after-ms": "10"})
    lim.retrying()
    lim.retrying()
    assert lim.describe() == {"rpm": pytest.approx(120), "tpm": None, "429s": 1, "retries": 2}


def test_remaining_zero_pauses_until_reset_when_no_rate_is_known():
    clock = Clock()
    lim = limiter(clock)
    lim.succeeded(1, {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "3s"})
    send(lim, 1)
    assert clock.now - 1000.0 == pytest.approx(3.0)


@pytest.mark.parametrize("bad", [0, -5, float("inf")])
def test_bad_limits_are_refused(bad):
    with pytest.raises(ValueError, match="positive"):
        RateLimiter(rpm=bad)
