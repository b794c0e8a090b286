"""`quantune-edge run` end to end on the shipped EfficientNet-Lite0: a loopback sshd target (x86_64)
and the emulated ARM board, stage caching, every report section, and the page in headless Chromium."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import DEMO_IMAGES, DEMO_MODEL, REPO

from quantune_edge.testing.loopback_sshd import LoopbackSshd, free_port

CLI = [sys.executable, "-m", "quantune_edge.cli"]
CHROMIUM = shutil.which("chromium")
SECTIONS = {"model", "compile", "analysis", "tune", "accuracy", "device", "pareto", "stages"}


def run_cli(*args):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=1800,
                          env=dict(os.environ, COLUMNS="200"))


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    server = LoopbackSshd(tmp_path_factory.mktemp("run-sshd")).start()
    yield server
    server.stop()


def _args(out, targets_dir, targets, *extra):
    return ["run", DEMO_MODEL, "--calib", DEMO_IMAGES, "--eval", DEMO_IMAGES, "--target", targets, "--targets-dir", targets_dir,
            "--out", out, "--mean", "127,127,127", "--std", "128,128,128", "--num-calib", 16, "--num-samples", 8, "--num-eval", 16,
            "--runs", 2, *extra]


def test_run_twice_report_and_failing_stage(sshd, emulated_target, tmp_path):
    targets_dir = tmp_path / "targets"
    sshd.target_toml(targets_dir / "loop.toml", python=sys.executable, work_dir=tmp_path / "device")
    shutil.copy(emulated_target, targets_dir / "arm.toml")
    out = tmp_path / "run"
    first = run_cli(*_args(out, targets_dir, "loop,arm", "--eval-on-device", "--json"))
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads(first.stdout)
    assert SECTIONS <= set(report) and report["schema_version"] == 1
    assert not any(s["cached"] for s in report["stages"].values())
    machines = {(r["target"], r["label"]): r["machine"] for r in report["device"]}
    assert machines[("arm", "mixed")] == "aarch64" and machines[("loop", "float32")] == "x86_64"
    assert len(report["device"]) == 6 and all(r["p50_ms"] > 0 for r in report["device"])
    assert set(report["accuracy"]["host"]) == {"float32", "int8", "mixed"} and report["accuracy"]["is"] == "top-1"
    assert report["analysis"]["invocations"] == {"float32": 8, "int8": 8, "layer_kernels": 8, "backward": 8} and len(report["analysis"]["most_sensitive"]) == 10
    assert {p["label"] for p in report["pareto"]["device"]} == {"float32", "int8", "mixed"}
    page = (out / "report.html").read_text()
    vs = report["accuracy"]["mixed_vs_float32"]
    assert f"{vs['images_lost']} images only float32 gets right, {vs['images_won']} only mixed" in page
    assert "budget: top-1 at most 1 point below float32 (met)" in page  # met: the run exited 0 without --best-effort
    assert report["latency_budget"] is None  # an accuracy budget: nothing to check per target
    assert "data:image/png;base64," in page and "<svg" in page and "aarch64" in page and "<script" not in page
    sha = {(r["target"], r["label"]): r["sha256"] for r in report["device"]}
    p50 = {(r["target"], r["label"]): r["p50_ms"] for r in report["device"]}
    assert "latency ÷ full int8" in page and f"<td>{p50[('arm', 'mixed')] / p50[('arm', 'int8')]:.2f}x</td>" in page
    assert ("mixed (= int8)" in page) == (sha[("arm", "mixed")] == sha[("arm", "int8")])  # one file, measured twice
    top = report["analysis"]["most_sensitive"][0]  # named in ONNX terms too
    assert top["onnx_nodes"] and top["onnx_nodes"][0].startswith("/_") and top["onnx_nodes"][0] in page

    on_device = report["accuracy"]["device"]["targets"]
    assert on_device["arm"]["mixed"]["machine"] == "aarch64" and set(on_device["loop"]) == {"float32", "int8", "mixed"}
    for target in ("arm", "loop"):
        for label, row in on_device[target].items():
            assert row["metric"] == "top-1" and row["agreement_with_host"] >= 0.9 and 0 <= row["value"] <= 1, (target, label)
    assert on_device["loop"]["int8"]["value"] == pytest.approx(report["accuracy"]["host"]["int8"])  # same kernels, same answer
    assert on_device["loop"]["int8"]["host_value"] == pytest.approx(report["accuracy"]["host"]["int8"])
    assert "on the devices" in page

    again = run_cli(*_args(out, targets_dir, "loop,arm", "--eval-on-device", "--json"))
    assert again.returncode == 0, again.stderr[-2000:]
    stages = json.loads(again.stdout)["stages"]
    assert all(stages[s]["cached"] for s in ("compile", "analyze", "tune", "bench", "device-eval")) and not stages["report"]["cached"]

    (targets_dir / "dead.toml").write_text((targets_dir / "loop.toml").read_text().replace(f"port = {sshd.port}", f"port = {free_port()}"))
    int8_before = (out / "compiled" / "model_int8.tflite").read_bytes()
    failed = run_cli(*_args(out, targets_dir, "dead", "--max-drop", "2.0"))
    assert failed.returncode == 3 and "stage 'bench' failed: dead: " in failed.stderr and "cannot reach" in failed.stderr
    assert failed.stderr.count("error:") == 1
    assert "compile: cached" in failed.stderr and "analyze: cached" in failed.stderr  # only the budget changed
    assert (out / "compiled" / "model_int8.tflite").read_bytes() == int8_before
    assert (out / "compiled" / "tune.json").is_file() and (out / "report.html").is_file()
    state = json.loads((out / "stages.json").read_text())
    assert state["bench"]["status"] == "failed" and state["tune"]["status"] == "done"

    both = run_cli(*_args(out, targets_dir, "loop", "--max-drop", "1", "--max-latency-ratio", "1.2"))
    assert both.returncode != 0 and both.stderr.strip().splitlines() == ["error: give one of --max-drop, --min-sqnr, --max-latency-ratio"], both.stderr
    timed = run_cli(*_args(out, targets_dir, "loop,arm", "--max-latency-ratio", "1.3", "--best-effort"))
    assert timed.returncode == 0, timed.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    stages = report["stages"]
    assert stages["analyze"]["cached"] and not stages["tune"]["cached"]
    # the budget is timed on the first target during tune, and read off every target's bench afterwards
    check, said = report["latency_budget"], " ".join((timed.stdout + timed.stderr).split())
    p50 = {(r["target"], r["label"]): r["p50_ms"] for r in report["device"]}
    assert check["timed_on"] == "loop" and sorted(t["target"] for t in check["targets"]) == ["arm", "loop"]
    for t in check["targets"]:
        ratio = p50[(t["target"], "mixed")] / p50[(t["target"], "int8")]
        assert t["latency_ratio"] == pytest.approx(ratio) and t["over"] == (ratio > 1.3 * 1.05)
        assert (f"is exceeded on {t['target']}:" in said) == t["over"], said[-1500:]
    tuned = json.loads((out / "compiled" / "tune.json").read_text())
    assert tuned["budget"]["max_latency_ratio"] == 1.3 and tuned["budget"]["latency_source"]["target"]["name"] == "loop"
    assert all("device_latency_ratio" in e for e in tuned["evaluations"])  # the budget was timed on the target
    assert tuned["budget"]["met"] == (tuned["chosen"]["device_latency_ratio"] <= 1.3)  # met exactly when within the budget
    assert "budget: latency at most 1.3x full int8, timed on loop (" in (out / "report.html").read_text()


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="needs Debian's chromium (make test installs it as root)")
def test_demo_on_its_board_shows_mixed_precision_winning_back_what_int8_lost(emulated_target, tmp_path):
    """What `make demo` runs, with its emulated board: the shipped MobileNetV2 with per-tensor weights,
    whose full int8 collapses, gets its top-1 back from a few float layers (on images other than the
    calibration ones), and the report renders in headless Chromium."""
    out = tmp_path / "run"
    result = run_cli("demo", "--out", out, "--runs", 1, "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    host = report["accuracy"]["host"]
    assert report["accuracy"]["samples"] == 40 and report["compile"]["quantization"]["weights"] == "int8 per-tensor"
    assert host["int8"] < host["float32"] - 0.3  # full int8 loses clearly
    assert host["mixed"] >= host["float32"] - 0.01 and report["tune"]["budget"]["met"]  # within the 1-point budget
    assert 1 <= len(report["tune"]["chosen_layers"]) <= 16  # a few of its 65 layers
    assert {(r["target"], r["label"]) for r in report["device"]} >= {("local-arm", m) for m in ("float32", "int8", "mixed")}
    assert {r["machine"] for r in report["device"]} == {"aarch64"}
    calibrated = set(json.loads((out / "compiled" / "compile.json").read_text())["calibration"]["files"])
    assert not calibrated & {p.name for p in (REPO / "demo" / "images-eval").glob("*.jpg")}
    shot = tmp_path / "page.png"
    browser = subprocess.run(
        [CHROMIUM or "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
         "--enable-logging=stderr", "--v=0", "--window-size=1200,2400", f"--screenshot={shot}", (out / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 50_000, browser.stderr[-2000:]
    console = [line for line in browser.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1200, 2400) and len(np.unique(np.asarray(im.convert("L").resize((60, 120))))) > 20  # not a blank page


def test_a_stage_cached_by_other_code_runs_again(tmp_path):
    """The stage key hashes the source: in a copy of the package, a stage recorded as done is cached
    while the code is the same, and runs again once one source file changes (a subprocess imports the
    copy, so nothing here stands in for the fingerprint)."""
    from conftest import REPO

    copy = tmp_path / "code"
    for package in ("quantune_edge", "device_agent"):
        shutil.copytree(REPO / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "run"
    out.mkdir()
    (out / "compiled").mkdir()
    probe = ("import json, sys; from pathlib import Path; from quantune_edge import pipeline as p; "
             "out = Path(sys.argv[1]); key = p._key('tune', 'analyze-key', 1.0); stages = p._Stages(out); "
             "cached = stages.cached('tune', key, [out / 'compiled']); "
             "stages.state['tune'] = {'key': key, 'status': 'done'}; stages.save(); "
             "print(json.dumps({'file': p.__file__, 'key': key, 'cached': cached}))")

    def run() -> dict:
        result = subprocess.run([sys.executable, "-c", probe, str(out)], capture_output=True, text=True,
                                env=dict(os.environ, PYTHONPATH=str(copy)), cwd=tmp_path, timeout=300)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    first = run()
    assert first["file"].startswith(str(copy)) and not first["cached"], first  # the copy is what ran; nothing recorded yet
    again = run()
    assert again["key"] == first["key"] and again["cached"], again  # same code, same inputs: the stage is skipped
    tuning = copy / "quantune_edge" / "tune" / "tuning.py"
    tuning.write_text(tuning.read_text() + "\n# a newer tune\n")
    changed = run()
    assert changed["key"] != first["key"] and not changed["cached"], changed  # other code: the stage runs again


def test_run_refuses_nonsense_budgets_and_foreign_out_folders_before_any_work(tmp_path):
    """Before compiling anything: a budget that means nothing, an --out that is an input or holds a
    user's other files, or a compiled/ inside it that is not a compile folder, each one line, exit 2."""
    from conftest import REPO

    calib = tmp_path / "calib"
    shutil.copytree(DEMO_IMAGES, calib)
    mine = tmp_path / "mine"
    (mine / "compiled").mkdir(parents=True)
    (mine / "compiled" / "draft.txt").write_text("keep")
    (mine / "stages.json").write_text("{}")
    others = tmp_path / "others"
    others.mkdir()
    (others / "thesis.tex").write_text("keep")
    target = ["--target", "local-arm", "--targets-dir", REPO / "targets"]
    common = ["--eval", DEMO_IMAGES, *target, "--num-calib", 4]
    cases = [(["--calib", calib, "--out", tmp_path / "new", "--max-drop", "-5"], "--max-drop must be a finite number of points"),
             (["--calib", calib, "--out", tmp_path / "new", "--max-latency-ratio", "nan"], "--max-latency-ratio must be a finite ratio"),
             (["--calib", calib, "--out", calib], "is the --calib data, an input of this command"),
             (["--calib", calib, "--out", tmp_path], "holds the ONNX model" if DEMO_MODEL.is_relative_to(tmp_path) else "holds the --calib data"),
             (["--calib", calib, "--out", others], "holds files and is not a run folder (no stages.json)"),
             (["--calib", calib, "--out", mine], "compiled holds files and is not a compile output folder (no compile.json)")]
    for args, message in cases:
        result = run_cli("run", DEMO_MODEL, *common, *args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "new").exists() and sorted(p.name for p in calib.iterdir()) == sorted(p.name for p in DEMO_IMAGES.iterdir())
    assert (others / "thesis.tex").read_text() == "keep" and (mine / "compiled" / "draft.txt").read_text() == "keep"


