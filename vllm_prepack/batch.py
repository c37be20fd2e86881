"""``vllm-prepack batch``: one batch job over N vLLM replicas (Ray actors), dispatched by tokens.

The driver is a loop over a bounded window: it reads the input lazily in blocks
(``batch_input.Feed``), weighs each line from its raw bytes, and hands a unit of about
``unit_tokens`` tokens to whichever replica is free (``dispatch.Dispatcher``), keeping two units
per replica in flight: the engine batches across them and never waits for the driver. Replicas
parse, tokenize, run and encode; the driver appends what comes back (``batch_output``). Its
memory is the window, one input block and a bitmap of committed lines, not the job. A re-run
with the same output resumes; a dead replica's units go to the others.

Why not Ray Data for this path: its streaming executor would give the same bounded memory, but a
dataset's start-up (planning, launching read tasks and an actor pool) costs seconds before the
first row reaches an engine, and its blocks are rows, where dispatch here needs units sized in
tokens going to the replica that is free. This loop starts dispatching after reading the first
lines, at a few microseconds a request (BENCHMARKS.md, Ray section). For jobs already in Ray
Data, ``vllm_prepack.ray_data`` offers the token-aware batching as a stage.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vllm_prepack.argtypes import at_least_one, at_least_zero, json_object, prepack_options
from vllm_prepack.config import plugin_engine_kwargs
from vllm_prepack.batch_input import Feed, Source, is_parquet
from vllm_prepack.batch_output import open_writer
from vllm_prepack.dispatch import ORDERS, Dispatcher
from vllm_prepack.errors import last_exception
from vllm_prepack.replica import UNITS_IN_FLIGHT, connect


class JobError(ValueError):
    """A batch job that cannot start; the message says why and what to do."""


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "vocab.txt", "spiece.model", "tekken.json")


def check_output(output: str | Path) -> None:
    """Raise JobError unless the output is a format the job writes (by its suffix)."""
    if Path(output).suffix not in (".jsonl", ".parquet"):
        raise JobError(f"output {output} must end in .jsonl (one JSON record a line) or .parquet "
                       "(a folder of parts)")


def check_model(model: str, engine_kwargs: dict) -> None:
    """Raise JobError, in one line, before Ray or any replica starts: a model path that does
    not exist, or a local model folder without tokenizer files when the engine would load one."""
    path = Path(model)
    if not path.exists() and (path.is_absolute() or model.startswith(".") or model.count("/") > 1):
        raise JobError(f"model folder {model} does not exist")
    if engine_kwargs.get("skip_tokenizer_init"):
        return
    folder = Path(engine_kwargs.get("tokenizer") or model)
    if folder.is_dir() and not any((folder / name).exists() for name in TOKENIZER_FILES):
        raise JobError(
            f"{folder} has no tokenizer files: add them, or run token-id prompts only with "
            "--engine-args '{\"skip_tokenizer_init\": true}'")


def check_input(source: str | Path) -> None:
    """Raise JobError unless the input exists and, as Parquet (a .parquet file or a folder),
    opens as Parquet: a JSONL file's lines are checked one by one, each bad one an error
    record."""
    path = Path(source)
    if not path.exists():
        raise JobError(f"input {source} does not exist")
    if is_parquet(path):
        import pyarrow as pa
        import pyarrow.dataset as ds

        kind = "a folder of Parquet files" if path.is_dir() else "a Parquet file"
        try:  # every file's footer, as the job will read them
            data = ds.dataset(path, format="parquet")
            data.count_rows()
        except (pa.ArrowInvalid, OSError) as e:
            raise JobError(f"input {source} is not {kind} ({e})") from None
        if not data.files:
            raise JobError(f"input {source} is an empty folder, not {kind}")


TEMPLATE_SUFFIXES = (".jinja", ".jinja2", ".j2", ".txt")


def read_chat_template(value: str) -> str:
    """``--chat-template``: a file's text, or the template itself (or the name of one of the
    tokenizer's templates, which its chat templating resolves). A value that cannot be opened
    but reads as a path (no Jinja braces or newline; a path separator or a template file's
    suffix) is refused, rather than used as the template: every chat line's prompt would be
    its text."""
    try:
        return Path(value).read_text()
    except (OSError, ValueError) as e:
        pathlike = "/" in value or value.endswith(TEMPLATE_SUFFIXES)
        if pathlike and not any(c in value for c in "{}\n"):
            raise JobError(f"chat template {value!r} looks like a file path but cannot be read "
                           f"({getattr(e, 'strerror', None) or e})") from None
        return value


@dataclass
class JobReport:
    """What one run of a job did; ``replicas`` holds each live replica's describe()."""

    written: int  # records written by this run (results and errors)
    skipped: int  # records a previous run had written (resume)
    errors: int  # error records written by this run
    wall_s: float
    replicas: list[dict] = field(default_factory=list)
    retried_units: int = 0
    started_at: float = 0.0  # wall clock, to place replica timelines
    first_dispatch_s: float = 0.0  # start of run_job to the first unit sent
    dispatch_ops: int = 0  # heap operations of the dispatcher
    dispatch_cpu_s: float = 0.0  # the driver's own work: read, weigh, window, units (not Ray)


