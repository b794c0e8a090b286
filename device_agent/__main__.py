"""``python -m device_agent info``: the device and TFLite runtime facts, as JSON on stdout."""
from __future__ import annotations

import json
import os
import platform
import sys

SCHEMA_VERSION = 1


def runtime_facts() -> dict:
    """Which TFLite runtime is importable, preferring tflite_runtime (the small Pi wheel)."""
    for module, package in (("tflite_runtime.interpreter", "tflite-runtime"), ("ai_edge_litert.interpreter", "ai-edge-litert")):
        try:
            __import__(module)
        except ImportError:
            continue
        try:
            from importlib.metadata import version

            ver = version(package)
        except Exception:
            ver = "unknown"
        return {"package": package, "module": module, "version": ver}
    return {}


def device_facts() -> dict:
    return {
        "machine": platform.machine(),
        "system": platform.system(),
        "release": platform.release(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m device_agent info", file=sys.stderr)
        return 0 if argv else 2
    if argv[0] == "info":
        runtime = runtime_facts()
        report = {"schema_version": SCHEMA_VERSION, "device": device_facts(), "runtime": runtime or None}
        print(json.dumps(report))
        return 0
    print(json.dumps({"error": f"unknown command {argv[0]!r}; available: info"}))
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
