"""A batch replica: one vLLM engine with the plugin, run by Ray as an actor.

A replica gets raw input lines, and does the per-request work the driver must not: parsing,
chat templates, tokenization (inside vLLM's ``add_request``), generation or embedding, and
encoding the records, which go back as JSONL bytes or an Arrow table ready to append. Engine
arguments are the user's, unchanged: no test defaults (CUDA graphs stay on where vLLM turns them
on); only the plugin's two arguments are added.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque

from vllm_prepack.batch_record import InputError, Request, encode, error_record, parse, result_record

UNITS_IN_FLIGHT = 2  # per replica: the engine batches across them (see Replica.records)


def in_process_env(core: int | None = None) -> dict[str, str]:
    """Environment for a CPU engine whose core runs in the calling process (a replica steps
    it itself), with a KV cache of VLLM_CPU_KVCACHE_SPACE GiB (1 unless set: vLLM's CPU default
    sizes it from a whole NUMA node) and, with `core`, its threads bound to that core."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    if core is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = str(core)
    return env


def _request_id(tag: int, line: int, k: int) -> str:
    """The engine request id of a line's k-th prompt in the unit admitted as `tag`."""
    return f"{tag}.{line}.{k}"


class _Unit:
    """One call to ``records``: its lines until admitted, its records, its requests still in
    the engine."""

    def __init__(self, lines: list):
        self.lines = lines  # (line, raw) pairs
        self.tag = 0  # set on admission; request ids are tag.line.k (a line may come again)
        self.records: list[dict] = []
        self.tokens = 0  # prompt and generated tokens of its finished requests
        self.waiting: dict[int, list] = {}  # line -> [request, submitted at, outputs]


