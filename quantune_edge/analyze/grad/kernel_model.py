"""A TFLite model that runs chosen ops of a float model on inputs fed from outside.

The analysis asks what each layer's float op makes of the int8 model's own input. Running the float
model's own ops for that — every chosen op copied into one graph, each copy reading fresh input
tensors — gives the TFLite float kernels' exact result (XNNPACK, fused activation and padding rules
included) in one invocation per sample, instead of one numpy kernel call per layer. The copies are
independent, so the model does one op's work per chosen layer: the same work as one float pass.
A job may also be a group of ops (a detector's decode tail): they are copied connected, fed the values
entering the group, and the group's exit tensors are read.
"""
from __future__ import annotations

import copy
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quantune_edge.errors import InputError
from quantune_edge.model.tflite_graph import holds_data


@dataclass(frozen=True)
class Group:
    """Ops copied together, in graph order (``ops``), whose ``exits`` (float tensors) are read."""

    ops: tuple[int, ...]
    exits: tuple[int, ...]


@dataclass
class KernelModel:
    """``content``: the .tflite bytes; ``inputs[job]``: the model inputs of that job, each standing for
    the float model's tensor ``sources[job][k]`` (a single op's activation inputs, in the op's order);
    ``outputs[job]``: the tensors read (a single op's output; a group's exits, in their order)."""

    content: bytes
    inputs: dict[Hashable, list[int]]
    sources: dict[Hashable, list[int]]
    outputs: dict[Hashable, list[int]]


def build(float_model: str | Path | bytes, jobs: dict[Hashable, int | Group]) -> KernelModel:
    """One copy of op ``jobs[job]`` (an operator index of ``float_model``), or of a :class:`Group` of
    ops, per job; constants (weights, biases, shapes) are shared, activation inputs become model inputs."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    raw = float_model if isinstance(float_model, bytes) else Path(float_model).read_bytes()
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(raw, 0))
    graph = model.subgraphs[0]

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

    ops, inputs, sources, outputs = [], {}, {}, {}
    for job, spec in jobs.items():
        group = spec if isinstance(spec, Group) else Group((spec,), ())
        local: dict[int, int] = {}  # float tensor -> its copy in this job
        inputs[job], sources[job] = [], []
        for index in group.ops:
            if not 0 <= index < len(graph.operators):
                raise InputError(f"op {index} is not in the float model ({len(graph.operators)} ops)")
            op = copy.copy(graph.operators[index])
            new_inputs = []
            for t in (int(t) for t in op.inputs):
                if t < 0:
                    new_inputs.append(t)
                elif holds_data(model, graph.tensors[t]):
                    new_inputs.append(shared(t))
                elif t in local:
                    new_inputs.append(local[t])
                else:
                    local[t] = fresh(t, f"job{job}/in{len(inputs[job])}")
                    inputs[job].append(local[t])
                    sources[job].append(t)
                    new_inputs.append(local[t])
            op.inputs = np.asarray(new_inputs, np.int32)
            for t in op.outputs:
                local[int(t)] = fresh(int(t), f"job{job}/op{index}/out")
            op.outputs = np.asarray([local[int(t)] for t in op.outputs], np.int32)
            ops.append(op)
        last = graph.operators[group.ops[-1]]
        outputs[job] = [local[t] for t in group.exits] if isinstance(spec, Group) else [local[int(last.outputs[0])]]
    graph.tensors, graph.operators = tensors, ops
    graph.inputs = np.asarray([t for job in jobs for t in inputs[job]], np.int32)
    graph.outputs = np.asarray([t for job in jobs for t in outputs[job]], np.int32)
    model.subgraphs, model.signatureDefs = [graph], []
    builder = flatbuffers.Builder(len(raw) + 4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return KernelModel(bytes(builder.Output()), inputs, sources, outputs)


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

    def run(self, feeds: dict[Hashable, list[np.ndarray]]) -> dict[Hashable, list[np.ndarray]]:
        """``feeds[job]``: the values of that job's inputs; returns job -> its outputs (copies)."""
        for job, values in feeds.items():
            for tensor, value in zip(self.kernels.inputs[job], values):
                self.interpreter.set_tensor(tensor, np.asarray(value, self.dtypes.get(tensor, np.float32)))
        self.interpreter.invoke()
        self.invocations += 1
        return {job: [self.interpreter.get_tensor(t) for t in self.kernels.outputs[job]] for job in feeds}
