"""The layer-kernel model: copies of a float model's ops that read fed inputs reproduce the float
model's own op outputs when fed its own tensors, and compute on any other input independently."""
import numpy as np
import pytest
from conftest import DEMO_IMAGES

from quantune_edge.analyze.grad import kernel_model
from quantune_edge.compile.artifacts import CompiledModel
from quantune_edge.errors import InputError
from quantune_edge.model import tflite_graph
from quantune_edge.model.runtime import TfliteRunner


def test_kernel_copies_reproduce_the_float_ops(effnet_compiled):
    compiled = CompiledModel.open(effnet_compiled)
    graph = tflite_graph.read(compiled.float_model)
    chosen = {}
    for op in graph.ops:  # the first op of each kind: stem conv (reads the model input), depthwise, 1x1 conv, add, fc
        key = (op.type, op.options.get("strideH", 1)) if op.type != "ADD" else ("ADD", 0)
        if op.type in ("CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "FULLY_CONNECTED") and key not in chosen:
            chosen[key] = op.index
    jobs = {i: index for i, index in enumerate(chosen.values())}
    jobs[len(jobs)] = jobs[0]  # the same op twice: independent copies
    built = kernel_model.build(compiled.float_model, jobs)
    assert set(built.inputs) == set(jobs) and len({t for ts in built.outputs.values() for t in ts}) == len(jobs)
    copies = tflite_graph.parse(built.content)
    assert [op.type for op in copies.ops] == [graph.ops[i].type for i in jobs.values()]
    assert len(copies.inputs) == sum(len(v) for v in built.inputs.values())

    samples = compiled.load_samples(DEMO_IMAGES, 1)
    x = compiled.tflite_inputs(samples)
    runner = TfliteRunner(compiled.float_model, 1, preserve_all_tensors=True)
    runner.invoke(x)
    acts = {job: [t for t in graph.ops[i].inputs if t >= 0 and not graph.tensors[t].is_constant] for job, i in jobs.items()}
    kernels = kernel_model.KernelRunner(built, 1)
    feeds = {job: [runner.tensor(t) for t in ts] for job, ts in acts.items()}
    noise = np.random.default_rng(0).normal(size=feeds[0][0].shape).astype(np.float32)
    feeds[len(jobs) - 1] = [feeds[0][0] + noise]
    out = kernels.run(feeds)
    assert kernels.invocations == 1
    for job, index in list(jobs.items())[:-1]:
        want = runner.tensor(graph.ops[index].outputs[0])
        assert out[job][0].shape == want.shape
        np.testing.assert_allclose(out[job][0], want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    assert not np.allclose(out[len(jobs) - 1][0], out[0][0])  # the copy computed on its own (noisy) input


def test_unknown_op_index(effnet_compiled):
    compiled = CompiledModel.open(effnet_compiled)
    with pytest.raises(InputError, match="op 9999 is not in the float model"):
        kernel_model.build(compiled.float_model, {0: 9999})


def test_a_group_of_ops_runs_connected_and_reads_its_exits(effnet_compiled):
    """A requantized tail's job: several ops copied connected, fed only what enters the group; its exits
    equal the float model's own tensors there."""
    compiled = CompiledModel.open(effnet_compiled)
    graph = tflite_graph.read(compiled.float_model)
    first = next(op.index for op in graph.ops if op.type == "DEPTHWISE_CONV_2D")
    ops = (first - 1, first, first + 1)  # conv -> depthwise -> conv
    exits = (graph.ops[first].outputs[0], graph.ops[first + 1].outputs[0])
    built = kernel_model.build(compiled.float_model, {"tail": kernel_model.Group(ops, exits)})
    entering = [t for t in graph.ops[first - 1].inputs if t >= 0 and not graph.tensors[t].is_constant]
    assert built.sources["tail"] == entering and len(built.outputs["tail"]) == 2
    runner = TfliteRunner(compiled.float_model, 1, preserve_all_tensors=True)
    runner.invoke(compiled.tflite_inputs(compiled.load_samples(DEMO_IMAGES, 1)))
    out = kernel_model.KernelRunner(built, 1).run({"tail": [runner.tensor(t) for t in entering]})["tail"]
    for got, t in zip(out, exits):
        want = runner.tensor(t)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
