"""The rate limiter on a virtual clock: pacing, bursts, learning from headers and 429s, recovery."""

import asyncio

import pytest

from logprob_cli.ratelimit import RateLimiter, parse_duration, retry_after


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


def test_a_429_pauses_everyone_for_retry_after_and_slows_down_then_recovers():
    clock = Clock()
    lim = limiter(clock, rpm=600)
    delay = lim.throttled({"retry-after-ms": "2000"})
    assert delay == 2.0
    start = clock.now
    send(lim, 1)
    assert clock.now - start == pytest.approx(2.0)  # paused
    assert lim.describe()["rpm"] == pytest.approx(420)  # cut by 30%
    for _ in range(30):
        lim.succeeded(1, {})
    assert lim.describe()["rpm"] == pytest.approx(600)  # recovered, never above the ceiling


def test_a_429_with_no_known_limit_learns_from_the_measured_rate():
    clock = Clock()
    lim = limiter(clock)
    for _ in range(50):  # 50 successes in 5 s: 10/s
        clock.now += 0.1
        lim.succeeded(1, {})
    lim.throttled({})
    rate = lim.describe()["rpm"]
    assert 0.6 * 600 <= rate <= 0.8 * 600
    start = clock.now
    send(lim, 1)
    assert clock.now - start == pytest.approx(1.0)  # no retry-after: one second
    for _ in range(40):
        lim.succeeded(1, {})
    assert lim.describe()["rpm"] is None  # a stray 429 does not cap the run for good


def test_token_429s_slow_the_token_lane():
    clock = Clock()
    lim = limiter(clock, rpm=600, tpm=60000)
    lim.throttled({"retry-after-ms": "10"}, "tokens")
    assert lim.describe() == {"rpm": pytest.approx(600), "tpm": pytest.approx(42000)}


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
