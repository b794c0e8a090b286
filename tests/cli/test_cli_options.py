"""Each CLI flag reaches the option it names (issue 29: flags tested only through the Python API).

The commands are run in-process with every flag set to a value no default has, and the API call they
end in is replaced by a spy that records its options and stops the command: a flag wired to the
wrong field, or not wired at all, fails here. What the API then does with them is tested elsewhere.
"""
import pytest
import typer
from typer.testing import CliRunner

from quantune_edge.cli import app


def _spy(monkeypatch, module, name: str) -> list:
    calls: list = []

    def record(*args, **kwargs):
        calls.append(args)
        raise typer.Exit(0)

    monkeypatch.setattr(module, name, record)
    return calls


def _invoke(*args) -> None:
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output


PREP_FLAGS = ("--mean", "10,20,30", "--std", "2,3,4", "--input-size", "40", "--resize", "48", "--channel-order", "bgr")


def _assert_prep(prep) -> None:
    assert prep is not None and list(prep.mean) == [10, 20, 30] and list(prep.std) == [2, 3, 4]
    assert prep.input_size == 40 and prep.resize == 48 and prep.channel_order == "bgr"


def test_every_tune_flag_reaches_tune_options(monkeypatch, tmp_path):
    from quantune_edge.tune import tuning

    calls = _spy(monkeypatch, tuning, "tune")
    _invoke("tune", tmp_path / "out", "--eval", tmp_path / "eval", "--max-drop", 2.5, "--keep-float", "a*", "--keep-float", "re:b",
            "--keep-int8", "c", "--num-eval", 17, "--metric", "local_rmse", "--rerank", 3, "--seed", 9, "--threads", 3, "--naive",
            "--best-effort", "--pareto", "--remeasure", "--verbose", *PREP_FLAGS)
    (folder, data, options, *_), = calls
    assert folder == tmp_path / "out" and data == tmp_path / "eval"
    assert (options.max_drop, options.min_sqnr, options.max_latency_ratio, options.float_layers) == (2.5, None, None, None)
    assert options.keep_float == ["a*", "re:b"] and options.keep_int8 == ["c"] and options.metric == "local_rmse"
    assert (options.num_eval, options.rerank, options.seed, options.threads) == (17, 3, 9, 3)
    assert options.fusion_aware is False and options.best_effort and options.pareto and options.remeasure and options.verbose
    _assert_prep(options.preprocessing)
    for flag, value, field in (("--min-sqnr", 31.5, "min_sqnr"), ("--max-latency-ratio", 1.25, "max_latency_ratio"),
                               ("--float-layers", 7, "float_layers")):
        calls.clear()
        _invoke("tune", tmp_path / "out", "--eval", tmp_path / "eval", flag, value)
        (_, _, options, *_), = calls
        assert getattr(options, field) == value and options.preprocessing is None and options.fusion_aware, flag


def test_every_analyze_flag_reaches_analysis_options(monkeypatch, tmp_path):
    from quantune_edge.cli import analyze as analyze_cli

    calls = _spy(monkeypatch, analyze_cli, "_analyze")
    _invoke("analyze", tmp_path / "out", "--calib", tmp_path / "calib", "--num-samples", 12, "--seed", 4, "--local-samples", 5,
            "--metric", "sqnr_delta", "--oracle", "--top", 3, "--threads", 1, "--verbose", *PREP_FLAGS)
    (folder, calib, options), = calls
    assert folder == tmp_path / "out" and calib == tmp_path / "calib"
    assert (options.num_samples, options.seed, options.local_samples, options.metric) == (12, 4, 5, "sqnr_delta")
    assert options.oracle and options.threads == 1 and options.verbose
    _assert_prep(options.preprocessing)


@pytest.mark.parametrize("flag", ["--max-drop", "--min-sqnr", "--max-latency-ratio", "--float-layers"])
def test_a_tune_budget_flag_given_twice_keeps_the_last(monkeypatch, tmp_path, flag):
    """typer's own rule for a repeated scalar option, pinned so a change of option type shows."""
    from quantune_edge.tune import tuning

    calls = _spy(monkeypatch, tuning, "tune")
    _invoke("tune", tmp_path, "--eval", tmp_path, flag, 1, flag, 2)
    (_, _, options, *_), = calls
    assert getattr(options, flag.lstrip("-").replace("-", "_")) == 2


