"""A mixed-precision model spliced from the float32 and the full-int8 model of one compile.

TF's selective quantization decides on its own which neighbours of a denylisted op stay int8: it
keeps ops that only move values (TRANSPOSE, RESHAPE, STRIDED_SLICE, CONCATENATION) in int8 with the
scale they share with the model output, and keeps the QUANTIZE that requantizes a sigmoid's 1/256
grid onto that scale. On YOLOv5n every score then rounds to 0 before the float ops see it.

Splicing states the mixed model exactly instead: each chosen op is the float32 model's op (its float
weights, its float output), every other op is the int8 model's op with its own quantization. Where a
float op reads an int8 tensor, a DEQUANTIZE of that tensor is inserted; where an int8 op reads a
float op's output, a QUANTIZE to the int8 tensor's own scale and zero point is inserted, so every int8
op sees exactly the tensors (and calibration ranges) of the full-int8 model. A float op never reads a
requantized copy: it looks through int8 QUANTIZE ops to the value they were made from (and through
the model input's QUANTIZE to the float input), so two float ops are never joined by an int8 round
trip. Pure: flatbuffer bytes in, flatbuffer bytes out.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping

import numpy as np

from quantune_edge.errors import InputError
from quantune_edge.model.tflite_graph import builtin_code, holds_data, operator_code

_QDQ = ("QUANTIZE", "DEQUANTIZE")
# Versions the builtin op resolver accepts for float32 <-> int8 conversion ops a model did not have.
_DEFAULT_VERSION = {"QUANTIZE": 2, "DEQUANTIZE": 2}


class _Model:
    """The int8 model's flatbuffer objects being rewritten, with what the rewrite asks of them."""

    def __init__(self, raw: bytes) -> None:
        from ai_edge_litert import schema_py_generated as schema

        self.schema = schema
        self.model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(raw, 0))
        self.graph = self.model.subgraphs[0]
        self.names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
        self.float32 = schema.TensorType.FLOAT32

    def op_type(self, op) -> str:
        code = self.model.operatorCodes[op.opcodeIndex]
        return self.names.get(builtin_code(code), "CUSTOM")

    def code(self, builtin: int, version: int) -> int:
        """The index of an operator code (builtin, version), added when the model has none."""
        for k, c in enumerate(self.model.operatorCodes):
            if builtin_code(c) == builtin and c.version == version:
                return k
        self.model.operatorCodes.append(operator_code(builtin, version))
        return len(self.model.operatorCodes) - 1

    def conversion_code(self, kind: str) -> int:
        builtin = getattr(self.schema.BuiltinOperator, kind)
        versions = [c.version for c in self.model.operatorCodes if builtin_code(c) == builtin]
        return self.code(builtin, max(versions) if versions else _DEFAULT_VERSION[kind])

    def new_tensor(self, like, name: str, float32: bool = False) -> int:
        t = copy.copy(like)
        t.name = name.encode()
        if float32:
            t.type, t.quantization, t.buffer = self.float32, None, 0
        self.graph.tensors.append(t)
        return len(self.graph.tensors) - 1

    def new_op(self, code: int, inputs: list[int], outputs: list[int]):
        op = self.schema.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = code, np.asarray(inputs, np.int32), np.asarray(outputs, np.int32)
        return op


