"""Models that are not one image: two inputs (an image and a vector) and a 1-D conv net over a (1, 49, 10)
feature input with a dynamic time axis. Their samples come from a .npz, a .npy or a Python loader; they
compile, analyze and tune with --task fidelity and with a custom metric, each output checked against
ONNX Runtime fed the same values."""
import json

import numpy as np
import onnx
import pytest
from conftest import GraphBuilder, graph_model, image_and_vector_net, run_cli
from onnx import helper

from quantune_edge.common.inputs import onnx_feed
from quantune_edge.compile.artifacts import CompiledModel
from quantune_edge.compile.compiler import onnxruntime_all_outputs
from quantune_edge.model.runtime import TfliteRunner

METRIC = '''import numpy as np
def top1(outputs, labels):
    return float(np.mean([int(np.argmax(o["logits"])) == int(l) for o, l in zip(outputs, labels)]))
'''
LOADER = '''import numpy as np
def samples():
    rng = np.random.default_rng(7)
    for i in range(20):
        yield {"meta": rng.normal(size=(16,)).astype("float32"), "image": rng.normal(size=(1, 3, 32, 32)).astype("float32")}, i % 5
def not_dicts():
    yield np.zeros(3)
def missing_meta():
    yield {"image": np.zeros((1, 3, 32, 32), np.float32)}
def raises():
    raise RuntimeError("the dataset is on another disk")
def photos():
    import pathlib
    rng = np.random.default_rng(3)
    for i, photo in enumerate(sorted((pathlib.Path(__file__).parent / "photos").glob("*.jpg"))):
        yield {"image": photo, "meta": rng.normal(size=(16,)).astype("float32")}, i % 5
def lost_photo():
    yield {"image": "no/such.jpg", "meta": np.zeros(16, np.float32)}
'''


