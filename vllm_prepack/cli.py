"""The ``vllm-prepack`` command: demo, bench {scheduler,hf,ray,serve}, batch, serve."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

BENCHES = {
    "scheduler": "vllm_prepack.bench.scheduler",
    "hf": "vllm_prepack.bench.hf",
    "ray": "vllm_prepack.bench.ray",
    "serve": "vllm_prepack.bench.serve",
}


class _HelpWithDefaults(argparse.HelpFormatter):
    """Each option's help ends with its default, where it has one (not None, a flag's False,
    an empty value, or one the help already names)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        if (not action.option_strings or default is None or default is False
                or default == argparse.SUPPRESS or "default:" in text or "(default" in text
                or (isinstance(default, (str, list, tuple, dict)) and not default)):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class _Parser(argparse.ArgumentParser):
    """The command's parsers (its subcommands' too: argparse builds them of this class)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpWithDefaults)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vllm-prepack", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log the plugin's decisions (e.g. the fitted step cost) at debug "
                        "level; demo: and show vLLM's logs")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="plain vLLM vs prepack on an embedded model and batch")
    importlib.import_module("vllm_prepack.bench.demo").add_arguments(demo)

    batch = sub.add_parser("batch", help="a token-balanced batch job across vLLM replicas (Ray)")
    importlib.import_module("vllm_prepack.batch").add_arguments(batch)

    serve = sub.add_parser("serve", help="an OpenAI server on Ray Serve: the plugin in every "
                           "replica, routed by tokens")
    importlib.import_module("vllm_prepack.serve").add_arguments(serve)

    bench = sub.add_parser("bench", help="benchmarks; results are markdown for BENCHMARKS.md")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    for name, module in BENCHES.items():
        doc = importlib.import_module(module).__doc__
        p = bench_sub.add_parser(name, help=" ".join(doc.split("\n\n")[0].split()))
        importlib.import_module(module).add_arguments(p)
        p.add_argument("--out", type=Path, help="also write the markdown here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig()
        logging.getLogger("vllm_prepack").setLevel(logging.DEBUG)
    from vllm_prepack.batch import JobError
    from vllm_prepack.config import PrepackConfigError
    from vllm_prepack.serve import AppStartError

    try:
        return _run(args)
    except (JobError, PrepackConfigError, FileNotFoundError, AppStartError) as e:  # the user's to fix
        print(f"vllm-prepack {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = "; what was written stays, and the same command resumes" if args.command == "batch" else ""
        print(f"vllm-prepack {args.command}: interrupted{resume}", file=sys.stderr)
        return 130


def _run(args) -> int:
    """Commands load their modules on demand; this is the one product module that imports
    ``bench`` (for ``demo`` and ``bench``)."""
    if args.command == "demo":
        return importlib.import_module("vllm_prepack.bench.demo").main(args)
    if args.command == "batch":
        if args.input is None:  # the embedded demo job
            if args.model is not None:
                from vllm_prepack.batch import JobError

                raise JobError("--model needs --input (the requests to run on it); with "
                               "neither, the embedded demo job runs")
            importlib.import_module("vllm_prepack.bench.demo").use_demo_job(args)
        return importlib.import_module("vllm_prepack.batch").main(args)
    if args.command == "serve":
        if args.model is None:  # the embedded demo model
            importlib.import_module("vllm_prepack.bench.demo").use_demo_model(args)
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
