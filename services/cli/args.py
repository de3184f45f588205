"""Argument types shared by pipectl's commands."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def number(
    kind: Callable[[str], float], low: float, high: float = math.inf, *, open_low: bool = False
) -> Callable[[str], float]:
    """An argparse type: a finite number within [low, high] (or (low, high]); exit 2 otherwise.

    Infinity is refused too: no count, share, rate or number of seconds means it, and
    librdkafka's millisecond settings cannot hold it.
    """

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or value > high or value < low or (open_low and value == low):
            bounds = (
                f"{'(' if open_low else '['}{low}, {high}]"
                if high != math.inf
                else (f"> {low}" if open_low else f">= {low}")
            )
            raise argparse.ArgumentTypeError(f"{text} is not {bounds}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


# A rate or a number of seconds: anything > 0.
positive = number(float, 0, open_low=True)


def add_delivery_timeout(parser: argparse.ArgumentParser) -> None:
    """--timeout of the commands that produce records (`produce`, `dlq replay`)."""
    parser.add_argument(
        "--timeout",
        type=positive,
        default=30.0,
        metavar="SECONDS",
        help="fail a record the broker has not acknowledged within this (default 30)",
    )
