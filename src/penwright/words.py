"""Counts in messages, with the noun's number right: "1 file", "2 files", "1,024 tokens"."""

from __future__ import annotations


def plural(count: int, noun: str, many: str | None = None) -> str:
    """`count` and `noun`, or its plural (`many`, default noun + "s") for any count but 1."""
    return f"{count:,} {noun if count == 1 else many or noun + 's'}"
