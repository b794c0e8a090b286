"""Deploy + 100-run bench round trip over SSH, minus the pure benchmark time (the timed invocations).

Starts its own OpenSSH sshd on loopback (as the tests do) unless ``--target`` names one. Cold = fresh
work dir (agent copied, model uploaded and verified); warm = both already there (sha256 match).

    .venv/bin/python bench/deploy_roundtrip.py [--runs 100] [--target NAME]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from _models import demo_models  # noqa: E402
from rich.console import Console
from rich.table import Table

from quantune_edge.compile.artifacts import FLOAT_MODEL, INT8_MODEL  # noqa: E402
from quantune_edge.deploy.device import open_device  # noqa: E402
from quantune_edge.deploy.targets import load_target  # noqa: E402
from quantune_edge.testing.loopback_sshd import LoopbackSshd  # noqa: E402


def roundtrip(target, model: Path, runs: int) -> dict:
    start = time.perf_counter()
    device = open_device(target)
    connected = time.perf_counter()
    deployment = device.deploy(model)
    deployed = time.perf_counter()
    report = device.agent(["bench", deployment.remote_path, "--runs", str(runs), "--warmup", "10",
                           "--threads", str(target.threads)])
    device.conn.close()
    total = time.perf_counter() - start
    pure = report["latency_ms"]["mean"] * runs / 1e3
    return {"connect+agent": connected - start, "upload+verify": deployed - connected, "total": total, "pure": pure,
            "overhead": total - pure, "uploaded": deployment.uploaded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--target", default=None, help="target name or .toml (default: a loopback sshd started here)")
    args = parser.parse_args()
    folder = demo_models()
    with tempfile.TemporaryDirectory() as tmp:
        server = None
        if args.target:
            target = load_target(args.target)
        else:
            server = LoopbackSshd(Path(tmp) / "sshd").start()
            target = load_target(str(server.target_toml(Path(tmp) / "loop.toml", python=sys.executable,
                                                        work_dir=Path(tmp) / "device")))
        try:
            table = Table(title=f"deploy + {args.runs}-run bench on {target.name} ({target.address}), seconds")
            for col in ("model", "run", "connect+agent", "upload+verify", "total", "pure bench", "overhead"):
                table.add_column(col, justify="right")
            for name in (INT8_MODEL, FLOAT_MODEL):
                model = folder / name
                for run in ("cold", "warm"):
                    r = roundtrip(target, model, args.runs)
                    table.add_row(f"{name} ({model.stat().st_size / 1e6:.1f} MB)", run, f"{r['connect+agent']:.2f}",
                                  f"{r['upload+verify']:.2f}", f"{r['total']:.2f}", f"{r['pure']:.2f}", f"{r['overhead']:.2f}")
        finally:
            if server:
                server.stop()
    Console(width=130).print(table)
    print("goal: overhead (total - pure timed invocations) < 2 s")


if __name__ == "__main__":
    main()
