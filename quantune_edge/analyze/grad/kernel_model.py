"""A TFLite model that runs chosen ops of a float model on inputs fed from outside.

The analysis asks what each layer's float op makes of the int8 model's own input. Running the float
model's own ops for that — every chosen op copied into one graph, each copy reading fresh input
tensors — gives the TFLite float kernels' exact result (XNNPACK, fused activation and padding rules
included) in one invocation per sample, instead of one numpy kernel call per layer. The copies are
independent, so the model does one op's work per chosen layer: the same work as one float pass.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quantune_edge.errors import InputError


@dataclass
class KernelModel:
    """``content``: the .tflite bytes; ``inputs[job]``: the model inputs that job's op reads (one per
    activation input of the op, in the op's order); ``outputs[job]``: the op's output tensor."""

    content: bytes
    inputs: dict[int, list[int]]
    outputs: dict[int, int]


def build(float_model: str | Path | bytes, jobs: dict[int, int]) -> KernelModel:
    """One copy of op ``jobs[job]`` (an operator index of ``float_model``) per job; constants
    (weights, biases, shapes) are shared, activation inputs become model inputs."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    raw = float_model if isinstance(float_model, bytes) else Path(float_model).read_bytes()
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(raw, 0))
    graph = model.subgraphs[0]

    def is_constant(t: int) -> bool:
        buf = model.buffers[graph.tensors[t].buffer]
        return buf.data is not None and len(buf.data) > 0

    tensors: list = []
    constants: dict[int, int] = {}

    def fresh(old: int, name: str) -> int:
        t = copy.copy(graph.tensors[old])
        t.name, t.buffer = name.encode(), 0  # buffer 0 is the empty one by convention
        tensors.append(t)
        return len(tensors) - 1

    def shared(old: int) -> int:
        if old not in constants:
            tensors.append(graph.tensors[old])
            constants[old] = len(tensors) - 1
        return constants[old]

    ops, inputs, outputs = [], {}, {}
    for job, index in jobs.items():
        if not 0 <= index < len(graph.operators):
            raise InputError(f"op {index} is not in the float model ({len(graph.operators)} ops)")
        op = copy.copy(graph.operators[index])
        new_inputs, inputs[job] = [], []
        for pos, t in enumerate(op.inputs):
            if t < 0:
                new_inputs.append(t)
            elif is_constant(t):
                new_inputs.append(shared(t))
            else:
                new_inputs.append(fresh(t, f"job{job}/in{pos}"))
                inputs[job].append(new_inputs[-1])
        op.inputs = np.asarray(new_inputs, np.int32)
        op.outputs = np.asarray([fresh(int(op.outputs[0]), f"job{job}/out")], np.int32)
        outputs[job] = int(op.outputs[0])
        ops.append(op)
    graph.tensors, graph.operators = tensors, ops
    graph.inputs = np.asarray([t for job in jobs for t in inputs[job]], np.int32)
    graph.outputs = np.asarray(list(outputs.values()), np.int32)
    model.subgraphs, model.signatureDefs = [graph], []
    builder = flatbuffers.Builder(len(raw) + 4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return KernelModel(bytes(builder.Output()), inputs, outputs)


class KernelRunner:
    """An interpreter on a :class:`KernelModel`: feed each job's inputs, invoke once, read each job's output."""

    def __init__(self, kernels: KernelModel, num_threads: int = 2) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.kernels = kernels
        self.interpreter = Interpreter(model_content=kernels.content, num_threads=num_threads)
        self.interpreter.allocate_tensors()
        self.invocations = 0
        # float32, except what an op reads as integers (a GATHER's indices from an int64 model input)
        self.dtypes = {d["index"]: d["dtype"] for d in self.interpreter.get_input_details()}

    def run(self, feeds: dict[int, list[np.ndarray]]) -> dict[int, np.ndarray]:
        """``feeds[job]``: the values of that job's inputs; returns job -> output (a copy)."""
        for job, values in feeds.items():
            for tensor, value in zip(self.kernels.inputs[job], values):
                self.interpreter.set_tensor(tensor, np.asarray(value, self.dtypes.get(tensor, np.float32)))
        self.interpreter.invoke()
        self.invocations += 1
        return {job: self.interpreter.get_tensor(self.kernels.outputs[job]) for job in feeds}
