"""argparse types the commands share (the product's and the benchmarks'): a bad value stops the
parser with one line naming the option, before anything starts."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable


def _number(kind: type, ok: Callable[[float], bool], bound: str) -> Callable[[str], float]:
    """A finite number (`kind`: int or float) for which `ok` holds (`bound` says how)."""
    noun = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {noun}, got {text!r}") from None
        if not (ok(value) and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return parse


def at_least(minimum: float, kind: type = int) -> Callable[[str], float]:
    """A number (`kind`: int or float) of at least `minimum`."""
    return _number(kind, lambda value: value >= minimum, f"at least {minimum:g}")


at_least_one = at_least(1)  # a count
at_least_zero = at_least(0)  # a count where 0 turns the thing off
non_negative = at_least(0.0, float)  # seconds, shares, tokens of work
positive = _number(float, lambda value: value > 0, "above 0")  # a load, a rate
port_number = _number(int, lambda value: 0 < value <= 65535, "a port number, 1 to 65535")


def json_object(text: str) -> dict:
    """A JSON object (engine arguments, the plugin's options)."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"is not JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {type(value).__name__}: {text!r}")
    return value


def prepack_options(text: str) -> dict:
    """The plugin's options as a JSON object, checked as an engine checks them: a bad one
    stops the parser, not the job (or a benchmark, whose first engine is seconds away)."""
    from vllm_prepack.config import CONFIG_KEY, PrepackConfig, PrepackConfigError

    options = json_object(text)
    try:
        PrepackConfig.from_additional_config({CONFIG_KEY: options})
    except PrepackConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return options
