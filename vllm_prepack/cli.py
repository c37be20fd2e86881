"""The ``vllm-prepack`` command: demo, bench {scheduler,hf,ray,serve}, batch, serve."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

BENCHES = {
    "scheduler": "vllm_prepack.bench.scheduler",
    "hf": "vllm_prepack.bench.hf",
    "ray": "vllm_prepack.bench.ray",
    "serve": "vllm_prepack.bench.serve",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-prepack", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="plain vLLM vs prepack on an embedded model and batch")
    importlib.import_module("vllm_prepack.demo").add_arguments(demo)

    batch = sub.add_parser("batch", help="a token-balanced batch job across vLLM replicas (Ray)")
    importlib.import_module("vllm_prepack.batch").add_arguments(batch)

    serve = sub.add_parser("serve", help="an OpenAI server on Ray Serve: the plugin in every "
                           "replica, routed by tokens")
    importlib.import_module("vllm_prepack.serve").add_arguments(serve)

    bench = sub.add_parser("bench", help="benchmarks; results are markdown for BENCHMARKS.md")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    for name, module in BENCHES.items():
        p = bench_sub.add_parser(name, help=importlib.import_module(module).__doc__.splitlines()[0])
        importlib.import_module(module).add_arguments(p)
        p.add_argument("--out", type=Path, help="also write the markdown here")

    args = parser.parse_args(argv)
    if args.command == "demo":
        return importlib.import_module("vllm_prepack.demo").main(args)
    if args.command == "batch":  # without --input: the demo's embedded job
        demo_job = importlib.import_module("vllm_prepack.demo").demo_job
        return importlib.import_module("vllm_prepack.batch").main(args, demo_job)
    if args.command == "serve":
        return importlib.import_module("vllm_prepack.serve").main(args)
    if args.command == "bench":
        text = importlib.import_module(BENCHES[args.bench]).main(args)
        print(text)
        if args.out:
            args.out.write_text(text)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
