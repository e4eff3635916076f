"""Counted nouns for user-facing messages: "1 prompt", "2 prompts", "1,000 calls"."""

from __future__ import annotations


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """`count` (with thousands separators) and `noun`, or `nouns` (default noun + "s") unless count is 1."""
    return f"{count:,} {noun if count == 1 else nouns or noun + 's'}"


def top_k_capped(asked: int, cap: int) -> str | None:
    """The note saying a --top-k above the endpoint's cap was lowered to it, or None if it was not."""
    if asked <= cap:
        return None
    return f"top-k {asked:,} is above this endpoint's cap of {cap:,} logprobs a call: {cap:,} are asked per call"
