"""argparse types the commands' parsers share (the product's and the benchmarks')."""

from __future__ import annotations

import argparse


def at_least_one(text: str) -> int:
    """A count: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
