"""Reading benchmark rows back: a file benchmarked twice under two labels is shown as one model."""
import html

from quantune_edge.results import SAME_FILE_NOTE, ResultRow, display_labels, render_html


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
