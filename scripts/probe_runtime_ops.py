"""Write quantune_edge/deploy/runtime_ops.json: each pinned device runtime's op kernels, probed.

For every runtime in ``runtimes.RUNTIMES`` it pip-installs that release's wheel for this host into a
temporary folder (the op resolver is built from the same sources on every machine) and asks it, in a
child Python, which version of each builtin op it loads (``runtimes.probe_op_versions``).

    .venv/bin/python scripts/probe_runtime_ops.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quantune_edge.deploy.runtimes import RUNTIME_OPS_JSON, RUNTIMES  # noqa: E402

CHILD = ("import importlib, json, sys; from quantune_edge.deploy.runtimes import probe_op_versions; "
         "print(json.dumps(probe_op_versions(importlib.import_module(sys.argv[1]))))")


def main() -> None:
    table = {}
    with tempfile.TemporaryDirectory() as tmp:
        for runtime in RUNTIMES:
            target = Path(tmp) / runtime.label.replace(" ", "-")
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--only-binary=:all:",
                            "--target", str(target), runtime.requirement], check=True)
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), str(REPO)]))
            out = subprocess.run([sys.executable, "-c", CHILD, runtime.module], check=True, capture_output=True, text=True, env=env)
            table[runtime.label] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{runtime.label}: {sum(v > 0 for v in table[runtime.label].values())} builtin ops")
    RUNTIME_OPS_JSON.write_text(json.dumps({"schema_version": 1, "probed": time.strftime("%Y-%m-%d"),
                                            "how": "scripts/probe_runtime_ops.py (each release's wheel for the probing host)",
                                            "runtimes": table}, indent=1) + "\n")
    print(f"wrote {RUNTIME_OPS_JSON}")


if __name__ == "__main__":
    main()
