"""Each op of a real model as a model of its own (what tune times to price layers): it computes what the
op computes inside the whole model, and every one of them loads and runs alone."""
from __future__ import annotations

import numpy as np
import pytest

from quantune_edge.compile.artifacts import CompiledModel
from quantune_edge.model.op_models import single_op_models
from quantune_edge.model.runtime import alone_latency_ms, load_interpreter


def _builtin(content: bytes | None = None, path=None, preserve: bool = False):
    """An interpreter on the builtin kernels: XNNPACK keeps a delegated graph's inner tensors to itself."""
    return load_interpreter(xnnpack=False, num_threads=1, model_content=content, model_path=None if path is None else str(path),
                            experimental_preserve_all_tensors=preserve)


@pytest.mark.parametrize("which", ["int8", "float32"])
def test_each_op_alone_computes_what_it_computes_in_the_whole_model(effnet_compiled, which):
    compiled = CompiledModel.open(effnet_compiled)
    graph = compiled.int8_graph if which == "int8" else compiled.float_graph
    path = compiled.int8_model if which == "int8" else compiled.float_model
    whole = _builtin(path=path, preserve=True)
    detail = whole.get_input_details()[0]
    whole.set_tensor(detail["index"], np.random.default_rng(0).uniform(-1, 1, detail["shape"]).astype(np.float32))
    whole.invoke()
    alone = single_op_models(path.read_bytes(), range(len(graph.ops)))
    assert sorted(alone) == list(range(len(graph.ops)))
    types = set()
    for index, content in alone.items():
        op = graph.ops[index]
        single = _builtin(content)
        activations = [t for t in op.inputs if t >= 0 and not graph.tensors[t].is_constant]
        for feed, t in zip(single.get_input_details(), activations):
            single.set_tensor(feed["index"], whole.get_tensor(t))
        single.invoke()
        out = single.get_output_details()[0]
        np.testing.assert_array_equal(single.get_tensor(out["index"]), whole.get_tensor(op.outputs[0]), err_msg=f"op {index} {op.type}")
        assert len(content) < graph.size_bytes  # only its own constants
        types.add(op.type)
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "ADD"} <= types
    assert ("QUANTIZE" in types) == (which == "int8")


def test_every_op_is_timed_alone_and_what_cannot_run_is_none(effnet_compiled):
    compiled = CompiledModel.open(effnet_compiled)
    alone = single_op_models(compiled.int8_model.read_bytes(), range(len(compiled.int8_graph.ops)))
    times = alone_latency_ms({**alone, -1: b"not a model"}, threads=2, runs=3, warmup=1)
    assert times[-1] is None
    assert all(times[k] is not None and times[k] > 0 for k in alone)
