"""Errors from other processes, told in one line: a replica's engine failing to start reaches
the driver as a whole remote traceback (Ray's actor error, Ray Serve's deployment message)."""

from __future__ import annotations

import re

EXCEPTION_LINE = re.compile(r"[\w.]+(Error|Exception|Exit|Interrupt): ")  # "module.Name: message"


def last_exception(traceback: str, limit: int = 400) -> str:
    """The exception a traceback ends with, on one line (its message's lines joined; a
    pydantic error's link left out), cut at `limit` characters."""
    lines = [line.strip() for line in traceback.splitlines()
             if line.strip() and not line.strip().startswith("For further information")]
    if not lines:
        return ""
    start = max((i for i, line in enumerate(lines) if EXCEPTION_LINE.match(line)),
                default=len(lines) - 1)
    text = " ".join(lines[start:])
    return text if len(text) <= limit else text[:limit - 3] + "..."
