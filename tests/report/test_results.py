"""Reading benchmark rows back: a file benchmarked twice under two labels is shown as one model; a latency budget per target."""
import html

from quantune_edge.measure.saved import ResultRow
from quantune_edge.report.bench_page import SAME_FILE_NOTE, display_labels, render_html
from quantune_edge.report.run_report import budget_warnings, latency_budget_check


def _row(target: str, label: str, sha: str, p50: float) -> ResultRow:
    return ResultRow(target=target, emulated=False, machine="aarch64", runtime="tflite-runtime 2.14.0", label=label,
                     model=f"/m/model_{label}.tflite", sha256=sha, size_bytes=1000, threads=2, p50_ms=p50, p90_ms=p50,
                     p99_ms=p50, mean_ms=p50, runs=5, speedup_vs_float=None, created="", report="")


def test_same_bytes_under_another_label_is_marked_per_target():
    rows = [_row("pi", "float32", "f", 9.0), _row("pi", "int8", "q", 3.0), _row("pi", "mixed", "q", 2.5),
            _row("pi5", "int8", "q", 2.0), _row("pi5", "mixed", "m", 2.2)]
    assert display_labels(rows) == (["float32", "int8", "mixed (= int8)", "int8", "mixed"], SAME_FILE_NOTE)
    page = render_html(rows)
    assert "mixed (= int8)" in page and html.escape(SAME_FILE_NOTE) in page


def test_distinct_files_keep_their_labels_and_no_note():
    rows = [_row("pi", "float32", "f", 9.0), _row("pi", "int8", "q", 3.0), _row("pi", "mixed", "m", 3.2)]
    assert display_labels(rows) == (["float32", "int8", "mixed"], None)
    assert "same bytes" not in render_html(rows)


def test_a_latency_budget_is_read_off_every_target():
    rows = [_row("pi4", "int8", "q", 10.0), _row("pi4", "mixed", "m", 12.4), _row("pi5", "int8", "q", 4.0), _row("pi5", "mixed", "m", 6.0),
            _row("pi3", "int8", "q", 20.0)]  # no mixed timing on pi3: nothing to check there
    budget = {"max_latency_ratio": 1.2, "latency_source": {"kind": "device", "target": {"name": "pi4"}}}
    check = latency_budget_check(budget, rows)
    assert check["timed_on"] == "pi4" and [(t["target"], round(t["latency_ratio"], 2), t["over"]) for t in check["targets"]] == [
        ("pi4", 1.24, False), ("pi5", 1.5, True)]  # 1.24 is within what one unpaired timing moves (5 %)
    [line] = budget_warnings(check)
    assert line.startswith("latency budget 1.2x full int8 (timed on pi4) is exceeded on pi5: mixed runs at 1.50x") and "--latency-source pi5" in line
    rows[1] = _row("pi4", "mixed", "m", 13.0)
    assert "this device's timings move more" in budget_warnings(latency_budget_check(budget, rows))[0]
    host = latency_budget_check({"max_latency_ratio": 1.2, "latency_source": {"kind": "host"}}, rows)
    assert host["timed_on"] == "host" and len(budget_warnings(host)) == 2
    assert latency_budget_check({"max_drop_points": 1.0}, rows) is None and budget_warnings(None) == []
