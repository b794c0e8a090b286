"""The CLI as a user runs it: a subprocess, exit codes, one-line errors, nothing half-written."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CLI, DEMO_MODEL, REPO, GraphBuilder, pad_conv_net, run_cli


@pytest.fixture()
def existing_out(tmp_path):
    """An earlier compile output (what --force may replace): its compile.json marks it."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "model_int8.tflite").write_bytes(b"deployed earlier")
    (out / "compile.json").write_text('{"kind": "quantune-edge/compile"}')
    return out


def _bad_models(tmp_path: Path, tiny_images: Path) -> dict:
    import onnx

    cases = {}
    cases["missing"] = (tmp_path / "nope.onnx", tiny_images, "model file not found")
    (tmp_path / "text.onnx").write_text("this is not a model\n" * 10)
    cases["not_onnx"] = (tmp_path / "text.onnx", tiny_images, "not an ONNX model")
    raw = DEMO_MODEL.read_bytes()
    (tmp_path / "cut.onnx").write_bytes(raw[: len(raw) // 3])
    cases["truncated"] = (tmp_path / "cut.onnx", tiny_images, "truncated or corrupt ONNX")
    g = GraphBuilder()
    y = g.node("FancyOp", [g.conv("input", 3, 4)], domain="com.example")
    onnx.save(g.model([1, 3, 32, 32], g.head(y, 4), extra_opsets={"com.example": 1}), tmp_path / "custom.onnx")
    cases["unsupported_op"] = (tmp_path / "custom.onnx", tiny_images, "unsupported op 'FancyOp'")
    g = GraphBuilder()
    onnx.save(g.model([1, 10], g.node("MatMul", ["input", g.const(np.ones((10, 4)))])), tmp_path / "mlp.onnx")
    cases["no_image_input"] = (tmp_path / "mlp.onnx", tiny_images, "is an image folder, but the model takes input [1, 10]")
    onnx.save(pad_conv_net(), tmp_path / "good.onnx")
    (tmp_path / "empty").mkdir()
    cases["empty_calib"] = (tmp_path / "good.onnx", tmp_path / "empty", "no images")
    (tmp_path / "junk").mkdir()
    for i in range(3):
        (tmp_path / "junk" / f"{i}.jpg").write_bytes(os.urandom(200))
    cases["unreadable_images"] = (tmp_path / "good.onnx", tmp_path / "junk", "could be read")
    np.save(tmp_path / "wrong.npy", np.zeros((4, 32, 32, 3), np.float32))
    cases["npy_shape"] = (tmp_path / "good.onnx", tmp_path / "wrong.npy", r"needs (N, 3, 32, 32)")
    cases["missing_calib"] = (tmp_path / "good.onnx", tmp_path / "none", "calibration data not found")
    return cases


CASES = ["missing", "not_onnx", "truncated", "unsupported_op", "no_image_input", "empty_calib", "unreadable_images", "npy_shape", "missing_calib"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_one_line_error_nothing_lost(case, tmp_path, tiny_images, existing_out):
    model, calib, message = _bad_models(tmp_path, tiny_images)[case]
    result = run_cli("compile", model, "--calib", calib, "--out", existing_out, "--force", "--num-calib", "4")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert sorted(p.name for p in existing_out.iterdir()) == ["compile.json", "model_int8.tflite"]
    assert (existing_out / "model_int8.tflite").read_bytes() == b"deployed earlier"
    assert not [p for p in existing_out.parent.iterdir() if ".partial-" in p.name]


def test_existing_output_needs_force(tmp_path, tiny_images, save_model, existing_out):
    model = save_model(pad_conv_net(), "pad_cli")
    result = run_cli("compile", model, "--calib", tiny_images, "--out", existing_out, "--num-calib", "4")
    assert result.returncode != 0 and "already exists; pass --force" in result.stderr
    assert (existing_out / "model_int8.tflite").read_bytes() == b"deployed earlier"
    result = run_cli("compile", model, "--calib", tiny_images, "--out", existing_out, "--num-calib", "4", "--force", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["verification"]["passed"] and report["calibration"]["num_samples"] == 4
    assert sorted(p.name for p in existing_out.iterdir()) == ["compile.json", "model_calibrated.tflite", "model_float32.tflite", "model_int8.tflite", "model_prepared.onnx", "saved_model"]
    assert (existing_out / "model_int8.tflite").read_bytes()[4:8] == b"TFL3"


def test_quiet_and_summary(tmp_path, tiny_images, save_model):
    model = save_model(pad_conv_net(), "pad_quiet")
    quiet = run_cli("compile", model, "--calib", tiny_images, "--out", tmp_path / "q", "--num-calib", "4", "--quiet")
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""
    loud = run_cli("compile", model, "--calib", tiny_images, "--out", tmp_path / "l", "--num-calib", "4", "--preset", "tf")
    assert loud.returncode == 0
    assert "converting ONNX -> SavedModel" in loud.stderr and "1 QUANTIZE, 1 DEQUANTIZE" in loud.stderr
    assert "cuda" not in loud.stderr.lower() and "W0000" not in loud.stderr
    assert json.loads((tmp_path / "l" / "compile.json").read_text())["preprocessing"]["mean"] == [127.5] * 3


def test_installed_entry_points():
    venv_bin = REPO / ".venv" / "bin"
    result = subprocess.run([str(venv_bin / "quantune-edge"), "version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "0.1.0"
    info = subprocess.run([str(venv_bin / "python"), "-m", "device_agent", "info"], capture_output=True, text=True)
    facts = json.loads(info.stdout)
    assert facts["schema_version"] == 1 and facts["runtime"]["package"] in ("tflite-runtime", "ai-edge-litert")
    bad = subprocess.run([str(venv_bin / "python"), "-m", "device_agent", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "error" in json.loads(bad.stdout)


def test_analyze_oracle_reports_its_own_repeatability(tmp_path, tiny_images, save_model):
    from conftest import residual_net

    out = tmp_path / "out"
    assert run_cli("compile", save_model(residual_net(batch=1), "residual_cli"), "--calib", tiny_images, "--out", out,
                   "--num-calib", "4", "--per-tensor").returncode == 0
    result = run_cli("analyze", out, "--calib", tiny_images, "--num-samples", "8", "--oracle")
    assert result.returncode == 0, result.stderr
    rep = json.loads((out / "analysis.json").read_text())["oracle"]["repeatability"]
    assert rep["samples_per_half"] == 4
    assert "vs the one-layer-float oracle" in result.stderr
    assert f"agree at ρ {rep['spearman_between_halves']:+.2f}" in result.stderr.replace("\n", " ")


def test_analyze_table_files_and_json(effnet_compiled, tmp_path):
    from conftest import DEMO_IMAGES

    result = run_cli("analyze", effnet_compiled, "--calib", DEMO_IMAGES, "--num-samples", "4", "--top", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # human output goes to stderr; stdout is kept for --json
    assert "3 most sensitive of" in result.stderr and "4 float32 + 4 int8 invocations" in result.stderr
    assert "+4 of the layer-kernel model" in result.stderr
    assert re.search(r"of which invocations [\d.]+ s, compare [\d.]+ s, local errors [\d.]+ s, backward [\d.]+ s", result.stderr)
    rows = [line for line in result.stderr.splitlines() if re.match(r"\s+[123]\s+\d+\s+\S+\s+(conv|dwconv|fc|add)", line)]
    assert len(rows) == 3
    assert "…" not in result.stderr  # a piped stderr gets 120 columns: no column of the table is cut
    data = json.loads((effnet_compiled / "analysis.json").read_text())
    assert data["samples"]["count"] == 4 and data["metric"] == "output_share" and data["samples"]["local"] == 4
    assert sum(l["local_rmse_lsb"] is not None for l in data["layers"]) >= 55
    assert sum(l["output_share"] is not None for l in data["layers"]) >= 55
    as_json = run_cli("analyze", effnet_compiled, "--calib", DEMO_IMAGES, "--num-samples", "2", "--local-samples", "1",
                      "--metric", "weight_sqnr", "--json")
    assert as_json.returncode == 0
    parsed = json.loads(as_json.stdout)
    assert parsed["metric"] == "weight_sqnr" and parsed["invocations"] == {"float32": 2, "int8": 2, "layer_kernels": 1, "backward": 1}
    assert parsed["samples"]["local"] == 1


@pytest.mark.parametrize("args,message", [
    (["--metric", "bogus"], "unknown metric 'bogus'"),
    (["--num-samples", "0"], "--num-samples must be positive"),
    (["--mean", "1,2"], "mean"),
])
def test_analyze_bad_options_one_line(effnet_compiled, args, message):
    from conftest import DEMO_IMAGES

    before = (effnet_compiled / "compile.json").read_bytes()
    result = run_cli("analyze", effnet_compiled, "--calib", DEMO_IMAGES, *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert (effnet_compiled / "compile.json").read_bytes() == before


def test_analyze_missing_compile_dir(tmp_path, tiny_images):
    result = run_cli("analyze", tmp_path / "nothing-here", "--calib", tiny_images)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr


def _tree_digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_force_replaces_only_an_earlier_compile_output(tmp_path, tiny_images, save_model):
    """--force may replace an earlier compile folder, never the run's own inputs, a file, or a folder of other files."""
    import shutil

    model = save_model(pad_conv_net(), "pad_force")
    calib = tmp_path / "calib"
    shutil.copytree(tiny_images, calib)
    (calib / "notes.txt").write_text("my notes")
    holder = tmp_path / "models"
    holder.mkdir()
    shutil.copy(model, holder / "net.onnx")
    afile = tmp_path / "afile.txt"
    afile.write_text("keep me")
    others = tmp_path / "others"
    others.mkdir()
    (others / "thesis.tex").write_text("keep me too")
    cases = [(model, calib, r"--out .*calib is the --calib data, an input of this command"),
             (holder / "net.onnx", holder, r"--out .*models holds the ONNX model, an input of this command"),
             (model, afile, r"--out .*afile.txt is a file, not a compile output folder; not replaced"),
             (model, others, r"--out .*others holds files and is not a compile output folder \(no compile.json\)")]
    for onnx_path, out, message in cases:
        before = {f: _tree_digest(f) for f in (calib, holder, others)}
        result = run_cli("compile", onnx_path, "--calib", calib, "--out", out, "--force", "--num-calib", "4")
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and re.search(message, lines[0]), result.stderr
        assert {f: _tree_digest(f) for f in before} == before
        assert afile.read_text() == "keep me"
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no hidden .partial or .old left"


def _wait_for(predicate, timeout: float = 120.0) -> None:
    import time

    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_signal_mid_compile_leaves_nothing_and_says_so(signame, tmp_path, existing_out):
    """timeout/CI send SIGTERM, a user ^C: either way the staging folder and onnx2tf's temp folder go,
    the earlier output stays byte for byte, and one line says what happened."""
    import signal as signals

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    before = _tree_digest(existing_out)
    proc = subprocess.Popen([*CLI, "compile", str(DEMO_MODEL), "--calib", str(REPO / "demo" / "images"), "--out", str(existing_out),
                             "--force", "--num-calib", "8", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, TMPDIR=str(tmp)))
    try:  # the onnx2tf work folder exists from conversion until verification: a signal there must clean up both
        _wait_for(lambda: any(p.name.startswith(f"quantune-onnx2tf-{proc.pid}-") for p in tmp.iterdir()))
        assert any(p.name.startswith(f".out.partial-{proc.pid}-") for p in tmp_path.iterdir())
        proc.send_signal(getattr(signals, signame))
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    number = getattr(signals, signame).value
    assert proc.returncode == 128 + number
    assert err.strip().splitlines() == [f"error: compile interrupted ({signame}); nothing half-written was left, "
                                        "and earlier outputs are as they were"], err
    assert _tree_digest(existing_out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")] and not list(tmp.iterdir())


def test_what_a_killed_compile_left_is_removed_by_the_next(tmp_path, tiny_images, save_model):
    """SIGKILL cannot be handled: the next compile removes a dead process's partial folder and temp
    folder, and leaves a live one's alone."""
    model = save_model(pad_conv_net(), "pad_killed")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    live = str(os.getpid())
    left = [tmp_path / f".out.partial-{dead}-abc", tmp / f"quantune-onnx2tf-{dead}-xyz"]
    running = [tmp_path / f".out.partial-{live}-abc", tmp / f"quantune-onnx2tf-{live}-xyz"]
    for folder in left + running:
        folder.mkdir()
        (folder / "model.onnx").write_bytes(b"x" * 1000)
    result = subprocess.run([*CLI, "compile", str(model), "--calib", str(tiny_images), "--out", str(tmp_path / "out"),
                             "--num-calib", "4", "--quiet"], capture_output=True, text=True, env=dict(os.environ, TMPDIR=str(tmp)))
    assert result.returncode == 0, result.stderr
    assert not any(p.exists() for p in left) and all(p.is_dir() for p in running)


def test_quiet_compile_still_says_which_images_were_skipped(tmp_path, tiny_images, save_model):
    import shutil

    model = save_model(pad_conv_net(), "pad_skip")
    calib = tmp_path / "calib"
    calib.mkdir()
    for f in sorted(tiny_images.glob("*.jpg"))[:4]:
        shutil.copy(f, calib / f.name)
    (calib / "broken.jpg").write_bytes(b"not a jpeg")
    result = run_cli("compile", model, "--calib", calib, "--out", tmp_path / "out", "--num-calib", "5", "--quiet")
    assert result.returncode == 0 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: 4 of 5 calibration images used; unreadable: broken.jpg"), result.stderr