def conv1d_net():
    """Keyword-spotting style: (batch, time, 10) features, two 1-D convs over time, 12 logits."""
    b = GraphBuilder(2)

    def conv1d(x, cin, cout, k=3):
        w = b.const(b.rng.normal(0, np.sqrt(2 / (k * cin)), (cout, cin, k)))
        return b.node("Relu", [b.node("Conv", [x, w, b.const(b.rng.normal(0, 0.1, cout))], kernel_shape=[k], pads=[k // 2] * 2)])

    h = conv1d(conv1d(b.node("Transpose", ["features"], perm=[0, 2, 1]), 10, 16), 16, 16)
    pooled = b.node("Flatten", [b.node("GlobalAveragePool", [h])], axis=1)
    logits = b.node("Gemm", [pooled, b.const(b.rng.normal(0, 0.3, (16, 12))), b.const(b.rng.normal(0, 0.1, 12))])
    b.nodes.append(helper.make_node("Identity", [logits], ["logits"]))
    return graph_model(b, [("features", ["batch", "time", 10])], "logits")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    onnx.save(image_and_vector_net(), folder / "two.onnx")
    onnx.save(conv1d_net(), folder / "kws.onnx")
    np.savez(folder / "two.npz", image=rng.normal(size=(16, 3, 32, 32)).astype(np.float32),
             meta=rng.normal(size=(16, 16)).astype(np.float32), labels=np.arange(16) % 5)
    np.save(folder / "kws.npy", rng.normal(size=(16, 49, 10)).astype(np.float32))
    (folder / "metric.py").write_text(METRIC)
    (folder / "loader.py").write_text(LOADER)
    return folder


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def _same_as_onnxruntime(out, onnx_path, samples):
    """The float32 TFLite's outputs equal ONNX Runtime's on the same samples (fed ONNX's own way)."""
    compiled = CompiledModel.open(out)
    _, reference, _ = onnxruntime_all_outputs(onnx_path, compiled.specs, samples)
    got = compiled.outputs(compiled.float_model, samples)
    np.testing.assert_allclose(next(iter(got.values())), reference[0], rtol=1e-4, atol=1e-4)


def test_two_inputs_from_a_npz_compile_analyze_and_tune_by_fidelity(files, tmp_path):
    out = tmp_path / "two"
    _ok(run_cli("compile", files / "two.onnx", "--calib", files / "two.npz", "--out", out, "--task", "fidelity", "--num-calib", 16))
    report = json.loads((out / "compile.json").read_text())
    assert report["model"]["inputs"] == [{"name": "image", "layout": "NCHW", "shape": [1, 3, 32, 32], "dtype": "float32"},
                                         {"name": "meta", "layout": "plain", "shape": [1, 16], "dtype": "float32"}]
    compiled = CompiledModel.open(out)
    samples = compiled.load_samples(files / "two.npz", 6, 3)
    assert samples.data.dtype.names == ("image", "meta") and samples.data["image"].shape == (6, 32, 32, 3)
    archive = np.load(files / "two.npz")
    picked = [int(n.split("[")[1].rstrip("]")) for n in samples.names]
    feed = onnx_feed(compiled.specs, samples.data)
    np.testing.assert_array_equal(feed["image"], archive["image"][picked])  # back in the ONNX layout, the same values
    np.testing.assert_array_equal(feed["meta"], archive["meta"][picked])
    _same_as_onnxruntime(out, files / "two.onnx", samples.data)
    # Each input reaches its own tensor: changing only the vector changes the output.
    runner = TfliteRunner(compiled.float_model)
    moved = samples.data[:1].copy()
    moved["meta"] += 1.0
    assert not np.allclose(runner.invoke(samples.data[:1]), runner.invoke(moved))

    _ok(run_cli("analyze", out, "--calib", files / "two.npz", "--num-samples", 8))
    analysis = json.loads((out / "analysis.json").read_text())
    assert analysis["model_output"]["metric"] == "output SQNR dB" and len(analysis["layers"]) >= 4
    int8_sqnr = report["accuracy"]["scores"]["tflite_int8"]["output SQNR dB"]
    proc = _ok(run_cli("tune", out, "--eval", files / "two.npz", "--min-sqnr", round(int8_sqnr + 3)))  # int8 alone misses it
    tune = json.loads((out / "tune.json").read_text())
    assert tune["reference"]["accuracy_is"] == "output SQNR dB" and "drop: none" in proc.stderr
    assert tune["budget"]["met"] and tune["chosen"]["float_layers"] and tune["chosen"]["output_sqnr_db"] >= round(int8_sqnr + 3)


def test_two_inputs_from_a_loader_judged_by_a_custom_metric(files, tmp_path):
    out = tmp_path / "two-custom"
    loader = f"{files / 'loader.py'}:samples"
    _ok(run_cli("compile", files / "two.onnx", "--calib", loader, "--out", out, "--task", "custom", "--metric",
                f"{files / 'metric.py'}:top1", "--num-calib", 20))
    report = json.loads((out / "compile.json").read_text())
    assert report["accuracy"]["labelled"] == 20 and report["calibration"]["source"].endswith("loader.py:samples")
    compiled = CompiledModel.open(out)
    samples = compiled.load_samples(loader, None)
    assert samples.labels.tolist() == [i % 5 for i in range(20)]
    outputs = compiled.sample_outputs(compiled.float_model, samples.data)
    expected = np.mean([int(np.argmax(o["logits"])) == i % 5 for i, o in enumerate(outputs)])
    assert report["accuracy"]["tflite_float32"] == pytest.approx(expected)
    _ok(run_cli("analyze", out, "--calib", loader, "--num-samples", 8))
    _ok(run_cli("tune", out, "--eval", loader, "--max-drop", 0))
    tune = json.loads((out / "tune.json").read_text())
    assert tune["reference"]["float32_accuracy"] == pytest.approx(expected)


def test_a_1d_conv_net_with_a_dynamic_time_axis(files, tmp_path):
    out = tmp_path / "kws"
    proc = run_cli("compile", files / "kws.onnx", "--calib", files / "kws.npy", "--out", out, "--task", "fidelity")
    assert proc.returncode == 2 and "set them with --input-shape features=1xNx10" in proc.stderr and not out.exists()
    _ok(run_cli("compile", files / "kws.onnx", "--calib", files / "kws.npy", "--out", out, "--task", "fidelity",
                "--input-shape", "features=1x49x10", "--num-calib", 16))
    compiled = CompiledModel.open(out)
    assert [s.to_dict() for s in compiled.specs] == [{"name": "features", "layout": "plain", "shape": [1, 49, 10], "dtype": "float32"}]
    assert TfliteRunner(compiled.float_model).input_shape == (1, 49, 10)  # the ONNX layout, not onnx2tf's channels-last
    samples = compiled.load_samples(files / "kws.npy", 8, 0)
    _same_as_onnxruntime(out, files / "kws.onnx", samples.data)
    _ok(run_cli("analyze", out, "--calib", files / "kws.npy", "--num-samples", 8))
    _ok(run_cli("tune", out, "--eval", files / "kws.npy", "--min-sqnr", 30))
    tune = json.loads((out / "tune.json").read_text())
    assert tune["chosen"]["output_sqnr_db"] >= 30 and tune["budget"]["met"]
    metric_out = tmp_path / "kws-custom"
    np.savez(tmp_path / "kws.npz", features=np.load(files / "kws.npy"), labels=np.arange(16) % 12)
    _ok(run_cli("compile", files / "kws.onnx", "--calib", tmp_path / "kws.npz", "--out", metric_out, "--task", "custom",
                "--metric", f"{files / 'metric.py'}:top1", "--input-shape", "features=1x49x10", "--num-calib", 16))
    _ok(run_cli("analyze", metric_out, "--calib", tmp_path / "kws.npz", "--num-samples", 8))
    _ok(run_cli("tune", metric_out, "--eval", tmp_path / "kws.npz", "--max-drop", 0))
    compiled = CompiledModel.open(metric_out)
    outputs = compiled.sample_outputs(compiled.float_model, compiled.load_samples(tmp_path / "kws.npz", None).data)
    expected = np.mean([int(np.argmax(o["logits"])) == i % 12 for i, o in enumerate(outputs)])
    assert json.loads((metric_out / "tune.json").read_text())["reference"]["float32_accuracy"] == pytest.approx(expected)


@pytest.mark.parametrize("calib, message", [
    ("missing.npz", "has no array for input 'meta' (it holds: image, labels)"),
    ("loader.py:not_dicts", "yielded a ndarray for sample 0; yield a dict of arrays per input name"),
    ("loader.py:missing_meta", "sample 0 has no array for input 'meta' (it has: image)"),
    ("loader.py:raises", "loader.py:raises failed: RuntimeError: the dataset is on another disk"),
    ("loader.py:nothing", "has no function 'nothing'"),
    ("kws.npy", "the model has 2 inputs (image, meta); give a .npz with one array per input, not kws.npy"),
    ("images", "is an image folder, but the model takes image [1, 3, 32, 32], meta [1, 16]"),
    ("wrong.npz", "wrong.npz['meta'] has shape (16, 8); the model input 'meta' (plain) needs (N, 16)"),
])
def test_bad_model_inputs_are_one_line_and_nothing_is_written(files, tmp_path, tiny_images, calib, message):
    np.savez(files / "missing.npz", image=np.zeros((2, 3, 32, 32), np.float32), labels=np.zeros(2))
    np.savez(files / "wrong.npz", image=np.zeros((16, 3, 32, 32), np.float32), meta=np.zeros((16, 8), np.float32))
    source = tiny_images if calib == "images" else f"{files}/{calib}"
    out = tmp_path / "out"
    proc = run_cli("compile", files / "two.onnx", "--calib", source, "--out", out, "--task", "fidelity")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-1500:]
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.strip().startswith("error: ")
    assert message in proc.stderr
    assert not out.exists()


def test_an_image_input_given_as_files_gets_its_own_preprocessing(files, tmp_path, tiny_images):
    """A loader names image files for the image input and arrays for the other; --input-prep sets
    that input's preprocessing (here tf normalisation, stretched), stored in compile.json and used again."""
    import shutil

    from quantune_edge.common.preprocessing import load_image, make_preprocessing

    shutil.copytree(tiny_images, files / "photos", dirs_exist_ok=True)
    loader = f"{files / 'loader.py'}:photos"
    out = tmp_path / "photos"
    _ok(run_cli("compile", files / "two.onnx", "--calib", loader, "--out", out, "--task", "fidelity",
                "--input-prep", "image:preset=tf", "--input-prep", "image:resize-mode=stretch"))
    report = json.loads((out / "compile.json").read_text())
    assert report["preprocessing"]["inputs"]["image"]["preset"] == "tf" and report["preprocessing"]["inputs"]["image"]["resize_mode"] == "stretch"
    compiled = CompiledModel.open(out)
    samples = compiled.load_samples(loader, 3, 0)
    photos = sorted((files / "photos").glob("*.jpg"))
    expected = make_preprocessing("tf", resize_mode="stretch").with_input_size(32)
    for k, name in enumerate(samples.names):  # the loader's k-th sample is the k-th photo
        np.testing.assert_allclose(samples.data["image"][k], load_image(photos[int(name.split("[")[1].rstrip("]"))], expected), atol=1e-6)
    assert samples.geometry is not None and samples.geometry.shape == (3, 6)
    for flag, message in ((["--input-prep", "meta:preset=tf"], "--input-prep names 'meta', which is not an image input"),
                          (["--input-prep", "image:colour=red"], "--input-prep takes NAME:KEY=VALUE"),
                          (["--input-prep", "image:pad-value=grey"], "pad-value takes a float")):
        proc = run_cli("compile", files / "two.onnx", "--calib", loader, "--out", tmp_path / "bad", "--task", "fidelity", *flag)
        assert proc.returncode == 2 and message in proc.stderr and not (tmp_path / "bad").exists(), proc.stderr
    proc = run_cli("compile", files / "two.onnx", "--calib", f"{files / 'loader.py'}:lost_photo", "--out", tmp_path / "bad", "--task", "fidelity")
    assert proc.returncode == 2 and "image no/such.jpg for input 'image' does not exist" in proc.stderr and not (tmp_path / "bad").exists()


def test_a_non_square_input_size_fixes_a_dynamic_image_input(tmp_path, tiny_images):
    """--input-size 48x64 on an image model with dynamic H and W: the model gets 48x64, every image is
    letterboxed to it, and the float32 TFLite matches ONNX Runtime there."""
    b = GraphBuilder(4)
    model = b.model(["N", 3, "H", "W"], b.head(b.node("Relu", [b.conv("input", 3, 8, stride=2)]), 8))
    onnx.save(model, tmp_path / "dyn.onnx")
    out = tmp_path / "out"
    _ok(run_cli("compile", tmp_path / "dyn.onnx", "--calib", tiny_images, "--out", out, "--input-size", "48x64",
                "--resize-mode", "letterbox", "--num-calib", 6))
    compiled = CompiledModel.open(out)
    assert compiled.specs[0].shape == (1, 3, 48, 64) and TfliteRunner(compiled.float_model).input_shape == (1, 48, 64, 3)
    samples = compiled.load_samples(tiny_images, 4, 1)
    assert samples.data.shape == (4, 48, 64, 3)
    width, height, scale, _, ox, oy = samples.geometry[0]  # a 40x40 photo scaled by 48/40 and centred in 64 columns
    assert (width, height) == (40, 40) and scale == pytest.approx(1.2) and (ox, oy) == (8, 0)
    _same_as_onnxruntime(out, tmp_path / "dyn.onnx", samples.data)
    proc = run_cli("compile", tmp_path / "dyn.onnx", "--calib", tiny_images, "--out", tmp_path / "bad", "--input-size", "48x")
    assert proc.returncode == 2 and "--input-size takes a positive S or HxW" in proc.stderr and not (tmp_path / "bad").exists()


def test_an_int64_token_input_compiles_analyzes_and_tunes(tmp_path):
    """An embedding lookup over int64 token ids: the ids go in as integers (never quantized), the
    converter's index arithmetic in front of the GATHER is exact and so not a layer to choose."""
    b = GraphBuilder(5)
    embedded = b.node("Gather", [b.const(b.rng.normal(0, 1, (50, 8))), "ids"], axis=0)
    pooled = b.node("ReduceMean", [embedded], axes=[1], keepdims=0)
    b.node("Gemm", [pooled, b.const(b.rng.normal(0, 0.3, (8, 4))), b.const(b.rng.normal(0, 0.1, 4))])
    graph = helper.make_graph(b.nodes, "ids", [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [1, 12])],
                              [helper.make_tensor_value_info(b.nodes[-1].output[0], onnx.TensorProto.FLOAT, [1, 4])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "ids.onnx")
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, 50, (16, 12)))
    out = tmp_path / "out"
    _ok(run_cli("compile", tmp_path / "ids.onnx", "--calib", tmp_path / "ids.npy", "--out", out, "--task", "fidelity"))
    compiled = CompiledModel.open(out)
    assert compiled.specs[0].dtype == "int64" and compiled.specs[0].layout == "plain"
    samples = compiled.load_samples(tmp_path / "ids.npy", 8, 0)
    assert samples.data.dtype == np.int64
    _same_as_onnxruntime(out, tmp_path / "ids.onnx", samples.data)
    assert [layer.op_type for layer in compiled.layer_match.layers] == ["GATHER", "MEAN", "FULLY_CONNECTED"]
    assert compiled.layer_match.exact  # the index arithmetic onnx2tf puts in front of the GATHER
    _ok(run_cli("analyze", out, "--calib", tmp_path / "ids.npy", "--num-samples", 8))
    _ok(run_cli("tune", out, "--eval", tmp_path / "ids.npy", "--min-sqnr", 45))
    assert float(json.loads((out / "tune.json").read_text())["chosen"]["output_sqnr_db"]) >= 45  # JSON writes inf as "inf"
