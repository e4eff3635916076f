"""Counted nouns for user-facing messages: "1 prompt", "2 prompts", "1,000 calls"."""

from __future__ import annotations


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """`count` (with thousands separators) and `noun`, or `nouns` (default noun + "s") unless count is 1."""
    return f"{count:,} {noun if count == 1 else nouns or noun + 's'}"