class Replica:
    """``ray.remote(Replica)``; ``run`` takes a unit of raw lines and returns (payload, stats)."""

    def __init__(self, model: str, task: str, engine_kwargs: dict, prepack: dict | bool, index: int,
                 *, default_max_tokens: int = 16,
                 chat_template: str | None = None):
        from vllm import LLM

        from vllm_prepack.config import plugin_engine_kwargs

        kwargs = plugin_engine_kwargs(engine_kwargs, prepack)
        if task == "embed":
            kwargs.setdefault("runner", "pooling")
        self.llm = LLM(model=str(model), **kwargs)
        self.model_name = str(kwargs.get("served_model_name") or model)
        self.tokenizer = None if kwargs.get("skip_tokenizer_init") else self.llm.get_tokenizer()
        self.index, self.task = index, task
        self.default_max_tokens = default_max_tokens if task == "generate" else 0
        self.chat_template = chat_template
        self.busy = 0.0
        self.timeline: list[tuple[float, float]] = []  # wall-clock (start, end) of busy spans
        self._lock = threading.Lock()  # one engine, units from several threads
        self._inbox: deque[_Unit] = deque()  # units not yet in the engine
        self._units: dict[int, _Unit] = {}  # tag -> a unit in the engine
        self._tags = 0
        self.peak_units = 0  # most units in the engine at once
        self._since = (0.0, 0.0)

    def describe(self) -> dict:
        from vllm_prepack import plugin
        from vllm_prepack.touchpoints import engine_scheduler

        scheduler = engine_scheduler(self.llm)
        return {
            "replica": self.index,
            "pid": os.getpid(),
            "scheduler": type(scheduler).__name__ if scheduler is not None else None,
            "plugin_registered": plugin._registered,
            "busy_s": self.busy,
            "peak_units": self.peak_units,
            "timeline": list(self.timeline),
        }

    def run(self, lines: list[int], raw: bytes, output: str = "jsonl"):
        """Records for every line of a unit (its raw lines joined by newlines), encoded for the
        `output` format, and counts."""
        records, tokens = self.records(zip(lines, raw.decode("utf-8", errors="replace").split("\n")))
        stats = {"requests": len(records), "errors": sum(1 for r in records if r.get("error")),
                 "tokens": tokens}
        return encode(records, output), stats

    def records(self, unit) -> tuple[list[dict], int]:
        """One record per (line, raw) of `unit`, in the order requests finish, and the tokens
        its requests took. Calls overlap (a
        threaded actor, UNITS_IN_FLIGHT of them) over the one engine: a call leaves its unit in
        an inbox, and whichever call holds the lock admits every unit waiting there, then steps
        the engine for all. So the engine batches across units, never drains to a unit's last
        request while the next waits, and a new unit goes in at the next step."""
        mine = _Unit(list(unit))
        self._inbox.append(mine)
        try:
            while True:
                with self._lock:
                    self._admit()
                    if not mine.waiting:
                        return mine.records, mine.tokens
                    if not self.llm.llm_engine.has_unfinished_requests():
                        raise RuntimeError(f"the engine lost {len(mine.waiting)} requests")
                    self._step()
        finally:
            with self._lock:
                self._end_unit(mine)

    def _admit(self) -> None:
        """Every unit in the inbox into the engine; a line vLLM refuses becomes its error record."""
        while self._inbox:
            unit = self._inbox.popleft()
            if not self._units:
                self._since = (time.perf_counter(), time.time())
            self._tags += 1
            unit.tag = self._tags
            self._units[unit.tag] = unit
            self.peak_units = max(self.peak_units, len(self._units))
            for line, raw in unit.lines:
                try:
                    self._submit(line, raw, unit)
                except Exception as e:  # vLLM names the cause (too long, bad token id, ...)
                    cause = (str(e) if isinstance(e, InputError)
                             else f"line {line}: {type(e).__name__}: {e}")
                    unit.records.append(error_record(line, raw, cause, self.index))
            unit.lines = []

    def _submit(self, line: int, raw: str, unit: _Unit) -> None:
        engine = self.llm.llm_engine
        request = parse(raw, line, self.default_max_tokens)
        params, prompts = self._params(request), self._prompts(request)
        ids = [_request_id(unit.tag, line, k) for k in range(len(prompts))]
        try:
            for rid, prompt in zip(ids, prompts):
                engine.add_request(rid, prompt, params)
        except Exception:
            engine.abort_request(ids)
            raise
        unit.waiting[line] = [request, time.perf_counter(), [None] * len(prompts)]

    def _step(self) -> None:
        """One engine step; each finished request goes to the unit that submitted it."""
        for out in self.llm.llm_engine.step():
            if not out.finished:
                continue
            tag, line, k = map(int, out.request_id.split("."))  # _request_id's parts
            unit = self._units.get(tag)
            if unit is None:  # its call failed and left (its requests were aborted)
                continue
            entry = unit.waiting[line]
            entry[2][k] = out
            if all(o is not None for o in entry[2]):
                del unit.waiting[line]
                record, tokens = result_record(
                    entry[0], entry[2], embed=self.task == "embed", replica=self.index,
                    model_name=self.model_name, latency=time.perf_counter() - entry[1])
                unit.records.append(record)
                unit.tokens += tokens

    def _end_unit(self, unit: _Unit) -> None:
        """A call leaves: its requests still in the engine (a failure) are aborted. Busy time is
        the union of the units' spans: time with at least one unit in."""
        if unit in self._inbox:
            self._inbox.remove(unit)
        if self._units.pop(unit.tag, None) is None:
            return
        if unit.waiting:
            self.llm.llm_engine.abort_request(
                [_request_id(unit.tag, line, k) for line, entry in unit.waiting.items()
                 for k, out in enumerate(entry[2]) if out is None])
        if not self._units:
            self.busy += time.perf_counter() - self._since[0]
            self.timeline.append((self._since[1], time.time()))

    # ---- one request ------------------------------------------------------------------------

    def _params(self, request: Request):
        from vllm import PoolingParams, SamplingParams

        embeds = request.endpoint == "/v1/embeddings" or (
            request.endpoint == "native" and self.task == "embed")
        if embeds != (self.task == "embed"):
            need = "--task embed" if embeds else "--task generate"
            raise InputError(f"line {request.line}: {request.endpoint} needs a job run with {need}")
        if embeds:
            return PoolingParams(task="embed", dimensions=request.dimensions)
        from vllm.sampling_params import RequestOutputKind

        extra = {} if self.tokenizer is not None else {"detokenize": False}
        try:
            return SamplingParams(max_tokens=request.max_tokens, **request.sampling, **extra,
                                  output_kind=RequestOutputKind.FINAL_ONLY)  # all n choices at once
        except (TypeError, ValueError) as e:  # a value of the wrong type or out of range
            given = ", ".join(f"{k}={v!r}" for k, v in request.sampling.items())
            raise InputError(f"line {request.line}: bad sampling parameters ({given}): {e}") from None

    def _prompts(self, request: Request) -> list:
        if request.messages is not None:
            if self.tokenizer is None:
                raise InputError(f"line {request.line}: chat needs the model's tokenizer")
            ids = self.tokenizer.apply_chat_template(
                [_text_message(m) for m in request.messages], tokenize=True,
                add_generation_prompt=True, chat_template=self.chat_template)
            return [{"prompt_token_ids": list(ids["input_ids"] if hasattr(ids, "keys") else ids)}]
        prompts = []
        for p in request.prompts:
            if isinstance(p, str) and self.tokenizer is None:
                raise InputError(f"line {request.line}: a text prompt, but the model has no tokenizer "
                                 "(skip_tokenizer_init): give token ids")
            prompts.append(p if isinstance(p, str) else {"prompt_token_ids": p})
        return prompts


