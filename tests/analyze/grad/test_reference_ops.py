"""The numpy reference kernels behind the local (own-input) error: checked against explicit loops
and against TFLite's own float kernels on every supported op of the shipped EfficientNet-Lite0."""
import numpy as np
from conftest import DEMO_IMAGES

from quantune_edge.analyze.grad import reference_ops
from quantune_edge.compile.artifacts import CompiledModel
from quantune_edge.model import tflite_graph
from quantune_edge.model.runtime import TfliteRunner


def _loop_conv(x, w, b, stride, pad_top_left, out_hw, depthwise=False):
    n, h, wd, c = x.shape
    o, kh, kw, _ = w.shape
    outc = w.shape[3] if depthwise else o
    y = np.zeros((n, *out_hw, outc))
    for i in range(out_hw[0]):
        for j in range(out_hw[1]):
            for dy in range(kh):
                for dx in range(kw):
                    yy, xx = i * stride + dy - pad_top_left, j * stride + dx - pad_top_left
                    if 0 <= yy < h and 0 <= xx < wd:
                        if depthwise:
                            mult = outc // c
                            y[:, i, j, :] += np.repeat(x[:, yy, xx, :], mult, axis=-1) * w[0, dy, dx, :]
                        else:
                            y[:, i, j, :] += x[:, yy, xx, :] @ w[:, dy, dx, :].T
    return y + b


def test_conv_same_padding_stride_2_matches_loops():
    rng = np.random.default_rng(0)
    x, w, b = rng.normal(size=(2, 7, 7, 3)), rng.normal(size=(4, 3, 3, 3)), rng.normal(size=4)
    got = reference_ops.conv2d(x, w, b, {"padding": reference_ops.SAME, "strideH": 2, "strideW": 2})
    assert got.shape == (2, 4, 4, 4)
    np.testing.assert_allclose(got, _loop_conv(x, w, b, 2, 1, (4, 4)), rtol=1e-10)
    valid = reference_ops.conv2d(x, w, None, {"padding": reference_ops.VALID, "strideH": 1, "strideW": 1})
    np.testing.assert_allclose(valid, _loop_conv(x, w, 0, 1, 0, (5, 5)), rtol=1e-10)


def test_depthwise_with_multiplier_matches_loops():
    rng = np.random.default_rng(1)
    x, w, b = rng.normal(size=(1, 6, 6, 3)), rng.normal(size=(1, 3, 3, 6)), rng.normal(size=6)
    got = reference_ops.depthwise_conv2d(x, w, b, {"padding": reference_ops.SAME, "strideH": 1, "strideW": 1})
    np.testing.assert_allclose(got, _loop_conv(x, w, b, 1, 1, (6, 6), depthwise=True), rtol=1e-10)


def test_unsupported_op_gives_none():
    assert reference_ops.run("MEAN", {}, [np.zeros((1, 2, 2, 3))], None, None, None, (1, 3)) is None
    assert reference_ops.run("ADD", {}, [np.ones(3), np.ones(3)], None, None, "HARD_SWISH", (3,)) is None


def test_kernels_reproduce_tflite_float_on_effnet(effnet_compiled):
    compiled = CompiledModel.open(effnet_compiled)
    fg = tflite_graph.read(compiled.float_model)
    runner = TfliteRunner(compiled.float_model, 2, preserve_all_tensors=True)
    runner.invoke(compiled.tflite_inputs(compiled.load_samples(DEMO_IMAGES, 1, 0))[:1])
    value = lambda t: runner.interpreter.get_tensor(t).astype(np.float32)  # noqa: E731
    checked = set()
    for op in fg.ops:
        if op.type not in reference_ops.SUPPORTED:
            continue
        weighted = op.type in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
        acts = [t for t in op.inputs if t >= 0 and fg.tensors[t].data is None]
        w = fg.tensors[op.inputs[1]].data if weighted else None
        b = fg.tensors[op.inputs[2]].data if weighted and len(op.inputs) > 2 else None
        got = reference_ops.run(op.type, op.options, [value(t) for t in acts[:1 if weighted else None]], w, b,
                                op.fused_activation, fg.tensors[op.outputs[0]].shape)
        ref = value(op.outputs[0])
        assert np.max(np.abs(got - ref)) <= 1e-4 * np.max(np.abs(ref)) + 1e-6, (op.index, op.type)
        checked.add(op.type)
    assert checked == {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD"}