def run_job(
    source,
    writer,
    replicas: list,
    *,
    max_tokens: int = 16,
    unit_tokens: int = 8192,
    order: str = "longest",
    owner: Callable[[int], int] | None = None,
    window: int = 65536,
    progress: bool = True,
    on_write: Callable[[dict], None] | None = None,
) -> JobReport:
    """Drive Ray actor handles of ``Replica`` over a ``Source``; write every line's record
    exactly once. ``max_tokens``: the default per line, 0 for embeddings. ``window``: most
    requests read ahead."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    started, wall_started = time.perf_counter(), time.time()
    done = writer.committed()
    dispatcher = Dispatcher(len(replicas), unit_tokens, order, owner)
    feed = Feed(source, max_tokens, skip=done)
    bar = _Progress(progress, source)
    refs: dict = {}  # ObjectRef -> unit id
    first_dispatch, dispatch_cpu = None, 0.0

    def fill() -> None:
        limit = 4 * len(dispatcher.alive) * unit_tokens
        while not dispatcher.exhausted and dispatcher.size < window and dispatcher.tokens < limit:
            block = feed.take(limit - dispatcher.tokens, window - dispatcher.size)
            if block is None:
                dispatcher.exhausted = True
            else:
                dispatcher.add(*block)

    def top_up(r: int, limit: int = UNITS_IN_FLIGHT) -> None:
        nonlocal first_dispatch, dispatch_cpu
        while r in dispatcher.alive and dispatcher.pending(r) < limit:
            cpu = time.thread_time()
            fill()
            unit = dispatcher.take(r)
            if unit is None:
                return
            # one bytes object per unit: Ray ships it in one piece, without pickling each line
            lines, payload = unit.lines, b"\n".join(unit.payloads)
            dispatch_cpu += time.thread_time() - cpu
            refs[replicas[r].run.remote(lines, payload, writer.format)] = unit.id
            if first_dispatch is None:
                first_dispatch = time.perf_counter() - started

    def serve(first) -> None:
        """Top up the replicas `first`, then those with room whose pinned lines wait: a
        top-up reads lines pinned to any replica, maybe to one already served."""
        for r in first:
            top_up(r)
        while idle := [r for r in dispatcher.pinned_waiting()
                       if dispatcher.pending(r) < UNITS_IN_FLIGHT]:
            for r in idle:
                top_up(r)

    retried = 0
    try:
        if window < 1:
            raise JobError(f"window must be at least 1 request, got {window}")
        for r in sorted(dispatcher.alive):  # a first unit everywhere before anyone gets a second
            top_up(r, 1)
        serve(sorted(dispatcher.alive))
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            unit = dispatcher.inflight[refs.pop(ready[0])]
            try:
                payload, stats = ray.get(ready[0])
            except RayActorError:
                if unit.replica in dispatcher.alive:
                    retried += dispatcher.lost(unit.replica)  # raises when none is left
                    for ref in [ref for ref, u in refs.items() if u not in dispatcher.inflight]:
                        del refs[ref]  # its other units went back to the pool with it
                serve(sorted(dispatcher.alive))
                continue
            except RayTaskError as e:  # the engine itself failed: stop, resumable
                lines = unit.lines
                raise RuntimeError(f"replica {unit.replica} failed on a unit of lines "
                                   f"{min(lines)}..{max(lines)}: {e.cause!r}; the output holds "
                                   "every finished record, and a re-run resumes") from e
            writer.write(payload)
            dispatcher.done(unit.id)
            bar.update(stats)
            if on_write is not None:
                on_write(stats)
            serve((unit.replica,))
        if not dispatcher.finished:  # serve() leaves no waiting line without a busy replica
            raise RuntimeError(f"the job ended with {dispatcher.size} requests never sent: a "
                               "defect in the driver; the output holds every record written")
    finally:
        writer.close()
        bar.close()
    report = JobReport(
        written=bar.requests, skipped=len(done), errors=bar.errors,
        wall_s=time.perf_counter() - started, retried_units=retried, started_at=wall_started,
        first_dispatch_s=first_dispatch or 0.0, dispatch_ops=dispatcher.ops,
        dispatch_cpu_s=dispatch_cpu,
    )
    report.replicas = ray.get([replicas[r].describe.remote() for r in sorted(dispatcher.alive)])
    return report


class _Progress:
    """One status line on stderr, at most once a second: requests/s, tokens/s, errors, ETA
    (from how much of the input has been read)."""

    def __init__(self, enabled: bool, source):
        self.enabled, self.source = enabled, source
        self.requests = self.errors = self.tokens = 0
        self.t0 = self.shown = time.perf_counter()

    def update(self, stats: dict) -> None:
        self.requests += stats["requests"]
        self.errors += stats["errors"]
        self.tokens += stats["tokens"]
        if self.enabled and time.perf_counter() - self.shown >= 1.0:
            self.show("\r")

    def show(self, end: str) -> None:
        self.shown = now = time.perf_counter()
        elapsed = max(now - self.t0, 1e-9)
        fraction = getattr(self.source, "fraction", 0.0)
        eta = f"{elapsed * (1 - fraction) / fraction:,.0f} s" if 0 < fraction < 1 else "-"
        sys.stderr.write(f"{end}batch: {self.requests:,} done, {self.requests / elapsed:,.1f} req/s, "
                         f"{self.tokens / elapsed:,.0f} tok/s, {self.errors:,} errors, "
                         f"ETA {eta}   ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self.show("\r")
            sys.stderr.write("\n")


def run_batch(
    model: str,
    source: str | Path | list[str],
    output: str | Path,
    *,
    replicas: int = 2,
    task: str = "generate",
    max_tokens: int = 16,
    order: str = "longest",
    engine_kwargs: dict | None = None,
    prepack: dict | bool = True,
    unit_tokens: int = 8192,
    gpus_per_replica: int = 0,
    chat_template: str | None = None,
    progress: bool = True,
    num_cpus: int | None = None,
) -> JobReport:
    """The whole job from Python: start replicas on the current Ray cluster (or a local one of
    `num_cpus`), run, and return the report. `source`: a JSONL or Parquet path, or a list of
    JSON lines; `output`: a .jsonl file or a .parquet folder of parts. Re-running with the same
    output resumes. Bad arguments raise JobError (or PrepackConfigError) before Ray starts; an
    engine that cannot start, JobError naming its error."""
    import ray

    from vllm_prepack.replica import start_replicas

    engine_kwargs = dict(engine_kwargs or {})
    counts = {"replicas": replicas, "unit_tokens": unit_tokens}
    if task == "generate":
        counts["max_tokens"] = max_tokens
    for name, value in counts.items():
        if value < 1:
            raise JobError(f"{name} must be at least 1, got {value}")
    if gpus_per_replica < 0:
        raise JobError(f"gpus_per_replica must be at least 0, got {gpus_per_replica}")
    check_model(model, engine_kwargs)
    check_output(output)
    if isinstance(source, (str, Path)):
        check_input(source)
    plugin_engine_kwargs(engine_kwargs, prepack)  # a bad option fails here, not in the replicas
    writer = open_writer(output)
    started = connect(num_cpus=num_cpus)
    default = max_tokens if task == "generate" else 0
    try:
        actors = start_replicas(model, replicas, task, engine_kwargs, prepack,
                                gpus_per_replica=gpus_per_replica, default_max_tokens=default,
                                chat_template=chat_template)
    except ray.exceptions.RayActorError as e:  # its traceback is in the log above
        if started:
            ray.shutdown()  # the replicas' logs end before the one line
        raise JobError(f"a replica could not start its engine on {model}: "
                       f"{last_exception(str(e))}") from None
    try:
        return run_job(Source(source), writer, actors, max_tokens=default, order=order,
                       unit_tokens=unit_tokens, progress=progress)
    finally:
        actors.stop()


def main(args) -> int:
    """``vllm-prepack batch`` (the CLI gives the embedded demo job when --input is absent)."""
    if args.model is None:
        raise JobError("--model is required with --input")
    template = None if args.chat_template is None else read_chat_template(args.chat_template)
    report = run_batch(args.model, args.input, args.output, replicas=args.replicas, task=args.task,
                       max_tokens=args.max_tokens, order=args.order,
                       engine_kwargs=args.engine_args, unit_tokens=args.unit_tokens,
                       gpus_per_replica=args.gpus_per_replica, chat_template=template,
                       prepack=args.prepack_options or True, num_cpus=args.num_cpus)
    print(json.dumps({
        "output": str(args.output), "written": report.written,
        "skipped (already done)": report.skipped, "errors": report.errors,
        "wall_s": round(report.wall_s, 2), "retried_units": report.retried_units,
        "requests_per_s": round(report.written / max(report.wall_s, 1e-9), 2),
        "replicas": [{k: v for k, v in r.items() if k != "timeline"} for r in report.replicas],
    }, indent=2))
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("--model", help="local model folder, with --input (with neither: the "
                        "embedded demo job on the embedded demo model)")
    parser.add_argument("--input", help="JSONL (this project's lines or the OpenAI batch format) "
                        "or Parquet; default: the embedded demo workload")
    parser.add_argument("--output", default="results.jsonl", help=".jsonl, or .parquet (a folder of parts)")
    parser.add_argument("--replicas", type=at_least_one, default=2,
                        help="vLLM engines the job is spread over, balanced by tokens")
    parser.add_argument("--task", choices=["generate", "embed"], default="generate",
                        help="embed: a pooling model's embeddings instead of generated text")
    parser.add_argument("--max-tokens", type=at_least_one, default=16,
                        help="a request's max_tokens where it sets none")
    parser.add_argument("--order", choices=ORDERS, default="longest",
                        help="which requests go first within the read-ahead window")
    parser.add_argument("--unit-tokens", type=at_least_one, default=8192,
                        help="tokens (prompt + expected output) per unit of work sent to a replica")
    parser.add_argument("--engine-args", type=json_object, default=None,
                        help='JSON object of vLLM engine arguments, passed unchanged, '
                        'e.g. \'{"max_model_len": 2048}\'')
    parser.add_argument("--prepack-options", type=prepack_options, default=None,
                        help="the plugin's options as JSON (default: its defaults)")
    parser.add_argument("--chat-template", help="a chat template (a file, or the template "
                        "itself) for /v1/chat/completions lines, when the tokenizer has none")
    parser.add_argument("--num-cpus", type=at_least_one, default=None,
                        help="for a local Ray cluster (the replicas share them)")
    parser.add_argument("--gpus-per-replica", type=at_least_zero, default=0,
                        help="GPUs each replica reserves; above 1 it runs tensor-parallel")
