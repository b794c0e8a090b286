"""A read-only view of a .tflite flatbuffer: ops, tensors, quantization parameters, constants.

Parsed with the flatbuffer schema that ships with ai-edge-litert, so inspecting a model needs
neither TensorFlow nor an interpreter.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from quantune_edge.errors import InputError

_NUMPY_DTYPES = {
    "FLOAT32": np.float32, "FLOAT16": np.float16, "INT32": np.int32, "UINT8": np.uint8, "INT64": np.int64,
    "INT16": np.int16, "INT8": np.int8, "BOOL": np.bool_, "FLOAT64": np.float64, "UINT32": np.uint32,
}


@dataclass
class TensorInfo:
    index: int
    name: str
    shape: tuple[int, ...]
    dtype: str
    buffer: int
    scales: list[float] = field(default_factory=list)
    zero_points: list[int] = field(default_factory=list)
    quantized_dimension: int = 0
    data: np.ndarray | None = None  # constant contents (weights, biases), None for activations

    @property
    def is_constant(self) -> bool:
        return self.data is not None

    @property
    def per_channel(self) -> bool:
        return len(self.scales) > 1


@dataclass
class OpInfo:
    index: int
    type: str
    inputs: list[int]
    outputs: list[int]
    fused_activation: str | None = None
    options: dict = field(default_factory=dict)  # scalar builtin options (strides, padding, ...)


@dataclass
class TfliteGraph:
    ops: list[OpInfo]
    tensors: list[TensorInfo]
    inputs: list[int]
    outputs: list[int]
    size_bytes: int
    op_versions: dict[str, int] = field(default_factory=dict)  # op type -> the highest version the model's op codes name

    def histogram(self) -> dict[str, int]:
        return dict(sorted(Counter(op.type for op in self.ops).items()))

    def count(self, op_type: str) -> int:
        return sum(op.type == op_type for op in self.ops)

    def producer(self, tensor: int) -> OpInfo | None:
        return self._producers().get(tensor)

    def consumers(self, tensor: int) -> list[OpInfo]:
        return [op for op in self.ops if tensor in op.inputs]

    def _producers(self) -> dict[int, OpInfo]:
        if not hasattr(self, "_producer_cache"):
            self._producer_cache = {t: op for op in self.ops for t in op.outputs}
        return self._producer_cache


def _enum_names(enum_cls) -> dict[int, str]:
    return {v: k for k, v in vars(enum_cls).items() if not k.startswith("_") and isinstance(v, int)}


def builtin_code(opcode) -> int:
    """An operator code's builtin op: codes above 127 live only in ``builtinCode``, and files from
    older converters fill only ``deprecatedBuiltinCode``."""
    return max(opcode.builtinCode, opcode.deprecatedBuiltinCode)


def operator_code(builtin: int, version: int):
    """A schema ``OperatorCodeT`` for (builtin, version), both code fields filled as the converter fills them."""
    from ai_edge_litert import schema_py_generated as schema

    code = schema.OperatorCodeT()
    code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, min(builtin, 127), version
    return code


def holds_data(model, tensor) -> bool:
    """Whether a schema tensor of ``model`` (a ``ModelT``) has a buffer with data: a constant (weights,
    biases, shapes), where activations point at an empty buffer."""
    data = model.buffers[tensor.buffer].data
    return data is not None and len(data) > 0


def read(path: str | Path) -> TfliteGraph:
    """Parse the first subgraph of a .tflite file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"TFLite model not found: {path}") from None
    return parse(raw, str(path))


def parse(raw: bytes, label: str = "model") -> TfliteGraph:
    """Parse the first subgraph of .tflite bytes (``label`` names them in errors)."""
    if len(raw) < 8 or raw[4:8] != b"TFL3":
        raise InputError(f"{label}: not a TFLite model ({'empty file' if not raw else 'no TFL3 file identifier'})")
    try:
        return _parse(raw, label)
    except InputError:
        raise
    except Exception as exc:  # flatbuffers raises assorted errors on garbage; a cut file shows as short data
        reason = " ".join(str(exc).split())[:160] or "unreadable"
        raise InputError(f"{label}: not a valid .tflite model ({type(exc).__name__}: {reason}; "
                         f"{len(raw)} bytes, truncated or corrupt?)") from None


def _parse(raw: bytes, label: str) -> TfliteGraph:
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(raw, 0))
    if not model.subgraphs:
        raise InputError(f"{label}: .tflite model has no subgraph")
    op_names = _enum_names(schema.BuiltinOperator)
    type_names = _enum_names(schema.TensorType)
    act_names = _enum_names(schema.ActivationFunctionType)
    graph = model.subgraphs[0]
    tensors = []
    for i, t in enumerate(graph.tensors):
        dtype = type_names.get(t.type, str(t.type))
        q = t.quantization
        data = None
        buf = model.buffers[t.buffer] if t.buffer < len(model.buffers) else None
        if buf is not None and buf.data is not None and len(buf.data) and dtype in _NUMPY_DTYPES:
            shape = tuple(int(s) for s in t.shape) if t.shape is not None else ()
            data = np.frombuffer(np.asarray(buf.data, np.uint8).tobytes(), dtype=_NUMPY_DTYPES[dtype]).reshape(shape)
        tensors.append(
            TensorInfo(
                index=i,
                name=t.name.decode() if isinstance(t.name, bytes) else str(t.name),
                shape=tuple(int(s) for s in t.shape) if t.shape is not None else (),
                dtype=dtype.lower(),
                buffer=int(t.buffer),
                scales=[float(s) for s in q.scale] if q is not None and q.scale is not None else [],
                zero_points=[int(z) for z in q.zeroPoint] if q is not None and q.zeroPoint is not None else [],
                quantized_dimension=int(q.quantizedDimension) if q is not None else 0,
                data=data,
            )
        )
    op_versions: dict[str, int] = {}
    code_names = []
    for code in model.operatorCodes or []:
        name = op_names.get(builtin_code(code), "CUSTOM")
        if name == "CUSTOM" and code.customCode:
            name = f"CUSTOM:{code.customCode.decode()}"
        code_names.append(name)
        op_versions[name] = max(op_versions.get(name, 0), int(code.version))
    ops = []
    for i, op in enumerate(graph.operators):
        name = code_names[op.opcodeIndex]
        opts = op.builtinOptions
        act = getattr(opts, "fusedActivationFunction", None)
        scalar_options = {k: v for k, v in vars(opts).items() if isinstance(v, (int, float))} if opts is not None else {}
        ops.append(
            OpInfo(
                index=i,
                type=name,
                inputs=[int(x) for x in op.inputs] if op.inputs is not None else [],
                outputs=[int(x) for x in op.outputs] if op.outputs is not None else [],
                fused_activation=act_names.get(act) if act is not None else None,
                options=scalar_options,
            )
        )
    return TfliteGraph(ops, tensors, [int(x) for x in graph.inputs], [int(x) for x in graph.outputs], len(raw), op_versions)
