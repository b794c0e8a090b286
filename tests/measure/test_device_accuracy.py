"""Accuracy measured on the device from the outputs computed there (the agent's eval): a detector's
COCO mAP over a real sshd, and a two-input model judged by fidelity on the emulated aarch64 board,
each next to the host's figure for the same model."""
import sys
from pathlib import Path

import pytest
from conftest import compiled_two_input_net, shared

from quantune_edge.compile.artifacts import CompiledModel
from quantune_edge.deploy.targets import load_target
from quantune_edge.measure.accuracy import evaluate_on_device
from quantune_edge.testing.loopback_sshd import LoopbackSshd

VAL = "detection/coco-val2017-128"


@pytest.fixture(scope="module")
def loop_target(tmp_path_factory):
    folder = tmp_path_factory.mktemp("device-eval")
    server = LoopbackSshd(folder / "sshd").start()
    yield load_target(str(server.target_toml(folder / "loop.toml", python=sys.executable, work_dir=folder / "device")))
    server.stop()


def test_detector_map_is_computed_from_the_devices_outputs(yolov5n_compiled, loop_target):
    compiled = CompiledModel.open(yolov5n_compiled[0])
    models = [compiled.float_model, compiled.int8_model]
    result = evaluate_on_device(compiled, models, shared(VAL), 4, 0, [loop_target])
    assert result["metric"] == "mAP50-95" and result["samples"] == 4 and result["labelled"]
    rows = result["targets"][loop_target.name]
    samples = compiled.load_samples(shared(VAL), 4, 0, what="evaluation")
    for model, label in zip(models, ("float32", "int8")):
        row = rows[label]
        own = compiled.task_scores(model, samples)  # independently: the host's run, scored by pycocotools
        assert row["max_abs_diff_vs_host"] == 0.0  # the same x86 kernels: the same outputs
        assert row["value"] == pytest.approx(own["mAP50-95"]) and row["host_value"] == pytest.approx(own["mAP50-95"])
        assert row["scores"]["mAP50"] == pytest.approx(own["mAP50"])
    assert rows["float32"]["value"] > 0.2 and rows["int8"]["value"] < 0.01  # YOLOv5n's int8 collapse, seen on the device too
    assert not list(Path(loop_target.work_dir).glob("eval-*"))  # the samples and the outputs are removed from the device


def test_a_two_input_model_judged_by_fidelity_on_the_emulated_board(emulated_target, tmp_path):
    out, npz = compiled_two_input_net(tmp_path)
    compiled = CompiledModel.open(out)
    result = evaluate_on_device(compiled, [compiled.int8_model], npz, 4, 0, [load_target(str(emulated_target))])
    (row,) = next(iter(result["targets"].values())).values()
    assert result["metric"] == "output SQNR dB" and row["machine"] == "aarch64"
    assert 20 < row["value"] < 80 and abs(row["value"] - row["host_value"]) < 3  # ARM int8 kernels may round a few LSBs apart
    assert row["max_abs_diff_vs_host"] < 0.1
