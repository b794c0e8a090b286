"""The on-device agent, run as the device runs it (a subprocess of a Python with numpy + a TFLite
runtime) on the shipped EfficientNet-Lite0 compiled for real; every failure is one JSON line."""
import ast
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import DEMO_IMAGES, REPO, blocked_runtime_env

AGENT_ALLOWED_IMPORTS = {"__future__", "argparse", "hashlib", "importlib", "json", "os", "platform", "resource", "shutil", "signal",
                         "sys", "time", "typing", "numpy"}


def agent(*args, env=None):
    proc = subprocess.run([sys.executable, "-m", "device_agent", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, f"stdout must be exactly one JSON line, got {proc.stdout!r} / {proc.stderr[-300:]}"
    return proc.returncode, json.loads(lines[0])


@pytest.fixture(scope="module")
def samples(effnet_compiled, tmp_path_factory):
    from quantune_edge.compile.artifacts import CompiledModel

    loaded = CompiledModel.open(effnet_compiled).load_samples(DEMO_IMAGES, 12, seed=3)
    path = tmp_path_factory.mktemp("agent") / "samples.npz"
    np.savez(path, x=loaded.data, labels=loaded.labels)
    return path, loaded


def test_agent_imports_only_stdlib_numpy_and_a_runtime():
    for path in (REPO / "device_agent").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module.split(".")[0]]
            else:
                continue
            assert set(names) <= AGENT_ALLOWED_IMPORTS, f"{path.name} imports {names}"
    code = ("import runpy, sys; sys.argv = ['device_agent', 'info']; "
            "import device_agent.__main__ as m; m.main(['info']); "
            "assert not any(k.split('.')[0] in ('tensorflow', 'quantune_edge') for k in sys.modules), 'forbidden import'")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True).returncode == 0


def test_info_facts():
    code, info = agent("info")
    assert code == 0 and info["schema_version"] == 1 and info["kind"] == "info"
    assert info["device"]["machine"] and info["device"]["cpu_count"] >= 1 and info["device"]["free_disk_bytes"] > 0
    assert info["runtime"]["package"] in ("tflite-runtime", "ai-edge-litert") and info["runtime"]["version"]


def test_bench_report(effnet_compiled):
    model = effnet_compiled / "model_int8.tflite"
    code, rep = agent("bench", model, "--warmup", 2, "--runs", 15, "--threads", 2)
    assert code == 0, rep
    lat = rep["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"] and lat["min"] <= lat["mean"] <= lat["max"]
    assert rep["invocations"] == 17 and rep["settings"]["threads"] == 2 and rep["settings"]["xnnpack"] is True
    assert rep["model"]["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert rep["model"]["inputs"][0]["shape"] == [1, 224, 224, 3] and rep["model"]["outputs"][0]["shape"] == [1, 1000]
    assert rep["peak_rss_bytes"] > model.stat().st_size and rep["wall_time_s"] > 0
    code, plain = agent("bench", model, "--warmup", 0, "--runs", 2, "--no-xnnpack")
    assert code == 0 and plain["settings"]["xnnpack"] is False


def test_bench_input_file_and_bad_shape(effnet_compiled, samples, tmp_path):
    model = effnet_compiled / "model_float32.tflite"
    good = tmp_path / "x.npy"
    np.save(good, samples[1].data[0])  # (224, 224, 3): the batch axis is added
    code, rep = agent("bench", model, "--runs", 2, "--warmup", 0, "--input", good)
    assert code == 0 and rep["settings"]["input"].startswith("file:")
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((1, 3, 224, 224), np.float32))
    code, err = agent("bench", model, "--runs", 2, "--input", bad)
    assert code == 1 and err["kind"] == "bad_input" and "(1, 224, 224, 3)" in err["error"]


def test_eval_matches_host_runtime(effnet_compiled, samples):
    from quantune_edge.model.runtime import TfliteRunner

    path, loaded = samples
    model = effnet_compiled / "model_int8.tflite"
    code, rep = agent("eval", model, "--samples", path, "--threads", 2)
    assert code == 0, rep
    host = TfliteRunner(model, 2).run(loaded.data).argmax(axis=1).tolist()
    assert rep["reducer"] == "argmax" and rep["reduced"] == host and rep["samples"] == 12
    assert rep["top1"] == pytest.approx(float(np.mean(np.asarray(host) == loaded.labels)))
    assert rep["top1"] >= 0.5 and len(rep["outputs_sha256"]) == 64


@pytest.mark.parametrize("case", ["missing", "corrupt", "no_runtime", "usage", "bad_npz"])
def test_agent_errors_are_json(case, effnet_compiled, tmp_path):
    model, env = effnet_compiled / "model_int8.tflite", None
    if case == "missing":
        args, kind = ["bench", tmp_path / "none.tflite"], "model_missing"
    elif case == "corrupt":
        bad = tmp_path / "corrupt.tflite"
        bad.write_bytes(model.read_bytes()[:5000])
        args, kind = ["bench", bad], "model_invalid"
    elif case == "no_runtime":
        args, kind, env = ["bench", model], "runtime_missing", blocked_runtime_env(tmp_path)
    elif case == "usage":
        args, kind = ["bench", model, "--runs", "many"], "usage"
    else:
        junk = tmp_path / "s.npz"
        junk.write_bytes(b"not a zip")
        args, kind = ["eval", model, "--samples", junk], "bad_input"
    code, err = agent(*args, env=env)
    assert code == (2 if kind == "usage" else 1) and err["kind"] == kind and "\n" not in err["error"]
    if case == "no_runtime":  # this x86_64 Python 3.11 gets what the selection picks for it
        assert err["error"].endswith(": pip install ai-edge-litert") and err["runtime"] == {}
    else:
        assert err["runtime"]["package"] == "ai-edge-litert"  # every document names the runtime the agent uses


