"""--task custom: the user's metric FILE.py:function(outputs_list, labels_list) -> float judges the
model in compile, analyze and tune, in its own units; whatever the metric does wrong is one line."""
import json
import shutil

import pytest
from conftest import DEMO_IMAGES, pad_conv_net, run_cli

from quantune_edge.compile.artifacts import CompiledModel
from quantune_edge.errors import InputError
from quantune_edge.model.runtime import TfliteRunner
from quantune_edge.tasks import make_task
from quantune_edge.tasks.classification import Classification

METRIC = '''import numpy as np

def top1(outputs_list, labels_list):
    """Top-1 written by a user: one dict of ONNX outputs per sample."""
    hits = [int(np.argmax(next(iter(o.values())))) == label for o, label in zip(outputs_list, labels_list) if label is not None]
    return 10.0 * sum(hits) / len(hits)  # in tenths: the metric's own units

def broken(outputs_list, labels_list):
    return outputs_list["no such key"]

def wordy(outputs_list, labels_list):
    return "good"
'''


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("custom")
    images = root / "images"
    images.mkdir()
    rows = ["file,class_index"]
    for i, image in enumerate(sorted(DEMO_IMAGES.glob("*.jpg"))[:12]):
        shutil.copy(image, images / image.name)
        rows.append(f"{image.name},{i % 10}")
    (images / "labels.csv").write_text("\n".join(rows) + "\n")
    (root / "metric.py").write_text(METRIC)
    return root


def test_a_custom_metric_judges_compile_analyze_and_tune_in_its_own_units(data, save_model, tmp_path):
    model = save_model(pad_conv_net(), "custom_metric")
    out = tmp_path / "out"
    proc = run_cli("compile", model, "--calib", data / "images", "--out", out, "--num-calib", 12, "--task", "custom",
                   "--metric", f"{data / 'metric.py'}:top1")
    assert proc.returncode == 0, proc.stderr[-1500:]
    report = json.loads((out / "compile.json").read_text())
    assert report["task"] == {"name": "custom", "metric_file": f"{data / 'metric.py'}:top1"}
    compiled = CompiledModel.open(out)
    samples = compiled.load_samples(data / "images", 12, 0)
    for key, path in (("tflite_float32", compiled.float_model), ("tflite_int8", compiled.int8_model)):
        expected = 10 * Classification().metric(TfliteRunner(path).run(samples.data), samples.labels)
        assert report["accuracy"][key] == pytest.approx(expected)
    assert run_cli("analyze", out, "--calib", data / "images", "--num-samples", 4).returncode == 0
    proc = run_cli("tune", out, "--eval", data / "images", "--num-eval", 12, "--max-drop", 0.5, "--best-effort")
    assert proc.returncode == 0, proc.stderr[-1500:]
    tuned = json.loads((out / "tune.json").read_text())
    assert tuned["reference"]["accuracy_is"] == "custom metric"
    mixed = 10 * Classification().metric(TfliteRunner(out / "model_mixed.tflite").run(compiled.load_samples(data / "images", 12, 1).data),
                                         compiled.load_samples(data / "images", 12, 1).labels)
    assert tuned["chosen"]["accuracy"] == pytest.approx(mixed)
    assert tuned["chosen"]["drop_points"] == pytest.approx(tuned["reference"]["float32_accuracy"] - mixed)  # its units, not x100


@pytest.mark.parametrize("flags, message", [
    (["--metric", "METRIC:broken"], r"the metric .*:broken failed: TypeError"),
    (["--metric", "METRIC:wordy"], r"the metric .*:wordy must return a number, got str"),
    (["--metric", "METRIC:absent"], r"--metric: .*metric.py has no function 'absent'"),
    ([], "--task custom needs it"),
])
def test_a_bad_metric_is_one_line_and_nothing_is_written(data, save_model, tmp_path, flags, message):
    import re

    model = save_model(pad_conv_net(), "custom_bad")
    flags = [f.replace("METRIC", str(data / "metric.py")) for f in flags]
    out = tmp_path / "out"
    proc = run_cli("compile", model, "--calib", data / "images", "--out", out, "--num-calib", 4, "--task", "custom", *flags)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("error: ") and re.search(message, last), proc.stderr[-800:]
    assert not out.exists() and "Traceback" not in proc.stderr
    with pytest.raises(InputError, match="--task custom needs --metric"):
        make_task("custom")
