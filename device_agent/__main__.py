"""``python -m device_agent info|bench|eval|profile|hash``: one JSON document on stdout, always.

Failures are ``{"error": "...", "kind": "..."}`` with exit status 1 (2 for usage errors), so the
host can tell a missing runtime from a corrupt model or a wrong input without parsing prose.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from . import __version__
from .errors import AgentError

SCHEMA_VERSION = 1


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise AgentError("usage", message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m device_agent", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="info|bench|eval|profile|hash")
    sub.add_parser("info", help="device and TFLite runtime facts")
    bench = sub.add_parser("bench", help="latency of one model")
    bench.add_argument("model")
    bench.add_argument("--warmup", type=int, default=10)
    bench.add_argument("--runs", type=int, default=100)
    bench.add_argument("--threads", type=int, default=4)
    bench.add_argument("--input", default=None, help=".npy input (default: random data of the right dtype and shape)")
    bench.add_argument("--no-xnnpack", action="store_true", help="plain builtin kernels instead of the XNNPACK delegate")
    bench.add_argument("--seed", type=int, default=0)
    ev = sub.add_parser("eval", help="each output reduced (argmax: the top-1 index) or written whole, and an outputs digest")
    ev.add_argument("model")
    ev.add_argument("--samples", required=True, help=".npz with 'x' (N, ...) and optional 'labels' (N,)")
    ev.add_argument("--threads", type=int, default=4)
    ev.add_argument("--no-xnnpack", action="store_true")
    ev.add_argument("--reduce", default="argmax", help="named reducer applied to each output (argmax), or none")
    ev.add_argument("--outputs", default=None, help="folder to write every output of every sample to (output_K.npy, float32)")
    pr = sub.add_parser("profile", help="several models timed in alternating rounds (per-layer costs by difference)")
    pr.add_argument("models", nargs="+")
    pr.add_argument("--warmup", type=int, default=3)
    pr.add_argument("--runs", type=int, default=10, help="timed runs per model per round")
    pr.add_argument("--rounds", type=int, default=3)
    pr.add_argument("--threads", type=int, default=4)
    pr.add_argument("--no-xnnpack", action="store_true")
    hs = sub.add_parser("hash", help="sha256 of a file")
    hs.add_argument("path")
    hs.add_argument("--load-if", metavar="SHA256", default=None,
                    help="when the file has this sha256, also load it as a TFLite model (builtin kernels): model_invalid if it cannot be")
    return parser


def _envelope(kind: str) -> dict:
    from .facts import device_facts
    from .runtime import runtime_facts

    return {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "agent_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": device_facts(),
        "runtime": runtime_facts(check_import=kind == "info"),
    }


def run(argv: list) -> dict:
    args = _parser().parse_args(argv)
    if args.command is None:
        raise AgentError("usage", "a command is required: info, bench, eval, profile or hash")
    if args.command == "hash":
        from .measure import sha256_file

        if not os.path.isfile(args.path):
            raise AgentError("model_missing", "%s: no such file" % args.path)
        from .runtime import runtime_facts

        result = {"schema_version": SCHEMA_VERSION, "kind": "hash", "path": args.path,
                  "sha256": sha256_file(args.path), "size_bytes": os.path.getsize(args.path), "runtime": runtime_facts()}
        if args.load_if == result["sha256"]:  # what deploy checks before a file may replace a deployed model
            from .runtime import load_interpreter

            load_interpreter(args.path, 1, xnnpack=False)  # (interpreter, kernels): loading is the check
            result["loaded_by"] = result["runtime"]
        return result
    result = _envelope(args.command)
    if args.command == "bench":
        from .measure import bench

        result.update(bench(args.model, warmup=args.warmup, runs=args.runs, threads=args.threads,
                            xnnpack=not args.no_xnnpack, input_path=args.input, seed=args.seed))
    elif args.command == "profile":
        from .measure import profile

        result.update(profile(args.models, warmup=args.warmup, runs=args.runs, rounds=args.rounds, threads=args.threads,
                              xnnpack=not args.no_xnnpack))
    elif args.command == "eval":
        from .measure import evaluate

        result.update(evaluate(args.model, args.samples, threads=args.threads, xnnpack=not args.no_xnnpack, reduce=args.reduce,
                               outputs_dir=args.outputs))
    return result


def _runtime_or_none():
    """The runtime an error document names (every document says which runtime the agent would use)."""
    try:
        from .runtime import runtime_facts

        return runtime_facts()
    except Exception:
        return None


def main(argv: list) -> int:
    if argv and argv[0] in ("-h", "--help"):
        _parser().print_help(sys.stderr)
        return 0
    try:
        result = run(argv)
    except AgentError as exc:
        print(json.dumps({"error": str(exc), "kind": exc.kind, "schema_version": SCHEMA_VERSION, "runtime": _runtime_or_none()}))
        return 2 if exc.kind == "usage" else 1
    except Exception as exc:  # a bug or an unforeseen runtime failure: still one JSON line
        print(json.dumps({"error": "%s: %s" % (type(exc).__name__, exc), "kind": "internal", "schema_version": SCHEMA_VERSION,
                          "runtime": _runtime_or_none()}))
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
