"""Which TFLite runtime a board can install, and whether a runtime can run a given model.

The one place for the device runtime pins. ``RUNTIMES`` is newest first; the selection takes the first
that publishes a wheel for the board's machine, Python and glibc (read by the agent's ``info``).
Each runtime's op kernels (builtin op -> the highest version it registers) are in
``runtime_ops.json`` beside this file, probed from the runtime itself (``scripts/probe_runtime_ops.py``;
:func:`probe_op_versions`), so a model the device cannot load is refused on the host, with the op and
its version named, before anything is uploaded.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from quantune_edge.errors import DeviceError

RUNTIME_OPS_JSON = Path(__file__).with_name("runtime_ops.json")
# The schema's markers, not ops: never a kernel to look for.
_NOT_OPS = ("CUSTOM", "DELEGATE", "PLACEHOLDER_FOR_GREATER_OP_CODES")


@dataclass(frozen=True)
class Runtime:
    """One pinned runtime release and the wheels it publishes: machine -> lowest glibc (manylinux tag)."""

    package: str
    version: str
    module: str
    pythons: tuple[tuple[int, int], tuple[int, int]]  # lowest and highest CPython with a wheel
    wheels: tuple[tuple[str, tuple[int, int]], ...]

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def label(self) -> str:
        return f"{self.package} {self.version}"

    def misfit(self, machine: str, python: tuple[int, int], glibc: tuple[int, int] | None) -> str | None:
        """Why this runtime has no wheel for the board, or None when it has one."""
        glibc_min = dict(self.wheels).get(machine)
        low, high = self.pythons
        if glibc_min is None:
            return f"{self.package} has no {machine} wheel"
        if not low <= python <= high:
            return f"{self.label} has wheels for Python {_dotted(low)}-{_dotted(high)} only"
        if glibc is None or glibc < glibc_min:
            return f"{self.label} needs glibc {_dotted(glibc_min)}+ on {machine}"
        return None


RUNTIMES: tuple[Runtime, ...] = (
    Runtime("ai-edge-litert", "2.3.0", "ai_edge_litert.interpreter", ((3, 10), (3, 14)),
            (("aarch64", (2, 27)), ("x86_64", (2, 27)))),
    Runtime("ai-edge-litert", "2.1.0", "ai_edge_litert.interpreter", ((3, 9), (3, 13)),
            (("aarch64", (2, 27)), ("x86_64", (2, 27)))),
    Runtime("tflite-runtime", "2.14.0", "tflite_runtime.interpreter", ((3, 8), (3, 11)),
            (("aarch64", (2, 34)), ("armv7l", (2, 34)), ("x86_64", (2, 17)))),
)


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def _version(text: str | None) -> tuple[int, int] | None:
    try:
        major, minor = str(text).split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def board_of(device: dict) -> tuple[str, tuple[int, int], tuple[int, int] | None]:
    """(machine, Python major.minor, glibc major.minor or None) from the agent's ``device`` facts."""
    python = _version(device.get("python"))
    if python is None:
        raise DeviceError(f"the device reported no usable Python version ({device.get('python')!r})")
    libc = device.get("libc") or {}
    return str(device.get("machine")), python, _version(libc.get("version")) if libc.get("name") == "glibc" else None


def pip_platforms(machine: str, glibc: tuple[int, int]) -> list[str]:
    """The manylinux tags a board with this glibc accepts, for ``pip download --platform`` on another
    machine (pip does not widen a given tag to the older ones as it does for its own)."""
    major, minor = glibc
    tags = [f"manylinux_{major}_{m}_{machine}" for m in range(minor, 16, -1)]
    return tags + ([f"manylinux2014_{machine}"] if (major, minor) >= (2, 17) else [])


def select_runtime(device: dict) -> Runtime:
    """The newest pinned runtime with a wheel for this board; a one-line DeviceError naming what is
    missing when none has (e.g. 32-bit armv7l with Python 3.13)."""
    machine, python, glibc = board_of(device)
    reasons = []
    for runtime in RUNTIMES:
        reason = runtime.misfit(machine, python, glibc)
        if reason is None:
            return runtime
        reasons.append(reason)
    glibc_text = f"glibc {_dotted(glibc)}" if glibc else "no glibc"
    raise DeviceError(f"no TFLite runtime wheel for {machine} with Python {_dotted(python)} and {glibc_text}: "
                      + "; ".join(dict.fromkeys(reasons)))


def selection_table(device: dict | None = None) -> list[dict]:
    """Every pinned runtime with what it fits and, given a board's facts, why it does or does not fit it."""
    rows = []
    board = board_of(device) if device else None
    chosen = None
    for runtime in RUNTIMES:
        misfit = runtime.misfit(*board) if board else None
        if board and misfit is None and chosen is None:
            chosen = runtime
        rows.append({"runtime": runtime.requirement, "python": f"{_dotted(runtime.pythons[0])}-{_dotted(runtime.pythons[1])}",
                     "machines": ", ".join(f"{m} (glibc {_dotted(g)}+)" for m, g in runtime.wheels),
                     "kernels_known": runtime.label in supported_op_versions(),
                     **({"fits": misfit or "yes", "selected": runtime is chosen} if board else {})})
    return rows


@cache
def supported_op_versions() -> dict[str, dict[str, int]]:
    """runtime label ("ai-edge-litert 2.3.0") -> builtin op -> highest version it has a kernel for."""
    return json.loads(RUNTIME_OPS_JSON.read_text())["runtimes"]


def kernels_missing(op_versions: dict[str, int], package: str, version: str) -> list[str] | None:
    """What a runtime lacks to run a model whose ops need ``op_versions`` ("CONV_2D version 9 (it has
    up to 8)"); None when that runtime is not in the table (the device's own load is then the check).
    Custom ops are the model's business and are not checked."""
    known = supported_op_versions().get(f"{package} {version}")
    if known is None:
        return None
    missing = []
    for op, needed in sorted(op_versions.items()):
        if op.startswith("CUSTOM") or op in _NOT_OPS:
            continue
        has = known.get(op, 0)
        if needed > has:
            missing.append(f"{op} version {needed} ({f'it has up to {has}' if has else 'no kernel at all'})")
    return missing


def probe_op_versions(interpreter_module) -> dict[str, int]:
    """The highest version of every builtin op that ``interpreter_module``'s resolver registers: a
    model with one operator code and no operators is loaded for each (op, version); the runtime
    resolves every code at load, so only a missing kernel fails it (about 0.1 s for all ops)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    from quantune_edge.common.console import captured_native_output
    from quantune_edge.model.tflite_graph import operator_code

    def loads(code: int, version: int) -> bool:
        subgraph = schema.SubGraphT()
        subgraph.tensors, subgraph.inputs, subgraph.outputs, subgraph.operators = [], [], [], []
        model = schema.ModelT()
        model.version, model.operatorCodes, model.subgraphs, model.buffers = 3, [operator_code(code, version)], [subgraph], [schema.BufferT()]
        builder = flatbuffers.Builder(256)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        try:
            interpreter_module.Interpreter(model_content=bytes(builder.Output()))
        except (ValueError, RuntimeError):
            return False
        return True

    found = {}
    with captured_native_output(True):  # each refusal is also logged to stderr by the runtime
        for name, code in sorted(vars(schema.BuiltinOperator).items(), key=lambda kv: str(kv[1])):
            if name.startswith("_") or not isinstance(code, int) or name in _NOT_OPS:
                continue
            version = 0
            while version < 64 and loads(code, version + 1):
                version += 1
            found[name] = version
    return dict(sorted(found.items()))
