"""Facts about the device the agent runs on (stdlib only: /proc and /etc are read when present)."""
from __future__ import annotations

import os
import platform
import shutil
import sys


def _cpu_model() -> str:
    """CPU name: x86 'model name', a Pi's 'Model' line, or the ARM 'CPU part' code as a last resort."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return platform.processor() or "unknown"
    fields = {}
    for line in lines:
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    for key in ("model name", "Model", "Hardware"):
        if fields.get(key):
            return fields[key]
    if fields.get("CPU part"):
        return "ARM CPU part %s (implementer %s)" % (fields["CPU part"], fields.get("CPU implementer", "?"))
    return platform.processor() or "unknown"


def _os_name() -> str:
    try:
        with open("/etc/os-release", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return "%s %s" % (platform.system(), platform.release())


def _numpy_version():
    try:
        import numpy
    except ImportError:
        return None
    return numpy.__version__


def device_facts(work_dir: str = ".") -> dict:
    usage = shutil.disk_usage(work_dir)
    return {
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "os": _os_name(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "libc": dict(zip(("name", "version"), platform.libc_ver())),  # which runtime wheels fit (manylinux)
        "in_venv": sys.prefix != getattr(sys, "base_prefix", sys.prefix),
        "numpy": _numpy_version(),
        "free_disk_bytes": usage.free,
    }
