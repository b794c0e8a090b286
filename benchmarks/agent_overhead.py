"""Agent overhead: the mean latency the device agent reports vs a bare ``interpreter.invoke()`` loop,
same model, runtime, threads and machine, interleaved in rounds so drift hits both alike.

    .venv/bin/python bench/agent_overhead.py [--runs 200] [--rounds 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np
from _models import REPO, demo_models  # noqa: E402
from rich.console import Console
from rich.table import Table

from device_agent.measure import random_input  # noqa: E402
from device_agent.runtime import load_interpreter, runtime_facts  # noqa: E402
from quantune_edge.compile.artifacts import FLOAT_MODEL, INT8_MODEL  # noqa: E402


def bare_mean_ms(path: str, threads: int, warmup: int, runs: int) -> float:
    interpreter = load_interpreter(path, threads)
    detail = interpreter.get_input_details()[0]
    x = random_input(detail, np.random.default_rng(0))
    for _ in range(warmup):
        interpreter.set_tensor(detail["index"], x)
        interpreter.invoke()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        interpreter.set_tensor(detail["index"], x)
        interpreter.invoke()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.mean(times))


def agent_mean_ms(path: str, threads: int, warmup: int, runs: int) -> float:
    out = subprocess.run([sys.executable, "-m", "device_agent", "bench", path, "--threads", str(threads),
                          "--warmup", str(warmup), "--runs", str(runs)], capture_output=True, text=True, cwd=REPO, check=True)
    return json.loads(out.stdout)["latency_ms"]["mean"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    folder = demo_models()
    rt = runtime_facts()
    table = Table(title=f"device agent vs bare invoke() loop ({rt['package']} {rt['version']}, {args.threads} threads, "
                        f"{args.rounds} interleaved rounds x {args.runs} runs)")
    for col in ("model", "bare mean ms", "agent mean ms", "overhead"):
        table.add_column(col, justify="right")
    for name in (INT8_MODEL, FLOAT_MODEL):
        path = str(folder / name)
        bare, agent = [], []
        for _ in range(args.rounds):
            bare.append(bare_mean_ms(path, args.threads, args.warmup, args.runs))
            agent.append(agent_mean_ms(path, args.threads, args.warmup, args.runs))
        b, a = float(np.median(bare)), float(np.median(agent))
        table.add_row(name, f"{b:.3f}", f"{a:.3f}", f"{100 * (a / b - 1):+.2f} %")
    Console(width=130).print(table)
    print("goal: overhead <= 2 % (medians over rounds)")


if __name__ == "__main__":
    main()
