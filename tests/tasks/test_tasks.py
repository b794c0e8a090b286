"""The Task registry and the classification task: the top-1 rules every stage now asks it for."""
import json
import shutil

import numpy as np
import pytest

from quantune_edge.compile.artifacts import CompiledModel
from quantune_edge.errors import InputError
from quantune_edge.model import tflite_graph
from quantune_edge.tasks import Task, make_task, registered_tasks, task_from_record
from quantune_edge.tasks.classification import Classification


def test_registry_finds_classify_and_names_what_it_knows():
    task = make_task("classify", label_offset=1)
    assert isinstance(task, Task) and task == Classification(1) and "classify" in registered_tasks()
    assert task.to_dict() == {"name": "classify", "label_offset": 1}
    assert task_from_record(task.to_dict()) == task
    assert task_from_record(None, label_offset=1) == task  # a compile made before tasks was a classifier
    with pytest.raises(InputError, match=r"unknown task 'segment' \(known: classify"):
        make_task("segment")
    with pytest.raises(InputError, match="task 'classify': .*unexpected keyword argument 'classes'"):
        make_task("classify", classes=10)


def test_classification_judges_by_top1_with_the_label_offset():
    task = Classification(label_offset=1)
    outputs = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.0, 0.2, 0.7], [0.3, 0.3, 0.4]], np.float32)
    labels = np.array([0, 0, -1, 1])  # class 0 is output 1; the third image has no label
    assert task.correct(outputs, labels).tolist() == [True, False, True]  # the fourth: label 1 is output 2
    assert task.metric(outputs, labels) == pytest.approx(2 / 3)
    assert task.metric(outputs, np.full(4, -1)) is None
    reference = np.array([[0, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    assert task.agreement(outputs, reference).tolist() == [True, True, False, True]
    reduced = task.reduce(outputs)
    assert reduced.tolist() == [1, 0, 2, 2] and task.reduced_correct(reduced, labels).tolist() == [True, False, True]


def test_the_compile_records_its_task_and_older_compiles_are_classifiers(effnet_compiled, tmp_path):
    compiled = CompiledModel.open(effnet_compiled)
    assert json.loads((effnet_compiled / "compile.json").read_text())["task"] == {"name": "classify", "label_offset": 0}
    assert compiled.task == Classification(0)
    graph = tflite_graph.read(compiled.float_model)
    assert compiled.task.attributed_tensors(graph) == [graph.outputs[0]]  # EfficientNet-Lite0 ends in its logits
    old = tmp_path / "old"
    shutil.copytree(effnet_compiled, old, ignore=shutil.ignore_patterns("saved_model"))
    report = json.loads((old / "compile.json").read_text())
    del report["task"]
    report["accuracy"]["label_offset"] = 1
    (old / "compile.json").write_text(json.dumps(report))
    assert CompiledModel.open(old).task == Classification(1)


def test_compare_adds_the_tasks_agreement_to_the_generic_comparison(tmp_path):
    """compile's verification and tune's evaluations judge agreement by the task's rule, not by a
    top-1 that metrics spelled for every model; labels come from the task too."""
    from quantune_edge.common.metrics import compare_outputs
    from quantune_edge.tasks.base import compare

    reference = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.0, 0.2, 0.7], [0.3, 0.3, 0.4]], np.float32)
    candidate = reference.copy()
    candidate[3] = [0.5, 0.3, 0.4]  # decides differently on the last sample only
    generic = compare_outputs(reference, candidate)
    assert "top1_agreement" not in generic
    judged = compare(Classification(), reference, candidate)
    assert judged == {**generic, "top1_agreement": 0.75}
    assert Classification().read_labels(tmp_path) == {}
    (tmp_path / "labels.csv").write_text("file,class_index,name\na.jpg,3,x\nb.jpg,0,y\n")
    assert Classification().read_labels(tmp_path) == {"a.jpg": 3, "b.jpg": 0}
    (tmp_path / "labels.csv").write_text("file,class_index\na.jpg,three\n")
    with pytest.raises(InputError, match="class_index must be an integer"):
        Classification().read_labels(tmp_path)


def test_a_nonzero_label_offset_end_to_end(tiny_images, save_model, tmp_path):
    """--label-offset 1 (a 1001-class model's background class) from compile's flag through
    compile.json, analyze and tune: every figure equals top-1 computed here with the offset."""
    from conftest import pad_conv_net, run_cli

    from quantune_edge.model.runtime import TfliteRunner

    data = tmp_path / "data"
    shutil.copytree(tiny_images, data)
    files = sorted(p.name for p in data.iterdir() if p.suffix == ".jpg")
    (data / "labels.csv").write_text("file,class_index\n" + "".join(f"{f},{i % 9}\n" for i, f in enumerate(files)))
    out = tmp_path / "out"
    proc = run_cli("compile", save_model(pad_conv_net(), "offset"), "--calib", data, "--out", out, "--num-calib", len(files),
                   "--label-offset", 1, "--per-tensor")
    assert proc.returncode == 0, proc.stderr[-1500:]
    report = json.loads((out / "compile.json").read_text())
    assert report["task"] == {"name": "classify", "label_offset": 1}
    compiled = CompiledModel.open(out)

    def top1(model, seed, num):
        samples = compiled.load_samples(data, num, seed)
        predicted = TfliteRunner(model).run(samples.data).argmax(axis=1)
        assert not np.array_equal(predicted == samples.labels + 1, predicted == samples.labels)  # the offset matters here
        return float(np.mean(predicted == samples.labels + 1))

    assert report["accuracy"]["tflite_float32"] == pytest.approx(top1(compiled.float_model, 0, len(files)))
    assert report["accuracy"]["tflite_int8"] == pytest.approx(top1(compiled.int8_model, 0, len(files)))
    assert run_cli("analyze", out, "--calib", data, "--num-samples", 4).returncode == 0
    proc = run_cli("tune", out, "--eval", data, "--num-eval", len(files), "--float-layers", 1)
    assert proc.returncode == 0, proc.stderr[-1500:]
    tuned = json.loads((out / "tune.json").read_text())
    assert tuned["reference"]["float32_accuracy"] == pytest.approx(top1(compiled.float_model, 1, len(files)))
    assert tuned["chosen"]["accuracy"] == pytest.approx(top1(out / "model_mixed.tflite", 1, len(files)))
