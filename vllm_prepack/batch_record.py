"""A batch line's life as data: the input line, the request parsed from it, and the record
written for it, in one module.

Two input formats, told apart per line by one rule (``_is_openai``):
- this project's: ``{"id"?, "prompt" | "prompt_token_ids", "max_tokens"?, <sampling>?}``, greedy
  unless a sampling key says otherwise; in an embedding job ``{"id"?, "prompt" |
  "prompt_token_ids", "dimensions"?}``;
- the OpenAI batch format that ``vllm run-batch`` and hosted batch APIs read: ``{"custom_id",
  "method": "POST", "url", "body"}`` for /v1/completions, /v1/chat/completions and /v1/embeddings.
Sampling keys (both formats): temperature, top_p, top_k, min_p, seed, stop, n, logprobs,
presence_penalty, frequency_penalty, repetition_penalty, min_tokens, ignore_eos; vLLM's
SamplingParams validates their values in the replica.

A record (a result or an error) per line, encoded as JSONL bytes or as an Arrow table of one fixed
schema (``encode``); each JSONL record starts with its line number, the pattern a resume reads
(``record_line``). The replicas parse and encode; the driver only reads raw lines and writes bytes
(``batch_input``, ``batch_output``), and weighs lines with ``expected_tokens``.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field

CHARS_PER_TOKEN = 4  # a text prompt's expected tokens, before its tokenizer has seen it


def expected_tokens(prompt_tokens: float, max_tokens: int, n: int = 1) -> float:
    """What a request is expected to cost: its prompt, plus `max_tokens` for each of `n`
    choices (embeddings: max_tokens 0)."""
    return float(prompt_tokens + max_tokens * n)


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
    id: object  # this project's "id" (None where the line has none), or the OpenAI custom_id
    endpoint: str  # "native" or one of ENDPOINTS
    prompts: list = field(default_factory=list)  # str or [int], one engine request each
    messages: list | None = None  # chat: rendered with the chat template in the replica
    max_tokens: int = 16
    sampling: dict = field(default_factory=dict)  # SamplingParams keyword arguments
    dimensions: int | None = None  # embeddings: Matryoshka truncation (PoolingParams)


def parse(raw: str, line: int, default_max_tokens: int) -> Request:
    """The request on one line, or InputError naming the line and the cause."""
    try:
        obj = json.loads(raw)
        if not isinstance(obj, dict):
            raise ValueError("a line must be a JSON object")
        if _is_openai(obj):
            return _openai(obj, line, default_max_tokens)
        return _native(obj, line, default_max_tokens)
    except InputError:
        raise
    except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        raise InputError(f"line {line}: {e}") from None


def _is_openai(obj: dict) -> bool:
    """The one rule that tells an OpenAI batch line from this project's."""
    return "custom_id" in obj or "body" in obj


def _identity(raw: str, line: int) -> tuple[object, bool]:
    """The id a record for this line carries, and whether it is an OpenAI line, even when the
    line is bad (not JSON: judged from its text): the line's id (an OpenAI line's custom_id),
    null where it gives none that can be read, never the line number: a column of the users'
    strings stays strings, which typed JSONL readers (Arrow, Spark) require; the record's
    `line` names the line."""
    try:
        obj = json.loads(raw)
    except ValueError:
        return None, '"custom_id"' in raw
    if not isinstance(obj, dict):
        return None, False
    return obj.get("custom_id" if _is_openai(obj) else "id"), _is_openai(obj)


def _native(obj: dict, line: int, default_max_tokens: int) -> Request:
    """`default_max_tokens` 0: an embedding job, whose lines take ``dimensions`` and no
    generation keys (max_tokens, sampling)."""
    embedding = default_max_tokens == 0
    generation = {"max_tokens"} | SAMPLING_KEYS
    unknown = set(obj) - {"id", "prompt", "prompt_token_ids", "dimensions"} - generation
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(sorted(unknown))}")
    given = {key for key, value in obj.items() if value is not None}  # null: as if absent
    misplaced = sorted(given & (generation if embedding else {"dimensions"}))
    if misplaced:
        task = "generation, not to embeddings" if embedding else "embeddings (--task embed)"
        raise ValueError(f"{', '.join(misplaced)} appl{'ies' if len(misplaced) == 1 else 'y'} "
                         f"to {task}")
    prompt, ids = obj.get("prompt"), obj.get("prompt_token_ids")
    if (prompt is None) == (ids is None):
        raise ValueError("give exactly one of 'prompt' (text) or 'prompt_token_ids'")
    if prompt is not None and (not isinstance(prompt, str) or not prompt):
        raise ValueError("'prompt' must be a non-empty string")
    if ids is not None:
        _check_ids(ids, "'prompt_token_ids'")
    request = Request(line, obj.get("id"), "native", [prompt if ids is None else ids])
    if embedding:
        request.max_tokens, request.dimensions = 0, _dimensions(obj)
    else:
        request.sampling = {"temperature": 0.0, **{k: obj[k] for k in SAMPLING_KEYS & set(obj)}}
        request.max_tokens = _positive(obj.get("max_tokens", default_max_tokens), "max_tokens")
    return request


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
        request.max_tokens, request.dimensions = 0, _dimensions(body)
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


def _dimensions(obj: dict) -> int | None:
    """An embedding's Matryoshka truncation: a positive integer, or None (the model's)."""
    value = obj.get("dimensions")
    return None if value is None else _positive(value, "dimensions")


def _positive(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"'{name}' must be a positive integer")
    return value


# ---- records --------------------------------------------------------------------------------
# Every record starts with its line number: ``{"line": N`` (this project's lines) or
# ``{"id": "vllm-batch-N"`` (OpenAI batch output lines), which is all a resume reads.
_RECORD_LINE = re.compile(rb'\{"(?:line": |id": "vllm-batch-)(\d+)')


