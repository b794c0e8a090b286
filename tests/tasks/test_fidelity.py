"""--task fidelity: no labels; every output is judged against the float32 model (SQNR, cosine), the
worst output deciding, in compile (vs ONNX Runtime), analyze and tune (--min-sqnr, vs float32 TFLite)."""
import json

import numpy as np
import pytest
from conftest import run_cli, two_output_net

from quantune_edge.common.metrics import sqnr_db
from quantune_edge.compile.artifacts import CompiledModel


@pytest.fixture(scope="module")
def fidelity_compiled(tiny_images, save_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("fidelity") / "out"
    proc = run_cli("compile", save_model(two_output_net(), "fidelity"), "--calib", tiny_images, "--out", out, "--num-calib", 8,
                   "--task", "fidelity", "--per-tensor")
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert "output SQNR dB" in proc.stderr
    return out


def _worst_sqnr(compiled, model, samples):
    """Independently: each output's SQNR over the samples vs the float32 TFLite, the lowest."""
    got = compiled.outputs(model, samples.data)
    want = compiled.outputs(compiled.float_model, samples.data)
    return min(sqnr_db(want[name], got[name]) for name in want)


def test_fidelity_judges_every_output_against_float32(fidelity_compiled, tiny_images, tmp_path):
    report = json.loads((fidelity_compiled / "compile.json").read_text())
    scores = report["accuracy"]["scores"]
    names = list(report["verification"]["outputs"])
    assert len(names) == 2 and report["task"] == {"name": "fidelity"}
    assert scores["tflite_float32"]["output SQNR dB"] > 60 and scores["tflite_int8"]["output SQNR dB"] < 40
    for key in ("tflite_float32", "tflite_int8"):
        worst = min(scores[key][f"SQNR dB {n}"] for n in names)
        assert scores[key]["output SQNR dB"] == worst == report["accuracy"][key]
        assert scores[key]["output cosine min"] == min(scores[key][f"cosine min {n}"] for n in names)
    compiled = CompiledModel.open(fidelity_compiled)
    samples = compiled.load_samples(tiny_images, 8, 1)
    int8 = _worst_sqnr(compiled, compiled.int8_model, samples)
    assert run_cli("analyze", fidelity_compiled, "--calib", tiny_images, "--num-samples", 4).returncode == 0
    target = int8 + 3.0
    proc = run_cli("tune", fidelity_compiled, "--eval", tiny_images, "--num-eval", 8, "--min-sqnr", target, "--best-effort")
    assert proc.returncode == 0, proc.stderr[-1500:]
    tuned = json.loads((fidelity_compiled / "tune.json").read_text())
    assert tuned["budget"]["min_sqnr_db"] == target and tuned["reference"]["accuracy_is"] == "output SQNR dB"
    assert tuned["reference"]["int8"]["accuracy"] == pytest.approx(int8)
    mixed = _worst_sqnr(compiled, fidelity_compiled / "model_mixed.tflite", samples)
    assert tuned["chosen"]["accuracy"] == pytest.approx(mixed)
    assert tuned["budget"]["met"] == (mixed >= target) and tuned["search"]["evaluations"] <= tuned["search"]["bound"]
    assert np.isfinite(mixed)


@pytest.mark.parametrize("flags, message", [
    (["--max-drop", "1"], "the fidelity task's accuracy budget is --min-sqnr"),
    ([], "the fidelity task needs a budget: --min-sqnr DB"),
    (["--min-sqnr", "nan"], "--min-sqnr must be a finite number of dB"),
    (["--min-sqnr", "20", "--float-layers", "1"], "give one of --max-drop, --min-sqnr"),
])
def test_a_budget_that_does_not_fit_the_task_is_one_line(fidelity_compiled, tiny_images, flags, message):
    before = {p.name: p.read_bytes() for p in fidelity_compiled.iterdir() if p.is_file()}
    proc = run_cli("tune", fidelity_compiled, "--eval", tiny_images, "--num-eval", 4, *flags)
    assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1], proc.stderr[-600:]
    assert {p.name: p.read_bytes() for p in fidelity_compiled.iterdir() if p.is_file()} == before


def test_min_sqnr_is_refused_for_a_classifier(tmp_path, tiny_images, save_model):
    from conftest import pad_conv_net

    out = tmp_path / "out"
    assert run_cli("compile", save_model(pad_conv_net(), "classifier"), "--calib", tiny_images, "--out", out, "--num-calib", 4).returncode == 0
    proc = run_cli("tune", out, "--eval", tiny_images, "--min-sqnr", "20")
    assert proc.returncode == 2 and "--min-sqnr is the fidelity task's budget; this compile's task is classify" in proc.stderr