def _text_message(message: dict) -> dict:
    """Content given as a list of parts becomes its text (a text-only job)."""
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return {**message, "content": content}


class ReplicaSet(list):
    """The actor handles of started replicas (indexable like a list), owning the placement
    groups of tensor-parallel ones: ``stop()`` kills the actors and gives the groups back (a
    killed actor's group stays reserved otherwise, and the next job on the cluster would wait
    for its GPUs)."""

    def __init__(self, actors=(), groups=()):
        super().__init__(actors)
        self.groups = list(groups)

    def stop(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self:
            ray.kill(actor)
        for group in self.groups:
            remove_placement_group(group)
        self.clear()
        self.groups.clear()


def connect(address: str | None = None, num_cpus: float | None = None) -> bool:
    """Join the Ray cluster at `address`, or start a local one of `num_cpus` logical CPUs (None:
    the machine's cores), unless Ray is up; whether this call started or joined it."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False)
    return True


def start_replicas(model: str, n: int, task: str, engine_kwargs: dict, prepack: dict | bool = True,
                   *, num_cpus: float | None = None, gpus_per_replica: int = 0,
                   env: dict | None = None, replica_cls=Replica, **options) -> ReplicaSet:
    """N Ray actors, one engine each, started in parallel. On CPU each engine gets its own core
    (threads bound to it). With GPUs each replica reserves `gpus_per_replica` GPUs; above one it
    runs tensor-parallel (vLLM's Ray executor) inside a placement group of that many GPUs.
    `num_cpus`: each replica's Ray CPUs; default: its share of the cluster's, at most one (a
    cluster given fewer CPUs than the replicas still starts them all).
    `env`: environment variables for every replica, over these defaults."""
    import ray

    cores = os.cpu_count() or 1
    connect()
    if num_cpus is None:
        num_cpus = min(1.0, ray.cluster_resources().get("CPU", 0.0) / n)
    replicas = ReplicaSet()
    for i in range(n):
        kwargs, opts = dict(engine_kwargs), {}
        defaults = {}
        if gpus_per_replica == 0:
            defaults = in_process_env(core=i % cores)
        elif gpus_per_replica == 1:
            opts["num_gpus"] = 1
        else:
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            kwargs.setdefault("tensor_parallel_size", gpus_per_replica)
            kwargs.setdefault("distributed_executor_backend", "ray")
            group = placement_group([{"GPU": 1, "CPU": 1}] * gpus_per_replica, strategy="STRICT_PACK")
            replicas.groups.append(group)
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                group, placement_group_capture_child_tasks=True)
        replicas.append(ray.remote(replica_cls).options(
            num_cpus=num_cpus,
            max_restarts=0, max_concurrency=UNITS_IN_FLIGHT + 1,  # + describe()
            runtime_env={"env_vars": {**defaults, **(env or {})}}, **opts,
        ).remote(model, task, kwargs, prepack, i, **options))
    try:
        ray.get([a.describe.remote() for a in replicas])  # engines are up
    except BaseException:  # one could not start (or Ctrl-C): the others go too
        replicas.stop()
        raise
    return replicas
