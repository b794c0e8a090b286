"""Local metrics, sensitivity ranking and the oracle, on the shipped EfficientNet-Lite0 and small built nets."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import DEMO_IMAGES, GraphBuilder, nhwc_net, residual_net

from quantune_edge import CompileOptions, compile_model
from quantune_edge.analyze.analysis import AnalysisError, AnalysisOptions, analyze
from quantune_edge.compile.artifacts import CompiledModel
from quantune_edge.errors import InputError
from quantune_edge.model import tflite_graph
from quantune_edge.model.runtime import TfliteRunner

K = 8


@pytest.fixture(scope="module")
def analysed(effnet_compiled, tmp_path_factory):
    """A private copy of the shared compile: other modules analyse the shared folder too (with other
    options), so the analysis files there are not this module's to read, whatever order tests run in."""
    folder = tmp_path_factory.mktemp("analysed") / "out"
    shutil.copytree(effnet_compiled, folder)
    return folder


@pytest.fixture(scope="module")
def effnet_analysis(analysed):
    return analyze(analysed, DEMO_IMAGES, AnalysisOptions(num_samples=K))


@pytest.fixture(scope="module")
def small_compiled(tiny_images, save_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("small") / "out"
    compile_model(save_model(residual_net(batch=1), "residual_for_analysis"), tiny_images, out, CompileOptions(num_calib=8, per_channel=False))
    return out


def _numpy_sqnr(ref: np.ndarray, approx: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    return 10 * math.log10(np.sum(ref**2) / np.sum((ref - approx.astype(np.float64)) ** 2))


def _preserved(compiled: CompiledModel, inputs: np.ndarray):
    """Every sample through both models with all tensors kept; yields (float runner, int8 runner)."""
    fr = TfliteRunner(compiled.float_model, 1, preserve_all_tensors=True)
    qr = TfliteRunner(compiled.int8_model, 1, preserve_all_tensors=True)
    for x in inputs:
        fr.invoke(x[None])
        qr.invoke(x[None])
        yield fr, qr


def _int8_value(runner, graph, index) -> np.ndarray:
    t = graph.tensors[index]
    return (runner.interpreter.get_tensor(index).astype(np.float64) - t.zero_points[0]) * t.scales[0]


def test_exactly_one_float_and_one_int8_pass(effnet_analysis):
    r = effnet_analysis
    # per local sample (all K here): one layer-kernel invocation runs every layer's float op, one adjoint-model
    # invocation the backward pass
    assert r.invocations == {"float32": K, "int8": K, "layer_kernels": K, "backward": K}
    assert r.samples["count"] == K
    assert r.samples["backward_pass"] == "tflite"  # every op of the model has a TFLite adjoint rule
    parts = r.timings_s["analysis_parts"]
    assert set(parts) == {"invocations", "compare", "local_errors", "backward"} and all(v > 0 for v in parts.values())
    assert sum(parts.values()) <= r.timings_s["analysis"]
    assert r.model["layers"] == len(r.layers) >= 60
    assert r.unmatched == {"float32": [], "int8": []}
    assert r.preserve_all_tensors_check["identical"] is True
    assert sorted(r.sensitivity_order) == [layer["index"] for layer in r.layers]
    assert set(r.scores) >= {"sqnr_delta", "act_sqnr", "weight_sqnr", "act_mse", "weight_mse", "quantune"}


def test_metrics_match_numpy_on_one_layer(effnet_analysis, effnet_compiled):
    compiled = CompiledModel.open(effnet_compiled)
    fg, qg = tflite_graph.read(compiled.float_model), tflite_graph.read(compiled.int8_model)
    samples = compiled.load_samples(DEMO_IMAGES, K, 0)
    assert samples.names == effnet_analysis.samples["files"]
    layer = next(l for l in effnet_analysis.layers if l["op_type"] == "DEPTHWISE_CONV_2D" and l["index"] > 5)
    from quantune_edge.model.layers import match_layers

    match = match_layers(fg, qg)
    info = match.layers[layer["index"]]
    refs, approxs, in_refs, in_approxs = [], [], [], []
    for fr, qr in _preserved(compiled, compiled.tflite_inputs(samples)):
        refs.append(fr.interpreter.get_tensor(info.float_output).copy())
        approxs.append(_int8_value(qr, qg, info.int8_output))
        in_refs.append(fr.interpreter.get_tensor(match.tensor_map[info.int8_inputs[0]]).copy())
        in_approxs.append(_int8_value(qr, qg, info.int8_inputs[0]))
    ref, approx = np.stack(refs), np.stack(approxs)
    assert layer["act_sqnr_db"] == pytest.approx(_numpy_sqnr(ref, approx), abs=1e-3)
    assert layer["act_mse"] == pytest.approx(float(np.mean((ref - approx) ** 2)), rel=1e-4)
    assert layer["act_max_abs_err"] == pytest.approx(float(np.max(np.abs(ref - approx))), rel=1e-5)
    input_sqnr = _numpy_sqnr(np.stack(in_refs), np.stack(in_approxs))
    assert layer["input_sqnr_db"] == pytest.approx(input_sqnr, abs=1e-3)
    assert layer["sqnr_delta_db"] == pytest.approx(input_sqnr - layer["act_sqnr_db"], abs=1e-3)

    # Weights: float kernel vs int8 kernel dequantized with its per-channel scales (depthwise: last axis).
    w_float = fg.tensors[info.float_weight].data.astype(np.float64)
    wq = qg.tensors[info.int8_weight]
    w_deq = wq.data.astype(np.float64) * np.asarray(wq.scales).reshape(1, 1, 1, -1)
    assert len(wq.scales) == w_float.shape[-1] > 1
    assert layer["weight_sqnr_db"] == pytest.approx(_numpy_sqnr(w_float, w_deq), abs=1e-3)
    assert layer["weight_mse"] == pytest.approx(float(np.mean((w_float - w_deq) ** 2)), rel=1e-4)
    assert layer["params"] == w_float.size + w_float.shape[-1]  # kernel + bias
    assert layer["macs"] == int(np.prod(ref.shape[2:4])) * w_float.size


def test_local_error_is_the_layers_own_error_on_its_int8_input(effnet_analysis, effnet_compiled):
    """local_rmse_lsb of a conv = RMS(int8 output - float conv of the int8 input) / output scale, by hand."""
    from quantune_edge.model.layers import match_layers

    compiled = CompiledModel.open(effnet_compiled)
    fg, qg = tflite_graph.read(compiled.float_model), tflite_graph.read(compiled.int8_model)
    info = next(l for l in match_layers(fg, qg).layers if l.op_type == "CONV_2D" and l.index > 10 and l.fused_activation == "RELU6")
    kernel = fg.tensors[info.float_weight].data.astype(np.float64)
    assert kernel.shape[1:3] == (1, 1)  # a 1x1 expansion conv with ReLU6
    w = kernel[:, 0, 0, :]
    bias = fg.tensors[fg.ops[info.float_op].inputs[2]].data
    errs = []
    for _, qr in _preserved(compiled, compiled.tflite_inputs(compiled.load_samples(DEMO_IMAGES, K, 0))):
        own = np.clip(_int8_value(qr, qg, info.int8_inputs[0]) @ w.T + bias, 0, 6)
        errs.append(_int8_value(qr, qg, info.int8_output) - own)
    layer = effnet_analysis.layers[info.index]
    scale = qg.tensors[info.int8_output].scales[0]
    assert layer["local_rmse_lsb"] == pytest.approx(math.sqrt(np.mean(np.square(errs))) / scale, rel=1e-3)
    assert 0.2 < layer["local_rmse_lsb"] < 5  # about the output's own rounding step, as int8 should be
    means = [l for l in effnet_analysis.layers if l["op_type"] == "MEAN"]
    assert means and all(l["local_rmse_lsb"] is None for l in means)  # no kernel: ranked last, not guessed


def test_weighted_layers_have_finite_positive_weight_sqnr(effnet_analysis):
    convs = [l for l in effnet_analysis.layers if l["op_type"] in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")]
    assert len(convs) >= 50
    for layer in convs:
        assert math.isfinite(layer["weight_sqnr_db"]) and layer["weight_sqnr_db"] > 20, layer["short_name"]
        assert layer["act_scale"] > 0 and layer["macs"] > 0
    others = [l for l in effnet_analysis.layers if l not in convs]
    assert others and all(l["weight_sqnr_db"] is None for l in others)


def test_multi_input_add_pools_its_inputs_and_exact_input_gives_finite_delta(effnet_analysis):
    adds = [l for l in effnet_analysis.layers if l["op_type"] == "ADD"]
    assert adds and all(math.isfinite(l["input_sqnr_db"]) for l in adds)
    first = effnet_analysis.layers[0]
    # (p - 127) / 128 is exactly representable in int8: the first conv's input has no error at all.
    assert first["input_sqnr_db"] == math.inf
    assert math.isfinite(first["sqnr_delta_db"]) and first["sqnr_delta_db"] > 0


def test_outputs_written(effnet_analysis, analysed):
    data = json.loads((analysed / "analysis.json").read_text())
    assert data["kind"] == "quantune-edge/analysis" and data["schema_version"] >= 1
    assert data["invocations"] == {"float32": K, "int8": K, "layer_kernels": K, "backward": K}
    rows = (analysed / "analysis.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + len(effnet_analysis.layers) and rows[0].startswith("index,rank,name")
    png = (analysed / "analysis.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_a_failed_plot_keeps_the_previous_analysis_files_together(effnet_analysis, effnet_compiled, tmp_path, monkeypatch):
    from quantune_edge.analyze import figures
    from quantune_edge.analyze.analysis import save

    folder = tmp_path / "out"
    folder.mkdir()
    save(effnet_analysis, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert sorted(before) == ["analysis.csv", "analysis.json", "analysis.png"]

    def broken(report, path):
        Path(path).write_bytes(b"half a png")
        raise RuntimeError("no space left on device")

    monkeypatch.setattr(figures, "plot_analysis", broken)
    with pytest.raises(RuntimeError, match="no space"):
        save(dataclasses.replace(effnet_analysis, created="a later analysis"), folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing replaced, no temp file left


def _damage_int8_weights(path, tensor_index: int) -> None:
    """Overwrite one int8 weight tensor in the .tflite file with noise (the layer is now wrong)."""
    graph = tflite_graph.read(path)
    original = graph.tensors[tensor_index].data.astype(np.int8)
    content = path.read_bytes()
    raw = original.tobytes()
    assert content.count(raw) == 1
    noise = np.random.default_rng(0).integers(-90, 90, original.shape)
    damaged = np.clip(original.astype(np.int16) + noise, -127, 127).astype(np.int8).tobytes()
    path.write_bytes(content.replace(raw, damaged))


def test_damaged_layer_ranks_first(effnet_compiled, effnet_analysis, tmp_path):
    folder = tmp_path / "damaged"
    shutil.copytree(effnet_compiled, folder)
    compiled = CompiledModel.open(folder)
    from quantune_edge.model.layers import match_layers

    match = match_layers(tflite_graph.read(compiled.float_model), tflite_graph.read(compiled.int8_model))
    victim = next(l for l in match.layers if l.op_type == "CONV_2D" and l.index >= 20 and l.fused_activation == "NONE")
    assert effnet_analysis.sensitivity_order[0] != victim.index
    _damage_int8_weights(compiled.int8_model, victim.int8_weight)
    report = analyze(folder, DEMO_IMAGES, AnalysisOptions(num_samples=4))
    assert report.sensitivity_order[0] == victim.index
    assert report.layers[victim.index]["weight_sqnr_db"] < 10
    for metric in ("weight_sqnr", "weight_mse"):
        assert analyze(folder, DEMO_IMAGES, AnalysisOptions(num_samples=2, metric=metric)).sensitivity_order[0] == victim.index


def test_mismatched_model_pair_is_refused(effnet_analysis, analysed, small_compiled, tmp_path):
    folder = tmp_path / "mixed_up"
    shutil.copytree(analysed, folder)  # with this module's analysis in it, which the refusal must leave alone
    shutil.copy(small_compiled / "model_int8.tflite", folder / "model_int8.tflite")
    before = (folder / "analysis.json").read_bytes()
    with pytest.raises(InputError, match="not a pair"):
        analyze(folder, DEMO_IMAGES, AnalysisOptions(num_samples=2))
    assert (folder / "analysis.json").read_bytes() == before  # nothing overwritten


def test_inf_inside_a_layer_names_the_layer(tiny_images, save_model, tmp_path):
    out = tmp_path / "nhwc"
    compile_model(save_model(nhwc_net(), "nhwc_for_nan"), tiny_images, out, CompileOptions(num_calib=4))
    huge = np.full((2, 32, 32, 3), 3e38, np.float32)  # finite input; the float conv overflows
    np.save(tmp_path / "huge.npy", huge)
    with pytest.raises(AnalysisError, match=r"NaN or Inf in layer '.+'"):
        analyze(out, tmp_path / "huge.npy", AnalysisOptions(num_samples=2))
    assert not (out / "analysis.json").exists()


def test_bad_options(small_compiled, tiny_images, tmp_path):
    with pytest.raises(InputError, match="unknown metric"):
        analyze(small_compiled, tiny_images, AnalysisOptions(metric="nope"))
    with pytest.raises(InputError, match="num-samples"):
        analyze(small_compiled, tiny_images, AnalysisOptions(num_samples=0))
    with pytest.raises(InputError, match="local-samples"):
        analyze(small_compiled, tiny_images, AnalysisOptions(local_samples=0))
    with pytest.raises(InputError):
        analyze(tmp_path / "missing", tiny_images)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no images"):
        analyze(small_compiled, empty)


def test_oracle_builds_one_model_per_layer(small_compiled, tiny_images):
    report = analyze(small_compiled, tiny_images, AnalysisOptions(num_samples=6, oracle=True))
    o = report.oracle
    assert o["compared"] == "model output" and TfliteRunner(small_compiled / "model_float32.tflite", logits=True).logits_tensor is None
    n = len(report.layers)
    assert o["builds"] == n + 1 and len(o["layers"]) == n
    assert o["invocations"] == (n + 2) * 6
    assert set(o["spearman"]) == set(report.scores)
    assert o["time_ratio_oracle_over_analysis"] > 1
    gains = [row["output_sqnr_gain_db"] for row in o["layers"]]
    assert all(math.isfinite(g) for g in gains)
    # Per-tensor weights: keeping a conv float must change (and here improve) the model output.
    conv_gains = [row["output_sqnr_gain_db"] for row, layer in zip(o["layers"], report.layers) if layer["op_type"] == "CONV_2D"]
    assert max(conv_gains) > 0.1
    assert report.invocations == {"float32": 6, "int8": 6, "layer_kernels": 6, "backward": 6}  # the oracle's runs are counted apart
    rep = o["repeatability"]
    assert rep["samples_per_half"] == 3 and -1.0 <= rep["spearman_between_halves"] <= 1.0


def test_runner_reads_logits_before_a_final_softmax(tiny_images, save_model, tmp_path):
    """The oracle compares logits: softmax of what logits=True returns is the model's own output."""
    g = GraphBuilder(4)
    x = g.relu6(g.bn(g.conv("input", 3, 8, 3, 2), 8))
    model = g.model([1, 3, 32, 32], g.node("Softmax", [g.head(x, 8)], axis=1))
    out = tmp_path / "out"
    compile_model(save_model(model, "softmax_net"), tiny_images, out, CompileOptions(num_calib=4))
    compiled = CompiledModel.open(out)
    inputs = compiled.tflite_inputs(compiled.load_samples(tiny_images, 3))
    for path in (compiled.float_model, compiled.int8_model):
        probs = TfliteRunner(path).run(inputs)
        runner = TfliteRunner(path, logits=True)
        assert runner.logits_tensor is not None
        logits = runner.run(inputs)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        np.testing.assert_allclose(e / e.sum(axis=1, keepdims=True), probs, atol=0.01)
        assert np.ptp(logits) > 1.0  # not probabilities


def test_output_share_is_the_default_and_attributes_the_logit_error(effnet_analysis):
    """Every conv has a share of the int8 logit error; together they account for about all of it."""
    assert effnet_analysis.metric == "output_share" and effnet_analysis.samples["output_share_note"] is None
    assert effnet_analysis.samples["local"] == K  # fewer samples than LOCAL_SAMPLES: all of them
    convs = [l for l in effnet_analysis.layers if l["op_type"] in ("CONV_2D", "DEPTHWISE_CONV_2D")]
    shares = [l["output_share"] for l in convs]
    assert all(s is not None and math.isfinite(s) for s in shares)
    assert 0.3 < sum(shares) < 2.0  # first order: independent errors would sum to exactly 1
    assert max(shares) > 5 * np.median(np.abs(shares))  # a few layers carry the error, as the oracle finds
    assert [l["index"] for l in effnet_analysis.most_sensitive(1)] == [max(convs, key=lambda l: l["output_share"])["index"]]
    # An int8 Add is exact but for rounding its output, and a float Add's output is rounded to the same
    # grid for the int8 conv that reads it: keeping it float removes (almost) nothing.
    adds = [l["output_share"] for l in effnet_analysis.layers if l["op_type"] == "ADD"]
    assert adds and max(abs(a) for a in adds) < 0.05 * max(shares)


def test_output_share_predicts_what_keeping_a_layer_float_does(effnet_compiled, effnet_analysis):
    """The layer with the largest share, kept float, lifts the logits' SQNR by more than the conv with
    the smallest (24 % vs 0.003 % here); measured by re-quantizing with each one float (two oracle builds)."""
    import tempfile
    from pathlib import Path

    from quantune_edge.analyze.oracle import build_and_run
    from quantune_edge.common.metrics import sqnr_db

    compiled = CompiledModel.open(effnet_compiled)
    samples = compiled.tflite_inputs(compiled.load_samples(DEMO_IMAGES, K, 0))
    reference = TfliteRunner(compiled.float_model, logits=True).run(samples)
    convs = [l for l in effnet_analysis.layers if l["op_type"] in ("CONV_2D", "DEPTHWISE_CONV_2D")]
    top, bottom = max(convs, key=lambda l: l["output_share"]), min(convs, key=lambda l: abs(l["output_share"]))
    with tempfile.TemporaryDirectory() as tmp:
        gain = {name: sqnr_db(reference, build_and_run(compiled, [name], samples, 2, Path(tmp))) for name in (top["name"], bottom["name"])}
        base = sqnr_db(reference, build_and_run(compiled, [], samples, 2, Path(tmp)))
    assert gain[top["name"]] - base > 0.2
    assert gain[top["name"]] - base > 2 * abs(gain[bottom["name"]] - base)  # here 0.49 dB vs -0.16 dB


def test_without_a_backward_rule_the_ranking_falls_back_to_local_rmse(tiny_images, save_model, tmp_path):
    """An ELU (no rule) between the convs and the logits: no share, a warning, local_rmse ranks."""
    g = GraphBuilder(5)
    x = g.node("Elu", [g.conv("input", 3, 8, 3, 2)])
    out = tmp_path / "elu"
    compile_model(save_model(g.model([1, 3, 32, 32], g.head(g.relu6(g.conv(x, 8, 8, 3, 1)), 8)), "elu_net"), tiny_images, out,
                  CompileOptions(num_calib=4))
    report = analyze(out, tiny_images, AnalysisOptions(num_samples=4))
    assert "ELU" in report.samples["output_share_note"]
    assert report.metric == "local_rmse" and all(l["output_share"] is None for l in report.layers)
    assert report.sensitivity_order == [int(i) for i in np.argsort(-np.array(report.scores["local_rmse"]), kind="stable")]


def test_runner_view_reads_the_tensor_without_a_copy_and_must_not_outlive_the_invocation(effnet_compiled):
    compiled = CompiledModel.open(effnet_compiled)
    inputs = compiled.tflite_inputs(compiled.load_samples(DEMO_IMAGES, 2))
    fg, qg = tflite_graph.read(compiled.float_model), tflite_graph.read(compiled.int8_model)
    fr, qr = next(_preserved(compiled, inputs))
    f_index = fg.ops[3].outputs[0]
    view = fr.view(f_index)
    np.testing.assert_array_equal(view, fr.tensor(f_index))
    assert not view.flags.writeable and not view.flags.owndata
    with pytest.raises(RuntimeError, match="reference"):
        fr.invoke(inputs[1][None])
    del view
    fr.invoke(inputs[1][None])
    q_index = next(t for op in qg.ops if op.type == "CONV_2D" for t in op.outputs)
    np.testing.assert_array_equal(qr.view(q_index), _int8_value(qr, qg, q_index).astype(np.float32))


def test_the_threaded_comparison_equals_a_single_thread(small_compiled, tiny_images):
    """Tensors and layers are dealt to threads; every statistic must be what one thread computes."""
    one, two = (analyze(small_compiled, tiny_images, AnalysisOptions(num_samples=4, threads=n)) for n in (1, 2))
    keys = ("act_sqnr_db", "act_mse", "act_max_abs_err", "input_sqnr_db", "local_rmse_lsb", "output_share")
    pairs = [(a[k], b[k]) for a, b in zip(one.layers, two.layers, strict=True) for k in keys]
    assert all((x is None) == (y is None) for x, y in pairs)
    assert [x for x, y in pairs if x is not None] == pytest.approx([y for x, y in pairs if y is not None], rel=1e-6)
    assert sum(a["local_rmse_lsb"] is not None for a in one.layers) >= 3
    assert sum(a["output_share"] is not None for a in one.layers) >= 3


def test_balanced_partition_deals_every_item_once():
    from quantune_edge.analyze.analysis import balanced

    sizes = {0: 90, 1: 50, 2: 40, 3: 10, 4: 10}
    parts = balanced(list(sizes), sizes.get, 2)
    assert sorted(i for p in parts for i in p) == list(sizes)
    assert sorted(sum(sizes[i] for i in p) for p in parts) == [100, 100]
    assert balanced([7], lambda i: 1, 4) == [[7]] and balanced([], sizes.get, 2) == []