def test_every_compile_flag_reaches_compile_options(monkeypatch, tmp_path):
    from quantune_edge.compile import compiler

    calls = _spy(monkeypatch, compiler, "compile_model")
    _invoke("compile", tmp_path / "m.onnx", "--calib", tmp_path / "calib", "--out", tmp_path / "out", "--num-calib", 21, "--seed", 6,
            "--per-tensor", "--int8-io", "--force", "--verbose", "--resize-mode", "letterbox", "--pad-value", 7, "--placement", "top-left",
            "--task", "detect", "--decoder", "yolov8", "--labels", tmp_path / "coco.json", "--nms-iou", 0.55, "--classes", 3,
            "--input-shape", "images=1x3x64x64", "--mean", "10,20,30", "--std", "2,3,4", "--input-size", "40", "--channel-order", "bgr")
    (model, calib, out, options, *_), = calls
    assert (model, calib, out) == (tmp_path / "m.onnx", tmp_path / "calib", tmp_path / "out")
    assert (options.num_calib, options.seed, options.per_channel, options.int8_io, options.force, options.verbose) == (21, 6, False, True, True, True)
    assert options.input_shapes == {"images": (1, 3, 64, 64)}
    prep = options.preprocessing
    assert (prep.resize_mode, prep.pad_value, prep.placement, prep.input_size, prep.channel_order) == ("letterbox", 7, "top-left", 40, "bgr")
    assert list(prep.mean) == [10, 20, 30] and list(prep.std) == [2, 3, 4]
    judge = options.judge.to_dict()
    assert judge["name"] == "detect" and judge["decoder"] == "yolov8" and judge["labels_file"] == str(tmp_path / "coco.json")
    assert judge["nms_iou"] == 0.55 and judge["classes"] == 3
    calls.clear()
    _invoke("compile", tmp_path / "m.onnx", "--calib", tmp_path / "calib", "--out", tmp_path / "out", "--label-offset", 1)
    (*_, options), = [c[:4] for c in calls]
    assert options.label_offset == 1 and options.judge.to_dict()["label_offset"] == 1 and options.per_channel


def test_every_run_flag_reaches_run_options(monkeypatch, tmp_path):
    from quantune_edge import pipeline

    targets = tmp_path / "targets"
    targets.mkdir()
    (targets / "pi.toml").write_text('host = "192.0.2.1"\nuser = "pi"\n')
    calls = _spy(monkeypatch, pipeline, "run_pipeline")
    _invoke("run", tmp_path / "m.onnx", "--calib", tmp_path / "calib", "--eval", tmp_path / "eval", "--target", "pi", "--targets-dir", targets,
            "--out", tmp_path / "out", "--max-latency-ratio", 1.4, "--num-calib", 11, "--num-samples", 9, "--num-eval", 13, "--per-tensor",
            "--label-offset", 1, "--runs", 4, "--pareto", "--eval-on-device", "--best-effort", "--trust-new-host-key", "--install-runtime",
            "--verbose", "--input-shape", "input=1x3x32x32", *PREP_FLAGS)
    (model, calib, data, chosen, out, options, *_), = calls
    assert (model, calib, data, out) == (tmp_path / "m.onnx", tmp_path / "calib", tmp_path / "eval", tmp_path / "out")
    assert [t.name for t in chosen] == ["pi"]
    assert (options.max_latency_ratio, options.max_drop, options.min_sqnr) == (1.4, None, None)
    assert (options.num_calib, options.analysis_samples, options.num_eval, options.runs, options.label_offset) == (11, 9, 13, 4, 1)
    assert options.per_tensor and options.pareto and options.eval_on_device and options.best_effort
    assert options.trust_new_host_key and options.install_runtime and options.verbose
    assert options.input_shapes == {"input": (1, 3, 32, 32)} and options.judge.to_dict()["label_offset"] == 1
    _assert_prep(options.preprocessing)
    for flag, value, field in (("--max-drop", 2.0, "max_drop"), ("--min-sqnr", 25.0, "min_sqnr")):
        calls.clear()
        _invoke("run", tmp_path / "m.onnx", "--calib", tmp_path / "calib", "--eval", tmp_path / "eval", "--target", "pi",
                "--targets-dir", targets, "--out", tmp_path / "out", flag, value, *(("--task", "fidelity") if flag == "--min-sqnr" else ()))
        (*_, options), = [c[:6] for c in calls]
        assert getattr(options, field) == value, flag