def record_line(raw: bytes) -> int | None:
    """The input line number a JSONL record was written for (None: not a record)."""
    found = _RECORD_LINE.match(raw)
    return None if found is None else int(found.group(1))


def error_record(line: int, raw: str, message: str, replica: int | None = None) -> dict:
    """The record of a line that produced no result (bad input, or refused by vLLM)."""
    rid, openai = _identity(raw, line)
    if openai:
        return {"id": f"vllm-batch-{line}", "custom_id": rid, "line": line,
                "response": {"status_code": 400, "request_id": f"vllm-batch-{line}", "body": None},
                "error": message}
    return {"line": line, "id": rid, "error": message, "replica": replica}


def result_record(request: Request, outs: list, *, embed: bool, replica: int | None,
                  model_name: str, latency: float) -> tuple[dict, int]:
    """The record of a finished request (its vLLM outputs, one per prompt) and the tokens it
    took (prompt + generated)."""
    prompt_tokens = sum(len(o.prompt_token_ids or ()) for o in outs)
    if request.endpoint == "native":
        record = {"line": request.line, "id": request.id, "error": None, "replica": replica,
                  "latency_s": latency}
        if embed:
            record["embedding"] = outs[0].outputs.data.tolist()
        else:
            choices = outs[0].outputs
            record.update(token_ids=list(choices[0].token_ids), text=choices[0].text)
            if request.sampling.get("logprobs") is not None:
                record["logprobs"] = [d[t].logprob for t, d in zip(choices[0].token_ids,
                                                                     choices[0].logprobs)]
            if len(choices) > 1:
                record["choices"] = [{"token_ids": list(c.token_ids), "text": c.text}
                                     for c in choices]
        return record, prompt_tokens + len(record.get("token_ids") or ())
    body, completion = _openai_body(request, outs, prompt_tokens, model_name)
    return {"id": f"vllm-batch-{request.line}", "custom_id": request.id, "line": request.line,
            "response": {"status_code": 200, "request_id": f"vllm-batch-{request.line}",
                         "body": body},
            "error": None}, prompt_tokens + completion


def _openai_body(request: Request, outs: list, prompt_tokens: int, model: str) -> tuple[dict, int]:
    created = int(time.time())
    if request.endpoint == "/v1/embeddings":
        return {"object": "list", "model": model,
                "data": [{"object": "embedding", "index": k, "embedding": o.outputs.data.tolist()}
                         for k, o in enumerate(outs)],
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}, 0
    chat = request.endpoint == "/v1/chat/completions"
    choices, completion = [], 0
    for c in outs[0].outputs:
        completion += len(c.token_ids)
        logprobs = None if c.logprobs is None else _logprobs(c, chat)
        if chat:
            choices.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                            "logprobs": logprobs, "finish_reason": c.finish_reason})
        else:
            choices.append({"index": c.index, "text": c.text, "logprobs": logprobs,
                            "finish_reason": c.finish_reason})
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{request.line}",
            "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion}}, completion


def _logprobs(choice, chat: bool):
    """OpenAI's logprobs shapes: per chosen token, its logprob and the top alternatives."""
    tokens = []
    for token_id, alternatives in zip(choice.token_ids, choice.logprobs):
        chosen = alternatives[token_id]
        top = [(lp.decoded_token or str(t), lp.logprob) for t, lp in alternatives.items() if t != token_id]
        tokens.append((chosen.decoded_token or str(token_id), chosen.logprob, top))
    if chat:
        return {"content": [{"token": tok, "logprob": lp, "bytes": None,
                             "top_logprobs": [{"token": t, "logprob": v} for t, v in top]}
                            for tok, lp, top in tokens]}
    return {"tokens": [t for t, _, _ in tokens], "token_logprobs": [lp for _, lp, _ in tokens],
            "top_logprobs": [{t: v for t, v in top} for _, _, top in tokens], "text_offset": None}


# ---- encoding -------------------------------------------------------------------------------


def parquet_table(records: list[dict]):
    """Records as one Arrow table with the fixed schema (OpenAI-format records keep their line,
    custom_id and error, and the whole output line in the ``openai`` column). An id is its JSON
    text (``"a"``, ``7``: a column of one type whatever the lines give), null where none."""
    import pyarrow as pa

    rows = []
    for r in records:
        if "custom_id" in r:
            r = {"line": r["line"], "id": r["custom_id"], "error": r["error"],
                 "openai": json.dumps({k: v for k, v in r.items() if k != "line"})}
        rid = r.get("id")
        rows.append({**r, "id": None if rid is None else json.dumps(rid, default=str)})
    return pa.Table.from_pylist(rows, schema=_schema())


def _schema():
    import pyarrow as pa

    return pa.schema([  # one schema for every part, so the folder reads as one table
        ("line", pa.int64()), ("id", pa.string()), ("error", pa.string()),
        ("replica", pa.int64()), ("latency_s", pa.float64()),
        ("token_ids", pa.list_(pa.int64())), ("text", pa.string()),
        ("logprobs", pa.list_(pa.float64())),
        ("choices", pa.list_(pa.struct([("token_ids", pa.list_(pa.int64())),
                                         ("text", pa.string())]))),
        ("embedding", pa.list_(pa.float64())), ("openai", pa.string()),
    ])


def encode(records: list[dict], fmt: str):
    """What a replica sends back: JSONL bytes, or an Arrow table for Parquet output."""
    if fmt == "parquet":
        return parquet_table(records)
    for r in records:  # OpenAI output lines carry their line number in their id only
        if "custom_id" in r:
            r.pop("line", None)
    return "".join(json.dumps(r, default=str) + "\n" for r in records).encode()
