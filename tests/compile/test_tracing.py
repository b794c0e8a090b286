"""TFLite ops traced back to ONNX nodes: on the shipped EfficientNet-Lite0 and on small nets built
here (residual Add, depthwise + BN + ReLU6, Pad folded into a conv), through analyze, tune and the CLI."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from conftest import DEMO_MODEL, pad_conv_net, residual_net
from typer.testing import CliRunner

from quantune_edge import CompileOptions, compile_model
from quantune_edge.analyze.analysis import AnalysisOptions, analyze
from quantune_edge.cli import app
from quantune_edge.compile.artifacts import CompiledModel
from quantune_edge.compile.tracing import layout_match, onnx_label, short_label
from quantune_edge.errors import InputError
from quantune_edge.model import tflite_graph
from quantune_edge.tune.tuning import TuneOptions, tune

WEIGHTED = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"}


@pytest.fixture(scope="module")
def residual(tiny_images, save_model, tmp_path_factory):
    """residual_net compiled (per-tensor) and analysed; returns (folder, ONNX path)."""
    onnx_path = save_model(residual_net(batch=1), "residual_for_tracing")
    out = tmp_path_factory.mktemp("trace") / "residual"
    compile_model(onnx_path, tiny_images, out, CompileOptions(num_calib=8, per_channel=False))
    analyze(out, tiny_images, AnalysisOptions(num_samples=4))
    return out, onnx_path


def _trace(folder) -> dict:
    return json.loads((folder / "compile.json").read_text())["trace"]


def _ops(folder, model="float32") -> list[dict]:
    return [e for e in _trace(folder)[model] if e["onnx_output"] is not None]


def test_effnet_every_weighted_op_traces_to_its_onnx_conv_or_gemm(effnet_compiled):
    trace = _trace(effnet_compiled)
    model = onnx.load(DEMO_MODEL)
    weighted_onnx = {n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm")}
    seen = []
    for entry in trace["float32"]:
        if entry["op_type"] in WEIGHTED:
            mains = [n for n, op in zip(entry["onnx_nodes"], entry["onnx_ops"]) if op in ("Conv", "Gemm")]
            assert len(mains) == 1, entry
            seen.append(mains[0])
    assert sorted(seen) == sorted(weighted_onnx)  # every ONNX Conv/Gemm once, none invented
    assert trace["untraced"] == {"float32": [], "int8": []} and trace["onnx_nodes_without_op"] == []
    by_node = {e["onnx_nodes"][e["onnx_ops"].index("Conv")]: e for e in trace["float32"] if "Conv" in e["onnx_ops"]}
    stem = by_node["/_conv_stem/Conv"]  # static padding and ReLU6 fused into the stem conv
    assert stem["op_type"] == "CONV_2D" and stem["onnx_nodes"] == ["/_conv_stem/static_padding/Pad", "/_conv_stem/Conv", "/_swish/Clip"]
    dw = by_node["/_blocks.3/_depthwise_conv/Conv"]
    assert dw["op_type"] == "DEPTHWISE_CONV_2D" and dw["onnx_ops"] == ["Pad", "Conv", "Clip"]
    # int8: every op but the boundaries inherits its float32 partner's trace.
    f = {e["op"]: e for e in trace["float32"]}
    for entry in trace["int8"]:
        if entry["op_type"] in ("QUANTIZE", "DEQUANTIZE"):
            assert entry["onnx_nodes"] == [] and "boundary" in entry["reason"]
        else:
            assert entry["onnx_nodes"] == f[entry["float32_op"]]["onnx_nodes"] and entry["op_type"] == f[entry["float32_op"]]["op_type"]


def test_residual_net_fused_bn_and_activations_are_listed_under_their_conv(residual):
    folder, onnx_path = residual
    trace = _trace(folder)
    ops = {e["op_type"]: [] for e in _ops(folder)}
    for e in _ops(folder):
        ops[e["op_type"]].append(e["onnx_ops"])
    assert ops["CONV_2D"] == [["Conv", "BatchNormalization", "Clip"], ["Conv", "BatchNormalization"]]
    assert ops["DEPTHWISE_CONV_2D"] == [["Conv", "BatchNormalization", "Clip"]]
    assert ops["ADD"] == [["Add", "Relu"]] and ops["FULLY_CONNECTED"] == [["Flatten", "Gemm"]]
    assert ops["MEAN"] == [["GlobalAveragePool"]]
    model = onnx.load(onnx_path)
    assert trace["onnx_nodes_without_op"] == [] and trace["onnx_compute_nodes"] == len(model.graph.node)
    # onnx2tf pads the stride-2 stem explicitly: that PAD has no ONNX tensor; it is listed, with the conv it belongs to.
    untraced = trace["untraced"]["float32"]
    assert [u["op_type"] for u in untraced] == ["PAD"]
    stem_conv = next(e for e in _ops(folder) if e["op_type"] == "CONV_2D")["onnx_nodes"][0]
    assert "output equals no ONNX tensor" in untraced[0]["reason"] and stem_conv in untraced[0]["reason"]


def test_pad_folded_into_conv_is_traced_to_both(tiny_images, save_model, tmp_path):
    out = tmp_path / "pad"
    compile_model(save_model(pad_conv_net(), "pad_for_tracing"), tiny_images, out, CompileOptions(num_calib=4))
    graph = tflite_graph.read(out / "model_float32.tflite")
    assert graph.count("PAD") == 0  # folded
    convs = [e for e in _ops(out) if e["op_type"] == "CONV_2D"]
    assert [e["onnx_ops"] for e in convs] == [["Pad", "Conv", "Clip"], ["Pad", "Conv", "Clip"]]
    assert _trace(out)["untraced"]["float32"] == []


def test_analysis_and_tune_name_layers_in_both_languages(residual, tiny_images, tmp_path):
    folder = tmp_path / "work"
    shutil.copytree(residual[0], folder)
    data = json.loads((folder / "analysis.json").read_text())
    convs = [layer for layer in data["layers"] if layer["op_type"] == "CONV_2D"]
    assert all(layer["onnx_nodes"] and "Conv" in layer["onnx_ops"] for layer in convs)
    header = (folder / "analysis.csv").read_text().splitlines()[0].split(",")
    assert {"name", "onnx_nodes", "onnx_ops"} <= set(header)
    report = tune(folder, tiny_images, TuneOptions(float_layers=1, num_eval=4, latency_runs=2))
    chosen = report.chosen["layers"]
    assert chosen and all(layer["onnx_nodes"] and layer["name"] for layer in chosen)


def _mixed_bytes(folder, images, **keep) -> bytes:
    # Not fusion-aware: region growth prices layers with latencies measured in this run, so it may differ.
    tune(folder, images, TuneOptions(float_layers=0, fusion_aware=False, num_eval=4, latency_runs=2, **keep))
    return (folder / "model_mixed.tflite").read_bytes()


def test_keep_float_by_onnx_name_glob_or_regex_builds_the_same_model_as_by_tflite_name(residual, tiny_images, tmp_path):
    folder = tmp_path / "work"
    shutil.copytree(residual[0], folder)
    layers = json.loads((folder / "analysis.json").read_text())["layers"]
    dw = next(layer for layer in layers if layer["op_type"] == "DEPTHWISE_CONV_2D")
    conv_node = dw["onnx_nodes"][0]
    by_tflite = _mixed_bytes(folder, tiny_images, keep_float=[dw["name"]])
    assert _mixed_bytes(folder, tiny_images, keep_float=[conv_node]) == by_tflite
    assert _mixed_bytes(folder, tiny_images, keep_float=[dw["onnx_nodes"][1]]) == by_tflite  # its fused BN names it too
    assert _mixed_bytes(folder, tiny_images, keep_float=["re:^" + conv_node.replace("/", "\\/") + "$"]) == by_tflite
    assert _mixed_bytes(folder, tiny_images, keep_float=["*depthwise*"]) == by_tflite
    assert by_tflite != _mixed_bytes(folder, tiny_images)
    typo = conv_node + "9"
    with pytest.raises(InputError, match=f"matches no layer.*closest: {conv_node}"):
        tune(folder, tiny_images, TuneOptions(keep_float=[typo], num_eval=4))


def test_keep_int8_layers_are_never_float_even_to_close_a_region(residual, tiny_images, tmp_path):
    folder = tmp_path / "work"
    shutil.copytree(residual[0], folder)
    layers = json.loads((folder / "analysis.json").read_text())["layers"]
    pinned = next(layer for layer in layers if layer["op_type"] == "DEPTHWISE_CONV_2D")
    others = [layer["name"] for layer in layers if layer is not pinned]
    # Unpinned, region growth closes the region over the depthwise layer (every other layer is float) ...
    grown = tune(folder, tiny_images, TuneOptions(float_layers=0, keep_float=others, num_eval=4, latency_runs=2))
    assert pinned["index"] in grown.chosen["float_layers"], grown.chosen["float_layers"]
    # ... and --keep-int8 is what stops it.
    report = tune(folder, tiny_images, TuneOptions(float_layers=len(layers) - 1, keep_int8=[pinned["onnx_nodes"][0]],
                                                   num_eval=4, latency_runs=2))
    assert pinned["index"] not in report.chosen["float_layers"]
    assert len(report.chosen["float_layers"]) == len(layers) - 1
    mixed = tflite_graph.read(folder / "model_mixed.tflite")
    dw = next(op for op in mixed.ops if op.type == "DEPTHWISE_CONV_2D")
    assert mixed.tensors[dw.outputs[0]].dtype == "int8"
    with pytest.raises(InputError, match="both name"):
        tune(folder, tiny_images, TuneOptions(keep_float=[pinned["name"]], keep_int8=[pinned["onnx_nodes"][0]], num_eval=4))


def test_layers_command_table_and_json(residual):
    folder = residual[0]
    runner = CliRunner()
    result = runner.invoke(app, ["layers", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["kind"] == "quantune-edge/layers" and len(data["layers"]) == len(json.loads((folder / "analysis.json").read_text())["layers"])
    conv = next(row for row in data["layers"] if row["op_type"] == "CONV_2D")
    assert conv["onnx_ops"] == ["Conv", "BatchNormalization", "Clip"] and conv["macs"] > 0 and conv["int8_scale"] > 0
    text = runner.invoke(app, ["layers", str(folder)])
    assert text.exit_code == 0 and conv["onnx_nodes"][0] in text.output and "BatchNormalization" in text.output
    assert "PAD not traced" in text.output
    bad = runner.invoke(app, ["tune", str(folder), "--eval", str(folder), "--keep-float", "no_such_node"])
    assert bad.exit_code == 2 and "matches no layer" in bad.output


def test_compile_made_before_tracing_is_traced_on_demand(residual, tmp_path):
    folder, onnx_path = residual
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    report = json.loads((old / "compile.json").read_text())
    expected = report.pop("trace")
    (old / "compile.json").write_text(json.dumps(report))
    assert CompiledModel.open(old).trace["float32"] == expected["float32"]
    assert json.loads((old / "compile.json").read_text())["trace"]["float32"] == expected["float32"]  # kept

    gone = tmp_path / "gone"
    shutil.copytree(old, gone)
    report["model"]["path"] = str(tmp_path / "moved.onnx")
    (gone / "compile.json").write_text(json.dumps(report))
    result = CliRunner().invoke(app, ["layers", str(gone)])
    assert result.exit_code == 2 and "re-run 'quantune-edge compile'" in result.output


def test_layout_match_and_labels():
    rng = np.random.default_rng(0)
    nchw = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    assert layout_match(nchw.transpose(0, 2, 3, 1), nchw) == 2
    assert layout_match(nchw.reshape(2, -1), nchw) == 1
    assert layout_match(nchw.transpose(0, 2, 3, 1) * 1.01, nchw) == 0
    assert layout_match(nchw[:, :2], nchw) == 0
    assert short_label("/_blocks.1/_expand_conv/Conv", "Conv") == "_blocks.1/_expand_conv"
    assert short_label("/_blocks.1/_swish_1/Clip", "Clip") == "_blocks.1/_swish_1"
    assert short_label("fire2/squeeze1x1_1", "Conv") == "fire2/squeeze1x1_1"
    assert onnx_label({"onnx_nodes": ["/a/Pad", "/a/Conv", "/b/Clip"], "onnx_ops": ["Pad", "Conv", "Clip"]}) == "a"
    assert onnx_label({"onnx_nodes": [], "onnx_ops": []}) is None
