"""Batch job input, on the driver's side: lazy readers and the cheap weight estimate.

The driver never parses a line: it reads blocks of lines lazily, weighs each line from its raw
bytes (``weigh``) and ships the bytes to a replica, which parses and tokenizes them
(``batch_record.parse``). That keeps the driver's cost per request at a few string scans, and
tokenization in the replicas, in parallel.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_right
from collections.abc import Iterator
from itertools import accumulate
from pathlib import Path

from vllm_prepack.batch_record import CHARS_PER_TOKEN, expected_tokens

BLOCK_BYTES = 1 << 20  # JSONL read per block: a few thousand lines
BLOCK_LINES = 4096  # rows per block of an in-memory list or a Parquet file


def is_parquet(path: Path) -> bool:
    """A Parquet input: a .parquet file or a folder of them (anything else is JSONL)."""
    return path.suffix == ".parquet" or path.is_dir()


class Source:
    """Input lines read lazily in blocks: (line numbers from 1, raw JSON lines as bytes), blank
    lines dropped, from a JSONL file, a Parquet file or folder (rows as JSON), or an in-memory
    list of lines; ``fraction`` is how much was read. Blocks (``block_bytes`` of a JSONL file,
    BLOCK_LINES rows otherwise) keep the driver's cost per line to a few C-level scans."""

    def __init__(self, source: str | Path | list[str], block_bytes: int = BLOCK_BYTES):
        self.source = source
        self.block_bytes = block_bytes
        self._read, self._total = 0, 1  # what `fraction` divides: items or bytes

    @property
    def fraction(self) -> float:
        read = self._read.tell() if hasattr(self._read, "tell") else self._read
        return read / self._total

    def blocks(self) -> Iterator[tuple[list[int], list[bytes]]]:
        if isinstance(self.source, list):
            self._total = max(1, len(self.source))
            for start in range(0, len(self.source), BLOCK_LINES):
                # a raw newline in a JSON text is whitespace; lines travel newline-separated
                raws = [line.strip().replace("\n", " ").encode()
                        for line in self.source[start:start + BLOCK_LINES]]
                self._read = start + len(raws)
                yield _nonblank(start + 1, raws)
            return
        path = Path(self.source)
        if is_parquet(path):
            import pyarrow.dataset as ds

            data = ds.dataset(path, format="parquet")
            self._total, number = max(1, data.count_rows()), 1
            for batch in data.to_batches(batch_size=BLOCK_LINES):
                raws = [json.dumps({k: v for k, v in row.items() if v is not None}).encode()
                        for row in batch.to_pylist()]
                self._read = number + len(raws) - 1
                yield list(range(number, number + len(raws))), raws
                number += len(raws)
            return
        self._total = max(1, path.stat().st_size)
        with path.open("rb") as f:
            self._read, number, rest = f, 1, b""  # f's offset: no per-line bookkeeping
            while chunk := f.read(self.block_bytes):
                chunk = rest + chunk
                end = chunk.rfind(b"\n")
                if end < 0:
                    rest = chunk
                    continue
                rest, raws = chunk[end + 1:], chunk[:end].split(b"\n")
                yield _nonblank(number, raws, chunk[:end])
                number += len(raws)
            if rest:
                yield _nonblank(number, [rest], rest)
            self._read = self._total


class Feed:
    """The input as weighed blocks, handed out a token budget at a time (the driver's read-ahead
    window); lines in `skip` (committed by an earlier run) never enter it."""

    def __init__(self, source: Source, default_max_tokens: int, skip=None):
        self._blocks = source.blocks()
        self.default_max_tokens = default_max_tokens
        self.skip = skip
        self._lines: list[int] = []
        self._raws: list[bytes] = []
        self._weights: list[float] = []
        self._cumulative: list[float] = []
        self._pos = 0

    def take(self, tokens: float, count: int) -> tuple[list, list, list] | None:
        """(lines, weights, raws) of the next lines: at most `count` of them, worth at most
        `tokens` (but at least one line); None when the input is exhausted."""
        while self._pos == len(self._lines):
            block = next(self._blocks, None)
            if block is None:
                return None
            lines, raws = block
            if self.skip:
                keep = [i for i, line in enumerate(lines) if line not in self.skip]
                lines, raws = [lines[i] for i in keep], [raws[i] for i in keep]
            self._lines, self._raws, self._pos = lines, raws, 0
            self._weights = weigh(raws, self.default_max_tokens)
            self._cumulative = list(accumulate(self._weights))
        start = self._pos
        before = self._cumulative[start - 1] if start else 0.0
        end = bisect_right(self._cumulative, before + tokens, start,
                           min(len(self._lines), start + count))
        self._pos = end = max(end, start + 1)
        return self._lines[start:end], self._weights[start:end], self._raws[start:end]


def _nonblank(first: int, raws: list[bytes], text: bytes | None = None):
    """Numbers and lines of a block without its blank lines; one scan when every line starts a
    JSON object (`text`: the block's lines joined by newlines, when the caller has it)."""
    text = b"\n".join(raws) if text is None else text
    if text.count(b"\n{") + text.startswith(b"{") == len(raws):
        return list(range(first, first + len(raws))), raws
    keep = [i for i, raw in enumerate(raws) if raw.strip()]
    return [first + i for i in keep], [raws[i] for i in keep]


_MAX_TOKENS = re.compile(rb'"(?:max_tokens|max_completion_tokens)"\s*:\s*(\d+)')
_IDS = re.compile(rb'"(?:prompt_token_ids|prompt|input)"\s*:\s*\[')
_N = re.compile(rb'"n"\s*:\s*(\d+)')


def weigh(raws: list[bytes], default_max_tokens: int) -> list[float]:
    """``estimate_tokens`` of every line of a block; a few scans of the whole block when no line
    has a list (token ids, messages), a max_* key or n: text prompts with the default output
    length, the common corpus."""
    text = b"\n".join(raws)
    if b"[" not in text and b'"max_' not in text and b'"n"' not in text:
        return [expected_tokens(len(raw) / CHARS_PER_TOKEN, default_max_tokens) for raw in raws]
    return [estimate_tokens(raw, default_max_tokens) for raw in raws]


def estimate_tokens(raw: bytes, default_max_tokens: int) -> float:
    """Expected tokens of a raw line (prompt + output), from its text alone: token-id prompts
    count the commas of their list, text counts CHARS_PER_TOKEN bytes a token. Only dispatch
    uses it."""
    ids = _IDS.search(raw)
    if ids is not None:
        prompt = raw.count(b",", ids.end(), raw.find(b"]", ids.end())) + 1
    else:
        prompt = len(raw) / CHARS_PER_TOKEN
    if default_max_tokens == 0:  # embeddings generate nothing
        return float(prompt)
    found = _MAX_TOKENS.search(raw)
    n = _N.search(raw)
    out = int(found.group(1)) if found else default_max_tokens
    return expected_tokens(prompt, out, int(n.group(1)) if n else 1)
