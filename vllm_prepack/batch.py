"""``vllm-prepack batch``: one batch job over N vLLM replicas (Ray actors), balanced by tokens.

Each replica is a Ray actor hosting one vLLM engine with the plugin on. The driver weighs every
request by its expected tokens (prompt + max_tokens), partitions the job into balanced shards
(``balance.partition``), streams each shard to its replica in chunks, and lets a replica whose
shard is done steal the tail of the heaviest remaining shard, so none idles while another has a
queue. Results are written as they arrive; a re-run with the same output skips what is there
(nothing lost, nothing duplicated); a replica that dies has its chunks retried elsewhere; a bad
input line becomes an error record naming the line and the cause.

Input (JSONL): {"id"?: any, "prompt": str | "prompt_token_ids": [int], "max_tokens"?: int}
Output (JSONL, or Parquet parts when the path ends in .parquet and pyarrow is installed):
{"id", "line", "token_ids" | "embedding", "text", "error", "replica", "latency_s"}
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from vllm_prepack.balance import partition, round_robin, row_shards

POLICIES = ("tokens", "rows", "round-robin")


@dataclass
class Item:
    id: object
    line: int
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    max_tokens: int = 16
    weight: float = 0.0


def parse_lines(lines: Iterable[str], default_max_tokens: int, task: str) -> tuple[list[Item], list[dict]]:
    """Items, and an error record for each line that cannot become a request."""
    items, errors, seen = [], [], set()
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        obj = None
        try:
            obj = json.loads(raw)
            if not isinstance(obj, dict):
                raise ValueError("a line must be a JSON object")
            item = _item(obj, number, default_max_tokens, task)
        except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
            item_id = obj.get("id", number) if isinstance(obj, dict) else number
            errors.append(error_record(item_id, number, f"line {number}: {e}"))
            continue
        key = json.dumps(item.id, sort_keys=True, default=str)
        if key in seen:
            errors.append(error_record(None, number, f"line {number}: duplicate id {item.id!r}"))
            continue
        seen.add(key)
        items.append(item)
    return items, errors


def _item(obj: dict, number: int, default_max_tokens: int, task: str) -> Item:
    unknown = set(obj) - {"id", "prompt", "prompt_token_ids", "max_tokens"}
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(sorted(unknown))}")
    prompt, ids = obj.get("prompt"), obj.get("prompt_token_ids")
    if (prompt is None) == (ids is None):
        raise ValueError("give exactly one of 'prompt' (text) or 'prompt_token_ids'")
    if prompt is not None and (not isinstance(prompt, str) or not prompt):
        raise ValueError("'prompt' must be a non-empty string")
    if ids is not None and (
        not isinstance(ids, list) or not ids
        or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids)
    ):
        raise ValueError("'prompt_token_ids' must be a non-empty list of non-negative ints")
    max_tokens = obj.get("max_tokens", default_max_tokens)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError("'max_tokens' must be a positive integer")
    return Item(obj.get("id", number), number, prompt, ids, max_tokens if task == "generate" else 0)


def error_record(item_id, line: int, message: str) -> dict:
    return {"id": item_id, "line": line, "error": message}


# ---- the replica ---------------------------------------------------------------------------


class Replica:
    """One vLLM engine with the plugin; Ray runs it as an actor (``ray.remote(Replica)``)."""

    def __init__(self, model: str, task: str, engine_kwargs: dict, prepack: dict | bool, index: int):
        from vllm_prepack.engine import build_llm

        self.index = index
        self.task = task
        kwargs = dict(engine_kwargs)
        if task == "embed":
            kwargs.setdefault("runner", "pooling")
        self.llm = build_llm(model, prepack, **kwargs)
        self.busy = 0.0
        self.timeline: list[tuple[float, float]] = []  # wall-clock (start, end) of each chunk

    def describe(self) -> dict:
        from vllm_prepack import plugin
        from vllm_prepack.engine import engine_scheduler

        scheduler = engine_scheduler(self.llm)
        return {
            "replica": self.index,
            "pid": os.getpid(),
            "scheduler": type(scheduler).__name__ if scheduler is not None else None,
            "plugin_registered": plugin._registered,
            "busy_s": self.busy,
            "timeline": list(self.timeline),
        }

    def run(self, items: list[Item]) -> list[dict]:
        from vllm import PoolingParams, SamplingParams

        start, wall_start = time.perf_counter(), time.time()
        engine = self.llm.llm_engine
        records: dict[str, dict] = {}
        submitted: dict[str, float] = {}
        for item in items:
            rid = f"{item.line}"
            record = {"id": item.id, "line": item.line, "error": None, "replica": self.index}
            records[rid] = record
            if self.task == "embed":
                params = PoolingParams(task="embed")
            else:
                params = SamplingParams(max_tokens=item.max_tokens, temperature=0)
            prompt = item.prompt if item.prompt is not None else {"prompt_token_ids": item.prompt_token_ids}
            try:
                engine.add_request(rid, prompt, params)
                submitted[rid] = time.perf_counter()
            except Exception as e:  # vLLM names the cause (too long, bad token id, ...)
                record["error"] = f"line {item.line}: {type(e).__name__}: {e}"
        while engine.has_unfinished_requests():
            for out in engine.step():
                if not out.finished:
                    continue
                record = records[out.request_id]
                record["latency_s"] = time.perf_counter() - submitted[out.request_id]
                if self.task == "embed":
                    record["embedding"] = out.outputs.data.tolist()
                else:
                    record["token_ids"] = list(out.outputs[0].token_ids)
                    record["text"] = out.outputs[0].text
        self.busy += time.perf_counter() - start
        self.timeline.append((wall_start, time.time()))
        return [records[f"{item.line}"] for item in items]


# ---- output ---------------------------------------------------------------------------------


class Writer:
    """Appends records as they arrive; knows what a previous run already wrote."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.parquet = self.path.suffix == ".parquet"
        if self.parquet:
            import pyarrow  # noqa: F401  (fail early with a clear ImportError)

            self.path.mkdir(parents=True, exist_ok=True)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._part = len(list(self.path.glob("part-*.parquet"))) if self.parquet else 0

    def done_lines(self) -> set[int]:
        """Lines with a record already written (a torn last JSONL line is dropped)."""
        if self.parquet:
            import pyarrow.parquet as pq

            return {
                line for part in sorted(self.path.glob("part-*.parquet"))
                for line in pq.read_table(part, columns=["line"]).column("line").to_pylist()
            }
        if not self.path.exists():
            return set()
        done, keep = set(), []
        with self.path.open() as f:
            for raw in f:
                try:
                    done.add(json.loads(raw)["line"])
                    keep.append(raw if raw.endswith("\n") else raw + "\n")
                except (ValueError, KeyError):
                    break  # an interrupted write: rewrite the file without it
        with self.path.open("w") as f:
            f.writelines(keep)
        return done

    def write(self, records: list[dict]) -> None:
        if not records:
            return
        if self.parquet:
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = pa.schema([  # one schema for every part, so the folder reads as one table
                ("id", pa.string()), ("line", pa.int64()), ("error", pa.string()),
                ("replica", pa.int64()), ("latency_s", pa.float64()),
                ("token_ids", pa.list_(pa.int64())), ("text", pa.string()),
                ("embedding", pa.list_(pa.float64())),
            ])
            rows = [{**r, "id": json.dumps(r.get("id"), default=str)} for r in records]
            tmp = self.path / f".part-{self._part:06d}.tmp"
            pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
            tmp.rename(self.path / f"part-{self._part:06d}.parquet")
            self._part += 1
            return
        with self.path.open("a") as f:
            for r in records:
                f.write(json.dumps(r, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())


# ---- the driver -----------------------------------------------------------------------------


@dataclass
class JobReport:
    """What one run of a job did; ``replicas`` holds each live replica's describe()."""

    written: int  # records written by this run (results and errors)
    skipped: int  # records a previous run had written (resume)
    errors: int  # error records written by this run
    wall_s: float
    replicas: list[dict] = field(default_factory=list)
    retried_chunks: int = 0
    started_at: float = 0.0  # wall clock, to place replica timelines


def estimate_weights(items: list[Item], tokenizer=None) -> None:
    for item in items:
        if item.prompt_token_ids is not None:
            prompt_tokens = len(item.prompt_token_ids)
        elif tokenizer is not None:
            prompt_tokens = len(tokenizer(item.prompt)["input_ids"])
        else:
            prompt_tokens = max(1, len(item.prompt) // 4)
        item.weight = float(prompt_tokens + item.max_tokens)


def shard(items: list[Item], replicas: int, policy: str) -> list[list[Item]]:
    if policy == "tokens":
        groups = partition([it.weight for it in items], replicas)
    elif policy == "rows":
        groups = row_shards(len(items), replicas)
    elif policy == "round-robin":
        groups = round_robin(len(items), replicas)
    else:
        raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
    return [[items[i] for i in g] for g in groups]


class _Queues:
    """Per-replica work queues; a replica with none left steals the tail of the heaviest one.
    Chunks shrink as a queue drains, so the work still in flight at the end is small."""

    def __init__(self, shards: list[list[Item]], chunk_tokens: int, steal: bool):
        # light items first: a replica's last chunks are its lightest, so a thief takes little
        self.queues = [deque(sorted(s, key=lambda it: it.weight, reverse=True)) for s in shards]
        self.chunk_tokens = chunk_tokens
        self.steal = steal

    @staticmethod
    def _tokens(queue) -> float:
        return sum(it.weight for it in queue)

    def weight(self, q: int) -> float:
        return self._tokens(self.queues[q])

    def next_chunk(self, q: int, idle: bool) -> list[Item]:
        """The next chunk for replica q; an idle replica with an empty shard steals."""
        own = self.queues[q]
        take = own.popleft  # own shard: heaviest first
        peek = lambda: own[0]  # noqa: E731
        source = own
        if not own and idle and self.steal:
            donors = [d for d in range(len(self.queues)) if self.queues[d]]
            if donors:
                source = self.queues[max(donors, key=self.weight)]
                take, peek = source.pop, (lambda: source[-1])  # steal the lightest tail
        # guided self-scheduling: chunks shrink with what is left (half of it, within
        # [chunk_tokens / 4, chunk_tokens]), so the last ones are small and replicas end together
        limit = min(self.chunk_tokens, max(self.chunk_tokens / 4, self._tokens(source) / 2))
        chunk, tokens = [], 0.0
        while source and (not chunk or tokens + peek().weight <= limit):
            item = take()
            chunk.append(item)
            tokens += item.weight
        return chunk

    def requeue(self, items: list[Item], alive: list[int]) -> None:
        target = min(alive, key=self.weight)
        self.queues[target].extend(items)

    def drain_to(self, dead: int, alive: list[int]) -> None:
        items = list(self.queues[dead])
        self.queues[dead].clear()
        for item in items:
            self.queues[min(alive, key=self.weight)].append(item)


def run_job(
    items: list[Item],
    writer: Writer,
    replicas: list,
    *,
    policy: str = "tokens",
    chunk_tokens: int = 8192,
    prior_errors: Iterable[dict] = (),
    progress: bool = True,
    on_write: Callable[[list[dict]], None] | None = None,
) -> JobReport:
    """Drive Ray actor handles of ``Replica`` over `items`; write every record exactly once."""
    import ray
    from ray.exceptions import RayActorError

    started, wall_started = time.perf_counter(), time.time()
    done = writer.done_lines()
    skipped = len(done)
    errors = [e for e in prior_errors if e["line"] not in done]
    writer.write(errors)
    done |= {e["line"] for e in errors}
    todo = [it for it in items if it.line not in done]
    # several chunks per replica, so that the tail can be shared out
    chunk_tokens = min(chunk_tokens, max(1.0, sum(it.weight for it in todo) / (8 * len(replicas))))
    queues = _Queues(shard(todo, len(replicas), policy), chunk_tokens, steal=policy == "tokens")
    alive = list(range(len(replicas)))
    inflight: dict = {}
    retried = 0
    bar = _progress(len(todo), progress)

    def pending(r: int) -> int:
        return sum(1 for rr, _ in inflight.values() if rr == r)

    def top_up(r: int) -> None:
        """Keep one chunk running and one queued on replica r: no idle gap between chunks."""
        while pending(r) < 2:
            chunk = queues.next_chunk(r, idle=pending(r) == 0)
            if not chunk:
                return
            inflight[replicas[r].run.remote(chunk)] = (r, chunk)

    for r in alive:  # a first chunk everywhere before anyone queues a second
        if pending(r) == 0 and (chunk := queues.next_chunk(r, idle=False)):
            inflight[replicas[r].run.remote(chunk)] = (r, chunk)
    for r in alive:
        top_up(r)
    written, failed = len(errors), len(errors)
    while inflight:
        ready, _ = ray.wait(list(inflight), num_returns=1)
        r, chunk = inflight.pop(ready[0])
        try:
            records = ray.get(ready[0])
        except RayActorError:
            if r in alive:
                alive.remove(r)
                if not alive:
                    raise RuntimeError("every replica died; the output holds what finished") from None
                queues.drain_to(r, alive)
            queues.requeue(chunk, alive)
            retried += 1
            for other in alive:
                top_up(other)
            continue
        fresh = [rec for rec in records if rec["line"] not in done]
        writer.write(fresh)
        done |= {rec["line"] for rec in fresh}
        written += len(fresh)
        failed += sum(1 for rec in fresh if rec.get("error"))
        if on_write is not None:
            on_write(fresh)
        bar.update(len(fresh), sum(len(rec.get("token_ids") or ()) for rec in fresh)
                   + sum(it.weight - it.max_tokens for it in chunk))
        if r in alive:
            top_up(r)
    bar.close()
    report = JobReport(
        written=written, skipped=skipped, errors=failed,
        wall_s=time.perf_counter() - started, retried_chunks=retried,
        started_at=wall_started,
    )
    report.replicas = [ray.get(replicas[r].describe.remote()) for r in alive]
    return report


class _progress:
    """A tqdm bar with requests/s and tokens/s (a no-op when disabled)."""

    def __init__(self, total: int, enabled: bool):
        self.bar, self.tokens, self.t0 = None, 0.0, time.perf_counter()
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="req", desc="batch")

    def update(self, n: int, tokens: float) -> None:
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(tok_s=f"{self.tokens / (time.perf_counter() - self.t0):,.0f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def start_replicas(model: str, n: int, task: str, engine_kwargs: dict, prepack: dict | bool = True,
                   *, num_cpus: float | None = None, num_gpus: float = 0):
    """N Ray actors, one engine each. On CPU each engine gets its own core (threads bound to it);
    on GPUs give each replica num_gpus (its tensor-parallel size)."""
    import ray

    cores = os.cpu_count() or 1
    actors = []
    for i in range(n):
        env = {
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            "VLLM_CPU_OMP_THREADS_BIND": str(i % cores),
        }
        actor = ray.remote(Replica).options(
            num_cpus=num_cpus if num_cpus is not None else min(1.0, cores / n),
            num_gpus=num_gpus,
            max_restarts=0,
            runtime_env={"env_vars": env},
        ).remote(model, task, engine_kwargs, prepack, i)
        actors.append(actor)
    ray.get([a.describe.remote() for a in actors])  # engines are up
    return actors


def run_batch(
    model: str,
    lines: Iterable[str],
    output: str | Path,
    *,
    replicas: int = 2,
    task: str = "generate",
    max_tokens: int = 16,
    policy: str = "tokens",
    engine_kwargs: dict | None = None,
    prepack: dict | bool = True,
    chunk_tokens: int = 8192,
    gpus_per_replica: float = 0,
    progress: bool = True,
) -> JobReport:
    """The whole job from Python: parse, weigh, start replicas on the current Ray cluster (or a
    local one), run, and return the report. Re-running with the same output resumes."""
    import ray

    items, bad = parse_lines(lines, max_tokens, task)
    estimate_weights(items, _tokenizer(model))
    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    actors = start_replicas(model, replicas, task, engine_kwargs or {}, prepack,
                            num_gpus=gpus_per_replica)
    try:
        return run_job(items, Writer(Path(output)), actors, policy=policy,
                       chunk_tokens=chunk_tokens, prior_errors=bad, progress=progress)
    finally:
        for actor in actors:
            ray.kill(actor)


def main(args) -> int:
    import ray

    engine_kwargs = json.loads(args.engine_args) if args.engine_args else {}
    if args.input is None:
        from vllm_prepack.demo import demo_job

        model, lines, engine_kwargs = demo_job(engine_kwargs)
    else:
        model, lines = args.model, Path(args.input).read_text().splitlines()
        if model is None:
            raise SystemExit("--model is required with --input")
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, ignore_reinit_error=True)
    report = run_batch(model, lines, args.output, replicas=args.replicas, task=args.task,
                       max_tokens=args.max_tokens, policy=args.policy, engine_kwargs=engine_kwargs,
                       chunk_tokens=args.chunk_tokens, gpus_per_replica=args.gpus_per_replica)
    print(json.dumps({
        "output": str(args.output), "written": report.written,
        "skipped (already done)": report.skipped, "errors": report.errors,
        "wall_s": round(report.wall_s, 2), "retried_chunks": report.retried_chunks,
        "replicas": [{k: v for k, v in r.items() if k != "timeline"} for r in report.replicas],
    }, indent=2))
    return 0


def _tokenizer(model: str):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model)
    except Exception:  # token-id prompts need none; text prompts are then estimated
        return None


def add_arguments(parser) -> None:
    parser.add_argument("--model", help="local model folder (default: the embedded demo model)")
    parser.add_argument("--input", help="JSONL input (default: the embedded demo workload)")
    parser.add_argument("--output", default="results.jsonl", help=".jsonl, or .parquet (a folder of parts)")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--task", choices=["generate", "embed"], default="generate")
    parser.add_argument("--max-tokens", type=int, default=16, help="default per request")
    parser.add_argument("--policy", choices=POLICIES, default="tokens")
    parser.add_argument("--chunk-tokens", type=int, default=8192)
    parser.add_argument("--engine-args", help='JSON object of vLLM engine arguments, e.g. \'{"max_model_len": 2048}\'')
    parser.add_argument("--num-cpus", type=int, default=None, help="for a local Ray cluster")
    parser.add_argument("--gpus-per-replica", type=float, default=0,
                        help="GPUs each replica reserves (its tensor-parallel size); 0 on CPU")