def splice(float_model: bytes, int8_model: bytes, float_ops: Mapping[int, int]) -> bytes:
    """The int8 model with op ``i`` replaced by the float model's op ``float_ops[i]`` for every key
    (op indices of the two models, paired as ``model.layers.match_layers`` pairs them)."""
    from ai_edge_litert import schema_py_generated as schema

    q = _Model(int8_model)
    fm = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(float_model, 0))
    fgraph = fm.subgraphs[0]
    ops = list(q.graph.operators)
    for i, f in float_ops.items():
        if not 0 <= i < len(ops) or not 0 <= f < len(fgraph.operators):
            raise InputError(f"op pair ({i}, {f}) is not in the int8 ({len(ops)} ops) and float ({len(fgraph.operators)} ops) models")
        if q.op_type(ops[i]) in _QDQ:
            raise InputError(f"int8 op {i} is a {q.op_type(ops[i])}: only computing ops can be kept float")
    producer = {int(t): k for k, op in enumerate(ops) for t in op.outputs}
    consumers: dict[int, list[int]] = {}
    for k, op in enumerate(ops):
        for t in op.inputs:
            consumers.setdefault(int(t), []).append(k)

    def source(t: int) -> int:
        """``t`` before any QUANTIZE: the float model input or the int8 value a requantize was made from."""
        while t in producer and q.op_type(ops[producer[t]]) == "QUANTIZE":
            t = int(ops[producer[t]].inputs[0])
        return t

    out: list = []
    float_of: dict[int, int] = {}  # int8 tensor (a source) -> the float tensor holding its value
    int8_of: dict[int, int] = {}  # int8 tensor a float op took over -> its float value: quantized on first int8 use
    computed: set[int] = set()  # int8 tensors whose value a float op computes
    alias: dict[int, int] = {}  # a dropped DEQUANTIZE's output -> the float tensor replacing it
    constants: dict[int, int] = {}
    dropped: set[int] = set()

    def float_value(t: int) -> int:
        s = source(t)
        if s in float_of:
            return float_of[s]
        quantization = q.graph.tensors[s].quantization
        if q.graph.tensors[s].type == q.float32 or quantization is None or quantization.scale is None or not len(quantization.scale):
            return s  # a float value (the model input) or an integer one (indices): read as it is
        value = q.new_tensor(q.graph.tensors[s], f"{q.graph.tensors[s].name.decode()}/dequantized", float32=True)
        out.append(q.new_op(q.conversion_code("DEQUANTIZE"), [s], [value]))
        float_of[s] = value
        return value

    def int8_value(t: int) -> int:
        if t in int8_of:  # the int8 tensor a float op took over: quantize its float value to it, once
            f = int8_of.pop(t)
            out.append(q.new_op(q.conversion_code("QUANTIZE"), [f], [t]))
        return alias.get(t, t)

    def constant(t: int) -> int:
        if t not in constants:
            tensor = copy.copy(fgraph.tensors[t])
            q.model.buffers.append(fm.buffers[tensor.buffer])
            tensor.buffer = len(q.model.buffers) - 1
            q.graph.tensors.append(tensor)
            constants[t] = len(q.graph.tensors) - 1
        return constants[t]

    for k, op in enumerate(ops):
        if k in dropped:
            continue
        if k not in float_ops:
            if q.op_type(op) == "QUANTIZE" and source(int(op.inputs[0])) in computed:
                op.inputs = np.asarray([float_of[source(int(op.inputs[0]))]], np.int32)  # quantize the float value directly
            else:
                op.inputs = np.asarray([t if t < 0 else int8_value(int(t)) for t in op.inputs], np.int32)
            out.append(op)
            continue
        fop = copy.copy(fgraph.operators[float_ops[k]])
        fcode = fm.operatorCodes[fop.opcodeIndex]
        fop.opcodeIndex = q.code(builtin_code(fcode), fcode.version)
        if len(fop.inputs) != len(op.inputs) or len(fop.outputs) != len(op.outputs):
            raise InputError(f"int8 op {k} and float op {float_ops[k]} differ in their inputs or outputs: not a pair")
        inputs = []
        for ft, qt in zip(fop.inputs, op.inputs):
            if ft < 0:
                inputs.append(-1)
            elif holds_data(fm, fgraph.tensors[ft]):
                inputs.append(constant(int(ft)))
            else:
                inputs.append(float_value(int(qt)))
        outputs = []
        for ft, qt in zip(fop.outputs, op.outputs):
            qt = int(qt)
            dequantizes = [c for c in consumers.get(qt, []) if q.op_type(ops[c]) == "DEQUANTIZE"]
            if dequantizes:  # the float value is what they made: take over the first one's tensor, drop them all
                value = int(ops[dequantizes[0]].outputs[0])
                for c in dequantizes:
                    dropped.add(c)
                    alias[int(ops[c].outputs[0])] = value
            else:
                value = q.new_tensor(fgraph.tensors[ft], fgraph.tensors[ft].name.decode(), float32=True)
            float_of[qt] = int8_of[qt] = value
            computed.add(qt)
            outputs.append(value)
        fop.inputs, fop.outputs = np.asarray(inputs, np.int32), np.asarray(outputs, np.int32)
        out.append(fop)
    graph_outputs = [int8_value(int(t)) if q.graph.tensors[int(t)].type != q.float32 else alias.get(int(t), int(t))
                     for t in q.graph.outputs]
    q.graph.operators = _live(out, graph_outputs)
    q.graph.outputs = np.asarray(graph_outputs, np.int32)
    for signature in q.model.signatureDefs or []:
        for entry in signature.outputs or []:
            entry.tensorIndex = alias.get(int(entry.tensorIndex), int(entry.tensorIndex))
    _compact(q)
    import flatbuffers

    builder = flatbuffers.Builder(len(int8_model) + len(float_model))
    builder.Finish(q.model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _live(ops: list, outputs: list[int]) -> list:
    """The ops something still reads (a model-input QUANTIZE whose readers all became float is not)."""
    needed = set(outputs)
    kept = []
    for op in reversed(ops):
        if any(int(t) in needed for t in op.outputs):
            kept.append(op)
            needed.update(int(t) for t in op.inputs if t >= 0)
    return kept[::-1]


def _compact(q: _Model) -> None:
    """Drop the tensors and buffers no op, input or output uses any more (the replaced ops' int8
    weights), renumbering what is kept, signatures included."""
    graph, model = q.graph, q.model
    used = {int(t) for op in graph.operators for t in (*op.inputs, *op.outputs) if t >= 0}
    used |= {int(t) for t in graph.inputs} | {int(t) for t in graph.outputs}
    order = sorted(used)
    new_index = {t: k for k, t in enumerate(order)}
    graph.tensors = [graph.tensors[t] for t in order]
    for op in graph.operators:
        op.inputs = np.asarray([new_index[int(t)] if t >= 0 else -1 for t in op.inputs], np.int32)
        op.outputs = np.asarray([new_index[int(t)] for t in op.outputs], np.int32)
    graph.inputs = np.asarray([new_index[int(t)] for t in graph.inputs], np.int32)
    graph.outputs = np.asarray([new_index[int(t)] for t in graph.outputs], np.int32)
    for signature in model.signatureDefs or []:
        for entry in (*(signature.inputs or []), *(signature.outputs or [])):
            entry.tensorIndex = new_index[int(entry.tensorIndex)]
    metadata = model.metadata or []
    old_metadata_buffers = [int(b) for b in (model.metadataBuffer if model.metadataBuffer is not None else [])]
    buffers = sorted({t.buffer for t in graph.tensors} | {m.buffer for m in metadata} | set(old_metadata_buffers) | {0})
    new_buffer = {b: k for k, b in enumerate(buffers)}
    model.buffers = [model.buffers[b] for b in buffers]
    for t in graph.tensors:
        t.buffer = new_buffer[t.buffer]
    for m in metadata:  # min_runtime_version, conversion metadata
        m.buffer = new_buffer[m.buffer]
    if old_metadata_buffers:
        model.metadataBuffer = [new_buffer[b] for b in old_metadata_buffers]
