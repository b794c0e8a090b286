"""Mixed precision that wins a detector back (YOLOv5n, whose full int8 scores 0 mAP): the mixed model
is spliced op by op from the float32 and int8 models (no int8 round trip between float ops, the int8
ops keep their scales), the analysis sees the head's requantization, and keeping its tail float
recovers the float model's mAP."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import DEMO_IMAGES, run_cli, shared

from quantune_edge.compile.artifacts import CompiledModel
from quantune_edge.errors import InputError
from quantune_edge.model import tflite_graph
from quantune_edge.model.layers import float_units, requantizations, requantized_tails
from quantune_edge.model.runtime import TfliteRunner
from quantune_edge.model.splice import splice
from quantune_edge.tune import selection

VAL = "detection/coco-val2017-128"


def int8_paths_between_float_ops(graph: tflite_graph.TfliteGraph) -> list[tuple[int, int]]:
    """(float op, float op) pairs joined through int8 tensors: a float op's output quantized and, after
    int8 ops or none, dequantized into another float op."""
    found = []
    for op in graph.ops:
        if op.type == "DEQUANTIZE" or graph.tensors[op.outputs[0]].dtype != "float32":
            continue
        for t in op.inputs:
            dq = graph.producer(t) if t >= 0 else None
            if dq is None or dq.type != "DEQUANTIZE":
                continue
            todo, seen = [dq.inputs[0]], set()
            while todo:
                producer = graph.producer(todo.pop())
                if producer is None or producer.index in seen:
                    continue
                seen.add(producer.index)
                for i in producer.inputs:
                    if i < 0 or graph.tensors[i].is_constant:
                        continue
                    source = graph.producer(i)
                    if graph.tensors[i].dtype == "float32":
                        if source is not None:  # a float op's output went int8 on the way here
                            found.append((source.index, op.index))
                    else:
                        todo.append(i)
    return found


def test_splice_equals_tf_selective_quantization_where_tf_can_say_it(effnet_compiled):
    """On a classifier the converter's own selective quantization and the splice build the same model
    (outputs bit for bit); no layer float is the int8 model, every layer float the float32 model."""
    from tensorflow.lite.python import convert

    compiled = CompiledModel.open(effnet_compiled)
    layers = compiled.layer_match.layers
    x = compiled.tflite_inputs(compiled.load_samples(DEMO_IMAGES, 4, 3))
    chosen = [layers[0], layers[1], layers[len(layers) // 2]]
    tf_model = convert.mlir_quantize(compiled.calibrated_model.read_bytes(), denylisted_nodes=[layer.name for layer in chosen])
    runs = {}
    for key, content in (("tf", tf_model), ("splice", compiled.mixed([layer.name for layer in chosen])), ("none", compiled.mixed([])),
                         ("all", compiled.mixed([layer.name for layer in layers]))):
        path = effnet_compiled.parent / f"{key}.tflite"
        path.write_bytes(content)
        runs[key] = TfliteRunner(path).run(x)
    np.testing.assert_array_equal(runs["splice"], runs["tf"])
    np.testing.assert_array_equal(runs["none"], TfliteRunner(compiled.int8_model).run(x))
    np.testing.assert_allclose(runs["all"], TfliteRunner(compiled.float_model).run(x), rtol=0, atol=1e-5)
    with pytest.raises(InputError, match="not a layer"):
        compiled.mixed(["no such layer"])


def test_yolov5n_layers_all_pair_up_and_its_head_requantizations_are_found(yolov5n_compiled):
    compiled = CompiledModel.open(yolov5n_compiled[0])
    match, qg = compiled.layer_match, compiled.int8_graph
    assert match.unmatched_int8 == [] and match.unmatched_float == []  # the requantize's renaming is paired by inputs
    tails = requantized_tails(match, qg)
    head = [t for t in tails if t.scales[0] == pytest.approx(1 / 256)]  # the sigmoid's grid requantized to the output's
    assert len(head) == 3 and all(t.scales[1] > 1 and len(t.layers) >= 10 for t in head)
    lg = selection.LayerGraph.build(qg, match.layers, float_units(match, qg))
    region = lg.closed({head[0].entry})
    assert all(set(t.layers) <= region for t in head)  # the three levels share the output's scale-tied chain
    assert all(match.layers[i].op_type not in ("CONV_2D",) for i in region)
    # The latency model's rule for which requantize ops a mixed model still holds, checked on the spliced
    # models themselves: none, the head tails, their sources (the sigmoids), a backbone conv.
    found = {r.op: r for r in requantizations(match, qg)}
    assert all(found[t.quantize_op].readers == {t.entry} for t in head)
    priced = selection.LayerGraph.build(qg, match.layers, float_units(match, qg), found.values())
    names = {layer.index: layer.name for layer in match.layers}
    source = found[head[0].quantize_op].source
    assert source is not None
    sigmoids = priced.closed({source})
    conv = next(layer.index for layer in match.layers if layer.op_type == "CONV_2D")
    for float_set in (frozenset(), region, sigmoids, frozenset({conv})):
        mixed = tflite_graph.parse(compiled.mixed([names[i] for i in sorted(float_set)]))
        held = [op for op in mixed.ops if op.type == "QUANTIZE" and mixed.tensors[op.inputs[0]].dtype != "float32"]
        assert len(held) == len(priced.requantizations_kept(float_set)), sorted(float_set)[:5]
    assert not {t.quantize_op for t in head} & set(priced.requantizations_kept(region))
    float_bytes, int8_bytes = compiled.float_model.read_bytes(), compiled.int8_model.read_bytes()
    quantize = next(op.index for op in qg.ops if op.type == "QUANTIZE")
    with pytest.raises(InputError, match="only computing ops can be kept float"):
        splice(float_bytes, int8_bytes, {quantize: 0})
    with pytest.raises(InputError, match="is not in the int8"):
        splice(float_bytes, int8_bytes, {len(qg.ops): 0})
    with pytest.raises(InputError, match="not a pair"):  # a conv paired with a sigmoid
        conv = next(layer for layer in match.layers if layer.op_type == "CONV_2D")
        logistic = next(layer for layer in match.layers if layer.op_type == "LOGISTIC")
        splice(float_bytes, int8_bytes, {conv.int8_op: logistic.float_op})


def test_analysis_ranks_the_head_and_its_float_tail_wins_the_map_back(yolov5n_compiled, tmp_path):
    folder = tmp_path / "y5"
    shutil.copytree(yolov5n_compiled[0], folder)
    proc = run_cli("analyze", folder, "--calib", shared("detection/coco-train2017-128"), "--num-samples", 8)
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert "no output_share" not in proc.stderr and "no backward rule" not in proc.stderr
    analysis = json.loads((folder / "analysis.json").read_text())
    compiled = CompiledModel.open(folder)
    entries = {t.entry for t in requantized_tails(compiled.layer_match, compiled.int8_graph) if t.scales[1] > 1}
    assert analysis["metric"] == "output_share" and analysis["samples"]["output_share_note"] is None
    assert analysis["sensitivity_order"][0] in entries and set(analysis["sensitivity_order"][:3]) == entries
    shares = {layer["index"]: layer["output_share"] for layer in analysis["layers"]}
    assert sum(shares[i] for i in entries) > 0.5  # the head's requantization is most of the output error

    proc = run_cli("tune", folder, "--eval", shared(VAL), "--num-eval", 8, "--float-layers", 1, "--rerank", 0, "--best-effort")
    assert proc.returncode == 0, proc.stderr[-1500:]
    report = json.loads((folder / "tune.json").read_text())
    chosen = set(report["chosen"]["float_layers"])
    assert entries <= chosen and not any(compiled.layer_match.layers[i].op_type == "CONV_2D" for i in chosen)
    mixed = tflite_graph.read(folder / "model_mixed.tflite")
    assert int8_paths_between_float_ops(mixed) == []
    float_ops = [op for op in mixed.ops if op.type not in ("QUANTIZE", "DEQUANTIZE") and mixed.tensors[op.outputs[0]].dtype == "float32"]
    assert len(float_ops) == len(chosen)
    samples = compiled.load_samples(shared(VAL), 32, 0, what="evaluation")
    float_map = compiled.task_scores(compiled.float_model, samples)["mAP50-95"]
    mixed_map = compiled.task_scores(folder / "model_mixed.tflite", samples)["mAP50-95"]
    assert compiled.task_scores(compiled.int8_model, samples)["mAP50-95"] < 0.01
    assert mixed_map >= float_map - 0.02, (float_map, mixed_map)


def test_the_path_check_sees_a_round_trip(yolov5n_compiled):
    """The op-by-op check above is not vacuous: the tail with one of its transposes left int8 has an
    int8 path between two float ops."""
    compiled = CompiledModel.open(yolov5n_compiled[0])
    match = compiled.layer_match
    tail = next(t for t in requantized_tails(match, compiled.int8_graph) if t.scales[1] > 1)
    transposes = [i for i in tail.layers if match.layers[i].op_type == "TRANSPOSE"]
    keep = [i for i in (tail.entry, *tail.layers) if i != transposes[1]]  # the one between RESHAPE and the slices
    path = compiled.folder.parent / "cut.tflite"
    path.write_bytes(compiled.mixed([match.layers[i].name for i in keep]))
    assert int8_paths_between_float_ops(tflite_graph.read(path)) != []