def test_profile_times_several_models_side_by_side(effnet_compiled):
    models = [effnet_compiled / "model_int8.tflite", effnet_compiled / "model_float32.tflite"]
    code, rep = agent("profile", *models, "--runs", 3, "--rounds", 2, "--warmup", 1, "--threads", 2)
    assert code == 0, rep
    assert [m["sha256"] for m in rep["models"]] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in models]
    int8, float32 = (m["latency_ms"] for m in rep["models"])
    assert 0 < int8["p50"] < float32["p50"]  # int8 is faster than float32 on any CPU XNNPACK runs on
    code, err = agent("profile", models[0], "--rounds", 0)
    assert code == 2 and err["kind"] == "usage"


def test_bench_eval_and_profile_fall_back_to_builtin_kernels_when_xnnpack_cannot_prepare(nanodet_compiled, tmp_path):
    """A NanoDet-m int8 model XNNPACK fails to prepare (one absurd scale, as the converter once
    made); the agent still measures it, on the builtin kernels, and every JSON document says which
    kernels ran."""
    from conftest import xnnpack_unpreparable

    model = xnnpack_unpreparable(nanodet_compiled[0] / "model_int8.tflite", tmp_path / "model_int8.tflite")
    code, rep = agent("bench", model, "--warmup", 1, "--runs", 3, "--threads", 2)
    assert code == 0 and rep["kernels"].startswith("builtin (XNNPACK failed: ") and rep["latency_ms"]["p50"] > 0
    code, rep = agent("bench", model, "--warmup", 1, "--runs", 3, "--no-xnnpack")
    assert code == 0 and rep["kernels"] == "builtin"
    samples = tmp_path / "s.npz"
    np.savez(samples, x=np.random.default_rng(0).standard_normal((2, 1, 320, 320, 3)).astype(np.float32))
    code, rep = agent("eval", model, "--samples", samples, "--threads", 2)
    assert code == 0 and rep["samples"] == 2 and rep["kernels"].startswith("builtin (XNNPACK failed: ")
    code, rep = agent("profile", model, nanodet_compiled[0] / "model_float32.tflite", "--runs", 2, "--rounds", 1, "--warmup", 0)
    assert code == 0 and [m["kernels"][:7] for m in rep["models"]] == ["builtin", "xnnpack"]


def test_eval_writes_every_output_whole_in_the_models_order(nanodet_compiled, tmp_path):
    """--reduce none --outputs DIR: every output of every sample, float32, in the ONNX model's order
    (the interpreter lists NanoDet-m's reg_s16 first), equal to the host runtime's."""
    from conftest import shared

    from quantune_edge.compile.artifacts import CompiledModel
    from quantune_edge.model.runtime import TfliteRunner

    compiled = CompiledModel.open(nanodet_compiled[0])
    loaded = compiled.load_samples(shared("detection/coco-val2017-128"), 2, 0)
    samples = tmp_path / "s.npz"
    np.savez(samples, x=loaded.data)
    for model in (compiled.float_model, compiled.int8_model):
        code, rep = agent("eval", model, "--samples", samples, "--threads", 2, "--reduce", "none", "--outputs", tmp_path / model.stem)
        assert code == 0, rep
        assert rep["reducer"] == "none" and rep["reduced"] == []
        device = [np.load(f["file"]) for f in rep["output_files"]]
        host = TfliteRunner(model, 2).run_all(loaded.data)
        assert [d.shape for d in device] == [h.shape for h in host] == [(2, 1600, 80), (2, 400, 80), (2, 100, 80), (2, 1600, 32),
                                                                        (2, 400, 32), (2, 100, 32)]
        for d, h in zip(device, host):
            np.testing.assert_array_equal(d, h)
    code, err = agent("eval", compiled.int8_model, "--samples", samples, "--reduce", "none")
    assert code == 2 and err["kind"] == "usage" and "--outputs DIR" in err["error"]


def test_eval_feeds_several_inputs_by_name(tmp_path):
    """A two-input model: 'x' is a structured array, one field per input name, fed by name."""
    from conftest import compiled_two_input_net

    from quantune_edge.compile.artifacts import CompiledModel
    from quantune_edge.model.runtime import TfliteRunner

    out, npz = compiled_two_input_net(tmp_path, 6)
    compiled = CompiledModel.open(out)
    x = compiled.load_samples(npz, None).data
    from numpy.lib.recfunctions import repack_fields

    np.savez(tmp_path / "x.npz", x=repack_fields(x[["meta", "image"]]))  # another field order: names decide
    code, rep = agent("eval", compiled.int8_model, "--samples", tmp_path / "x.npz", "--reduce", "none", "--outputs", tmp_path / "o")
    assert code == 0, rep
    np.testing.assert_array_equal(np.load(rep["output_files"][0]["file"]), TfliteRunner(compiled.int8_model).run_all(x)[0])
    np.savez(tmp_path / "one.npz", x=x["image"])
    code, err = agent("eval", compiled.int8_model, "--samples", tmp_path / "one.npz")
    assert code == 1 and err["kind"] == "bad_input" and "the model has 2 inputs" in err["error"]
