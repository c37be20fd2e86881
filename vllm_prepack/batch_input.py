"""Batch job input: lazy readers, the driver's cheap weight estimate, and line parsing.

The driver never parses a line: it reads blocks of lines lazily, weighs each line from its raw
bytes (``weigh``) and ships the bytes to a replica, which parses and tokenizes them (``parse``).
That keeps the driver's cost per request at a few string scans, and tokenization in the
replicas, in parallel.

Two line formats, told apart per line:
- this project's: ``{"id"?, "prompt" | "prompt_token_ids", "max_tokens"?, <sampling>?}``, greedy
  unless a sampling key says otherwise;
- the OpenAI batch format that ``vllm run-batch`` and hosted batch APIs read: ``{"custom_id",
  "method": "POST", "url", "body"}`` for /v1/completions, /v1/chat/completions and /v1/embeddings.
Sampling keys (both formats): temperature, top_p, top_k, min_p, seed, stop, n, logprobs,
presence_penalty, frequency_penalty, repetition_penalty, min_tokens, ignore_eos; vLLM's
SamplingParams validates their values in the replica.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings")
SAMPLING_KEYS = frozenset({
    "temperature", "top_p", "top_k", "min_p", "seed", "stop", "n", "logprobs",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens", "ignore_eos",
})
# body keys that change nothing for an offline job (the model is the job's)
_IGNORED_BODY_KEYS = frozenset({"model", "user", "stream", "encoding_format"})


class InputError(ValueError):
    """A line that cannot become a request; the message starts with 'line N:'."""


@dataclass
class Request:
    line: int
    id: object  # this project's "id" (default: the line number), or the OpenAI custom_id
    endpoint: str  # "native" or one of ENDPOINTS
    prompts: list = field(default_factory=list)  # str or [int], one engine request each
    messages: list | None = None  # chat: rendered with the chat template in the replica
    max_tokens: int = 16
    sampling: dict = field(default_factory=dict)  # SamplingParams keyword arguments
    dimensions: int | None = None  # embeddings: Matryoshka truncation (PoolingParams)
    top_logprobs: bool = False  # chat: logprobs requested as a bool plus top_logprobs

    @property
    def openai(self) -> bool:
        return self.endpoint != "native"


BLOCK_BYTES = 1 << 20  # JSONL read per block: a few thousand lines
BLOCK_LINES = 4096  # rows per block of an in-memory list or a Parquet file


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
        if path.suffix == ".parquet" or path.is_dir():
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
        return [len(raw) / 4 + default_max_tokens for raw in raws]
    return [estimate_tokens(raw, default_max_tokens) for raw in raws]


def estimate_tokens(raw: bytes, default_max_tokens: int) -> float:
    """Expected tokens of a raw line (prompt + output), from its text alone: token-id prompts
    count the commas of their list, text counts 4 bytes a token. Only dispatch uses it."""
    ids = _IDS.search(raw)
    if ids is not None:
        prompt = raw.count(b",", ids.end(), raw.find(b"]", ids.end())) + 1
    else:
        prompt = len(raw) / 4
    if default_max_tokens == 0:  # embeddings generate nothing
        return float(prompt)
    found = _MAX_TOKENS.search(raw)
    n = _N.search(raw)
    out = int(found.group(1)) if found else default_max_tokens
    return float(prompt + out * (int(n.group(1)) if n else 1))


def parse(raw: str, line: int, default_max_tokens: int) -> Request:
    """The request on one line, or InputError naming the line and the cause."""
    try:
        obj = json.loads(raw)
        if not isinstance(obj, dict):
            raise ValueError("a line must be a JSON object")
        if "custom_id" in obj or "body" in obj:
            return _openai(obj, line, default_max_tokens)
        return _native(obj, line, default_max_tokens)
    except InputError:
        raise
    except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        raise InputError(f"line {line}: {e}") from None


def line_id(raw: str, line: int) -> object:
    """The id a record for this line carries, even when the line is bad."""
    try:
        obj = json.loads(raw)
        return obj.get("custom_id", obj.get("id", line)) if isinstance(obj, dict) else line
    except ValueError:
        return line


def _native(obj: dict, line: int, default_max_tokens: int) -> Request:
    unknown = set(obj) - {"id", "prompt", "prompt_token_ids", "max_tokens"} - SAMPLING_KEYS
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(sorted(unknown))}")
    prompt, ids = obj.get("prompt"), obj.get("prompt_token_ids")
    if (prompt is None) == (ids is None):
        raise ValueError("give exactly one of 'prompt' (text) or 'prompt_token_ids'")
    if prompt is not None and (not isinstance(prompt, str) or not prompt):
        raise ValueError("'prompt' must be a non-empty string")
    if ids is not None:
        _check_ids(ids, "'prompt_token_ids'")
    sampling = {"temperature": 0.0, **{k: obj[k] for k in SAMPLING_KEYS & set(obj)}}
    max_tokens = 0 if default_max_tokens == 0 else _positive(  # 0: an embedding job
        obj.get("max_tokens", default_max_tokens), "max_tokens")
    return Request(line, obj.get("id", line), "native", [prompt if ids is None else ids],
                   max_tokens=max_tokens, sampling=sampling)


def _openai(obj: dict, line: int, default_max_tokens: int) -> Request:
    missing = [k for k in ("custom_id", "method", "url", "body") if k not in obj]
    if missing:
        raise ValueError(f"OpenAI batch line without {', '.join(missing)}")
    url, body = obj["url"], obj["body"]
    if obj["method"] != "POST":
        raise ValueError(f"method must be POST, got {obj['method']!r}")
    if url not in ENDPOINTS:
        raise ValueError(f"url {url!r} is not supported; supported: {', '.join(ENDPOINTS)}")
    if not isinstance(body, dict):
        raise ValueError("'body' must be a JSON object")
    if body.get("stream"):
        raise ValueError("'stream' is not supported in a batch job")
    request = Request(line, obj["custom_id"], url)
    if url == "/v1/embeddings":
        _known(body, {"input", "dimensions"})
        request.prompts = _prompts(body.get("input"), "'input'", many=True)
        request.max_tokens = 0
        if body.get("dimensions") is not None:
            request.dimensions = _positive(body["dimensions"], "dimensions")
        return request
    keys = {"prompt", "max_tokens"} if url == "/v1/completions" else {
        "messages", "max_tokens", "max_completion_tokens", "top_logprobs"}
    _known(body, keys | SAMPLING_KEYS)
    request.sampling = {k: body[k] for k in SAMPLING_KEYS & set(body)}
    if url == "/v1/completions":
        request.prompts = _prompts(body.get("prompt"), "'prompt'", many=False)
        request.max_tokens = _positive(body.get("max_tokens", 16), "max_tokens")  # OpenAI's default
        return request
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError("'messages' must be a non-empty list of {role, content} objects")
    request.messages = messages
    request.max_tokens = _positive(
        body.get("max_completion_tokens", body.get("max_tokens", default_max_tokens)), "max_tokens")
    if request.sampling.pop("logprobs", False):  # chat: a bool, and top_logprobs a count
        request.sampling["logprobs"] = int(body.get("top_logprobs") or 0)
        request.top_logprobs = True
    return request


def _known(body: dict, keys: set) -> None:
    unknown = set(body) - keys - _IGNORED_BODY_KEYS
    if unknown:
        raise ValueError(f"unsupported body field(s) {', '.join(sorted(unknown))}")


def _prompts(value, name: str, many: bool) -> list:
    """A text or token-id prompt; with `many` also a list of them (embeddings)."""
    if isinstance(value, str) and value:
        return [value]
    if isinstance(value, list) and value and all(isinstance(t, int) for t in value):
        return [_check_ids(value, name)]
    if isinstance(value, list) and len(value) == 1 or (many and isinstance(value, list) and value):
        return [p for v in value for p in _prompts(v, name, many=False)]
    raise ValueError(f"{name} must be a non-empty string or list of token ids"
                     + (", or a list of them" if many else ""))


def _check_ids(ids, name: str) -> list[int]:
    if not isinstance(ids, list) or not ids or any(
            isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
        raise ValueError(f"{name} must be a non-empty list of non-negative ints")
    return ids


def _positive(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"'{name}' must be a positive integer")
    return value
