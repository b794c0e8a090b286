"""Each op of a TFLite model as a model of its own, to time it alone.

The TFLite Python runtimes have no per-op profiler, and one layer's cost is not its share of the
model's MACs: on YOLOv5n a head's int8→int8 requantization costs 12 % of the int8 model with no MAC
at all, and the 3-channel stem conv runs faster in float than in int8. A model holding one op (its
constants, its activation inputs as model inputs, its quantization parameters) runs that op's kernel
as the whole model would.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from quantune_edge.model.tflite_graph import holds_data


def single_op_models(raw: bytes, ops: Iterable[int]) -> dict[int, bytes]:
    """op index -> the .tflite bytes of a model holding only that op of ``raw``."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(raw, 0))
    graph = model.subgraphs[0]
    out: dict[int, bytes] = {}
    for index in ops:
        op = graph.operators[index]
        used = list(dict.fromkeys(int(t) for t in (*op.inputs, *op.outputs) if t >= 0))
        new_index = {t: k for k, t in enumerate(used)}
        buffers = sorted({graph.tensors[t].buffer for t in used} | {0})  # buffer 0: the empty one
        new_buffer = {b: k for k, b in enumerate(buffers)}
        tensors = []
        for t in used:
            tensor = schema.TensorT()
            tensor.__dict__.update(graph.tensors[t].__dict__)
            tensor.buffer = new_buffer[graph.tensors[t].buffer]
            tensors.append(tensor)
        alone = schema.OperatorT()
        alone.__dict__.update(op.__dict__)
        alone.inputs = np.asarray([new_index[int(t)] if t >= 0 else -1 for t in op.inputs], np.int32)
        alone.outputs = np.asarray([new_index[int(t)] for t in op.outputs], np.int32)
        subgraph = schema.SubGraphT()
        subgraph.tensors, subgraph.operators = tensors, [alone]
        subgraph.inputs = np.asarray([new_index[int(t)] for t in op.inputs if t >= 0 and not holds_data(model, graph.tensors[t])], np.int32)
        subgraph.outputs = np.asarray(alone.outputs, np.int32)
        single = schema.ModelT()
        single.version, single.description, single.operatorCodes = model.version, model.description, model.operatorCodes
        single.buffers, single.subgraphs = [model.buffers[b] for b in buffers], [subgraph]
        builder = flatbuffers.Builder(1024)
        builder.Finish(single.Pack(builder), file_identifier=b"TFL3")
        out[index] = bytes(builder.Output())
    return out
