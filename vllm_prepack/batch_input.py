"""Batch job input: lazy readers, the driver's cheap weight estimate, and line parsing.

The driver never parses a line: it reads lines lazily, weighs each one from its raw text
(``estimate_tokens``) and ships the text to a replica, which parses and tokenizes it
(``parse``). That keeps the driver's cost per request at a few string scans, and tokenization
in the replicas, in parallel.

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
from collections.abc import Iterator
from dataclasses import dataclass, field
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
    top_logprobs: bool = False  # chat: logprobs requested as a bool plus top_logprobs

    @property
    def openai(self) -> bool:
        return self.endpoint != "native"


class Source:
    """(line number from 1, raw JSON text without its newline) read lazily from a JSONL file, a
    Parquet file or folder (rows as JSON), or an in-memory list of lines; ``fraction`` is how
    much was read."""

    def __init__(self, source: str | Path | list[str]):
        self.source = source
        self._read, self._total = 0, 1  # what `fraction` divides: items or bytes

    @property
    def fraction(self) -> float:
        read = self._read.tell() if hasattr(self._read, "tell") else self._read
        return read / self._total

    def __iter__(self) -> Iterator[tuple[int, str]]:
        if isinstance(self.source, list):
            self._total = max(1, len(self.source))
            for number, raw in enumerate(self.source, start=1):
                self._read = number
                if raw.strip():
                    yield number, raw.rstrip("\r\n")
            return
        path = Path(self.source)
        if path.suffix == ".parquet" or path.is_dir():
            import pyarrow.dataset as ds

            data = ds.dataset(path, format="parquet")
            self._total, number = max(1, data.count_rows()), 0
            for batch in data.to_batches(batch_size=4096):
                for row in batch.to_pylist():
                    number += 1
                    self._read = number
                    yield number, json.dumps({k: v for k, v in row.items() if v is not None})
            return
        self._total = max(1, path.stat().st_size)
        with path.open("rb") as f:
            self._read = f  # its offset: no per-line bookkeeping
            for number, raw in enumerate(f, start=1):
                if raw.strip():
                    yield number, raw.decode("utf-8", errors="replace").rstrip("\r\n")
            self._read = self._total


_MAX_TOKENS = re.compile(r'"(?:max_tokens|max_completion_tokens)"\s*:\s*(\d+)')
_IDS = re.compile(r'"(?:prompt_token_ids|prompt|input)"\s*:\s*\[')
_N = re.compile(r'"n"\s*:\s*(\d+)')


def estimate_tokens(raw: str, default_max_tokens: int) -> float:
    """Expected tokens of a raw line (prompt + output), from its text alone: token-id prompts
    count the commas of their list, text counts 4 characters a token. Only dispatch uses it."""
    ids = _IDS.search(raw)
    if ids is not None:
        prompt = raw.count(",", ids.end(), raw.find("]", ids.end())) + 1
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
        _known(body, {"input"})
        request.prompts = _prompts(body.get("input"), "'input'", many=True)
        request.max_tokens = 0
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
