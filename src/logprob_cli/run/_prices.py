"""What a call costs: US$ per 1M prompt and completion tokens of common OpenAI models with logprobs.

The table holds OpenAI's standard-tier list prices as published on its API pricing page
in mid-2025; prices change, so check them, and give your own with `--price IN,OUT`
(US$ per 1M prompt tokens, per 1M completion tokens), which always wins. A dated snapshot
(gpt-4o-2024-08-06, gpt-3.5-turbo-0125) costs what its base model costs (the name without
its date stamp) unless the table lists the snapshot itself. Any other name is unknown (None),
never guessed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from logprob_cli.endpoints import HF_PREFIX as LOCAL_MODEL_PREFIX
from logprob_cli.errors import Worded


@dataclass(frozen=True)
class Price:
    prompt: float  # US$ per 1M prompt tokens
    completion: float  # US$ per 1M completion tokens

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """US$ for the tokens: (prompt_tokens * prompt + completion_tokens * completion) / 1e6."""
        return (prompt_tokens * self.prompt + completion_tokens * self.completion) / 1e6


PRICES: dict[str, Price] = {
    "gpt-4o": Price(2.50, 10.00),
    "gpt-4o-2024-05-13": Price(5.00, 15.00),
    "gpt-4o-mini": Price(0.15, 0.60),
    "gpt-4.1": Price(2.00, 8.00),
    "gpt-4.1-mini": Price(0.40, 1.60),
    "gpt-4.1-nano": Price(0.10, 0.40),
    "gpt-4-turbo": Price(10.00, 30.00),
    "gpt-4": Price(30.00, 60.00),
    "gpt-3.5-turbo": Price(0.50, 1.50),
    "gpt-3.5-turbo-instruct": Price(1.50, 2.00),
    "davinci-002": Price(2.00, 2.00),
    "babbage-002": Price(0.40, 0.40),
}

SNAPSHOT_STAMP = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{4})$")  # -2024-08-06 or -0125


def parse_price(text: str) -> Price:
    """"IN,OUT" (US$ per 1M prompt tokens, per 1M completion tokens), e.g. "2.5,10" -> Price(2.5, 10.0)."""
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        prompt, completion = (float(part) for part in parts)
    except ValueError:
        raise ValueError(Worded(
            "{price} takes two numbers IN,OUT: US$ per 1M prompt tokens and per 1M completion tokens "
            "(e.g. 2.5,10), got {text!r}", text=text,
        )) from None
    if not all(math.isfinite(v) and v >= 0 for v in (prompt, completion)):
        raise ValueError(Worded("{price} values must be finite and not negative, got {text!r}", text=text))
    return Price(prompt, completion)


def price_for(model: str | None, override: Price | None = None) -> Price | None:
    """The price of a model's calls: the override if given; free for the built-in simulator (model None) and a
    local model ("hf:PATH", read in this process); the table's entry for the model or the base of its dated snapshot; else None (unknown)."""
    if override is not None:
        return override
    if model is None or model.startswith(LOCAL_MODEL_PREFIX):
        return Price(0.0, 0.0)
    name = model.lower()
    return PRICES.get(name) or PRICES.get(SNAPSHOT_STAMP.sub("", name))