def test_run_judges_by_the_compiles_task_in_every_table_and_chart(sshd, tmp_path):
    """A two-input model, --task fidelity: the budget is --min-sqnr, the device measures the task's
    metric from its own outputs, and the report speaks of output SQNR, not top-1."""
    import onnx
    from conftest import image_and_vector_net

    rng = np.random.default_rng(0)
    onnx.save(image_and_vector_net(), tmp_path / "two.onnx")
    np.savez(tmp_path / "two.npz", image=rng.normal(size=(12, 3, 32, 32)).astype(np.float32),
             meta=rng.normal(size=(12, 16)).astype(np.float32))
    targets_dir = tmp_path / "targets"
    sshd.target_toml(targets_dir / "loop.toml", python=sys.executable, work_dir=tmp_path / "device")
    out = tmp_path / "run"
    proc = run_cli("run", tmp_path / "two.onnx", "--calib", tmp_path / "two.npz", "--eval", tmp_path / "two.npz", "--target", "loop",
                   "--targets-dir", targets_dir, "--out", out, "--task", "fidelity", "--min-sqnr", 30, "--num-calib", 12,
                   "--num-samples", 8, "--num-eval", 12, "--runs", 2, "--eval-on-device", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["accuracy"]["is"] == "output SQNR dB" and report["tune"]["budget"]["min_sqnr_db"] == 30
    assert report["accuracy"]["host"]["mixed"] >= 30 and report["tune"]["budget"]["met"]
    rows = report["accuracy"]["device"]["targets"]["loop"]
    assert set(rows) == {"float32", "int8", "mixed"} and rows["int8"]["metric"] == "output SQNR dB"
    assert rows["int8"]["value"] == pytest.approx(report["accuracy"]["host"]["int8"], abs=0.01)  # the same kernels
    page = (out / "report.html").read_text()
    assert "output SQNR dB vs latency" in page and "every output at least 30 dB SQNR against float32 (met)" in page
    assert "output SQNR dB (device)" in page and "top-1" not in page
    wrong = run_cli("run", tmp_path / "two.onnx", "--calib", tmp_path / "two.npz", "--eval", tmp_path / "two.npz", "--target", "loop",
                    "--targets-dir", targets_dir, "--out", tmp_path / "other", "--min-sqnr", 30)
    assert wrong.returncode == 2 and "--min-sqnr is the fidelity task's budget" in wrong.stderr and not (tmp_path / "other").exists()
